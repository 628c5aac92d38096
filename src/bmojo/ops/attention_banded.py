"""CPU fast path of ``bmojo_attention``: banded keys read in place, key sets merged by their log-sum-exp.

:mod:`bmojo.ops.attention_blockwise` copies, for every block of queries, the span of keys it may see (about
``(block + w) / block`` copies of every key) and scatters their gradients back. Here no key is copied per block:

- **Local and fading keys, one call per sequence.** The fading key of position ``p - w`` is stored beside the
  local key of ``p`` in one buffer ``[rows, 2, Hkv, D]``. A query ``t`` sees the local keys ``p ∈ [t-w+1, t]``
  and the fading keys of ``p - w`` for the same ``p``: one band of rows. Query block ``n`` reads the ``span``
  rows from position ``n·block - reach`` on (``reach = w - 1``, less when the sequence is shorter), behind
  ``reach`` zero rows before position 0, so all blocks of a sequence are one overlapping strided view of its
  buffer (``[NQ, Hkv, span·cols, D]``, ``cols`` = 2 with fading keys, else 1). The gradient of the view is folded
  back onto the buffer with ``ceil(span / block)`` shifted additions. Each sequence has its own buffer and call,
  so nothing of one sequence (an overflow, say) reaches another through a masked score.
- **A fading query of its own** (untied fading projections): one band call cannot score two key sets with two
  queries, so the local keys and the fading keys each get a band call (``cols`` = 1, the fading band's rows
  shifted by ``w``), the second with the fading query; together they read as many keys as the shared band.
- **Memory keys, one more call** per memory block: its queries against the block's M entries, or the memory
  query's where one is given (memory keys without positional encoding meet the query before RoPE).
- **The merge.** PyTorch's CPU flash kernel returns each call's log-sum-exp, so the softmaxes combine exactly:
  ``o = Σ_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i(lse_i)``. Its backward, given the *merged* output
  and log-sum-exp, returns each call's exact share of the gradient (``P = exp(S - lse)`` and ``rowsum(dO ∘ O)``
  are then the full softmax's), as ring attention uses it.

Scores of masked keys are still computed (``span`` rows for ``w`` visible per query), as in the gathered path.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Queries per block of the band call: larger blocks read more masked keys, smaller ones more copies of the
# gradient to fold. 64 was fastest on CPU at w = 256 (32: +15%, 128: +5%).
BAND_QUERY_BLOCK = 64


def _flash_ops():
    """The CPU flash kernel's forward and backward, or None where this PyTorch lacks them."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return None
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    return forward, aten._scaled_dot_product_flash_attention_for_cpu_backward.default


FLASH_OPS = _flash_ops()


def _pad_time(x: Tensor, length: int) -> Tensor:
    """x: [B, T, ...] zero-padded (or cut) to [B, length, ...]."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def _blocks(x: Tensor, block: int) -> Tensor:
    """[B, T', H, ...] with ``block | T'`` → [B·T'/block, H, block, ...], the layout of one flash call (a view)."""
    return x.reshape(-1, block, *x.shape[2:]).transpose(1, 2)


def _unblock(x: Tensor, batch: int, length: int) -> Tensor:
    """Inverse of :func:`_blocks`, cut to ``length``: [B·NQ, H, block, ...] → [B, length, H, ...]."""
    return x.transpose(1, 2).reshape(batch, -1, *x.shape[1:2], *x.shape[3:])[:, :length]


class _Band:
    """Geometry of one sequence's band call: ``cols`` key sets side by side, ``span`` rows a block.

    Key set ``i`` holds the key of position ``p - shifts[i]`` in the row of position ``p``: shift 0 for local keys,
    ``w`` for fading ones.
    """

    def __init__(self, length: int, window: int, shifts: tuple[int, ...]):
        self.block = min(BAND_QUERY_BLOCK, length)
        self.num_blocks = -(-length // self.block)
        self.padded = self.num_blocks * self.block
        self.reach = min(window - 1, self.padded - 1)  # keys further back than the sequence do not exist
        self.span = self.block + self.reach
        self.rows = self.reach + self.padded  # buffer rows: `reach` zero rows, then the positions
        self.window, self.shifts, self.cols = window, shifts, len(shifts)

    def buffer(self, sources: list[Tensor]) -> Tensor:
        """One [B, T, Hkv, D] per key set → [B, rows, cols, Hkv, D]; row ``reach + p`` holds, in column i, the key
        of position ``p - shifts[i]``."""
        batch, length = sources[0].shape[:2]
        buffer = sources[0].new_zeros(batch, self.rows, self.cols, *sources[0].shape[2:])
        for col, (shift, source) in enumerate(zip(self.shifts, sources, strict=True)):
            # Keys of positions >= T' - shift would sit past the buffer: no query reaches them.
            kept = min(length, self.padded - shift)
            buffer[:, self.reach + shift : self.reach + shift + kept, col] = source[:, :kept]
        return buffer

    def view(self, buffer: Tensor) -> Tensor:
        """One sequence's [rows, cols, Hkv, D] → [NQ, Hkv, span·cols, D]: block n reads rows [n·block, +span)."""
        _, cols, heads, dim = buffer.shape
        shape = (self.num_blocks, heads, self.span * cols, dim)
        return buffer.as_strided(shape, (self.block * cols * heads * dim, dim, heads * dim, 1))

    def fold(self, grad: Tensor) -> Tensor:
        """Adjoint of :meth:`view`, in fp32: grad [NQ, Hkv, span·cols, D] → [rows, cols, Hkv, D], overlaps summed."""
        blocks, heads, _, dim = grad.shape
        per_row = grad.view(blocks, heads, self.span, self.cols, dim).permute(0, 2, 3, 1, 4)  # [NQ, span, ...]
        pieces = -(-self.span // self.block)
        out = grad.new_zeros((blocks + pieces) * self.block, self.cols, heads, dim, dtype=torch.float32)
        for piece in range(pieces):
            lo, hi = piece * self.block, min(self.span, (piece + 1) * self.block)
            rows = out[lo : lo + blocks * self.block].view(blocks, self.block, self.cols, heads, dim)
            rows[:, : hi - lo] += per_row[:, lo:hi]
        return out[: self.rows]

    def unbuffer(self, grad: Tensor, col: int, length: int, dtype: torch.dtype) -> Tensor:
        """The gradient of one key set from the buffer's: [B, rows, cols, Hkv, D] → [B, T, Hkv, D] in ``dtype``."""
        start = self.reach + self.shifts[col]
        rows = grad[:, start : start + length, col]
        return _pad_time(rows, length).to(dtype)

    def mask(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Additive mask [NQ, 1, block, span·cols]: keys of rows ``p ∈ [t-w+1, t]`` whose position ``p - shift``
        exists."""
        t = torch.arange(self.padded, device=device).view(self.num_blocks, self.block, 1, 1)
        first = torch.arange(self.num_blocks, device=device) * self.block - self.reach
        p = first.view(-1, 1, 1, 1) + torch.arange(self.span, device=device).view(1, 1, -1, 1)
        earliest = torch.tensor(self.shifts, device=device)
        visible = (p <= t) & (p > t - self.window) & (p >= earliest)  # [NQ, block, span, cols]
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return mask.view(self.num_blocks, 1, self.block, -1)


def _memory_mask(mem_pos: Tensor, mem_valid: Tensor, window: int, mem_block: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B·NB, 1, mem_block, M]: query t sees the valid entries of its block behind its window."""
    batch, num_blocks, _ = mem_pos.shape
    t = torch.arange(num_blocks * mem_block, device=mem_pos.device).view(1, num_blocks, mem_block, 1)
    visible = mem_valid[:, :, None, :] & (mem_pos[:, :, None, :] < t - window + 1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=mem_pos.device).masked_fill_(~visible, float("-inf"))
    return mask.flatten(0, 1).unsqueeze(1)


class BandedAttention(torch.autograd.Function):
    """Forward inputs as :func:`banded_attention`'s, with the band geometry and masks built outside (the masks carry
    no gradient): ``bands`` the :class:`_Band` of each band call, ``band_mask`` the first band's mask and
    ``fading_mask`` the second's (only with ``fading_q``), ``mem_mask`` the memory call's (or None); ``mem_q``
    the memory call's query, or None for q."""

    @staticmethod
    def forward(
        ctx, q, k, v, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, band_mask, fading_mask, mem_mask, bands,
        mem_block, scale,
    ):  # fmt: skip
        with torch.autocast("cpu", enabled=False):
            return BandedAttention._forward(
                ctx, q, k, v, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, band_mask, fading_mask, mem_mask,
                bands, mem_block, scale,
            )  # fmt: skip

    @staticmethod
    def _forward(
        ctx, q, k, v, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, band_mask, fading_mask, mem_mask, bands,
        mem_block, scale,
    ):  # fmt: skip
        flash_forward, _ = FLASH_OPS
        batch, length = q.shape[:2]
        if fading_q is None:  # one band: local keys, and the fading keys beside them
            key_sets = [[k] if fading_k is None else [k, fading_k]]
            value_sets = [[v] if fading_v is None else [v, fading_v]]
            queries, masks = [q], [band_mask]
        else:  # a band of local keys read with q, and one of fading keys read with fading_q
            key_sets, value_sets = [[k], [fading_k]], [[v], [fading_v]]
            queries, masks = [q, fading_q], [band_mask, fading_mask]
        buffers, parts = [], []
        for band, query, mask, key_set, value_set in zip(bands, queries, masks, key_sets, value_sets, strict=True):
            keys, values = band.buffer(key_set), band.buffer(value_set)
            padded = _pad_time(query, band.padded)
            per_sequence = [
                flash_forward(
                    _blocks(padded[b : b + 1], band.block),
                    band.view(keys[b]),
                    band.view(values[b]),
                    attn_mask=mask,
                    scale=scale,
                )
                for b in range(batch)
            ]
            out = _unblock(torch.cat([o for o, _ in per_sequence]), batch, length)  # [B, T, Hq, D]
            lse = _unblock(torch.cat([lse for _, lse in per_sequence]), batch, length)  # [B, T, Hq]
            buffers += [keys, values]
            parts.append(_weigh_nothing_where_nothing_is_seen(out, lse, mask, 1) if parts else (out, lse))
        if mem_k is not None:
            num_blocks = mem_k.shape[1]
            mem_out, mem_lse = flash_forward(
                _blocks(_pad_time(q if mem_q is None else mem_q, num_blocks * mem_block), mem_block),
                mem_k.flatten(0, 1).transpose(1, 2),  # [B·NB, Hkv, M, D]
                mem_v.flatten(0, 1).transpose(1, 2),
                attn_mask=mem_mask,
                scale=scale,
            )
            mem_out, mem_lse = _unblock(mem_out, batch, length), _unblock(mem_lse, batch, length)
            parts.append(_weigh_nothing_where_nothing_is_seen(mem_out, mem_lse, mem_mask, batch))
        out, lse = parts[0] if len(parts) == 1 else _merge(parts)
        out = out.to(q.dtype)
        ctx.save_for_backward(
            q, fading_q, mem_q, out, lse, band_mask, fading_mask, mem_k, mem_v, mem_mask, *buffers
        )  # fmt: skip
        ctx.geometry = (bands, mem_block, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # once: activation checkpointing lets saved tensors be unpacked only once
        with torch.autocast("cpu", enabled=False):
            return BandedAttention._backward(ctx, grad_out.to(saved[0].dtype), *saved)

    @staticmethod
    def _backward(
        ctx, grad_out, q, fading_q, mem_q, out, lse, band_mask, fading_mask, mem_k, mem_v, mem_mask, *buffers
    ):  # fmt: skip
        _, flash_backward = FLASH_OPS
        bands, mem_block, scale = ctx.geometry
        batch, length = q.shape[:2]

        def blocked(padded: int, block: int, *tensors: Tensor) -> list[Tensor]:
            """[B, T, ...] tensors in the blocks of a call over ``padded`` positions."""
            return [_blocks(_pad_time(x, padded), block) for x in tensors]

        # Every band has the same blocks (they depend on T and w only).
        grad_out_b, out_b, lse_b = blocked(bands[0].padded, bands[0].block, grad_out, out, lse)
        queries, masks = [q, fading_q][: len(bands)], [band_mask, fading_mask][: len(bands)]
        grad_queries, key_set_grads = [], []
        calls = zip(bands, queries, masks, buffers[::2], buffers[1::2], strict=True)
        for band, query, mask, keys, values in calls:
            (q_b,) = blocked(band.padded, band.block, query)
            grad_query, grad_keys, grad_values = [], [], []
            for b in range(batch):
                rows = slice(b * band.num_blocks, (b + 1) * band.num_blocks)
                grads = flash_backward(
                    grad_out_b[rows], q_b[rows], band.view(keys[b]), band.view(values[b]), out_b[rows], lse_b[rows],
                    0.0, False, attn_mask=mask, scale=scale,
                )  # fmt: skip
                grad_query.append(grads[0])
                grad_keys.append(band.fold(grads[1]))
                grad_values.append(band.fold(grads[2]))
            grad_queries.append(_unblock(torch.cat(grad_query), batch, length))
            grad_keys, grad_values = torch.stack(grad_keys), torch.stack(grad_values)  # [B, rows, cols, Hkv, D] fp32
            for col in range(band.cols):  # the key sets in order: local, then fading
                key_set_grads.append([band.unbuffer(g, col, length, q.dtype) for g in (grad_keys, grad_values)])
        # Without a fading query or fading keys, their gradients are None.
        grad_q, grad_fq = (grad_queries + [None])[:2]
        (grad_k, grad_v), (grad_fk, grad_fv) = (key_set_grads + [(None, None)])[:2]
        grad_mq = grad_mem_k = grad_mem_v = None
        if mem_k is not None:
            num_blocks = mem_k.shape[1]
            mem_query = q if mem_q is None else mem_q
            mem_keys, mem_values = (m.flatten(0, 1).transpose(1, 2) for m in (mem_k, mem_v))
            grad_out_m, q_m, out_m, lse_m = blocked(num_blocks * mem_block, mem_block, grad_out, mem_query, out, lse)
            grad_q_mem, grad_mem_k, grad_mem_v = flash_backward(
                grad_out_m, q_m, mem_keys, mem_values, out_m, lse_m, 0.0, False, attn_mask=mem_mask, scale=scale
            )
            grad_q_mem = _unblock(grad_q_mem, batch, length)
            if mem_q is None:
                grad_q = grad_q + grad_q_mem
            else:
                grad_mq = grad_q_mem
            grad_mem_k, grad_mem_v = (g.transpose(1, 2).reshape(mem_k.shape) for g in (grad_mem_k, grad_mem_v))
        return (
            grad_q, grad_k, grad_v, grad_fq, grad_fk, grad_fv, grad_mq, grad_mem_k, grad_mem_v,
            None, None, None, None, None, None,
        )  # fmt: skip


def _weigh_nothing_where_nothing_is_seen(out: Tensor, lse: Tensor, mask: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """One call's output [B, T, Hq, D] and log-sum-exp [B, T, Hq], with the rows of queries that see no key of that
    call set to weigh nothing in the merge, whatever the kernel returns for an empty row. mask: the call's additive
    mask, its rows in query order per sequence, shared by the sequences (``batch`` 1) or one set each."""
    sees_a_key = torch.isfinite(mask).any(-1).reshape(batch, -1, 1)[:, : out.shape[1]]
    return out.masked_fill(~sees_a_key.unsqueeze(-1), 0.0), lse.masked_fill(~sees_a_key, float("-inf"))


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The exact softmax over the union of several calls' keys: ``o = Σ_i exp(lse_i - lse) o_i`` with ``lse`` the
    log-sum-exp of the ``lse_i``. parts: (output [B, T, Hq, D], log-sum-exp [B, T, Hq]) of each call."""
    merged_lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    out = None
    for part_out, part_lse in parts:
        weighted = part_out * (part_lse - merged_lse).exp().unsqueeze(-1)
        out = weighted if out is None else out.add_(weighted)
    return out, merged_lse


def banded_attention(
    q, k, v, window, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale
) -> Tensor:
    """``bmojo_attention`` with a window on CPU tensors (inputs validated; shapes as there)."""
    length = q.shape[1]
    if fading_k is not None and window >= length:
        # No query has a fading key then; the buffer also has no row for one (they sit w rows on).
        fading_q = fading_k = fading_v = None
    if mem_k is not None and mem_k.shape[2] == 0:  # a memory of no slots adds no key (and the kernel needs one)
        mem_q = mem_k = mem_v = None
    if fading_k is None:
        bands = (_Band(length, window, (0,)),)
    elif fading_q is None:
        bands = (_Band(length, window, (0, window)),)
    else:  # a query of its own for the fading keys needs a band call of its own
        bands = (_Band(length, window, (0,)), _Band(length, window, (window,)))
    band_mask = bands[0].mask(q.dtype, q.device)
    fading_mask = bands[1].mask(q.dtype, q.device) if len(bands) > 1 else None
    mem_mask = None
    if mem_k is not None:
        mem_mask = _memory_mask(mem_pos, mem_valid, window, mem_block, q.dtype)
    return BandedAttention.apply(
        q, k, v, fading_q, fading_k, fading_v, mem_q, mem_k, mem_v, band_mask, fading_mask, mem_mask, bands,
        mem_block, scale,
    )  # fmt: skip
