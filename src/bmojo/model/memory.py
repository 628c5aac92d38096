"""Eidetic memory of the B'MOJO layer (DESIGN §2.4): innovation scores, causal per-block selection, FIFO.

Selection is never differentiated; it only decides which verbatim keys/values the attention may read.
The parallel form (:func:`select_memory`) is static-shaped for XLA; :class:`MemoryFIFO` is its recurrent twin,
and tests hold the two to the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class InnovationPredictor(nn.Module):
    """Linear one-step predictor ``P`` of the layer input from the SSM output (full ``D x D`` or rank ``r``)."""

    def __init__(self, hidden_size: int, rank: int | None):
        super().__init__()
        if rank is None:
            self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        else:
            self.proj = nn.Sequential(
                nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False)
            )

    def forward(self, s_prev: torch.Tensor) -> torch.Tensor:
        return self.proj(s_prev)


def innovation_scores(
    predictor: InnovationPredictor, h: torch.Tensor, s_prev: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Innovation ratio and the predictor's auxiliary loss.

    h: [B, T, D] layer input, s_prev: [B, T, D] SSM output one step earlier (zeros before the first token).
    Returns (iota: [B, T] fp32 without gradient, aux: scalar, the mean over tokens of ``||e||^2 / D``, whose
    gradient reaches only the predictor because both of its inputs are detached). Dividing by ``D`` keeps the
    loss's size independent of the width; it rescales only the predictor's gradient.
    """
    h_sg, s_sg = h.detach(), s_prev.detach()
    err = (h_sg - predictor(s_sg)).float()
    aux = err.pow(2).mean()
    iota = err.detach().pow(2).sum(-1) / (h_sg.float().pow(2).sum(-1) + eps)
    return iota, aux


def block_candidates(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` largest scores of each block, ties to the earlier position, returned in position order.

    scores: [B, NB, Q] -> (offsets in the block: [B, NB, k] int64, their scores: [B, NB, k]).
    """
    # A stable descending sort keeps equal scores in position order, so ties go to the earlier token.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    offsets = order.sort(dim=-1).values
    return offsets, scores.gather(-1, offsets)


def select_memory(
    iota: torch.Tensor, *, block: int, topk: int, threshold: float, memory_size: int, num_query_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-shaped eidetic selection: which past positions each query block may read.

    iota: [B, T] innovation ratios. Returns (positions: [B, NBq, M] int64, valid: [B, NBq, M] bool) where row
    ``c`` holds the last ``M`` accepted entries of blocks ``< c`` (oldest first), for ``c < num_query_blocks``.
    """
    batch, length = iota.shape
    num_blocks = -(-length // block)
    padded = iota.new_full((batch, num_blocks * block), float("-inf"))
    padded[:, :length] = iota
    offsets, cand_scores = block_candidates(padded.view(batch, num_blocks, block), topk)
    cand_pos = offsets + torch.arange(num_blocks, device=iota.device)[None, :, None] * block
    accepted = cand_scores > threshold  # padding is -inf, so it is never accepted
    flat_pos, flat_acc = cand_pos.flatten(1), accepted.flatten(1)
    # Compact accepted positions into the selected stream; rejected slots go to a dump slot at the end.
    rank = flat_acc.long().cumsum(-1) - 1
    slot = torch.where(flat_acc, rank, torch.full_like(rank, flat_pos.shape[1]))
    stream = torch.zeros(batch, flat_pos.shape[1] + 1, dtype=torch.long, device=iota.device)
    stream.scatter_(1, slot, flat_pos)
    per_block = accepted.long().sum(-1)  # [B, NB]
    before = torch.cat([per_block.new_zeros(batch, 1), per_block.cumsum(-1)], dim=-1)  # accepted in blocks < c
    blocks = torch.arange(num_query_blocks, device=iota.device).clamp(max=num_blocks)
    stream_rank = before[:, blocks, None] - memory_size + torch.arange(memory_size, device=iota.device)
    valid = stream_rank >= 0
    positions = stream.gather(1, stream_rank.clamp(min=0).flatten(1)).view(batch, num_query_blocks, memory_size)
    return positions, valid


@dataclass
class MemoryFIFO:
    """Recurrent eidetic memory: the last ``M`` accepted entries, oldest first.

    keys/values: [B, M, Hkv, Dh], positions: [B, M] int64, valid: [B, M] bool.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, batch: int, size: int, heads: int, dim: int, like: torch.Tensor) -> MemoryFIFO:
        return cls(
            keys=like.new_zeros(batch, size, heads, dim),
            values=like.new_zeros(batch, size, heads, dim),
            positions=torch.zeros(batch, size, dtype=torch.long, device=like.device),
            valid=torch.zeros(batch, size, dtype=torch.bool, device=like.device),
        )

    def push_block(
        self,
        scores: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        topk: int,
        threshold: float,
    ) -> None:
        """Run the innovation test on one finished block and append its accepted tokens.

        scores: [B, Q], keys/values: [B, Q, Hkv, Dh] of the block's tokens, ``start`` its first position.
        """
        offsets, cand_scores = block_candidates(scores[:, None], topk)
        offsets, accepted = offsets[:, 0], cand_scores[:, 0] > threshold
        for b in range(scores.shape[0]):
            chosen = offsets[b][accepted[b]]
            if chosen.numel() == 0:
                continue
            n = chosen.numel()
            size = self.positions.shape[1]
            self.keys[b] = torch.cat([self.keys[b], keys[b, chosen]])[-size:]
            self.values[b] = torch.cat([self.values[b], values[b, chosen]])[-size:]
            self.positions[b] = torch.cat([self.positions[b], chosen + start])[-size:]
            self.valid[b] = torch.cat([self.valid[b], self.valid.new_ones(n)])[-size:]
