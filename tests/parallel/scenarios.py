"""Scenarios run on every rank by ``harness.launch``; each asserts its own rank's share against one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from harness import MAX_GRAD_NORM, STEPS, clone_model, make_optimizer, reference_training, step_batches, tiny_model

from bmojo.parallel import Layout, TorchEngine
from bmojo.parallel.tensor_parallel import tensor_parallel_local

TOLERANCE = 1e-5
# AdamW divides each update by the root of its own squared gradient, so an element whose gradient is near zero
# turns a rounding difference (summation order across ranks) into a visible weight difference.
WEIGHT_TOLERANCE = 1e-4


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= tolerance * scale, f"rank {dist.get_rank()} {name}: max |diff| {error:.3g}"


def _expected_local(engine: TorchEngine, name: str, full: torch.Tensor) -> torch.Tensor:
    spec = engine.plan.spec(name)
    if engine.tp_mesh is None or not spec.sharded:
        return full
    return spec.local(full, engine.tp_rank, engine.layout.tensor_parallel)


def compare_training(runs: list[tuple], batch: int) -> None:
    """For each (layout, patterns[, model overrides]): train STEPS steps in parallel and on one process; the
    losses and gradients of every step and of the model after them agree within 1e-5, and so do the weights
    (within 1e-4, see above).
    """
    for layout_fields, patterns, *model_overrides in runs:
        for pattern in patterns:
            _compare_one(Layout(**layout_fields), pattern, batch, **(model_overrides[0] if model_overrides else {}))


def _compare_one(layout: Layout, pattern: str, batch: int, **model_overrides) -> None:
    """One pattern under one layout against one process (see :func:`compare_training`)."""
    model = tiny_model(pattern, **model_overrides)
    reference = clone_model(model)
    history = reference_training(reference, layout.microbatches, batch)
    engine = TorchEngine(layout)
    engine.parallelize(model)
    optimizer = make_optimizer(list(engine.parameters()))
    share = batch // layout.data_parallel
    for step, (lm, aux, norm, grads) in enumerate(history):
        batches = step_batches(step, layout.microbatches, batch)
        losses = engine.train_step(batches[:, engine.dp_rank * share : (engine.dp_rank + 1) * share])
        assert abs(losses.lm_loss - lm) <= TOLERANCE, f"{pattern} step {step}: loss {losses.lm_loss} vs {lm}"
        assert abs(losses.aux_loss - aux) <= TOLERANCE, f"{pattern} step {step}: aux {losses.aux_loss} vs {aux}"
        for name, param in engine.named_parameters():
            _close(
                f"{pattern} step {step} grad {name}",
                tensor_parallel_local(param.grad),
                _expected_local(engine, name, grads[name]),
            )
        got_norm = engine.clip_grad_norm_(MAX_GRAD_NORM)
        assert abs(got_norm - norm) <= TOLERANCE * max(1.0, norm), f"{pattern} step {step}: norm {got_norm} vs {norm}"
        if step < STEPS:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    expected = dict(reference.named_parameters())
    for name, param in engine.named_parameters():
        local, full = tensor_parallel_local(param.detach()), expected[name].detach()
        _close(f"{pattern} weight {name}", local, _expected_local(engine, name, full), WEIGHT_TOLERANCE)
    evaluated = engine.eval_step(batches[:, engine.dp_rank * share : (engine.dp_rank + 1) * share])
    assert abs(evaluated.lm_loss - history[-1][0]) <= TOLERANCE, f"{pattern}: eval loss {evaluated.lm_loss}"


def _train_steps(engine: TorchEngine, optimizer, steps: range, batch: int) -> list[float]:
    share = batch // engine.layout.data_parallel
    losses = []
    for step in steps:
        batches = step_batches(step, engine.layout.microbatches, batch)
        losses.append(engine.train_step(batches[:, engine.dp_rank * share : (engine.dp_rank + 1) * share]).lm_loss)
        engine.clip_grad_norm_(MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def save_and_resume(layout: dict, pattern: str, folder: str, batch: int, record_to: str | None = None) -> None:
    """Train 2 steps, save, train 1; a fresh model that loads the checkpoint trains that step bit for bit.
    ``record_to``: a JSON file where rank 0 writes the loss of that step.
    """
    layout = Layout(**layout)
    engine = TorchEngine(layout)
    engine.parallelize(tiny_model(pattern, seed=0))
    optimizer = make_optimizer(list(engine.parameters()))
    _train_steps(engine, optimizer, range(2), batch)
    engine.save(folder, optimizer)
    continued = _train_steps(engine, optimizer, range(2, 3), batch)
    if record_to is not None and dist.get_rank() == 0:
        Path(record_to).write_text(json.dumps(continued))

    resumed = TorchEngine(layout)
    resumed.parallelize(tiny_model(pattern, seed=1))
    resumed_optimizer = make_optimizer(list(resumed.parameters()))
    resumed.load(folder, resumed_optimizer)
    assert _train_steps(resumed, resumed_optimizer, range(2, 3), batch) == continued
    after = dict(resumed.named_parameters())
    for name, param in engine.named_parameters():
        expected, actual = tensor_parallel_local(param.detach()), tensor_parallel_local(after[name].detach())
        assert torch.equal(expected, actual), f"rank {dist.get_rank()} {name} differs after resuming"


def memory_positions(layout: dict, batch: int) -> None:
    """Every rank of a tensor-parallel group selects the same eidetic memory, and the one process does too."""
    import bmojo.model.attention as attention

    layout = Layout(**layout)
    chosen: list[tuple[torch.Tensor, torch.Tensor]] = []
    select = attention.select_memory

    def recording(*args, **kwargs):
        positions, valid = select(*args, **kwargs)
        chosen.append((positions.clone(), valid.clone()))
        return positions, valid

    attention.select_memory = recording
    try:
        model = tiny_model("B", num_hidden_layers=2)
        reference = clone_model(model)
        batches = step_batches(0, layout.microbatches, batch)
        for micro in batches:
            reference(micro, labels=micro)
        expected, chosen[:] = list(chosen), []
        engine = TorchEngine(layout)
        engine.parallelize(model)
        engine.train_step(batches)
    finally:
        attention.select_memory = select
    assert len(chosen) == len(expected) == 2 * layout.microbatches
    assert any(bool(valid.any()) for _, valid in chosen), "no token was selected: the check would be vacuous"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, chosen)
    for rank, theirs in enumerate(everyone):
        for (positions, valid), (other_positions, other_valid) in zip(chosen, theirs, strict=True):
            assert torch.equal(valid, other_valid) and torch.equal(positions[valid], other_positions[other_valid]), (
                f"rank {dist.get_rank()} and rank {rank} remember different tokens"
            )
    for (positions, valid), (ref_positions, ref_valid) in zip(chosen, expected, strict=True):
        assert torch.equal(valid, ref_valid) and torch.equal(positions[valid], ref_positions[ref_valid])


def resume_converted(layout: dict, pattern: str, folder: str, batch: int, expected_from: str) -> None:
    """Resume a checkpoint converted from another layout: the next step's loss is the one recorded there."""
    engine = TorchEngine(Layout(**layout))
    engine.parallelize(tiny_model(pattern, seed=1))
    optimizer = make_optimizer(list(engine.parameters()))
    engine.load(folder, optimizer)
    (expected,) = json.loads(Path(expected_from).read_text())
    (loss,) = _train_steps(engine, optimizer, range(2, 3), batch)
    assert abs(loss - expected) <= TOLERANCE, f"resumed loss {loss} vs {expected} before conversion"
