"""Differentiable tensor-parallel collectives on plain tensors (Megatron's region functions).

The PyTorch engine uses these where a module's forward reads its parameters directly (the SSM mixer), so
DTensor cannot carry the layout; everything else goes through ``parallelize_module``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_reduce(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    tensor = tensor.contiguous().clone()
    dist.all_reduce(tensor, group=group)
    return tensor


def _gather_dim(tensor: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    moved = tensor.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] * dist.get_world_size(group), *moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(tensor: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    moved = tensor.movedim(dim, 0).contiguous()
    size = dist.get_world_size(group)
    if moved.shape[0] % size:
        raise ValueError(f"cannot scatter a dimension of {moved.shape[0]} over {size} ranks")
    out = moved.new_empty((moved.shape[0] // size, *moved.shape[1:]))
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim)


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity on a replicated input. Backward: sum the partial gradients of every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: sum the partial results of every rank. Backward: identity (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceScatterRegion(torch.autograd.Function):
    """Forward: sum partial results and keep this rank's chunk of ``dim``. Backward: gather the chunks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_dim(grad, ctx.dim, ctx.group), None, None


class _SumOverRegion(torch.autograd.Function):
    """Forward and backward: sum over ranks (a statistic every rank feeds and every rank reads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def reduce_scatter_region(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    return _ReduceScatterRegion.apply(x, dim, group)


def sum_over_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _SumOverRegion.apply(x, group)
