"""The ``data`` group of the recipes: where text comes from, how it is tokenized, packed and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from bmojo.data.mqar import MqarConfig


class DataSource(Enum):
    stdlib = "stdlib"  # the Python standard library's sources and documentation topics: no network needed
    files = "files"  # local text / jsonl / parquet files
    hub = "hub"  # a dataset name on the Hugging Face hub
    mqar = "mqar"  # synthetic multi-query associative recall (data.mqar), generated on the fly


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, packed and split."""

    source: DataSource = DataSource.stdlib
    paths: list[str] = field(default_factory=list)  # files, folders or glob patterns (source=files)
    format: str | None = None  # text | json | parquet; None: from each file's suffix
    text_field: str = "text"  # column holding the text in jsonl / parquet / hub data
    hub_name: str | None = None  # a hub name, or a local folder of data files (offline)
    hub_config: str | None = None
    hub_split: str = "train"
    max_documents: int | None = None  # keep at most this many documents (a seeded sample)
    max_chars: int | None = None  # keep documents until this many characters (a seeded sample)
    tokenizer: str = "bpe"  # bpe (trained on the corpus) | bytes | a Hugging Face tokenizer name or folder
    bpe_vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.02
    skip_bad_files: bool = False  # skip (and count) unreadable or non-UTF-8 files instead of failing
    shuffle: bool = True
    cache_dir: str | None = None  # datasets cache; None: the Hugging Face default
    # A folder written by bmojo-prepare from this recipe: training memory-maps its token shards instead of
    # tokenizing (every rank reads only its own blocks). None: tokenize at start-up.
    prepared: str | None = None
    streaming: bool = False  # source=hub only: stream the dataset, tokenize and pack on the fly, never download it all
    stream_val_blocks: int = 64  # streaming: the held-out blocks, cut from the first documents of the stream
    mqar: MqarConfig = field(default_factory=MqarConfig)  # source=mqar only
