"""The paper's soft labels from KIMRISS rectangles (Felfeliyan et al., section IV.A.1, Fig. 1).

Four steps, each a function on arrays ``[S, H, W]`` (slices first):

1. ``rater_agreement``: per voxel, the share of the scan's readers whose rectangles cover it.
2. ``marrow_region``: zero outside the bone proxy mask, optionally without its cortical rim.
3. ``hyperintense``: inside the readers' regions, voxels brighter than the marrow of their own
   bone (robust z-score above ``z_threshold``) are BML: probability 1.
4. ``raise_from_neighbours``: a voxel whose previous or next slice holds BML at the same place is
   raised to ``neighbour_weight`` times that neighbour's probability. Which voxels may be raised
   is ``neighbour_rule``'s choice; by default only hyperintense voxels connected in 3D to a
   hyperintense voxel the readers marked, so bright noise under a neighbour's rectangle stays 0.

Finally, label components smaller than ``min_component_mm3`` may be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bmlseg.data.format import Case
from bmlseg.data.instances import InstanceOptions
from bmlseg.labels.readers import case_readers, rater_agreement

# 1.4826 * MAD estimates the standard deviation of normally distributed intensities.
MAD_TO_STD = 1.4826
NEIGHBOUR_RULES = ("connected", "hyperintense", "all")
# 8-connected in-plane, and through the same pixel to the previous and next slice: slices are
# thick, so a diagonal step across slices is far in millimetres.
SLICE_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
SLICE_CONNECTED[1] = True
SLICE_CONNECTED[0, 1, 1] = SLICE_CONNECTED[2, 1, 1] = True


@dataclass(frozen=True)
class KimrissOptions:
    """Constants of the paper's pipeline (``conf/labels/kimriss.yaml`` holds the same defaults).

    The defaults maximize mean soft Dice against the truth on a 20-subject synthetic set (small
    preset, paper noise, seed 1), a different seed from the one reported in docs/labels.md.

    Attributes:
        erode_mm: width (mm, in-plane) of the bone proxy mask's rim left out, rounded to whole
            pixels along each axis (1.25 mm: one pixel of the small phantom, three of 0.36 mm
            scans), so bright cortex, cartilage and fluid next to the bone edge are not taken as
            BML; also left out of the marrow statistics. 0 keeps the whole mask.
        z_threshold: a voxel is hyperintense when (I - median) / (1.4826 * MAD) exceeds this,
            median and MAD taken over the marrow of the voxel's own bone in the whole volume.
        smoothing_sigma_mm: in-plane Gaussian sigma (mm) applied to the image before the
            z-score, so single noisy pixels do not pass the threshold; 0 turns it off.
        neighbour_weight: step 4's factor w in p_s = max(p_s, w * max(p_{s-1}, p_{s+1})).
        neighbour_rule: where step 4 may raise a voxel: ``"connected"`` (hyperintense marrow
            voxels connected in 3D, through hyperintense voxels, to one the readers marked: a
            lesion continued into an unmarked slice), ``"hyperintense"`` (any hyperintense
            marrow voxel: the neighbour says where to look, the intensity says what is BML) or
            ``"all"`` (every marrow voxel, the literal reading of the paper).
        min_component_mm3: label components (``label > 0``, connected as in ``"connected"``)
            smaller than this volume are set to 0; 0 keeps all.
    """

    erode_mm: float = 1.25
    z_threshold: float = 2.5
    smoothing_sigma_mm: float = 0.0
    neighbour_weight: float = 1.0
    neighbour_rule: str = "connected"
    min_component_mm3: float = 0.0

    def __post_init__(self) -> None:
        if self.erode_mm < 0:
            raise ValueError(f"erode_mm must be >= 0, got {self.erode_mm}")
        if self.smoothing_sigma_mm < 0:
            raise ValueError(f"smoothing_sigma_mm must be >= 0, got {self.smoothing_sigma_mm}")
        if not 0.0 <= self.neighbour_weight <= 1.0:
            raise ValueError(f"neighbour_weight must lie in [0, 1], got {self.neighbour_weight}")
        if self.min_component_mm3 < 0:
            raise ValueError(f"min_component_mm3 must be >= 0, got {self.min_component_mm3}")
        if self.neighbour_rule not in NEIGHBOUR_RULES:
            raise ValueError(
                f"neighbour_rule must be one of {NEIGHBOUR_RULES}, got {self.neighbour_rule!r}"
            )


def marrow_region(bones: np.ndarray, rim_px: tuple[int, int]) -> np.ndarray:
    """Bone voxels at least ``rim_px`` (rows, columns) pixels in-plane from any other label:
    ``[S, H, W]`` bool.

    Each bone is eroded on its own, so the contact between two bones counts as a rim too.
    """
    inside = bones > 0
    if rim_px == (0, 0):
        return inside
    footprint = np.ones((1, 2 * rim_px[0] + 1, 2 * rim_px[1] + 1), dtype=bool)
    lowest = ndimage.minimum_filter(bones, footprint=footprint, mode="nearest")
    highest = ndimage.maximum_filter(bones, footprint=footprint, mode="nearest")
    return inside & (lowest == bones) & (highest == bones)


def robust_z(image: np.ndarray, bones: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(I - median) / (1.4826 * MAD) with each bone's statistics over its ``region`` voxels.

    Returns ``[S, H, W]`` float32, 0 outside ``region``. A bone whose marrow has MAD 0 counts
    any voxel above its median as infinitely far above it.
    """
    labels = np.unique(bones[region])
    centre = np.zeros(int(bones.max()) + 1, dtype=np.float32)
    scale = np.zeros_like(centre)
    for label in labels:
        values = image[region & (bones == label)]
        centre[label] = np.median(values)
        scale[label] = MAD_TO_STD * np.median(np.abs(values - centre[label]))
    deviation = np.where(region, image - centre[bones], 0.0).astype(np.float32)
    spread = scale[bones]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(spread > 0, deviation / spread, np.sign(deviation) * np.inf)
    return np.where(region, z, 0.0).astype(np.float32)


def rim_pixels(erode_mm: float, spacing: tuple[float, float, float]) -> tuple[int, int]:
    """``erode_mm`` in whole pixels (rows, columns) of a grid of ``spacing`` (x, y, z) mm."""
    return round(erode_mm / spacing[1]), round(erode_mm / spacing[0])


def hyperintense(
    image: np.ndarray,
    bones: np.ndarray,
    region: np.ndarray,
    options: KimrissOptions,
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """Marrow voxels brighter than their bone's marrow by ``z_threshold``: ``[S, H, W]`` bool."""
    if options.smoothing_sigma_mm > 0:
        sigma = (
            0.0,
            options.smoothing_sigma_mm / spacing[1],
            options.smoothing_sigma_mm / spacing[0],
        )
        image = ndimage.gaussian_filter(image.astype(np.float32), sigma=sigma, mode="nearest")
    return robust_z(image, bones, region) > options.z_threshold


def raise_from_neighbours(
    probability: np.ndarray, allowed: np.ndarray, neighbour_weight: float
) -> np.ndarray:
    """Step 4: p_s = min(1, max(p_s, w * max(p_{s-1}, p_{s+1}))) where ``allowed``.

    Neighbours are read from the input (one pass, not propagated slice after slice); the first
    and last slices have one neighbour. ``probability`` and ``allowed`` are ``[S, H, W]``.
    """
    neighbour = np.zeros_like(probability)
    neighbour[1:] = probability[:-1]
    np.maximum(neighbour[:-1], probability[1:], out=neighbour[:-1])
    raised = np.minimum(np.maximum(probability, neighbour_weight * neighbour), 1.0)
    return np.where(allowed, raised, probability).astype(np.float32)


def connected_to(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Voxels of ``candidates`` whose 3D component (``SLICE_CONNECTED``) holds a ``seeds`` voxel.

    Both ``[S, H, W]`` bool; returns the same.
    """
    labelled, _ = ndimage.label(candidates, structure=SLICE_CONNECTED)
    reached = np.unique(labelled[seeds & candidates])
    return np.isin(labelled, reached[reached > 0])


def drop_small_components(probability: np.ndarray, min_voxels: float) -> np.ndarray:
    """``probability`` with its ``> 0`` components (``SLICE_CONNECTED``) under ``min_voxels`` set
    to 0."""
    labelled, count = ndimage.label(probability > 0, structure=SLICE_CONNECTED)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    small = sizes < min_voxels
    small[0] = False
    return np.where(small[labelled], 0.0, probability).astype(np.float32)


def kimriss_soft_label(
    image: np.ndarray,
    bones: np.ndarray,
    agreement: np.ndarray,
    options: KimrissOptions | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Steps 2-4 on the readers' ``agreement`` (step 1): ``[S, H, W]`` float32 in [0, 1].

    Args:
        image: ``[S, H, W]`` MRI intensities (fat-suppressed, BML bright).
        bones: ``[S, H, W]`` integer bone proxy labels, 0 background.
        agreement: ``[S, H, W]`` share of readers covering each voxel, from ``rater_agreement``.
        options: the pipeline's constants; defaults when None.
        spacing: the voxels' (x, y, z) size in mm, for the options given in mm.
    """
    options = options or KimrissOptions()
    if not image.shape == bones.shape == agreement.shape:
        raise ValueError(
            f"image {image.shape}, bones {bones.shape} and agreement {agreement.shape} must "
            "have the same shape [S, H, W]"
        )
    region = marrow_region(bones, rim_pixels(options.erode_mm, spacing))
    probability = np.where(region, agreement, 0.0).astype(np.float32)
    bright = hyperintense(image, bones, region, options, spacing)
    marked_bright = bright & (probability > 0)
    probability[marked_bright] = 1.0
    if options.neighbour_rule == "connected":
        allowed = connected_to(bright, marked_bright)
    elif options.neighbour_rule == "hyperintense":
        allowed = bright
    else:
        allowed = region
    probability = raise_from_neighbours(probability, allowed, options.neighbour_weight)
    if options.min_component_mm3 > 0:
        voxel_mm3 = float(np.prod(spacing))
        probability = drop_small_components(probability, options.min_component_mm3 / voxel_mm3)
    return probability


def kimriss_label(case: Case, bone_labels: dict[str, int], **options) -> np.ndarray:
    """The paper's soft label for ``case``: ``[S, H, W]`` float32; options: ``KimrissOptions``."""
    agreement = rater_agreement(
        case.annotations, case_readers(case), case.image.shape, bone_labels, bones=case.bones
    )
    return kimriss_soft_label(
        case.image,
        case.bones,
        agreement,
        KimrissOptions(**options),
        spacing=case.geometry.spacing,
    )


def kimriss_hard_label(
    case: Case,
    bone_labels: dict[str, int],
    threshold: float = InstanceOptions.threshold,
    **options,
) -> np.ndarray:
    """The paper's soft label made binary at ``threshold``: the fair binary baseline.

    With ``threshold`` equal to ``data.instances.threshold`` it has the same coverage and the
    same instances as the soft label, so "soft against binary" compares only the softness.
    """
    return (kimriss_label(case, bone_labels, **options) >= threshold).astype(np.float32)
