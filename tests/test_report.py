"""bmlseg.report on a small fake sweep folder written here with known numbers."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from bmlseg.report import collect, main_report, table, write_report

METRICS = ("dice", "precision", "recall", "iou", "ap50", "ap75", "ece", "volume_mae_ml")
BASELINE = {
    "name": "baseline_bce",
    "bce": 1.0,
    "sce": 0.0,
    "rce": 0.0,
    "mae": 0.0,
    "normalized": False,
    "label_kind": "binary",
}
APL_SOFT = {
    "name": "apl_soft",
    "bce": 0.0,
    "sce": 1.0,
    "rce": 1.0,
    "mae": 0.0,
    "normalized": True,
    "label_kind": "soft",
}
# Per run: (loss, label method, seed, base value); metric i of a run is base + i / 100.
RUNS = [
    (APL_SOFT, "kimriss", 0, 0.30),
    (APL_SOFT, "kimriss", 1, 0.36),
    (BASELINE, "binary_any", 0, 0.10),
    (BASELINE, "binary_any", 1, 0.14),
]


def metric_value(base: float, key: str) -> float:
    return base + METRICS.index(key) / 100


def write_sweep(root: Path) -> Path:
    sweep = root / "multirun"
    for index, (loss, label_method, seed, base) in enumerate(RUNS):
        run_dir = sweep / str(index)
        run_dir.mkdir(parents=True)
        summary = {key: metric_value(base, key) for key in METRICS}
        summary |= {"loss": loss, "label_method": label_method, "seed": seed}
        summary["run_dir"] = str(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return sweep


def test_table_means_and_stds(tmp_path):
    rows = collect(write_sweep(tmp_path))
    assert len(rows) == 4
    entries = table(rows)
    # Table I order: the baseline before APL + soft labels, whatever the folder order.
    assert [entry["method"] for entry in entries] == ["baseline_bce", "apl_soft"]
    for entry, bases in zip(entries, ([0.10, 0.14], [0.30, 0.36]), strict=True):
        assert entry["n"] == 2
        assert entry["seeds"] == [0, 1]
        for key in METRICS:
            values = [metric_value(base, key) for base in bases]
            assert entry[f"{key}_mean"] == pytest.approx(statistics.mean(values))
            assert entry[f"{key}_std"] == pytest.approx(statistics.stdev(values))
    assert (entries[1]["sce"], entries[1]["rce"], entries[1]["label_method"]) == (1, 1, "kimriss")


def test_single_run_group_has_no_std(tmp_path):
    rows = collect(write_sweep(tmp_path) / "0")
    (entry,) = table(rows)
    assert entry["n"] == 1
    assert entry["dice_mean"] == pytest.approx(0.30)
    assert entry["dice_std"] != entry["dice_std"]  # NaN


def test_write_report_files(tmp_path):
    sweep = write_sweep(tmp_path)
    paths = write_report(sweep, tmp_path / "out")
    assert {key: path.parent for key, path in paths.items()} == {
        "md": tmp_path / "out",
        "csv": tmp_path / "out",
        "png": tmp_path / "out",
    }
    markdown = paths["md"].read_text(encoding="utf-8")
    assert "| Method | BCE | SCE | RCE |" in markdown
    baseline_line = next(line for line in markdown.splitlines() if "baseline_bce" in line)
    # AP50 of the baseline runs: 0.14 and 0.18 -> 16.0 ± 2.8 %; Dice 0.10 and 0.14 -> 0.12 ± 0.03.
    assert "| 16.0 ± 2.8 |" in baseline_line
    assert "| 0.12 ± 0.03 |" in baseline_line
    assert "bin (binary_any)" in baseline_line
    assert baseline_line.endswith("| 2 |")

    with paths["csv"].open(encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [row["method"] for row in csv_rows] == ["baseline_bce", "apl_soft"]
    assert float(csv_rows[1]["ap50_mean"]) == pytest.approx(statistics.mean([0.34, 0.40]))
    assert csv_rows[1]["seeds"] == "0 1"

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_missing_key_names_file_and_key(tmp_path):
    sweep = write_sweep(tmp_path)
    broken = sweep / "2" / "summary.json"
    summary = json.loads(broken.read_text(encoding="utf-8"))
    del summary["ece"]
    broken.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=rf"{broken}: missing key 'ece'"):
        collect(sweep)
    del summary["loss"]["rce"]
    summary["ece"] = 0.1
    broken.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"missing key 'loss.rce'"):
        write_report(sweep)


def test_no_summary_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        collect(tmp_path)


def test_main_report(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    assert main_report([str(sweep)]) == 0
    output = capsys.readouterr().out
    assert "| Method |" in output and "apl_soft" in output
    assert (sweep / "report.png").is_file()
    assert main_report([str(tmp_path / "empty")]) == 1
    assert "bmlseg-report: error:" in capsys.readouterr().err
