"""Baseline labels from the same rectangles: binary fusions, STAPLE, and three label smoothings.

Each ``<name>_label(case, bone_labels, **options)`` returns ``[S, H, W]`` float32 in [0, 1] and is
0 outside the bone proxy mask. The array-level functions beside them do the work and are what the
tests pin down against hand computations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bmlseg.data.format import Case
from bmlseg.labels.readers import case_reader_maps

BASES = ("binary_majority", "binary_any")


def binary_any_label(case: Case, bone_labels: dict[str, int]) -> np.ndarray:
    """1 where any reader's rectangle covers a voxel of the bone it was drawn on."""
    return _base_label(case, bone_labels, "binary_any").astype(np.float32)


def binary_majority_label(case: Case, bone_labels: dict[str, int]) -> np.ndarray:
    """1 where at least half of the scan's readers cover the voxel (1 of 2, 2 of 3 or 4)."""
    return _base_label(case, bone_labels, "binary_majority").astype(np.float32)


def staple_label(
    case: Case, bone_labels: dict[str, int], *, max_iterations: int = 100
) -> np.ndarray:
    """STAPLE's probability of BML from the readers' maps (Warfield et al. 2004), within bone."""
    maps = case_reader_maps(case, bone_labels)
    return staple_probability(maps, case.bones > 0, max_iterations=max_iterations)


def svls_label(
    case: Case, bone_labels: dict[str, int], *, sigma: float = 1.0, base: str = "binary_majority"
) -> np.ndarray:
    """Spatially varying label smoothing (Islam & Glocker 2021) of the ``base`` label."""
    label = _base_label(case, bone_labels, base)
    return svls_smooth(label, case.bones > 0, sigma)


def dilate_label(
    case: Case,
    bone_labels: dict[str, int],
    *,
    ring_values: Sequence[float] = (0.75, 0.5, 0.25),
    ring_mm: float = 1.25,
    in_plane: bool = True,
    base: str = "binary_majority",
) -> np.ndarray:
    """Soft label by morphological dilation (Kats et al. 2019) of the ``base`` label, each ring
    ``ring_mm`` wide in-plane (in whole pixels: 1 px of the small phantom, 3 of 0.36 mm scans)."""
    if ring_mm <= 0:
        raise ValueError(f"ring_mm must be > 0, got {ring_mm}")
    label = _base_label(case, bone_labels, base)
    pixel_mm = min(case.geometry.spacing[:2])
    steps = max(1, round(ring_mm / pixel_mm))
    return dilation_rings(label, case.bones > 0, ring_values, in_plane=in_plane, steps=steps)


def uniform_label(
    case: Case, bone_labels: dict[str, int], *, epsilon: float = 0.1, base: str = "binary_majority"
) -> np.ndarray:
    """Uniform label smoothing of the ``base`` label, inside bone only."""
    label = _base_label(case, bone_labels, base)
    return uniform_smooth(label, case.bones > 0, epsilon)


def staple_probability(
    maps: np.ndarray, bone: np.ndarray, *, max_iterations: int = 100
) -> np.ndarray:
    """SimpleITK's STAPLE over reader maps ``[R, S, H, W]`` (bool), run on ``bone`` voxels only.

    STAPLE treats voxels independently, so it is run on the bone voxels laid out as one row: the
    prior and the readers' specificities are then estimated within bone, and the work shrinks
    to the bone. Readers with empty maps take part (they lower the others' estimated
    sensitivity). With rectangles that barely overlap, STAPLE's EM creeps for thousands of
    iterations towards trusting a single reader; ``max_iterations`` bounds it.

    Returns:
        ``[S, H, W]`` float32, 0 outside ``bone``, and 0 everywhere when no reader marked
        anything (STAPLE's estimate is then undefined).
    """
    probability = np.zeros(maps.shape[1:], dtype=np.float32)
    voxels = maps[:, bone]
    if not voxels.any():
        return probability
    images = [sitk.GetImageFromArray(reader.astype(np.uint8)[None, :]) for reader in voxels]
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    staple.SetMaximumIterations(max_iterations)
    estimate = sitk.GetArrayFromImage(staple.Execute(images))[0]
    probability[bone] = np.clip(estimate, 0.0, 1.0)
    return probability


def svls_kernel(sigma: float) -> np.ndarray:
    """The 3x3x3 SVLS kernel: ``[3, 3, 3]`` float64 summing to 1.

    A Gaussian of ``sigma`` voxels whose centre weight is replaced by the sum of the other 26
    weights, then normalized (Islam & Glocker, IPMI 2021, section 2; their code
    github.com/mobarakol/SVLS, svls.py, get_svls_filter_3d). The centre thus weighs 1/2.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    offsets = np.arange(-1, 2)
    squared = (
        offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2
    )
    kernel = np.exp(-squared / (2.0 * sigma**2))
    kernel[1, 1, 1] = kernel.sum() - kernel[1, 1, 1]
    return kernel / kernel.sum()


def svls_smooth(label: np.ndarray, bone: np.ndarray, sigma: float) -> np.ndarray:
    """Correlate ``label`` ``[S, H, W]`` with ``svls_kernel(sigma)``, then zero outside ``bone``.

    Borders repeat the edge voxel, as the SVLS code pads with ``replicate``.
    """
    smoothed = ndimage.correlate(label.astype(np.float32), svls_kernel(sigma), mode="nearest")
    return np.where(bone, np.clip(smoothed, 0.0, 1.0), 0.0).astype(np.float32)


def dilation_rings(
    label: np.ndarray,
    bone: np.ndarray,
    ring_values: Sequence[float],
    *,
    in_plane: bool = True,
    steps: int = 1,
) -> np.ndarray:
    """``label`` (bool ``[S, H, W]``) as 1, its k-th dilation ring as ``ring_values[k]``.

    Each ring grows by ``steps`` voxels of 4-connectivity in-plane (``in_plane``: slices are
    several times thicker than pixels) or 6-connectivity in 3D. Zero outside ``bone``.
    """
    values = list(ring_values)
    if any(not 0.0 < value < 1.0 for value in values) or values != sorted(values, reverse=True):
        raise ValueError(f"ring_values must decrease within (0, 1), got {values}")
    structure = ndimage.generate_binary_structure(3, 1)
    if in_plane:
        structure[0] = structure[2] = False
    covered = label.astype(bool)
    soft = covered.astype(np.float32)
    for value in values:
        grown = ndimage.binary_dilation(covered, structure=structure, iterations=steps)
        soft[grown & ~covered] = value
        covered = grown
    return np.where(bone, soft, 0.0).astype(np.float32)


def uniform_smooth(label: np.ndarray, bone: np.ndarray, epsilon: float) -> np.ndarray:
    """y (1 - epsilon) + epsilon / 2 inside ``bone`` (two classes), 0 outside."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    smoothed = label.astype(np.float32) * (1.0 - epsilon) + epsilon / 2.0
    return np.where(bone, smoothed, 0.0).astype(np.float32)


def _base_label(case: Case, bone_labels: dict[str, int], base: str) -> np.ndarray:
    """The binary label a smoothing starts from: ``[S, H, W]`` bool, within bone."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    maps = case_reader_maps(case, bone_labels)
    if base == "binary_any":
        label = maps.any(axis=0)
    else:
        label = 2 * maps.sum(axis=0) >= len(maps)
    return label & (case.bones > 0)
