"""bmojo-report: benchmark JSON in, markdown tables and PNG plots out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bmojo.eval.report import build_report, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    mqar = {
        "bench": "mqar",
        "chance": 1 / 16,
        "runs": [
            {"member": m, "filler": f, "num_pairs": k, "memory_size": 24, "accuracy": acc, "parameters": 1000,
             "auxiliary_parameters": 64 if m == "B" else 0, "train_s": 90.0,
             "value_in_memory": [0.5, 0.875] if m == "B" else []}
            for m, f, k, acc in [("B", "periodic", 4, 0.99), ("B", "periodic", 16, 0.41), ("W", "noise", 4, 0.07)]
        ],
    }  # fmt: skip
    extrapolation = {
        "bench": "extrapolation",
        "train_len": 128,
        "runs": [
            {"member": "A", "perplexity": [{"length": 128, "perplexity": 10.0}, {"length": 512, "perplexity": 40.0}]},
            {"member": "F", "perplexity": [{"length": 128, "perplexity": 12.0}, {"length": 512, "perplexity": 11.4}]},
        ],
    }
    throughput = {
        "bench": "throughput",
        "tokens_per_step": 8192,
        "threads": 2,
        "model": {"hidden_size": 128, "num_hidden_layers": 2, "window_size": 256, "memory_size": 64},
        "results": [
            {"seq_len": n, "members": {m: {"parameters": 5, "tokens_per_s": t, "vs_A": t / 100} for m, t in rows}}
            for n, rows in [(512, [("A", 100.0), ("B", 80.0)]), (8192, [("A", 10.0), ("B", 70.0)])]
        ],
    }
    decode = {
        "bench": "decode",
        "threads": 2,
        "model": {"hidden_size": 128, "num_hidden_layers": 2, "window_size": 256, "memory_size": 64},
        "decoded_tokens": 16,
        "results": [
            {"context": n, "members": {"A": {"ms_per_token": ms, "vs_A": 1.0, "cache_bytes": 1024 * n}}}
            for n, ms in [(512, 2.0), (8192, 9.5)]
        ],
    }
    reports = {"mqar": mqar, "extrapolation": extrapolation, "throughput": throughput, "decode": decode}
    return [write(tmp_path / f"{name}.json", report) for name, report in reports.items()]


def test_report_has_a_table_and_a_plot_per_benchmark(results, tmp_path):
    markdown = build_report(results, tmp_path / "out").read_text()
    for title in ["Multi-query associative recall", "Length extrapolation", "Training throughput", "Decoding"]:
        assert f"## {title}" in markdown
    assert "| B'MOJO (B) | periodic | 16 | 24 | 0.410 | 0.50, 0.88 | 1,000 | 64 | 1.5 |" in markdown
    assert "| LM parameters | aux parameters |" in markdown
    assert "| B'MOJO-F (F) | 12.00 (1.000) | 11.40 (0.950) |" in markdown
    assert "| 8192 | B'MOJO (B) | 5 | - | 70 | 0.70 | - |" in markdown  # recorded without an auxiliary count
    assert "| 8192 | Transformer (A) | 9.50 | 1.00 | 8,192 |" in markdown
    for name in ["mqar", "extrapolation", "throughput", "decode"]:
        assert f"]({name}.png)" in markdown
        assert (tmp_path / "out" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_benchmark_given_twice_gets_a_section_per_file(results, tmp_path):
    wider = json.loads(results[3].read_text())
    wider["model"]["hidden_size"] = 256
    second = write(tmp_path / "decode_h256.json", wider)
    markdown = build_report([results[3], second], tmp_path / "out").read_text()
    assert "## Decoding (decode)" in markdown and "## Decoding (decode_h256)" in markdown
    assert "Hidden 256, 2 layers" in markdown and (tmp_path / "out" / "decode_h256.png").is_file()
    batched = write(tmp_path / "decode_batch8.json", wider | {"batch": 8})
    markdown = build_report([batched], tmp_path / "out").read_text()
    assert "median of 16 tokens, each a step of 8 sequences; eager steps." in markdown
    compiled = write(tmp_path / "decode_compiled.json", wider | {"compiled": True, "warmup_tokens": 4})
    markdown = build_report([compiled], tmp_path / "out").read_text()
    assert "median of 16 tokens; every member through its compiled step" in markdown
    assert "timed after 4 warm-up tokens." in markdown


def test_only_the_benchmarks_given_appear(results, tmp_path):
    markdown = build_report(results[2:3], tmp_path / "out").read_text()
    assert "Training throughput" in markdown and "associative recall" not in markdown
    assert not (tmp_path / "out" / "mqar.png").exists()
    assert "every block compiled" not in markdown
    compiled = write(tmp_path / "throughput_compiled.json", json.loads(results[2].read_text()) | {"compiled": True})
    assert "; every block compiled (`torch.compile`)." in build_report([compiled], tmp_path / "out").read_text()
    assert "host memory" not in markdown
    kept = write(tmp_path / "throughput_kept.json", json.loads(results[2].read_text()) | {"host_memory_kept": True})
    assert "2 CPU threads, freed host memory kept for reuse." in build_report([kept], tmp_path / "out").read_text()


def test_an_unknown_file_fails_with_its_name(tmp_path, capsys):
    bad = write(tmp_path / "other.json", {"bench": "latency"})
    with pytest.raises(SystemExit) as stopped:
        main([str(bad), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 1
    assert "other.json: unknown benchmark 'latency'" in capsys.readouterr().err


def test_breakdown_and_gpu_runs_are_described(results, tmp_path):
    breakdown = {
        "bench": "breakdown",
        "threads": 1,
        "seq_len": 2048,
        "batch": 4,
        "model": {"hidden_size": 128, "num_hidden_layers": 2, "window_size": 256, "memory_size": 64},
        "ms": {"step W": 600.0, "step B": 1000.0, "attention W": 65.0, "attention B": 130.0, "ssm_scan": 50.0},
        "measured B/W": 0.6,
        "bound B/W": 0.72,
    }
    on_gpu = json.loads(results[2].read_text()) | {
        "device": "cuda",
        "machine": "NVIDIA H100 80GB HBM3",
        "autocast": "bf16",
    }
    paths = [write(tmp_path / "breakdown.json", breakdown), write(tmp_path / "throughput_cuda.json", on_gpu)]
    markdown = build_report(paths, tmp_path / "out").read_text()
    assert "| bound B/W | 0.72 |" in markdown and "| attention B | 130.0 |" in markdown
    assert "1 CPU thread." in markdown and "on NVIDIA H100 80GB HBM3, forward under bf16 autocast" in markdown
    assert (tmp_path / "out" / "breakdown.png").read_bytes().startswith(PNG_SIGNATURE)


def test_geometry_section_lists_each_member_at_each_geometry(tmp_path):
    rows = [
        {"member": m, "seq_len": t, "window": w, "tokens_per_s": tps, "vs_first": ratio}
        for m, t, w, tps, ratio in [("F", 2048, 2048, 1000.0, 1.0), ("F", 2048, 512, 1200.0, 1.2)]
    ]
    report = {"bench": "geometry", "tokens_per_step": 8192, "threads": 1, "results": rows}
    report["model"] = {"hidden_size": 128, "num_hidden_layers": 2, "memory_size": 256}
    markdown = build_report([write(tmp_path / "geometry.json", report)], tmp_path / "out").read_text()
    assert "## Pretraining geometry" in markdown
    assert "| B'MOJO-F (F) | 2048 | 512 | 1,200 | 1.20 |" in markdown
    assert (tmp_path / "out" / "geometry.png").read_bytes().startswith(PNG_SIGNATURE)
