"""The trn1 training loop on torch-xla's CPU device (the XLA lane, `make test-xla`): graphs, losses, checkpoints.

Each run is a tiny model for 6 steps; a process compiles each distinct graph once, so later runs of the same
model reuse the graphs of the first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_xla", reason="the XLA lane runs in its own environment: make test-xla")
# Set only in the lane, before torch_xla starts its runtime, so the main lane's other tests never see them.
# Cheaper XLA:CPU code generation: compile time, not run time, dominates these tiny graphs on 2 cores.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as xla_metrics  # noqa: E402
from conftest import sentences, tiny_overrides  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bmojo import BmojoForCausalLM  # noqa: E402
from bmojo.train import NonFiniteLossError, recipes_dir, register_configs, train  # noqa: E402
from bmojo.train import xla as xla_module  # noqa: E402
from bmojo.train.checkpoint import CHECKPOINTS, latest_checkpoint  # noqa: E402
from bmojo.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.xla
# The autograd engine sizes its device queues at the first backward of the process: start the XLA device
# before the eager CPU runs below do one.
xla_module.xla_device()

ON_XLA = ("backend.device=xla", "backend.kernels=torch")
WARMUP_STEPS = 2  # step 1 creates the optimizer state, step 2 is the first steady-state step
PATTERNS = {
    "B": ("model=B_tiny", "model.num_hidden_layers=1"),
    "MW": ("model=MW_tiny", "trainer.grad_accum_steps=2"),
}
SSM = ("model=M_tiny", "model.num_hidden_layers=1")


def kept_in_fp32(name: str) -> bool:
    """Whether bf16 training keeps parameter ``name`` in fp32: an SSM's A_log, dt_bias or D, or a norm weight."""
    return name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D") or name.endswith("norm.weight")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(name, *overrides)`` trains the tiny recipe in its own folder and returns that folder."""
    root = tmp_path_factory.mktemp("xla")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in sentences(120, seed=0)))
    register_configs()

    def _run(name: str, *overrides: str) -> Path:
        with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
            config = compose("config", overrides=tiny_overrides(corpus, root / name) + list(overrides))
        train(config)
        return root / name

    return _run


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def executions() -> int:
    data = xla_metrics.metric_data("ExecuteTime")
    return int(data[0]) if data else 0


@pytest.fixture
def executions_per_step(monkeypatch) -> list[int]:
    """Graphs executed by each training step of the runs in the test."""
    counts: list[int] = []
    train_step = xla_module.XlaTrainer._train_step

    def counted(self):
        before = executions()
        result = train_step(self)
        xm.wait_device_ops()  # graphs run asynchronously: count each in the step that launched it
        counts.append(executions() - before)
        return result

    monkeypatch.setattr(xla_module.XlaTrainer, "_train_step", counted)
    return counts


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_training_on_xla_matches_eager_cpu_and_compiles_nothing_after_warmup(run, pattern, executions_per_step):
    eager = records(run(f"{pattern}_eager", *PATTERNS[pattern]))
    on_xla = records(run(f"{pattern}_xla", *PATTERNS[pattern], *ON_XLA))

    assert sorted(on_xla) == sorted(eager) == [1, 2, 3, 4, 5, 6]
    for step in eager:
        assert on_xla[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-4)
        assert on_xla[step]["aux_loss"] == pytest.approx(eager[step]["aux_loss"], abs=1e-4)
    compiled = [on_xla[step]["compiled_graphs"] for step in sorted(on_xla)]
    assert compiled[0] > 0
    assert len(set(compiled[WARMUP_STEPS - 1 :])) == 1, f"graphs compiled after warm-up: {compiled}"
    assert len(set(executions_per_step[WARMUP_STEPS:])) == 1, executions_per_step


@pytest.mark.parametrize("resume_on", ["cpu", "xla"])
def test_checkpoint_written_on_xla_resumes_on_eager_cpu_and_on_xla(run, resume_on):
    model = PATTERNS["B"]
    straight = records(run("B_eager_straight", *model))
    xla_dir = run(f"B_resumed_on_{resume_on}", *model, *ON_XLA, "trainer.steps_this_run=3")
    assert latest_checkpoint(xla_dir / CHECKPOINTS).name == "step_00000003"
    run(f"B_resumed_on_{resume_on}", *model, *(ON_XLA if resume_on == "xla" else ()))

    resumed = records(xla_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-4)


def test_a_step_of_an_ssm_runs_as_one_graph_in_bf16_with_stochastic_rounding(run, executions_per_step, monkeypatch):
    monkeypatch.delenv(xla_module.STOCHASTIC_ROUNDING_VARIABLE, raising=False)
    xla_metrics.clear_counters()
    run_dir = run("M_bf16", *SSM, "trainer.precision=bf16", *ON_XLA, "trainer.export_at_end=true")

    assert os.environ[xla_module.STOCHASTIC_ROUNDING_VARIABLE] == "1"
    assert xla_module.host_fallback_ops() == {}
    assert executions_per_step[WARMUP_STEPS:] == [1] * (6 - WARMUP_STEPS)  # nothing read back inside a step
    losses = [r["loss"] for r in records(run_dir).values()]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    weights = load_file(latest_checkpoint(run_dir / CHECKPOINTS) / "model.safetensors")
    is_bf16_value = {name: torch.equal(weight.to(torch.bfloat16).float(), weight) for name, weight in weights.items()}
    assert all(is_bf16 for name, is_bf16 in is_bf16_value.items() if not kept_in_fp32(name))  # trained in bf16
    assert not any(is_bf16 for name, is_bf16 in is_bf16_value.items() if kept_in_fp32(name))  # trained in fp32
    exported = load_file(run_dir / "export" / "model.safetensors")  # written from the host copy too
    shared = exported.keys() & weights.keys()  # the two files may keep different names of a tied weight
    assert len(shared) > 1 and all(torch.equal(exported[name], weights[name]) for name in shared)


def test_bf16_keeps_the_ssm_dynamics_and_norms_in_fp32_and_trains_a_bmojo_layer(run, monkeypatch):
    placed = []
    place_model = xla_module.XlaTrainer._place_model

    def recording(self, model):
        placed.append(place_model(self, model))
        return placed[-1]

    monkeypatch.setattr(xla_module.XlaTrainer, "_place_model", recording)
    xla_metrics.clear_counters()
    run_dir = run("B_bf16", *PATTERNS["B"], "trainer.precision=bf16", *ON_XLA)

    (model,) = placed
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert any(".mixer.ssm.A_log" in name for name in dtypes)  # the B layer's inner SSM
    assert {name for name, dtype in dtypes.items() if dtype == torch.float32} == set(filter(kept_in_fp32, dtypes))
    assert {dtype for name, dtype in dtypes.items() if not kept_in_fp32(name)} == {torch.bfloat16}
    assert xla_module.host_fallback_ops() == {}
    losses = [r["loss"] for r in records(run_dir).values()]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def poison_losses(monkeypatch, bad_calls: set[int] | None) -> None:
    """Make the training loss NaN on the given forward calls (all when None), without changing the graph."""
    forward = BmojoForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            bad = bad_calls is None or calls["n"] in bad_calls
            out.loss = out.loss * torch.tensor(float("nan") if bad else 1.0, device=out.loss.device)
        return out

    monkeypatch.setattr(BmojoForCausalLM, "forward", poisoned)


def test_non_finite_steps_on_xla_leave_the_weights_finite_and_are_counted(run, monkeypatch):
    poison_losses(monkeypatch, {2, 3})
    run_dir = run("M_nonfinite", *SSM, *ON_XLA)
    logged = records(run_dir)
    assert sorted(logged) == [1, 4, 5, 6]
    assert [logged[step]["skipped"] for step in (4, 5, 6)] == [2, 2, 2]
    weights = load_file(latest_checkpoint(run_dir / CHECKPOINTS) / "model.safetensors")
    assert all(torch.isfinite(weight).all() for weight in weights.values())


def test_too_many_non_finite_steps_in_a_row_on_xla_stop_the_run(run, monkeypatch):
    poison_losses(monkeypatch, None)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        run("M_diverged", *SSM, *ON_XLA, "trainer.max_nonfinite_in_a_row=3")


def test_a_step_of_a_bmojo_layer_runs_entirely_on_the_device(run):
    xla_metrics.clear_counters()
    run("B_device_only", *PATTERNS["B"], *ON_XLA, "trainer.max_steps=1")
    assert xla_module.host_fallback_ops() == {}


def test_a_neuron_parallel_compile_trial_run_writes_no_checkpoint_or_export(run, monkeypatch):
    monkeypatch.setenv(xla_module.TRIAL_RUN_VARIABLE, "1")
    run_dir = run("M_trial", *SSM, *ON_XLA, "trainer.export_at_end=true")
    assert latest_checkpoint(run_dir / CHECKPOINTS) is None
    assert not (run_dir / "export").exists()
    assert sorted(records(run_dir)) == [1, 2, 3, 4, 5, 6]  # it still ran every step, tracing every graph
