"""Efficient ``bmojo_attention`` (the ``torch`` backend): blockwise key sets merged by log-sum-exp.

Each key set (local window, fading band, eidetic memory) is one vectorised attention call that returns its
output and its log-sum-exp; :func:`merge_attention_by_lse` combines them into exactly the softmax over their
union. Query blocks only meet the keys they can see, so memory and work are O(T·w), not O(T²). Gradients
come from autograd through these ops. Scores, softmax and merging run in fp32; the two matmuls keep the input
dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query block of the banded calls: at most this many queries share one key span of block + band - 1 keys.
MAX_QUERY_BLOCK = 64


def exp_scores_and_lse(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised masked softmax that tolerates rows with no visible key.

    scores: [..., L] fp32; visible: bool, broadcastable to scores → (exp_scores [..., L], denominator [..., 1],
    lse [...]) with softmax = exp_scores / denominator. A row with no visible key gets exp_scores 0,
    denominator 1 and lse -inf, with finite gradients. Dividing after the value matmul touches D numbers per
    query instead of L. The ops are out of place: ``scores`` is a view, and in-place ops on it made autograd
    copy the whole score tensor in the backward pass.
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    # The shift cancels in softmax and lse, so it takes no gradient; empty rows shift by 0 instead of -inf.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp_scores = (scores - row_max).exp()
    denominator = exp_scores.sum(dim=-1, keepdim=True)
    empty = denominator == 0
    # where() keeps log(0) and x/0 out of the graph, so empty rows back-propagate zeros, not NaN.
    safe_denominator = torch.where(empty, torch.ones_like(denominator), denominator)
    lse = torch.where(empty, float("-inf"), row_max + safe_denominator.log())
    return exp_scores, safe_denominator, lse.squeeze(-1)


def merge_attention_by_lse(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    outputs: each [B, T, H, D] fp32; lses: each [B, T, H] fp32 (-inf for an empty set) →
    (o [B, T, H, D], lse [B, T, H]); o = Σ_i exp(lse_i - lse) o_i with lse = log Σ_i exp(lse_i).
    """
    stacked = torch.stack(lses)  # [n, B, T, H]
    top = stacked.amax(dim=0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(stacked - top)
    total = weights.sum(dim=0)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    merged = sum(weight.unsqueeze(-1) * output for weight, output in zip(weights, outputs, strict=True))
    lse = torch.where(empty, float("-inf"), top + safe_total.log())
    return merged / safe_total.unsqueeze(-1), lse


def _query_blocks(q: torch.Tensor, block: int, kv_heads: int, scale: float) -> torch.Tensor:
    """Scaled queries grouped by block and kv head: [B, T, Hq, D] → [B, NQ, Hkv, G*block, D] (T padded)."""
    batch, length, query_heads, head_dim = q.shape
    num_blocks = -(-length // block)
    padded = F.pad(q * scale, (0, 0, 0, 0, 0, num_blocks * block - length))
    grouped = padded.view(batch, num_blocks, block, kv_heads, query_heads // kv_heads, head_dim)
    return grouped.permute(0, 1, 3, 4, 2, 5).reshape(batch, num_blocks, kv_heads, -1, head_dim)


def _attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside blocks, back in sequence layout.

    queries: [B, NQ, Hkv, G*block, D]; keys: [B, NQ, Hkv, D, L]; values: [B, NQ, Hkv, L, D];
    visible: bool broadcastable to [B, NQ, Hkv, G, block, L] → (o [B, T, Hq, D] fp32, lse [B, T, Hq] fp32).
    """
    batch, num_blocks, kv_heads, rows, head_dim = queries.shape
    block = visible.shape[-2]
    group = rows // block
    scores = (queries @ keys).float().view(batch, num_blocks, kv_heads, group, block, -1)
    exp_scores, denominator, lse = exp_scores_and_lse(scores, visible)
    weighted = exp_scores.to(values.dtype).view(batch, num_blocks, kv_heads, rows, -1) @ values
    out = weighted.float().view(batch, num_blocks, kv_heads, group, block, head_dim) / denominator
    out = out.permute(0, 1, 4, 2, 3, 5).reshape(batch, num_blocks * block, kv_heads * group, head_dim)
    lse = lse.permute(0, 1, 4, 2, 3).reshape(batch, num_blocks * block, kv_heads * group)
    return out[:, :length], lse[:, :length]


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, near: int, far: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query t attends to keys j ∈ [t - far, t - near] ∩ [0, T), in query blocks.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] → (o [B, T, Hq, D] fp32, lse [B, T, Hq] fp32, -inf where a
    query has no key). Needs ``0 <= near <= far`` and ``near < T``.
    """
    length, kv_heads = q.shape[1], k.shape[2]
    far = min(far, length - 1)  # keys further back than T-1 do not exist
    block = min(far - near + 1, MAX_QUERY_BLOCK)
    num_blocks = -(-length // block)
    padded_length = num_blocks * block
    # Query block i (positions i*block + a) reads the key span of positions i*block - far + l, l < span.
    span = block + far - near

    def key_spans(x: torch.Tensor) -> torch.Tensor:  # [B, T, Hkv, D] → [B, NQ, Hkv, D, span]
        padded = F.pad(x, (0, 0, 0, 0, far, padded_length - length))
        return padded.unfold(1, span, block)[:, :num_blocks]

    offset_in_block = torch.arange(block, device=q.device)[:, None]  # a
    offset_in_span = torch.arange(span, device=q.device)[None, :]  # l
    key_pos = (torch.arange(num_blocks, device=q.device) * block - far)[:, None, None] + offset_in_span
    visible = (offset_in_span >= offset_in_block) & (offset_in_span <= offset_in_block + far - near)
    visible = visible & (key_pos >= 0) & (key_pos < length)  # [NQ, block, span]
    queries = _query_blocks(q, block, kv_heads, scale)
    return _attend(queries, key_spans(k), key_spans(v).transpose(-1, -2), visible[:, None, None], length)


def memory_attention(
    q: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    mem_pos: torch.Tensor,
    mem_valid: torch.Tensor,
    *,
    window: int,
    mem_block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of memory block c attend to the entries of row c that are valid and behind their window.

    q: [B, T, Hq, D]; mem_k, mem_v: [B, NB, M, Hkv, D]; mem_pos, mem_valid: [B, NB, M] →
    (o [B, T, Hq, D] fp32, lse [B, T, Hq] fp32, -inf where a query sees no entry).
    """
    length, kv_heads = q.shape[1], mem_k.shape[3]
    num_blocks = mem_k.shape[1]
    window_start = torch.arange(num_blocks * mem_block, device=q.device).view(num_blocks, mem_block) - window + 1
    visible = mem_valid[:, :, None, :] & (mem_pos[:, :, None, :] < window_start[None, :, :, None])
    queries = _query_blocks(q, mem_block, kv_heads, scale)
    keys, values = mem_k.permute(0, 1, 3, 4, 2), mem_v.transpose(2, 3)  # [B,NB,Hkv,D,M], [B,NB,Hkv,M,D]
    return _attend(queries, keys, values, visible[:, :, None, None], length)  # visible: [B, NB, 1, 1, Q_e, M]


def bmojo_attention_torch(
    q, k, v, window, fading_k, fading_v, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
) -> torch.Tensor:
    """The ``torch`` backend of :func:`bmojo.ops.attention.bmojo_attention` (inputs already validated)."""
    if window is None:  # plain causal attention: validation guarantees there are no fading or memory keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)
    length = q.shape[1]
    parts = [banded_attention(q, k, v, near=0, far=window - 1, scale=scale)]
    if fading_k is not None and window < length:  # with window >= T no query has a fading key
        parts.append(banded_attention(q, fading_k, fading_v, near=window, far=2 * window - 1, scale=scale))
    if mem_k is not None:
        parts.append(
            memory_attention(q, mem_k, mem_v, mem_pos, mem_valid, window=window, mem_block=mem_block, scale=scale)
        )
    if len(parts) == 1:
        return parts[0][0].to(q.dtype)
    out, _ = merge_attention_by_lse([o for o, _ in parts], [lse for _, lse in parts])
    return out.to(q.dtype)
