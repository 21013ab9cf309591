"""The console scripts as a user runs them: exit codes, files written, clear errors.

bmlseg-train, bmlseg-eval, bmlseg-predict and bmlseg-report on trained runs: tests/test_train.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
