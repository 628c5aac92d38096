"""Prepared folders (bmojo-prepare, data.prepared): the in-memory path's blocks from memory-mapped shards,
resumable and deterministic preparing, and clear errors that leave a folder as it was."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import sentences, tiny_overrides

import bmojo.data.prepared as prepared_module
import bmojo.data.shards as shards_module
from bmojo.cli.prepare import compose_run_config
from bmojo.cli.prepare import main as prepare_main
from bmojo.data import (
    BlockLoader,
    DataConfig,
    DataError,
    DataSource,
    load_documents,
    open_prepared,
    pack_documents,
    prepare_folder,
)
from bmojo.train import train
from bmojo.train.metrics import read_metrics

SEED = 7
SHARD_DOCUMENTS = 1000  # the smallest shard: 2500 documents make 3 shards, the last one short


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepared_corpus") / "corpus.jsonl"
    texts = [text[: 20 + index % 60] for index, text in enumerate(sentences(2500, seed=1))]  # uneven lengths
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def corpus_config(corpus: Path, **fields) -> DataConfig:
    defaults = {"tokenizer": "bpe", "bpe_vocab_size": 300, "seq_len": 16, "val_fraction": 0.05}
    return DataConfig(source=DataSource.files, paths=[str(corpus)], **(defaults | fields))


def prepare(config: DataConfig, folder: Path, workers: int = 1):
    return prepare_folder(config, SEED, folder, workers, SHARD_DOCUMENTS, progress=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def all_rows(blocks) -> np.ndarray:
    return np.asarray(blocks[list(range(len(blocks)))]["input_ids"])


def test_prepared_blocks_are_the_in_memory_blocks_whatever_the_workers(corpus, tmp_path):
    config = corpus_config(corpus)
    one, two = prepare(config, tmp_path / "one"), prepare(config, tmp_path / "two", workers=2)
    assert one.shards == 3 and one.shards_written == 3 and one.tokens == two.tokens
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")  # the same bytes with 1 or 2 workers
    documents, _ = load_documents(config, SEED)
    tokenizer, prepared = open_prepared(replace(config, prepared=str(tmp_path / "one")), SEED)
    reference = pack_documents(documents, tokenizer, config.seq_len, config.val_fraction)  # the in-memory path
    assert np.array_equal(all_rows(prepared.train), all_rows(reference.train))
    assert np.array_equal(all_rows(prepared.val), all_rows(reference.val))
    assert prepared.tokens == reference.tokens
    ours, theirs = (BlockLoader(d.train, 2, 2, seed=3, rank=1, world_size=2) for d in (prepared, reference))
    for _ in range(5):
        assert np.array_equal(ours.next_step().numpy(), theirs.next_step().numpy())
    # Another block length cuts the same folder afresh, again as the in-memory path does.
    _, longer = open_prepared(replace(config, prepared=str(tmp_path / "one"), seq_len=40), SEED)
    assert np.array_equal(all_rows(longer.train), all_rows(pack_documents(documents, tokenizer, 40, 0.05).train))


def test_ranks_read_disjoint_blocks_and_map_only_the_shards_their_blocks_lie_in(corpus, tmp_path):
    config = corpus_config(corpus, tokenizer="bytes", seq_len=64)
    prepare(config, tmp_path / "folder")
    _, data = open_prepared(replace(config, prepared=str(tmp_path / "folder")), SEED)
    ranks = [BlockLoader(data.train, 2, 1, seed=0, rank=rank, world_size=2) for rank in range(2)]
    whole = BlockLoader(data.train, 4, 1, seed=0)  # one process reading the global batch of both ranks
    for _ in range(3):
        step = whole.next_step()[0]
        first, second = (loader.next_step()[0] for loader in ranks)
        assert np.array_equal(np.concatenate([first, second]), step.numpy())
    # A fresh reader of the second rank maps exactly the shards its blocks lie in (by the manifest's token counts).
    _, fresh = open_prepared(replace(config, prepared=str(tmp_path / "folder")), SEED)
    read = []

    class Recording:  # the fresh reader's training blocks, noting which ones the loader reads
        def __len__(self) -> int:
            return len(fresh.train)

        def __getitem__(self, indices: list[int]) -> dict[str, np.ndarray]:
            read.extend(indices)
            return fresh.train[indices]

    BlockLoader(Recording(), 2, 1, seed=0, rank=1, world_size=2).next_step()
    shard_tokens = [
        shard["tokens"] for shard in json.loads((tmp_path / "folder" / "manifest.json").read_text())["shards"]
    ]
    ends = np.cumsum(shard_tokens)
    holding = {int(np.sum(ends <= fresh.train.starts[index])) for index in read}
    assert len(read) == 2 and sorted(fresh.train._mapped) == sorted(holding) and len(holding) < len(shard_tokens)


def test_a_reader_keeps_a_bounded_number_of_shards_mapped(corpus, tmp_path, monkeypatch):
    config = corpus_config(corpus, tokenizer="bytes", seq_len=64)
    prepare(config, tmp_path / "folder")
    _, data = open_prepared(replace(config, prepared=str(tmp_path / "folder")), SEED)
    everything = all_rows(data.train)
    monkeypatch.setattr(prepared_module, "MAX_MAPPED_SHARDS", 2)  # each mapped shard holds a file descriptor
    _, bounded = open_prepared(replace(config, prepared=str(tmp_path / "folder")), SEED)
    assert np.array_equal(all_rows(bounded.train), everything) and list(bounded.train._mapped) == [1, 2]
    assert np.array_equal(bounded.train[[0]]["input_ids"], everything[:1]) and list(bounded.train._mapped) == [2, 0]


def test_an_interrupted_prepare_continues_without_redoing_finished_shards(corpus, tmp_path, monkeypatch):
    config = corpus_config(corpus, tokenizer="bytes")
    write_shard = shards_module._write_shard

    def interrupted(index, report=None):
        if index == 2:
            raise KeyboardInterrupt
        return write_shard(index, report)

    monkeypatch.setattr(shards_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, tmp_path / "folder")
    with pytest.raises(DataError, match="is not finished .* rerun bmojo-prepare"):
        open_prepared(replace(config, prepared=str(tmp_path / "folder")), SEED)
    finished = {name: (tmp_path / "folder" / name).stat().st_mtime_ns for name in ("shard_00000.tokens",)}
    monkeypatch.setattr(shards_module, "_write_shard", write_shard)
    resumed = prepare(config, tmp_path / "folder")
    assert resumed.shards_written == 1
    assert {name: (tmp_path / "folder" / name).stat().st_mtime_ns for name in finished} == finished
    prepare(config, tmp_path / "straight")
    assert snapshot(tmp_path / "folder") == snapshot(tmp_path / "straight")
    assert prepare(config, tmp_path / "folder").shards_written == 0  # finished: nothing to do


def test_a_folder_of_another_recipe_is_refused_saying_what_differs_and_left_alone(corpus, tmp_path):
    config = corpus_config(corpus, tokenizer="bytes")
    folder = tmp_path / "folder"
    prepare(config, folder)
    before = snapshot(folder)
    with pytest.raises(DataError, match=r"data\.tokenizer: the folder has 'bytes', the recipe 'bpe'.*nothing was"):
        prepare(replace(config, tokenizer="bpe"), folder)
    with pytest.raises(DataError, match=r"seed: the folder has 7, the recipe 8.*use the overrides it was prepared"):
        open_prepared(replace(config, prepared=str(folder)), seed=8)
    with pytest.raises(DataError, match=r"data\.val_fraction: the folder has 0\.05, the recipe 0\.1"):
        open_prepared(replace(config, prepared=str(folder), val_fraction=0.1), SEED)
    assert snapshot(folder) == before
    with pytest.raises(DataError, match=r"holds no manifest\.json: write it first with bmojo-prepare"):
        open_prepared(replace(config, prepared=str(tmp_path / "nothing")), SEED)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a prepared folder"):
        prepare(config, tmp_path / "other")


def test_truncated_and_missing_shards_each_have_their_error_and_prepare_mends_them(corpus, tmp_path):
    config = corpus_config(corpus, tokenizer="bytes")
    folder = tmp_path / "folder"
    prepare(config, folder)
    whole = snapshot(folder)
    reading = replace(config, prepared=str(folder))
    tokens = folder / "shard_00001.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    damaged = snapshot(folder)
    with pytest.raises(DataError, match=r"shard_00001\.tokens is truncated or damaged: .* bytes where the manifest"):
        open_prepared(reading, SEED)
    (folder / "shard_00002.docs.npy").unlink()
    del damaged["shard_00002.docs.npy"]
    with pytest.raises(DataError, match=r"shard_00001\.tokens is truncated"):
        open_prepared(reading, SEED)
    tokens.write_bytes(whole["shard_00001.tokens"])
    with pytest.raises(DataError, match=r"shard_00002\.docs\.npy is missing \(the manifest lists it\)"):
        open_prepared(reading, SEED)
    assert snapshot(folder) == {**damaged, "shard_00001.tokens": whole["shard_00001.tokens"]}  # reads only
    assert prepare(config, folder).shards_written == 1
    assert snapshot(folder) == whole
    lengths = folder / "shard_00000.docs.npy"
    lengths.write_bytes(whole["shard_00000.docs.npy"][:-8])
    with pytest.raises(DataError, match=r"shard_00000\.docs\.npy is truncated or damaged: it does not hold the 1,000"):
        open_prepared(reading, SEED)
    assert prepare(config, folder).shards_written == 1
    assert snapshot(folder) == whole


@pytest.mark.slow
def test_bmojo_prepare_then_train_equals_the_in_memory_run(jsonl_corpus, tmp_path, capsys):
    overrides = tiny_overrides(jsonl_corpus, tmp_path / "in_memory")
    train(compose_run_config(overrides))
    folder = tmp_path / "shards"
    prepare_main(["--workers", "2", "--shard-documents", "1000", "--quiet", *overrides, f"data.prepared={folder}"])
    assert "tokens from 120 documents in 1 shards" in capsys.readouterr().out
    prepared_overrides = tiny_overrides(jsonl_corpus, tmp_path / "prepared") + [f"data.prepared={folder}"]
    train(compose_run_config(prepared_overrides))
    for key in ("loss", "grad_norm", "val_loss"):
        ours = [(r["step"], r[key]) for r in read_metrics(tmp_path / "prepared") if key in r]
        theirs = [(r["step"], r[key]) for r in read_metrics(tmp_path / "in_memory") if key in r]
        assert ours == theirs and ours, key


def test_bmojo_prepare_needs_a_folder(jsonl_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_main(tiny_overrides(jsonl_corpus, tmp_path / "run"))
    assert "data.prepared=FOLDER" in capsys.readouterr().err
