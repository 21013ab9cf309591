"""summary.json, a run's result: written by the training and evaluation, read by the report.

One file per evaluated run (nnU-Net keeps one per evaluation too)::

    {<every key of bmlseg.metrics.METRIC_KEYS>: number (NaN when undefined),
     "score_threshold", "volume_mae_ml_<bone>", "n_volumes", "n_lesions", ...: numbers,
     "split", "reference": what the metrics are scored against ("truth": masks/; or e.g.
     "labels:kimriss>=0.5,area>=8mm2": a label method's confident cores),
     "loss": the whole loss config, "label_method", "seed", "run_dir",
     "model": the model config, "data_root", "crop_size", "spacing_mm", "orientation" (the
     model's grid), "steps", "checkpoint_step",
     "best": the best validation of the checkpoint, "wall_time_s"}

Python's json writes and reads NaN, which undefined metrics (a precision without any
prediction, an AP without any truth) are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bmlseg.io import write_text_atomic
from bmlseg.metrics import METRIC_KEYS

__all__ = ["REQUIRED_KEYS", "read_summary", "run_summary", "write_summary"]

# What bmlseg-report needs of a summary, and of its "loss".
REQUIRED_KEYS = (*METRIC_KEYS, "loss", "label_method", "seed", "run_dir")
REQUIRED_LOSS_KEYS = ("name", "bce", "sce", "rce", "mae", "normalized", "label_kind")
NUMERIC_LOSS_KEYS = ("bce", "sce", "rce", "mae")


def run_summary(
    scores: dict[str, float],
    checkpoint: dict[str, Any],
    *,
    run_dir: Path,
    seed: int,
    split: str,
    reference: str,
    steps: int,
    wall_time_s: float,
) -> dict[str, Any]:
    """The summary of ``checkpoint`` scored on ``split`` against ``reference``: the scores and
    what was trained."""
    config = checkpoint["config"]
    return {
        **scores,
        "split": split,
        "reference": reference,
        "loss": dict(config["loss"]),
        "label_method": checkpoint["label_method"],
        "seed": seed,
        "run_dir": str(Path(run_dir).resolve()),
        "model": config["model"],
        "data_root": config["data"]["root"],
        "crop_size": config["data"]["crop_size"],
        "spacing_mm": config["data"]["spacing_mm"],
        "orientation": config["data"]["orientation"],
        "steps": steps,
        "checkpoint_step": int(checkpoint["step"]),
        "best": checkpoint["best"],
        "wall_time_s": round(wall_time_s, 1),
    }


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``summary`` to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A summary.json, checked for what the report needs, with ``summary_path`` added (and
    ``reference`` "truth" where an older file lacks it).

    Raises:
        ValueError: not JSON, not an object, a required key missing or not a number; the
            message names the file and the key.
    """
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key in REQUIRED_KEYS:
        if key not in summary:
            raise ValueError(f"{path}: missing key {key!r}")
    loss = summary["loss"]
    if not isinstance(loss, dict):
        raise ValueError(f"{path}: 'loss' must be an object, got {loss!r}")
    for key in REQUIRED_LOSS_KEYS:
        if key not in loss:
            raise ValueError(f"{path}: missing key 'loss.{key}'")
    for key in METRIC_KEYS:
        _check_number(summary[key], path, key)
    for key in NUMERIC_LOSS_KEYS:
        _check_number(loss[key], path, f"loss.{key}")
    if not isinstance(summary.get("reference", ""), str):
        raise ValueError(f"{path}: 'reference' must be a string, got {summary['reference']!r}")
    # Summaries written before the reference was recorded were all scored against masks/.
    return {"reference": "truth", **summary, "summary_path": str(path)}


def _check_number(value: Any, path: Path, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: {key!r} must be a number, got {value!r}")
