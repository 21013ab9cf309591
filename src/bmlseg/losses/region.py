"""Losses over each RoI's whole mask: soft Dice, the T-Loss, and BoxInst's box terms.

Each function takes the mask logits of the positive RoIs, ``[P, M, M]``, and returns one value
per RoI, ``[P]``, computed in float32 (float64 stays float64), so that MaskLoss can average them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_projection", "pairwise_affinity", "soft_dice", "student_t"]

# Added to numerator and denominator of the Dice ratios, as MONAI's DiceLoss (smooth_nr,
# smooth_dr): an empty target and an empty prediction give a loss of 0, not 0 / 0.
DICE_SMOOTH = 1e-5

# BoxInst (Tian et al., CVPR 2021) compares each pixel with its 8 neighbours two pixels away.
PAIRWISE_DILATION = 2


def _as_compute_dtype(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def soft_dice(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice loss that is minimal where the prediction equals the soft target, per RoI.

    The Dice semimetric loss of Wang et al. (MICCAI 2023; MONAI ``DiceLoss(soft_label=True)``):
    with ``p = sigmoid(z)`` and sums over the RoI's pixels, the intersection is
    ``(|p|_1 + |y|_1 - |p - y|_1) / 2``, and the loss is
    ``1 - (2 intersection + s) / (|p|_1 + |y|_1 + s)``, ``s`` = DICE_SMOOTH. On a hard target the
    intersection is the usual ``sum p y``; on a soft one it is 0 exactly when ``p = y``, where
    the usual soft Dice (``sum p y``) would not be minimal.

    Args:
        logits: ``[P, M, M]``.
        target: ``[P, M, M]`` in [0, 1].

    Returns:
        ``[P]``, each in [0, 1].
    """
    p = torch.sigmoid(_as_compute_dtype(logits))
    target = target.to(p.dtype)
    total = p.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1))
    intersection = (total - (p - target).abs().sum(dim=(-2, -1))) / 2
    return 1 - (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)


def student_t(logits: Tensor, target: Tensor, log_nu: Tensor) -> Tensor:
    """The T-Loss (Gonzalez-Jimenez et al., MICCAI 2023) of each RoI, per pixel.

    The negative log-likelihood of the residual ``p - y`` (``p = sigmoid(z)``) under a
    ``D``-dimensional Student-t distribution with identity scale and ``nu = exp(log_nu)``
    degrees of freedom, ``nu`` learned with the network. The reference code models a whole
    square image (``D = image_size^2``, with fixed ``lambdas = 1``, so the residuals are weighted
    by ``e``); here one RoI's ``M x M`` mask is the sample (``D = M^2``, any M), with the same
    fixed ``lambdas``, and the value is divided by ``D`` so that it is a per-pixel loss on the
    scale of the other mask losses (the reference's sum over ``D`` pixels would outweigh the
    box losses by ``D``). The ``epsilon`` of the reference (1e-8) is kept.

    Args:
        logits: ``[P, M, M]``.
        target: ``[P, M, M]`` in [0, 1].
        log_nu: a scalar tensor, the learned ``log nu`` (the reference initializes it to 1).

    Returns:
        ``[P]``.
    """
    epsilon = 1e-8
    p = torch.sigmoid(_as_compute_dtype(logits))
    log_nu = log_nu.to(p.dtype)
    dimensions = logits.shape[-1] * logits.shape[-2]
    nu = torch.exp(log_nu) + epsilon
    lambdas = 1.0 + epsilon
    squared = ((p - target.to(p.dtype)) ** 2).sum(dim=(-2, -1)) * math.exp(lambdas)
    constant = -torch.lgamma((nu + dimensions) / 2) + torch.lgamma(nu / 2)
    constant = constant - 0.5 * dimensions * lambdas + dimensions / 2 * math.log(math.pi)
    constant = constant + dimensions / 2 * (log_nu + epsilon)
    nll = constant + (nu + dimensions) / 2 * torch.log1p(squared / nu)
    return nll / dimensions


def box_projection(logits: Tensor, target: Tensor) -> Tensor:
    """BoxInst's projection loss (Tian et al., CVPR 2021), per RoI.

    The mask's maximum over rows and over columns must match the box's: Dice loss
    ``1 - 2 sum(a b) / (sum a^2 + sum b^2)`` between the projections of ``p = sigmoid(z)`` and
    of the target, on each axis, summed. The target is the RoI's box label (the readers'
    rectangles projected onto the RoI), so its projections are the box's extent.

    Args:
        logits: ``[P, M, M]``.
        target: ``[P, M, M]`` in [0, 1].

    Returns:
        ``[P]``, each in [0, 2].
    """
    p = torch.sigmoid(_as_compute_dtype(logits))
    target = target.to(p.dtype)
    return sum(_squared_dice_loss(p.amax(dim=axis), target.amax(dim=axis)) for axis in (-2, -1))


def pairwise_affinity(
    logits: Tensor, image_patches: Tensor, target: Tensor, *, sigma: float, threshold: float
) -> Tensor:
    """BoxInst's pairwise loss (Tian et al., CVPR 2021), per RoI.

    Neighbouring pixels of similar intensity should take the same label. For each pixel and
    each of its 8 neighbours at distance PAIRWISE_DILATION, both inside the box (target >= 0.5),
    the edge counts when its image similarity ``exp(-||c_i - c_j|| / sigma)`` is at least
    ``threshold``; the loss is the mean over counted edges of ``-log P(same label)``, with
    ``P(same) = p_i p_j + (1 - p_i)(1 - p_j)``, computed from logits as a log-sum-exp. BoxInst
    uses LAB colour on RGB photographs (sigma 2, threshold 0.3); here ``c`` is the 2.5D
    intensity vector (the slice and its two neighbours, normalized per volume), so ``sigma`` is
    in units of the volume's intensity spread.

    Args:
        logits: ``[P, M, M]``.
        image_patches: ``[P, C, M, M]``, the image under each RoI on the mask's grid.
        target: ``[P, M, M]`` in [0, 1], the box label.

    Returns:
        ``[P]``; 0 for a RoI with no counted edge.
    """
    z = _as_compute_dtype(logits)[:, None]  # [P, 1, M, M], one channel for _neighbours
    log_fg, log_bg = F.logsigmoid(z), F.logsigmoid(-z)
    log_same = torch.logaddexp(
        log_fg[:, :, None] + _neighbours(log_fg), log_bg[:, :, None] + _neighbours(log_bg)
    )[:, 0]
    images = image_patches.to(z.dtype)
    # A sum of squares, not .norm(dim=1): the norm over a middle dimension made this 3x slower.
    distance = (images[:, :, None] - _neighbours(images)).square().sum(dim=1).sqrt()
    inside = (target.to(z.dtype) >= 0.5).to(z.dtype)[:, None]
    both_inside = (inside[:, :, None] * _neighbours(inside))[:, 0]
    edges = (torch.exp(-distance / sigma) >= threshold) * both_inside  # [P, 8, M, M]
    counted = edges.sum(dim=(-3, -2, -1))
    return -(log_same * edges).sum(dim=(-3, -2, -1)) / counted.clamp_min(1)


def _neighbours(values: Tensor) -> Tensor:
    """``[P, C, M, M]`` -> ``[P, C, 8, M, M]``: each pixel's 8 neighbours at PAIRWISE_DILATION,
    zero beyond the border."""
    d = PAIRWISE_DILATION
    padded = F.pad(values, (d, d, d, d))
    size_y, size_x = values.shape[-2:]
    shifts = [(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]
    return torch.stack(
        [padded[..., d + dy : d + dy + size_y, d + dx : d + dx + size_x] for dy, dx in shifts],
        dim=2,
    )


def _squared_dice_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``1 - 2 sum(a b) / (sum a^2 + sum b^2)`` over the last dimension (BoxInst's form)."""
    intersection = (prediction * target).sum(dim=-1)
    union = (prediction**2).sum(dim=-1) + (target**2).sum(dim=-1)
    return 1 - 2 * intersection / union.clamp_min(DICE_SMOOTH)
