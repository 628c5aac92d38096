"""Attention mixers of the family: ``A`` causal, ``W`` sliding window, ``F`` B'MOJO-F, ``B`` B'MOJO.

One class covers the four letters because they differ only in which key sets a query sees (DESIGN §2.2-2.4):
``A`` all past tokens; ``W`` the window; ``F`` the window plus the SSM's fading tokens just behind it; ``B``
also the eidetic memory of innovation-selected tokens. The parallel path calls the ``bmojo_attention`` op; the
recurrent path decodes one token from an :class:`AttentionState` with :meth:`AttentionMixer.before_token`,
:meth:`AttentionMixer.step` and :meth:`AttentionMixer.after_token`, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.config import BmojoConfig
from bmojo.model.layers import InitRole, RMSNorm, RotaryEmbedding, mark_init
from bmojo.model.mamba2 import Mamba2Mixer, SSMState
from bmojo.model.memory import InnovationPredictor, MemoryFIFO, innovation_ratio, innovation_scores, select_memory
from bmojo.model.store import TokenStore, retrieve_parallel
from bmojo.ops import bmojo_attention, eidetic_gather

# Decoding computes RoPE tables this many positions at a time and slices one per token.
ROPE_BLOCK = 64
# Reveal position of an empty memory slot.
NEVER = torch.iinfo(torch.long).max


@dataclass
class AttentionState:
    """Decoding state of one attention layer (DESIGN §2.5), allocated by the prefill and then written in place.

    keys/values: post-RoPE keys and values a query may read. ``A``: [B, Hkv, T, Dh], the T past positions, one
    more each token. Windowed letters: [B, Hkv, S, Dh], S fixed slots laid out [local ring (R) | fading (w) |
    memory (M)]: local keys of the last ``R`` positions at slot ``p % R`` (R = w, or the memory block if longer,
    so a finished block's keys are still there); fading keys of positions [t-2w+1, t-w] at slot ``p % w``; the
    eidetic memory's entries in :class:`MemoryFIFO` order (their keys not rotated where ``memory_rope`` is off),
    then, with an in-storage memory, the ``store_topk`` entries the last query retrieved from ``store``.
    mask: [B, 1, 1, S] additive (0 or -inf), which slots the last query saw; pending_*: [B, Hkv, w, Dh] fading
    keys of the last ``w`` positions at slot ``p % w``, waiting to fall behind the window; ssm: the inner SSM's
    state; prev_s: [B, 1, D] last SSM output; block_scores: [B, Q_e] innovation ratios of the unfinished memory
    block at slot ``p % Q_e``; memory_reveal: [B, 1, 1, M] first query position that may read each memory slot
    (the entry has left the window), and next_reveal the first of them still ahead; rope:
    :meth:`RotaryEmbedding.tables` of the ``ROPE_BLOCK`` positions around the next one, computed once a block
    instead of once a token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None = None
    pending_keys: torch.Tensor | None = None
    pending_values: torch.Tensor | None = None
    ssm: SSMState | None = None
    prev_s: torch.Tensor | None = None
    block_scores: torch.Tensor | None = None
    memory: MemoryFIFO | None = None
    memory_reveal: torch.Tensor | None = None
    next_reveal: int = NEVER
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    store: TokenStore | None = None


class AttentionMixer(nn.Module):
    def __init__(self, config: BmojoConfig, letter: str):
        super().__init__()
        self.letter = letter
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = None if letter == "A" else config.window_size
        d, hq, hkv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, hq, bias=False)
        self.k_proj = nn.Linear(d, hkv, bias=False)
        self.v_proj = nn.Linear(d, hkv, bias=False)
        self.o_proj = mark_init(nn.Linear(hq, d, bias=False), InitRole.residual_output)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, config.rope_theta)
        self.ssm = Mamba2Mixer(config) if letter in "FB" else None
        if self.ssm is not None:
            mark_init(self.ssm.out_proj, InitRole.fading_output)
        # Fading keys/values reuse k_proj/v_proj and are scored by the query, unless untied: then, as in the
        # B'MOJO-F release, the fading keys have their own key/value projections and QK-norm, and are scored by a
        # query of their own (its own projection of h and QK-norm), still under the one softmax.
        untied = self.ssm is not None and not config.tie_fading_proj
        self.fading_q_proj = nn.Linear(d, hq, bias=False) if untied else None
        self.fading_k_proj = nn.Linear(d, hkv, bias=False) if untied else None
        self.fading_v_proj = nn.Linear(d, hkv, bias=False) if untied else None
        self.fading_q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if untied and config.qk_norm else None
        self.fading_k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if untied and config.qk_norm else None
        self.predictor = InnovationPredictor(d, config.innovation_rank) if letter == "B" else None
        if self.predictor is not None:
            # False: memory keys carry no positional encoding (the key before RoPE) and are scored by the query
            # before RoPE, so a memory score is content only; local and fading keys still meet the rotated query.
            self.memory_rope = config.memory_rope
            self.memory_size = config.memory_size
            self.memory_topk = config.memory_topk
            self.memory_block = config.memory_block
            self.memory_threshold = config.memory_threshold
            self.innovation_eps = config.innovation_eps
            self.store_topk = config.store_topk
            self.store_rule = config.store_rule
            self.store_index, self.store_index_from = config.store_index, config.store_index_from
        if self.window is not None:
            # Decode buffer layout (AttentionState): local ring, fading slots, memory slots.
            self.ring = max(self.window, self.memory_block) if self.predictor is not None else self.window
            self.memory_start = self.ring + (self.window if self.ssm is not None else 0)
            self.store_start = self.memory_start + (self.memory_size if self.predictor is not None else 0)
            # From this position on every slot is visible (W, F), so the decode attention needs no mask.
            self.unmasked_from = None if self.predictor is not None else self.memory_start - 1

    def _heads(self, proj: nn.Linear, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, H, Dh] through ``proj`` and the QK-norm ``norm`` if any, before RoPE."""
        y = proj(x).unflatten(-1, (-1, self.head_dim))
        return y if norm is None else norm(y)

    def _fading_keys(
        self, s: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fading keys (rotated) and values of the SSM output s: [B, T, D] -> each [B, T, Hkv, Dh]."""
        if self.fading_k_proj is None:
            k, v = self._heads(self.k_proj, self.k_norm, s), self._heads(self.v_proj, None, s)
        else:
            k, v = self._heads(self.fading_k_proj, self.fading_k_norm, s), self._heads(self.fading_v_proj, None, s)
        return self.rope(k, rope), v

    def forward(
        self, h: torch.Tensor, want_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, AttentionState | None]:
        """Parallel form. h: [B, T, D] -> (out: [B, T, D], unweighted aux loss or None, state if asked)."""
        batch, length, _ = h.shape
        rope = self.rope.tables(torch.arange(length, device=h.device))
        unrotated_q = self._heads(self.q_proj, self.q_norm, h)
        q = self.rope(unrotated_q, rope)
        unrotated_k = self._heads(self.k_proj, self.k_norm, h)
        k, v = self.rope(unrotated_k, rope), self._heads(self.v_proj, None, h)
        extra, aux, state = {}, None, None
        if want_state:
            state = self._new_state(k, v)
        if self.ssm is not None:
            s, ssm_state = self.ssm(h)
            fk, fv = self._fading_keys(s, rope)
            extra.update(fading_k=fk, fading_v=fv)
            if self.fading_q_proj is not None:
                extra["fading_q"] = self.rope(self._heads(self.fading_q_proj, self.fading_q_norm, h), rope)
            if state is not None:
                self._fill_fading(state, fk, fv)
                # Standard strides even for a batch of one (where clone() would keep the prefill's), the layout
                # the step's own prev_s has: a compiled step then sees one layout.
                state.ssm, state.prev_s = ssm_state, s[:, -1:].clone(memory_format=torch.contiguous_format)
        if self.predictor is not None:
            s_prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)
            iota, aux = innovation_scores(self.predictor, h, s_prev, self.innovation_eps)
            num_blocks = -(-length // self.memory_block)
            # One more query block than the sequence covers gives the memory a continuing decode starts from.
            mem_pos, mem_valid = select_memory(
                iota,
                block=self.memory_block,
                topk=self.memory_topk,
                threshold=self.memory_threshold,
                memory_size=self.memory_size,
                num_query_blocks=length // self.memory_block + 1,
            )
            memory_k = k if self.memory_rope else unrotated_k
            if not self.memory_rope:
                extra["mem_q"] = unrotated_q
            gathered_k, gathered_v = gather_entries((memory_k, v), mem_pos)
            memory = dict(
                mem_k=gathered_k[:, :num_blocks],
                mem_v=gathered_v[:, :num_blocks],
                mem_pos=mem_pos[:, :num_blocks],
                mem_valid=mem_valid[:, :num_blocks],
                mem_block=self.memory_block,
            )
            if self.store_topk:
                storable = self._store_keeps(iota)
                memory = self._with_store(memory, extra.get("mem_q", q), memory_k, v, storable)
            extra.update(memory)
            if state is not None and self.store_topk:
                finished = (length // self.memory_block) * self.memory_block
                state.store = TokenStore.empty(
                    k, batch, k.shape[2], k.shape[3], self.store_index, self.store_index_from
                )
                stored = [t[:, :finished].transpose(1, 2) for t in (memory_k, v)]
                state.store.append(*stored, storable[:, :finished])
            if state is not None:
                current = length // self.memory_block
                state.block_scores = iota.new_zeros(batch, self.memory_block)
                state.block_scores[:, : length - current * self.memory_block] = iota[:, current * self.memory_block :]
                memory = MemoryFIFO(positions=mem_pos[:, current].clone(), valid=mem_valid[:, current].clone())
                self._fill_memory(state, memory, gathered_k[:, current], gathered_v[:, current], length - 1)
        out = bmojo_attention(q, k, v, window=self.window, **extra)
        return self.o_proj(out.flatten(2)), aux, state

    def _store_keeps(self, iota: torch.Tensor) -> torch.Tensor:
        """Which tokens the store keeps (``store_rule``), from their innovation ratios iota: [B, n] -> [B, n] bool."""
        if self.store_rule == "innovative":
            return iota > self.memory_threshold
        return torch.ones_like(iota, dtype=torch.bool)

    def _with_store(
        self,
        memory: dict,
        query: torch.Tensor,
        memory_k: torch.Tensor,
        v: torch.Tensor,
        storable: torch.Tensor,
    ) -> dict:
        """The op's memory arguments with each query's store retrieval beside its block's in-context memory.

        memory: the per-block ``mem_*`` arguments ([B, NB, M, ...]); query: [B, T, Hq, Dh] as it scores memory
        keys; memory_k, v: [B, T, Hkv, Dh]; storable: [B, T] bool. Retrieval is per query, so the result is per
        query too (``mem_block`` 1, [B, T, M + r, ...]): the block's memory repeated for each of its queries.
        """
        length = memory_k.shape[1]
        positions, valid = retrieve_parallel(
            query,
            memory_k,
            storable,
            memory["mem_pos"],
            memory["mem_valid"],
            block=self.memory_block,
            window=self.window,
            topk=self.store_topk,
        )
        retrieved_k, retrieved_v = gather_entries((memory_k, v), positions)
        retrieved = {"mem_k": retrieved_k, "mem_v": retrieved_v, "mem_pos": positions, "mem_valid": valid}
        return {
            name: torch.cat([memory[name].repeat_interleave(self.memory_block, dim=1)[:, :length], extra], dim=2)
            for name, extra in retrieved.items()
        } | {"mem_block": 1}

    def _new_state(self, k: torch.Tensor, v: torch.Tensor) -> AttentionState:
        """Decode state after a prefill of keys/values k, v: [B, T, Hkv, Dh]; fading and memory parts zero."""
        if self.window is None:  # head-major, as the SDPA call reads it (and as a Hugging Face cache holds it)
            rope = self._rope_block(k.shape[1], k.device)
            return AttentionState(keys=k.transpose(1, 2).contiguous(), values=v.transpose(1, 2).contiguous(), rope=rope)
        batch, length, heads, dim = k.shape
        size = self.store_start + (self.store_topk if self.predictor is not None else 0)
        state = AttentionState(
            keys=k.new_zeros(batch, heads, size, dim),
            values=v.new_zeros(batch, heads, size, dim),
            mask=k.new_full((batch, 1, 1, size), float("-inf")),
            rope=self._rope_block(length, k.device),
        )
        for buffer, source in ((state.keys, k), (state.values, v)):
            ring_write(buffer[:, :, : self.ring], source, max(0, length - self.ring), length)
        ring_unmask(state.mask[..., : self.ring], max(0, length - self.window), length)
        return state

    def _rope_block(self, position: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ([ROPE_BLOCK, 1, 1, Dh] each) of the block of positions holding ``position``."""
        start = position - position % ROPE_BLOCK
        cos, signed_sin = self.rope.tables(torch.arange(start, start + ROPE_BLOCK, device=device))
        return cos.view(ROPE_BLOCK, 1, 1, -1), signed_sin.view(ROPE_BLOCK, 1, 1, -1)

    def _fill_fading(self, state: AttentionState, fk: torch.Tensor, fv: torch.Tensor) -> None:
        """Fading keys/values of a prefill (fk, fv: [B, T, Hkv, Dh]) into the state: the last w pending, the w
        before them behind the window of the last query."""
        length, w = fk.shape[1], self.window
        state.pending_keys = fk.new_zeros(fk.shape[0], fk.shape[2], w, fk.shape[3])
        state.pending_values = torch.zeros_like(state.pending_keys)
        behind = slice(self.ring, self.ring + w)
        for pending, buffer, source in ((state.pending_keys, state.keys, fk), (state.pending_values, state.values, fv)):
            ring_write(pending, source, max(0, length - w), length)
            ring_write(buffer[:, :, behind], source, max(0, length - 2 * w), max(0, length - w))
        ring_unmask(state.mask[..., behind], max(0, length - 2 * w), max(0, length - w))

    def _fill_memory(
        self, state: AttentionState, memory: MemoryFIFO, keys: torch.Tensor, values: torch.Tensor, position: int
    ) -> None:
        """The memory (keys/values [B, M, Hkv, Dh]) a decode continues from, as the query at ``position`` saw it."""
        state.memory = memory
        state.keys[:, :, self.memory_start : self.store_start] = keys.transpose(1, 2)
        state.values[:, :, self.memory_start : self.store_start] = values.transpose(1, 2)
        state.memory_reveal = torch.empty_like(memory.positions)[:, None, None]
        self._reset_memory_mask(state, position)

    def _reset_memory_mask(self, state: AttentionState, position: int) -> None:
        """Recompute, after the memory changed, when each memory slot may be read, and the mask for ``position``."""
        memory = state.memory
        state.memory_reveal.copy_((memory.positions + self.window).masked_fill(~memory.valid, NEVER)[:, None, None])
        state.mask[..., self.memory_start : self.store_start] = float("-inf")
        self._reveal_memory(state, position)

    def _reveal_memory(self, state: AttentionState, position: int) -> None:
        """Show the query at ``position`` the memory entries that have left its window; note when the next does.

        Between pushes entries only become readable, at known positions, so tokens in between change nothing.
        """
        readable = state.memory_reveal <= position
        state.mask[..., self.memory_start : self.store_start].masked_fill_(readable, 0.0)
        state.next_reveal = int(state.memory_reveal.masked_fill(readable, NEVER).min())

    def before_token(self, position: int, state: AttentionState) -> None:
        """What decoding the token at ``position`` changes in ``state`` whatever the token is: the RoPE tables of
        a new block of positions, and which slots its query may read. Called before :meth:`step`.

        Kept apart from :meth:`step` so that the step has no branch on the position: a compiled step
        (:meth:`BmojoModel.compile_decoding`) then stays one graph at every position.
        """
        if position % ROPE_BLOCK == 0:
            state.rope = self._rope_block(position, state.keys.device)
        if self.window is None:
            return
        if self.ring > self.window or position < self.ring:
            state.mask[..., position % self.ring] = 0.0
        if self.ring > self.window and position >= self.window:
            # Kept in the ring for the memory block, but outside the window.
            state.mask[..., (position - self.window) % self.ring] = float("-inf")
        if self.ssm is not None and self.window <= position < 2 * self.window:
            # The fading key of position - w enters its slot behind the window.
            state.mask[..., self.ring + position % self.window] = 0.0
        if self.predictor is not None and position >= state.next_reveal:
            self._reveal_memory(state, position)

    def after_token(self, position: int, state: AttentionState) -> None:
        """Bookkeeping after :meth:`step` at ``position``: a finished memory block joins the memory."""
        if self.predictor is not None and (position + 1) % self.memory_block == 0:
            self._push_block(state, position)

    def step(self, h: torch.Tensor, position: int, state: AttentionState) -> torch.Tensor:
        """Recurrent form for the token at ``position``, between :meth:`before_token` and :meth:`after_token`.
        h: [B, 1, D] -> out: [B, 1, D]; writes the token's keys, values, SSM state, innovation ratio and SSM
        output into ``state``."""
        offset = position % ROPE_BLOCK
        rope = (state.rope[0][offset], state.rope[1][offset])
        if self.window is None:
            # Full attention's cache grows with the context (the baseline the windowed letters avoid): one more
            # key and value each token, appended the way a Hugging Face dynamic cache appends them.
            (query, _, _), keys, values = self._step_projections(h, None, rope)
            state.keys = torch.cat([state.keys, keys[0].unsqueeze(2)], dim=2)
            state.values = torch.cat([state.values, values[0].unsqueeze(2)], dim=2)
            out = F.scaled_dot_product_attention(query, state.keys, state.values)
            return self.o_proj(out.reshape(h.shape[0], 1, -1))
        s = None
        if self.ssm is not None:
            s, state.ssm = self.ssm(h, state.ssm)
        (query, fading_query, memory_query), keys, values = self._step_projections(h, s, rope)
        local = position % self.ring
        if s is None:
            state.keys.select(2, local).copy_(keys[0])
            state.values.select(2, local).copy_(values[0])
        else:
            self._write_with_fading(state, local, position % self.window, keys, values)
        if self.predictor is not None:
            slot = position % self.memory_block
            ratio = innovation_ratio(self.predictor, h, state.prev_s, self.innovation_eps)
            state.block_scores[:, slot : slot + 1] = ratio
            state.prev_s = s
        if self.predictor is not None and self.store_topk:
            self._retrieve(state, query if memory_query is None else memory_query, position)
        # Once every slot is visible the mask can be left out; a compiled step keeps it, since the switch would
        # compile the step again for each range of positions.
        full = not torch.compiler.is_compiling() and self.unmasked_from is not None and position >= self.unmasked_from
        mask = None if full else state.mask
        if fading_query is None and memory_query is None:
            out = F.scaled_dot_product_attention(query, state.keys, state.values, attn_mask=mask)
        else:
            out = self._attend_with_own_queries(query, fading_query, memory_query, state.keys, state.values, mask)
        return self.o_proj(out.reshape(h.shape[0], 1, -1))

    def _retrieve(self, state: AttentionState, query: torch.Tensor, position: int) -> None:
        """The store entries the query [B, Hkv, G, Dh] at ``position`` retrieves, into the buffer's store slots."""
        keys, values, valid = state.store.retrieve(
            query, position, self.window, state.memory.positions, state.memory.valid, self.store_topk
        )
        state.keys[:, :, self.store_start :] = keys
        state.values[:, :, self.store_start :] = values
        state.mask[..., self.store_start :] = torch.where(valid, 0.0, float("-inf"))[:, None, None]

    def _attend_with_own_queries(
        self,
        q: torch.Tensor,
        fading_q: torch.Tensor | None,
        memory_q: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One softmax over the decode buffer's slots, the fading slots scored with ``fading_q`` (untied fading
        projections), the memory slots with ``memory_q`` (the query before RoPE, where memory keys carry none), each
        where given, and all others with ``q``. SDPA scores every key with one query, so the scores are formed
        here, in fp32 as the fused kernels keep them. q, fading_q, memory_q: [B, Hkv, G, Dh]; keys, values:
        [B, Hkv, S, Dh]; mask: [B, 1, 1, S] additive or None -> [B, Hkv, G, Dh] in the values' dtype.
        """
        compute_dtype = torch.promote_types(keys.dtype, torch.float32)
        q, keys32 = q.to(compute_dtype), keys.to(compute_dtype)
        fading_q = q if fading_q is None else fading_q.to(compute_dtype)
        memory_q = q if memory_q is None else memory_q.to(compute_dtype)
        scores = torch.cat(
            [
                q @ keys32[:, :, : self.ring].mT,
                fading_q @ keys32[:, :, self.ring : self.memory_start].mT,
                memory_q @ keys32[:, :, self.memory_start :].mT,
            ],
            dim=-1,
        ).mul_(self.head_dim**-0.5)
        if mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1).to(values.dtype) @ values

    def _step_projections(
        self, h: torch.Tensor, s: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[
        tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        tuple[torch.Tensor, ...],
        tuple[torch.Tensor, ...],
    ]:
        """Queries, keys and values of one token, with the fewest ops (what :meth:`forward` computes for it):
        h, s (SSM output or None): [B, 1, D] -> (queries, each [B, Hkv, Hq/Hkv, Dh] or None: the query, the fading
        keys' own if the fading projections are untied, the memory keys' own (the query before RoPE) if they carry
        no positional encoding; keys and values, each [B, Hkv, Dh]: local, then fading if ``s`` is given). Tied
        projections run on [h, s] at once, and one RoPE call rotates all heads, which share the token's position.
        """
        batch = h.shape[0]
        untied = s is not None and self.fading_k_proj is not None
        if untied:
            q = torch.cat([self.q_proj(h), self.fading_q_proj(h)], dim=-1)
            k = torch.cat([self.k_proj(h), self.fading_k_proj(s)], dim=1)
            v = torch.cat([self.v_proj(h), self.fading_v_proj(s)], dim=1)
        else:
            sources = h if s is None else torch.cat([h, s], dim=1)
            q, k, v = self.q_proj(h), self.k_proj(sources), self.v_proj(sources)
        # The query sets and the key sets as heads: [B, 1, n * Hq, Dh] and [B, 1, n * Hkv, Dh].
        q, k = q.view(batch, 1, -1, self.head_dim), k.view(batch, 1, -1, self.head_dim)
        if self.q_norm is not None and untied:
            local_q, fading_q = q.split(self.num_heads, dim=2)
            local_k, fading_k = k.split(self.num_kv_heads, dim=2)
            q = torch.cat([self.q_norm(local_q), self.fading_q_norm(fading_q)], dim=2)
            k = torch.cat([self.k_norm(local_k), self.fading_k_norm(fading_k)], dim=2)
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Memory keys without positional encoding are scored with the query before RoPE: keep it un-rotated.
        unrotated_q = q[:, :, : self.num_heads] if self.predictor is not None and not self.memory_rope else None
        q, k = self.rope(torch.cat([q, k], dim=2), rope).split([q.shape[2], k.shape[2]], dim=2)
        # Query heads sharing a key head are rows of one query: SDPA reads each key head once, without copies.
        group = self.num_heads // self.num_kv_heads
        per_query_set = (batch, -1, self.num_kv_heads, group, self.head_dim)
        query, *fading_query = q.view(per_query_set).unbind(1)
        memory_query = None if unrotated_q is None else unrotated_q.reshape(per_query_set)[:, 0]
        queries = (query, fading_query[0] if fading_query else None, memory_query)
        per_set = (batch, -1, self.num_kv_heads, self.head_dim)
        return queries, k.view(per_set).unbind(1), v.view(per_set).unbind(1)

    def _write_with_fading(
        self,
        state: AttentionState,
        local: int,
        fading: int,
        keys: tuple[torch.Tensor, ...],
        values: tuple[torch.Tensor, ...],
    ) -> None:
        """A token's keys and values (each (local, fading), [B, Hkv, Dh]) into the buffers: the local ones into ring
        slot ``local``; the fading ones of position - w, waiting in pending slot ``fading``, behind the window into
        the slot that held position - 2w; the token's own fading ones into that pending slot."""
        for buffer, pending, new in (
            (state.keys, state.pending_keys, keys),
            (state.values, state.pending_values, values),
        ):
            if torch.compiler.is_compiling():
                # One write into the buffer: PyTorch 2.9 and 2.11 compile two writes at position-dependent slots
                # of one buffer wrongly on the CPU (2.13 does not); eagerly two selects are cheaper.
                slots = torch.tensor([local, self.ring + fading], device=buffer.device)
                buffer.index_copy_(2, slots, torch.stack([new[0], pending.select(2, fading)], dim=2))
            else:
                buffer.select(2, local).copy_(new[0])
                buffer.select(2, self.ring + fading).copy_(pending.select(2, fading))
            pending.select(2, fading).copy_(new[1])

    def _push_block(self, state: AttentionState, position: int) -> None:
        """The memory block ending at ``position`` is finished: its accepted tokens join the memory."""
        start = position + 1 - self.memory_block
        positions = torch.arange(start, position + 1, device=state.keys.device)
        block_keys, block_values = (
            t[:, :, : self.ring].index_select(2, positions % self.ring) for t in (state.keys, state.values)
        )
        if not self.memory_rope:
            # The ring holds keys rotated to their positions and memory keys carry none: rotate them back.
            cos, signed_sin = self.rope.tables(-positions)
            block_keys = self.rope(block_keys, (cos.transpose(1, 2), signed_sin.transpose(1, 2)))
        state.memory.push_block(
            state.block_scores,
            start=start,
            topk=self.memory_topk,
            threshold=self.memory_threshold,
            block_entries=(block_keys, block_values),
            entries=tuple(t[:, :, self.memory_start : self.store_start] for t in (state.keys, state.values)),
        )
        if self.store_topk:
            state.store.append(block_keys, block_values, self._store_keeps(state.block_scores))
        self._reset_memory_mask(state, position)


def gather_entries(sources: tuple[torch.Tensor, ...], positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The entries at ``positions`` [B, ...] (any index layout) of each source [B, T, Hkv, Dh] -> [B, ..., Hkv, Dh]."""
    return tuple(
        eidetic_gather(t.flatten(2), positions.flatten(1)).view(*positions.shape, *t.shape[2:]) for t in sources
    )


def ring_write(ring: torch.Tensor, source: torch.Tensor, lo: int, hi: int) -> None:
    """Positions [lo, hi) of source [B, T, H, Dh] into ring [B, H, n, Dh] at slots ``p % n`` (hi - lo <= n)."""
    slots = torch.arange(lo, hi, device=ring.device) % ring.shape[2]
    ring.index_copy_(2, slots, source[:, lo:hi].transpose(1, 2))


def ring_unmask(mask: torch.Tensor, lo: int, hi: int) -> None:
    """Show positions [lo, hi) of a ring of n slots (mask: [B, 1, 1, n], slot ``p % n``) to the query."""
    mask.index_fill_(-1, torch.arange(lo, hi, device=mask.device) % mask.shape[-1], 0.0)
