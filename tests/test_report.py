"""bmlseg.report on a small fake sweep folder written here with known numbers."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest

from bmlseg.metrics import METRIC_KEYS as METRICS
from bmlseg.report import collect, main_report, markdown_table, paired, table, write_report

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


def write_sweep(root: Path, runs=RUNS) -> Path:
    sweep = root / "multirun"
    for index, (loss, label_method, seed, base) in enumerate(runs):
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
            assert entry[f"{key}_n"] == 2
    assert (entries[1]["sce"], entries[1]["rce"], entries[1]["label_method"]) == (1, 1, "kimriss")


def test_single_run_group_has_no_std(tmp_path):
    rows = collect(write_sweep(tmp_path) / "0")
    (entry,) = table(rows)
    assert entry["n"] == 1
    assert entry["dice_mean"] == pytest.approx(metric_value(0.30, "dice"))
    assert entry["dice_std"] != entry["dice_std"]  # NaN


def test_write_report_files(tmp_path):
    sweep = write_sweep(tmp_path)
    paths = write_report(sweep, tmp_path / "out")
    assert {key: path.parent for key, path in paths.items()} == {
        "md": tmp_path / "out",
        "csv": tmp_path / "out",
        "png": tmp_path / "out",
        "seeds_png": tmp_path / "out",
    }
    markdown = paths["md"].read_text(encoding="utf-8")
    assert "| Method | BCE | SCE | RCE |" in markdown
    # Summaries without a reference were written before it was recorded: all against masks/.
    assert "\n\nScored against the pixelwise truth (masks/).\n\n" in markdown
    baseline_line = next(line for line in markdown.splitlines() if "baseline_bce" in line)
    # AP50 of the baseline runs: 0.10 and 0.14 -> 12.0 ± 2.8 %; Dice 0.18 and 0.22 -> 0.20 ± 0.03.
    assert "| 12.0 ± 2.8 |" in baseline_line
    assert "| 0.20 ± 0.03 |" in baseline_line
    assert "bin (binary_any)" in baseline_line
    assert baseline_line.endswith("| 2 |")

    with paths["csv"].open(encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [row["method"] for row in csv_rows] == ["baseline_bce", "apl_soft"]
    assert float(csv_rows[1]["ap50_mean"]) == pytest.approx(statistics.mean([0.30, 0.36]))
    assert csv_rows[1]["ap50_n"] == "2"
    assert csv_rows[1]["seeds"] == "0 1"

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["seeds_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_undefined_metrics_are_left_out_of_the_mean_and_counted(tmp_path):
    # Three seeds of one configuration; seed 1 has no prediction, so no precision at all.
    runs = [(BASELINE, "binary_any", seed, base) for seed, base in enumerate([0.30, 0.0, 0.40])]
    sweep = write_sweep(tmp_path, runs)
    undefined = sweep / "1" / "summary.json"
    summary = json.loads(undefined.read_text(encoding="utf-8"))
    summary["lesion_precision"] = summary["slice_precision"] = math.nan
    undefined.write_text(json.dumps(summary))
    (entry,) = table(collect(sweep))
    values = [metric_value(base, "lesion_precision") for base in (0.30, 0.40)]
    assert entry["n"] == 3 and entry["lesion_precision_n"] == 2
    assert entry["lesion_precision_mean"] == pytest.approx(statistics.mean(values))
    assert entry["lesion_precision_std"] == pytest.approx(statistics.stdev(values))
    assert entry["dice_n"] == 3
    # Lesion precision 0.35 and 0.45 over the two seeds that have it, said so; Dice over all three
    # (0.38, 0.08, 0.48).
    line = markdown_table([entry]).splitlines()[-1]
    assert "| 0.40 ± 0.07 (2/3) |" in line
    assert "| 0.31 ± 0.21 |" in line

    # No seed with a lesion precision: n/a.
    for index in (0, 2):
        path = sweep / str(index) / "summary.json"
        defined = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**defined, "lesion_precision": math.nan}))
    (entry,) = table(collect(sweep))
    assert entry["lesion_precision_n"] == 0 and math.isnan(entry["lesion_precision_mean"])
    assert "| n/a |" in markdown_table([entry])


ORACLE = {**BASELINE, "name": "truth_bce", "label_kind": "truth"}


def test_paired_differences_wins_and_the_share_of_the_noise_gap(tmp_path):
    # Dice (metric index METRICS.index("dice")) follows the base values; seed 2 of apl_soft has
    # no baseline run and is left out of the pairs.
    runs = [
        (ORACLE, "truth", 0, 0.60),
        (ORACLE, "truth", 1, 0.70),
        *RUNS,
        (APL_SOFT, "kimriss", 2, 0.90),
    ]
    comparison = paired(table(collect(write_sweep(tmp_path, runs))))
    assert [row["method"] for row in comparison] == ["truth_bce", "apl_soft"]
    oracle, apl = comparison
    # apl_soft - baseline: seed 0: 0.30 - 0.10, seed 1: 0.36 - 0.14.
    assert apl["pairs"] == 2 and apl["dice_pairs"] == 2
    assert apl["dice_diff_mean"] == pytest.approx(statistics.mean([0.20, 0.22]))
    assert apl["dice_diff_std"] == pytest.approx(statistics.stdev([0.20, 0.22]))
    assert apl["dice_wins"] == 2
    assert apl["volume_mae_ml_wins"] == 0  # higher volume error is worse
    # Mean Dice over all its runs: apl (0.30 + 0.36 + 0.90) / 3, baseline 0.12, oracle 0.65.
    dice = METRICS.index("dice") / 100
    share = ((0.30 + 0.36 + 0.90) / 3 + dice - (0.12 + dice)) / (0.65 - 0.12)
    assert apl["gap_share"] == pytest.approx(share)
    assert oracle["gap_share"] == pytest.approx(1.0)
    markdown = write_report(write_sweep(tmp_path / "again", runs))["md"].read_text("utf-8")
    assert "## Against baseline_bce" in markdown and "(2/2 better)" in markdown


def test_no_share_of_a_noise_gap_within_seed_noise(tmp_path):
    # The oracle beats the baseline (mean 0.12) by 0.01 only.
    runs = [(ORACLE, "truth", 0, 0.13), *RUNS]
    apl = paired(table(collect(write_sweep(tmp_path, runs))))[1]
    assert apl["noise_gap"] == pytest.approx(0.01)
    assert math.isnan(apl["gap_share"])
    assert apl["dice_wins"] == 2  # the paired differences do not depend on the oracle


def test_paired_refuses_two_baselines_of_one_seed_and_needs_a_baseline(tmp_path):
    twice = [*RUNS, (BASELINE, "binary_any", 0, 0.5)]
    with pytest.raises(ValueError, match="second baseline_bce run for seed 0"):
        paired(table(collect(write_sweep(tmp_path, twice))))
    without = [run for run in RUNS if run[0] is not BASELINE]
    assert paired(table(collect(write_sweep(tmp_path / "without", without)))) == []


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


def test_one_report_over_two_sweeps_pairs_them_and_shows_the_other_terms(tmp_path):
    gce = {**APL_SOFT, "name": "gce", "sce": 0.0, "rce": 0.0, "normalized": False, "gce": 1.0}
    first = write_sweep(tmp_path / "paper", RUNS)
    second = write_sweep(tmp_path / "field", [(gce, "kimriss", 0, 0.50), (gce, "kimriss", 1, 0.52)])
    with pytest.raises(ValueError, match="--out"):
        write_report([first, second])
    paths = write_report([first, second], tmp_path / "out")
    comparison = paired(table(collect(first, second)))
    assert [row["method"] for row in comparison] == ["apl_soft", "gce"]
    assert comparison[1]["pairs"] == 2
    markdown = paths["md"].read_text("utf-8")
    assert "| gce | 0 | 0 | 0 | 0 | gce 1 | no |" in markdown
    assert "| apl_soft | 0 | 1 | 1 | 0 | - | yes |" in markdown
    assert main_report([str(first), str(second), "--out", str(tmp_path / "cli")]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_is_named_not_a_traceback(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    sweep.chmod(0o555)
    try:
        assert main_report([str(sweep)]) == 1
    finally:
        sweep.chmod(0o755)
    assert capsys.readouterr().err == (
        f"bmlseg-report: error: cannot write the report into {sweep}: Permission denied; "
        "choose another folder with --out\n"
    )


def test_a_folder_that_cannot_be_made_is_named_not_a_traceback(tmp_path, capsys):
    # What a read-only folder does for any user, root included: the folder cannot be written.
    sweep = write_sweep(tmp_path)
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert main_report([str(sweep), "--out", str(tmp_path / "file" / "report")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"bmlseg-report: error: cannot write the report into {tmp_path}")
    assert error.endswith("; choose another folder with --out\n")


def set_reference(sweep: Path, reference: str, runs: range) -> None:
    for index in runs:
        path = sweep / str(index) / "summary.json"
        summary = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**summary, "reference": reference}), encoding="utf-8")


def test_runs_scored_against_different_references_are_refused(tmp_path, capsys):
    labels = "labels:kimriss>=0.5,area>=8mm2"
    sweep = write_sweep(tmp_path)
    set_reference(sweep, labels, range(1))
    with pytest.raises(ValueError, match="scored against different references"):
        table(collect(sweep))
    assert main_report([str(sweep)]) == 1
    assert capsys.readouterr().err == (
        f"bmlseg-report: error: the runs were scored against different references: {labels} "
        f"(e.g. {sweep}/0/summary.json); truth (e.g. {sweep}/1/summary.json); their metrics are "
        "not comparable: report the runs of each reference separately\n"
    )
    assert not (sweep / "report.md").exists()

    # All against the labels: reported, and the report says what the figures measure.
    set_reference(sweep, labels, range(len(RUNS)))
    paths = write_report(sweep)
    markdown = paths["md"].read_text(encoding="utf-8")
    assert f"Scored against `{labels}`: the confident cores of soft labels, not pixelwise" in (
        markdown
    )
    with paths["csv"].open(encoding="utf-8") as handle:
        assert {row["reference"] for row in csv.DictReader(handle)} == {labels}
