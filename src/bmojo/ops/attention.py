"""Op ``bmojo_attention``: one softmax per query over local, fading and eidetic-memory keys (DESIGN §2.2-2.4).

Queries and keys sit at positions ``0..T-1``. Query ``t`` sees
- local keys ``k_j``: ``j <= t`` (``window=None``, causal full attention) or ``j ∈ [t-w+1, t]``;
- fading keys ``fading_k_j``: ``j ∈ [t-2w+1, t-w]`` (needs ``window``), scored with ``fading_q_t`` where it is
  given (untied fading projections) and with ``q_t`` otherwise;
- memory entries ``mem_k[c, m]`` of its own memory block ``c = t // mem_block`` that are valid and lie
  behind its local window (``mem_pos[c, m] < t-w+1``; needs ``window``), scored with ``mem_q_t`` where it is
  given (memory keys without positional encoding meet the query before RoPE) and with ``q_t`` otherwise.

Every query sees at least itself, so no softmax row is empty, but a query may have no fading or no memory
keys at all. Backends: ``naive`` (one dense masked softmax, defined here) and ``torch`` (fused attention
calls over query blocks: :mod:`bmojo.ops.attention_banded` on the CPU, :mod:`bmojo.ops.attention_blockwise`
elsewhere).
"""

from __future__ import annotations

import math

import torch

from bmojo.ops.attention_blockwise import bmojo_attention_torch
from bmojo.ops.registry import OpRegistry

ATTENTION = OpRegistry("bmojo_attention")
ATTENTION.register("torch")(bmojo_attention_torch)


def bmojo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    fading_q: torch.Tensor | None = None,
    fading_k: torch.Tensor | None = None,
    fading_v: torch.Tensor | None = None,
    mem_q: torch.Tensor | None = None,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    mem_pos: torch.Tensor | None = None,
    mem_valid: torch.Tensor | None = None,
    mem_block: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of every query over the union of its local, fading and memory keys.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with ``Hq % Hkv == 0`` (query head h reads kv head
    ``h // (Hq // Hkv)``); fading_q: [B, T, Hq, D] or None (then q scores the fading keys too); fading_k,
    fading_v: [B, T, Hkv, D]; mem_q: [B, T, Hq, D] or None (then q scores the memory keys too); mem_k, mem_v:
    [B, NB, M, Hkv, D] with ``NB = ceil(T / mem_block)``; mem_pos: [B, NB, M] int64 original positions;
    mem_valid: [B, NB, M] bool. ``scale`` defaults to ``D ** -0.5``.
    Returns o: [B, T, Hq, D] in q's dtype.
    """
    _validate(q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    implementation = ATTENTION.resolve(backend, q.device)
    return implementation(
        q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block,
        float(scale),
    )  # fmt: skip


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"bmojo_attention: {name} must be {layout} = {expected}, got {tuple(tensor.shape)}")


def _validate(
    q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block
) -> None:
    if q.dim() != 4:
        raise ValueError(f"bmojo_attention: q must be [B, T, Hq, D], got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"bmojo_attention: q must be a floating tensor, got {q.dtype}")
    batch, length, query_heads, head_dim = q.shape
    if k.dim() != 4:
        raise ValueError(f"bmojo_attention: k must be [B, T, Hkv, D], got shape {tuple(k.shape)}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or query_heads % kv_heads != 0:
        raise ValueError(
            f"bmojo_attention: query heads ({query_heads}) must be a multiple of key/value heads ({kv_heads})"
        )
    kv_shape = (batch, length, kv_heads, head_dim)
    _check_shape("k", k, kv_shape, "[B, T, Hkv, D]")
    _check_shape("v", v, kv_shape, "[B, T, Hkv, D]")
    floats = {"k": k, "v": v}

    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"bmojo_attention: window must be a positive int or None, got {window!r}")
    if (fading_k is None) != (fading_v is None):
        raise ValueError("bmojo_attention: pass fading_k and fading_v together, or neither")
    if fading_k is not None:
        if window is None:
            raise ValueError("bmojo_attention: fading keys need a window (they cover [t-2w+1, t-w]); set window")
        _check_shape("fading_k", fading_k, kv_shape, "[B, T, Hkv, D]")
        _check_shape("fading_v", fading_v, kv_shape, "[B, T, Hkv, D]")
        floats |= {"fading_k": fading_k, "fading_v": fading_v}
    if fading_q is not None:
        if fading_k is None:
            raise ValueError("bmojo_attention: fading_q scores fading keys; pass fading_k and fading_v with it")
        _check_shape("fading_q", fading_q, tuple(q.shape), "[B, T, Hq, D]")
        floats["fading_q"] = fading_q

    memory = {
        "mem_k": mem_k,
        "mem_v": mem_v,
        "mem_pos": mem_pos,
        "mem_valid": mem_valid,
        "mem_block": mem_block,
    }
    given = [name for name, value in memory.items() if value is not None]
    if given and len(given) != len(memory):
        missing = [name for name in memory if name not in given]
        raise ValueError(f"bmojo_attention: memory keys need all of {', '.join(memory)}; missing {missing}")
    if given:
        if window is None:
            raise ValueError("bmojo_attention: memory keys need a window (entries inside it are excluded)")
        if isinstance(mem_block, bool) or not isinstance(mem_block, int) or mem_block < 1:
            raise ValueError(f"bmojo_attention: mem_block must be a positive int, got {mem_block!r}")
        if mem_k.dim() != 5:
            raise ValueError(f"bmojo_attention: mem_k must be [B, NB, M, Hkv, D], got {tuple(mem_k.shape)}")
        num_blocks, slots = math.ceil(length / mem_block), mem_k.shape[2]
        memory_shape = (batch, num_blocks, slots, kv_heads, head_dim)
        layout = f"[B, NB=ceil(T/mem_block)={num_blocks}, M, Hkv, D]"
        _check_shape("mem_k", mem_k, memory_shape, layout)
        _check_shape("mem_v", mem_v, memory_shape, layout)
        _check_shape("mem_pos", mem_pos, memory_shape[:3], "[B, NB, M]")
        _check_shape("mem_valid", mem_valid, memory_shape[:3], "[B, NB, M]")
        if mem_pos.dtype != torch.int64:
            raise TypeError(f"bmojo_attention: mem_pos must be int64, got {mem_pos.dtype}; use .long()")
        if mem_valid.dtype != torch.bool:
            raise TypeError(f"bmojo_attention: mem_valid must be bool, got {mem_valid.dtype}; use .bool()")
        floats |= {"mem_k": mem_k, "mem_v": mem_v}
    if mem_q is not None:
        if not given:
            raise ValueError("bmojo_attention: mem_q scores memory keys; pass the memory (mem_k, ...) with it")
        _check_shape("mem_q", mem_q, tuple(q.shape), "[B, T, Hq, D]")
        floats["mem_q"] = mem_q
        for name, tensor in (("mem_pos", mem_pos), ("mem_valid", mem_valid)):
            if tensor.device != q.device:
                raise ValueError(f"bmojo_attention: {name} is on {tensor.device} but q is on {q.device}")

    for name, tensor in floats.items():
        if tensor.dtype != q.dtype:
            raise TypeError(f"bmojo_attention: {name} has dtype {tensor.dtype} but q has {q.dtype}; cast them")
        if tensor.device != q.device:
            raise ValueError(f"bmojo_attention: {name} is on {tensor.device} but q is on {q.device}")


@ATTENTION.register("naive")
def bmojo_attention_naive(
    q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
) -> torch.Tensor:
    """Reference: keys [local T | fading T | memory NB*M], each set scored by its query, one boolean mask, one
    fp32 softmax.

    Shapes as in :func:`bmojo_attention`; returns [B, T, Hq, D] in q's dtype.
    """
    batch, length, query_heads, head_dim = q.shape
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    group = query_heads // k.shape[2]

    def per_query_head(x: torch.Tensor) -> torch.Tensor:  # [B, L, Hkv, D] → [B, L, Hq, D]
        return x.to(compute_dtype).repeat_interleave(group, dim=2)

    query_pos = torch.arange(length, device=q.device)[:, None]  # [T, 1]
    key_pos = torch.arange(length, device=q.device)[None, :]  # [1, T]
    local = key_pos <= query_pos
    if window is not None:
        local &= key_pos >= query_pos - window + 1
    query = q.to(compute_dtype)
    queries, keys, values = [query], [per_query_head(k)], [per_query_head(v)]
    masks = [local.expand(batch, length, length)]

    if fading_k is not None:
        fading = (key_pos >= query_pos - 2 * window + 1) & (key_pos <= query_pos - window)
        queries.append(query if fading_q is None else fading_q.to(compute_dtype))
        keys.append(per_query_head(fading_k))
        values.append(per_query_head(fading_v))
        masks.append(fading.expand(batch, length, length))

    if mem_k is not None:
        _, num_blocks, slots, kv_heads, _ = mem_k.shape
        queries.append(query if mem_q is None else mem_q.to(compute_dtype))
        keys.append(per_query_head(mem_k.reshape(batch, num_blocks * slots, kv_heads, head_dim)))
        values.append(per_query_head(mem_v.reshape(batch, num_blocks * slots, kv_heads, head_dim)))
        entry_block = torch.arange(num_blocks, device=q.device).repeat_interleave(slots)  # [NB*M]
        same_block = entry_block[None, :] == query_pos // mem_block  # [T, NB*M]
        behind_window = mem_pos.reshape(batch, 1, -1) < (query_pos - window + 1)  # [B, T, NB*M]
        masks.append(same_block & behind_window & mem_valid.reshape(batch, 1, -1))

    scores = [torch.einsum("bthd,blhd->bhtl", rows, cols) for rows, cols in zip(queries, keys, strict=True)]
    scores = torch.cat(scores, dim=-1) * scale
    all_values, visible = torch.cat(values, 1), torch.cat(masks, -1)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhtl,blhd->bthd", probs, all_values).to(q.dtype)
