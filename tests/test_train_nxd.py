"""bmojo-train on trn1 through the NxD engine: two processes of a TP=2 run of the ``trn1_790m`` preset
(sequence parallelism, ZeRO-1) on the real neuronx-distributed in its CPU mode (gloo).

NxD's layers, collectives, gradient clipping and cross-entropy are real; its trainer API and the torch-xla calls
of the XLA trainer are the stand-ins of ``tests/parallel/fake_nxd.py``, which say what they leave out (the XLA
lane, ``tests/test_xla_nxd.py``, runs the real ones at TP=1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import sentences, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import fake_nxd  # noqa: E402
import harness  # noqa: E402
import real_nxd  # noqa: E402

from bmojo.parallel.convert import full_model_state  # noqa: E402
from bmojo.train import recipes_dir, register_configs  # noqa: E402
from bmojo.train.checkpoint import CHECKPOINTS, latest_checkpoint  # noqa: E402
from bmojo.train.distributed import select_trainer  # noqa: E402
from bmojo.train.metrics import read_metrics  # noqa: E402
from bmojo.train.trainer import build_model  # noqa: E402

VOCAB = 640  # divisible by the tensor-parallel size


def _config(root: Path, steps: int):
    overrides = tiny_overrides(root / "corpus.jsonl", root / "run")
    overrides += [
        "backend=trn1",
        "backend.kernels=torch",
        "parallel=trn1_790m",
        f"model.vocab_size={VOCAB}",
        f"trainer.max_steps={steps}",
    ]
    register_configs()
    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _fit(root: Path, steps: int):
    """(trainer, recorder, shapes of the logits parallel_cross_entropy received) of one bmojo-train run."""
    from bmojo.parallel import nxd_loss
    from bmojo.train.nxd import NxDTrainer

    with pytest.MonkeyPatch.context() as patch:
        recorder = fake_nxd.install(patch)
        fake_nxd.install_torch_xla(patch, recorder)
        shapes = []
        real_cross_entropy = nxd_loss.parallel_cross_entropy

        def recording_cross_entropy(logits, targets):
            shapes.append(tuple(logits.shape))
            return real_cross_entropy(logits, targets)

        patch.setattr(nxd_loss, "parallel_cross_entropy", recording_cross_entropy)
        config = _config(root, steps)
        trainer_class = select_trainer(config)
        assert trainer_class is NxDTrainer
        trainer = trainer_class(config, root / "run")
        trainer.fit()
    return trainer, recorder, shapes


def train_save_and_resume(folder: str) -> None:
    """On each of 2 ranks: 2 steps with a checkpoint, then a resumed run to step 3; rank 0 checks the records."""
    from bmojo.parallel.nxd_engine import NxDEngine

    real_nxd.load()
    root = Path(folder)
    os.environ["WORLD_SIZE"] = str(dist.get_world_size())
    trainer, recorder, shapes = _fit(root, steps=2)
    checkpoint = latest_checkpoint(root / "run" / CHECKPOINTS)
    resumed, resumed_recorder, _ = _fit(root, steps=3)
    if dist.get_rank() != 0:
        return

    assert isinstance(trainer.engine, NxDEngine)
    (config,) = recorder.named("neuronx_distributed_config")
    assert config.kwargs["tensor_parallel_size"] == 2 and config.kwargs["pipeline_parallel_size"] == 1
    assert config.kwargs["sequence_parallel"] is True
    assert config.kwargs["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 1.0}
    layout = trainer.engine.layout
    assert (layout.data_parallel, layout.tensor_parallel, layout.sequence_parallel, layout.zero1) == (1, 2, True, True)
    (optimizer,) = recorder.named("initialize_parallel_optimizer")
    assert type(trainer.optimizer).__name__ == "NxDOptimizer" and trainer.scheduler.optimizer is trainer.optimizer
    assert optimizer.kwargs["lr"] == trainer.config.optim.lr
    assert optimizer.kwargs["max_norm"] == 1.0  # ZeRO-1 clips at its own max_norm, not optimizer_config's

    # Vocabulary-parallel logits [B, T-1, V/2] into NxD's cross-entropy: 2 training steps, and the evaluations
    # before and after training of trainer.eval_batches=2 micro-batches of 4.
    assert shapes == [(4, 63, VOCAB // 2)] * (2 + 2 * 2)
    logged = [r for r in read_metrics(root / "run") if "loss" in r]
    assert [r["step"] for r in logged[:2]] == [1, 2]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in logged)
    # Read in step closures, after each step's graph cut.
    assert len(recorder.named("add_step_closure")) == 2

    assert checkpoint.name.endswith("00000002")
    (save,) = recorder.named("save_checkpoint")
    assert save.kwargs["tag"] == "nxd" and save.kwargs["zero1_optimizer"] is True
    assert save.kwargs["optimizer"] is trainer.optimizer
    recorded = json.loads((checkpoint / "layout.json").read_text())
    assert recorded["engine"] == "nxd" and recorded["layout"]["tensor_parallel"] == 2
    for tp_rank in (0, 1):
        assert (checkpoint / "nxd" / "model" / f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_00.pt").is_file()
    assert (checkpoint / "trainer_state.pt").is_file()
    # Both ranks' shards merge into the whole model from the layout record, and this rank's share of it is what
    # it trained.
    merged = full_model_state(checkpoint)
    build_model(trainer.config.model, trainer.tokenizer).load_state_dict(merged)
    for name, param in trainer.engine.named_parameters():
        assert torch.equal(trainer.engine.plan.spec(name).local(merged[name], 0, 2), param.detach()), name

    # The weights before the optimizer: ZeRO-1 re-shards its master weights from the parameters on loading.
    model_load, optimizer_load = resumed_recorder.named("load_checkpoint")
    for load in (model_load, optimizer_load):
        assert (load.kwargs["path"], load.kwargs["tag"]) == (str(checkpoint), "nxd")
    assert model_load.kwargs["model"] is resumed.engine.model and model_load.kwargs["optimizer"] is None
    assert optimizer_load.kwargs["model"] is None and optimizer_load.kwargs["optimizer"] is resumed.optimizer
    assert resumed.step == 3 and resumed.scheduler.last_epoch == 3
    assert [r["step"] for r in read_metrics(root / "run") if "loss" in r] == [1, 2, 3]
    assert latest_checkpoint(root / "run" / CHECKPOINTS).name.endswith("00000003")


def test_trn1_recipe_trains_saves_and_resumes_through_nxd(tmp_path):
    real_nxd.require()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(80, seed=0)))
    harness.launch(2, train_save_and_resume, folder=str(tmp_path))
