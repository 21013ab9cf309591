"""Prediction on new scans: a volume in, BML probability and mask volumes out, same geometry.

    bmlseg-predict checkpoint=best.pt input=scan.nii.gz bones=scan_bones.nii.gz output_dir=out

writes ``out/scan_bml_prob.nii.gz`` (float32 probability), ``out/scan_bml_mask.nii.gz`` (uint8,
probability >= mask_threshold) and ``out/scan_bml_volume.json`` (BML volume in mL, in total and
per bone, and the thresholds used), and prints the volumes. The probability map is made of the
detections scoring at or above the score threshold, by default the one the checkpoint recorded
(chosen on validation during training).

The input is checked as bmlseg-check checks a dataset's volumes, before anything is written:
NaN or infinite voxels and a blank image are refused (normalization would turn every voxel
into NaN, and the report into 0 mL), as are bones without a bone voxel or off the image's grid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmlseg.data.format import (
    VOLUME_SUFFIX,
    DatasetError,
    bones_problems,
    image_problems,
)
from bmlseg.data.grid import ModelGrid
from bmlseg.engine.distributed import resolve_device
from bmlseg.engine.evaluate import InferenceSettings, infer_volume, load_for_inference
from bmlseg.io import Geometry, read_volume, write_text_atomic, write_volume
from bmlseg.metrics import bml_volume_ml


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    bones: np.ndarray,
    geometry: Geometry,
    grid: ModelGrid,
    settings: InferenceSettings,
    *,
    device: torch.device | str = "cpu",
    where: str = "scan",
) -> np.ndarray:
    """BML probability ``[S, H, W]`` float32 of one volume on its own grid, at
    ``settings.score_threshold``.

    Args:
        model: an IMaskRCNN in eval mode (e.g. ``checkpoint.model_from_checkpoint``).
        image: ``[S, H, W]`` intensities, in any orientation and pixel size: ``geometry`` says
            which, and the volume is brought to the model's ``grid`` (the one it was trained on,
            ``ModelGrid.of(checkpoint["config"]["data"])``) and the map back onto its own grid.
        bones: ``[S, H, W]`` bone labels (0 = background), same grid.
        where: the scan's name in warnings.
    """
    if image.shape != bones.shape:
        raise ValueError(f"image {image.shape} and bones {bones.shape} must have the same shape")
    return infer_volume(
        model,
        image,
        bones,
        geometry,
        grid=grid,
        device=torch.device(device),
        settings=settings,
        where=where,
    )


def predict_file(
    checkpoint_path: str | os.PathLike,
    input_path: str | os.PathLike,
    bones_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    device: str = "auto",
    batch_size: int,
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    bone_names: dict[int, str] | None = None,
) -> dict[str, float]:
    """bmlseg-predict: write the probability and mask volumes and the BML volumes (mL).

    ``score_threshold`` and ``mask_threshold`` None take the checkpoint's
    (bmlseg.engine.evaluate.load_for_inference).

    Returns:
        BML volume in mL: ``{"total": ..., "femur": ..., ...}``.
    """
    image, geometry = read_volume(input_path)
    bones, bones_geometry = read_volume(bones_path)
    # Any bone label is accepted: bone_names only picks the per-bone volumes reported.
    problems = image_problems(image, str(input_path)) + bones_problems(
        bones, bones_geometry, str(bones_path), (image.shape, geometry), None
    )
    if problems:
        raise DatasetError(Path(), problems)
    target = resolve_device(device)
    state, model, settings = load_for_inference(
        checkpoint_path,
        target,
        batch_size=batch_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
    )
    grid = ModelGrid.of(state["config"]["data"])
    probability = predict_volume(
        model, image, bones, geometry, grid, settings, device=target, where=str(input_path)
    )
    mask = probability >= settings.mask_threshold
    # Per-bone volumes under the names of the bones the model was trained on.
    bone_names = bone_names or state["bone_names"]
    volumes = bml_volume_ml(mask, geometry.voxel_volume_ml, bones, bone_names)

    name = _stem(Path(input_path))
    out = Path(output_dir)
    write_volume(out / f"{name}_bml_prob{VOLUME_SUFFIX}", probability.astype(np.float32), geometry)
    write_volume(out / f"{name}_bml_mask{VOLUME_SUFFIX}", mask.astype(np.uint8), geometry)
    report = {
        "input": str(input_path),
        "checkpoint": str(checkpoint_path),
        "score_threshold": settings.score_threshold,
        "mask_threshold": settings.mask_threshold,
        "bml_volume_ml": volumes,
    }
    write_text_atomic(out / f"{name}_bml_volume.json", json.dumps(report, indent=2) + "\n")
    for bone, millilitres in volumes.items():
        print(f"{name}: BML volume {bone}: {millilitres:.3f} mL")
    print(f"wrote {out / name}_bml_prob{VOLUME_SUFFIX}, _bml_mask{VOLUME_SUFFIX}, _bml_volume.json")
    return volumes


def _stem(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan``; a DICOM folder keeps its name."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name
