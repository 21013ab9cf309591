"""Training runs end to end on a tiny synthetic dataset: outputs, resume, the non-finite guard,
DDP, datasets without pixelwise truth, and the console scripts that read a run (bmlseg-eval,
bmlseg-predict, bmlseg-report)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module

from bmlseg.config import register_configs
from bmlseg.data.format import read_dataset_json
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.engine.distributed import setup
from bmlseg.engine.evaluate import evaluate_checkpoint
from bmlseg.engine.train import NonFiniteLossError, resume, train
from bmlseg.io import read_volume, write_volume
from bmlseg.metrics import METRIC_KEYS, SCORE_GRID
from bmlseg.models import build_model
from bmlseg.report import PRESET_ORDER

BIN = Path(sys.executable).parent
TABLE1_LOSSES = list(PRESET_ORDER)  # the rows of the paper's Table I, in order
SWEPT_LOSSES = [*TABLE1_LOSSES, "truth_bce"]
LABELS_OF_KIND = {"binary": "kimriss_hard", "soft": "kimriss", "truth": "truth"}
SUMMARY_KEYS = {*METRIC_KEYS, "score_threshold"}
# Tiny runs: 64-pixel crops, 2 steps, one validation and one test volume.
TINY = ["train=smoke", "data.crop_size=64"]
# What a run without pixelwise truth is scored against: kimriss's cores, cut as its instances.
KIMRISS_CORES = "labels:kimriss>=0.5,area>=8mm2"

pytestmark = pytest.mark.slow


def run(*command: str, cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )
    if expect_ok:
        assert result.returncode == 0, f"{command} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the session's synthetic dataset (runs add softlabels/ to it)."""
    root = tmp_path_factory.mktemp("train_data") / "data"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture(scope="module")
def sweep(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """All eight Table I presets and the clean-label oracle as one Hydra multirun with the basic
    launcher."""
    work = tmp_path_factory.mktemp("sweep")
    run(
        str(BIN / "bmlseg-train"),
        "-m",
        f"loss={','.join(SWEPT_LOSSES)}",
        *TINY,
        f"data.root={dataset}",
        f"hydra.sweep.dir={work / 'sweep'}",
        cwd=work,
    )
    yield work / "sweep"
    # Checkpoints of even a tiny IMaskRCNN are hundreds of MB: don't leave them in /tmp.
    for path in (work / "sweep").rglob("*.pt"):
        path.unlink()


def run_dirs(sweep: Path) -> dict[str, Path]:
    return {
        path.name.split("_", 1)[1].rsplit("_seed", 1)[0]: path
        for path in sweep.iterdir()
        if path.is_dir()
    }


def test_each_preset_of_a_sweep_writes_every_run_output(sweep: Path):
    runs = run_dirs(sweep)
    assert sorted(runs) == sorted(SWEPT_LOSSES)
    for name, run_dir in runs.items():
        assert (run_dir / ".hydra" / "config.yaml").is_file()
        with (run_dir / "metrics.csv").open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(row["step"]) for row in rows] == [2]
        assert math.isfinite(float(rows[0]["loss"]))
        assert "val_dice" in rows[0]
        # train.score_threshold is null: chosen on validation, kept with best.pt, tested at.
        chosen = float(rows[0]["val_score_threshold"])
        assert chosen in SCORE_GRID
        for checkpoint in ("last.pt", "best.pt"):
            state = checkpoints.load(run_dir / "checkpoints" / checkpoint)
            assert state["step"] == 2
            assert state["config"]["loss"]["name"] == name
            assert state["best"]["score_threshold"] == chosen
            # Every case has masks/: validated against the pixelwise truth.
            assert state["best"]["reference"] == "truth"
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        assert SUMMARY_KEYS <= summary.keys()
        assert summary["reference"] == "truth"
        assert summary["score_threshold"] == chosen
        assert summary["loss"]["name"] == name
        assert summary["label_method"] == LABELS_OF_KIND[summary["loss"]["label_kind"]]
        assert summary["steps"] == 2 and summary["run_dir"] == str(run_dir.resolve())
        assert (summary["orientation"], summary["spacing_mm"], summary["crop_size"]) == (
            "PIR",
            1.25,
            64,
        )
        assert (run_dir / "predictions.png").stat().st_size > 0


def test_a_run_trains_on_the_labels_of_its_loss_kind(sweep: Path, dataset: Path):
    labels = {path.name for path in (dataset / "softlabels").iterdir() if path.is_dir()}
    assert labels == set(LABELS_OF_KIND.values())
    config = json.loads(
        (run_dirs(sweep)["apl_binary_bce2"] / "summary.json").read_text(encoding="utf-8")
    )
    assert (config["loss"]["bce"], config["loss"]["rce"]) == (2.0, 1.0)


def test_eval_cli_reproduces_the_test_metrics_of_training(sweep: Path, dataset: Path, tmp_path):
    run_dir = run_dirs(sweep)["apl_soft_bce"]
    run(
        str(BIN / "bmlseg-eval"),
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        f"data.root={dataset}",
        "max_cases=1",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text(encoding="utf-8"))
    trained = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for key in SUMMARY_KEYS:
        assert evaluated[key] == pytest.approx(trained[key], nan_ok=True), key
    assert (tmp_path / "eval" / "predictions.png").is_file()


def test_predict_cli_writes_volumes_in_the_input_geometry(sweep: Path, dataset: Path, tmp_path):
    case = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["cases"][0]["id"]
    image_path = dataset / "images" / f"{case}.nii.gz"
    result = run(
        str(BIN / "bmlseg-predict"),
        f"--checkpoint={run_dirs(sweep)['baseline_bce'] / 'checkpoints' / 'last.pt'}",
        f"--input={image_path}",
        f"--bones={dataset / 'bones' / f'{case}.nii.gz'}",
        f"--output={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    image, geometry = read_volume(image_path)
    probability, probability_geometry = read_volume(tmp_path / "out" / f"{case}_bml_prob.nii.gz")
    mask, mask_geometry = read_volume(tmp_path / "out" / f"{case}_bml_mask.nii.gz")
    assert probability.shape == mask.shape == image.shape
    assert probability_geometry == geometry and mask_geometry == geometry
    assert probability.dtype == np.float32 and 0 <= probability.min() <= probability.max() <= 1
    assert set(np.unique(mask)) <= {0, 1}
    volumes = json.loads((tmp_path / "out" / f"{case}_bml_volume.json").read_text(encoding="utf-8"))
    assert set(volumes["bml_volume_ml"]) == {"total", "femur", "tibia", "patella"}
    assert "BML volume femur" in result.stdout


def test_train_refuses_a_run_folder_holding_an_earlier_run(sweep: Path, dataset: Path, tmp_path):
    run_dir = run_dirs(sweep)["apl_soft_bce"]
    kept = {
        name: (run_dir / name).read_bytes()
        for name in (".hydra/config.yaml", "summary.json", "metrics.csv")
    }
    result = run(
        str(BIN / "bmlseg-train"),
        *TINY,
        f"data.root={dataset}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 1
    assert (
        f"bmlseg-train: error: {run_dir} holds an earlier run (metrics.csv, summary.json, "
        "checkpoints/, predictions.png); add train.resume=true to continue it or "
        "train.overwrite=true to replace it" in result.stderr
    )
    # Refused before Hydra writes into the folder: even the earlier run's config is kept.
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    # A multirun into a sweep folder holding earlier runs is refused the same way.
    result = run(
        str(BIN / "bmlseg-train"),
        "-m",
        "loss=baseline_bce",
        *TINY,
        f"data.root={dataset}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 1 and "holds an earlier run" in result.stderr
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_eval_refuses_truth_masks_that_are_not_binary(sweep: Path, dataset: Path, tmp_path):
    broken = Path(shutil.copytree(dataset, tmp_path / "data"))
    test_case = next(
        case["id"]
        for case in json.loads((broken / "dataset.json").read_text(encoding="utf-8"))["cases"]
        if case["split"] == "test"
    )
    mask, geometry = read_volume(broken / "masks" / f"{test_case}.nii.gz")
    bones, _ = read_volume(broken / "bones" / f"{test_case}.nii.gz")
    # Bone labels saved as the truth: scored as lesions, they made 36 instances out of 4.
    write_volume(broken / "masks" / f"{test_case}.nii.gz", np.maximum(mask, bones), geometry)
    result = run(
        str(BIN / "bmlseg-eval"),
        f"checkpoint={run_dirs(sweep)['apl_soft_bce'] / 'checkpoints' / 'best.pt'}",
        f"data.root={broken}",
        "max_cases=1",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 1
    assert (
        f"bmlseg-eval: error: {broken}/masks/{test_case}.nii.gz: values must be 0 or 1, found [2 3]"
        in result.stderr
    )
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_predict_refuses_nan_voxels(sweep: Path, dataset: Path, tmp_path):
    case = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["cases"][0]["id"]
    image, geometry = read_volume(dataset / "images" / f"{case}.nii.gz")
    image = image.astype(np.float32)
    image[0, 0, :5] = np.nan
    write_volume(tmp_path / "scan.nii.gz", image, geometry)
    result = run(
        str(BIN / "bmlseg-predict"),
        f"--checkpoint={run_dirs(sweep)['baseline_bce'] / 'checkpoints' / 'last.pt'}",
        f"--input={tmp_path / 'scan.nii.gz'}",
        f"--bones={dataset / 'bones' / f'{case}.nii.gz'}",
        f"--output={tmp_path / 'out'}",
        cwd=tmp_path,
        expect_ok=False,
    )
    assert result.returncode == 1
    assert (
        f"bmlseg-predict: error: {tmp_path / 'scan.nii.gz'}: 5 NaN or infinite voxel(s)"
        in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_report_cli_tabulates_the_sweep(sweep: Path, tmp_path):
    result = run(str(BIN / "bmlseg-report"), str(sweep), "--out", str(tmp_path), cwd=tmp_path)
    for name in TABLE1_LOSSES:
        assert name in result.stdout
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").is_file()


@pytest.fixture(scope="module")
def hydra_conf():
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        yield


def tiny_config(dataset: Path, *overrides: str):
    return compose("train", overrides=[*TINY, f"data.root={dataset}", *overrides])


def test_resume_continues_at_the_saved_step_with_the_saved_optimizer_state(
    hydra_conf, dataset: Path, tmp_path
):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny_config(dataset, "train.steps=3"), straight)
    # A run stopped after step 2, then resumed to step 3 in the same folder.
    train(tiny_config(dataset, "train.steps=2"), interrupted)
    saved = checkpoints.load(interrupted / "checkpoints" / "last.pt")

    config = saved["config"]
    model = build_model(config["model"], config["loss"], saved["num_classes"])
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step, best = resume(
        interrupted / "checkpoints" / "last.pt", model, optimizer, scaler, setup("cpu")
    )
    assert (step, best["step"]) == (2, 2)
    restored = optimizer.state_dict()["state"]
    assert restored.keys() == saved["optimizer"]["state"].keys()
    for index, state in saved["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(restored[index][name], value), (index, name)

    # A run killed while writing a checkpoint left its temporary file: the next start removes it.
    leftover = interrupted / "checkpoints" / ".tmp-0badc0de-last.pt"
    leftover.write_bytes(b"half a checkpoint")
    train(tiny_config(dataset, "train.steps=3", "train.resume=true"), interrupted)
    assert not leftover.exists()
    resumed = checkpoints.load(interrupted / "checkpoints" / "last.pt")
    reference = checkpoints.load(straight / "checkpoints" / "last.pt")
    assert resumed["step"] == 3
    # Adam counts its steps: 3 means the restored state was stepped once more, not restarted.
    assert all(int(state["step"]) == 3 for state in resumed["optimizer"]["state"].values())
    # Same batches, same RNG: the resumed run ends where the uninterrupted one did.
    for name, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-4, atol=1e-5)
    with (interrupted / "metrics.csv").open(encoding="utf-8") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 3]

    # A rerun of a finished run (a sweep started again) leaves it as it was.
    summary = (interrupted / "summary.json").read_text(encoding="utf-8")
    last = (interrupted / "checkpoints" / "last.pt").stat().st_mtime_ns
    train(tiny_config(dataset, "train.steps=3", "train.resume=true"), interrupted)
    assert (interrupted / "summary.json").read_text(encoding="utf-8") == summary
    assert (interrupted / "checkpoints" / "last.pt").stat().st_mtime_ns == last
    # Neither resumed nor replaced, a finished run is refused and left as it was ...
    with pytest.raises(FileExistsError, match="add train.resume=true to continue it or "):
        train(tiny_config(dataset, "train.steps=2"), interrupted)
    assert (interrupted / "summary.json").read_text(encoding="utf-8") == summary
    # ... and replaced as a whole with train.overwrite=true.
    train(tiny_config(dataset, "train.steps=2", "train.overwrite=true"), interrupted)
    with (interrupted / "metrics.csv").open(encoding="utf-8") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2]
    assert checkpoints.load(interrupted / "checkpoints" / "last.pt")["step"] == 2


def test_non_finite_losses_skip_steps_then_stop_without_a_bad_checkpoint(
    hydra_conf, dataset: Path, tmp_path
):
    # Adam at lr 1e30 makes the weights ~1e30 after one step: every later loss is NaN.
    cfg = tiny_config(
        dataset,
        "train.steps=6",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.checkpoint_every=1",
        "train.eval_every=100",
        "train.max_nonfinite_steps=2",
    )
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        train(cfg, tmp_path)
    # Step 1 trained; step 2 was skipped (weights unchanged) and checkpointed; step 3 stopped.
    state = checkpoints.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2
    for name, value in state["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert not (tmp_path / "summary.json").exists()


def test_ddp_with_two_cpu_processes_writes_one_set_of_outputs(dataset: Path, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(BIN / "bmlseg-train"),
            *TINY,
            "train.steps=3",
            f"data.root={dataset}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.rglob("*.pt")) == ["best.pt", "last.pt"]
    assert len(list(tmp_path.rglob("summary.json"))) == 1
    state = checkpoints.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2
    with (tmp_path / "run" / "metrics.csv").open(encoding="utf-8") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 3]


def test_optuna_search_over_loss_weights_runs_two_trials(dataset: Path, tmp_path):
    sweep = tmp_path / "sweep"
    run(
        str(BIN / "bmlseg-train"),
        "experiment=optuna_loss",
        "hydra.sweeper.n_trials=2",
        *TINY,
        f"data.root={dataset}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text(encoding="utf-8"))
    assert set(results["best_params"]) == {"loss.bce", "loss.sce", "loss.rce"}
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    weights = [json.loads(path.read_text(encoding="utf-8"))["loss"] for path in summaries]
    # Each trial trained with the weights Optuna drew for it, within the searched intervals.
    assert weights[0]["bce"] != weights[1]["bce"]
    assert all(0 <= trial[name] <= 2 for trial in weights for name in ("bce", "sce", "rce"))
    for path in sweep.rglob("*.pt"):
        path.unlink()


@pytest.fixture
def rectangles_only(synthetic_root: Path, tmp_path: Path) -> Path:
    """The synthetic dataset without masks/: the readers' rectangles are all there is."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    shutil.rmtree(root / "masks")
    return root


def test_a_dataset_without_masks_trains_against_the_labels_confident_cores(
    hydra_conf, rectangles_only: Path, tmp_path
):
    # A binary loss trains on kimriss_hard; every run is scored against labels.method's cores.
    run_dir = tmp_path / "run"
    train(tiny_config(rectangles_only, "loss=baseline_bce"), run_dir)
    assert {path.name for path in (rectangles_only / "softlabels").iterdir()} == {
        "kimriss",
        "kimriss_hard",
    }
    with (run_dir / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [2]
    best = checkpoints.load(run_dir / "checkpoints" / "best.pt")["best"]
    assert best["reference"] == KIMRISS_CORES
    assert best["score_threshold"] == float(rows[0]["val_score_threshold"])
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["reference"] == KIMRISS_CORES and summary["best"] == best
    # The test case's reference holds lesions: its metrics are defined, not all NaN.
    assert summary["n_lesions"] > 0 and math.isfinite(summary["volume_mae_ml"])
    assert (run_dir / "predictions.png").stat().st_size > 0
    # bmlseg-eval scores the checkpoint the same way, against the same reference.
    scores = evaluate_checkpoint(
        run_dir / "checkpoints" / "best.pt", tmp_path / "eval", batch_size=4, max_cases=1
    )
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert evaluated["reference"] == KIMRISS_CORES
    assert scores["dice"] == pytest.approx(summary["dice"], nan_ok=True)


def test_a_run_that_cannot_validate_stops_before_labels_or_model(
    hydra_conf, rectangles_only: Path, tmp_path
):
    val_case = read_dataset_json(rectangles_only).split("val")[0].id
    with pytest.raises(
        ValueError,
        match=(
            "train.validate_against=truth, but 1 of 1 validation cases have no pixelwise "
            f"truth \\(e.g. {rectangles_only}/masks/{val_case}.nii.gz is missing\\); set "
            "train.validate_against=auto or labels to validate against labels:kimriss"
        ),
    ):
        train(tiny_config(rectangles_only, "train.validate_against=truth"), tmp_path / "truth")
    # No val split: refused up front too, naming dataset.json and the split.
    path = rectangles_only / "dataset.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"val"', '"train"'), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{path}: no case in split 'val' \\(validation chooses"):
        train(tiny_config(rectangles_only), tmp_path / "no_val")
    assert not (rectangles_only / "softlabels").exists()
    assert not (tmp_path / "truth").exists() and not (tmp_path / "no_val").exists()


def test_validating_against_labels_is_recorded_and_never_mixed_on_resume(
    hydra_conf, dataset: Path, tmp_path
):
    # Asked for on a dataset with masks: validation against the labels, the test against truth.
    train(tiny_config(dataset, "train.validate_against=labels"), tmp_path)
    assert checkpoints.load(tmp_path / "checkpoints" / "best.pt")["best"]["reference"] == (
        KIMRISS_CORES
    )
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["reference"] == "truth" and summary["best"]["reference"] == KIMRISS_CORES
    # Resumed against the truth, its best value would compare two references: refused.
    with pytest.raises(ValueError, match=f"its best.pt was chosen against {KIMRISS_CORES}, this"):
        train(tiny_config(dataset, "train.steps=3", "train.resume=true"), tmp_path)
