"""Inverse-square-root learning rate with warm-up (T5 / TIGER schedule).

The paper trains with lr 0.01 "for the first 10k steps and then inverse square root decay":

    lr(step) = base_lr * ramp(step) * sqrt(decay_start / max(step, decay_start))
    ramp(step) = min(1, (step + 1) / warmup_steps)        (1 when warmup_steps == 0)

so the rate climbs linearly for ``warmup_steps`` (a short ramp keeps AdamW at lr 1e-2 stable in the
first updates, where Adam's moment estimates are still noise), holds at ``base_lr`` until
``decay_start``, then decays as 1/sqrt(step). ``decay_start`` must be >= 1.
"""

from __future__ import annotations

import math

import torch


def inverse_sqrt_factor(step: int, warmup_steps: int, decay_start: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if decay_start < 1:
        raise ValueError(f"decay_start must be >= 1, got {decay_start}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return ramp * math.sqrt(decay_start / max(step, decay_start))


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                          decay_start: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer``'s base rates; call ``.step()`` after every optimizer step.

    Its ``state_dict()`` holds only the step counter, so it checkpoints and resumes exactly.
    """
    # Validate eagerly: LambdaLR evaluates the lambda at construction anyway, but a clear message
    # beats an error from inside torch.
    inverse_sqrt_factor(0, warmup_steps, decay_start)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt_factor(step, warmup_steps, decay_start))
