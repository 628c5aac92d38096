"""The family benchmarks run end to end at toy sizes and write what the report reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import breakdown  # noqa: E402
import decode  # noqa: E402
import geometry  # noqa: E402
import throughput  # noqa: E402

TOY = ["--threads", "1", "--hidden-size", "32", "--heads", "2", "--kv-heads", "1", "--window", "16"]
TOY += ["--memory-size", "8", "--vocab-size", "64"]


def run(module, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{module.__name__}.json"
    module.main([*TOY, *args, "--json", str(out)])
    return json.loads(out.read_text())


def test_throughput_compares_members_at_each_length(tmp_path):
    report = run(
        throughput, tmp_path, "--seq-lens", "32", "64", "--tokens", "128", "--repeats", "1", "--members", "W", "B"
    )
    assert [result["seq_len"] for result in report["results"]] == [32, 64]
    for result in report["results"]:
        w, b = result["members"]["W"], result["members"]["B"]
        assert b["parameters"] == pytest.approx(w["parameters"], rel=0.02)  # matched by their MLP widths
        assert b["tokens_per_s"] > 0 and w["tokens_per_s"] > 0


def test_decode_cache_is_constant_for_bmojo_and_grows_for_the_transformer(tmp_path):
    report = run(decode, tmp_path, "--contexts", "40", "80", "--tokens", "2", "--batch", "2", "--members", "A", "B")
    short, long = (result["members"] for result in report["results"])
    assert long["B"]["cache_bytes"] == short["B"]["cache_bytes"]
    assert long["A"]["cache_bytes"] > short["A"]["cache_bytes"]
    assert report["batch"] == 2 and report["device"] == "cpu" and short["B"]["ms_per_token"] > 0


def test_decode_with_the_store_grows_its_cache_with_the_context_at_bs_parameters(tmp_path):
    # memory blocks of 16 (the window): a context of 80 has five finished blocks in the store, 40 two.
    report = run(decode, tmp_path, "--contexts", "40", "80", "--tokens", "2", "--members", "B", "--store-topk", "4")
    short, long = (result["members"] for result in report["results"])
    assert long["B+store"]["cache_bytes"] > short["B+store"]["cache_bytes"] > short["B"]["cache_bytes"]
    assert report["parameters"]["B+store"] == report["parameters"]["B"]


def test_geometry_compares_each_member_against_its_first_geometry(tmp_path):
    out = tmp_path / "geometry.json"
    toy = ["--threads", "1", "--hidden-size", "32", "--heads", "2", "--kv-heads", "1", "--vocab-size", "64"]
    geometry.main([*toy, "--geometries", "64:64", "64:16", "--tokens", "128", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["member"], r["seq_len"], r["window"]) for r in rows[:2]] == [("A", 64, 64), ("A", 64, 16)]
    assert {r["member"] for r in rows} == {"A", "W", "F", "B"}
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["parameters"] > 0
        assert (row["vs_first"] == 1.0) == (row["window"] == 64)
    assert all(r["auxiliary_parameters"] > 0 for r in rows if r["member"] == "B")


@pytest.mark.slow
def test_throughput_with_compiled_blocks(tmp_path):
    report = run(
        throughput, tmp_path, "--seq-lens", "32", "--tokens", "64", "--repeats", "1", "--members", "B", "--compile"
    )
    assert report["compiled"] and report["results"][0]["members"]["B"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_decode_compiled_times_every_member_after_its_warm_up(tmp_path):
    report = run(decode, tmp_path, "--contexts", "40", "--tokens", "2", "--members", "A", "B", "--compile")
    assert report["compiled"] and report["warmup_tokens"] == 4
    assert all(row["ms_per_token"] > 0 for row in report["results"][0]["members"].values())


def test_breakdown_gives_a_bound_above_zero(tmp_path):
    report = run(breakdown, tmp_path, "--seq-len", "64", "--tokens", "128", "--repeats", "1")
    assert {"step W", "step B", "attention W", "attention B", "ssm_scan"} <= set(report["ms"])
    assert 0 < report["measured B/W"] and 0 < report["bound B/W"]
