"""Pixelwise binary losses on logits, and the mask loss built from them.

Notation, per pixel: ``z`` is the logit, ``p = sigmoid(z)`` the predicted probability of the
foreground, ``y`` in [0, 1] the (soft or hard) target, and ``Pmin`` (``p_min``) the clipping
bound of the paper (1e-20). ``H(a, b) = -[a log b + (1 - a) log(1 - b)]`` is the binary cross
entropy of distribution ``b`` relative to ``a``.

The paper (Felfeliyan et al., eq. 3 and 4) prints a minus sign before ``(1 - y) log(1 - p)``;
that is a typo: with it, the loss is not a cross entropy and is unbounded below. Here
``H(y, p) = -[y log p + (1 - y) log(1 - p)]``.

Everything is computed from the logits with log-sigmoid, in float32 (float64 inputs stay
float64; float16 and bfloat16 inputs are upcast), so values and gradients are finite for every
finite logit. No ``1 - clip(b)`` is ever formed, since in float32 ``1 - 1e-20 == 1``: the
prediction is clipped through its logit, and a label's ``y`` and ``1 - y`` are clipped
separately.

See docs/losses.md for the formulas and the presets of the paper's Table I.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskLoss", "cross_entropy", "mae", "reverse_cross_entropy"]


def cross_entropy(
    logits: Tensor, target: Tensor, *, normalized: bool = False, p_min: float = 1e-20
) -> Tensor:
    """Elementwise binary cross entropy ``H(y, p)``, with ``p`` clipped to ``[Pmin, 1 - Pmin]``.

    ``normalized`` divides by the sum over the two hard labels, ``H(0, p) + H(1, p) =
    -log p - log(1 - p)``, which gives a value in [0, 1] (Ma et al., 2020).

    Args:
        logits: ``z``, any shape.
        target: ``y`` in [0, 1], same shape (soft or hard).

    Returns:
        The loss per element, float32 (float64 for float64 logits).
    """
    log_p, log_q = _clipped_log_probs(logits, p_min)
    target = target.to(log_p.dtype)
    return _cross_entropy(log_p, log_q, target, 1 - target, normalized)


def reverse_cross_entropy(
    logits: Tensor, target: Tensor, *, normalized: bool = False, p_min: float = 1e-20
) -> Tensor:
    """Elementwise reverse cross entropy ``H(p, y*)``, label ``y*`` clipped to ``[Pmin, 1 - Pmin]``.

    ``normalized`` divides by the sum over the two hard labels, ``-log Pmin - log(1 - Pmin)``
    (46.05 for Pmin = 1e-20), a constant; with a hard target the normalized value is then
    ``|y - p|`` up to Pmin.

    Args:
        logits: ``z``, any shape.
        target: ``y`` in [0, 1], same shape (soft or hard).

    Returns:
        The loss per element, float32 (float64 for float64 logits).
    """
    z = _as_compute_dtype(logits)
    return _reverse_cross_entropy(z, target.to(z.dtype), normalized, p_min)


def mae(logits: Tensor, target: Tensor, *, normalized: bool = False) -> Tensor:
    """Elementwise mean absolute error ``|p - y|``.

    Ma et al. normalize MAE by its sum over the labels; for two classes that sum is
    ``|p - 0| + |p - 1| = 1``, so the normalized and plain values are equal and ``normalized``
    changes nothing (it is accepted so that every loss takes the same switch). This is half the
    two-class-vector MAE of Ma et al., ``|(1-p) - (1-y)| + |p - y|``.

    Args:
        logits: ``z``, any shape.
        target: ``y`` in [0, 1], same shape.

    Returns:
        The loss per element, float32 (float64 for float64 logits).
    """
    p = torch.sigmoid(_as_compute_dtype(logits))
    return (p - target.to(p.dtype)).abs()


class MaskLoss(nn.Module):
    """Mask loss of the paper: a weighted sum of (normalized) CE, soft CE, RCE and MAE.

    ``loss = bce * CE(hard y) + sce * CE(y) + rce * RCE(y) + mae * MAE(y)``, averaged over all
    pixels, where the hard target is ``y >= hard_threshold``. The active terms are bce, sce and
    mae, the passive term is rce (Ma et al.'s active-passive loss, APL). Terms with weight 0 are
    not computed. With ``normalized`` every term is normalized, otherwise none is.

    ``MaskLoss()`` is torchvision's mask loss (plain BCE on binary masks), apart from the
    clipping at ``p_min``.
    """

    def __init__(
        self,
        bce: float = 1.0,
        sce: float = 0.0,
        rce: float = 0.0,
        mae: float = 0.0,
        normalized: bool = True,
        p_min: float = 1e-20,
        hard_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        weights = {"bce": bce, "sce": sce, "rce": rce, "mae": mae}
        negative = {name: weight for name, weight in weights.items() if weight < 0}
        if negative:
            raise ValueError(f"MaskLoss: weights must be >= 0, got {negative}")
        if not any(weights.values()):
            raise ValueError(f"MaskLoss: at least one weight must be > 0, got {weights}")
        if not 0.0 < p_min < 0.5:
            raise ValueError(f"MaskLoss: p_min must be in (0, 0.5), got {p_min}")
        self.bce = float(bce)
        self.sce = float(sce)
        self.rce = float(rce)
        self.mae = float(mae)
        self.normalized = bool(normalized)
        self.p_min = float(p_min)
        self.hard_threshold = float(hard_threshold)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over all pixels.

        Args:
            logits: ``[P, M, M]`` mask logits of the positive RoIs for their target class.
            targets: ``[P, M, M]`` soft (or binary) targets in [0, 1].

        Returns:
            A scalar, float32 (float64 for float64 logits). For ``P == 0`` it is a zero that is
            still connected to ``logits``, as torchvision's ``maskrcnn_loss`` returns.
        """
        if logits.shape != targets.shape:
            raise ValueError(
                f"MaskLoss: logits and targets must have the same shape, got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        z = _as_compute_dtype(logits)
        if z.numel() == 0:
            return z.sum() * 0
        y = targets.to(z.dtype)
        # Each term is averaged before it is weighted and summed: scalar arithmetic instead of
        # full-size additions, in the forward and the backward pass.
        loss = z.new_zeros(())
        if self.bce or self.sce:
            # Cross entropy is linear in its target, so bce * H(hard, p) + sce * H(y, p) is one
            # cross entropy whose weights on log p and log(1 - p) add up both targets' weights.
            on_p = self.sce * y
            if self.bce:
                on_p = on_p + self.bce * (y >= self.hard_threshold).to(z.dtype)
            on_not_p = (self.bce + self.sce) - on_p
            log_p, log_q = _clipped_log_probs(z, self.p_min)
            loss = loss + _cross_entropy(log_p, log_q, on_p, on_not_p, self.normalized).mean()
        if self.rce:
            rce = _reverse_cross_entropy(z, y, self.normalized, self.p_min)
            loss = loss + self.rce * rce.mean()
        if self.mae:
            loss = loss + self.mae * mae(z, y, normalized=self.normalized).mean()
        return loss

    def extra_repr(self) -> str:
        return (
            f"bce={self.bce}, sce={self.sce}, rce={self.rce}, mae={self.mae}, "
            f"normalized={self.normalized}, p_min={self.p_min}, "
            f"hard_threshold={self.hard_threshold}"
        )


def _as_compute_dtype(logits: Tensor) -> Tensor:
    """``logits`` in float64 if given float64, otherwise float32."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _clipped_log_probs(logits: Tensor, p_min: float) -> tuple[Tensor, Tensor]:
    """``(log p*, log(1 - p*))`` with ``p*`` = ``sigmoid(z)`` clipped to ``[Pmin, 1 - Pmin]``."""
    # sigmoid is monotonic, so clipping p to [Pmin, 1 - Pmin] is clipping z to [-L, L] with
    # L = logit(1 - Pmin) = log(1 - Pmin) - log Pmin: one clamp, and no 1 - p that rounds to 0.
    z_max = math.log1p(-p_min) - math.log(p_min)
    z = _as_compute_dtype(logits).clamp(-z_max, z_max)
    return F.logsigmoid(z), F.logsigmoid(-z)


def _cross_entropy(
    log_p: Tensor, log_q: Tensor, on_p: Tensor, on_not_p: Tensor, normalized: bool
) -> Tensor:
    """``-(on_p log p + on_not_p log(1 - p))`` from clipped ``log p`` and ``log(1 - p)``.

    With ``on_p = y`` and ``on_not_p = 1 - y`` this is ``H(y, p)``; see :func:`cross_entropy`.
    """
    loss = -(on_p * log_p + on_not_p * log_q)
    if not normalized:
        return loss
    # -log p - log(1 - p) >= log 4 for every p; the clamp only keeps a division by zero out.
    return loss / (-(log_p + log_q)).clamp_min(torch.finfo(loss.dtype).tiny)


def _reverse_cross_entropy(z: Tensor, target: Tensor, normalized: bool, p_min: float) -> Tensor:
    """``H(p, y*)`` from logits ``z`` and targets ``y`` (both already float); see above."""
    log_min, log_max = math.log(p_min), math.log1p(-p_min)
    # 1 - y and y are clipped separately: 1 - clip(y) would make 1 - (1 - Pmin) == 0 in float32.
    log_y = target.clamp_min(p_min).log().clamp_max(log_max)
    log_not_y = (1 - target).clamp_min(p_min).log().clamp_max(log_max)
    loss = -(torch.sigmoid(z) * log_y + torch.sigmoid(-z) * log_not_y)
    if not normalized:
        return loss
    return loss / -(log_min + log_max)
