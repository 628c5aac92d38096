"""The next-token loss of vocabulary-parallel logits through neuronx-distributed's ``parallel_cross_entropy``.

Imported only by the NxD engine (it imports neuronx-distributed at module level). ``parallel_cross_entropy`` is a
global name of this module on purpose: NxD's pipeline tracer (``pipeline/trace.py``) keeps its parallel
functions out of the traced graph by patching the globals of each traced forward, so a reference held anywhere
else (an attribute, a ``functools.partial``) would be traced into, collectives and in-place updates included.
"""

from __future__ import annotations

import torch
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy
from torch import nn


class VocabParallelLMLoss(nn.Module):
    """Mean next-token loss from vocab-parallel logits [B, T, V/tp] and unshifted labels [B, T] (-100 ignored).

    ``parallel_cross_entropy`` returns per-token losses, without reduction or ignore_index, and subtracts the
    maximum from its input in place: the logits are cloned and the masking and averaging are done here.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = logits[:, :-1].clone().float()
        targets = labels[:, 1:]
        per_token = parallel_cross_entropy(shifted, targets)
        keep = (targets != -100).float()
        return (per_token * keep).sum() / keep.sum().clamp(min=1.0)
