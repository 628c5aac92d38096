"""From a recipe to an engine: the ``parallel`` group gives the layout, the ``backend`` group the engine."""

from __future__ import annotations

from typing import Any

import torch

from bmojo.parallel.layout import Layout

ENGINES = ("torch", "nxd")


def layout_from_config(parallel: Any, microbatches: int, world_size: int) -> Layout:
    """The layout of a run with ``world_size`` processes.

    ``parallel`` is the recipe's ``parallel`` group (``tensor_parallel_size``, ``pipeline_parallel_size``,
    ``data_parallel_size`` or null for "every process left", and optionally ``sequence_parallel``, ``schedule``,
    ``zero1``, ``activation_checkpointing``); ``microbatches`` is the trainer's ``grad_accum_steps``.
    """
    tensor, pipeline = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    if world_size % (tensor * pipeline):
        raise ValueError(
            f"{world_size} processes do not split into tensor_parallel_size={tensor} x "
            f"pipeline_parallel_size={pipeline} groups; start a multiple of {tensor * pipeline} processes"
        )
    inferred = world_size // (tensor * pipeline)
    data = getattr(parallel, "data_parallel_size", None)
    if data is not None and data != inferred:
        raise ValueError(
            f"parallel.data_parallel_size={data}, but {world_size} processes with tensor_parallel_size={tensor} and "
            f"pipeline_parallel_size={pipeline} leave {inferred}; set it to {inferred} or null (inferred)"
        )
    return Layout(
        data_parallel=inferred,
        tensor_parallel=tensor,
        pipeline_parallel=pipeline,
        sequence_parallel=getattr(parallel, "sequence_parallel", False),
        microbatches=microbatches,
        schedule=getattr(parallel, "schedule", "1f1b"),
        zero1=getattr(parallel, "zero1", False),
        activation_checkpointing=getattr(parallel, "activation_checkpointing", False),
    )


def build_engine(name: str, layout: Layout, device: torch.device | str = "cpu", max_grad_norm: float | None = 1.0):
    """``torch`` (CPU/GPU; ``torch.distributed`` initialised) or ``nxd`` (trn1; neuronx-distributed imported now)."""
    if name == "torch":
        from bmojo.parallel.torch_engine import TorchEngine

        return TorchEngine(layout, device)
    if name == "nxd":
        from bmojo.parallel.nxd_engine import NxDEngine

        return NxDEngine(layout, max_grad_norm)
    raise ValueError(f"parallel engine {name!r} is not one of {ENGINES}")
