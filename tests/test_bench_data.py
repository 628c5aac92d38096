"""bench/data.py end to end on a corpus of a few MB: it prepares with 1 and 2 workers, measures the loader and a
step, and writes the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import data as data_bench  # noqa: E402


@pytest.mark.slow
def test_data_bench_reports_prepare_loader_and_step(tmp_path):
    out = tmp_path / "data.json"
    data_bench.main(
        ["--workdir", str(tmp_path / "work"), "--sizes-gb", "0.001", "0.002", "--file-mb", "0.5"]
        + ["--vocab-size", "300", "--bpe-sample-mb", "0.2", "--shard-documents", "1000", "--seq-len", "64"]
        + ["--loader-steps", "5", "--step-model", "B_tiny", "--step-repeats", "1", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["identical_with_1_and_2_workers"]
    assert report["prepare"]["1"]["tokens"] == report["prepare"]["2"]["tokens"] > 0
    small, large = report["loader"]["small"], report["loader"]["large"]
    assert small["corpus_bytes"] < large["corpus_bytes"] and large["tokens_per_s"] > 0
    assert report["step"]["tokens_per_s"] > 0 and report["loader_over_step"] > 0
    assert not (tmp_path / "work").exists()  # removed without --keep
