"""bmojo-train on two CPU processes (torchrun, gloo) against one process, and the launch checks around it.

The tiny recipe of ``conftest.tiny_overrides`` (B'MOJO-tiny, one B/C group shared by both tensor-parallel ranks)
runs 3 steps with a global batch of 4 sequences: on one process, data-parallel over 2 (2 sequences each) and
tensor-parallel over 2. The torchrun runs are shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import sentences, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from parallel import harness
from transformers import AutoModelForCausalLM

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.cli.prepare import main as prepare_main
from bmojo.parallel.checkpoint import describe_layout, shard_file
from bmojo.parallel.convert import full_model_state
from bmojo.parallel.layout import Layout
from bmojo.parallel.plan import bmojo_plan
from bmojo.parallel.torch_engine import TorchEngine
from bmojo.train import CheckpointError, recipes_dir, register_configs, train
from bmojo.train.checkpoint import CHECKPOINTS, latest_checkpoint, load_model_and_tokenizer, load_training_state
from bmojo.train.distributed import ParallelTrainer
from bmojo.train.metrics import read_metrics

STEPS = ("trainer.max_steps=3",)
# Losses and gradient norms of two processes agree with one process to rounding (measured: below 1e-6).
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 180


def launch(root: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m bmojo.cli.train`` of the tiny recipe in ``root/name``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "bmojo.cli.train", *tiny_overrides(root / "corpus.jsonl", root / name), *STEPS, *overrides]
    # One thread a process: two processes share the test machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def records(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def assert_same_run(run: Path, reference: Path, tolerance: float) -> None:
    for key in ("loss", "aux_loss", "grad_norm", "val_loss"):
        got, expected = records(run, key), records(reference, key)
        assert got.keys() == expected.keys() and len(got) >= 2, key
        for step, value in expected.items():
            assert abs(got[step] - value) <= tolerance, f"{key} at step {step}: {got[step]} vs {value}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parallel_runs")
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(120, seed=0)))
    return folder


def compose_tiny(root: Path, name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        return compose("config", overrides=tiny_overrides(root / "corpus.jsonl", root / name) + [*STEPS, *overrides])


@pytest.fixture(scope="module")
def one_process(root) -> Path:
    train(compose_tiny(root, "one_process", "trainer.export_at_end=true"))
    return root / "one_process"


@pytest.fixture(scope="module")
def tensor_parallel(root) -> tuple[Path, subprocess.CompletedProcess]:
    result = launch(root, "tp", "parallel=tp", "trainer.export_at_end=true", "trainer.sample_tokens=4")
    return root / "tp", result


@pytest.fixture(scope="module")
def data_parallel(root) -> tuple[Path, subprocess.CompletedProcess]:
    result = launch(root, "dp", "parallel=dp", "trainer.micro_batch_size=2")
    return root / "dp", result


@pytest.mark.distributed
def test_data_parallel_run_equals_one_process_with_the_same_global_batch(root, one_process, data_parallel):
    _, result = data_parallel
    assert_same_run(root / "dp", one_process, TOLERANCE)
    assert result.stdout.count("run folder:") == 1  # process 0 alone reports
    assert records(root / "dp", "tokens") == records(one_process, "tokens")


@pytest.mark.distributed
def test_processes_tokenize_once_and_a_prepared_folder_resumes_exactly(root, data_parallel):
    """Process 0 prepared the straight run's shards in its run folder (the in-memory blocks: that run equals one
    process); a run on a bmojo-prepare folder, stopped and resumed, is that run bit for bit, and tokenizes nothing."""
    straight, _ = data_parallel
    assert (straight / "prepared" / "manifest.json").is_file()
    folder = root / "shards"
    overrides = [*tiny_overrides(root / "corpus.jsonl", root / "unused"), *STEPS, f"data.prepared={folder}"]
    prepare_main(["--quiet", "--shard-documents", "1000", *overrides])
    reading = ("parallel=dp", "trainer.micro_batch_size=2", f"data.prepared={folder}")
    assert "stopped at step 2" in launch(root, "dp_prepared", *reading, "trainer.steps_this_run=2").stdout
    launch(root, "dp_prepared", *reading)
    resumed = root / "dp_prepared"
    for key in ("loss", "aux_loss", "grad_norm", "tokens"):
        assert records(resumed, key) == records(straight, key), key
    assert records(resumed, "val_loss")[3] == records(straight, "val_loss")[3]
    assert not (resumed / "prepared").exists()


@pytest.mark.distributed
def test_tensor_parallel_run_equals_one_process(tensor_parallel, one_process):
    run_dir, result = tensor_parallel
    assert_same_run(run_dir, one_process, TOLERANCE)
    assert result.stdout.count("sample:") == 1
    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS)
    assert sorted(p.name for p in checkpoint.glob("tp_rank_*")) == [
        "tp_rank_00_pp_rank_00.pt",
        "tp_rank_01_pp_rank_00.pt",
    ]


@pytest.mark.distributed
def test_tensor_parallel_export_holds_the_whole_trained_model(tensor_parallel, one_process):
    run_dir, _ = tensor_parallel
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"))
    reference = AutoModelForCausalLM.from_pretrained(str(one_process / "export"))
    ours, theirs = exported.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    # AdamW turns rounding differences of near-zero gradients into larger weight differences (measured: 3e-6).
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-4
    # bmojo-eval, generation and trainer.init_from read the sharded checkpoint whole, as the export holds it.
    loaded, _ = load_model_and_tokenizer(run_dir)
    assert all(torch.equal(tensor, ours[name]) for name, tensor in loaded.state_dict().items())


@pytest.mark.distributed
def test_tensor_parallel_stop_and_resume_equals_the_straight_run(root, tensor_parallel):
    straight, _ = tensor_parallel
    first = launch(root, "tp_resumed", "parallel=tp", "trainer.steps_this_run=2")
    assert "stopped at step 2" in first.stdout
    launch(root, "tp_resumed", "parallel=tp", "trainer.export_at_end=true", "trainer.sample_tokens=4")
    resumed = root / "tp_resumed"
    for key in ("loss", "aux_loss", "grad_norm"):
        assert records(resumed, key) == records(straight, key)
    assert records(resumed, "val_loss")[3] == records(straight, "val_loss")[3]
    ends = [latest_checkpoint(run / CHECKPOINTS) for run in (straight, resumed)]
    for rank in range(2):
        a, b = (torch.load(shard_file(end, rank, 0), weights_only=True) for end in ends)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        for name, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in state.items() if torch.is_tensor(v))


def test_a_tensor_parallel_recipe_started_as_one_process_says_to_use_torchrun(root):
    with pytest.raises(ValueError, match=r"needs at least 2 processes.*torchrun --standalone --nproc_per_node 2"):
        train(compose_tiny(root, "alone", "parallel=tp"))


def test_several_processes_of_a_one_process_recipe_are_refused(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes were started .* parallel=single trains in one"):
        train(compose_tiny(root, "twice", "parallel=single"))


def test_a_parallel_trn1_recipe_started_as_one_process_says_to_use_torchrun(root):
    with pytest.raises(ValueError, match=r"needs at least 2 processes.*torchrun --standalone --nproc_per_node 2"):
        train(compose_tiny(root, "trn1", "backend=trn1", "parallel=tp"))


def test_several_processes_on_xla_need_the_nxd_engine_and_nxd_needs_xla(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for overrides in (("backend=trn1", "backend.engine=torch"), ("backend=cpu", "backend.engine=nxd")):
        with pytest.raises(ValueError, match=r"several processes train on trn1 through the NxD engine"):
            train(compose_tiny(root, "mismatch", "parallel=tp", *overrides))


@pytest.mark.distributed
def test_one_process_does_not_resume_a_sharded_checkpoint(tensor_parallel):
    sharded = latest_checkpoint(tensor_parallel[0] / CHECKPOINTS)
    with pytest.raises(CheckpointError, match="several processes.*torchrun.*trainer.init_from="):
        load_training_state(sharded, BmojoForCausalLM(BmojoConfig.from_json_file(str(sharded / "model_config.json"))))


def test_shards_of_ssm_groups_shared_by_ranks_merge_back_whole(tmp_path):
    """One B/C group for two ranks: both keep it whole, and the merge takes it once (layout.json records it)."""
    torch.manual_seed(0)
    model = BmojoForCausalLM(BmojoConfig(vocab_size=64, hidden_size=32, layer_pattern="B", ssm_num_groups=1))
    plan = bmojo_plan(model)
    writer = SimpleNamespace(layout=Layout(tensor_parallel=2), plan=plan)
    (tmp_path / "layout.json").write_text(json.dumps(describe_layout(writer)))
    whole = dict(model.named_parameters())
    for rank in range(2):
        shard = {name: plan.spec(name).local(param.detach(), rank, 2) for name, param in whole.items()}
        torch.save({"model": shard}, shard_file(tmp_path, rank, 0))
    merged = full_model_state(tmp_path)
    assert merged.keys() == whole.keys()
    assert all(torch.equal(merged[name], param) for name, param in whole.items())
    in_proj = next(name for name in whole if name.endswith("in_proj.weight"))
    assert plan.spec(in_proj).shared_rows(2)  # the case this test is about


def _signal_reaches_every_process(config) -> None:
    """Rank 1 alone is signalled; after the step both ranks know to stop, so they leave the loop together."""
    trainer = ParallelTrainer(config, Path("unused"))
    trainer.device, trainer.is_main, trainer._pending_signal = torch.device("cpu"), dist.get_rank() == 0, None
    trainer._agree_on_stop()
    assert trainer._stop_signal is None
    if dist.get_rank() == 1:
        trainer._request_stop(signal.SIGTERM, None)
    trainer._agree_on_stop()
    expected = "SIGTERM" if dist.get_rank() == 1 else "a signal to another process"
    assert trainer._stop_signal == expected


@pytest.mark.distributed
def test_a_signal_to_one_process_stops_all_of_them_after_the_step(root):
    harness.launch(2, _signal_reaches_every_process, config=OmegaConf.to_object(compose_tiny(root, "signal")))


def _resume_under_another_layout(config) -> None:
    trainer = ParallelTrainer(config, Path(config.run_dir))
    with pytest.raises(CheckpointError, match="tensor_parallel=2.*this run has.*tensor_parallel=1.*trainer.init_from="):
        trainer._setup()


@pytest.mark.distributed
def test_a_run_resumes_only_under_the_layout_that_wrote_it(root, tensor_parallel):
    config = compose_tiny(root, tensor_parallel[0].name, "parallel=dp", "trainer.micro_batch_size=2")
    harness.launch(2, _resume_under_another_layout, config=OmegaConf.to_object(config))


def _masked_labels_reach_the_loss(layout_fields: dict) -> None:
    layout = Layout(**layout_fields)
    model = harness.tiny_model("B")
    reference = harness.clone_model(model).eval()
    batches = harness.step_batches(0, layout.microbatches, batch=2)
    labels = batches.clone()
    labels[..., ::2] = -100  # a synthetic task's labels: only some positions are targets
    with torch.no_grad():
        outputs = [reference(micro, labels=micro_labels) for micro, micro_labels in zip(batches, labels, strict=True)]
    expected = sum(float(out.loss - out.aux_loss) for out in outputs) / len(outputs)
    engine = TorchEngine(layout)
    engine.parallelize(model)
    assert abs(engine.eval_step(batches, labels).lm_loss - expected) <= TOLERANCE
    assert abs(engine.eval_step(batches).lm_loss - expected) > 100 * TOLERANCE  # the mask changes the loss


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout", [dict(tensor_parallel=2), dict(pipeline_parallel=2, microbatches=2)], ids=["tp2", "pp2"]
)
def test_the_engine_takes_labels_that_mask_positions(layout):
    harness.launch(2, _masked_labels_reach_the_loss, layout_fields=layout)
