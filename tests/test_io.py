"""Volume I/O: round trips with geometry, clear errors, atomic writes, files written elsewhere."""

import locale
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path

from bmlseg.io import (
    Geometry,
    dicom_instance_numbers,
    dicom_series,
    read_volume,
    remove_path,
    write_dicom_series,
    write_volume,
)

NIBABEL_DATA = data_path
NIBABEL_DICOM = NIBABEL_DATA.parent.parent / "nicom" / "tests" / "data"

FILE_FORMATS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
# NIfTI headers store float32, so geometry survives to float32 precision only.
GEOMETRY_TOLERANCE = {".nii": 1e-6, ".nii.gz": 1e-6, ".mha": 1e-12, ".mhd": 1e-12, ".nrrd": 1e-12}


@pytest.fixture
def rotated_geometry() -> Geometry:
    """Anisotropic spacing, an off-grid origin and a rotation about two axes (right-handed)."""
    a, b = 0.3, -0.2
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return Geometry(
        spacing=(0.35, 0.4, 3.3),
        origin=(-101.25, 37.5, 12.125),
        direction=tuple((about_z @ about_x).ravel().tolist()),
    )


def volume(dtype: str) -> np.ndarray:
    """[4, 5, 6] of distinct values, negative ones for signed types."""
    values = np.arange(4 * 5 * 6).reshape(4, 5, 6) - (60 if np.dtype(dtype).kind != "u" else 0)
    return (values * (0.25 if np.dtype(dtype).kind == "f" else 1)).astype(dtype)


def assert_same_geometry(read: Geometry, written: Geometry, tolerance: float) -> None:
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(read, name), getattr(written, name), atol=tolerance)


@pytest.mark.parametrize("suffix", FILE_FORMATS)
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "float32", "float64"])
def test_file_round_trip_keeps_values_dtype_and_geometry(tmp_path, rotated_geometry, suffix, dtype):
    array = volume(dtype)
    path = write_volume(tmp_path / f"volume{suffix}", array, rotated_geometry)
    read, geometry = read_volume(path)
    assert read.dtype == array.dtype
    np.testing.assert_array_equal(read, array)
    assert_same_geometry(geometry, rotated_geometry, GEOMETRY_TOLERANCE[suffix])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32"])
def test_dicom_series_round_trip_keeps_values_dtype_and_geometry(tmp_path, rotated_geometry, dtype):
    array = volume(dtype)
    folder = write_dicom_series(tmp_path / "series", array, rotated_geometry)
    assert len(list(folder.glob("*.dcm"))) == array.shape[0]
    read, geometry = read_volume(folder)
    assert read.dtype == array.dtype
    np.testing.assert_array_equal(read, array)
    assert_same_geometry(geometry, rotated_geometry, 1e-9)


def test_dicom_series_slices_carry_the_geometry_tags(tmp_path, rotated_geometry):
    folder = write_dicom_series(tmp_path / "series", volume("int16"), rotated_geometry)
    first, second = (pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))[:2])
    direction = np.reshape(rotated_geometry.direction, (3, 3))
    np.testing.assert_allclose(first.ImagePositionPatient, rotated_geometry.origin, atol=1e-9)
    step = np.subtract(second.ImagePositionPatient, first.ImagePositionPatient)
    np.testing.assert_allclose(step, direction[:, 2] * rotated_geometry.spacing[2], atol=1e-9)
    np.testing.assert_allclose(
        first.ImageOrientationPatient, [*direction[:, 0], *direction[:, 1]], atol=1e-9
    )
    # PixelSpacing is (row spacing, column spacing) = (y, x).
    np.testing.assert_allclose(first.PixelSpacing, rotated_geometry.spacing[1::-1])
    assert float(first.SliceThickness) == rotated_geometry.spacing[2]
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_dicom_series_rewrite_replaces_the_old_series(tmp_path, rotated_geometry):
    folder = tmp_path / "series"
    write_dicom_series(folder, volume("int16"), rotated_geometry)
    write_dicom_series(folder, volume("int16")[:2], rotated_geometry)
    assert read_volume(folder)[0].shape == (2, 5, 6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["series"]


def test_dicom_series_refuses_float_and_left_handed_geometry(tmp_path, rotated_geometry):
    with pytest.raises(ValueError, match="float32"):
        write_dicom_series(tmp_path / "series", volume("float32"), rotated_geometry)
    mirrored = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0))
    with pytest.raises(ValueError, match="left-handed"):
        write_dicom_series(tmp_path / "series", volume("int16"), mirrored)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", FILE_FORMATS)
def test_write_leaves_only_the_target_files(tmp_path, suffix):
    write_volume(tmp_path / f"volume{suffix}", volume("int16"), Geometry.identity())
    write_volume(tmp_path / f"volume{suffix}", volume("int16"), Geometry.identity())
    expected = {"volume.mhd", "volume.zraw"} if suffix == ".mhd" else {f"volume{suffix}"}
    assert {path.name for path in tmp_path.iterdir()} == expected


def test_failed_write_leaves_nothing_and_names_the_path(tmp_path):
    target = tmp_path / "volume.unknown"
    with pytest.raises(ValueError, match="volume.unknown"):
        write_volume(target, volume("int16"), Geometry.identity())
    with pytest.raises(ValueError, match=r"3D array.*\(5, 6\)"):
        write_volume(tmp_path / "flat.nii.gz", np.zeros((5, 6)), Geometry.identity())
    assert list(tmp_path.iterdir()) == []


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_volume(tmp_path / "absent.nii.gz")


def test_garbage_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not a volume " * 20)
    with pytest.raises(ValueError, match=r"garbage\.nii\.gz: SimpleITK cannot read it"):
        read_volume(path)


@pytest.mark.parametrize("suffix", FILE_FORMATS[:2] + (".mha", ".nrrd"))
def test_truncated_file_is_an_error_not_zeros(tmp_path, suffix):
    noise = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    path = write_volume(tmp_path / f"volume{suffix}", noise, Geometry.identity())
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    with pytest.raises(ValueError, match=f"volume{suffix}"):
        read_volume(path)


@pytest.mark.parametrize("suffix", FILE_FORMATS)
def test_nan_and_inf_voxels_survive_a_round_trip(tmp_path, suffix):
    array = volume("float32")
    array[1, 0, 3], array[2, 4, 0], array[3, 1, 1] = np.nan, np.inf, -np.inf
    read, _ = read_volume(write_volume(tmp_path / f"volume{suffix}", array, Geometry.identity()))
    np.testing.assert_array_equal(read, array)


def test_nan_in_a_nifti_written_by_nibabel_is_read_as_nan(tmp_path):
    # ITK 5 reads NIfTI NaN as 0; bmlseg.io puts it back at the right voxel.
    data = np.arange(5 * 4 * 3, dtype=np.float64).reshape(5, 4, 3)  # nibabel's (x, y, z)
    data[3, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    read, _ = read_volume(tmp_path / "nan.nii.gz")
    np.testing.assert_array_equal(read, data.transpose(2, 1, 0))
    assert np.isnan(read[1, 0, 3])


def test_folder_without_dicom_names_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(tmp_path)


def test_nibabel_4d_example_is_refused_as_not_3d():
    path = NIBABEL_DATA / "example4d.nii.gz"
    with pytest.raises(
        ValueError, match=r"example4d\.nii\.gz: expected a scalar 3D volume, got 4D"
    ):
        read_volume(path)


def test_nibabel_anatomical_matches_nibabel_header_and_data():
    path = NIBABEL_DATA / "anatomical.nii"
    array, geometry = read_volume(path)
    reference = nib.load(path)
    # nibabel indexes (x, y, z) in RAS; bmlseg [z, y, x] with geometry in ITK's LPS.
    assert array.shape == reference.shape[::-1]
    np.testing.assert_array_equal(array, np.asarray(reference.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(geometry.spacing, reference.header.get_zooms())
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(geometry.origin, ras_to_lps @ reference.affine[:3, 3])
    direction_times_spacing = np.reshape(geometry.direction, (3, 3)) * geometry.spacing
    np.testing.assert_allclose(direction_times_spacing, ras_to_lps @ reference.affine[:3, :3])


def test_nibabel_dicom_series_matches_pydicom(tmp_path):
    # 0.dcm and 1.dcm are two consecutive slices of one Siemens MR series.
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(NIBABEL_DICOM / name, tmp_path / name)
    array, geometry = read_volume(tmp_path)
    slices = sorted(
        (pydicom.dcmread(tmp_path / name) for name in ("0.dcm", "1.dcm")),
        key=lambda dataset: float(dataset.ImagePositionPatient[2]),
    )
    assert array.shape == (2, slices[0].Rows, slices[0].Columns)
    for index, dataset in enumerate(slices):
        np.testing.assert_array_equal(array[index], dataset.pixel_array)
    np.testing.assert_allclose(geometry.spacing[:2], [float(v) for v in slices[0].PixelSpacing])
    step = np.subtract(slices[1].ImagePositionPatient, slices[0].ImagePositionPatient)
    assert geometry.spacing[2] == pytest.approx(np.linalg.norm(step))
    np.testing.assert_allclose(geometry.origin, [float(v) for v in slices[0].ImagePositionPatient])
    direction = np.reshape(geometry.direction, (3, 3))
    np.testing.assert_allclose(
        np.concatenate([direction[:, 0], direction[:, 1]]),
        [float(v) for v in slices[0].ImageOrientationPatient],
        atol=1e-6,
    )


def test_single_dicom_file_is_refused_not_read_as_one_slice(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"0\.dcm: a single DICOM file holds one slice; pass the folder of its series",
    ):
        read_volume(NIBABEL_DICOM / "0.dcm")
    # The same without the .dcm extension: DICOM is told by its content.
    shutil.copy(NIBABEL_DICOM / "0.dcm", tmp_path / "IM0001")
    with pytest.raises(ValueError, match="a single DICOM file holds one slice"):
        read_volume(tmp_path / "IM0001")


def two_series_folder(tmp_path, geometry: Geometry) -> Path:
    """A folder holding a sagittal series of 4 slices ("Sag PD FS") and one of 3 ("Cor T1")."""
    folder = write_dicom_series(
        tmp_path / "study", volume("int16"), geometry, series_description="Sag PD FS"
    )
    other = write_dicom_series(
        tmp_path / "other", volume("int16")[:3] + 1000, geometry, series_description="Cor T1"
    )
    for file in other.iterdir():
        shutil.copy(file, folder / f"cor_{file.name}")
    return folder


def test_dicom_series_lists_a_folders_series_from_their_headers(tmp_path, rotated_geometry):
    folder = two_series_folder(tmp_path, rotated_geometry)
    found = dicom_series(folder)
    assert sorted((info.description, len(info.files)) for info in found) == [
        ("Cor T1", 3),
        ("Sag PD FS", 4),
    ]
    assert all(info.uid.startswith("2.25.") and info.number is None for info in found)
    assert dicom_series(tmp_path / "other")[0].files == tuple(
        sorted((tmp_path / "other").iterdir())
    )
    assert dicom_series(tmp_path) == []  # the series are in subfolders, not in tmp_path itself


def test_a_folder_of_two_series_lists_them_and_reads_the_one_chosen(tmp_path, rotated_geometry):
    folder = two_series_folder(tmp_path, rotated_geometry)
    found = {info.description: info for info in dicom_series(folder)}
    with pytest.raises(ValueError) as refused:
        read_volume(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder}: 2 DICOM series in this folder; choose one by its ")
    for info in found.values():
        assert f"\n  {info.uid} {info.description!r} ({len(info.files)} files)" in message
    sagittal, _ = read_volume(folder, series="Sag PD FS")
    np.testing.assert_array_equal(sagittal, volume("int16"))
    coronal, geometry = read_volume(folder, series=found["Cor T1"].uid)
    np.testing.assert_array_equal(coronal, volume("int16")[:3] + 1000)
    assert_same_geometry(geometry, rotated_geometry, 1e-6)
    with pytest.raises(ValueError, match=r"no DICOM series has the SeriesDescription or UID 'Ax'"):
        read_volume(folder, series="Ax")
    with pytest.raises(ValueError, match=r"series='Cor T1' chooses a DICOM series of a folder"):
        read_volume(folder / "00000.dcm", series="Cor T1")


def test_a_series_missing_a_middle_slice_is_refused_naming_the_gap(tmp_path, rotated_geometry):
    # ITK would read the 5 slices left at one spacing, 3.96 mm, with only a warning on stderr.
    six_slices = np.arange(6 * 5 * 6, dtype=np.int16).reshape(6, 5, 6)
    folder = write_dicom_series(tmp_path / "series", six_slices, rotated_geometry)
    (folder / "00002.dcm").unlink()
    with pytest.raises(ValueError) as refused:
        read_volume(folder)
    assert str(refused.value).startswith(f"{folder}: DICOM series ")
    assert (
        "a gap of 6.6 mm between InstanceNumber 2 (00001.dcm, at " in str(refused.value)
        and ") and InstanceNumber 4 (00003.dcm, at " in str(refused.value)
        and "along the slice normal, 2x the median step of 3.3 mm: a slice is missing"
        in str(refused.value)
    )


def test_a_series_with_a_repeated_slice_is_refused(tmp_path, rotated_geometry):
    folder = write_dicom_series(tmp_path / "series", volume("int16"), rotated_geometry)
    shutil.copy(folder / "00001.dcm", folder / "copy.dcm")
    with pytest.raises(
        ValueError,
        match=r"InstanceNumber 2 \(00001\.dcm, at .* and InstanceNumber 2 \(copy\.dcm, at .* are "
        "at the same position along the slice normal: a repeated slice",
    ):
        read_volume(folder)


def test_a_folder_of_one_slice_is_refused(tmp_path, rotated_geometry):
    folder = write_dicom_series(tmp_path / "series", volume("int16")[:1], rotated_geometry)
    with pytest.raises(ValueError, match=r"holds a single slice \(00000\.dcm\), not a volume"):
        read_volume(folder)


def test_dicom_io_leaves_the_process_locale_as_it_was(tmp_path, rotated_geometry):
    # GDCM sets the locale to "C", which would make ASCII Python's default text encoding.
    before = locale.setlocale(locale.LC_ALL)
    folder = write_dicom_series(
        tmp_path / "series", np.zeros((3, 4, 5), np.int16), rotated_geometry
    )
    read_volume(folder)
    dicom_series(folder)
    with pytest.raises(ValueError, match="a single DICOM file"):
        read_volume(sorted(folder.iterdir())[0])
    assert locale.setlocale(locale.LC_ALL) == before


def test_remove_path_deletes_a_file_a_folder_and_accepts_nothing(tmp_path):
    (tmp_path / "folder" / "inner").mkdir(parents=True)
    (tmp_path / "folder" / "inner" / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "file.txt").write_text("b", encoding="utf-8")
    (tmp_path / "kept.txt").write_text("c", encoding="utf-8")
    for name in ("folder", "file.txt", "absent"):
        remove_path(tmp_path / name)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.txt"]


def test_dicom_instance_numbers_follow_the_slice_order(tmp_path):
    # Slice k holds the value k, so the volume read says which file each slice came from.
    array = np.repeat(np.arange(5, dtype=np.int16)[:, None, None], 6, axis=1).repeat(7, axis=2)
    direction = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # sagittal
    folder = write_dicom_series(
        tmp_path / "series", array, Geometry((0.5, 0.5, 3.0), (0, 0, 0), direction)
    )
    numbers = dicom_instance_numbers(folder)
    volume, _ = read_volume(folder)
    assert numbers == [int(volume[k, 0, 0]) + 1 for k in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="no DICOM series"):
        dicom_instance_numbers(tmp_path)


def test_a_study_folder_names_the_subfolders_holding_series(tmp_path):
    array = np.zeros((3, 4, 5), dtype=np.int16)
    for name in ("T1", "T2"):
        write_dicom_series(tmp_path / "study" / name, array, Geometry.identity((0.5, 0.5, 3.0)))
    with pytest.raises(ValueError, match="no DICOM series in this folder; its subfolders T1, T2"):
        read_volume(tmp_path / "study")
