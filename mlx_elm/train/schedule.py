"""Learning-rate schedule: linear warmup from 0, then cosine decay to ``min_lr``."""

from __future__ import annotations

from typing import Callable

import mlx.optimizers as optim


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> Callable:
    """A schedule over optimizer steps (0-based). Without warmup it starts at ``lr``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    decay = optim.cosine_decay(lr, max(total_steps - warmup_steps, 1), min_lr)
    if warmup_steps == 0:
        return decay
    # step 0 already gets a small non-zero rate, so no optimizer step is wasted.
    warm = optim.linear_schedule(lr / (warmup_steps + 1), lr, warmup_steps)
    return optim.join_schedules([warm, decay], [warmup_steps])


def build_optimizer(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                    weight_decay: float = 0.0):
    """AdamW over the schedule above."""
    return optim.AdamW(learning_rate=warmup_cosine(lr, total_steps, warmup_steps, min_lr),
                       weight_decay=weight_decay)
