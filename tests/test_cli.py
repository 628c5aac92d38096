"""Console scripts end to end: errors on the command line, multirun sweeps, export, generate, eval."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bmojo.cli import eval as eval_cli
from bmojo.cli import export as export_cli
from bmojo.cli import generate as generate_cli
from bmojo.train import load_model_and_tokenizer, train

TRAIN_SCRIPT = Path(sys.executable).parent / "bmojo-train"


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [str(TRAIN_SCRIPT)] if TRAIN_SCRIPT.exists() else [sys.executable, "-m", "bmojo.cli.train"]
    return subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_misspelt_override_fails_at_start_up_with_hydras_message(tmp_path):
    result = run_train(["trainer.max_stpes=3"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'trainer.max_stpes'" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))


def test_missing_data_file_is_one_clear_line(tmp_path):
    result = run_train(["data=files", "data.paths=[no/such/file.jsonl]", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "bmojo-train: error: data file not found: 'no/such/file.jsonl'" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_value_multirun_sweep_runs_both_jobs(jsonl_corpus, tiny_run_overrides, tmp_path):
    overrides = [
        o for o in tiny_run_overrides(jsonl_corpus, tmp_path) if not o.startswith(("run_dir", "trainer.max_steps"))
    ]
    sweep = tmp_path / "sweep"
    result = run_train(["-m", *overrides, "trainer.max_steps=1,2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "checkpoints").is_dir())
    assert [sorted(c.name for c in (job / "checkpoints").glob("step_*")) for job in jobs] == [
        ["step_00000001"],
        ["step_00000002"],
    ]
    assert all((job / "config.yaml").is_file() and (job / "metrics.jsonl").is_file() for job in jobs)


def test_export_generate_and_eval_work_on_a_trained_run(tiny_config, tmp_path, capsys):
    summary = train(tiny_config("trainer.max_steps=2"))
    export_cli.main([str(summary.run_dir), str(tmp_path / "hf")])
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    checkpointed, tokenizer = load_model_and_tokenizer(summary.run_dir)
    ids = tokenizer("the cat sees a dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported.eval()(ids).logits, checkpointed.eval()(ids).logits)

    capsys.readouterr()
    generate_cli.main([str(tmp_path / "hf"), "--prompt", "the cat", "--max-new-tokens", "5"])
    sampled = capsys.readouterr().out
    assert "the cat" in sampled
    generate_cli.main([str(tmp_path / "hf"), "--prompt", "the cat", "--max-new-tokens", "5", "--compile"])
    assert capsys.readouterr().out == sampled, "compiled decoding sampled other tokens"
    eval_cli.main([str(summary.run_dir), "--lengths", "32", "64", "--batches", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("32", "64")]
    assert [row[0] for row in rows] == ["32", "64"] and all(float(row[2]) > 1.0 for row in rows)
