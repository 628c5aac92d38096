"""Data pipeline: tokenizers, packing, file checks and errors, the resumable rank-sharded loader."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from bmojo.data import (
    BlockLoader,
    DataConfig,
    DataError,
    DataSource,
    byte_tokenizer,
    load_documents,
    pack_documents,
    prepare_data,
    stdlib_documents,
    train_bpe,
)


def files_config(*paths: Path, **fields) -> DataConfig:
    return DataConfig(source=DataSource.files, paths=[str(p) for p in paths], tokenizer="bytes", seq_len=8, **fields)


def test_byte_tokenizer_maps_bytes_to_their_values_and_round_trips():
    tokenizer = byte_tokenizer()
    text = "héllo\n    wörld ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 256 and len(tokenizer) == 257


def test_bpe_trained_on_text_round_trips_and_compresses():
    texts = ["def add(a, b):\n    return a + b\n"] * 50
    tokenizer = train_bpe(iter(texts), vocab_size=300)
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == texts[0]
    assert len(ids) < len(texts[0].encode()) / 2
    assert len(tokenizer) <= 300


def test_packing_puts_end_of_text_between_documents_and_holds_out_blocks():
    tokenizer = byte_tokenizer()
    documents = datasets.Dataset.from_dict({"text": ["ab", "cd", "efghi", "jkl"]})
    packed = pack_documents(documents, tokenizer, seq_len=3, val_fraction=0.3)
    eos = tokenizer.eos_token_id
    blocks = [list(row) for row in packed.val["input_ids"]] + [list(row) for row in packed.train["input_ids"]]
    stream = [t for block in blocks for t in block]
    assert stream == [*b"ab", eos, *b"cd", eos, *b"efghi", eos, *b"jkl"]  # the last eos is the dropped tail
    assert len(packed.val) == 2 and len(packed.train) == 3


def test_embedded_corpus_is_the_standard_library_and_its_documentation():
    documents = stdlib_documents()
    assert len(documents) > 500
    assert any("def " in doc for doc in documents[:50])
    import pydoc_data.topics

    assert pydoc_data.topics.topics["if"] in documents


def test_text_jsonl_and_parquet_files_load_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill the first\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n" + json.dumps({"body": "third"}) + "\n")
    datasets.Dataset.from_dict({"body": ["fourth"]}).to_parquet(str(tmp_path / "c.parquet"))
    config = files_config(tmp_path / "a.txt", tmp_path / "*.jsonl", tmp_path / "c.parquet", text_field="body")
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(config, seed=0)  # the text file's column is "text"
    documents, _ = load_documents(files_config(tmp_path / "a.txt"), seed=0)
    assert documents["text"] == ["first document\nstill the first\n"]
    config = files_config(tmp_path / "b.jsonl", tmp_path / "c.parquet", text_field="body", shuffle=False)
    documents, report = load_documents(config, seed=0)
    assert sorted(documents["text"]) == ["fourth", "second", "third"] and report.documents == 3


def test_missing_data_file_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl.*fix data\.paths"):
        load_documents(files_config(tmp_path / "nope.jsonl"), seed=0)


def test_empty_files_are_skipped_and_an_all_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="empty corpus"):
        load_documents(files_config(tmp_path / "empty.txt"), seed=0)
    with pytest.raises(DataError, match="empty corpus"):
        load_documents(files_config(tmp_path / "blank.jsonl"), seed=0)
    (tmp_path / "real.txt").write_text("some text")
    documents, report = load_documents(files_config(tmp_path / "empty.txt", tmp_path / "real.txt"), seed=0)
    assert documents["text"] == ["some text"] and report.skipped["empty files"] == 1


def test_non_utf8_file_is_an_error_naming_file_and_offset_or_a_counted_skip(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine so far, then caf" + "é".encode("latin-1") + b" and more")
    (tmp_path / "good.txt").write_text("good text")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 \(bad byte at offset 21\).*skip_bad_files"):
        load_documents(files_config(bad, tmp_path / "good.txt"), seed=0)
    documents, report = load_documents(files_config(bad, tmp_path / "good.txt", skip_bad_files=True), seed=0)
    assert documents["text"] == ["good text"] and report.skipped["unreadable or non-UTF-8 files"] == 1


def test_unreadable_parquet_and_unknown_suffix_are_clear_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: unreadable as parquet"):
        load_documents(files_config(tmp_path / "broken.parquet"), seed=0)
    (tmp_path / "notes.rst").write_text("text")
    with pytest.raises(DataError, match="set data.format"):
        load_documents(files_config(tmp_path / "notes.rst"), seed=0)


def test_too_short_corpus_says_how_many_tokens_it_has(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(DataError, match=r"corpus too short: 4 tokens make 0 block\(s\) of data.seq_len=8"):
        prepare_data(files_config(tmp_path / "tiny.txt"), seed=0)


def _blocks(count: int, seq_len: int = 4) -> datasets.Dataset:
    ids = np.arange(count * seq_len).reshape(count, seq_len)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("numpy")


def test_loader_cursor_replays_the_same_batches_across_epochs():
    loader = BlockLoader(_blocks(10), micro_batch_size=2, grad_accum_steps=2, seed=3)
    for _ in range(3):
        loader.next_step()
    state = loader.state_dict()
    expected = [loader.next_step() for _ in range(4)]  # crosses into the next epochs (4 blocks a step of 10)
    assert loader.epoch >= 2
    restored = BlockLoader(_blocks(10), micro_batch_size=2, grad_accum_steps=2, seed=3)
    restored.load_state_dict(state)
    for want in expected:
        assert np.array_equal(restored.next_step().numpy(), want.numpy())


def test_loader_epoch_visits_each_block_once_and_ranks_split_each_step():
    first_rank = BlockLoader(_blocks(12), micro_batch_size=2, grad_accum_steps=1, seed=0, rank=0, world_size=2)
    second_rank = BlockLoader(_blocks(12), micro_batch_size=2, grad_accum_steps=1, seed=0, rank=1, world_size=2)
    seen = []
    for _ in range(3):  # one epoch: 3 steps of 4 blocks
        a, b = first_rank.next_step(), second_rank.next_step()
        assert a.shape == (1, 2, 4)
        seen += [int(block[0]) // 4 for block in a[0]] + [int(block[0]) // 4 for block in b[0]]
    assert sorted(seen) == list(range(12))


def test_loader_refuses_fewer_blocks_than_a_step():
    with pytest.raises(DataError, match="only 3 training blocks, fewer than one step needs"):
        BlockLoader(_blocks(3), micro_batch_size=2, grad_accum_steps=2, seed=0)
