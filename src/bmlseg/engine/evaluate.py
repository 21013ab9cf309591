"""Evaluation: a model over every slice of whole volumes, scored with bmlseg.metrics.

Each volume is normalized and cropped as in training (bmlseg.data.slices.VolumeSlices), every
slice goes through the model in batches, and the crop predictions are pasted back into the
volume's grid, so the metrics see the full volume (outside the crop: no lesion).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from bmlseg.data.format import (
    DatasetInfo,
    load_case,
    mask_path,
    read_annotations,
    read_dataset_json,
    write_text_atomic,
)
from bmlseg.data.slices import VolumeSlices, paste_volume
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.engine.distributed import resolve_device
from bmlseg.io import atomic_path
from bmlseg.metrics import VolumeMetrics
from bmlseg.models import probability_map

METRIC_KEYS = ("dice", "precision", "recall", "iou", "ap50", "ap75", "ece", "volume_mae_ml")
SUMMARY_LOSS_KEYS = ("name", "bce", "sce", "rce", "mae", "normalized", "label_kind")


@dataclass
class VolumePrediction:
    """A model's output on one volume, in the volume's own ``[S, H, W]`` grid."""

    probability: np.ndarray  # [S, H, W] float32 in [0, 1]
    instances: list[tuple[np.ndarray, np.ndarray]]  # per slice: masks [N, H, W] bool, scores [N]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``; None means full float32.

    ``auto`` is bf16 on CUDA devices that support it, else fp16, and off on CPU. bf16 on CPU is
    allowed when asked for; fp16 needs CUDA.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=off on CPU")
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@torch.no_grad()
def infer_volume(
    model: nn.Module,
    image: np.ndarray,
    bones: np.ndarray,
    *,
    crop_size: int,
    device: torch.device,
    batch_size: int = 8,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    precision: torch.dtype | None = None,
    keep_instances: bool = True,
) -> VolumePrediction:
    """Run ``model`` (in eval mode) over every slice of one volume.

    Args:
        image: ``[S, H, W]`` raw intensities; normalized here as in training.
        bones: ``[S, H, W]`` bone labels; they place the crop and the normalization.
        score_threshold: detections below this score are dropped.
        mask_threshold: instance mask probability at or above which a pixel is in the instance.
        keep_instances: also return the kept instances (for the detection metrics).

    Returns:
        The probability map (maximum over kept instances, 0 elsewhere) and, per slice, the kept
        instances as full-size boolean masks with their scores.
    """
    slices = VolumeSlices(image, bones, crop_size)
    saved_threshold = model.roi_heads.score_thresh
    try:
        # Detections under score_threshold are dropped below anyway; dropping them before the
        # mask head spares its cost (most of inference on CPU).
        model.roi_heads.score_thresh = max(saved_threshold, score_threshold)
        probability_crops, instances = _infer_slices(
            model,
            slices,
            device,
            batch_size,
            score_threshold,
            mask_threshold,
            precision,
            keep_instances,
        )
    finally:
        model.roi_heads.score_thresh = saved_threshold
    return VolumePrediction(slices.paste(probability_crops), instances)


def _infer_slices(
    model: nn.Module,
    slices: VolumeSlices,
    device: torch.device,
    batch_size: int,
    score_threshold: float,
    mask_threshold: float,
    precision: torch.dtype | None,
    keep_instances: bool,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Crop probabilities [S, C, C] and full-size kept instances of every slice."""
    count = len(slices)
    crop_size = slices.box[2] - slices.box[0]
    probability = np.zeros((count, crop_size, crop_size), dtype=np.float32)
    instances: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        batch = [slices[index].to(device) for index in indices]
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            outputs = model(batch)
        for index, output in zip(indices, outputs, strict=True):
            shape = (crop_size, crop_size)
            probability[index] = probability_map(output, shape, score_threshold).float().cpu()
            if keep_instances:
                kept = output["scores"] >= score_threshold
                masks = (output["masks"][kept, 0].float() >= mask_threshold).cpu().numpy()
                full = paste_volume(masks, slices.box, (len(masks), *slices.shape[1:]))
                instances.append((full, output["scores"][kept].float().cpu().numpy()))
    return probability, instances


def split_cases(info: DatasetInfo, split: str, limit: int | None = None) -> list[str]:
    """Case ids of ``split`` in dataset.json order, the first ``limit`` of them if given."""
    cases = [record.id for record in info.split(split)]
    if not cases:
        raise ValueError(f"dataset {info.name!r}: no cases in split {split!r}")
    return cases[:limit] if limit is not None else cases


@dataclass
class Example:
    """One slice for the preview figure."""

    title: str
    image: np.ndarray  # [H, W]
    truth: np.ndarray  # [H, W] bool
    probability: np.ndarray  # [H, W]


def evaluate_cases(
    model: nn.Module,
    root: str | os.PathLike,
    cases: Sequence[str],
    *,
    crop_size: int,
    device: torch.device,
    batch_size: int = 8,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    precision: torch.dtype | None = None,
    preview_slices: int = 4,
    description: str = "eval",
) -> tuple[dict[str, float], list[Example]]:
    """Volume metrics (bmlseg.metrics.VolumeMetrics.summary) of ``model`` on ``cases``.

    Returns:
        The summary, and up to ``preview_slices`` example slices (those with the most ground
        truth, at most two per case).

    Raises:
        FileNotFoundError: a case has no ``masks/<id>.nii.gz`` ground truth.
    """
    info = read_dataset_json(root)
    annotations = read_annotations(root)
    metrics = VolumeMetrics()
    examples: list[tuple[int, Example]] = []
    for case_id in tqdm(cases, desc=description, unit="volume", leave=False, disable=None):
        case = load_case(root, case_id, info=info, annotations=annotations)
        if case.mask is None:
            raise FileNotFoundError(
                f"{mask_path(root, case_id)}: missing; evaluating needs the pixelwise ground truth "
                f"of every evaluated case"
            )
        prediction = infer_volume(
            model,
            case.image,
            case.bones,
            crop_size=crop_size,
            device=device,
            batch_size=batch_size,
            score_threshold=score_threshold,
            mask_threshold=mask_threshold,
            precision=precision,
        )
        truth = case.mask > 0
        metrics.add(
            case_id,
            prediction.probability,
            prediction.instances,
            truth,
            case.bones,
            case.geometry.voxel_volume_ml,
            info.bones,
            threshold=mask_threshold,
        )
        areas = truth.sum(axis=(1, 2))
        for index in np.argsort(-areas, kind="stable")[: min(2, preview_slices)]:
            example = Example(
                f"{case_id} slice {index}",
                case.image[index],
                truth[index],
                prediction.probability[index],
            )
            examples.append((int(areas[index]), example))
    examples.sort(key=lambda item: -item[0])
    return metrics.summary(), [example for _, example in examples[:preview_slices]]


def write_run_outputs(
    out_dir: Path,
    scores: dict[str, float],
    examples: Sequence[Example],
    checkpoint: dict[str, Any],
    *,
    seed: int,
    split: str,
    steps: int,
    wall_time_s: float,
) -> dict[str, Path]:
    """summary.json (metrics + what was trained) and predictions.png, both atomic.

    Undefined metrics (e.g. precision without any prediction) are written as NaN, which
    Python's json reads back; bmlseg-report shows them as such.
    """
    config = checkpoint["config"]
    summary = {
        **scores,
        "split": split,
        "loss": {key: config["loss"][key] for key in SUMMARY_LOSS_KEYS},
        "label_method": checkpoint["label_method"],
        "seed": seed,
        "run_dir": str(out_dir.resolve()),
        "model": config["model"],
        "data_root": config["data"]["root"],
        "crop_size": config["data"]["crop_size"],
        "steps": steps,
        "checkpoint_step": int(checkpoint["step"]),
        "best": checkpoint["best"],
        "wall_time_s": round(wall_time_s, 1),
    }
    paths = {
        "summary": write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    }
    if examples:
        paths["predictions"] = save_prediction_figure(out_dir / "predictions.png", examples)
    return paths


def save_prediction_figure(path: Path, examples: Sequence[Example]) -> Path:
    """One row per example: the image, the truth outlined on it, the predicted probability."""
    figure = Figure(figsize=(9, 3 * len(examples)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(examples), 3, squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        row[0].imshow(example.image, cmap="gray")
        row[0].set_title(example.title)
        row[1].imshow(example.image, cmap="gray")
        if example.truth.any():
            row[1].contour(example.truth, levels=[0.5], colors="lime", linewidths=0.8)
        row[1].set_title("ground truth")
        shown = row[2].imshow(example.probability, cmap="magma", vmin=0, vmax=1)
        row[2].set_title("predicted probability")
        figure.colorbar(shown, ax=row[2], fraction=0.046)
        for axis in row:
            axis.set_axis_off()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80, format="png")
    return path


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 8,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    max_cases: int | None = None,
    preview_slices: int = 4,
) -> dict[str, float]:
    """bmlseg-eval: score a checkpoint on ``split`` of ``root`` (default: its training data).

    Writes summary.json and predictions.png into ``out_dir``; returns the metrics.
    """
    started = time.perf_counter()
    target = resolve_device(device)
    state = checkpoints.load(checkpoint_path, target)
    model = checkpoints.model_from_checkpoint(state, target)
    config = state["config"]
    root = root if root is not None else config["data"]["root"]
    cases = split_cases(read_dataset_json(root), split, max_cases)
    scores, examples = evaluate_cases(
        model,
        root,
        cases,
        crop_size=config["data"]["crop_size"],
        device=target,
        batch_size=batch_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
        precision=autocast_dtype(config["train"]["amp"], target) if target.type == "cuda" else None,
        preview_slices=preview_slices,
        description=split,
    )
    paths = write_run_outputs(
        Path(out_dir),
        scores,
        examples,
        state,
        seed=config["seed"],
        split=split,
        steps=int(state["step"]),
        wall_time_s=time.perf_counter() - started,
    )
    shown = ", ".join(f"{key} {scores[key]:.4f}" for key in METRIC_KEYS)
    print(f"{checkpoint_path} on {len(cases)} {split} volumes of {root}: {shown}")
    print(f"wrote {paths['summary']}")
    return scores
