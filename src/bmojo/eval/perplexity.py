"""Held-out perplexity at several context lengths, always on the same tokens (length extrapolation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from bmojo.data import DataConfig, eval_batches, prepare_data


@dataclass
class LengthResult:
    length: int  # context length: the tokens are cut into blocks of this many
    loss: float  # mean next-token cross-entropy over every predicted token (no auxiliary loss)
    tokens: int  # predicted tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def cut_blocks(blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Blocks ``[N, L]`` cut into ``[N * L / length, length]`` (``length`` must divide ``L``)."""
    if blocks.shape[1] % length:
        raise ValueError(f"context length {length} does not divide the evaluation blocks of {blocks.shape[1]}")
    return blocks.reshape(-1, length)


@torch.no_grad()
def perplexity_at_lengths(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    lengths: list[int],
    batch_size: int,
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[LengthResult]:
    """Loss of ``model`` on the same held-out tokens ``blocks [N, max(lengths)]`` read at each context length.

    Every length sees exactly the same tokens, so the numbers differ only by how much context each token
    had. ``labels`` maps a batch to its labels (default: the batch itself, every next token a target).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            total, count = 0.0, 0
            for batch in cut_blocks(blocks, length).to(device).split(batch_size):
                targets = batch if labels is None else labels(batch)
                out = model(batch, labels=targets)
                predicted = int((targets[:, 1:] != -100).sum())
                total += float(out.loss - out.aux_loss) * predicted
                count += predicted
            results.append(LengthResult(length, total / count, count))
    finally:
        model.train(was_training)
    return results


def heldout_perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    lengths: list[int],
    batch_size: int,
    batches: int,
    seed: int,
) -> list[LengthResult]:
    """Perplexity at each of ``lengths`` on the held-out split of ``data`` (split with ``seed``, as in training).

    The split is packed once at the longest length, ``batch_size * batches`` of those blocks are kept, and
    every shorter length reads the same tokens cut into shorter blocks.
    """
    _, packed = prepare_data(replace(data, seq_len=max(lengths)), seed, tokenizer)
    blocks = torch.cat(list(eval_batches(packed.val, batch_size, batches)))
    return perplexity_at_lengths(model, blocks, sorted(lengths), batch_size, labels=packed.label_fn)
