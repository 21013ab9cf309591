"""bmlseg-predict on real tiny files with an untrained checkpoint: one volume, a folder of scans,
DICOM folders, the bones it needs, its errors; and score thresholds under torchvision's 0.05."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmlseg.cli import predict_main
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.io import Geometry, dicom_series, read_volume, write_dicom_series, write_volume
from bmlseg.predict import BONES_REQUIRED, load_predictor, predict_file

BIN = Path(sys.executable).parent
CASES = ("s000_t0", "s001_t0")


@pytest.fixture
def tilted() -> Geometry:
    """The scans' spacing, an off-grid origin and a rotation about two axes."""
    a, b = 0.3, -0.2
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return Geometry((1.25, 1.25, 6.75), (-80.5, 37.5, 12.125), tuple((about_z @ about_x).ravel()))


def copy_case(root: Path, case: str, image: Path, bones: Path) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    bones.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "images" / f"{case}.nii.gz", image)
    shutil.copy(root / "bones" / f"{case}.nii.gz", bones)


def predict(*arguments: str | Path, checkpoint: Path) -> int:
    return predict_main(["-c", str(checkpoint), "--device", "cpu", *map(str, arguments)])


def assert_outputs(out: Path, name: str, geometry: Geometry, shape: tuple[int, ...]) -> dict:
    """The three outputs of scan ``name``, on its grid; returns the report."""
    probability, probability_geometry = read_volume(out / f"{name}_bml_prob.nii.gz")
    mask, mask_geometry = read_volume(out / f"{name}_bml_mask.nii.gz")
    assert probability.shape == mask.shape == shape
    for written in (probability_geometry, mask_geometry):
        assert not written.mismatch(geometry, tolerance=1e-5), written
    assert probability.dtype == np.float32 and 0 <= probability.min() <= probability.max() <= 1
    report = json.loads((out / f"{name}_bml_volume.json").read_text(encoding="utf-8"))
    np.testing.assert_array_equal(mask, probability >= report["mask_threshold"])
    return report


def test_one_file_gives_maps_in_its_geometry_and_the_volumes(
    synthetic_root, tiny_checkpoint, tmp_path, capsys
):
    copy_case(synthetic_root, CASES[0], tmp_path / "knee.nii.gz", tmp_path / "knee_bones.nii.gz")
    status = predict(
        "-i", tmp_path / "knee.nii.gz", "-b", tmp_path / "knee_bones.nii.gz", "-o", tmp_path / "out",
        "--score-threshold", "0.5",
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 0
    image, geometry = read_volume(tmp_path / "knee.nii.gz")
    report = assert_outputs(tmp_path / "out", "knee", geometry, image.shape)
    assert report["score_threshold"] == 0.5  # given; the checkpoint recorded 0.05
    assert report["mask_threshold"] == 0.5  # the checkpoint's train.mask_threshold
    assert set(report["bml_volume_ml"]) == {"total", "femur", "tibia", "patella"}
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "knee_bml_mask.nii.gz",
        "knee_bml_prob.nii.gz",
        "knee_bml_volume.json",
    ]
    printed = capsys.readouterr().out
    assert f"knee: BML volume total: {report['bml_volume_ml']['total']:.3f} mL" in printed


def test_a_folder_of_scans_takes_each_ones_bones_by_name(synthetic_root, tiny_checkpoint, tmp_path):
    scans, bones = tmp_path / "scans", tmp_path / "bones"
    copy_case(synthetic_root, CASES[0], scans / "a.nii.gz", bones / "a.nii.gz")
    # Another format, and things that are not scans, left alone.
    image, geometry = read_volume(synthetic_root / "images" / f"{CASES[1]}.nii.gz")
    write_volume(scans / "b.mha", image, geometry)
    shutil.copy(synthetic_root / "bones" / f"{CASES[1]}.nii.gz", bones / "b.nii.gz")
    (scans / "notes.txt").write_text("not a scan")
    (scans / "empty").mkdir()
    assert (
        predict("-i", scans, "-b", bones, "-o", tmp_path / "out", checkpoint=tiny_checkpoint) == 0
    )
    for name, case in zip("ab", CASES, strict=True):
        image, geometry = read_volume(synthetic_root / "images" / f"{case}.nii.gz")
        report = assert_outputs(tmp_path / "out", name, geometry, image.shape)
        assert report["score_threshold"] == 0.05  # recorded in the checkpoint
        assert report["bones"] == str(bones / f"{name}.nii.gz")
    assert len(list((tmp_path / "out").iterdir())) == 6


def test_dicom_folders_keep_their_geometry_and_series_chooses(
    synthetic_root, tiny_checkpoint, tmp_path, tilted, capsys
):
    """A study folder: a series folder, a folder of two series, and a volume file."""
    study, bones = tmp_path / "study", tmp_path / "bones"
    image, _ = read_volume(synthetic_root / "images" / f"{CASES[0]}.nii.gz")
    bone_labels, _ = read_volume(synthetic_root / "bones" / f"{CASES[0]}.nii.gz")
    write_dicom_series(study / "sag", image, tilted, series_description="Sag PD FS")
    write_dicom_series(study / "two", image, tilted, series_description="Sag PD FS")
    write_dicom_series(tmp_path / "cor", image[:4], tilted, series_description="Cor T1")
    for file in (tmp_path / "cor").iterdir():
        shutil.copy(file, study / "two" / f"cor_{file.name}")
    copy_case(synthetic_root, CASES[1], study / "knee.nii.gz", bones / "knee.nii.gz")
    for name in ("sag", "two"):
        write_volume(bones / f"{name}.nii.gz", bone_labels, tilted)

    # Without --series, the folder of two series stops the run, naming them.
    assert (
        predict("-i", study, "-b", bones, "-o", tmp_path / "out", checkpoint=tiny_checkpoint) == 1
    )
    # (The tiny model's 80 mm crop cuts the phantom's bone: the scans before it warn.)
    error = capsys.readouterr().err.split("bmlseg-predict: error: ", 1)[1]
    assert error.startswith(f"{study / 'two'}: 2 DICOM series in this ")
    assert "'Cor T1' (4 files)" in error and "'Sag PD FS' (16 files)" in error

    status = predict(
        "-i", study, "-b", bones, "-o", tmp_path / "out", "--series", "Sag PD FS",
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 0
    _, read_geometry = read_volume(study / "sag")
    assert not read_geometry.mismatch(tilted, tolerance=1e-6)
    for name in ("sag", "two"):
        report = assert_outputs(tmp_path / "out", name, tilted, image.shape)
        assert report["series"] == "Sag PD FS"
        # The report says how the scan was read and which grid the model saw it on.
        assert report["scan_orientation"] == tilted.orientation
        assert report["model_grid"]["orientation"] == "PIR"
    knee, knee_geometry = read_volume(study / "knee.nii.gz")
    assert_outputs(tmp_path / "out", "knee", knee_geometry, knee.shape)

    # One series folder as the input, its series chosen by UID.
    uid = next(info.uid for info in dicom_series(study / "two") if info.description == "Sag PD FS")
    status = predict(
        "-i", study / "two", "-b", bones / "two.nii.gz", "-o", tmp_path / "one", "--series", uid,
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 0
    assert_outputs(tmp_path / "one", "two", tilted, image.shape)


def test_a_series_missing_a_slice_is_refused(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    image, geometry = read_volume(synthetic_root / "images" / f"{CASES[0]}.nii.gz")
    series = write_dicom_series(tmp_path / "sag", image, geometry)
    (series / "00007.dcm").unlink()
    status = predict(
        "-i", series, "-b", synthetic_root / "bones" / f"{CASES[0]}.nii.gz", "-o", tmp_path / "out",
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith(f"bmlseg-predict: error: {series}: DICOM series ")
    assert "a gap of 13.5 mm between InstanceNumber 7 (00006.dcm, at 40.5 mm) and " in error
    assert "InstanceNumber 9 (00008.dcm, at 54 mm)" in error and "a slice is missing" in error
    assert not (tmp_path / "out").exists()


def test_without_bones_it_says_what_to_pass(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    image = synthetic_root / "images" / f"{CASES[0]}.nii.gz"
    assert predict("-i", image, "-o", tmp_path / "out", checkpoint=tiny_checkpoint) == 1
    assert capsys.readouterr().err == f"bmlseg-predict: error: {BONES_REQUIRED}\n"
    assert "pass --bones FILE|FOLDER" in BONES_REQUIRED and "no bone model" in BONES_REQUIRED
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("no input", "{tmp}/nowhere.nii.gz: no such file or folder (input)"),
        ("no bones for a scan", "{tmp}/bones: no bones for scan b: expected {tmp}/bones/b.nii.gz"),
        ("one bones file, two scans", "{tmp}/bones/a.nii.gz: one bones file for 2 scans in"),
        ("a single DICOM file", "{tmp}/scans/00000.dcm: a single DICOM file holds one slice; "),
        ("no scans", "{tmp}/scans: no scan in this folder: expected volume files (.nii.gz, "),
        ("output into the input", "{tmp}/scans: the input folder; write the outputs to another"),
        ("two scans of one name", "{tmp}/scans: a.mha, a.nii.gz would all be written as a_bml_*"),
    ],
)
def test_bad_input_ends_with_one_line_naming_it(
    synthetic_root, tiny_checkpoint, tmp_path, capsys, layout, expected
):
    scans, bones = tmp_path / "scans", tmp_path / "bones"
    copy_case(synthetic_root, CASES[0], scans / "a.nii.gz", bones / "a.nii.gz")
    copy_case(synthetic_root, CASES[1], scans / "b.nii.gz", bones / "b.nii.gz")
    arguments = {"input": scans, "bones": bones, "output": tmp_path / "out"}
    if layout == "no input":
        arguments["input"] = tmp_path / "nowhere.nii.gz"
    elif layout == "no bones for a scan":
        (bones / "b.nii.gz").unlink()
    elif layout == "one bones file, two scans":
        arguments["bones"] = bones / "a.nii.gz"
    elif layout == "a single DICOM file":
        image, geometry = read_volume(scans / "a.nii.gz")
        write_dicom_series(tmp_path / "series", image, geometry)
        shutil.copy(tmp_path / "series" / "00000.dcm", scans / "00000.dcm")
        arguments["input"] = scans / "00000.dcm"
        arguments["bones"] = bones / "a.nii.gz"
    elif layout == "no scans":
        for scan in scans.iterdir():
            scan.rename(scan.with_suffix(".bak"))
    elif layout == "output into the input":
        arguments["output"] = scans
    elif layout == "two scans of one name":
        shutil.copy(scans / "a.nii.gz", scans / "a.mha")
    status = predict(
        "-i", arguments["input"], "-b", arguments["bones"], "-o", arguments["output"],
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith(f"bmlseg-predict: error: {expected.format(tmp=tmp_path)}"), error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_the_installed_command_runs_and_fails_without_a_traceback(
    synthetic_root, tiny_checkpoint, tmp_path
):
    image = synthetic_root / "images" / f"{CASES[0]}.nii.gz"
    bones = synthetic_root / "bones" / f"{CASES[0]}.nii.gz"
    command = [str(BIN / "bmlseg-predict"), "-i", str(image), "-b", str(bones), "--device", "cpu"]
    result = subprocess.run(
        [*command, "-c", str(tiny_checkpoint), "-o", str(tmp_path / "out")],
        capture_output=True,
        encoding="utf-8",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{CASES[0]}: BML volume femur: " in result.stdout
    assert (tmp_path / "out" / f"{CASES[0]}_bml_prob.nii.gz").is_file()
    result = subprocess.run(
        [*command, "-c", str(tmp_path / "nowhere.pt"), "-o", str(tmp_path / "out2")],
        capture_output=True,
        encoding="utf-8",
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr == f"bmlseg-predict: error: {tmp_path / 'nowhere.pt'}: no such checkpoint\n"
    )


def test_score_thresholds_under_torchvisions_floor_take_effect(
    synthetic_root, tiny_checkpoint, tmp_path
):
    """torchvision's RoI heads drop detections scoring under box_score_thresh (0.05);
    prediction lowers that floor to the score threshold, so 0.0 keeps every detection."""
    state = checkpoints.load(tiny_checkpoint)
    # Box scores of the untrained model lie in 0.52-0.70: shifted to about 0.03-0.07.
    state["model"]["roi_heads.box_predictor.cls_score.bias"][1] -= 3.4
    low = checkpoints.save(tmp_path / "low.pt", state)
    image = synthetic_root / "images" / f"{CASES[0]}.nii.gz"
    bones = synthetic_root / "bones" / f"{CASES[0]}.nii.gz"
    maps = {}
    for threshold in (0.0, 0.05):
        predictor = load_predictor(low, device="cpu", score_threshold=threshold)
        predict_file(predictor, image, bones, tmp_path / str(threshold))
        maps[threshold], _ = read_volume(tmp_path / str(threshold) / f"{CASES[0]}_bml_prob.nii.gz")
        # The model's own floor is left as it was.
        assert predictor.model.roi_heads.score_thresh == 0.05
    # Detections under 0.05 add to the map; none of those over it is lost.
    assert maps[0.0].sum() > maps[0.05].sum() > 0
    assert np.all(maps[0.0] >= maps[0.05] - 1e-5)


def test_a_checkpoint_from_before_the_model_grid_is_named_as_such(tiny_checkpoint, tmp_path):
    import torch

    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["config"]["data"]["orientation"], state["config"]["data"]["spacing_mm"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="before the model's grid: its config has no "
                       "data.orientation, data.spacing_mm"):  # fmt: skip
        checkpoints.load(tmp_path / "old.pt")


def test_a_coronal_scan_is_predicted_on_its_grid_with_one_warning_line(
    tiny_checkpoint, tmp_path, capsys
):
    # Coronal slices (3 mm front to back) of 0.5 mm pixels: reoriented and resampled for the
    # model, written back on their own grid.
    shape = (12, 64, 56)
    coronal = Geometry((0.5, 0.5, 3.0), (5.0, -3.0, 2.0), (1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0))
    assert coronal.orientation == "LIP"
    image = np.random.default_rng(0).normal(100.0, 10.0, shape).astype(np.float32)
    bones = np.zeros(shape, dtype=np.uint8)
    bones[:, 10:50, 8:48] = 1
    write_volume(tmp_path / "knee.nii.gz", image, coronal)
    write_volume(tmp_path / "knee_bones.nii.gz", bones, coronal)
    status = predict(
        "-i", tmp_path / "knee.nii.gz", "-b", tmp_path / "knee_bones.nii.gz", "-o", tmp_path / "out",
        checkpoint=tiny_checkpoint,
    )  # fmt: skip
    assert status == 0
    report = assert_outputs(tmp_path / "out", "knee", coronal, shape)
    assert report["scan_orientation"] == "LIP"
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        f"bmlseg-predict: warning: {tmp_path / 'knee.nii.gz'}: acquired in coronal slices 3.00 mm "
        "thick (orientation LIP), reoriented to the model's sagittal slices (PIR), whose pixels "
        "are then 3.00 mm long along one axis: expect poorer results than on scans like the "
        "training ones"
    ]
