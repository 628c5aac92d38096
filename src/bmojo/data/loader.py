"""Batches of packed blocks with a resumable cursor, sharded by data-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch

from bmojo.data.corpus import DataError
from bmojo.data.packing import PackedData
from bmojo.data.prepared import TokenBlocks
from bmojo.data.streaming import StreamedBlocks, StreamLoader


class BlockLoader:
    """Serves one optimizer step of training blocks at a time.

    Each epoch visits the blocks in a permutation seeded by ``(seed, epoch)``; a step takes the next
    ``grad_accum_steps * world_size * micro_batch_size`` of them (an incomplete tail starts the next epoch,
    so every step has the same shape) and this rank keeps its share. The cursor ``(epoch, offset)`` is the
    whole state: restoring it replays the exact same batches.
    """

    def __init__(
        self,
        blocks: datasets.Dataset | TokenBlocks,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        if len(blocks) < self.global_batch:
            raise DataError(
                f"only {len(blocks)} training blocks, fewer than one step needs ({self.global_batch} = micro batch "
                f"{micro_batch_size} x accumulation {grad_accum_steps} x ranks {world_size}); add text or lower "
                "trainer.micro_batch_size, trainer.grad_accum_steps or data.seq_len"
            )
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.blocks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def next_step(self) -> torch.Tensor:
        """This rank's blocks for one optimizer step: ``[grad_accum_steps, micro_batch_size, seq_len]`` long."""
        if self.offset + self.global_batch > len(self.blocks):
            self.epoch += 1
            self.offset = 0
            self._order = self._permutation(self.epoch)
        chosen = self._order[self.offset : self.offset + self.global_batch]
        self.offset += self.global_batch
        # step layout [accumulation, rank, micro]: every rank's micro-batch k comes from the same stretch
        mine = chosen.reshape(self.grad_accum_steps, self.world_size, self.micro_batch_size)[:, self.rank]
        ids = self.blocks[mine.reshape(-1).tolist()]["input_ids"]
        return torch.as_tensor(np.asarray(ids), dtype=torch.long).view(self.grad_accum_steps, self.micro_batch_size, -1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"the data cursor was saved with {state['world_size']} data-parallel ranks, this run has "
                f"{self.world_size}; resume with the same layout"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


def training_loader(
    data: PackedData,
    micro_batch_size: int,
    grad_accum_steps: int,
    seed: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> BlockLoader | StreamLoader:
    """The loader of ``data.train``: a :class:`StreamLoader` for a stream, else a :class:`BlockLoader`."""
    if isinstance(data.train, StreamedBlocks):
        return StreamLoader(data.train, micro_batch_size, grad_accum_steps, rank, world_size)
    return BlockLoader(data.train, micro_batch_size, grad_accum_steps, seed, shuffle, rank, world_size)


def eval_batches(
    blocks: datasets.Dataset, micro_batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """This rank's held-out micro-batches ``[micro_batch_size, seq_len]``, always the same ones, in order."""
    count = min(len(blocks), micro_batch_size * max_batches * world_size)
    mine = list(range(rank, count, world_size))
    for start in range(0, len(mine), micro_batch_size):
        ids = blocks[mine[start : start + micro_batch_size]]["input_ids"]
        yield torch.as_tensor(np.asarray(ids), dtype=torch.long)
