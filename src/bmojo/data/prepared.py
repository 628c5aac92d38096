"""Prepared folders: token shards written once (``bmojo-prepare``) and memory-mapped by every rank.

A folder holds

- ``tokenizer/``: the tokenizer the shards were cut with (``save_pretrained``);
- ``shard_XXXXX.tokens``: the ids of consecutive documents, each followed by end-of-text, one flat raw
  ``uint16`` (``uint32`` for vocabularies above 65536) array in the machine's byte order;
- ``shard_XXXXX.docs.npy``: the length in tokens of each of those documents (``uint32``);
- ``manifest.json``, written last: the recipe fields the tokens depend on, the tokenizer's hash, the dtype,
  every shard's token and document counts, the held-out rule and the source files with their sizes.

Blocks are cut when a folder is opened, for any ``data.seq_len``, by the in-memory rule of
:func:`bmojo.data.packing.pack_documents` (groups of ``DOCS_PER_PACK`` documents, each group's tail dropped;
the first ``ceil(val_fraction * blocks)`` held out), so training on a folder sees the very blocks the
in-memory path makes. Only a block index (8 bytes a block) lives in memory; tokens are read where a rank's
blocks lie, and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from bmojo.data.config import DataConfig
from bmojo.data.corpus import DataError
from bmojo.data.packing import DOCS_PER_PACK, PackedData, check_packing, held_out_count
from bmojo.data.tokenizer import load_pretrained_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"  # written when preparing starts: what the folder is being prepared from, for resuming
TOKENIZER = "tokenizer"
HELD_OUT_RULE = "the first ceil(val_fraction * blocks) blocks of data.seq_len, at least one"
# DataConfig fields the tokens do not depend on (how they are read, or where from).
_READING_FIELDS = ("seq_len", "prepared", "streaming", "stream_val_blocks", "cache_dir", "mqar")
# Each memory-mapped shard holds a file descriptor; a reader keeps at most this many mapped (the least recently
# read is unmapped first), so a folder of thousands of shards stays under the usual limit of 1024 open files.
MAX_MAPPED_SHARDS = 256


def recipe_fields(config: DataConfig, seed: int) -> dict:
    """The recipe fields a prepared folder's tokens (and its held-out split) depend on, by override name."""
    fields = {f"data.{name}": getattr(config, name) for name in config.__dataclass_fields__}
    fields = {name: value for name, value in fields.items() if name[len("data.") :] not in _READING_FIELDS}
    fields["data.source"] = config.source.value
    fields["data.paths"] = list(config.paths)
    fields["seed"] = seed  # the document shuffle, and so the held-out documents
    return fields


def recipe_differences(found: dict, wanted: dict) -> list[str]:
    """One line per field on which a folder's recipe and the run's differ."""
    return [
        f"{name}: the folder has {found.get(name)!r}, the recipe {wanted.get(name)!r}"
        for name in sorted(set(found) | set(wanted))
        if found.get(name) != wanted.get(name)
    ]


def refuse_differences(folder: Path, found: dict, wanted: dict, remedy: str) -> None:
    """Refuse ``folder`` when what it was prepared from differs from what is wanted, naming each difference.

    ``found`` (the folder's manifest or plan) and ``wanted`` hold ``recipe`` (fields by override name, see
    :func:`recipe_fields`); any other key of ``wanted`` (``sources``, ``shard_documents``, ...) is compared too.
    """
    differences = recipe_differences(found["recipe"], wanted["recipe"])
    differences += [
        f"{key}: the folder has {found.get(key)!r}, this prepare {wanted[key]!r}"
        for key in sorted(wanted.keys() - {"recipe"})
        if found.get(key) != wanted[key]
    ]
    if differences:
        what = "another recipe" if wanted.keys() == {"recipe"} else "another recipe or other sources"
        raise DataError(f"{folder} was prepared from {what} ({'; '.join(differences)}): {remedy}")


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's serialized pipeline, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(temporary, path)


def read_manifest(folder: Path) -> dict:
    """The folder's manifest; a missing folder or an unfinished prepare is an error saying what to run."""
    manifest = read_json(folder / MANIFEST)
    if manifest is not None:
        return manifest
    if (folder / PLAN).is_file():
        raise DataError(
            f"data.prepared={folder} is not finished (bmojo-prepare was interrupted): rerun bmojo-prepare with "
            "the same overrides to complete it (finished shards are kept)"
        )
    raise DataError(
        f"data.prepared={folder} holds no {MANIFEST}: write it first with bmojo-prepare and the same overrides "
        f"(bmojo-prepare data.prepared={folder} --workers N ...), or drop data.prepared to tokenize at start-up"
    )


def check_recipe(manifest: dict, config: DataConfig, seed: int, folder: Path) -> None:
    """Refuse a folder prepared from another recipe, naming each field that differs."""
    remedy = "use the overrides it was prepared with, or prepare a new folder for this recipe with bmojo-prepare"
    refuse_differences(folder, manifest, {"recipe": recipe_fields(config, seed)}, remedy)


def inspect_shard(folder: Path, record: dict, itemsize: int) -> tuple[str | None, np.ndarray | None]:
    """Whether the shard ``record`` describes (its name, documents and tokens) is whole in ``folder``: (None, its
    document lengths), or (what is wrong, None): a missing file, a ``.tokens`` file of another size, or a
    ``.docs.npy`` that does not hold the record's document lengths. Reads the ``.docs.npy`` (4 bytes a
    document), not the tokens."""
    tokens, lengths_file = folder / f"{record['name']}.tokens", folder / f"{record['name']}.docs.npy"
    for path in (tokens, lengths_file):
        if not path.is_file():
            return f"{path} is missing (the manifest lists it)", None
    if tokens.stat().st_size != record["tokens"] * itemsize:
        return (
            f"{tokens} is truncated or damaged: {tokens.stat().st_size:,} bytes where the manifest says "
            f"{record['tokens'] * itemsize:,} ({record['tokens']:,} tokens)"
        ), None
    lengths = document_lengths(folder, record)
    if lengths is None:
        return (
            f"{lengths_file} is truncated or damaged: it does not hold the {record['documents']:,} document "
            f"lengths ({record['tokens']:,} tokens) the manifest says"
        ), None
    return None, lengths


def checked_document_lengths(folder: Path, manifest: dict) -> list[np.ndarray]:
    """Every shard's document lengths, once each shard the manifest lists is found whole (see
    :func:`inspect_shard`); else an error naming the first that is not and what to do."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    all_lengths = []
    for shard in manifest["shards"]:
        problem, lengths = inspect_shard(folder, shard, itemsize)
        if problem is not None:
            raise DataError(
                f"{problem}; copy the folder again, or rerun bmojo-prepare with the same overrides, which rewrites "
                "missing or damaged shards"
            )
        all_lengths.append(lengths)
    return all_lengths


def document_lengths(folder: Path, shard: dict) -> np.ndarray | None:
    """The shard's document lengths (``shard_XXXXX.docs.npy``), None when the file is missing, unreadable or
    disagrees with the shard's record (its number of documents and tokens)."""
    try:
        lengths = np.load(folder / f"{shard['name']}.docs.npy")
    except (OSError, ValueError, EOFError):
        return None
    whole = lengths.ndim == 1 and len(lengths) == shard["documents"] and int(lengths.sum()) == shard["tokens"]
    return lengths if whole else None


def block_starts(doc_lengths: np.ndarray, first_token: int, seq_len: int) -> np.ndarray:
    """Where each block of ``seq_len`` starts (offsets from the corpus's first token, int64 ``[blocks]``) in a
    shard whose documents have ``doc_lengths`` tokens and whose first token is ``first_token``.

    Documents are taken in groups of ``DOCS_PER_PACK``, as packing takes them; each group's tail is dropped.
    """
    lengths = doc_lengths.astype(np.int64)
    group_tokens = np.add.reduceat(lengths, np.arange(0, len(lengths), DOCS_PER_PACK))
    group_first = first_token + np.cumsum(group_tokens) - group_tokens
    per_group = group_tokens // seq_len
    block_in_group = np.arange(per_group.sum()) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    return np.repeat(group_first, per_group) + seq_len * block_in_group


class TokenBlocks:
    """Blocks of ``seq_len`` tokens in memory-mapped shards, read like the numpy-format ``datasets.Dataset``
    of packed blocks: ``blocks[indices]["input_ids"]`` is an int64 array ``[len(indices), seq_len]``.

    ``starts`` (int64 ``[blocks]``) are offsets into the shards laid end to end (``shard_first`` int64
    ``[shards]`` is each shard's first offset); no block straddles two shards. A shard is mapped the first
    time one of its blocks is read; at most ``MAX_MAPPED_SHARDS`` stay mapped.
    """

    def __init__(
        self, shard_paths: list[Path], shard_first: np.ndarray, dtype: np.dtype, starts: np.ndarray, seq_len: int
    ) -> None:
        self.shard_paths = shard_paths
        self.shard_first = shard_first
        self.dtype = dtype
        self.starts = starts
        self.seq_len = seq_len
        self._mapped: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        chosen = self.starts[index] if isinstance(index, slice) else self.starts[np.asarray(index, dtype=np.int64)]
        shards = np.searchsorted(self.shard_first, chosen, side="right") - 1
        ids = np.empty((len(chosen), self.seq_len), dtype=np.int64)
        offsets = chosen - self.shard_first[shards]
        for row, (shard, start) in enumerate(zip(shards.tolist(), offsets.tolist(), strict=True)):
            ids[row] = self._shard(shard)[start : start + self.seq_len]
        return {"input_ids": ids}

    def _shard(self, index: int) -> np.memmap:
        if index in self._mapped:
            self._mapped.move_to_end(index)
        else:
            if len(self._mapped) >= MAX_MAPPED_SHARDS:
                self._mapped.popitem(last=False)  # its mapping and descriptor go with the last reference
            self._mapped[index] = np.memmap(self.shard_paths[index], dtype=self.dtype, mode="r")
        return self._mapped[index]


def open_prepared(
    config: DataConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedTokenizerBase, PackedData]:
    """The folder ``data.prepared`` as training and held-out blocks of ``data.seq_len``, and its tokenizer.

    ``tokenizer`` (a resumed or fine-tuned model's) must be the one the folder was cut with.
    """
    folder = Path(config.prepared)
    check_packing(config.seq_len, config.val_fraction)
    manifest = read_manifest(folder)
    check_recipe(manifest, config, seed, folder)
    all_lengths = checked_document_lengths(folder, manifest)
    if tokenizer is None:
        tokenizer = load_pretrained_tokenizer(str(folder / TOKENIZER))
    elif tokenizer_hash(tokenizer) != manifest["tokenizer_hash"]:
        raise DataError(
            f"the model's tokenizer is not the one {folder} was prepared with: prepare a folder with this "
            "model's tokenizer (bmojo-prepare data.tokenizer=<its folder> ...), or drop data.prepared"
        )
    shard_tokens = np.array([shard["tokens"] for shard in manifest["shards"]], dtype=np.int64)
    shard_first = np.cumsum(shard_tokens) - shard_tokens
    starts = np.concatenate(
        [
            block_starts(lengths, int(first), config.seq_len)
            for lengths, first in zip(all_lengths, shard_first, strict=True)
        ]
    )
    num_val = held_out_count(len(starts), int(shard_tokens.sum()), config.seq_len, config.val_fraction)
    paths = [folder / f"{shard['name']}.tokens" for shard in manifest["shards"]]
    dtype = np.dtype(manifest["dtype"])
    packed = PackedData(
        train=TokenBlocks(paths, shard_first, dtype, starts[num_val:], config.seq_len),
        val=TokenBlocks(paths, shard_first, dtype, starts[:num_val], config.seq_len),
        seq_len=config.seq_len,
        tokens=len(starts) * config.seq_len,
    )
    return tokenizer, packed


def prepared_config(config: DataConfig, folder: Path) -> DataConfig:
    """``config`` reading ``folder``."""
    return replace(config, prepared=str(folder))
