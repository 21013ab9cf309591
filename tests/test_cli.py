"""The console scripts as a user runs them: exit codes, files written, clear errors.

bmlseg-train, bmlseg-eval, bmlseg-predict and bmlseg-report on trained runs: tests/test_train.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmlseg.io import read_volume, write_volume

BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )


def test_synth_writes_a_dataset_that_check_accepts(tmp_path):
    result = run(
        str(BIN / "bmlseg-synth"),
        "root=data",
        "n_subjects=2",
        "seed=3",
        "preview=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "data" / "dataset.json").read_text(encoding="utf-8"))
    assert len(info["cases"]) == 4 and info["generator"]["seed"] == 3
    assert (tmp_path / "data" / "preview.png").is_file()
    # A tool writes only what it is asked for: no Hydra output folder beside it.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert run(str(BIN / "bmlseg-check"), "data", cwd=tmp_path).returncode == 0


def test_check_fails_on_a_broken_folder(tmp_path):
    (tmp_path / "data").mkdir()
    result = run(str(BIN / "bmlseg-check"), "data", cwd=tmp_path)
    assert result.returncode != 0
    assert "dataset.json" in result.stdout + result.stderr


def test_labels_writes_each_case_and_evaluates(synthetic_root: Path, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    result = run(
        str(BIN / "bmlseg-labels"),
        f"data.root={root}",
        "labels=binary_majority",
        "evaluate=true",
        f"out_dir={tmp_path / 'quality'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cases = [
        case["id"]
        for case in json.loads((root / "dataset.json").read_text(encoding="utf-8"))["cases"]
    ]
    written = sorted(
        path.name for path in (root / "softlabels" / "binary_majority").glob("*.nii.gz")
    )
    assert written == sorted(f"{case}.nii.gz" for case in cases)
    table = (tmp_path / "quality" / "label_quality.md").read_text(encoding="utf-8")
    # The evaluation scores every method, side by side.
    for method in ("kimriss", "binary_any", "binary_majority", "staple", "svls", "dilate"):
        assert f"| {method} |" in table


@pytest.mark.parametrize(
    ("override", "named"),
    [("loss.bcee=1", "loss.bcee"), ("train.amp=fp61", "fp61"), ("loss=apl_sofft", "apl_sofft")],
)
def test_train_rejects_a_mistyped_override_before_training(tmp_path, override, named):
    result = run(str(BIN / "bmlseg-train"), override, cwd=tmp_path)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_eval_without_a_checkpoint_says_so(tmp_path):
    result = run(str(BIN / "bmlseg-eval"), f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "checkpoint" in result.stderr


def test_eval_of_a_missing_checkpoint_names_the_file(tmp_path):
    result = run(
        str(BIN / "bmlseg-eval"),
        "checkpoint=nowhere/best.pt",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "nowhere/best.pt" in result.stderr


@pytest.mark.parametrize("tool", ["bmlseg-eval", "bmlseg-predict"])
def test_a_file_that_is_not_a_bmlseg_checkpoint_is_named_as_such(synthetic_root, tmp_path, tool):
    import torch

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    case = json.loads((synthetic_root / "dataset.json").read_text(encoding="utf-8"))["cases"][0]
    inputs = {
        "bmlseg-eval": [f"data.root={synthetic_root}", f"hydra.run.dir={tmp_path / 'eval'}"],
        "bmlseg-predict": [
            f"--input={synthetic_root / 'images' / (case['id'] + '.nii.gz')}",
            f"--bones={synthetic_root / 'bones' / (case['id'] + '.nii.gz')}",
            f"--output={tmp_path / 'out'}",
        ],
    }
    checkpoint = {"bmlseg-eval": "checkpoint=", "bmlseg-predict": "--checkpoint="}[tool]
    result = run(
        str(BIN / tool), f"{checkpoint}{tmp_path / 'weights.pt'}", *inputs[tool], cwd=tmp_path
    )
    assert result.returncode == 1
    assert (
        f"{tool}: error: {tmp_path / 'weights.pt'}: not a bmlseg checkpoint: expected a dict with "
        "step, model, " in result.stderr
    )
    assert "found a dict of 1 key(s): conv.weight" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_required_setting_left_out_is_named_in_one_line(tmp_path):
    result = run(str(BIN / "bmlseg-eval"), f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "bmlseg-eval: error: checkpoint is required: pass checkpoint=..."
    )
    assert "Traceback" not in result.stderr and "MissingMandatoryValue" not in result.stderr


def test_a_model_grid_no_scan_fits_is_refused_before_anything_runs(tmp_path):
    result = run(
        str(BIN / "bmlseg-train"),
        "train=smoke",
        "data.orientation=PIX",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "bmlseg-train: error: orientation 'PIX': expected three letters" in result.stderr
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]


def test_train_validates_its_counts_before_anything_runs(tmp_path):
    result = run(
        str(BIN / "bmlseg-train"),
        "train=smoke",
        "train.steps=0",
        "train.eval_every=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert (
        "bmlseg-train: error: train.steps must be at least 1, got 0; train.eval_every must be at "
        "least 1, got 0" in result.stderr
    )
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]


def test_train_refuses_broken_data_before_training(synthetic_root: Path, tmp_path):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    case = json.loads((root / "dataset.json").read_text(encoding="utf-8"))["cases"][-1]["id"]
    bones = root / "bones" / f"{case}.nii.gz"
    array, geometry = read_volume(bones)
    write_volume(bones, np.where(array == 3, 9, array).astype(np.uint8), geometry)
    result = run(
        str(BIN / "bmlseg-train"),
        "train=smoke",
        f"data.root={root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert f"bmlseg-train: error: {bones}: labels [9] are not declared in dataset.json" in (
        result.stderr
    )
    assert not [path for path in (root / "softlabels").rglob("*") if path.is_file()]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]
