"""Scenarios run on every rank by ``harness.launch`` against the real neuronx-distributed in its CPU mode.

Each rank loads NxD (``real_nxd.load``), builds NxD's tensor-parallel groups, applies the bmojo plan with NxD's
real layers through the engine's :func:`~bmojo.parallel.nxd_engine.build_parallel_model`, and checks its share
against the one-process model.
"""

from __future__ import annotations

from pathlib import Path

import real_nxd
import torch
import torch.distributed as dist
from harness import step_batches, tiny_model

from bmojo.parallel import bmojo_plan

TOLERANCE = 1e-5


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= TOLERANCE * scale, f"rank {dist.get_rank()} {name}: max |diff| {error:.3g}"


def _tensor_parallel_model(pattern: str, sequence_parallel: bool, **overrides):
    """(NxD layers api, plan, reference model, this rank's NxD model) with NxD's groups of the whole world."""
    real_nxd.load()
    from bmojo.parallel.nxd_engine import build_parallel_model, import_nxd_layers

    api = import_nxd_layers()
    if not api.state.model_parallel_is_initialized():
        api.state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    reference = tiny_model(pattern, **overrides)
    plan = bmojo_plan(reference)
    model = build_parallel_model(api, plan, reference.config, reference.state_dict(), sequence_parallel)
    return api, plan, reference, model


def matches_one_process(patterns: list[str], sequence_parallel: bool) -> None:
    """Loss, auxiliary loss and every gradient of one step equal the one-process model's within 1e-5."""
    from bmojo.parallel.nxd_engine import sum_partial_gradients

    for pattern in patterns:
        api, plan, reference, model = _tensor_parallel_model(pattern, sequence_parallel)
        tokens = step_batches(0, 1, 2)[0]
        expected = reference(tokens, labels=tokens)
        expected.loss.backward()
        loss, weighted_aux = model(tokens, tokens)
        loss.backward()
        # What the engine's train_step and NxD's optimizer step do to the gradients before they are read.
        sum_partial_gradients(api, plan, model)
        if sequence_parallel:
            holder = torch.optim.SGD(model.parameters(), lr=0.0)
            api.grads.allreduce_sequence_parallel_gradients(holder)
        assert abs(float(loss.detach()) - float(expected.loss.detach())) <= TOLERANCE, (
            f"{pattern}: loss {loss} vs {expected.loss}"
        )
        aux = float(expected.aux_loss.detach())
        assert abs(float(weighted_aux.detach()) - aux) <= TOLERANCE, f"{pattern}: aux {weighted_aux} vs {aux}"
        full = dict(reference.named_parameters())
        rank, size = api.state.get_tensor_model_parallel_rank(), api.state.get_tensor_model_parallel_size()
        names = [name for name, _ in model.named_parameters()]
        assert sorted(names) == sorted(full), f"{pattern}: parameters {sorted(set(names) ^ set(full))}"
        for name, param in model.named_parameters():
            local = plan.spec(name).local(full[name].grad, rank, size)
            _close(f"{pattern} sp={sequence_parallel} grad {name}", param.grad, local)


def save_shards_as_nxd(folder: str, pattern: str) -> None:
    """Write this rank's model state as NxD's ``save_checkpoint`` names it, and ``layout.json`` from rank 0."""
    import json

    from bmojo.parallel.checkpoint import LAYOUT_FILE, describe_layout
    from bmojo.parallel.convert import nxd_model_file
    from bmojo.parallel.layout import Layout

    api, plan, reference, model = _tensor_parallel_model(pattern, sequence_parallel=False)
    rank = api.state.get_tensor_model_parallel_rank()
    path = nxd_model_file(Path(folder), rank, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    if dist.get_rank() == 0:
        record = describe_layout(_Described(Layout(tensor_parallel=2), plan), "nxd")
        (Path(folder) / LAYOUT_FILE).write_text(json.dumps(record))
        torch.save(reference.state_dict(), Path(folder) / "expected.pt")
    dist.barrier()


class _Described:
    """What ``describe_layout`` reads of an engine."""

    def __init__(self, layout, plan):
        self.layout, self.plan = layout, plan
