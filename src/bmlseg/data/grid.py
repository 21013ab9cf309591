"""The model's grid: every scan is seen in one orientation, at one in-plane pixel size.

A model learns what a lesion looks like at some size in millimetres and with the head at the top
of its slices. A scan from another scanner comes with its own matrix, pixel size and axis order;
fed as it is, a 128-pixel crop would hold 160 mm of one knee and 37 mm of another, and a coronal
scan would pass for sagittal. So training, evaluation and prediction bring each volume to the
model's grid first (:func:`to_model_grid`) and map the outputs back onto the scan's own grid
(:func:`from_model_grid`):

1. Reorient: permute and flip the array axes (no interpolation) so that they run along the
   model's ``orientation``, a three-letter code in ITK's convention: the direction each array
   axis (x = columns, y = rows, z = slices) points to, e.g. ``PIR``: columns run to posterior,
   rows to inferior (head at the top), slices to the right: sagittal slices. The code of a
   geometry is the closest one; a tilt (an oblique scan) stays in its direction matrix.
2. Resample in-plane to ``spacing_mm``: each slice is resized to ``round(extent / spacing_mm)``
   pixels, keeping its field of view, so the pixel size is ``spacing_mm`` to within half a pixel
   over the field of view. Slices are never resampled across: 2.5D inputs are neighbouring
   slices as acquired.

A volume already on the model's grid is passed through unchanged (same array).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from bmlseg.io import Geometry

# A pixel size within this relative tolerance of the target is left as it is.
SPACING_TOLERANCE = 1e-3
# Voxels this many times longer on one side than on another are slices of a 2D acquisition.
ANISOTROPY = 1.5
# Anatomical axis of each letter of an orientation code (ITK: L/R = x, P/A = y, S/I = z).
_AXIS_OF_LETTER = {"L": "left-right", "R": "left-right", "P": "front-back", "A": "front-back"}
_AXIS_OF_LETTER |= {"S": "head-foot", "I": "head-foot"}
_SLICE_NAMES = {"left-right": "sagittal", "front-back": "coronal", "head-foot": "axial"}


@dataclass(frozen=True)
class ModelGrid:
    """Where a model's inputs come from: ``crop_size`` x ``crop_size`` pixels of ``spacing_mm``
    (a crop of ``crop_size * spacing_mm`` mm) of slices in ``orientation``."""

    orientation: str
    spacing_mm: float
    crop_size: int

    def __post_init__(self) -> None:
        check_orientation(self.orientation)
        if self.spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> ModelGrid:
        """The grid of a run's ``data`` config (a dict, as checkpoints store it, or a DictConfig)."""
        return cls(str(data["orientation"]), float(data["spacing_mm"]), int(data["crop_size"]))

    @property
    def crop_mm(self) -> float:
        return self.crop_size * self.spacing_mm


def check_orientation(code: str) -> None:
    """Raise ValueError unless ``code`` is three letters naming three different axes."""
    letters = code.upper()
    axes = {_AXIS_OF_LETTER.get(letter) for letter in letters}
    if len(letters) != 3 or None in axes or len(axes) != 3:
        raise ValueError(
            f"orientation {code!r}: expected three letters out of L/R, P/A, S/I, one per "
            "anatomical axis, naming where the columns, rows and slices run (e.g. PIR)"
        )


def slice_plane(orientation: str) -> str:
    """``sagittal``, ``coronal`` or ``axial``: the plane of the slices of ``orientation``."""
    return _SLICE_NAMES[_AXIS_OF_LETTER[orientation[2].upper()]]


def acquisition_plane(geometry: Geometry) -> str | None:
    """The plane a scan was acquired in: the one across its thickest voxel axis, whichever array
    axis holds it (a sagittal scan stored in RAS order by nibabel is still sagittal). None for
    near-isotropic voxels (the longest side under ANISOTROPY times the shortest): a 3D
    acquisition is as good in any plane."""
    spacing = geometry.spacing
    thickest = int(np.argmax(spacing))
    if spacing[thickest] < ANISOTROPY * min(spacing):
        return None
    return _SLICE_NAMES[_AXIS_OF_LETTER[geometry.orientation[thickest]]]


def reorient(
    volume: np.ndarray, geometry: Geometry, orientation: str
) -> tuple[np.ndarray, Geometry]:
    """``volume`` ``[S, H, W]`` with its axes permuted and flipped to run along ``orientation``,
    and its geometry, which places every voxel where it was. Exact: no interpolation."""
    if geometry.orientation == orientation.upper():
        return volume, geometry
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    geometry.apply_to(image)
    turned = sitk.DICOMOrient(image, orientation.upper())
    return sitk.GetArrayFromImage(turned), Geometry.of(turned)


def in_plane_size(shape: tuple[int, ...], geometry: Geometry, spacing_mm: float) -> tuple[int, int]:
    """``(H, W)`` of slices of ``shape[-2:]`` resampled to pixels of about ``spacing_mm``."""
    height, width = shape[-2:]
    size = []
    for pixels, spacing in ((height, geometry.spacing[1]), (width, geometry.spacing[0])):
        if abs(spacing - spacing_mm) <= SPACING_TOLERANCE * spacing_mm:
            size.append(pixels)
        else:
            size.append(max(1, round(pixels * spacing / spacing_mm)))
    return size[0], size[1]


def resize_slices(
    volume: np.ndarray, size: tuple[int, int], kind: Literal["linear", "nearest"]
) -> np.ndarray:
    """Each slice of ``volume`` ``[S, H, W]`` resized to ``size`` ``(H', W')``, field of view
    kept (pixel centres at ``(i + 0.5) * H / H'``).

    ``linear``: bilinear, antialiased when shrinking (speckle would alias); for intensities,
    probabilities and soft labels, returned as float32. ``nearest``: for integer labels; same
    dtype.
    """
    if tuple(volume.shape[-2:]) == tuple(size):
        return volume
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    if kind == "linear":
        resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True)
        return resized[:, 0].numpy()
    resized = F.interpolate(tensor, size=size, mode="nearest-exact")
    return resized[:, 0].numpy().astype(volume.dtype)


def resized_geometry(geometry: Geometry, shape: tuple[int, ...], size: tuple[int, int]) -> Geometry:
    """The geometry of slices of ``shape[-2:]`` resized to ``size`` (:func:`resize_slices`)."""
    height, width = shape[-2:]
    spacing = np.array(
        [geometry.spacing[0] * width / size[1], geometry.spacing[1] * height / size[0], 0.0]
    )
    # The field of view is kept: the first pixel's centre moves by half the change of pixel size.
    half_change = (spacing - np.array([*geometry.spacing[:2], 0.0])) / 2
    origin = (
        np.asarray(geometry.origin) + np.asarray(geometry.direction).reshape(3, 3) @ half_change
    )
    return Geometry(
        (float(spacing[0]), float(spacing[1]), geometry.spacing[2]),
        tuple(float(v) for v in origin),
        geometry.direction,
    )


@dataclass(frozen=True)
class OnModelGrid:
    """Where a scan brought to a model's grid came from: ``geometry`` is its geometry on the
    model's grid; ``turned_shape`` and ``turned_geometry`` those after the reorientation, before
    the in-plane resampling; ``source_orientation`` the scan's own (to turn back)."""

    geometry: Geometry
    turned_shape: tuple[int, int, int]
    turned_geometry: Geometry
    source_orientation: str


def to_model_grid(
    volumes: dict[str, np.ndarray],
    kinds: dict[str, Literal["linear", "nearest"]],
    geometry: Geometry,
    grid: ModelGrid,
    *,
    where: str,
) -> tuple[dict[str, np.ndarray], OnModelGrid]:
    """Volumes ``[S, H, W]`` of one scan (one grid, ``geometry``), each reoriented and resampled
    in-plane to ``grid`` with its interpolation ``kinds[name]``.

    Warns when the scan was acquired in another plane than the model's slices
    (:func:`acquisition_plane`): a coronal scan given to a model of sagittal slices is
    reoriented, and its new slices have pixels as long as its old slice thickness along one axis.

    Args:
        where: the scan's name for the warning (a case id or a file).
    """
    source = geometry.orientation
    acquired, model_plane = acquisition_plane(geometry), slice_plane(grid.orientation)
    if acquired is not None and acquired != model_plane:
        warnings.warn(
            f"{where}: acquired in {acquired} slices {max(geometry.spacing):.2f} mm thick "
            f"(orientation {source}), reoriented to the model's {model_plane} slices "
            f"({grid.orientation}), whose pixels are then {max(geometry.spacing):.2f} mm long "
            "along one axis: expect poorer results than on scans like the training ones",
            stacklevel=2,
        )
    turned: dict[str, np.ndarray] = {}
    turned_geometry = geometry
    for name, volume in volumes.items():
        turned[name], turned_geometry = reorient(volume, geometry, grid.orientation)
    turned_shape = next(iter(turned.values())).shape
    size = in_plane_size(turned_shape, turned_geometry, grid.spacing_mm)
    placed = OnModelGrid(
        geometry=resized_geometry(turned_geometry, turned_shape, size),
        turned_shape=tuple(turned_shape),
        turned_geometry=turned_geometry,
        source_orientation=source,
    )
    return {name: resize_slices(v, size, kinds[name]) for name, v in turned.items()}, placed


def from_model_grid(
    volume: np.ndarray, placed: OnModelGrid, kind: Literal["linear", "nearest"]
) -> np.ndarray:
    """``volume`` ``[S, H', W']`` on the model's grid mapped back onto the scan's own grid:
    resized in-plane, then turned back to the scan's orientation. The inverse of
    :func:`to_model_grid`, exact where the in-plane size was kept."""
    resized = resize_slices(volume, placed.turned_shape[-2:], kind)
    back, _ = reorient(resized, placed.turned_geometry, placed.source_orientation)
    return back
