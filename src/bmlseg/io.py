"""Volume I/O with SimpleITK that keeps the geometry.

Arrays are numpy ``[slices, H, W]`` (SimpleITK's z, y, x). Geometry is kept in SimpleITK's own
axis order (x, y, z) = (W, H, slices), so ``spacing[2]`` is the slice thickness.
Any file SimpleITK reads is accepted (NIfTI, MHA/MHD, NRRD, ...), and a folder is read as a
DICOM series. Writes go to a temporary name beside the target and are then renamed, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's (x, y, z) axis order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (spacing is in mm)."""
        return float(np.prod(self.spacing)) / 1000.0

    @classmethod
    def identity(cls, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Geometry:
        return cls(tuple(map(float, spacing)), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def mismatch(self, other: Geometry, *, tolerance: float = 1e-4) -> list[str]:
        """Names of the fields (spacing, origin, direction) that differ beyond ``tolerance``."""
        return [
            name
            for name in ("spacing", "origin", "direction")
            if not np.allclose(getattr(self, name), getattr(other, name), rtol=0, atol=tolerance)
        ]


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a 3D volume (a file, or a folder holding one DICOM series) as ``[S, H, W]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: SimpleITK cannot read it, or it is not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: SimpleITK cannot read it ({_first_line(error)})") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a scalar 3D volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    return sitk.GetArrayFromImage(image), Geometry.of(image)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write ``array`` ``[S, H, W]`` with ``geometry``; atomic (temporary name, then rename).

    The format follows the file name's extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``...).
    """
    path = Path(path)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D array [S, H, W], got shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the extension on the temporary name: SimpleITK picks the writer from it.
    # MHD writes a second (.raw/.zraw) file, so it is written in place.
    if path.suffix.lower() == ".mhd":
        sitk.WriteImage(image, str(path), useCompression=True)
        return path
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise RuntimeError("no DICOM series in this folder")
    if len(series_ids) > 1:
        raise RuntimeError(f"{len(series_ids)} DICOM series in this folder, expected one")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    return reader.Execute()


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
