"""Streamed hub datasets (``data=hub data.streaming=true``): read, tokenized and packed on the fly.

Nothing is downloaded whole. The first documents of the stream make the held-out blocks
(``data.stream_val_blocks`` of them, kept in memory); training reads the rest, split across data-parallel ranks
with ``datasets.distributed.split_dataset_by_node``, in the dataset's order (a shuffle buffer could not be
resumed exactly). Each rank concatenates its documents, end-of-text after each, and cuts its steps from that
stream; its cursor (the dataset's ``state_dict``, the tokens read but not yet served, the epoch) goes into
checkpoints, so a resumed run continues with the very next token.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from bmojo.data.config import DataConfig, DataSource
from bmojo.data.corpus import DataError
from bmojo.data.packing import PackedData, check_packing, tokenize_texts
from bmojo.data.tokenizer import build_tokenizer


@dataclass
class StreamedBlocks:
    """The training part of a stream: the rows after the first ``skip_documents`` (the held-out ones)."""

    config: DataConfig
    tokenizer: PreTrainedTokenizerBase
    skip_documents: int


def stream_documents(config: DataConfig) -> datasets.IterableDataset:
    """The configured hub dataset (a hub name, or a local folder of data files) as a stream."""
    if config.source != DataSource.hub or not config.hub_name:
        raise DataError("data.streaming=true streams a hub dataset: use data=hub and data.hub_name=<name or folder>")
    try:
        return datasets.load_dataset(
            config.hub_name, config.hub_config, split=config.hub_split, streaming=True, cache_dir=config.cache_dir
        )
    except Exception as error:
        raise DataError(
            f"could not stream hub dataset {config.hub_name!r} (split {config.hub_split!r}): {error}; without "
            "network, point data.hub_name at a local folder of data files, or use data=files"
        ) from error


def _text(row: dict, text_field: str) -> str | None:
    """The row's text, None for an empty one (skipped, but still counted as a row read)."""
    if text_field not in row:
        raise DataError(f"the streamed dataset has no column {text_field!r}; columns: {list(row)}")
    text = row[text_field]
    return text if text and text.strip() else None


def _texts(documents: Iterator[dict], text_field: str) -> Iterator[str]:
    for row in documents:
        text = _text(row, text_field)
        if text is not None:
            yield text


def open_stream(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedTokenizerBase, PackedData]:
    """The held-out blocks cut from the stream's first documents, and the rest as :class:`StreamedBlocks`."""
    check_packing(config.seq_len, config.val_fraction)
    if tokenizer is None:
        if config.tokenizer == "bpe":
            raise DataError(
                "data.streaming=true cannot train a BPE on a stream: set data.tokenizer=bytes or a Hugging Face "
                "tokenizer (name or folder)"
            )
        tokenizer = build_tokenizer(config.tokenizer, iter(()), config.bpe_vocab_size)
    wanted = config.stream_val_blocks * config.seq_len
    tokens: list[int] = []
    read = 0  # rows, empty ones included: training skips this many rows of the stream
    for row in stream_documents(config):
        read += 1
        text = _text(row, config.text_field)
        if text is not None:
            tokens.extend(tokenize_texts(tokenizer, [text])[0])
            if len(tokens) >= wanted:
                break
    if len(tokens) < wanted or config.stream_val_blocks < 1:
        raise DataError(
            f"the stream has {len(tokens)} tokens in all, too few for data.stream_val_blocks="
            f"{config.stream_val_blocks} held-out blocks (at least 1) of data.seq_len={config.seq_len} and training"
        )
    val = np.asarray(tokens[:wanted], dtype=np.int64).reshape(config.stream_val_blocks, config.seq_len)
    held_out = datasets.Dataset.from_dict({"input_ids": val}).with_format("numpy")
    packed = PackedData(StreamedBlocks(config, tokenizer, read), held_out, config.seq_len, tokens=wanted)
    return tokenizer, packed


class StreamLoader:
    """Serves one optimizer step of this rank's streamed blocks at a time, as :class:`BlockLoader` does for
    blocks in memory; ``state_dict`` is the exact position of this rank in its share of the stream."""

    def __init__(
        self,
        stream: StreamedBlocks,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stream = stream
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.seq_len = stream.config.seq_len
        # Split, then skip: datasets applies a skip made after the split to each rank's part as it iterates. A
        # rank given every world_size-th row (files not a multiple of the ranks) skips the held-out rows of the
        # whole stream, then takes its rows; a rank given whole files skips the first rows of its own files, which
        # hold every held-out row it has (ranks other than 0 thus skip a few training rows). Skipping before the
        # split would instead divide the skip among the ranks' files, and rank 0 would train on held-out rows.
        documents = split_dataset_by_node(stream_documents(stream.config), rank=rank, world_size=world_size)
        self.documents = documents.skip(stream.skip_documents)
        # datasets' state_dict() returns a copy, and these are replaced, never changed in place: no copies here.
        self._start = self.documents.state_dict()
        self.epoch = 0
        self._pending: list[int] = []  # tokens of documents read, not yet served
        self._position = self._start  # the stream's state after the last document read
        self._texts: Iterator[str] | None = None

    def _next_text(self) -> str:
        for _ in range(2):  # at most one epoch boundary
            if self._texts is None:
                self.documents.load_state_dict(copy.deepcopy(self._position))
                self._texts = _texts(iter(self.documents), self.stream.config.text_field)
            text = next(self._texts, None)
            if text is not None:
                self._position = self.documents.state_dict()
                return text
            self.epoch += 1
            self._position, self._texts = self._start, None
        raise DataError(
            f"data-parallel rank {self.rank} of {self.world_size} gets no document from the stream after its "
            f"{self.stream.skip_documents} held-out documents; use a larger dataset"
        )

    def next_step(self) -> torch.Tensor:
        """This rank's blocks for one optimizer step: ``[grad_accum_steps, micro_batch_size, seq_len]`` long."""
        needed = self.grad_accum_steps * self.micro_batch_size * self.seq_len
        while len(self._pending) < needed:
            self._pending.extend(tokenize_texts(self.stream.tokenizer, [self._next_text()])[0])
        step, self._pending = self._pending[:needed], self._pending[needed:]
        return torch.tensor(step, dtype=torch.long).view(self.grad_accum_steps, self.micro_batch_size, self.seq_len)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "stream": copy.deepcopy(self._position),
            "pending": torch.tensor(self._pending, dtype=torch.long),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"the stream cursor was saved with {state['world_size']} data-parallel ranks, this run has "
                f"{self.world_size}; resume with the same layout"
            )
        self.epoch = int(state["epoch"])
        self._position = copy.deepcopy(state["stream"])
        self._pending = state["pending"].tolist()
        self._texts = None
