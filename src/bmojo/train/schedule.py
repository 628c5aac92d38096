"""Learning-rate schedules as multipliers of the peak rate (for ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import math
from collections.abc import Callable

from bmojo.train.config import OptimConfig, Schedule


def lr_multiplier(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """``step -> lr / peak lr``: linear warmup, then cosine, warmup-stable-decay or constant."""
    warmup = max(0, optim.warmup_steps)
    floor = optim.min_lr_ratio
    decay_start = max(warmup, int(round(max_steps * (1.0 - optim.decay_fraction))))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == Schedule.constant:
            return 1.0
        if optim.schedule == Schedule.cosine:
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress

    return multiplier
