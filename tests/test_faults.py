"""Broken input and interrupted runs, as a user meets them: every tool checks what it reads and
fails with a message naming the file and the problem, writes nothing, and loses nothing.

Each test breaks a copy of the session's generated folder. Training runs, bmlseg-eval and
bmlseg-predict on a trained checkpoint: tests/test_train.py.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from bmlseg.config import register_configs
from bmlseg.data.format import (
    DatasetError,
    bones_path,
    read_dataset_json,
    softlabel_path,
)
from bmlseg.engine.train import ensure_labels
from bmlseg.io import Geometry, read_volume, write_volume
from bmlseg.labels import generate

BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )


@pytest.fixture
def root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A fresh copy of the session's generated folder, to break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def listing(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


def rewrite_volume(path: Path, change) -> None:
    array, geometry = read_volume(path)
    array, geometry = change(array.copy(), geometry)
    write_volume(path, array, geometry)


def case_ids(root: Path) -> list[str]:
    return [record.id for record in read_dataset_json(root).cases]


def last_case(root: Path) -> str:
    return case_ids(root)[-1]


def other_spacing(array, geometry):
    return array, Geometry((2.0, *geometry.spacing[1:]), geometry.origin, geometry.direction)


def other_direction(array, geometry):
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    return array, Geometry(geometry.spacing, geometry.origin, flipped)


def other_shape(array, geometry):
    return array[:-1], geometry


def undeclared_bone(array, geometry):
    array[array == 3] = 7
    return array, geometry


def no_bone(array, geometry):
    return np.zeros_like(array), geometry


def nan_voxels(array, geometry):
    array = array.astype(np.float32)
    array[0, 0, :3] = np.nan
    return array, geometry


def blank(array, geometry):
    return np.zeros_like(array), geometry


def bone_labels_as_truth(array, geometry):
    return array * 2, geometry


# (folder, change, what the message says); each breaks the last case, so that the others were
# labelled first.
VOLUME_FAULTS = {
    "bones spacing": ("bones", other_spacing, "spacing (2.0, "),
    "bones direction": ("bones", other_direction, "direction (-1.0, "),
    "bones shape": ("bones", other_shape, "shape ("),
    "undeclared bone": ("bones", undeclared_bone, "labels [7] are not declared"),
    "no bone": ("bones", no_bone, "no bone voxels"),
    "NaN image": ("images", nan_voxels, "3 NaN or infinite voxel(s)"),
    "blank image": ("images", blank, "blank: every voxel is 0"),
    "truth not 0/1": ("masks", bone_labels_as_truth, "values must be 0 or 1, found [2]"),
}


def break_volume(root: Path, fault: str) -> str:
    """Break the last case's volume as VOLUME_FAULTS[fault] says; its path under root."""
    folder, change, _ = VOLUME_FAULTS[fault]
    path = root / folder / f"{last_case(root)}.nii.gz"
    rewrite_volume(path, change)
    return path.relative_to(root).as_posix()


@pytest.mark.parametrize("fault", sorted(VOLUME_FAULTS))
def test_labels_refuses_a_broken_volume_and_writes_nothing(root: Path, tmp_path: Path, fault):
    where = break_volume(root, fault)
    method = "truth" if fault == "truth not 0/1" else "binary_majority"
    before = listing(root)
    result = run(str(BIN / "bmlseg-labels"), f"data.root={root}", f"labels={method}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"bmlseg-labels: error: {root / where}: {VOLUME_FAULTS[fault][2]}" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing written: the cases labelled before the broken one are not kept as a label set.
    assert {name: stamp for name, stamp in listing(root).items() if "softlabels" not in name} == {
        name: stamp for name, stamp in before.items()
    }
    assert [path for path in root.rglob("*") if "softlabels" in path.parts and path.is_file()] == []


def test_check_reports_the_same_volume_faults(root: Path):
    from bmlseg.data.format import check

    for fault in ("no bone", "blank image"):
        break_volume(root, fault)
    whats = [problem.what for problem in check(root)]
    assert VOLUME_FAULTS["no bone"][2] in " ".join(whats)
    assert VOLUME_FAULTS["blank image"][2] in " ".join(whats)


def test_labels_refuses_an_annotation_row_of_an_unlisted_case(root: Path, tmp_path: Path):
    path = root / "annotations.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines, "s999_t0,r1,0,femur,0,0,4,4"]) + "\n", encoding="utf-8")
    result = run(str(BIN / "bmlseg-labels"), f"data.root={root}", "labels=uniform", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        f"{root}/annotations.csv line {len(lines) + 1}: case 's999_t0' is not listed in "
        "dataset.json" in result.stderr
    )
    assert not (root / "softlabels").exists()


def test_an_interrupted_label_set_is_not_taken_as_finished(root: Path):
    generate(root, "uniform", epsilon=0.1)
    # A killed run's temporary folder is removed by the next run.
    leftover = root / "softlabels" / ".tmp-0badc0de-uniform"
    leftover.mkdir()
    (leftover / f"{last_case(root)}.nii.gz").write_bytes(b"half")
    generate(root, "uniform", epsilon=0.1)
    assert not leftover.exists()
    folder = root / "softlabels" / "uniform"
    before = listing(folder)
    # Remaking them with other options fails on the last case: the finished set stays as it
    # was, options.json included, and no temporary folder is left.
    break_volume(root, "bones shape")
    with pytest.raises(DatasetError, match=r"bones/.*: shape"):
        generate(root, "uniform", overwrite=True, epsilon=0.3)
    assert listing(folder) == before
    assert json.loads((folder / "options.json").read_text())["options"]["epsilon"] == 0.1
    assert sorted(path.name for path in (root / "softlabels").iterdir()) == ["uniform"]


def test_labels_are_remade_when_a_case_loses_its_rectangles(root: Path, tmp_path, caplog):
    result = run(str(BIN / "bmlseg-labels"), f"data.root={root}", "labels=binary_any", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = {case: softlabel_path(root, "binary_any", case) for case in case_ids(root)}
    marked = next(case for case, path in paths.items() if read_volume(path)[0].any())
    stamps = {case: path.stat().st_mtime_ns for case, path in paths.items()}
    # Every rectangle of one case removed: its old label must not stay.
    path = root / "annotations.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(
        "\n".join(line for line in lines if not line.startswith(f"{marked},")) + "\n",
        encoding="utf-8",
    )
    result = run(str(BIN / "bmlseg-labels"), f"data.root={root}", "labels=binary_any", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"case {marked}'s ratings changed since its label was made" in result.stdout
    assert not read_volume(paths[marked])[0].any()
    # The others are kept as they were.
    for case, stamp in stamps.items():
        if case != marked:
            assert paths[case].stat().st_mtime_ns == stamp, case


@pytest.fixture(scope="module")
def hydra_conf():
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        yield


def test_trainings_label_step_remakes_labels_of_an_edited_image(hydra_conf, root: Path, caplog):
    cfg = compose("train", overrides=[f"data.root={root}", "labels=uniform"])
    ensure_labels(cfg, "uniform")
    case = case_ids(root)[0]
    before = read_volume(softlabel_path(root, "uniform", case))[0]
    # Bones edited: uniform smoothing lives inside bone, so the label changes with them.
    rewrite_volume(bones_path(root, case), lambda array, geometry: (array * (array != 1), geometry))
    with caplog.at_level(logging.WARNING):
        ensure_labels(cfg, "uniform")
    assert f"case {case}'s bones changed" in caplog.text
    assert not np.array_equal(read_volume(softlabel_path(root, "uniform", case))[0], before)


def test_other_options_name_the_command_that_remakes_them(hydra_conf, root: Path, tmp_path):
    generate(root, "svls")
    cfg = compose("train", overrides=[f"data.root={root}", "labels=svls", "labels.options.sigma=2"])
    with pytest.raises(ValueError, match="remake them with this run's options: ") as error:
        ensure_labels(cfg, "svls")
    command = str(error.value).split("remake them with this run's options: ")[1]
    assert (
        command
        == f"bmlseg-labels data.root={root} labels=svls labels.options.sigma=2 overwrite=true"
    )
    # The command composes and does it.
    words = shlex.split(command)
    result = run(str(BIN / words[0]), *words[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ensure_labels(cfg, "svls")
    # bmlseg-labels itself names its own override.
    result = run(str(BIN / "bmlseg-labels"), f"data.root={root}", "labels=svls", cwd=tmp_path)
    assert result.returncode == 1
    assert "add overwrite=true to this command to remake them" in result.stderr


def test_synth_refuses_a_dataset_folder_then_replaces_it_with_its_labels(root: Path, tmp_path):
    generate(root, "uniform")
    (root / "notes.txt").write_text("mine", encoding="utf-8")
    before = listing(root)
    result = run(str(BIN / "bmlseg-synth"), f"root={root}", "n_subjects=2", "seed=7", cwd=tmp_path)
    assert result.returncode == 1
    assert f"bmlseg-synth: error: {root}: not empty" in result.stderr
    assert "add overwrite=true" in result.stderr
    assert listing(root) == before
    result = run(
        str(BIN / "bmlseg-synth"),
        f"root={root}",
        "n_subjects=2",
        "seed=7",
        "overwrite=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The old labels belonged to other scans: gone with them; files of the user's own stay.
    assert not (root / "softlabels").exists()
    assert (root / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert len(case_ids(root)) == 4
    assert run(str(BIN / "bmlseg-check"), str(root), cwd=tmp_path).returncode == 0
