"""Eidetic memory of the B'MOJO layer (DESIGN §2.4): innovation scores, causal per-block selection, FIFO.

Selection is never differentiated; it only decides which verbatim keys/values the attention may read.
The parallel form (:func:`select_memory`) is static-shaped for XLA; :class:`MemoryFIFO` is its recurrent twin,
and tests hold the two to the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class InnovationPredictor(nn.Module):
    """Linear one-step predictor ``P`` of the layer input from the SSM output (full ``D x D`` or rank ``r``).

    It computes in fp32 whatever the dtype of its weights, input or an enclosing autocast: where it predicts
    well, ``h - P s`` is a small difference of near-equal terms, which bf16 would leave mostly rounding.
    """

    def __init__(self, hidden_size: int, rank: int | None):
        super().__init__()
        if rank is None:
            self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        else:
            self.proj = nn.Sequential(
                nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False)
            )

    def forward(self, s_prev: torch.Tensor) -> torch.Tensor:
        """s_prev: [B, T, D] -> P s_prev: [B, T, D] fp32; gradients reach the weights in their own dtype."""
        layers = self.proj if isinstance(self.proj, nn.Sequential) else (self.proj,)
        with torch.autocast(s_prev.device.type, enabled=False):  # autocast would cast back to bf16
            prediction = s_prev.float()
            for layer in layers:
                prediction = F.linear(prediction, layer.weight.float())
        return prediction


def innovation_scores(
    predictor: InnovationPredictor, h: torch.Tensor, s_prev: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Innovation ratio and the predictor's auxiliary loss, both computed in fp32.

    h: [B, T, D] layer input, s_prev: [B, T, D] SSM output one step earlier (zeros before the first token).
    Returns (iota: [B, T] fp32 without gradient, aux: scalar, the mean over tokens of ``||e||^2 / D``, whose
    gradient reaches only the predictor because both of its inputs are detached). Dividing by ``D`` keeps the
    loss's size independent of the width; it rescales only the predictor's gradient.
    """
    h32 = h.detach().float()
    err = h32 - predictor(s_prev.detach())
    aux = err.pow(2).mean()
    return _ratio(err.detach(), h32, eps), aux


@torch.no_grad()
def innovation_ratio(predictor: InnovationPredictor, h: torch.Tensor, s_prev: torch.Tensor, eps: float) -> torch.Tensor:
    """The ratio ``iota`` of :func:`innovation_scores` alone, for decoding (no aux loss), computed in fp32.

    h, s_prev: [B, T, D] -> iota: [B, T] fp32.
    """
    h32 = h.float()
    return _ratio(h32 - predictor(s_prev), h32, eps)


def _ratio(err: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """``||err||² / (||h||² + eps)`` per token: err, h [B, T, D] fp32 -> [B, T] fp32."""
    with torch.autocast(err.device.type, enabled=False):  # CPU autocast would run vecdot in bf16
        return torch.linalg.vecdot(err, err) / torch.linalg.vecdot(h, h).add_(eps)


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
    """Recurrent eidetic memory: which positions the last ``M`` accepted entries hold, oldest first.

    positions: [B, M] int64, valid: [B, M] bool (empty slots are the oldest ones). The entries' keys and values
    live with the caller (the attention's key buffer), slot for slot, and :meth:`push_block` moves them alike.
    """

    positions: torch.Tensor
    valid: torch.Tensor

    def push_block(
        self,
        scores: torch.Tensor,
        start: int,
        topk: int,
        threshold: float,
        block_entries: tuple[torch.Tensor, ...],
        entries: tuple[torch.Tensor, ...],
    ) -> None:
        """Run the innovation test on one finished block and append its accepted tokens, in place.

        scores: [B, Q] innovation ratios of the block's tokens, ``start`` its first position; ``block_entries``:
        the tokens' keys, values, ... [B, H, Q, Dh]; ``entries``: the memory's [B, H, M, Dh], updated with them.
        """
        offsets, cand_scores = block_candidates(scores[:, None], topk)
        offsets, accepted = offsets[:, 0], cand_scores[:, 0] > threshold  # [B, k]
        # Accepted candidates first, still in position order (a stable sort on the rejected flag).
        order = torch.sort((~accepted).to(torch.uint8), dim=-1, stable=True).indices
        chosen = offsets.gather(-1, order)
        # Row b appends its n_b accepted entries and drops its n_b oldest: new slot i is old-then-chosen slot
        # i + n_b, which never reaches a rejected candidate.
        size = self.positions.shape[1]
        source = torch.arange(size, device=scores.device) + accepted.sum(-1, keepdim=True)  # [B, M]
        self.positions.copy_(torch.cat([self.positions, chosen + start], dim=1).gather(1, source))
        self.valid.copy_(torch.cat([self.valid, torch.ones_like(accepted)], dim=1).gather(1, source))
        for block, memory in zip(block_entries, entries, strict=True):
            per_slot = (-1, memory.shape[1], -1, memory.shape[3])
            candidates = block.gather(2, chosen[:, None, :, None].expand(per_slot))
            extended = torch.cat([memory, candidates], dim=2)
            memory.copy_(extended.gather(2, source[:, None, :, None].expand(per_slot)))
