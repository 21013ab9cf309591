"""Sweep report: every run's summary.json below a folder -> a Table-I style table and a plot.

``bmlseg-report DIR`` reads each ``summary.json`` below DIR (one run, or a Hydra multirun folder),
groups the runs by configuration (loss name, loss weights, normalization, label kind, label
method), and gives the mean and sample standard deviation of each metric over the seeds. It writes
``report.md``, ``report.csv`` and ``report.png`` (into DIR unless told otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bmlseg.data.format import write_text_atomic
from bmlseg.io import atomic_path

__all__ = ["collect", "main_report", "markdown_table", "table", "write_report"]

METRIC_KEYS = ("dice", "precision", "recall", "iou", "ap50", "ap75", "ece", "volume_mae_ml")
SUMMARY_KEYS = (*METRIC_KEYS, "loss", "label_method", "seed", "run_dir")
LOSS_KEYS = ("name", "bce", "sce", "rce", "mae", "normalized", "label_kind")
LOSS_WEIGHTS = ("bce", "sce", "rce", "mae")
# The rows of the paper's Table I, top to bottom; other loss presets follow by name.
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
    ("recall", "Rec.", 1.0, 2),
    ("precision", "Prec.", 1.0, 2),
    ("dice", "Dice", 1.0, 2),
    ("ece", "ECE", 1.0, 3),
    ("volume_mae_ml", "Vol. err (mL)", 1.0, 2),
)
FRACTION_METRICS = ("ap50", "ap75", "iou", "recall", "precision", "dice")


def _check_number(value: Any, path: Path, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: {key!r} must be a number, got {value!r}")


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key in SUMMARY_KEYS:
        if key not in summary:
            raise ValueError(f"{path}: missing key {key!r}")
    loss = summary["loss"]
    if not isinstance(loss, dict):
        raise ValueError(f"{path}: 'loss' must be an object, got {loss!r}")
    for key in LOSS_KEYS:
        if key not in loss:
            raise ValueError(f"{path}: missing key 'loss.{key}'")
    for key in METRIC_KEYS:
        _check_number(summary[key], path, key)
    for key in LOSS_WEIGHTS:
        _check_number(loss[key], path, f"loss.{key}")
    return {**summary, "summary_path": str(path)}


def collect(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every summary.json below directory (recursively), in path order, each with summary_path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a folder")
    paths = sorted(directory.rglob("summary.json"))
    if not paths:
        raise FileNotFoundError(f"{directory}: no summary.json found below it")
    return [_read_summary(path) for path in paths]


def _configuration(row: dict[str, Any]) -> tuple:
    loss = row["loss"]
    weights = tuple(float(loss[key]) for key in LOSS_WEIGHTS)
    return (
        str(loss["name"]),
        *weights,
        bool(loss["normalized"]),
        str(loss["label_kind"]),
        str(row["label_method"]),
    )


def _table_order(configuration: tuple) -> tuple:
    name = configuration[0]
    rank = PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER)
    return (rank, *configuration)


def table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by configuration; mean and std of each metric over the group's runs.

    The std is the sample standard deviation (ddof=1), NaN for a group of one run. A NaN metric
    in any run makes that group's mean NaN. Groups are ordered as Table I (PRESET_ORDER), then
    other loss names alphabetically, then by weights, normalization and label method.

    Returns:
        One dict per configuration: method, bce, sce, rce, mae, normalized, label_kind,
        label_method, n, seeds, and <metric>_mean, <metric>_std for each metric.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_configuration(row), []).append(row)
    result = []
    for configuration in sorted(groups, key=_table_order):
        members = groups[configuration]
        name, bce, sce, rce, mae, normalized, label_kind, label_method = configuration
        entry: dict[str, Any] = {
            "method": name,
            "bce": bce,
            "sce": sce,
            "rce": rce,
            "mae": mae,
            "normalized": normalized,
            "label_kind": label_kind,
            "label_method": label_method,
            "n": len(members),
            "seeds": sorted(member["seed"] for member in members),
        }
        for key in METRIC_KEYS:
            values = np.array([float(member[key]) for member in members])
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        result.append(entry)
    return result


def _format_metric(entry: dict[str, Any], key: str, scale: float, decimals: int) -> str:
    mean = entry[f"{key}_mean"] * scale
    std = entry[f"{key}_std"] * scale
    if math.isnan(mean):
        return "n/a"
    if entry["n"] > 1:
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    return f"{mean:.{decimals}f}"


def _label(entry: dict[str, Any]) -> str:
    kind = "bin" if entry["label_kind"] == "binary" else entry["label_kind"]
    return f"{kind} ({entry['label_method']})"


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """Table-I style markdown of table() output: AP and IoU in %, the rest as fractions or mL."""
    header = ["Method", "BCE", "SCE", "RCE", "MAE", "Norm.", "Label"]
    header += [title for _, title, _, _ in METRIC_COLUMNS] + ["n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = [entry["method"]] + [f"{entry[key]:g}" for key in LOSS_WEIGHTS]
        cells += ["yes" if entry["normalized"] else "no", _label(entry)]
        cells += [
            _format_metric(entry, key, scale, decimals)
            for key, _, scale, decimals in METRIC_COLUMNS
        ]
        cells.append(str(entry["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(entries: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(entries[0]), lineterminator="\n")
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


def _save_figure_atomic(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return path


def write_report(
    directory: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write report.md, report.csv and report.png for the runs below directory.

    Returns:
        {"md": path, "csv": path, "png": path}
    """
    rows = collect(directory)
    entries = table(rows)
    out_dir = Path(directory if out_dir is None else out_dir)
    heading = (
        f"# bmlseg report\n\n{len(rows)} runs below `{directory}`, {len(entries)} "
        "configurations. AP and IoU in %, recall, precision, Dice and ECE as fractions, volume "
        "error as mean absolute error in mL; mean ± sample std over the n runs of a "
        "configuration when n > 1.\n\n"
    )
    return {
        "md": write_text_atomic(out_dir / "report.md", heading + markdown_table(entries)),
        "csv": write_text_atomic(out_dir / "report.csv", _csv_text(entries)),
        "png": _save_figure_atomic(_figure(entries), out_dir / "report.png"),
    }


def main_report(argv: Sequence[str] | None = None) -> int:
    """bmlseg-report DIR [--out OUT]: write the report and print report.md."""
    parser = argparse.ArgumentParser(
        prog="bmlseg-report",
        description="Summarize every summary.json below DIR as a Table-I style report.",
    )
    parser.add_argument("directory", metavar="DIR", help="a run or a Hydra multirun folder")
    parser.add_argument("--out", help="folder for report.md/.csv/.png (default: DIR)")
    arguments = parser.parse_args(argv)
    try:
        paths = write_report(arguments.directory, arguments.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"bmlseg-report: error: {error}", file=sys.stderr)
        return 1
    print(paths["md"].read_text(encoding="utf-8"), end="")
    print(f"\nwrote {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0
