"""Mask losses on logits: the paper's (normalized) CE / RCE / MAE, the field's other noise-robust
losses, and BoxInst's box terms, combined by MaskLoss. See docs/losses.md.

Imports nothing of the package: ``pixelwise`` (elementwise losses), ``region`` (per-RoI losses)
and ``mask_loss`` (their weighted sum).
"""

from .mask_loss import MaskLoss
from .pixelwise import (
    cross_entropy,
    generalized_cross_entropy,
    mae,
    negative_cross_entropy,
    reverse_cross_entropy,
)
from .region import box_projection, pairwise_affinity, soft_dice, student_t

__all__ = [
    "MaskLoss",
    "box_projection",
    "cross_entropy",
    "generalized_cross_entropy",
    "mae",
    "negative_cross_entropy",
    "pairwise_affinity",
    "reverse_cross_entropy",
    "soft_dice",
    "student_t",
]
