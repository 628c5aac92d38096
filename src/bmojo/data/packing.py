"""Tokenize documents and pack them into fixed-length blocks with end-of-text between documents."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from bmojo.data.corpus import DataError

_DOCS_PER_PACK = 1000  # documents concatenated per packing batch; the tail shorter than a block is dropped


@dataclass
class PackedData:
    """Held-out and training blocks, each a ``datasets.Dataset`` whose ``input_ids`` rows hold ``seq_len`` ids."""

    train: datasets.Dataset
    val: datasets.Dataset
    seq_len: int
    tokens: int  # tokens in all blocks together
    label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: every next token is a target

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's ``labels`` for a batch ``[B, T]`` of these blocks (synthetic tasks mask all but answers)."""
        return input_ids if self.label_fn is None else self.label_fn(input_ids)


def pack_documents(
    documents: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, val_fraction: float
) -> PackedData:
    """Tokenize ``documents`` (column ``text``), append end-of-text to each, cut ``seq_len`` blocks.

    The first ``ceil(val_fraction * blocks)`` blocks (at least one) are held out; documents arrive already
    shuffled, so that is a random sample of documents.
    """
    if seq_len < 2:
        raise DataError(f"data.seq_len={seq_len} is too short; next-token training needs at least 2")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = [token for doc in batch["ids"] for token in doc]
        usable = len(stream) - len(stream) % seq_len
        return {"input_ids": [stream[start : start + seq_len] for start in range(0, usable, seq_len)]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenize")
    blocks = tokenized.map(
        pack, batched=True, batch_size=_DOCS_PER_PACK, remove_columns=["ids"], desc=f"pack into {seq_len}"
    )
    if len(blocks) < 2:
        tokens = sum(len(ids) for ids in tokenized["ids"])
        raise DataError(
            f"corpus too short: {tokens} tokens make {len(blocks)} block(s) of data.seq_len={seq_len}, and "
            "training needs at least 2 (one held out); add text or lower data.seq_len"
        )
    num_val = min(len(blocks) - 1, max(1, math.ceil(val_fraction * len(blocks))))
    return PackedData(
        train=blocks.select(range(num_val, len(blocks))).with_format("numpy"),
        val=blocks.select(range(num_val)).with_format("numpy"),
        seq_len=seq_len,
        tokens=len(blocks) * seq_len,
    )
