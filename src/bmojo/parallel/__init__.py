"""Parallelism: one plan per model (:mod:`bmojo.parallel.plan`), two engines (PyTorch and neuronx-distributed)."""

from bmojo.parallel.layout import Layout
from bmojo.parallel.plan import ParallelPlan, Role, ShardSpec, bmojo_plan
from bmojo.parallel.torch_engine import StepLosses, TorchEngine

__all__ = ["Layout", "ParallelPlan", "Role", "ShardSpec", "StepLosses", "TorchEngine", "bmojo_plan"]
