"""Dropout whose masks come from 16-bit slices of 64-bit random draws: same distribution, less RNG.

On CPU, ``nn.Dropout`` draws one Bernoulli sample per element (``bernoulli_``); in our training
step that was the single largest op (about a quarter of the step in an ad-hoc profile). Sixteen
random bits per element set p to 1/65536, so we draw int64 words with ``random_`` (one generator
call per 4 elements), view them as int16 and keep an element when its 16 bits clear a threshold.
The drop probability is then ``round(p * 65536) / 65536`` (0.100006 for p = 0.1), the scale
``1 / (1 - that)``, and every element is independent, as with ``nn.Dropout``. Masks come from
torch's default generator, so ``torch.manual_seed`` reproduces them.

The mask is built once in the input's dtype with the scale folded in (in bf16 the scale is
rounded to bf16, as nn.Dropout's bf16 masks round it), so forward and backward are one multiply
each (autograd keeps the mask for the backward, as for any constant factor).
``dropout_masks="bernoulli"`` keeps PyTorch's ``F.dropout`` (exact PyTorch semantics); the
default, "auto", takes random bits on CPU and PyTorch's fused kernels on GPUs.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

DropoutMasks = Literal["auto", "random_bits", "bernoulli"]
_INT16_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """Number of the 65536 int16 values that drop an element (rounded p * 65536)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * _INT16_LEVELS)


def effective_p(p: float) -> float:
    """The drop probability the random-bits masks actually realise for ``p``."""
    return drop_threshold(p) / _INT16_LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Scaled keep mask: ``1 / (1 - p')`` with probability ``1 - p'``, else 0 (p' = effective_p)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    # (Almost) the full int64 range, so each of a word's four 16-bit slices is uniform over int16;
    # ``random_()`` without bounds would leave the sign bit 0 and bias the top slice.
    words.random_(-(1 << 63), (1 << 63) - 1)
    bits = words.view(torch.int16)[:numel].view(shape)
    dropped = drop_threshold(p)
    scale = _INT16_LEVELS / (_INT16_LEVELS - dropped)
    return (bits >= dropped - (1 << 15)).to(dtype).mul_(scale)


def uses_random_bits(masks: DropoutMasks, device: torch.device) -> bool:
    """'auto' takes random bits on CPU, where training steps are faster with them (measured:
    docs/RESULTS.md#dropout-masks), and PyTorch's own dropout elsewhere: on CUDA ``F.dropout``
    and SDPA's attention dropout are single fused kernels (not measured here: no GPU)."""
    if masks == "auto":
        return device.type == "cpu"
    return masks == "random_bits"


def random_bits_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout with random-bits masks (``Dropout`` picks it by ``masks``)."""
    return x if p == 0.0 else x * keep_mask(x.shape, p, x.dtype, x.device)


class Dropout(nn.Module):
    """``nn.Dropout(p)`` with a choice of mask generator (see the module docstring)."""

    def __init__(self, p: float = 0.1, masks: DropoutMasks = "auto"):
        super().__init__()
        drop_threshold(p)  # validates p
        if masks not in get_args(DropoutMasks):
            raise ValueError(f"dropout_masks must be one of {get_args(DropoutMasks)}, got {masks!r}")
        self.p, self.masks = p, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if uses_random_bits(self.masks, x.device):
            return random_bits_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, masks={self.masks}"
