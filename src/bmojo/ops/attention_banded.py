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
- **Memory keys, a second call** per memory block: its queries against the block's M entries.
- **The merge.** PyTorch's CPU flash kernel returns each call's log-sum-exp, so the two softmaxes combine
  exactly: ``o = Σ_i exp(lse_i - lse) o_i`` with ``lse = logaddexp(lse_1, lse_2)``. Its backward, given the
  *merged* output and log-sum-exp, returns each call's exact share of the gradient (``P = exp(S - lse)`` and
  ``rowsum(dO ∘ O)`` are then the full softmax's), as ring attention uses it.

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
    """Geometry of one sequence's band call: ``cols`` key sets (local, then fading) of ``span`` rows a block."""

    def __init__(self, length: int, window: int, cols: int):
        self.block = min(BAND_QUERY_BLOCK, length)
        self.num_blocks = -(-length // self.block)
        self.padded = self.num_blocks * self.block
        self.reach = min(window - 1, self.padded - 1)  # keys further back than the sequence do not exist
        self.span = self.block + self.reach
        self.rows = self.reach + self.padded  # buffer rows: `reach` zero rows, then the positions
        self.window, self.cols = window, cols

    def buffer(self, local: Tensor, fading: Tensor | None) -> Tensor:
        """local, fading: [B, T, Hkv, D] → [B, rows, cols, Hkv, D]; row ``reach + p`` holds the local key of
        position p and the fading key of position p - w."""
        batch, length = local.shape[:2]
        buffer = local.new_zeros(batch, self.rows, self.cols, *local.shape[2:])
        buffer[:, self.reach : self.reach + length, 0] = local
        if fading is not None:
            # Fading keys of positions >= T' - w would sit past the buffer: no query reaches them.
            kept = min(length, self.padded - self.window)
            buffer[:, self.reach + self.window : self.reach + self.window + kept, 1] = fading[:, :kept]
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
        start = self.reach + col * self.window
        rows = grad[:, start : start + length, col]
        return _pad_time(rows, length).to(dtype)

    def mask(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Additive mask [NQ, 1, block, span·cols]: local keys ``p ∈ [t-w+1, t]``, fading ones also ``p >= w``."""
        t = torch.arange(self.padded, device=device).view(self.num_blocks, self.block, 1, 1)
        first = torch.arange(self.num_blocks, device=device) * self.block - self.reach
        p = first.view(-1, 1, 1, 1) + torch.arange(self.span, device=device).view(1, 1, -1, 1)
        earliest = torch.tensor([0, self.window][: self.cols], device=device)  # fading keys need p - w >= 0
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
    """Forward inputs as :func:`banded_attention`'s; the masks are built outside (they carry no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, fading_k, fading_v, mem_k, mem_v, band_mask, mem_mask, window, mem_block, scale):
        with torch.autocast("cpu", enabled=False):
            return BandedAttention._forward(
                ctx, q, k, v, fading_k, fading_v, mem_k, mem_v, band_mask, mem_mask, window, mem_block, scale
            )

    @staticmethod
    def _forward(ctx, q, k, v, fading_k, fading_v, mem_k, mem_v, band_mask, mem_mask, window, mem_block, scale):
        flash_forward, _ = FLASH_OPS
        batch, length = q.shape[:2]
        band = _Band(length, window, 1 if fading_k is None else 2)
        keys, values = band.buffer(k, fading_k), band.buffer(v, fading_v)
        queries = _pad_time(q, band.padded)
        parts = [
            flash_forward(
                _blocks(queries[b : b + 1], band.block),
                band.view(keys[b]),
                band.view(values[b]),
                attn_mask=band_mask,
                scale=scale,
            )
            for b in range(batch)
        ]
        out = _unblock(torch.cat([o for o, _ in parts]), batch, length)  # [B, T, Hq, D]
        lse = _unblock(torch.cat([lse for _, lse in parts]), batch, length)  # [B, T, Hq]
        if mem_k is not None:
            num_blocks = mem_k.shape[1]
            mem_out, mem_lse = flash_forward(
                _blocks(_pad_time(q, num_blocks * mem_block), mem_block),
                mem_k.flatten(0, 1).transpose(1, 2),  # [B·NB, Hkv, M, D]
                mem_v.flatten(0, 1).transpose(1, 2),
                attn_mask=mem_mask,
                scale=scale,
            )
            mem_out, mem_lse = _unblock(mem_out, batch, length), _unblock(mem_lse, batch, length)
            # A query with no memory entry in view weighs nothing, whatever the kernel returns for its empty row.
            sees_memory = torch.isfinite(mem_mask).any(-1).view(batch, -1, 1)[:, :length]
            mem_lse = mem_lse.masked_fill(~sees_memory, float("-inf"))
            mem_out = mem_out.masked_fill(~sees_memory.unsqueeze(-1), 0.0)
            merged_lse = torch.logaddexp(lse, mem_lse)
            out = (out * (lse - merged_lse).exp().unsqueeze(-1)).add_(
                mem_out * (mem_lse - merged_lse).exp().unsqueeze(-1)
            )
            lse = merged_lse
        out = out.to(q.dtype)
        ctx.save_for_backward(q, keys, values, out, lse, band_mask, mem_k, mem_v, mem_mask)
        ctx.geometry = (band, mem_block, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # once: activation checkpointing lets saved tensors be unpacked only once
        with torch.autocast("cpu", enabled=False):
            return BandedAttention._backward(ctx, grad_out.to(saved[0].dtype), *saved)

    @staticmethod
    def _backward(ctx, grad_out, q, keys, values, out, lse, band_mask, mem_k, mem_v, mem_mask):
        _, flash_backward = FLASH_OPS
        band, mem_block, scale = ctx.geometry
        batch, length = q.shape[:2]

        def blocked(padded: int, block: int) -> list[Tensor]:
            """grad_out, q, out and lse in the blocks of a call over ``padded`` positions."""
            return [_blocks(_pad_time(x, padded), block) for x in (grad_out, q, out, lse)]

        grad_out_b, q_b, out_b, lse_b = blocked(band.padded, band.block)
        grad_q, grad_keys, grad_values = [], [], []
        for b in range(batch):
            rows = slice(b * band.num_blocks, (b + 1) * band.num_blocks)
            grads = flash_backward(
                grad_out_b[rows], q_b[rows], band.view(keys[b]), band.view(values[b]), out_b[rows], lse_b[rows],
                0.0, False, attn_mask=band_mask, scale=scale,
            )  # fmt: skip
            grad_q.append(grads[0])
            grad_keys.append(band.fold(grads[1]))
            grad_values.append(band.fold(grads[2]))
        grad_q = _unblock(torch.cat(grad_q), batch, length)
        grad_keys, grad_values = torch.stack(grad_keys), torch.stack(grad_values)  # [B, rows, cols, Hkv, D] fp32
        grad_k, grad_v = (band.unbuffer(g, 0, length, q.dtype) for g in (grad_keys, grad_values))
        grad_fk = grad_fv = grad_mem_k = grad_mem_v = None
        if band.cols == 2:
            grad_fk, grad_fv = (band.unbuffer(g, 1, length, q.dtype) for g in (grad_keys, grad_values))
        if mem_k is not None:
            num_blocks = mem_k.shape[1]
            mem_keys, mem_values = (m.flatten(0, 1).transpose(1, 2) for m in (mem_k, mem_v))
            grad_out_m, q_m, out_m, lse_m = blocked(num_blocks * mem_block, mem_block)
            grad_q_mem, grad_mem_k, grad_mem_v = flash_backward(
                grad_out_m, q_m, mem_keys, mem_values, out_m, lse_m, 0.0, False, attn_mask=mem_mask, scale=scale
            )
            grad_q = grad_q + _unblock(grad_q_mem, batch, length)
            grad_mem_k, grad_mem_v = (g.transpose(1, 2).reshape(mem_k.shape) for g in (grad_mem_k, grad_mem_v))
        return grad_q, grad_k, grad_v, grad_fk, grad_fv, grad_mem_k, grad_mem_v, None, None, None, None, None


def banded_attention(q, k, v, window, fading_k, fading_v, mem_k, mem_v, mem_pos, mem_valid, mem_block, scale) -> Tensor:
    """``bmojo_attention`` with a window on CPU tensors (inputs validated; shapes as there)."""
    length = q.shape[1]
    if fading_k is not None and window >= length:
        # No query has a fading key then; the buffer also has no row for one (they sit w rows on).
        fading_k = fading_v = None
    if mem_k is not None and mem_k.shape[2] == 0:  # a memory of no slots adds no key (and the kernel needs one)
        mem_k = mem_v = None
    band = _Band(length, window, 1 if fading_k is None else 2)
    band_mask = band.mask(q.dtype, q.device)
    mem_mask = None
    if mem_k is not None:
        mem_mask = _memory_mask(mem_pos, mem_valid, window, mem_block, q.dtype)
    return BandedAttention.apply(
        q, k, v, fading_k, fading_v, mem_k, mem_v, band_mask, mem_mask, window, mem_block, scale
    )
