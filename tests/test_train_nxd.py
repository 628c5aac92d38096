"""bmojo-train on trn1 through the NxD engine, against recording stand-ins for ``neuronx_distributed`` and
``torch_xla``.

One process plays global rank 0 of a TP=2 run of the ``trn1_790m`` preset (sequence parallelism, ZeRO-1): the
stand-ins report 2 processes and 2 tensor-parallel ranks, and the host collectives run on a one-process gloo
group. Rank 0's vocabulary shard holds every byte token, so its local forward needs no collective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import sentences, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import fake_nxd  # noqa: E402

from bmojo.parallel.nxd_engine import NxDEngine  # noqa: E402
from bmojo.train import recipes_dir, register_configs  # noqa: E402
from bmojo.train.checkpoint import CHECKPOINTS, latest_checkpoint  # noqa: E402
from bmojo.train.distributed import select_trainer  # noqa: E402
from bmojo.train.metrics import read_metrics  # noqa: E402
from bmojo.train.nxd import NxDTrainer  # noqa: E402

VOCAB = 640  # rank 0 of 2 holds the first 320 entries: every byte token


@pytest.fixture
def fake(monkeypatch, tmp_path):
    recorder = fake_nxd.install(monkeypatch, tp_rank=0, tp_size=2)
    fake_nxd.install_torch_xla(monkeypatch, recorder, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield recorder
    dist.destroy_process_group()


def run(tmp_path: Path, steps: int) -> NxDTrainer:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(80, seed=0)))
    overrides = tiny_overrides(corpus, tmp_path / "run")
    overrides += [
        "backend=trn1",
        "backend.kernels=torch",
        "parallel=trn1_790m",
        f"model.vocab_size={VOCAB}",
        f"trainer.max_steps={steps}",
    ]
    register_configs()
    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        composed = compose("config", overrides=overrides)
    config = OmegaConf.to_object(composed)
    trainer_class = select_trainer(config)
    assert trainer_class is NxDTrainer
    trainer = trainer_class(config, tmp_path / "run")
    trainer.fit()
    return trainer


def test_trn1_recipe_trains_saves_and_resumes_through_nxd(fake, tmp_path):
    trainer = run(tmp_path, steps=2)
    assert isinstance(trainer.engine, NxDEngine)
    (config,) = fake.named("neuronx_distributed_config")
    assert config.kwargs["tensor_parallel_size"] == 2 and config.kwargs["pipeline_parallel_size"] == 1
    assert config.kwargs["sequence_parallel"] is True
    assert config.kwargs["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 1.0}
    layout = trainer.engine.layout
    assert (layout.data_parallel, layout.tensor_parallel, layout.sequence_parallel, layout.zero1) == (1, 2, True, True)
    (optimizer,) = fake.named("initialize_parallel_optimizer")
    assert type(trainer.optimizer).__name__ == "NxDOptimizer" and trainer.scheduler.optimizer is trainer.optimizer
    assert optimizer.kwargs["lr"] == trainer.config.optim.lr

    # Vocabulary-parallel logits [B, T-1, V/2] into NxD's cross-entropy: 2 training steps, and the evaluations
    # before and after training of trainer.eval_batches=2 micro-batches of 4.
    losses = fake.named("parallel_cross_entropy")
    assert [call.kwargs["shape"] for call in losses] == [(4, 63, VOCAB // 2)] * (2 + 2 * 2)
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in logged)
    # Read in step closures, after each step's graph cut.
    assert len(fake.named("add_step_closure")) == 2

    checkpoint = latest_checkpoint(tmp_path / "run" / CHECKPOINTS)
    assert checkpoint.name.endswith("00000002")
    (save,) = fake.named("save_checkpoint")
    assert save.kwargs["tag"] == "nxd" and save.kwargs["zero1_optimizer"] is True
    assert save.kwargs["optimizer"] is trainer.optimizer
    recorded = json.loads((checkpoint / "layout.json").read_text())
    assert recorded["engine"] == "nxd" and recorded["layout"]["tensor_parallel"] == 2
    assert (checkpoint / "nxd" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").is_file()
    assert (checkpoint / "trainer_state.pt").is_file()

    resumed = run(tmp_path, steps=3)
    # The weights before the optimizer: ZeRO-1 re-shards its master weights from the parameters on loading.
    model_load, optimizer_load = fake.named("load_checkpoint")
    for load in (model_load, optimizer_load):
        assert (load.kwargs["path"], load.kwargs["tag"]) == (str(checkpoint), "nxd")
    assert model_load.kwargs["model"] is resumed.engine.model and model_load.kwargs["optimizer"] is None
    assert optimizer_load.kwargs["model"] is None and optimizer_load.kwargs["optimizer"] is resumed.optimizer
    assert resumed.step == 3 and resumed.scheduler.last_epoch == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    assert latest_checkpoint(tmp_path / "run" / CHECKPOINTS).name.endswith("00000003")
