"""MaskLoss: the mask loss of IMaskRCNN, a weighted sum of pixelwise and per-RoI terms."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .pixelwise import (
    _as_compute_dtype,
    _MaskLossFunction,
    generalized_cross_entropy,
    negative_cross_entropy,
)
from .region import box_projection, pairwise_affinity, soft_dice, student_t

PIXEL_TERMS = ("bce", "sce", "rce", "mae", "gce", "nnce")
REGION_TERMS = ("dice", "tloss", "projection", "pairwise")


class MaskLoss(nn.Module):
    """A weighted sum of mask loss terms; terms with weight 0 are not computed.

    Pixelwise terms, averaged over all pixels (bmlseg.losses.pixelwise):

    - ``bce``: CE against the hard target ``y >= hard_threshold``;
    - ``sce``: CE against the soft target ``y``;
    - ``rce``: reverse CE (passive); ``mae``: ``|p - y|`` (active);
    - ``gce``: generalized CE with exponent ``q`` (Zhang & Sabuncu 2018);
    - ``nnce``: normalized negative CE (Ye et al. 2023; passive, always normalized).

    With ``normalized`` the CE, RCE and GCE terms are normalized (Ma et al. 2020), otherwise
    none is. Per-RoI terms, averaged over the RoIs (bmlseg.losses.region):

    - ``dice``: the soft Dice semimetric loss (Wang et al. 2023), minimal at ``p = y``;
    - ``tloss``: the T-Loss (Gonzalez-Jimenez et al. 2023), with ``log nu`` a learned parameter
      that starts at ``tloss_log_nu``;
    - ``projection`` and ``pairwise``: BoxInst's box terms (Tian et al. 2021), for box labels;
      ``pairwise`` needs the image under each RoI (``needs_image``).

    ``compiled`` computes bce, sce, rce and mae in a kernel built by torch.compile (the first
    call takes seconds to tens of seconds), falling back to the eager one where it cannot.

    The paper's presets (docs/losses.md) use bce, sce and rce only. ``MaskLoss()`` is normalized
    BCE (NCE, the active term of APL); ``MaskLoss(normalized=False)`` is torchvision's mask loss
    (plain BCE on binary masks), apart from the clipping at ``p_min``.
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
        gce: float = 0.0,
        nnce: float = 0.0,
        dice: float = 0.0,
        tloss: float = 0.0,
        projection: float = 0.0,
        pairwise: float = 0.0,
        q: float = 0.7,
        tloss_log_nu: float = 1.0,
        pairwise_sigma: float = 0.5,
        pairwise_threshold: float = 0.3,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        weights = {
            "bce": bce,
            "sce": sce,
            "rce": rce,
            "mae": mae,
            "gce": gce,
            "nnce": nnce,
            "dice": dice,
            "tloss": tloss,
            "projection": projection,
            "pairwise": pairwise,
        }
        negative = {name: weight for name, weight in weights.items() if weight < 0}
        if negative:
            raise ValueError(f"MaskLoss: weights must be >= 0, got {negative}")
        if not any(weights.values()):
            raise ValueError(f"MaskLoss: at least one weight must be > 0, got {weights}")
        if not 0.0 < p_min < 0.5:
            raise ValueError(f"MaskLoss: p_min must be in (0, 0.5), got {p_min}")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"MaskLoss: q must be in (0, 1], got {q}")
        if pairwise_sigma <= 0:
            raise ValueError(f"MaskLoss: pairwise_sigma must be > 0, got {pairwise_sigma}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.normalized = bool(normalized)
        self.p_min = float(p_min)
        self.hard_threshold = float(hard_threshold)
        self.q = float(q)
        self.pairwise_sigma = float(pairwise_sigma)
        self.pairwise_threshold = float(pairwise_threshold)
        self.compiled = bool(compiled)
        # A parameter only when used, so that other presets' checkpoints stay as they were.
        self.tloss_log_nu = nn.Parameter(torch.tensor(float(tloss_log_nu))) if tloss else None

    @property
    def needs_image(self) -> bool:
        """True when ``forward`` needs ``image_patches`` (the pairwise term)."""
        return self.weights["pairwise"] > 0

    def forward(
        self, logits: Tensor, targets: Tensor, image_patches: Tensor | None = None
    ) -> Tensor:
        """Mean loss over all pixels (pixel terms) and over the RoIs (per-RoI terms).

        Args:
            logits: ``[P, M, M]`` mask logits of the positive RoIs for their target class.
            targets: ``[P, M, M]`` soft (or binary) targets in [0, 1].
            image_patches: ``[P, C, M, M]``, the image under each RoI on the mask grid; needed
                only when ``needs_image``.

        Returns:
            A scalar, float32 (float64 for float64 logits). For ``P == 0`` it is a zero that is
            still connected to ``logits``, as torchvision's ``maskrcnn_loss`` returns.
        """
        if logits.shape != targets.shape:
            raise ValueError(
                f"MaskLoss: logits and targets must have the same shape, got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if self.needs_image and image_patches is None:
            raise ValueError("MaskLoss: the pairwise term needs image_patches [P, C, M, M]")
        z = _as_compute_dtype(logits)
        if z.numel() == 0:
            return z.sum() * 0
        y = targets.to(z.dtype)
        w = self.weights
        loss = z.new_zeros(())
        fused = (w["bce"], w["sce"], w["rce"], w["mae"])
        if any(fused):
            loss = loss + self._fused(z, y, fused)
        if w["gce"]:
            gce = generalized_cross_entropy(z, y, q=self.q, normalized=self.normalized)
            loss = loss + w["gce"] * gce.mean()
        if w["nnce"]:
            loss = loss + w["nnce"] * negative_cross_entropy(z, y, p_min=self.p_min).mean()
        if w["dice"]:
            loss = loss + w["dice"] * soft_dice(z, y).mean()
        if w["tloss"]:
            loss = loss + w["tloss"] * student_t(z, y, self.tloss_log_nu).mean()
        if w["projection"]:
            loss = loss + w["projection"] * box_projection(z, y).mean()
        if w["pairwise"]:
            pairwise = pairwise_affinity(
                z, image_patches, y, sigma=self.pairwise_sigma, threshold=self.pairwise_threshold
            )
            loss = loss + w["pairwise"] * pairwise.mean()
        return loss

    def _fused(self, z: Tensor, y: Tensor, weights: tuple[float, ...]) -> Tensor:
        """The CE, RCE and MAE terms in one pass; compiled when asked, and eager where
        torch.compile cannot build its kernel (e.g. no C++ compiler), with a warning once."""
        options = (weights, self.normalized, self.p_min, self.hard_threshold)
        if self.compiled:
            try:
                return _MaskLossFunction.apply(z, y, *options, True)
            except torch._dynamo.exc.TorchDynamoException as error:
                warnings.warn(
                    f"MaskLoss(compiled=True): torch.compile failed ({type(error).__name__}); "
                    "using the eager kernel",
                    stacklevel=2,
                )
                self.compiled = False
        return _MaskLossFunction.apply(z, y, *options, False)

    def extra_repr(self) -> str:
        used = ", ".join(f"{name}={weight}" for name, weight in self.weights.items() if weight)
        return (
            f"{used}, normalized={self.normalized}, p_min={self.p_min}, "
            f"hard_threshold={self.hard_threshold}"
        )
