"""Streamed datasets (data=hub data.streaming=true), offline: a local folder of jsonl files streamed by
``datasets``; the held-out blocks, the split across ranks and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentences, tiny_overrides

from bmojo.cli.prepare import compose_run_config
from bmojo.data import DataConfig, DataError, DataSource, StreamLoader, byte_tokenizer, prepare_data
from bmojo.train import train
from bmojo.train.metrics import read_metrics

VAL_BLOCKS = 2
SEQ_LEN = 32


@pytest.fixture(scope="module")
def stream_folder(tmp_path_factory) -> Path:
    """Three jsonl files (three stream shards) of 40 short documents each."""
    folder = tmp_path_factory.mktemp("stream")
    texts = sentences(120, seed=2)
    for part in range(3):
        rows = texts[part * 40 : (part + 1) * 40]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return folder


def stream_config(folder: Path, **fields) -> DataConfig:
    defaults = {"tokenizer": "bytes", "seq_len": SEQ_LEN, "stream_val_blocks": VAL_BLOCKS}
    return DataConfig(source=DataSource.hub, hub_name=str(folder), streaming=True, **(defaults | fields))


def file_order(folder: Path) -> list[str]:
    return [json.loads(line)["text"] for part in range(3) for line in (folder / f"part{part}.jsonl").open()]


def token_stream(texts: list[str]) -> list[int]:
    eos = byte_tokenizer().eos_token_id
    return [token for text in texts for token in [*text.encode(), eos]]


def test_held_out_blocks_come_first_and_training_continues_after_them(stream_folder):
    tokenizer, data = prepare_data(stream_config(stream_folder), seed=0)
    texts = file_order(stream_folder)
    expected = token_stream(texts)
    assert np.array_equal(np.asarray(data.val[:]["input_ids"]).reshape(-1), expected[: VAL_BLOCKS * SEQ_LEN])
    skipped = data.train.skip_documents
    assert len(token_stream(texts[: skipped - 1])) < VAL_BLOCKS * SEQ_LEN <= len(token_stream(texts[:skipped]))
    loader = StreamLoader(data.train, micro_batch_size=2, grad_accum_steps=2)
    served = [loader.next_step().reshape(-1) for _ in range(3)]
    assert torch.cat(served).tolist() == token_stream(texts[skipped:])[: 3 * 4 * SEQ_LEN]


def test_ranks_stream_disjoint_documents(stream_folder):
    _, data = prepare_data(stream_config(stream_folder), seed=0)
    texts = file_order(stream_folder)[data.train.skip_documents :]
    for rank in range(2):
        # Three files do not divide among two ranks, so datasets gives each rank every other document.
        loader = StreamLoader(data.train, micro_batch_size=1, grad_accum_steps=1, rank=rank, world_size=2)
        served = torch.cat([loader.next_step().reshape(-1) for _ in range(20)]).tolist()
        assert served == token_stream(texts[rank::2])[: 20 * SEQ_LEN]


def test_no_rank_trains_on_held_out_rows_when_files_divide_among_ranks(tmp_path):
    # Two files for two ranks: datasets gives each rank a whole file. Empty rows are rows the held-out part
    # reads past too.
    files = [["", "  ", *sentences(40, seed=3)], sentences(40, seed=4)]
    for part, rows in enumerate(files):
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    val_blocks = 16
    _, data = prepare_data(stream_config(tmp_path, stream_val_blocks=val_blocks), seed=0)
    texts = files[0][2:]
    held_out = next(k for k in range(1, len(texts)) if len(token_stream(texts[:k])) >= val_blocks * SEQ_LEN)
    assert held_out > 2 and data.train.skip_documents == held_out + 2  # the empty rows are counted
    for rank, rest in enumerate([texts[held_out:], files[1][data.train.skip_documents :]]):
        # rank 0 starts after the held-out rows; rank 1, whose file holds none, skips as many rows of its own
        loader = StreamLoader(data.train, micro_batch_size=1, grad_accum_steps=1, rank=rank, world_size=2)
        served = torch.cat([loader.next_step().reshape(-1) for _ in range(10)]).tolist()
        assert served == token_stream(rest)[: 10 * SEQ_LEN]


def test_the_stream_cursor_resumes_exactly_across_epochs(stream_folder):
    _, data = prepare_data(stream_config(stream_folder), seed=0)
    loader = StreamLoader(data.train, micro_batch_size=4, grad_accum_steps=2)
    for _ in range(5):
        loader.next_step()
    state = loader.state_dict()
    expected = [loader.next_step() for _ in range(70)]  # ~16k tokens a pass: this wraps into a new epoch
    assert loader.epoch >= 1
    resumed = StreamLoader(data.train, micro_batch_size=4, grad_accum_steps=2)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_step(), want)


def test_a_bpe_cannot_be_trained_on_a_stream(stream_folder):
    with pytest.raises(DataError, match="cannot train a BPE on a stream: set data.tokenizer=bytes"):
        prepare_data(stream_config(stream_folder, tokenizer="bpe"), seed=0)
    with pytest.raises(DataError, match="could not stream hub dataset .*nope"):
        prepare_data(stream_config(stream_folder / "nope"), seed=0)


@pytest.mark.slow
def test_streamed_training_stopped_and_resumed_equals_the_straight_run(stream_folder, tmp_path):
    def overrides(run: str, *extra: str) -> list[str]:
        base = [o for o in tiny_overrides(Path("unused"), tmp_path / run) if not o.startswith("data")]
        return base + ["data=hub", f"data.hub_name={stream_folder}", "data.streaming=true", "data.tokenizer=bytes"]

    common = ["data.seq_len=64", "data.stream_val_blocks=8"]
    train(compose_run_config(overrides("straight") + common))
    first = train(compose_run_config(overrides("resumed") + common + ["trainer.steps_this_run=3"]))
    assert first.stopped_early and first.step == 3
    train(compose_run_config(overrides("resumed") + common))
    ours, theirs = (read_metrics(tmp_path / run) for run in ("resumed", "straight"))
    for key in ("loss", "grad_norm", "tokens"):
        assert [(r["step"], r[key]) for r in ours if key in r] == [(r["step"], r[key]) for r in theirs if key in r]
    # The resumed run also evaluated when it stopped at step 3; the final evaluations agree.
    final_val = [[r["val_loss"] for r in run if "val_loss" in r][-1] for run in (ours, theirs)]
    assert final_val[0] == final_val[1]
