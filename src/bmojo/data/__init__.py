"""Data pipeline (DESIGN §7): documents → tokenizer → packed blocks → resumable, rank-sharded batches.

Blocks come from tokenizing at start-up (:func:`pack_documents`), from a folder of token shards written once by
``bmojo-prepare`` (``data.prepared``, :mod:`bmojo.data.prepared`), or from a stream (``data.streaming``).
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from bmojo.data.config import DataConfig, DataSource
from bmojo.data.corpus import CorpusReport, DataError, load_documents, stdlib_documents
from bmojo.data.loader import BlockLoader, eval_batches, training_loader
from bmojo.data.mqar import prepare_mqar
from bmojo.data.packing import PackedData, pack_documents
from bmojo.data.prepared import TokenBlocks, open_prepared
from bmojo.data.shards import PrepareResult, prepare_folder, tokenizer_for_documents
from bmojo.data.streaming import StreamedBlocks, StreamLoader, open_stream
from bmojo.data.tokenizer import END_OF_TEXT, build_tokenizer, byte_tokenizer, load_pretrained_tokenizer, train_bpe

logger = logging.getLogger(__name__)

__all__ = [
    "END_OF_TEXT",
    "BlockLoader",
    "CorpusReport",
    "DataConfig",
    "DataSource",
    "DataError",
    "PackedData",
    "PrepareResult",
    "StreamLoader",
    "StreamedBlocks",
    "TokenBlocks",
    "build_tokenizer",
    "byte_tokenizer",
    "eval_batches",
    "load_documents",
    "load_pretrained_tokenizer",
    "open_prepared",
    "open_stream",
    "pack_documents",
    "prepare_data",
    "prepare_folder",
    "stdlib_documents",
    "train_bpe",
    "training_loader",
]


def prepare_data(
    config: DataConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedTokenizerBase, PackedData]:
    """Load, tokenize (training a tokenizer unless one is given) and pack the configured corpus; with
    ``data.prepared``, open that folder's shards instead (nothing is tokenized); with ``data.streaming``, open
    the stream (its training blocks are read as training goes)."""
    if config.source == DataSource.mqar:
        return prepare_mqar(config.mqar, config.seq_len, seed, tokenizer)
    if config.streaming:
        tokenizer, packed = open_stream(config, tokenizer)
        logger.info("streaming %s: %d held-out blocks of %d", config.hub_name, len(packed.val), config.seq_len)
        return tokenizer, packed
    if config.prepared:
        tokenizer, packed = open_prepared(config, seed, tokenizer)
        logger.info(
            "prepared folder %s: %s tokens, %d training blocks",
            config.prepared,
            f"{packed.tokens:,}",
            len(packed.train),
        )
        return tokenizer, packed
    documents, report = load_documents(config, seed)
    logger.info("corpus: %s", report.summary())
    if tokenizer is None:
        tokenizer = tokenizer_for_documents(documents, config)
    packed = pack_documents(documents, tokenizer, config.seq_len, config.val_fraction)
    logger.info(
        "packed %s tokens: %d training and %d held-out blocks of %d",
        f"{packed.tokens:,}",
        len(packed.train),
        len(packed.val),
        config.seq_len,
    )
    return tokenizer, packed
