"""Volume I/O with SimpleITK that keeps the geometry.

Arrays are numpy ``[slices, H, W]`` (SimpleITK's z, y, x). Geometry is kept in SimpleITK's own
axis order (x, y, z) = (W, H, slices), so ``spacing[2]`` is the slice thickness; ``direction``
holds the axis directions as the *columns* of a row-major 3x3 matrix, in LPS coordinates.

Any volume file SimpleITK reads is accepted (NIfTI-1 ``.nii``/``.nii.gz``, MHA/MHD, NRRD, a
multi-frame DICOM file), and a folder is read as a DICOM series: :func:`dicom_series` lists a
folder's series from their headers, and :func:`read_volume` refuses what SimpleITK would read
wrong without an error (a folder of several series, unevenly spaced or repeated slices, a single
slice file). :func:`write_volume` writes the file formats, :func:`write_dicom_series` a DICOM
series folder. A write followed by a read gives back
the same array, dtype and geometry (to float32 precision for NIfTI, whose header stores float32;
to 10 significant digits for DICOM, whose header stores decimal strings).

Writes go to a temporary name beside the target and are then renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import gzip
import locale
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# DICOM stores pixels as integers; these are the types GDCM writes and reads back unchanged.
DICOM_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32")
# Names of the volume files SimpleITK reads and writes, as they end.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
# NIfTI-1 datatype codes of float32 and float64 voxels.
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in SimpleITK's (x, y, z) axis order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    @property
    def orientation(self) -> str:
        """The orientation code closest to the direction matrix: where the x (columns), y (rows)
        and z (slices) axes point, in ITK's convention, e.g. ``PIR`` (bmlseg.data.grid)."""
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)

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


def read_volume(
    path: str | os.PathLike, *, series: str | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D volume (a file, or a folder holding a DICOM series) as ``[S, H, W]``.

    Args:
        series: for a folder holding several DICOM series, the one to read: its
            SeriesDescription (exactly) or its SeriesInstanceUID. Only for folders.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: SimpleITK cannot read it, it is truncated, or it is not a scalar 3D volume;
            a folder holds no DICOM series, or several and ``series`` does not choose one; a
            series' slices are not evenly spaced (a missing or repeated slice); a DICOM file
            holds a single slice.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        source: str | list[str] = [str(file) for file in _series_files(path, series)]
    elif series is not None:
        raise ValueError(
            f"{path}: series={series!r} chooses a DICOM series of a folder; a file holds one volume"
        )
    else:
        _refuse_single_dicom_slice(path)
        source = str(path)
    try:
        with _process_locale_kept():
            # A list of files is read by ImageSeriesReader as one volume, in the list's order.
            image = sitk.ReadImage(source)
    except RuntimeError as error:
        raise ValueError(f"{path}: SimpleITK cannot read it: {_reason(error)}") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a scalar 3D volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    array = sitk.GetArrayFromImage(image)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        array = _nifti_as_written(path, array)
    return array, Geometry.of(image)


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The geometry of a volume file from its header alone, without reading its voxels.

    Raises:
        ValueError: SimpleITK cannot read the header.
    """
    reader = _header_reader(Path(path))
    return Geometry(
        tuple(float(v) for v in reader.GetSpacing()),
        tuple(float(v) for v in reader.GetOrigin()),
        tuple(float(v) for v in reader.GetDirection()),
    )


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of a folder, as its headers describe it.

    Attributes:
        uid: SeriesInstanceUID (0020,000E).
        description: SeriesDescription (0008,103E), "" when absent.
        number: SeriesNumber (0020,0011), None when absent.
        files: its files, in GDCM's slice order; ``len(files)`` slices unless multi-frame.
    """

    uid: str
    description: str
    number: int | None
    files: tuple[Path, ...]

    def __str__(self) -> str:
        number = f", SeriesNumber {self.number}" if self.number is not None else ""
        return f"{self.uid} {self.description!r} ({len(self.files)} files{number})"


def dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series among the files of ``folder`` (not its subfolders), by SeriesNumber
    then UID; empty when it holds none. Reads headers only, not pixels."""
    folder = Path(folder)
    found = []
    with _process_locale_kept(), _itk_warnings_hidden():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            header = _dicom_header(Path(files[0]))
            number = header.get("0020|0011", "")
            found.append(
                SeriesInfo(
                    uid=uid,
                    description=header.get("0008|103e", ""),
                    number=int(number) if number.lstrip("-").isdigit() else None,
                    files=tuple(map(Path, files)),
                )
            )
    return sorted(found, key=lambda info: (info.number is None, info.number or 0, info.uid))


def dicom_instance_numbers(folder: str | os.PathLike, *, series: str | None = None) -> list[int]:
    """The InstanceNumber (0020,0013) of each slice of a DICOM series folder, in the slice order
    of :func:`read_volume` (by position along the slice normal), e.g. for a dataset.json case's
    ``instance_numbers``. ``series`` chooses among several series, as for read_volume.

    Raises:
        ValueError: as read_volume for the folder, or a slice without an InstanceNumber.
    """
    folder = Path(folder)
    numbers = []
    for file in _series_files(folder, series):
        text = _dicom_header(file).get("0020|0013", "")
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{file}: no InstanceNumber (0020,0013), got {text!r}")
        numbers.append(int(text))
    return numbers


def _series_files(folder: Path, series: str | None) -> list[Path]:
    """The files of the series of ``folder`` that ``series`` chooses, checked to be a volume."""
    found = dicom_series(folder)
    if not found:
        below = sorted(
            entry.name for entry in folder.iterdir() if entry.is_dir() and dicom_series(entry)
        )
        where = f"; its subfolders {', '.join(below)} hold DICOM series: pass one" if below else ""
        raise ValueError(f"{folder}: no DICOM series in this folder{where}")
    if series is None:
        if len(found) > 1:
            raise ValueError(
                f"{folder}: {len(found)} DICOM series in this folder; choose one by its "
                f"SeriesDescription or UID (series=..., bmlseg-predict --series):{_listed(found)}"
            )
        chosen = found[0]
    else:
        matches = [info for info in found if series in (info.uid, info.description)]
        if not matches:
            raise ValueError(
                f"{folder}: no DICOM series has the SeriesDescription or UID {series!r}; it "
                f"holds:{_listed(found)}"
            )
        if len(matches) > 1:
            raise ValueError(
                f"{folder}: {len(matches)} DICOM series are described as {series!r}; choose one "
                f"by its UID:{_listed(matches)}"
            )
        chosen = matches[0]
    _check_slice_positions(folder, chosen)
    return list(chosen.files)


def _listed(series: list[SeriesInfo]) -> str:
    return "".join(f"\n  {info}" for info in series)


def _check_slice_positions(folder: Path, info: SeriesInfo) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal.

    ITK reads any series at one spacing (with only a warning on stderr), so a missing slice
    would shift every slice past it and enlarge the volume, and a repeated one would be read
    as a slice of its own.
    """
    where = f"{folder}: DICOM series {info.uid}"
    headers = [_dicom_header(file) for file in info.files]
    if len(headers) == 1:
        if _frames(headers[0]) > 1:
            return  # a multi-frame file: its frames are placed by the file itself
        raise ValueError(f"{where} holds a single slice ({info.files[0].name}), not a volume")
    positions, orientations = [], []
    for file, header in zip(info.files, headers, strict=True):
        for tag, name in (
            ("0020|0032", "ImagePositionPatient"),
            ("0020|0037", "ImageOrientationPatient"),
        ):
            if not header.get(tag):
                raise ValueError(
                    f"{where}: {file.name} has no {name} ({tag.replace('|', ',')}): "
                    "its slice cannot be placed"
                )
        positions.append(_decimals(header["0020|0032"]))
        orientations.append(_decimals(header["0020|0037"]))
    orientation = np.asarray(orientations[0])
    if not np.allclose(orientations, orientation, atol=1e-4):
        raise ValueError(
            f"{where}: its slices have different ImageOrientationPatient; "
            "expected one orientation for a volume"
        )
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.asarray(positions) @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    median = float(np.median(steps))

    def described(index: int) -> str:
        file = order[index]
        instance = headers[file].get("0020|0013") or "?"
        return f"InstanceNumber {instance} ({info.files[file].name}, at {along[file]:.4g} mm)"

    for index, step in enumerate(steps):
        if step <= 0.1 * median or step <= 1e-4:
            raise ValueError(
                f"{where}: {described(index)} and {described(index + 1)} are at the same "
                "position along the slice normal: a repeated slice; remove the duplicate file"
            )
        if abs(step - median) > 0.1 * median:
            kind = "a slice is missing" if step > 1.5 * median else "uneven slice spacing"
            raise ValueError(
                f"{where}: a gap of {step:.4g} mm between {described(index)} and "
                f"{described(index + 1)} along the slice normal, {step / median:.3g}x the median "
                f"step of {median:.4g} mm: {kind}; SimpleITK would read the series at one "
                "spacing and misplace every slice past the gap"
            )


def _refuse_single_dicom_slice(path: Path) -> None:
    """A DICOM file of one frame would be read as a volume of one slice."""
    with _process_locale_kept(), _itk_warnings_hidden():
        is_dicom = sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO"
    if is_dicom and _frames(_dicom_header(path)) == 1:
        raise ValueError(
            f"{path}: a single DICOM file holds one slice; pass the folder of its series"
        )


def _dicom_header(path: Path) -> dict[str, str]:
    """The header tags of a DICOM file ("gggg|eeee" -> value), without reading its pixels."""
    reader = _header_reader(path)
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def _header_reader(path: Path) -> sitk.ImageFileReader:
    """A reader that has read ``path``'s header (and not its voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _process_locale_kept():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"{path}: SimpleITK cannot read its header: {_reason(error)}") from error
    return reader


def _frames(header: dict[str, str]) -> int:
    """NumberOfFrames (0028,0008) of a DICOM header: 1 unless a multi-frame file."""
    return int(header.get("0028|0008") or 1)


def _decimals(text: str) -> list[float]:
    """A DICOM multi-valued decimal string (``1\\0\\0``) as floats."""
    return [float(value) for value in text.split("\\")]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed to ``path`` when the block ends.

    A reader never sees a half-written file, and a failed write leaves nothing behind. The
    temporary name ends like ``path``, so writers that choose the format from the extension
    (SimpleITK, matplotlib) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file or a folder with all it holds; nothing when there is none."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 under a temporary name, then rename it to ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill, put in place of ``path`` (and of whatever it
    held) when the block ends: readers see the old folder or the complete new one. A failed
    block leaves ``path`` as it was and removes the temporary folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    staging.mkdir()
    try:
        yield staging
        _replace_folder(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write ``array`` ``[S, H, W]`` with ``geometry`` to one file; atomic.

    The format follows the file name's extension (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``,
    ``.nrrd``). For a DICOM series use :func:`write_dicom_series`.

    Raises:
        ValueError: ``array`` is not 3D, or SimpleITK cannot write this extension or dtype.
    """
    path = Path(path)
    image = _image_from_array(path, array, geometry)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary folder beside the target keeps the final file name, from which SimpleITK picks
    # the writer, and holds MHD's second (.zraw) file, which the header names.
    staging = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    staging.mkdir()
    try:
        try:
            sitk.WriteImage(image, str(staging / path.name), useCompression=True)
        except RuntimeError as error:
            raise ValueError(f"{path}: SimpleITK cannot write it: {_reason(error)}") from error
        # The header goes last so that it never names data that is not there yet.
        written = sorted(staging.iterdir(), key=lambda file: file.name == path.name)
        for file in written:
            os.replace(file, path.with_name(file.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    geometry: Geometry,
    *,
    modality: str = "MR",
    series_description: str = "bmlseg",
) -> Path:
    """Write ``array`` ``[S, H, W]`` as a DICOM series, one file per slice, into ``folder``.

    Each slice carries ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness and SpacingBetweenSlices, so :func:`read_volume` on the folder restores the
    geometry. The series is written to a temporary folder that then replaces ``folder``.

    Raises:
        ValueError: ``array`` is not 3D, its dtype is not one of :data:`DICOM_DTYPES`, or the
            direction is left-handed (DICOM derives the slice axis as row x column direction).
    """
    folder = Path(folder)
    if array.dtype.name not in DICOM_DTYPES:
        raise ValueError(
            f"{folder}: DICOM stores integer pixels ({', '.join(DICOM_DTYPES)}), got "
            f"{array.dtype}; scale and cast the array first"
        )
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    if np.linalg.det(direction) <= 0:
        raise ValueError(
            f"{folder}: direction {geometry.direction} is left-handed; DICOM cannot store it "
            "(reverse the slice axis and negate its direction column)"
        )
    image = _image_from_array(folder, array, geometry)
    series_uid, study_uid = _dicom_uid(), _dicom_uid()
    shared_tags = {
        "0008|0060": modality,
        "0008|103e": series_description,
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0037": "\\".join(_decimal_string(v) for v in (*direction[:, 0], *direction[:, 1])),
        "0018|0050": _decimal_string(geometry.spacing[2]),  # SliceThickness
        "0018|0088": _decimal_string(geometry.spacing[2]),  # SpacingBetweenSlices
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{folder.name}")
    staging.mkdir()
    writer = sitk.ImageFileWriter()
    # Keep the UIDs set below: otherwise every slice gets a new series UID.
    writer.KeepOriginalImageUIDOn()
    try:
        with _process_locale_kept():
            for index in range(array.shape[0]):
                slice_image = image[:, :, index]
                for tag, value in shared_tags.items():
                    slice_image.SetMetaData(tag, value)
                position = image.TransformIndexToPhysicalPoint((0, 0, index))
                slice_image.SetMetaData("0020|0032", "\\".join(map(_decimal_string, position)))
                slice_image.SetMetaData("0020|0013", str(index + 1))  # InstanceNumber
                slice_image.SetMetaData("0008|0018", _dicom_uid())  # SOPInstanceUID
                writer.SetFileName(str(staging / f"{index:05d}.dcm"))
                writer.Execute(slice_image)
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _image_from_array(path: Path, array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D array [S, H, W], got shape {array.shape}")
    try:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    except TypeError as error:
        raise ValueError(f"{path}: SimpleITK cannot store dtype {array.dtype}") from error
    geometry.apply_to(image)
    return image


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``, removing whatever ``target`` held."""
    if target.exists():
        retired = target.with_name(f".old-{uuid.uuid4().hex[:8]}-{target.name}")
        os.replace(target, retired)
        os.replace(new, target)
        shutil.rmtree(retired)
    else:
        os.replace(new, target)


@contextmanager
def _itk_warnings_hidden() -> Iterator[None]:
    """Silence ITK's warnings on stderr, e.g. GDCM's "No Series were found" for a folder that
    holds no DICOM (which its caller reports as it sees fit)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextmanager
def _process_locale_kept() -> Iterator[None]:
    """Undo GDCM's change of the process locale.

    GDCM (SimpleITK's DICOM I/O) sets the locale to "C", which makes ASCII the default text
    encoding of everything the process does afterwards, e.g. ``open()`` and ``subprocess``.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _nifti_as_written(path: Path, array: np.ndarray) -> np.ndarray:
    """Check a NIfTI-1 file's length and put back the NaN and infinite voxels ITK zeroes.

    ITK 5's NIfTI reader fills the missing voxels of a truncated file with zeros, and replaces
    every NaN and +-inf by 0 (fixed in ITK 6: InsightSoftwareConsortium/ITK#6683). This reads the
    file a second time, decompressing a ``.nii.gz`` again.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated ({error})") from None
    layout = _nifti1_layout(content[:348])
    if layout is None:
        return array
    byte_order, datatype, bitpix, vox_offset = layout
    expected = vox_offset + array.size * bitpix // 8
    if len(content) < expected:
        raise ValueError(
            f"{path}: truncated: the header announces {expected} bytes, the file holds "
            f"{len(content)}"
        )
    stored_float = NIFTI_FLOAT_TYPES.get(datatype)
    if stored_float is None:
        return array
    stored = np.frombuffer(
        content, dtype=byte_order + stored_float, count=array.size, offset=vox_offset
    ).reshape(array.shape)
    non_finite = ~np.isfinite(stored)
    array[non_finite] = stored[non_finite]
    return array


def _nifti1_layout(header: bytes) -> tuple[str, int, int, int] | None:
    """(byte order, datatype code, bitpix, vox_offset) of a NIfTI-1 header; None otherwise."""
    for byte_order in "<>":
        if len(header) == 348 and struct.unpack(f"{byte_order}i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(f"{byte_order}2h", header[70:74])
            vox_offset = struct.unpack(f"{byte_order}f", header[108:112])[0]
            return byte_order, datatype, bitpix, int(vox_offset)
    return None


def _decimal_string(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) holding ``value`` as precisely as fits."""
    for digits in range(12, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DICOM decimal string")


def _dicom_uid() -> str:
    # UUID-derived UIDs under the 2.25 root need no registered organisation prefix.
    return f"2.25.{uuid.uuid4().int}"


def _reason(error: Exception) -> str:
    """SimpleITK's message without its source-location line and ``ITK ERROR: Class(0x..):``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    cleaned = [line.split("): ", 1)[-1] if "ERROR" in line else line for line in lines]
    return " ".join(cleaned) or type(error).__name__
