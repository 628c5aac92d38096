"""Attention mixers of the family: ``A`` causal, ``W`` sliding window, ``F`` B'MOJO-F, ``B`` B'MOJO.

One class covers the four letters because they differ only in which key sets a query sees (DESIGN §2.2-2.4):
``A`` all past tokens; ``W`` the window; ``F`` the window plus the SSM's fading tokens just behind it; ``B``
also the eidetic memory of innovation-selected tokens. The parallel path calls the ``bmojo_attention`` op; the
recurrent path (:meth:`AttentionMixer.step`) decodes one token from an :class:`AttentionState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.config import BmojoConfig
from bmojo.model.layers import RMSNorm, RotaryEmbedding
from bmojo.model.mamba2 import Mamba2Mixer, SSMState
from bmojo.model.memory import InnovationPredictor, MemoryFIFO, innovation_scores, select_memory
from bmojo.ops import bmojo_attention, eidetic_gather


@dataclass
class AttentionState:
    """Decoding state of one attention layer. Buffers hold the most recent positions, oldest first.

    keys/values: [B, L, Hkv, Dh] local keys (post-RoPE); fading_*: [B, Lf, Hkv, Dh] fading keys of the last
    ``Lf <= 2w`` positions; ssm: the inner SSM's state; prev_s: [B, 1, D] last SSM output; block_*: scores
    [B, n] and keys/values [B, n, Hkv, Dh] of the ``n`` tokens of the unfinished memory block.
    """

    keys: torch.Tensor
    values: torch.Tensor
    fading_keys: torch.Tensor | None = None
    fading_values: torch.Tensor | None = None
    ssm: SSMState | None = None
    prev_s: torch.Tensor | None = None
    block_scores: torch.Tensor | None = None
    block_keys: torch.Tensor | None = None
    block_values: torch.Tensor | None = None
    memory: MemoryFIFO | None = None


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
        self.o_proj = nn.Linear(hq, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, config.rope_theta)
        self.ssm = Mamba2Mixer(config) if letter in "FB" else None
        # Fading keys/values reuse k_proj/v_proj unless untied (then these own projections exist).
        untied = self.ssm is not None and not config.tie_fading_proj
        self.fading_k_proj = nn.Linear(d, hkv, bias=False) if untied else None
        self.fading_v_proj = nn.Linear(d, hkv, bias=False) if untied else None
        self.predictor = InnovationPredictor(d, config.innovation_rank) if letter == "B" else None
        if self.predictor is not None:
            self.memory_size = config.memory_size
            self.memory_topk = config.memory_topk
            self.memory_block = config.memory_block
            self.memory_threshold = config.memory_threshold
            self.innovation_eps = config.innovation_eps

    def _keys(self, proj_k: nn.Linear, proj_v: nn.Linear, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        k = proj_k(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = proj_v(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.k_norm is not None:
            k = self.k_norm(k)
        return self.rope(k, rope), v

    def _fading_keys(self, s: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        if self.fading_k_proj is None:
            return self._keys(self.k_proj, self.v_proj, s, rope)
        return self._keys(self.fading_k_proj, self.fading_v_proj, s, rope)

    def _queries(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        return self.rope(q, rope)

    def forward(
        self, h: torch.Tensor, want_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, AttentionState | None]:
        """Parallel form. h: [B, T, D] -> (out: [B, T, D], unweighted aux loss or None, state if asked)."""
        batch, length, _ = h.shape
        rope = self.rope.tables(torch.arange(length, device=h.device))
        q = self._queries(h, rope)
        k, v = self._keys(self.k_proj, self.v_proj, h, rope)
        extra, aux, state = {}, None, None
        if want_state:
            keep = length if self.window is None else self.window
            state = AttentionState(keys=k[:, -keep:], values=v[:, -keep:])
        if self.ssm is not None:
            s, ssm_state = self.ssm(h)
            fk, fv = self._fading_keys(s, rope)
            extra.update(fading_k=fk, fading_v=fv)
            if state is not None:
                keep = 2 * self.window
                state.fading_keys, state.fading_values = fk[:, -keep:], fv[:, -keep:]
                state.ssm, state.prev_s = ssm_state, s[:, -1:]
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
            gathered_k, gathered_v = (
                eidetic_gather(t.flatten(2), mem_pos.flatten(1)).view(*mem_pos.shape, *t.shape[2:]) for t in (k, v)
            )
            extra.update(
                mem_k=gathered_k[:, :num_blocks],
                mem_v=gathered_v[:, :num_blocks],
                mem_pos=mem_pos[:, :num_blocks],
                mem_valid=mem_valid[:, :num_blocks],
                mem_block=self.memory_block,
            )
            if state is not None:
                current = length // self.memory_block
                start = current * self.memory_block
                state.block_scores = iota[:, start:]
                state.block_keys, state.block_values = k[:, start:], v[:, start:]
                state.memory = MemoryFIFO(
                    keys=gathered_k[:, current],
                    values=gathered_v[:, current],
                    positions=mem_pos[:, current],
                    valid=mem_valid[:, current],
                )
        out = bmojo_attention(q, k, v, window=self.window, **extra)
        return self.o_proj(out.flatten(2)), aux, state

    def step(self, h: torch.Tensor, position: int, state: AttentionState) -> torch.Tensor:
        """Recurrent form for the token at ``position``. h: [B, 1, D] -> out: [B, 1, D]; updates ``state``."""
        rope = self.rope.tables(torch.tensor([position], device=h.device))
        q = self._queries(h, rope)
        k, v = self._keys(self.k_proj, self.v_proj, h, rope)
        state.keys = torch.cat([state.keys, k], dim=1)
        state.values = torch.cat([state.values, v], dim=1)
        if self.window is not None:
            state.keys, state.values = state.keys[:, -self.window :], state.values[:, -self.window :]
        key_sets = [(state.keys, state.values, None)]
        if self.ssm is not None:
            s, state.ssm = self.ssm(h, state.ssm)
            fk, fv = self._fading_keys(s, rope)
            state.fading_keys = torch.cat([state.fading_keys, fk], dim=1)[:, -2 * self.window :]
            state.fading_values = torch.cat([state.fading_values, fv], dim=1)[:, -2 * self.window :]
            # The buffer holds positions (position - held, position]; those behind the window are its first
            # held - w entries, all within 2w of the query.
            behind = state.fading_keys.shape[1] - self.window
            if behind > 0:
                key_sets.append((state.fading_keys[:, :behind], state.fading_values[:, :behind], None))
        if self.predictor is not None:
            iota, _ = innovation_scores(self.predictor, h, state.prev_s, self.innovation_eps)
            state.prev_s = s
            memory = state.memory
            visible = memory.valid & (memory.positions < position - self.window + 1)
            key_sets.append((memory.keys, memory.values, visible))
        out = attend_one(q, key_sets)
        if self.predictor is not None:
            state.block_scores = torch.cat([state.block_scores, iota], dim=1)
            state.block_keys = torch.cat([state.block_keys, k], dim=1)
            state.block_values = torch.cat([state.block_values, v], dim=1)
            if (position + 1) % self.memory_block == 0:
                memory.push_block(
                    state.block_scores,
                    state.block_keys,
                    state.block_values,
                    start=position + 1 - self.memory_block,
                    topk=self.memory_topk,
                    threshold=self.memory_threshold,
                )
                state.block_scores = state.block_scores[:, :0]
                state.block_keys, state.block_values = state.block_keys[:, :0], state.block_values[:, :0]
        return self.o_proj(out.flatten(2))


def attend_one(q: torch.Tensor, key_sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """One softmax of a single query over several key sets.

    q: [B, 1, Hq, Dh]; each key set is (keys [B, L, Hkv, Dh], values [B, L, Hkv, Dh], visible [B, L] or None
    for all visible). Returns [B, 1, Hq, Dh] in q's dtype.
    """
    keys = torch.cat([k for k, _, _ in key_sets], dim=1)
    values = torch.cat([v for _, v, _ in key_sets], dim=1)
    visible = None
    if any(mask is not None for _, _, mask in key_sets):
        masks = [k.new_ones(k.shape[:2], dtype=torch.bool) if m is None else m for k, _, m in key_sets]
        visible = torch.cat(masks, dim=1)[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible, enable_gqa=True
    )
    return out.transpose(1, 2)
