"""Trainer behaviour: exact resume, interrupted checkpoints, signals, non-finite steps, fine-tuning."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bmojo import BmojoForCausalLM
from bmojo.train import CheckpointError, NonFiniteLossError, export_model, train
from bmojo.train import checkpoint as checkpoint_module
from bmojo.train.checkpoint import CHECKPOINTS, LATEST, latest_checkpoint, step_folders
from bmojo.train.metrics import read_metrics
from bmojo.train.trainer import compile_blocks


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def final_state(run_dir: Path) -> tuple[dict, dict]:
    folder = latest_checkpoint(run_dir / CHECKPOINTS)
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors"), torch.load(folder / "optimizer.pt", weights_only=True)


def assert_same_tree(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_stop_and_resume_equals_uninterrupted_run_bit_for_bit(tiny_config, tmp_path):
    overrides = ("trainer.max_steps=7", "trainer.grad_accum_steps=2", "trainer.eval_every=3")
    straight = train(tiny_config(*overrides, run="straight"))
    first = train(tiny_config(*overrides, "trainer.steps_this_run=4", run="resumed"))
    assert first.stopped_early and first.step == 4
    second = train(tiny_config(*overrides, run="resumed"))
    assert second.step == straight.step == 7 and second.initial_val_loss is None

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 7
    weights_a, optimizer_a = final_state(tmp_path / "straight")
    weights_b, optimizer_b = final_state(tmp_path / "resumed")
    assert_same_tree(weights_a, weights_b)
    assert_same_tree(optimizer_a, optimizer_b)
    assert second.final_val_loss == straight.final_val_loss


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_config, tmp_path, monkeypatch):
    write_files = checkpoint_module._write_files

    def dies_at_step_4(folder, model, tokenizer, state, config_yaml):
        if state.trainer["step"] == 4:
            (folder / "model.safetensors").write_bytes(b"half a file")
            raise SystemExit("killed")
        write_files(folder, model, tokenizer, state, config_yaml)

    monkeypatch.setattr(checkpoint_module, "_write_files", dies_at_step_4)
    with pytest.raises(SystemExit):
        train(tiny_config("trainer.checkpoint_every=2"))
    root = tmp_path / "run" / CHECKPOINTS
    assert (root / LATEST).read_text().strip() == "step_00000002"
    assert (root / ".step_00000004.tmp").exists()

    monkeypatch.setattr(checkpoint_module, "_write_files", write_files)
    resumed = train(tiny_config("trainer.checkpoint_every=2"))
    assert resumed.step == 6 and resumed.initial_val_loss is None
    assert not (root / ".step_00000004.tmp").exists()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the killed run were replaced


def test_keep_last_prunes_old_checkpoints(tiny_config, tmp_path):
    train(tiny_config("trainer.checkpoint_every=1", "trainer.keep_last=2"))
    names = [p.name for p in step_folders(tmp_path / "run" / CHECKPOINTS)]
    assert names == ["step_00000005", "step_00000006"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_config, tmp_path, monkeypatch):
    forward = BmojoForCausalLM.forward
    calls = {"n": 0}

    def forward_then_sigterm(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and self.training:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BmojoForCausalLM, "forward", forward_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    summary = train(tiny_config())
    assert summary.stopped_early and 0 < summary.step < 6
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS).name == f"step_{summary.step:08d}"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the caller's handler is back


def _poison_steps(monkeypatch, bad_calls: set[int] | None):
    """Make the training loss NaN on the given forward calls (all of them when None)."""
    forward = BmojoForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BmojoForCausalLM, "forward", poisoned)


def test_non_finite_steps_are_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {2, 3})
    summary = train(tiny_config())
    assert summary.step == 6 and summary.skipped_steps == 2
    assert sorted(losses(tmp_path / "run")) == [1, 4, 5, 6]
    last = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-1]
    assert last["skipped"] == 2


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tiny_config, monkeypatch):
    _poison_steps(monkeypatch, None)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(tiny_config("trainer.max_nonfinite_in_a_row=3"))


def test_resume_never_refuses_a_folder_with_checkpoints(tiny_config):
    train(tiny_config("trainer.max_steps=2"))
    with pytest.raises(CheckpointError, match="resume=never"):
        train(tiny_config("trainer.resume=never"))


def test_bf16_autocast_trains(tiny_config):
    summary = train(tiny_config("model=B_tiny", "trainer.precision=bf16", "trainer.max_steps=2"))
    assert summary.skipped_steps == 0 and torch.isfinite(torch.tensor(summary.final_val_loss))


def test_fine_tuning_an_exported_model_lowers_its_loss_on_a_jsonl_corpus(tiny_config, tmp_path):
    base = train(tiny_config("trainer.max_steps=2", run="base"))
    from bmojo.train import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base.checkpoint)
    exported = export_model(model, tokenizer, tmp_path / "exported")
    tuned = train(
        tiny_config(
            f"trainer.init_from={exported}",
            "trainer.max_steps=25",
            "optim.lr=3e-3",
            "optim.warmup_steps=3",
            run="tuned",
        )
    )
    assert tuned.initial_val_loss == pytest.approx(base.final_val_loss, rel=1e-5)  # it started from the export
    assert tuned.final_val_loss < tuned.initial_val_loss - 0.3


def test_compiled_blocks_train_like_eager_ones(tiny_config, tmp_path):
    overrides = ("model=B_tiny", "trainer.max_steps=3", "trainer.eval_every=3")
    eager = train(tiny_config(*overrides, run="eager"))
    compiled = train(tiny_config(*overrides, "trainer.compile_blocks=true", run="compiled"))
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager_losses.keys() == compiled_losses.keys() and len(eager_losses) == 3
    # Inductor fuses and reorders fp32 arithmetic: the same steps to rounding, not bit for bit.
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-4)
    weights_eager, _ = final_state(tmp_path / "eager")
    weights_compiled, _ = final_state(tmp_path / "compiled")
    assert weights_eager.keys() == weights_compiled.keys()  # compiled in place: the same parameter names


def test_compiled_blocks_take_new_shapes():
    # Training then evaluating (or a last, shorter batch) shows the compiled blocks other shapes.
    import test_model

    config = test_model.tiny_config("BB")
    model, reference = test_model.build(config), test_model.build(config)
    compile_blocks(model)
    model.train()
    reference.train()
    for batch, length in ((2, 24), (3, 37)):
        ids = torch.randint(0, test_model.VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
        compiled, eager = model(ids, labels=ids), reference(ids, labels=ids)
        compiled.loss.backward()  # the backward is compiled too
        torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-4)


def test_parallel_training_refuses_compiled_blocks(tiny_config, tmp_path):
    from bmojo.train.distributed import ParallelTrainer

    config = OmegaConf.to_object(tiny_config("trainer.compile_blocks=true"))
    with pytest.raises(ValueError, match="parallel training does not compile blocks"):
        ParallelTrainer(config, tmp_path / "parallel")._setup()
