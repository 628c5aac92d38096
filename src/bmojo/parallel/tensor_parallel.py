"""Tensor and sequence parallelism for the PyTorch engine: the plan as ``parallelize_module`` styles.

Linear layers and the embedding become DTensor modules through the stock styles (``ColwiseParallel``,
``RowwiseParallel``, ``SequenceParallel``, ``PrepareModuleInput``). The SSM mixer reads its per-head
parameters inside its own forward, where a DTensor would meet plain tensors, so :class:`SsmHeadParallel`
keeps each rank's slices as plain parameters and adds the two collectives of a column/row pair itself.
Activations stay ``[B, T, D]``; sequence parallelism shards dim 1 of the residual stream.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from bmojo.parallel.collectives import copy_to_region, reduce_from_region, reduce_scatter_region, sum_over_region
from bmojo.parallel.plan import Output, ParallelPlan, Role, ShardSpec
from bmojo.parallel.ssm_shard import localize_ssm_sizes, share_norm_groups


def shard_parameters_in_place(module: nn.Module, specs: dict[str, ShardSpec], rank: int, size: int) -> None:
    """Replace each named parameter (relative to ``module``) by this rank's slice, as a plain parameter."""
    for name, spec in specs.items():
        owner_name, _, param_name = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        full = getattr(owner, param_name)
        local = spec.local(full.detach(), rank, size)
        setattr(owner, param_name, nn.Parameter(local, requires_grad=full.requires_grad))


def divide_attributes(module: nn.Module, names: tuple[str, ...], size: int) -> None:
    """Turn whole-model sizes read in ``forward`` (head counts, widths, segment tuples) into per-rank sizes."""
    for name in names:
        value = getattr(module, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v % size for v in values):
            raise ValueError(f"{type(module).__name__}.{name}={value} does not split over {size} ranks")
        divided = tuple(v // size for v in values)
        setattr(module, name, divided if isinstance(value, tuple) else divided[0])


class SsmHeadParallel(ParallelStyle):
    """A Mamba-2 mixer split by head: ``in_proj`` per segment, conv and per-head parameters sliced alike,
    ``out_proj`` row-parallel. The output is all-reduced, or reduce-scattered along the sequence when it
    returns to a sequence-parallel residual stream. B/C groups fewer than the ranks are shared by the ranks whose
    heads read them (their gradients are completed by the engine, see ``ShardSpec.shared_rows``).
    """

    def __init__(self, specs: dict[str, ShardSpec], output: Output, sequence_parallel: bool):
        super().__init__()
        self.specs, self.output, self.sequence_parallel = specs, output, sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, rank, size = device_mesh.get_group(), device_mesh.get_local_rank(), device_mesh.size()
        shard_parameters_in_place(module, self.specs, rank, size)
        share_norm_groups(module, module.num_groups, rank, size, partial(sum_over_region, group=group))
        localize_ssm_sizes(module, size)
        scatter = self.sequence_parallel and self.output == Output.residual

        def enter(_module: nn.Module, args: tuple) -> tuple:
            return (copy_to_region(args[0], group), *args[1:])

        def leave(_module: nn.Module, _args: tuple, out: tuple) -> tuple:
            s = reduce_scatter_region(out[0], 1, group) if scatter else reduce_from_region(out[0], group)
            return (s, *out[1:])

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
        return module


class GatherSequence(ParallelStyle):
    """A residual branch's first input, sharded along the sequence (dim 1), gathered whole before the branch.

    Mixers read the whole sequence (positions, scans, memory selection); ``PrepareModuleInput`` would need the
    number of positional arguments, which differs between mixers. The backward keeps this rank's chunk of the
    (complete, replicated) input gradient.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(_module: nn.Module, args: tuple) -> tuple:
            sharded = DTensor.from_local(args[0], device_mesh, [Shard(1)], run_check=False)
            return (sharded.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Replicate()]), *args[1:])

        module.register_forward_pre_hook(gather)
        return module


def _relative(specs: dict[str, ShardSpec], prefix: str) -> dict[str, ShardSpec]:
    return {name[len(prefix) + 1 :]: spec for name, spec in specs.items() if name.startswith(prefix + ".")}


def apply_tensor_parallel(stage: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split ``stage`` (a model or a pipeline stage with the model's FQNs) over ``tp_mesh`` as ``plan`` says."""
    present = {name for name, _ in stage.named_modules()}
    sequence = Shard(1)
    residual = sequence if sequence_parallel else Replicate()
    gather_styles: dict[str, ParallelStyle] = {}
    styles: dict[str, ParallelStyle] = {}
    for rule in plan.rules:
        if rule.fqn not in present:
            continue
        if rule.role == Role.column:
            styles[rule.fqn] = ColwiseParallel()
        elif rule.role == Role.row:
            out = residual if rule.output == Output.residual else Replicate()
            styles[rule.fqn] = RowwiseParallel(output_layouts=out)
        elif rule.role == Role.vocab_embedding:
            styles[rule.fqn] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
        elif rule.role == Role.vocab_head:
            styles[rule.fqn] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1))
        elif rule.role == Role.sequence_norm and sequence_parallel:
            styles[rule.fqn] = SequenceParallel(use_local_output=True)
        elif rule.role == Role.branch and sequence_parallel:
            gather_styles[rule.fqn] = GatherSequence()
        elif rule.role == Role.heads:
            divide_attributes(stage.get_submodule(rule.fqn), rule.divide, tp_mesh.size())
        elif rule.role == Role.ssm:
            specs = _relative(plan.param_specs, rule.fqn)
            styles[rule.fqn] = SsmHeadParallel(specs, rule.output, sequence_parallel)
    # Gathers first, so a branch sees the whole sequence before any of its own hooks run.
    parallelize_module(stage, tp_mesh, gather_styles)
    parallelize_module(stage, tp_mesh, styles)
    _retie_embeddings(stage)


def _retie_embeddings(stage: nn.Module) -> None:
    """Sharding replaced the embedding and the head weights separately; share them again if the model ties them."""
    config = getattr(stage, "config", None)
    if config is None or not config.tie_word_embeddings:
        return
    if hasattr(stage, "lm_head") and hasattr(stage.model, "embed_tokens"):
        stage.lm_head.weight = stage.model.embed_tokens.weight


def sum_shared_rows(grad: torch.Tensor, spec: ShardSpec, rank: int, size: int, group) -> None:
    """Complete, in place, the gradient rows of segments several ranks keep whole (``ShardSpec.shared_rows``):
    each such rank holds only its heads' share. grad: this rank's tensor-parallel slice (whole over other dims).
    """
    for start, stop, parts in spec.shared_rows(size):
        rows = grad.narrow(spec.dim, start, stop - start)
        part = rank // (size // parts)
        # One slot per part, so ranks of different parts add into different slots of one all-reduce.
        slots = rows.new_zeros((parts, *rows.shape))
        slots[part] = rows
        dist.all_reduce(slots, group=group)
        rows.copy_(slots[part])


def tensor_parallel_local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's tensor-parallel slice of a parameter or gradient, whole over every other mesh dimension.

    A DTensor is redistributed to ``Replicate`` on every mesh dimension but ``tp`` and unwrapped; a plain tensor
    (a replicated parameter or an SSM slice) is returned as is.
    """
    if not isinstance(tensor, DTensor):
        return tensor
    names = tensor.device_mesh.mesh_dim_names or ()
    placements = [p if name == "tp" else Replicate() for name, p in zip(names, tensor.placements, strict=True)]
    return tensor.redistribute(placements=placements).to_local()


def from_tensor_parallel_local(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tensor_parallel_local`: this rank's local piece of ``like`` (a parameter, gradient or
    optimizer state) given its tensor-parallel slice ``value``."""
    if not isinstance(like, DTensor):
        return value
    names = like.device_mesh.mesh_dim_names or ()
    placements = [p if name == "tp" else Replicate() for name, p in zip(names, like.placements, strict=True)]
    whole = DTensor.from_local(value, like.device_mesh, placements, run_check=False)
    return whole.redistribute(like.device_mesh, like.placements).to_local()
