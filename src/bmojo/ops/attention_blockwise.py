"""Efficient ``bmojo_attention`` (the ``torch`` backend): fused attention calls over query blocks.

On CPU a window goes to :mod:`bmojo.ops.attention_banded`; on other devices, and as its cross-check, to the
gathered form below.

Queries are cut into blocks of ``block`` consecutive positions. Each block gathers every key it may see —
the span of its local windows, the span of its fading bands, and the memory rows of the memory blocks its
queries fall in — side by side on one key axis, with one boolean mask saying which query sees which key.
A single :func:`torch.nn.functional.scaled_dot_product_attention` over ``[B·NQ, H, block, L]`` then takes
the softmax over the union of the three sets exactly: PyTorch's fused (flash) kernels on CPU and GPU, so no
score tensor is materialised and the backward is fused as well. Work and memory are O(T·(w + M)), not O(T²).

A fading query of its own (untied fading projections) or a memory query of its own (memory keys without positional
encoding) still fits the one call: queries become ``[q | fading_q | mem_q]`` (the given ones) and every key set is
zero-padded into the slot of its own query along the head dimension, e.g. ``[k | 0 | 0]``, ``[0 | fading_k | 0]``,
``[0 | 0 | mem_k]``, so every key meets its own query; values are zero-padded behind, since the fused kernels want
one head size for all key sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmojo.ops.attention_banded import FLASH_OPS, banded_attention

# Queries per block. Each block reads block + w - 1 keys per band for w useful ones: larger blocks waste
# more work, smaller ones make more, shorter calls. 64 was fastest on CPU at w = 256, where this path ran before
# the banded one.
MAX_QUERY_BLOCK = 64


def _band(positions: torch.Tensor, length: int, near: int, far: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key span of every query block for keys ``j ∈ [t - far, t - near]``, and which query sees which.

    positions: [NQ, block] query positions t (padding rows included) → (index [NQ, span] of key positions
    ``positions[i, 0] - far + l`` clamped into [0, T), visible [NQ, block, span] bool; the clamped keys are
    never visible), span = block + far - near.
    """
    span = positions.shape[1] + far - near
    key_pos = positions[:, :1] - far + torch.arange(span, device=positions.device)  # [NQ, span]
    offset = positions[..., None] - key_pos[:, None, :]  # t - j
    exists = ((key_pos >= 0) & (key_pos < length))[:, None, :]
    return key_pos.clamp(0, length - 1), (offset >= near) & (offset <= far) & exists


def _memory_index_and_mask(
    mem_pos: torch.Tensor, mem_valid: torch.Tensor, positions: torch.Tensor, *, window: int, mem_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory entries each query block reads, and which of them each query sees.

    mem_pos, mem_valid: [B, NB, M]; positions: [NQ, block] → (index [NQ, R·M] into the NB·M entries,
    visible [B, NQ, block, R·M]). A block whose queries span R memory blocks reads R rows; query t sees the
    valid entries of row ``t // mem_block`` behind its window.
    """
    num_rows, slots = mem_pos.shape[1:]
    block = positions.shape[1]
    rows_per_block = 1 if mem_block % block == 0 else -(-(block - 1) // mem_block) + 1
    rows = positions[:, :1] // mem_block + torch.arange(rows_per_block, device=positions.device)  # [NQ, R]
    clamped = rows.clamp(max=num_rows - 1)  # rows past the end are never a query's own row: masked below
    own_row = (positions // mem_block)[:, :, None] == rows[:, None, :]  # [NQ, block, R]
    entry_pos, entry_valid = mem_pos[:, clamped].flatten(2), mem_valid[:, clamped].flatten(2)  # [B, NQ, R·M]
    behind_window = entry_pos[:, :, None, :] < (positions - window + 1)[None, :, :, None]
    visible = entry_valid[:, :, None, :] & behind_window & own_row.repeat_interleave(slots, dim=-1)[None]
    index = (clamped[:, :, None] * slots + torch.arange(slots, device=positions.device)).flatten(1)
    return index, visible


def bmojo_attention_torch(
    q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
) -> torch.Tensor:
    """The ``torch`` backend of :func:`bmojo.ops.attention.bmojo_attention` (inputs already validated).

    With a window: on CPU :func:`~bmojo.ops.attention_banded.banded_attention` (no key copied per block),
    elsewhere :func:`gathered_attention`.
    """
    if window is None:  # plain causal attention: validation guarantees there are no fading or memory keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2)
    path = banded_attention if q.device.type == "cpu" and FLASH_OPS is not None else gathered_attention
    return path(
        q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
    )


def gathered_attention(
    q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
) -> torch.Tensor:
    """Windowed ``bmojo_attention``: every query block's keys gathered, one fused SDPA call (any device)."""
    batch, length, query_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = min(window, MAX_QUERY_BLOCK, length)
    num_blocks = -(-length // block)
    positions = torch.arange(num_blocks * block, device=q.device).view(num_blocks, block)

    if window >= length:  # then no query has a fading key
        fading_q = fading_k = fading_v = None
    if fading_q is not None or mem_q is not None:
        q, (k, v, fading_k, fading_v, mem_k, mem_v) = _with_own_queries(
            q, fading_q, mem_q, k, v, fading_k, fading_v, mem_k, mem_v
        )

    # Every key set is a source of rows and, per query block, an index into it and a mask.
    far = min(window - 1, length - 1)  # keys further back than T-1 do not exist
    index, visible = _band(positions, length, 0, far)
    key_sources, value_sources = [k], [v]
    indices, masks = [index], [visible.expand(batch, -1, -1, -1)]
    if fading_k is not None:
        index, visible = _band(positions, length, window, min(2 * window - 1, length - 1))
        key_sources.append(fading_k)
        value_sources.append(fading_v)
        indices.append(index + length)
        masks.append(visible.expand(batch, -1, -1, -1))
    if mem_k is not None:
        index, visible = _memory_index_and_mask(mem_pos, mem_valid, positions, window=window, mem_block=mem_block)
        key_sources.append(mem_k.flatten(1, 2))
        value_sources.append(mem_v.flatten(1, 2))
        indices.append(index + len(indices) * length)
        masks.append(visible)
    # Padding queries past T see every key, so no row of the fused kernel is empty; their outputs are dropped.
    mask = torch.cat(masks, dim=-1) | (positions >= length)[None, :, :, None]  # [B, NQ, block, L]
    index = torch.cat(indices, dim=-1)  # [NQ, L]

    def gather(sources: list[torch.Tensor]) -> torch.Tensor:  # → [B·NQ, Hkv, L, D], one copy of the keys
        rows = torch.cat(sources, dim=1).index_select(1, index.flatten())
        return rows.view(batch, num_blocks, -1, kv_heads, q.shape[-1]).transpose(2, 3).flatten(0, 1)

    padded_q = F.pad(q, (0, 0, 0, 0, 0, num_blocks * block - length))
    blocked_q = padded_q.view(batch, num_blocks, block, query_heads, -1).transpose(2, 3)
    out = F.scaled_dot_product_attention(
        blocked_q.flatten(0, 1),  # [B·NQ, Hq, block, D]
        gather(key_sources),
        gather(value_sources),
        attn_mask=mask.flatten(0, 1).unsqueeze(1),  # [B·NQ, 1, block, L]
        scale=scale,
        enable_gqa=True,
    )
    out = out.view(batch, num_blocks, query_heads, block, -1).transpose(2, 3)
    return out.reshape(batch, num_blocks * block, query_heads, -1)[:, :length, :, :head_dim]


def _with_own_queries(
    q: torch.Tensor,
    fading_q: torch.Tensor | None,
    mem_q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    fading_k: torch.Tensor | None,
    fading_v: torch.Tensor | None,
    mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Inputs for one call where the fading keys meet ``fading_q``, the memory keys ``mem_q`` (where given) and all
    others ``q`` (head dim D → n·D, n the number of query sets).

    q, fading_q, mem_q: [B, T, Hq, D] → [q | fading_q | mem_q], the given ones; then (k, v, fading_k, fading_v,
    mem_k, mem_v), None staying None, every key zero-padded into the D channels of its own query, so e.g.
    ``[q | fq] · [0 | fk] = fq · fk``; every value padded behind, keeping its first D channels, the output's.
    """
    head_dim = q.shape[-1]
    query_sets = [q, *(query for query in (fading_q, mem_q) if query is not None)]
    width = len(query_sets) * head_dim
    fading_slot = 1 if fading_q is not None else 0
    mem_slot = len(query_sets) - 1 if mem_q is not None else 0

    def in_slot(x: torch.Tensor | None, slot: int) -> torch.Tensor | None:
        """x [..., D] zero-padded to [..., n·D], its channels at [slot·D, (slot + 1)·D)."""
        return None if x is None else F.pad(x, (slot * head_dim, width - (slot + 1) * head_dim))

    keys = [in_slot(k, 0), in_slot(fading_k, fading_slot), in_slot(mem_k, mem_slot)]
    values = [in_slot(value, 0) for value in (v, fading_v, mem_v)]
    return torch.cat(query_sets, dim=-1), [keys[0], values[0], keys[1], values[1], keys[2], values[2]]
