"""Tokenize documents and pack them into fixed-length blocks with end-of-text between documents."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from bmojo.data.corpus import DataError

# Documents concatenated per packing group; each group's tail shorter than a block is dropped. Prepared
# folders (bmojo.data.prepared) cut their blocks by the same groups, so both paths yield the same blocks.
DOCS_PER_PACK = 1000


@dataclass
class PackedData:
    """Held-out and training blocks: each a ``datasets.Dataset`` (numpy format) whose ``input_ids`` rows hold
    ``seq_len`` ids, or an object read the same way (memory-mapped shards; a stream for ``train``)."""

    train: Any
    val: Any
    seq_len: int
    tokens: int  # tokens in all blocks together
    label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: every next token is a target

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's ``labels`` for a batch ``[B, T]`` of these blocks (synthetic tasks mask all but answers)."""
        return input_ids if self.label_fn is None else self.label_fn(input_ids)


def check_packing(seq_len: int, val_fraction: float) -> None:
    """Refuse a block length or held-out fraction that packing cannot honour."""
    if seq_len < 2:
        raise DataError(f"data.seq_len={seq_len} is too short; next-token training needs at least 2")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's ids with end-of-text appended, as packing concatenates them."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [doc + [tokenizer.eos_token_id] for doc in ids]


def held_out_count(num_blocks: int, tokens: int, seq_len: int, val_fraction: float) -> int:
    """How many of ``num_blocks`` (the first ones) are held out: ``ceil(val_fraction * blocks)``, at least one
    and never all; ``tokens`` (the corpus's) only words the error for a corpus too short for two blocks."""
    if num_blocks < 2:
        raise DataError(
            f"corpus too short: {tokens} tokens make {num_blocks} block(s) of data.seq_len={seq_len}, and "
            "training needs at least 2 (one held out); add text or lower data.seq_len"
        )
    return min(num_blocks - 1, max(1, math.ceil(val_fraction * num_blocks)))


def pack_documents(
    documents: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, val_fraction: float
) -> PackedData:
    """Tokenize ``documents`` (column ``text``), append end-of-text to each, cut ``seq_len`` blocks.

    The first ``ceil(val_fraction * blocks)`` blocks (at least one) are held out; documents arrive already
    shuffled, so that is a random sample of documents.
    """
    check_packing(seq_len, val_fraction)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"ids": tokenize_texts(tokenizer, batch["text"])}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = [token for doc in batch["ids"] for token in doc]
        usable = len(stream) - len(stream) % seq_len
        return {"input_ids": [stream[start : start + seq_len] for start in range(0, usable, seq_len)]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenize")
    blocks = tokenized.map(
        pack, batched=True, batch_size=DOCS_PER_PACK, remove_columns=["ids"], desc=f"pack into {seq_len}"
    )
    tokens = sum(len(ids) for ids in tokenized["ids"]) if len(blocks) < 2 else len(blocks) * seq_len
    num_val = held_out_count(len(blocks), tokens, seq_len, val_fraction)
    return PackedData(
        train=blocks.select(range(num_val, len(blocks))).with_format("numpy"),
        val=blocks.select(range(num_val)).with_format("numpy"),
        seq_len=seq_len,
        tokens=len(blocks) * seq_len,
    )
