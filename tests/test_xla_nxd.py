"""The NxD engine and trainer on the real neuronx-distributed and torch-xla (the XLA lane, `make test-xla`).

One process on torch-xla's CPU device, tensor-parallel size 1, through NxD's own trainer API
(``neuronx_distributed_config``, ``initialize_parallel_model``, ``initialize_parallel_optimizer``,
``save_checkpoint`` / ``load_checkpoint``) and torch-xla's ``ZeroRedundancyOptimizer`` under NxD's
``NeuronZero1Optimizer``. NxD's Python comes from ``BMOJO_NXD_SOURCE`` (CI: the NxD 0.17 source beside the
checkout) or the installed package; the stand-ins for compiled Neuron modules are in ``tests/parallel/real_nxd.py``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_xla", reason="the XLA lane runs in its own environment: make test-xla")
# As in test_xla_training: set before torch-xla starts its runtime (cheaper XLA:CPU code generation).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch.distributed as dist  # noqa: E402
from conftest import sentences, tiny_overrides  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import real_nxd  # noqa: E402

from bmojo import BmojoConfig, BmojoForCausalLM  # noqa: E402
from bmojo.model.modeling import BmojoBlock  # noqa: E402
from bmojo.parallel import Layout, bmojo_plan  # noqa: E402
from bmojo.parallel.convert import full_model_state  # noqa: E402
from bmojo.parallel.nxd_engine import _model_name  # noqa: E402
from bmojo.train import recipes_dir, register_configs  # noqa: E402
from bmojo.train import xla as xla_module  # noqa: E402
from bmojo.train.checkpoint import CHECKPOINTS, latest_checkpoint  # noqa: E402
from bmojo.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.xla
# The autograd engine sizes its device queues at the first backward of the process (docs/trn1.md).
xla_module.xla_device()

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    layer_pattern="M",
    ssm_state_size=8,
    ssm_head_dim=8,
    ssm_chunk_size=16,
    tie_word_embeddings=False,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def xla_world():
    """One process in an ``xla`` process group (torchrun's variables for a world of 1), NxD on its XLA path."""
    real_nxd.require()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
            patch.setenv(name, value)
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(_free_port()))
        patch.setenv("NXD_CPU_MODE", "0")
        patch.setenv("HOST_WORLD_SIZE", "1")
        real_nxd.load(cpu_mode=False)
        importlib.import_module("torch_xla.distributed.xla_backend")  # registers the "xla" backend
        dist.init_process_group("xla")
        yield
        dist.destroy_process_group()


def _step_tokens(seed: int) -> torch.Tensor:
    """One optimizer step of token ids: [microbatches=1, B=2, T=16]."""
    return torch.randint(0, CONFIG["vocab_size"], (1, 2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("zero1", [False, True], ids=["NxDOptimizer", "NeuronZero1Optimizer"])
def test_nxd_optimizer_clips_at_the_configured_max_grad_norm(xla_world, zero1):
    # Plain SGD at lr=1 moves the weights by exactly the clipped gradient. Under ZeRO-1 this fails where the
    # engine does not hand max_grad_norm to the ZeRO optimizer (it would clip at torch-xla's default of 1).
    from bmojo.parallel.nxd_engine import NxDEngine

    max_grad_norm = 0.25
    engine = NxDEngine(Layout(zero1=zero1), max_grad_norm=max_grad_norm)
    engine.build(BmojoConfig(**CONFIG))
    params = [param for _, param in engine.named_parameters()]
    optimizer = engine.build_optimizer(torch.optim.SGD, params, lr=1.0)
    assert type(optimizer.optimizer).__name__ == ("NeuronZero1Optimizer" if zero1 else "SGD")
    before = [param.detach().cpu().clone() for param in params]
    engine.train_step(_step_tokens(0))
    optimizer.step()
    xla_module.sync()
    steps = [start - param.detach().cpu() for start, param in zip(before, params, strict=True)]
    moved = math.sqrt(sum(float(step.double().pow(2).sum()) for step in steps))
    norm_before_clipping = float(optimizer.grad_norm)
    assert norm_before_clipping > 2 * max_grad_norm  # the clipping is what bounds the step
    assert moved == pytest.approx(max_grad_norm, rel=1e-4)


def _run(root: Path, name: str, *overrides: str):
    """Train the tiny ``B`` recipe with ``parallel=trn1_370m`` (tp=1, ZeRO-1, block checkpointing) through
    :class:`~bmojo.train.nxd.NxDTrainer` into ``root/name``; returns the trainer."""
    from bmojo.train.nxd import NxDTrainer

    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(80, seed=0)))
    extra = ["backend=trn1", "backend.kernels=torch", "parallel=trn1_370m", "model.num_hidden_layers=1"]
    register_configs()
    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        composed = compose("config", overrides=tiny_overrides(corpus, root / name) + extra + list(overrides))
    trainer = NxDTrainer(OmegaConf.to_object(composed), root / name)
    trainer.fit()
    return trainer


def _records(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in read_metrics(run_dir) if "loss" in record}


def _poison_gradients_on(monkeypatch, bad_calls: set[int]) -> None:
    """Make every gradient NaN on the given training forward calls, the loss staying finite: the logits pass
    through an identity whose backward multiplies by NaN (by 1 otherwise, so the graph does not change)."""
    from bmojo.parallel import nxd_loss

    class ScaleGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(factor)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            (factor,) = ctx.saved_tensors
            return grad * factor, None

    forward = nxd_loss.VocabParallelLMLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, labels):
        if self.training:
            calls["n"] += 1
            factor = torch.tensor(float("nan") if calls["n"] in bad_calls else 1.0, device=logits.device)
            logits = ScaleGradient.apply(logits, factor)
        return forward(self, logits, labels)

    monkeypatch.setattr(nxd_loss.VocabParallelLMLoss, "forward", poisoned)


def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted(xla_world, tmp_path, monkeypatch):
    # ZeRO-1 moves the gradients into main_grad (grad is None after backward): this fails where the finiteness
    # check reads only grad, since the loss itself stays finite.
    _poison_gradients_on(monkeypatch, {2})
    trainer = _run(tmp_path, "nonfinite", "trainer.max_steps=4")
    assert type(trainer.optimizer).__name__ == "NxDOptimizer" and trainer.scheduler.optimizer is trainer.optimizer
    assert type(trainer.optimizer.optimizer).__name__ == "NeuronZero1Optimizer"
    settings = trainer.engine.nxd_config
    assert settings["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 1.0}
    assert settings["mixed_precision_config"]["use_fp32_grad_acc"] is True  # gradients in main_grad
    assert settings["activation_checkpoint_config"] is BmojoBlock
    logged = _records(tmp_path / "nonfinite")
    assert sorted(logged) == [1, 3, 4]  # a skipped step logs no loss
    assert [logged[step]["skipped"] for step in (1, 3, 4)] == [0, 1, 1]
    assert all(math.isfinite(logged[step]["loss"]) for step in logged)
    assert all(bool(torch.isfinite(param.detach().cpu()).all()) for _, param in trainer.engine.named_parameters())


def test_save_resume_and_more_steps_equal_an_uninterrupted_run(xla_world, tmp_path):
    # NxD's load_checkpoint loads the optimizer before the model, and ZeRO-1 then re-shards its master weights
    # from the freshly built parameters: this fails where the engine lets NxD load both in one call.
    straight = _run(tmp_path, "straight", "trainer.max_steps=4")
    _run(tmp_path, "resumed", "trainer.max_steps=4", "trainer.steps_this_run=2")
    resumed = _run(tmp_path, "resumed", "trainer.max_steps=4")
    assert resumed.step == 4
    expected, actual = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert actual[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
        assert actual[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step
    weights = dict(straight.engine.named_parameters())
    for name, param in resumed.engine.named_parameters():
        assert torch.allclose(param.detach().cpu(), weights[name].detach().cpu(), atol=1e-6), name
    assert resumed.scheduler.last_epoch == 4
    # NxD's own checkpoint files merge into the model from the layout record (one rank: the whole weights).
    checkpoint = latest_checkpoint(tmp_path / "resumed" / CHECKPOINTS)
    assert checkpoint.name.endswith("00000004")
    assert json.loads((checkpoint / "layout.json").read_text())["engine"] == "nxd"
    merged = full_model_state(checkpoint)
    for name, param in resumed.engine.named_parameters():
        assert torch.equal(merged[_model_name(name)], param.detach().cpu()), name


def test_nxds_pipeline_tracer_keeps_the_blocks_and_parallel_cross_entropy_whole(xla_world):
    # NxD's tracer wraps parallel_cross_entropy as one graph node only where the traced forward reads it as a
    # global name: this fails where the loss binds it anywhere else (an attribute, a functools.partial), since
    # the tracer then traces into it, collectives and in-place updates included.
    from bmojo.parallel.nxd_engine import NxDEngine, build_parallel_model

    config = BmojoConfig(**{**CONFIG, "num_hidden_layers": 2, "layer_pattern": "MW"})
    # The engine imports NxD (and registers the HFTracer placeholder pipeline/trace.py imports).
    engine = NxDEngine(Layout(tensor_parallel=1, pipeline_parallel=2, microbatches=2))
    from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy
    from neuronx_distributed.pipeline import NxDPPModel
    from neuronx_distributed.pipeline.trace import trace_model

    with torch.device("meta"):
        plan = bmojo_plan(BmojoForCausalLM(config))
    settings = engine._pipeline_config(plan)
    if not engine.api.state.model_parallel_is_initialized():
        engine.api.state.initialize_model_parallel(tensor_model_parallel_size=1)
    model = build_parallel_model(engine.api, plan, config, None, sequence_parallel=False)
    # What NxDPPModel.trace hands trace_model: the configured leaf modules and the pipeline unit.
    traced = trace_model(
        model,
        input_names=settings["input_names"],
        tracer_cls=settings["tracer_cls"],
        leaf_modules=[*settings["leaf_module_cls"], settings["transformer_layer_cls"].__name__],
    )
    assert settings["transformer_layer_cls"] is BmojoBlock
    assert settings["pipeline_cuts"] == ["model.layers.0"] and settings["num_microbatches"] == 2
    assert settings["input_names"] == ["input_ids", "labels"] and settings["output_loss_value_spec"] == (True, False)
    assert settings["use_zero1_optimizer"] is False
    assert settings["broadcast_and_average_loss"] is True and settings["return_loss_on_cpu"] is False
    assert set(settings["leaf_module_cls"]) == {"RMSNorm", "RotaryEmbedding"}
    # NxDPPModel takes every one of them (its runtime needs a process per stage).
    inspect.signature(NxDPPModel).bind(model, **settings)
    blocks = [name for name, module in model.named_modules() if isinstance(module, BmojoBlock)]
    assert len(blocks) == 2
    called = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert [name for name in called if name in blocks] == blocks  # each block one node, not traced into
    assert not any(name.startswith(f"{block}.") for name in called for block in blocks)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert calls.count(parallel_cross_entropy) == 1
    # The traced model computes what the model does.
    device = xla_module.xla_device()
    model.to(device)
    traced.to(device)
    tokens = _step_tokens(1)[0].to(device)
    with torch.no_grad():
        expected, actual = model(tokens, tokens), traced(tokens, tokens)
    for want, got in zip(expected, actual, strict=True):
        assert float(got) == pytest.approx(float(want), abs=1e-6)
