"""Op ``eidetic_gather``: read selected tokens out of a sequence, per batch row (DESIGN §2.4).

``out[b, s] = src[b, index[b, s]]``. The B'MOJO layer uses it to pull the keys, values and positions of the
remembered tokens of every memory block out of the full sequence in one static-shaped call. The backward pass
scatter-adds the output gradient back into ``src``; a token that is gathered several times (it stays in the
memory of several blocks) accumulates all of their gradients.
"""

from __future__ import annotations

import torch

from bmojo.ops.registry import OpRegistry

EIDETIC_GATHER = OpRegistry("eidetic_gather")


def eidetic_gather(src: torch.Tensor, index: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Gather rows of ``src`` along time, independently for every batch row.

    src: [B, T, F] any floating dtype; index: [B, S] int64 with values in [0, T)
    → out: [B, S, F] in src's dtype.
    """
    _validate(src, index)
    return EIDETIC_GATHER.resolve(backend, src.device)(src, index)


def _validate(src: torch.Tensor, index: torch.Tensor) -> None:
    if src.dim() != 3:
        raise ValueError(f"eidetic_gather: src must be [B, T, F], got shape {tuple(src.shape)}")
    if not src.is_floating_point():
        raise TypeError(f"eidetic_gather: src must be a floating tensor, got {src.dtype}")
    if index.dim() != 2:
        raise ValueError(f"eidetic_gather: index must be [B, S], got shape {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"eidetic_gather: index must be int64 (torch.long), got {index.dtype}; use index.long()")
    if index.shape[0] != src.shape[0]:
        raise ValueError(f"eidetic_gather: batch sizes differ: src has B={src.shape[0]}, index has B={index.shape[0]}")
    if index.device != src.device:
        raise ValueError(f"eidetic_gather: index is on {index.device} but src is on {src.device}")
    # The range check reads the index on the host: affordable in eager mode, but on XLA it would force a
    # device-to-host copy inside the training step, and inside a torch.compile'd graph a graph break, so it is
    # skipped there.
    if src.device.type != "xla" and not torch.compiler.is_compiling() and index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= src.shape[1]:
            raise IndexError(
                f"eidetic_gather: index values must lie in [0, T={src.shape[1]}), got range [{low}, {high}]; "
                "clamp or mask invalid slots before gathering"
            )


class _NaiveGather(torch.autograd.Function):
    """Per-batch-row advanced indexing forward, explicit scatter-add backward."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.src_shape = src.shape
        return torch.stack([src[b][index[b]] for b in range(src.shape[0])])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        # Accumulate in fp32 so that repeated indices in bf16 are summed without intermediate rounding.
        grad_src = torch.zeros(ctx.src_shape, dtype=torch.float32, device=grad_out.device)
        for b in range(index.shape[0]):
            grad_src[b].index_add_(0, index[b], grad_out[b].float())
        return grad_src.to(grad_out.dtype), None


@EIDETIC_GATHER.register("naive")
def eidetic_gather_naive(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference: src [B, T, F], index [B, S] → [B, S, F]."""
    return _NaiveGather.apply(src, index)


@EIDETIC_GATHER.register("torch")
def eidetic_gather_torch(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One ``index_select`` on the flattened [B*T, F] view; autograd turns it into one ``index_add``.

    src [B, T, F], index [B, S] → [B, S, F].
    """
    batch, length, features = src.shape
    row_offsets = torch.arange(batch, device=index.device).unsqueeze(1) * length
    flat_index = (index + row_offsets).reshape(-1)
    return src.reshape(batch * length, features).index_select(0, flat_index).view(batch, -1, features)
