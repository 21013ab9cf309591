"""Pixelwise binary losses on logits, and the fused pass that MaskLoss computes them in.

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

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cross_entropy",
    "generalized_cross_entropy",
    "mae",
    "negative_cross_entropy",
    "reverse_cross_entropy",
]


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


def generalized_cross_entropy(
    logits: Tensor, target: Tensor, *, q: float = 0.7, normalized: bool = False
) -> Tensor:
    """Elementwise generalized cross entropy, GCE (Zhang & Sabuncu, NeurIPS 2018), soft binary.

    On a hard label GCE is ``(1 - p_y^q) / q``: MAE (up to a factor) at ``q = 1``, CE as
    ``q -> 0``. A soft target ``y`` is taken as the probability of the label, as CE does, so the
    value is the expectation over the label and is linear in ``y``:
    ``GCE(y) = [y (1 - p^q) + (1 - y)(1 - (1 - p)^q)] / q``; at ``y`` = 0 or 1 it is the hard form.

    ``normalized`` gives NGCE (Ma et al., ICML 2020): divided by the sum over the two hard labels,
    ``[2 - p^q - (1 - p)^q] / q``. ``q`` cancels, and the denominator is at least
    ``2 - 2^(1-q)`` (> 0 for ``q > 0``), so no guard is needed. NGCE is in [0, 1].

    Args:
        logits: ``z``, any shape.
        target: ``y`` in [0, 1], same shape.
        q: in (0, 1].

    Returns:
        The loss per element, float32 (float64 for float64 logits).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"generalized_cross_entropy: q must be in (0, 1], got {q}")
    z = _as_compute_dtype(logits)
    return _generalized_cross_entropy(z, target.to(z.dtype), q, normalized)


def negative_cross_entropy(logits: Tensor, target: Tensor, *, p_min: float = 1e-20) -> Tensor:
    """Elementwise normalized negative cross entropy, NNCE (Ye et al., NeurIPS 2023), soft binary.

    The passive loss of the active-negative loss (ANL = NCE + NNCE). With ``A = -log Pmin`` and
    the clipped prediction ``p*``, the "negative" log-probabilities ``a = A + log p*`` and
    ``b = A + log(1 - p*)`` lie in [0, A], and
    ``NNCE(y) = 1 - [y a + (1 - y) b] / (a + b)``: linear in ``y``, in [0, 1], and its values on
    the two hard labels sum to 1. NNCE exists only in this normalized form. Ye et al. clip the
    prediction at ``min_prob`` = 1e-7 (their default); pass that as ``p_min`` to match them.

    Args:
        logits: ``z``, any shape.
        target: ``y`` in [0, 1], same shape.

    Returns:
        The loss per element, float32 (float64 for float64 logits).
    """
    log_p, log_q = _clipped_log_probs(logits, p_min)
    return _negative_cross_entropy(log_p, log_q, target.to(log_p.dtype), p_min)


def _as_compute_dtype(logits: Tensor) -> Tensor:
    """``logits`` in float64 if given float64, otherwise float32."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _logit_bound(p_min: float) -> float:
    """``L = logit(1 - Pmin)``: clipping p to ``[Pmin, 1 - Pmin]`` is clipping z to ``[-L, L]``."""
    # sigmoid is monotonic, so one clamp of z does it, and no 1 - p that rounds to 0 is formed.
    return math.log1p(-p_min) - math.log(p_min)


def _clipped_log_probs(logits: Tensor, p_min: float) -> tuple[Tensor, Tensor]:
    """``(log p*, log(1 - p*))`` with ``p*`` = ``sigmoid(z)`` clipped to ``[Pmin, 1 - Pmin]``."""
    z_max = _logit_bound(p_min)
    z = _as_compute_dtype(logits).clamp(-z_max, z_max)
    return F.logsigmoid(z), F.logsigmoid(-z)


def _label_logs(target: Tensor, p_min: float) -> tuple[Tensor, Tensor]:
    """``(log y*, log(1 - y*))`` with the label ``y*`` clipped to ``[Pmin, 1 - Pmin]``."""
    # 1 - y and y are clipped separately: 1 - clip(y) would make 1 - (1 - Pmin) == 0 in float32.
    # Only the lower clip is applied: the upper one would turn log 1 = 0 into log(1 - Pmin),
    # -1e-20 for the default Pmin, which no float32 sum it enters can resolve.
    log_y = target.clamp_min(p_min).log_()
    log_not_y = (1 - target).clamp_min_(p_min).log_()
    return log_y, log_not_y


def _reverse_cross_entropy_normalizer(p_min: float) -> float:
    """``-log Pmin - log(1 - Pmin)``: RCE summed over the two hard labels."""
    return -(math.log(p_min) + math.log1p(-p_min))


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
    log_y, log_not_y = _label_logs(target, p_min)
    loss = -(torch.sigmoid(z) * log_y + torch.sigmoid(-z) * log_not_y)
    if not normalized:
        return loss
    return loss / _reverse_cross_entropy_normalizer(p_min)


def _generalized_cross_entropy(z: Tensor, target: Tensor, q: float, normalized: bool) -> Tensor:
    """GCE or NGCE from float logits ``z``; see :func:`generalized_cross_entropy`."""
    p_q = torch.exp(q * F.logsigmoid(z))  # p^q, finite for every z (no 0^q with q < 1 issues)
    not_p_q = torch.exp(q * F.logsigmoid(-z))
    loss = target * (1 - p_q) + (1 - target) * (1 - not_p_q)
    if normalized:
        return loss / (2 - p_q - not_p_q)
    return loss / q


def _negative_cross_entropy(log_p: Tensor, log_q: Tensor, target: Tensor, p_min: float) -> Tensor:
    """NNCE from clipped ``log p`` and ``log(1 - p)``; see :func:`negative_cross_entropy`."""
    shift = -math.log(p_min)
    negative_p, negative_q = shift + log_p, shift + log_q
    return 1 - (target * negative_p + (1 - target) * negative_q) / (negative_p + negative_q)


class _MaskLossFunction(torch.autograd.Function):
    """MaskLoss's CE, RCE and MAE terms: value and gradient in one pass over the pixels.

    Autograd through the elementwise functions records some 80 small kernels per call, which is
    what a mask loss costs on a GPU, where it is launch-bound; on a CPU each kernel is a pass
    over memory. The analytic gradient needs a few more operations in the forward pass and a
    single multiply in the backward pass. With ``p = sigmoid(z)``, ``a = -log p``,
    ``b = -log(1 - p) = softplus(z)``, so that ``a = b - z`` and ``a + b = 2b - z``
    (``db/dz = p``), and the label logs ``A = log y*``, ``B = log(1 - y*)``:

    - CE with weight ``u`` on ``a`` and ``W - u`` on ``b``: ``W b - u z``, gradient ``W p - u``;
    - normalized, ``NCE = CE / (2b - z)``: ``dNCE/dz = (W p - u - NCE (2p - 1)) / (2b - z)``;
    - ``RCE = -(B + p (A - B))``: ``dRCE/dz = -p (1 - p)(A - B)``;
    - ``MAE = |p - y|``: ``dMAE/dz = sign(p - y) p (1 - p)``;

    and zero where ``|z|`` is beyond the clip of p at ``[Pmin, 1 - Pmin]``. The value is the
    same as the weighted sum of :func:`cross_entropy`, :func:`reverse_cross_entropy` and
    :func:`mae`; tests check both value and gradient against autograd through those.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        y: Tensor,
        weights: tuple[float, float, float, float],
        normalized: bool,
        p_min: float,
        hard_threshold: float,
        compiled: bool,
    ) -> Tensor:
        terms = _compiled_fused_terms() if compiled else _fused_terms
        loss, grad = terms(z, y, weights, normalized, p_min, hard_threshold)
        ctx.save_for_backward(grad)
        ctx.numel = z.numel()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.numel), None, None, None, None, None, None


def _fused_terms(
    z: Tensor,
    y: Tensor,
    weights: tuple[float, float, float, float],
    normalized: bool,
    p_min: float,
    hard_threshold: float,
) -> tuple[Tensor, Tensor]:
    """The mean of the weighted CE, RCE and MAE terms, and its gradient times ``z.numel()``."""
    bce, sce, rce, mae_weight = weights
    z_max = _logit_bound(p_min)
    z_clipped = z.clamp(-z_max, z_max)
    p = torch.sigmoid(z_clipped)
    # Each term is averaged before it is weighted and summed: scalar arithmetic instead of
    # full-size additions.
    loss = z.new_zeros(())
    grad = None
    if bce or sce:
        # Cross entropy is linear in its target, so bce * H(hard, p) + sce * H(y, p) is one
        # cross entropy with weight u = sce y + bce [y >= t] on -log p and W - u on
        # -log(1 - p), W = bce + sce. Divided by W, u' = u / W is in [0, 1] and the scalar W
        # multiplies the means and the gradient once.
        weight = bce + sce
        on_p = y * (sce / weight) if sce else torch.zeros_like(y)
        if bce:
            on_p = on_p.add_(y >= hard_threshold, alpha=bce / weight)
        not_log_q = F.softplus(z_clipped)
        cross_entropy_value = torch.addcmul(not_log_q, on_p, z_clipped, value=-1)
        grad = p - on_p
        if normalized:
            total = z_clipped.neg().add_(not_log_q, alpha=2)
            cross_entropy_value = cross_entropy_value.div_(total)
            # d(a + b)/dz = p - (1 - p) = 2p - 1.
            grad = grad.addcmul_(cross_entropy_value, p * 2 - 1, value=-1).div_(total)
        loss = loss + weight * cross_entropy_value.mean()
        grad = grad.mul_(weight)
    if rce or mae_weight:
        p_not_p = p * (1 - p)
        if grad is None:
            grad = torch.zeros_like(z)
    if rce:
        scale = rce / (_reverse_cross_entropy_normalizer(p_min) if normalized else 1.0)
        log_y, log_not_y = _label_logs(y, p_min)
        log_ratio = log_y.sub_(log_not_y)
        loss = loss - scale * (log_not_y.mean() + (p * log_ratio).mean())
        grad = grad.addcmul_(p_not_p, log_ratio, value=-scale)
    if mae_weight:
        difference = p - y
        loss = loss + mae_weight * difference.abs().mean()
        grad = grad.addcmul_(difference.sign_(), p_not_p, value=mae_weight)
    return loss, grad.masked_fill_(z != z_clipped, 0)


@functools.cache
def _compiled_fused_terms() -> Callable[..., tuple[Tensor, Tensor]]:
    """``_fused_terms`` compiled by torch.compile (Inductor: one loop over the pixels instead of
    a pass per operation; on a CPU it needs a C++ compiler), for any shape."""
    return torch.compile(_fused_terms, dynamic=True)
