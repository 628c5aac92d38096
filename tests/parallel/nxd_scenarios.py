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


def matches_one_process(patterns: list[str], sequence_parallel: bool, **overrides) -> None:
    """Loss, auxiliary loss and every gradient of one step equal the one-process model's within 1e-5."""
    from bmojo.parallel.nxd_engine import sum_partial_gradients

    for pattern in patterns:
        api, plan, reference, model = _tensor_parallel_model(pattern, sequence_parallel, **overrides)
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


def plan_modules_become_nxd_layers(pattern: str, **overrides) -> None:
    """Under SP, exactly the plan's modules are NxD layers, built with the arguments the plan asks for, holding
    this rank's slices; the SSM is sharded per segment of its fused projection."""
    from bmojo.model.modeling import BmojoBlock
    from bmojo.parallel.plan import Output, Role

    api, plan, reference, model = _tensor_parallel_model(pattern, sequence_parallel=True, **overrides)
    rank, size = api.state.get_tensor_model_parallel_rank(), api.state.get_tensor_model_parallel_size()
    column, row = api.layers.ColumnParallelLinear, api.layers.RowParallelLinear
    expected = {}
    for rule in plan.rules:
        # Residual outputs are reduce-scattered after the layer, the others all-reduced inside it.
        reduce = {"input_is_parallel": True, "reduce_output": rule.output != Output.residual}
        if rule.role == Role.column:
            expected[rule.fqn] = (column, {"gather_output": False, "sequence_parallel_enabled": False})
        elif rule.role == Role.row:
            expected[rule.fqn] = (row, reduce)
        elif rule.role == Role.ssm:
            expected[f"{rule.fqn}.in_proj"] = (column, {"gather_output": False})
            expected[f"{rule.fqn}.out_proj"] = (row, reduce)
    # NxD's embedding reduce-scatters only along its sequence-first default dimension.
    embedding = {"sequence_parallel_enabled": True, "sequence_dim": 0}
    expected["model.embed_tokens"] = (api.layers.ParallelEmbedding, embedding)
    expected["lm_head"] = (column, {"gather_output": False, "sequence_parallel_enabled": False})
    layer_classes = (column, row, api.layers.ParallelEmbedding)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, layer_classes)}
    assert wrapped == set(expected), sorted(wrapped ^ set(expected))
    for fqn, (kind, arguments) in expected.items():
        layer = model.get_submodule(fqn)
        assert type(layer) is kind, fqn
        assert {name: getattr(layer, name) for name in arguments} == arguments, fqn
        for name, param in layer.named_parameters():
            full = reference.get_parameter(f"{fqn}.{name}")
            assert torch.equal(param, plan.spec(f"{fqn}.{name}").local(full.detach(), rank, size)), f"{fqn}.{name}"
    # Only the innovation predictor stays a plain (replicated) linear.
    plain = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    assert plain == {f"model.layers.{i}.mixer.predictor.proj" for i, kind in enumerate(pattern) if kind == "B"}
    for index, kind in enumerate(pattern):
        block, full_block = model.model.layers[str(index)], reference.model.layers[index]
        assert isinstance(block, BmojoBlock)
        assert block.mixer_norm.weight.sequence_parallel_enabled is True
        if hasattr(full_block.mixer, "num_kv_heads"):
            heads = (full_block.mixer.num_heads // size, full_block.mixer.num_kv_heads // size)
            assert (block.mixer.num_heads, block.mixer.num_kv_heads) == heads, index
        if kind in "MB":
            mixer = block.mixer.ssm if kind == "B" else block.mixer
            _check_ssm_shard(full_block, mixer, f"model.layers.{index}", rank, size)


def _check_ssm_shard(full_block: torch.nn.Module, local: torch.nn.Module, prefix: str, rank: int, size: int) -> None:
    """The in_proj rows of each segment (z, x, B, C, dt), the convolution's (x, B, C) and the per-head
    parameters are this rank's share; B/C groups fewer than the ranks are kept whole by every rank."""
    full = full_block.mixer.ssm if hasattr(full_block.mixer, "ssm") else full_block.mixer
    inner, groups_width, heads = full.inner_size, full.num_groups * full.state_size, full.num_heads
    shared_groups = full.num_groups < size

    def share(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(size, dim=dim)[rank]

    def share_groups(t: torch.Tensor) -> torch.Tensor:
        return t if shared_groups else share(t)

    z, x, b, c, dt = full.in_proj.weight.split([inner, inner, groups_width, groups_width, heads])
    expected_in = torch.cat([share(z), share(x), share_groups(b), share_groups(c), share(dt)])
    assert torch.equal(local.in_proj.weight, expected_in), prefix
    conv_x, conv_b, conv_c = full.conv1d.weight.split([inner, groups_width, groups_width])
    expected_conv = torch.cat([share(conv_x), share_groups(conv_b), share_groups(conv_c)])
    assert torch.equal(local.conv1d.weight, expected_conv), prefix
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(getattr(local, name), share(getattr(full, name))), f"{prefix} {name}"
        assert getattr(local, name).tensor_model_parallel is True, f"{prefix} {name}"
    assert torch.equal(local.norm.weight, share(full.norm.weight)), prefix
    assert torch.equal(local.out_proj.weight, share(full.out_proj.weight, dim=1)), prefix
    local_groups = full.num_groups if shared_groups else full.num_groups // size
    assert (local.num_heads, local.inner_size, local.num_groups) == (heads // size, inner // size, local_groups)
    norm_kind = "SharedGroupGatedRMSNorm" if shared_groups else type(full.norm).__name__
    assert type(local.norm).__name__ == norm_kind, prefix


def engine_step_and_checkpoint(folder: str) -> None:
    """``NxDEngine`` over NxD's real layers (its trainer API: ``fake_nxd``) at TP=2 with SP: one training step of
    2 micro-batches has the one-process model's mean losses and gradients; a checkpoint records the layout,
    merges into the model, loads back and is refused under another layout."""
    import fake_nxd
    import pytest

    from bmojo.parallel import Layout
    from bmojo.parallel.checkpoint import LayoutMismatchError
    from bmojo.parallel.convert import full_model_state
    from bmojo.parallel.nxd_engine import NxDEngine

    real_nxd.load()
    with pytest.MonkeyPatch.context() as patch:
        recorder = fake_nxd.install(patch)
        reference = tiny_model("BM")
        engine = NxDEngine(Layout(tensor_parallel=2, sequence_parallel=True, microbatches=2))
        model = engine.parallelize(reference)
        rank, size = (
            engine.api.state.get_tensor_model_parallel_rank(),
            engine.api.state.get_tensor_model_parallel_size(),
        )
        batches = step_batches(0, 2, 2)
        losses = engine.train_step(batches)
        if engine.layout.sequence_parallel:  # as NxD's optimizer step does, before the gradients are read
            engine.api.grads.allreduce_sequence_parallel_gradients(torch.optim.SGD(model.parameters(), lr=0.0))
        expected_lm = expected_aux = 0.0
        for micro in batches:
            out = reference(micro, labels=micro)
            (out.loss / 2).backward()
            expected_lm += float((out.loss - out.aux_loss).detach()) / 2
            expected_aux += float(out.aux_loss.detach()) / 2
        assert abs(float(losses.lm_loss) - expected_lm) <= TOLERANCE
        assert abs(float(losses.aux_loss) - expected_aux) <= TOLERANCE and expected_aux > 0
        assert bool(engine.finite(losses))
        full = dict(reference.named_parameters())
        for name, param in engine.named_parameters():
            _close(f"engine grad {name}", param.grad, engine.plan.spec(name).local(full[name].grad, rank, size))

        checkpoint = Path(folder) / "step_1"
        engine.save(checkpoint)
        dist.barrier()
        (save,) = recorder.named("save_checkpoint")
        assert (save.kwargs["checkpoint_dir_str"], save.kwargs["tag"]) == (str(checkpoint), "nxd")
        merged = full_model_state(checkpoint)
        assert merged.keys() == reference.state_dict().keys()
        assert all(torch.equal(merged[name], value) for name, value in reference.state_dict().items())
        saved = {name: param.detach().clone() for name, param in engine.named_parameters()}
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        engine.load(checkpoint)
        assert [call.kwargs["tag"] for call in recorder.named("load_checkpoint")] == ["nxd"]
        assert all(torch.equal(param, saved[name]) for name, param in engine.named_parameters())
        other = NxDEngine(Layout(tensor_parallel=1))
        other.model = engine.model
        with pytest.raises(LayoutMismatchError, match="parallel.tensor_parallel_size=2"):
            other.load(checkpoint)
