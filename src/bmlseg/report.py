"""Sweep report: every run's summary.json below some folders -> a Table-I style table and a plot.

``bmlseg-report DIR [DIR ...]`` reads each ``summary.json`` below the folders (runs, or Hydra
multirun folders: e.g. a new sweep beside the one with its baseline), groups the runs by
configuration (loss name, loss weights, normalization, label kind, label method), and gives the
mean and sample standard deviation of each metric over the seeds that have it (an undefined
metric, NaN, is left out and the count of seeds shown). It writes ``report.md``, ``report.csv``
and ``report.png`` (into the one DIR, or ``--out``). Every run must have been scored against
the same reference (summary.json's ``reference``: the pixelwise truth, or a label method's
confident cores on a dataset without it); the report says which, and refuses a mix.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bmlseg.io import atomic_path, write_text_atomic
from bmlseg.metrics import METRIC_KEYS
from bmlseg.summary import NUMERIC_LOSS_KEYS, read_summary

__all__ = [
    "collect",
    "common_reference",
    "main_report",
    "markdown_table",
    "paired",
    "paired_markdown",
    "table",
    "write_report",
]

LOSS_WEIGHTS = NUMERIC_LOSS_KEYS  # the paper's weights, one column each
# MaskLoss terms beyond the paper's, shown together in one column; absent (older runs) means 0.
OTHER_TERMS = ("gce", "nnce", "dice", "tloss", "projection", "pairwise")
ORACLE = "truth_bce"  # the clean-label oracle: the upper bound of the noise gap
BASELINE = "baseline_bce"  # what every other row is paired against, seed by seed
# Mean Dice by which the oracle must beat the baseline for the share of that gap to be reported:
# the Dice of one configuration varies by about 0.05 between seeds on the phantom.
MIN_NOISE_GAP = 0.02
# The rows of the paper's Table I, top to bottom; the oracle goes first, other loss presets
# follow by name.
PRESET_ORDER = (
    "baseline_bce",
    "apl_binary",
    "apl_binary_bce2",
    "soft_baseline",
    "apl_soft",
    "apl_soft_sce2",
    "apl_soft_bce",
    "apl_soft_bce2",
)
# (summary key, column header, scale, decimals): AP and IoU in % as in the paper.
METRIC_COLUMNS = (
    ("ap50", "AP50 (%)", 100.0, 1),
    ("ap75", "AP75 (%)", 100.0, 1),
    ("iou", "IoU (%)", 100.0, 1),
    ("lesion_recall", "Lesion rec.", 1.0, 2),
    ("lesion_precision", "Lesion prec.", 1.0, 2),
    ("slice_recall", "Slice rec.", 1.0, 2),
    ("slice_precision", "Slice prec.", 1.0, 2),
    ("dice", "Dice", 1.0, 2),
    ("ece", "ECE", 1.0, 3),
    ("volume_mae_ml", "Vol. err (mL)", 1.0, 2),
)
# Compared with the baseline run of the same seed; the volume error is better when lower.
PAIRED_TITLES = {
    "dice": "Dice",
    "lesion_recall": "lesion rec.",
    "lesion_precision": "lesion prec.",
    "ap50": "AP50",
}
PAIRED_METRICS = tuple(PAIRED_TITLES) + ("volume_mae_ml",)
LOWER_IS_BETTER = ("volume_mae_ml",)
SEED_PLOT_METRICS = (("dice", "Dice"), ("lesion_recall", "lesion recall"))
FRACTION_METRICS = (
    "ap50",
    "ap75",
    "iou",
    "lesion_recall",
    "lesion_precision",
    "slice_recall",
    "slice_precision",
    "dice",
)


def collect(*directories: str | os.PathLike) -> list[dict[str, Any]]:
    """Every summary.json below the directories (recursively), in path order, each with
    summary_path."""
    paths = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: not a folder")
        found = sorted(directory.rglob("summary.json"))
        if not found:
            raise FileNotFoundError(f"{directory}: no summary.json found below it")
        paths += found
    return [read_summary(path) for path in paths]


def _other_terms(loss: dict[str, Any]) -> str:
    """The weights of the terms beyond the paper's, e.g. ``"gce 1, nnce 0.5"``; empty if none."""
    return ", ".join(f"{key} {float(loss[key]):g}" for key in OTHER_TERMS if loss.get(key))


def _configuration(row: dict[str, Any]) -> tuple:
    loss = row["loss"]
    weights = tuple(float(loss[key]) for key in LOSS_WEIGHTS)
    return (
        str(loss["name"]),
        *weights,
        _other_terms(loss),
        bool(loss["normalized"]),
        str(loss["label_kind"]),
        str(row["label_method"]),
    )


def _table_order(configuration: tuple) -> tuple:
    order = (ORACLE, *PRESET_ORDER)
    name = configuration[0]
    rank = order.index(name) if name in order else len(order)
    return (rank, *configuration)


def common_reference(rows: Sequence[dict[str, Any]]) -> str:
    """The reference (summary.json's ``reference``) every run was scored against.

    Raises:
        ValueError: runs scored against different references (metrics against the pixelwise
            truth and against soft labels are not comparable), naming a summary of each.
    """
    examples: dict[str, str] = {}
    for row in rows:
        examples.setdefault(row["reference"], row["summary_path"])
    if len(examples) > 1:
        listed = "; ".join(f"{reference} (e.g. {path})" for reference, path in examples.items())
        raise ValueError(
            f"the runs were scored against different references: {listed}; their metrics are "
            "not comparable: report the runs of each reference separately"
        )
    return next(iter(examples))


def table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by configuration; mean and std of each metric over the group's runs.

    A run whose metric is NaN (undefined, e.g. a precision without predictions) is left out of
    that metric's mean and std; ``<metric>_n`` counts the runs that have it. The std is the
    sample standard deviation (ddof=1), NaN with fewer than two such runs; the mean is NaN
    without any. Groups are ordered as Table I (the oracle, then PRESET_ORDER), then other loss
    names alphabetically, then by weights, normalization and label method.

    Returns:
        One dict per configuration: method, bce, sce, rce, mae, other_terms, normalized, label_kind,
        label_method, reference, n, seeds, runs (the rows themselves), and <metric>_mean,
        <metric>_std, <metric>_n for each metric.

    Raises:
        ValueError: the runs were scored against different references (common_reference).
    """
    reference = common_reference(rows)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_configuration(row), []).append(row)
    result = []
    for configuration in sorted(groups, key=_table_order):
        members = groups[configuration]
        name, bce, sce, rce, mae, other_terms, normalized, label_kind, label_method = configuration
        entry: dict[str, Any] = {
            "method": name,
            "bce": bce,
            "sce": sce,
            "rce": rce,
            "mae": mae,
            "other_terms": other_terms,
            "normalized": normalized,
            "label_kind": label_kind,
            "label_method": label_method,
            "reference": reference,
            "n": len(members),
            "seeds": sorted(member["seed"] for member in members),
            "runs": members,
        }
        for key in METRIC_KEYS:
            values = np.array([float(member[key]) for member in members])
            values = values[~np.isnan(values)]
            entry[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            entry[f"{key}_n"] = len(values)
        result.append(entry)
    return result


def _format_metric(entry: dict[str, Any], key: str, scale: float, decimals: int) -> str:
    """``mean ± std``, ``mean`` for one run; ``(k/n)`` after it when only k of the n runs have
    the metric; ``n/a`` when none has."""
    mean = entry[f"{key}_mean"] * scale
    std = entry[f"{key}_std"] * scale
    count = entry[f"{key}_n"]
    if count == 0:
        return "n/a"
    cell = f"{mean:.{decimals}f}"
    if count > 1:
        cell += f" ± {std:.{decimals}f}"
    if count < entry["n"]:
        cell += f" ({count}/{entry['n']})"
    return cell


def _label(entry: dict[str, Any]) -> str:
    kind = "bin" if entry["label_kind"] == "binary" else entry["label_kind"]
    return f"{kind} ({entry['label_method']})"


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """Table-I style markdown of table() output: AP and IoU in %, the rest as fractions or mL."""
    header = ["Method", "BCE", "SCE", "RCE", "MAE", "Other terms", "Norm.", "Label"]
    header += [title for _, title, _, _ in METRIC_COLUMNS] + ["n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = [entry["method"]] + [f"{entry[key]:g}" for key in LOSS_WEIGHTS]
        cells.append(entry["other_terms"] or "-")
        cells += ["yes" if entry["normalized"] else "no", _label(entry)]
        cells += [
            _format_metric(entry, key, scale, decimals)
            for key, _, scale, decimals in METRIC_COLUMNS
        ]
        cells.append(str(entry["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration against ``baseline_bce``, run by run: same seed, same dataset.

    For each configuration but the baseline and each of PAIRED_METRICS: the mean and sample std
    over the pairs of (run - baseline run), and ``wins``, the pairs where the run is higher
    (lower for the volume error). Pairs where either side is NaN are left out. ``gap_share``
    is the share of the noise gap recovered, (Dice of the row - Dice of the baseline) / (Dice of
    the oracle - Dice of the baseline), from the mean Dice of each; NaN without an oracle or a
    baseline run, or when the oracle beats the baseline by less than MIN_NOISE_GAP (a ratio
    over a gap within seed noise means nothing).

    Returns:
        One dict per configuration other than the baseline, in table order: method,
        label_method, pairs, noise_gap (the oracle's mean Dice - the baseline's), gap_share, and <metric>_diff_mean, <metric>_diff_std,
        <metric>_wins, <metric>_pairs for each metric. Empty without baseline runs.

    Raises:
        ValueError: two baseline runs share a seed and a dataset.
    """
    baseline: dict[tuple, dict[str, Any]] = {}
    for entry in entries:
        if entry["method"] != BASELINE:
            continue
        for run in entry["runs"]:
            key = _pair_key(run)
            if key in baseline:
                raise ValueError(
                    f"{run['summary_path']}: a second {BASELINE} run for seed {key[0]} of "
                    f"{key[1]} (the first: {baseline[key]['summary_path']}); pair against one"
                )
            baseline[key] = run
    if not baseline:
        return []
    baseline_dice = _mean_dice(list(baseline.values()))
    oracle_dice = _mean_dice([run for e in entries if e["method"] == ORACLE for run in e["runs"]])
    gap = oracle_dice - baseline_dice
    result = []
    for entry in entries:
        if entry["method"] == BASELINE:
            continue
        pairs = [
            (run, baseline[_pair_key(run)]) for run in entry["runs"] if _pair_key(run) in baseline
        ]
        row: dict[str, Any] = {
            "method": entry["method"],
            "label_method": entry["label_method"],
            "pairs": len(pairs),
            "noise_gap": gap,
            "gap_share": (
                (entry["dice_mean"] - baseline_dice) / gap if gap >= MIN_NOISE_GAP else math.nan
            ),
        }
        for key in PAIRED_METRICS:
            differences = np.array([float(run[key]) - float(base[key]) for run, base in pairs])
            differences = differences[~np.isnan(differences)]
            better = -differences if key in LOWER_IS_BETTER else differences
            row[f"{key}_diff_mean"] = float(differences.mean()) if len(differences) else math.nan
            row[f"{key}_diff_std"] = (
                float(differences.std(ddof=1)) if len(differences) > 1 else math.nan
            )
            row[f"{key}_wins"] = int((better > 0).sum())
            row[f"{key}_pairs"] = len(differences)
        result.append(row)
    return result


def _pair_key(run: dict[str, Any]) -> tuple:
    return (run["seed"], run.get("data_root"))


def _mean_dice(runs: Sequence[dict[str, Any]]) -> float:
    values = np.array([float(run["dice"]) for run in runs])
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def paired_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """paired() as markdown: per metric, mean ± std of the difference and the wins."""
    header = ["Method", "Label", "pairs"]
    header += [f"Δ {title}" for key, title in PAIRED_TITLES.items()] + ["noise gap recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], row["label_method"], str(row["pairs"])]
        for key in PAIRED_TITLES:
            count = row[f"{key}_pairs"]
            if count == 0:
                cells.append("n/a")
                continue
            cell = f"{row[f'{key}_diff_mean']:+.2f}"
            if count > 1:
                cell += f" ± {row[f'{key}_diff_std']:.2f}"
            cells.append(f"{cell} ({row[f'{key}_wins']}/{count} better)")
        share = row["gap_share"]
        cells.append("n/a" if math.isnan(share) else f"{100 * share:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(entries: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = [column for column in entries[0] if column != "runs"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for entry in entries:
        writer.writerow({**entry, "seeds": " ".join(str(seed) for seed in entry["seeds"])})
    return buffer.getvalue()


def _figure(entries: Sequence[dict[str, Any]]) -> Figure:
    """Grouped bars: one group per metric, one bar per configuration; sample std as error bar."""
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3, width_ratios=[6, 1, 1])
    panel_metrics = (FRACTION_METRICS, ("ece",), ("volume_mae_ml",))
    titles = ("detection and segmentation", "calibration", "volume")
    titles_by_key = {key: title.replace(" (%)", "") for key, title, _, _ in METRIC_COLUMNS}
    width = 0.8 / len(entries)
    for axes, keys, title in zip(panels, panel_metrics, titles, strict=True):
        positions = np.arange(len(keys))
        for index, entry in enumerate(entries):
            means = [entry[f"{key}_mean"] for key in keys]
            stds = [entry[f"{key}_std"] for key in keys]
            offset = (index - (len(entries) - 1) / 2) * width
            label = f"{entry['method']} · {_label(entry)}"
            axes.bar(positions + offset, means, width, yerr=stds, capsize=2, label=label)
        axes.set_xticks(positions, [titles_by_key[key] for key in keys])
        axes.set_title(title)
    panels[0].set_ylabel("fraction")
    panels[1].set_ylabel("ECE")
    panels[2].set_ylabel("mean absolute error (mL)")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, len(entries)))
    return figure


def _seeds_figure(entries: Sequence[dict[str, Any]]) -> Figure:
    """Dice and lesion recall per configuration: each seed a point, the mean a bar."""
    figure = Figure(figsize=(1.2 * len(entries) + 3, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(SEED_PLOT_METRICS), squeeze=False)[0]
    positions = np.arange(len(entries))
    names = [f"{entry['method']}\n{entry['label_method']}" for entry in entries]
    for axes, (key, title) in zip(panels, SEED_PLOT_METRICS, strict=True):
        axes.bar(positions, [entry[f"{key}_mean"] for entry in entries], 0.6, color="0.85")
        for position, entry in zip(positions, entries, strict=True):
            values = [float(run[key]) for run in entry["runs"]]
            axes.scatter([position] * len(values), values, color="black", s=14, zorder=3)
        axes.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_title(f"{title} (bar: mean, points: seeds)")
    return figure


def _save_figure_atomic(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return path


def write_report(
    directories: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv and report.png for the runs below the directories.

    report.md also holds the paired comparison with baseline_bce (when there are baseline
    runs) and report_seeds.png Dice and lesion recall per configuration with every seed.
    ``out_dir`` defaults to the directory when there is one, and is needed otherwise.

    Returns:
        {"md": path, "csv": path, "png": path, "seeds_png": path}
    """
    if isinstance(directories, str | os.PathLike):
        directories = [directories]
    if out_dir is None and len(directories) != 1:
        raise ValueError(f"{len(directories)} folders: say where the report goes (--out)")
    rows = collect(*directories)
    entries = table(rows)
    reference = entries[0]["reference"]
    comparison = paired(entries)
    out_dir = Path(directories[0] if out_dir is None else out_dir)
    below = ", ".join(f"`{directory}`" for directory in directories)
    heading = (
        f"# bmlseg report\n\n{len(rows)} runs below {below}, {len(entries)} "
        "configurations. AP and IoU in %, recall, precision, Dice and ECE as fractions, volume "
        "error as mean absolute error in mL; mean ± sample std over the n runs of a "
        "configuration when n > 1. A run whose metric is undefined (NaN) is left out of that "
        "mean, and (k/n) says that k of the n runs have it.\n\n"
        f"{_reference_sentence(reference)}\n\n"
    )
    text = heading + markdown_table(entries)
    if comparison:
        gap = comparison[0]["noise_gap"]
        text += (
            f"\n## Against {BASELINE}, seed by seed\n\nMean ± sample std over the pairs of "
            f"(run - {BASELINE} run of the same seed and dataset), and how many pairs the run "
            "wins. Noise gap recovered: (Dice - Dice of the baseline) / (Dice of the oracle "
            f"{ORACLE} - Dice of the baseline), from the mean Dice of each; the noise gap here is "
            f"{gap:.3f} (n/a under {MIN_NOISE_GAP}, or without the oracle).\n\n"
        )
        text += paired_markdown(comparison)
    return {
        "md": write_text_atomic(out_dir / "report.md", text),
        "csv": write_text_atomic(out_dir / "report.csv", _csv_text(entries)),
        "png": _save_figure_atomic(_figure(entries), out_dir / "report.png"),
        "seeds_png": _save_figure_atomic(_seeds_figure(entries), out_dir / "report_seeds.png"),
    }


def _reference_sentence(reference: str) -> str:
    if reference == "truth":
        return "Scored against the pixelwise truth (masks/)."
    return (
        f"Scored against `{reference}`: the confident cores of soft labels, not pixelwise truth "
        "(the test cases have no masks/). The figures measure agreement with the labels made "
        "from the readers' rectangles, not accuracy."
    )


def main_report(argv: Sequence[str] | None = None) -> int:
    """bmlseg-report DIR [DIR ...] [--out OUT]: write the report and print report.md."""
    parser = argparse.ArgumentParser(
        prog="bmlseg-report",
        description="Summarize every summary.json below the folders as a Table-I style report.",
    )
    parser.add_argument(
        "directories", metavar="DIR", nargs="+", help="runs or Hydra multirun folders"
    )
    parser.add_argument(
        "--out", help="folder for report.md/.csv/.png (default: DIR, when there is one)"
    )
    arguments = parser.parse_args(argv)
    try:
        paths = write_report(arguments.directories, arguments.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"bmlseg-report: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. a read-only folder: the report cannot be written there
        out = arguments.out or arguments.directories[0]
        print(
            f"bmlseg-report: error: cannot write the report into {out}: {error.strerror}; "
            "choose another folder with --out",
            file=sys.stderr,
        )
        return 1
    print(paths["md"].read_text(encoding="utf-8"), end="")
    print(f"\nwrote {', '.join(str(path) for path in paths.values())}")
    return 0
