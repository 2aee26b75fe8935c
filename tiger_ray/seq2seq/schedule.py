"""Learning-rate schedule: warm-up, constant, inverse-square-root decay (T5 / TIGER), and an
optional linear cool-down at the end (warm-up / stable / decay).

The paper trains with lr 0.01 "for the first 10k steps and then inverse square root decay":

    lr(step) = base_lr * ramp(step) * sqrt(decay_start / max(step, decay_start)) * cool(step)
    ramp(step) = min(1, (step + 1) / warmup_steps)        (1 when warmup_steps == 0)
    cool(step) = 1 before the cool-down, then 1 - (step - start) / length, down to 0

so the rate climbs linearly for ``warmup_steps`` (a short ramp keeps AdamW at lr 1e-2 stable in the
first updates, where Adam's moment estimates are still noise), holds at ``base_lr`` until
``decay_start``, then decays as 1/sqrt(step). ``decay_start`` must be >= 1.

The cool-down exists for runs cut short by a wall-clock budget: at a constant rate the loss
plateaus at a level set by the step size, and annealing the rate to zero at the end recovers what
a full decay schedule would have (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations"). How many steps are left is only known once the run has
measured its own speed, so the cool-down is started during training (``start_cooldown``);
``cooldown_steps_within_budget`` decides when and for how long.
"""

from __future__ import annotations

import math

import torch


def inverse_sqrt_factor(step: int, warmup_steps: int, decay_start: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), no cool-down."""
    if decay_start < 1:
        raise ValueError(f"decay_start must be >= 1, got {decay_start}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return ramp * math.sqrt(decay_start / max(step, decay_start))


class LrFactor:
    """step -> multiplier of the base rate. A callable object rather than a lambda so that
    LambdaLR checkpoints its attributes: a resumed run continues a cool-down it had started."""

    def __init__(self, warmup_steps: int, decay_start: int):
        inverse_sqrt_factor(0, warmup_steps, decay_start)  # validate now, with a clear message
        self.warmup_steps = warmup_steps
        self.decay_start = decay_start
        self.cooldown_start = -1  # step where the cool-down began; -1 = not started
        self.cooldown_steps = 0

    def cooling(self, step: int) -> bool:
        """Whether ``step`` is inside a cool-down (one can be scheduled ahead of time)."""
        return 0 <= self.cooldown_start <= step

    def start_cooldown(self, step: int, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"a cool-down needs >= 1 step, got {steps}")
        self.cooldown_start, self.cooldown_steps = int(step), int(steps)

    def cooldown_done(self, step: int) -> bool:
        return self.cooling(step) and step >= self.cooldown_start + self.cooldown_steps

    def __call__(self, step: int) -> float:
        factor = inverse_sqrt_factor(step, self.warmup_steps, self.decay_start)
        if self.cooling(step):
            factor *= max(0.0, 1.0 - (step - self.cooldown_start) / self.cooldown_steps)
        return factor


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                          decay_start: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``optimizer``'s base rates; call ``.step()`` after every optimizer step.

    ``schedule.lr_lambdas[0]`` is the ``LrFactor`` (to start a cool-down). ``state_dict()`` holds
    the step counter and the cool-down, so it checkpoints and resumes exactly.
    """
    factor = LrFactor(warmup_steps, decay_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor] * len(optimizer.param_groups))


def lr_factor(scheduler: torch.optim.lr_scheduler.LambdaLR) -> LrFactor:
    return scheduler.lr_lambdas[0]


def cooldown_steps_within_budget(*, elapsed: float, budget: float, fraction: float,
                                 steps_done: int, reserve: float = 0.0) -> int:
    """Whether a run with a wall-clock ``budget`` (seconds) should begin its cool-down now, and
    for how many steps: 0 until ``elapsed`` reaches ``(1 - fraction) * budget``; then the steps
    that fit in the time left (less ``reserve``, e.g. the final validation), at the speed of the
    ``steps_done`` steps so far (validation pauses included, since they recur). At least 1."""
    if fraction <= 0 or budget <= 0 or elapsed < (1.0 - fraction) * budget or steps_done < 1:
        return 0
    steps_per_second = steps_done / max(elapsed, 1e-9)
    return max(1, int(steps_per_second * max(0.0, budget - elapsed - reserve)))
