"""A Mamba-2 mixer split by head over tensor-parallel ranks: its per-rank sizes and, when a B/C group spans
several ranks, a gated norm whose group statistics are summed over them. Shared by both engines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.model.mamba2 import Mamba2Mixer


def group_parts(num_groups: int, size: int) -> int:
    """Into how many slices the B/C groups are cut over ``size`` ranks (all of them, or one per group)."""
    return size if num_groups >= size else num_groups


def localize_ssm_sizes(mixer: Mamba2Mixer, size: int) -> None:
    """Turn the whole-model sizes ``forward`` reads into this rank's: its heads, channels and B/C groups."""
    groups = mixer.num_groups // group_parts(mixer.num_groups, size)
    inner = mixer.inner_size // size
    heads = mixer.num_heads // size
    width = groups * mixer.state_size
    mixer.inner_size, mixer.num_heads, mixer.num_groups = inner, heads, groups
    mixer.conv_dim = inner + 2 * width
    mixer.in_proj_segments = (inner, inner, width, width, heads)


class SharedGroupGatedRMSNorm(nn.Module):
    """Mamba-2's gated norm (``RMSNorm(y * silu(z))`` per group) when one norm group spans ``size / groups``
    ranks: each rank sums the squares of its channels, the sums are added up over the ranks of the group, and
    every rank normalises its channels by the group's mean. Keeps the replaced norm's ``weight`` (its slice).

    ``sum_over_ranks`` adds a tensor over the tensor-parallel group, forward and backward (every rank both feeds
    and reads the statistic).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        group_size: int,
        eps: float,
        rank: int,
        size: int,
        num_groups: int,
        sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.weight = weight
        self.group_size, self.eps = group_size, eps
        self.num_groups = num_groups
        self.group = rank // (size // num_groups)
        self.sum_over_ranks = sum_over_ranks

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: [B, T, C] (this rank's channels, all in one group) -> [B, T, C]."""
        gated = y.float() * F.silu(z.float())
        one_hot = torch.zeros(self.num_groups, device=y.device)
        one_hot[self.group] = 1.0
        # Every group's slot is summed over all ranks; only the ranks of this group write into its slot.
        totals = self.sum_over_ranks(gated.pow(2).sum(-1, keepdim=True) * one_hot)
        mean = totals[..., self.group : self.group + 1] / self.group_size
        return (gated * torch.rsqrt(mean + self.eps) * self.weight.float()).to(y.dtype)


def share_norm_groups(
    mixer: Mamba2Mixer, full_groups: int, rank: int, size: int, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace ``mixer.norm`` by :class:`SharedGroupGatedRMSNorm` if its groups span several ranks (call after the
    norm's weight is sliced, before :func:`localize_ssm_sizes`)."""
    if full_groups >= size:
        return
    norm = mixer.norm
    mixer.norm = SharedGroupGatedRMSNorm(
        norm.weight, norm.group_size, norm.eps, rank, size, full_groups, sum_over_ranks
    )
