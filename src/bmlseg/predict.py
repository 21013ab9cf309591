"""Prediction on new scans: volumes in, BML probability and mask volumes out, same geometry.

    bmlseg-predict -i scan.nii.gz -b scan_bones.nii.gz -c best.pt -o out
    bmlseg-predict -i scans/ -b bones/ -c best.pt -o out [--series "Sag PD FS"]

writes, per scan, ``out/<name>_bml_prob.nii.gz`` (float32 probability),
``out/<name>_bml_mask.nii.gz`` (uint8, probability >= mask_threshold) and
``out/<name>_bml_volume.json`` (BML volume in mL, in total and per bone, and the thresholds
used), and prints the volumes. The probability map is made of the detections scoring at or above
the score threshold, by default the one the checkpoint recorded (chosen on validation during
training); any threshold in [0, 1] takes effect, below torchvision's ``box_score_thresh`` of 0.05
too (infer_volume lowers the model's floor to it).

The input is a volume file, a DICOM series folder, or a folder of scans: its volume files and
its subfolders holding a DICOM series (see :func:`find_scans`), in any orientation and pixel
size: each scan is brought to the grid the model was trained on (bmlseg.data.grid) and its
outputs mapped back onto the scan's own grid. bmlseg ships no bone model: each
scan needs a bone label volume on its grid (``--bones``), as in a dataset folder's ``bones/``.
Each scan is checked as bmlseg-check checks a dataset's volumes, before anything of it is
written: NaN or infinite voxels and a blank image are refused (normalization would turn every
voxel into NaN, and the report into 0 mL), as are bones without a bone voxel or off the image's
grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bmlseg.data.format import (
    VOLUME_SUFFIX,
    DatasetError,
    bones_problems,
    image_problems,
)
from bmlseg.data.grid import ModelGrid
from bmlseg.engine.distributed import resolve_device
from bmlseg.engine.evaluate import InferenceSettings, infer_volume, load_for_inference
from bmlseg.io import (
    VOLUME_SUFFIXES,
    Geometry,
    dicom_series,
    read_volume,
    write_text_atomic,
    write_volume,
)
from bmlseg.metrics import bml_volume_ml

BONES_REQUIRED = (
    "pass --bones FILE|FOLDER: a bone label volume on the scan's grid (0 = background), or for a "
    "folder of scans a folder holding one per scan, named like the scan (<name>.nii.gz); bmlseg "
    "has no bone model: a rough segmentation from any tool will do (docs/dataset.md)"
)


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


@dataclass(frozen=True)
class Predictor:
    """A checkpoint loaded once for any number of scans (:func:`load_predictor`)."""

    checkpoint: Path
    state: dict[str, Any]
    model: nn.Module
    settings: InferenceSettings
    device: torch.device


def load_predictor(
    checkpoint_path: str | os.PathLike,
    *,
    device: str = "auto",
    batch_size: int = 8,
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
) -> Predictor:
    """The model of a bmlseg-train checkpoint on ``device``, in eval mode, with its settings.

    ``score_threshold`` and ``mask_threshold`` None take the checkpoint's
    (bmlseg.engine.evaluate.load_for_inference).
    """
    target = resolve_device(device)
    state, model, settings = load_for_inference(
        checkpoint_path,
        target,
        batch_size=batch_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
    )
    return Predictor(Path(checkpoint_path), state, model, settings, target)


def predict_file(
    predictor: Predictor,
    input_path: str | os.PathLike,
    bones_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    series: str | None = None,
    bone_names: dict[int, str] | None = None,
) -> dict[str, float]:
    """Predict one scan: write its probability and mask volumes and its BML volumes (mL).

    Args:
        input_path: a volume file or a DICOM series folder (``series`` chooses among several,
            bmlseg.io.read_volume).
        bones_path: its bone labels, on its grid.
        bone_names: the per-bone volumes reported; by default the bones the model was trained on.

    Returns:
        BML volume in mL: ``{"total": ..., "femur": ..., ...}``.
    """
    image, geometry = read_volume(input_path, series=series)
    bones, bones_geometry = read_volume(bones_path)
    # Any bone label is accepted: bone_names only picks the per-bone volumes reported.
    problems = image_problems(image, str(input_path)) + bones_problems(
        bones, bones_geometry, str(bones_path), (image.shape, geometry), None
    )
    if problems:
        raise DatasetError(Path(), problems)
    settings = predictor.settings
    grid = ModelGrid.of(predictor.state["config"]["data"])
    probability = predict_volume(
        predictor.model,
        image,
        bones,
        geometry,
        grid,
        settings,
        device=predictor.device,
        where=str(input_path),
    )
    mask = probability >= settings.mask_threshold
    # Per-bone volumes under the names of the bones the model was trained on.
    bone_names = bone_names or predictor.state["bone_names"]
    volumes = bml_volume_ml(mask, geometry.voxel_volume_ml, bones, bone_names)

    name = scan_name(Path(input_path))
    out = Path(output_dir)
    write_volume(out / f"{name}_bml_prob{VOLUME_SUFFIX}", probability.astype(np.float32), geometry)
    write_volume(out / f"{name}_bml_mask{VOLUME_SUFFIX}", mask.astype(np.uint8), geometry)
    report = {
        "input": str(input_path),
        "series": series,
        "bones": str(bones_path),
        "checkpoint": str(predictor.checkpoint),
        "score_threshold": settings.score_threshold,
        "mask_threshold": settings.mask_threshold,
        # The scan as read, and the model's grid it was brought to (bmlseg.data.grid).
        "scan_orientation": geometry.orientation,
        "scan_spacing_mm": list(geometry.spacing),
        "model_grid": asdict(grid),
        "bml_volume_ml": volumes,
    }
    write_text_atomic(out / f"{name}_bml_volume.json", json.dumps(report, indent=2) + "\n")
    return volumes


@dataclass(frozen=True)
class Scan:
    """One scan to predict: its output name, image, bones and the DICOM series to read."""

    name: str
    image: Path
    bones: Path
    series: str | None


def find_scans(
    input_path: str | os.PathLike, bones_path: str | os.PathLike, *, series: str | None = None
) -> list[Scan]:
    """The scans of bmlseg-predict's input, each with its bones, in name order.

    ``input_path`` is one scan (a volume file, or a folder holding a DICOM series) or a folder
    of scans: its volume files (:data:`bmlseg.io.VOLUME_SUFFIXES`) and its subfolders that hold
    a DICOM series; anything else in it is left alone. ``bones_path`` is one file for one scan,
    or a folder holding, per scan, the volume file named like the scan (``<name>.nii.gz`` or
    another volume suffix), as a dataset folder's ``bones/`` matches its ``images/``.
    ``series`` is passed to every DICOM folder.

    Raises:
        FileNotFoundError: the input or the bones do not exist.
        ValueError: no scan in the input folder; two scans of one name; a bones file for
            several scans; a scan without bones, or with several, in the bones folder.
    """
    input_path, bones_path = Path(input_path), Path(bones_path)
    for path, what in ((input_path, "input"), (bones_path, "bones")):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder ({what})")
    if input_path.is_file() or dicom_series(input_path):
        images = [input_path]
    else:
        images = sorted(
            entry
            for entry in input_path.iterdir()
            if not entry.name.startswith(".")
            and (_is_volume_file(entry) or (entry.is_dir() and dicom_series(entry)))
        )
        if not images:
            raise ValueError(
                f"{input_path}: no scan in this folder: expected volume files "
                f"({', '.join(VOLUME_SUFFIXES)}) or subfolders holding a DICOM series"
            )
    names = [scan_name(image) for image in images]
    for name in sorted({name for name in names if names.count(name) > 1}):
        clashing = ", ".join(image.name for image in images if scan_name(image) == name)
        raise ValueError(f"{input_path}: {clashing} would all be written as {name}_bml_*")
    if bones_path.is_file():
        if len(images) > 1:
            raise ValueError(
                f"{bones_path}: one bones file for {len(images)} scans in {input_path}; pass "
                "--bones a folder holding one per scan, named like the scan (<name>.nii.gz)"
            )
        bones = [bones_path]
    else:
        bones = [_bones_of(name, bones_path) for name in names]
    # --series is for DICOM folders; given with one volume file, read_volume says so.
    return [
        Scan(name, image, bone, series if image.is_dir() or len(images) == 1 else None)
        for name, image, bone in zip(names, images, bones, strict=True)
    ]


def scan_name(path: Path) -> str:
    """The name outputs are written under: ``scan.nii.gz`` -> ``scan``; a folder keeps its name."""
    for suffix in VOLUME_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem if path.is_file() else path.name


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _bones_of(name: str, folder: Path) -> Path:
    """The volume file of ``folder`` named ``name`` (any volume suffix)."""
    found = sorted(
        entry for entry in folder.iterdir() if _is_volume_file(entry) and scan_name(entry) == name
    )
    if not found:
        raise ValueError(
            f"{folder}: no bones for scan {name}: expected {folder / name}{VOLUME_SUFFIX} "
            f"(or another of {', '.join(VOLUME_SUFFIXES)})"
        )
    if len(found) > 1:
        raise ValueError(
            f"{folder}: {len(found)} bones files for scan {name} "
            f"({', '.join(entry.name for entry in found)}); keep one"
        )
    return found[0]


def main_predict(argv: Sequence[str] | None = None) -> int:
    """``bmlseg-predict -i INPUT -o OUT -c CHECKPOINT --bones B``: return 0, or 1 on bad input."""
    parser = argparse.ArgumentParser(
        prog="bmlseg-predict",
        description="BML probability and mask volumes and BML volumes (mL) of new scans, in "
        "their own geometry, with a bmlseg-train checkpoint.",
    )
    parser.add_argument(
        "-i",
        "--input",
        type=Path,
        required=True,
        help="a volume file (.nii.gz, .nii, .mha, .mhd, .nrrd), a DICOM series folder, or a "
        "folder of them",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the outputs")
    parser.add_argument(
        "-c", "--checkpoint", type=Path, required=True, help="best.pt of a bmlseg-train run"
    )
    parser.add_argument(
        "-b",
        "--bones",
        type=Path,
        help="bone labels on the scan's grid (0 = background): a file, or for a folder of scans "
        "a folder holding <name>.nii.gz per scan",
    )
    parser.add_argument(
        "--series",
        help="the DICOM series to read where a folder holds several: its SeriesDescription "
        "(exactly) or its SeriesInstanceUID",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="slices per forward pass"
    )
    parser.add_argument(
        "--score-threshold",
        type=_probability,
        help="detections scoring at or above it make the maps (default: the checkpoint's)",
    )
    parser.add_argument(
        "--mask-threshold",
        type=_probability,
        help="probability at or above which a voxel is BML (default: the checkpoint's)",
    )
    arguments = parser.parse_args(argv)
    try:
        if arguments.bones is None:
            raise ValueError(BONES_REQUIRED)
        scans = find_scans(arguments.input, arguments.bones, series=arguments.series)
        if arguments.input.is_dir() and arguments.output.resolve() == arguments.input.resolve():
            raise ValueError(
                f"{arguments.output}: the input folder; write the outputs to another folder, or "
                "the next run would take them for scans"
            )
        predictor = load_predictor(
            arguments.checkpoint,
            device=arguments.device,
            batch_size=arguments.batch_size,
            score_threshold=arguments.score_threshold,
            mask_threshold=arguments.mask_threshold,
        )
        progress = tqdm(scans, desc="bmlseg-predict", unit="scan", disable=len(scans) < 2 or None)
        for scan in progress:
            volumes = predict_file(
                predictor, scan.image, scan.bones, arguments.output, series=scan.series
            )
            for bone, millilitres in volumes.items():
                progress.write(f"{scan.name}: BML volume {bone}: {millilitres:.3f} mL")
    except (ValueError, OSError) as error:
        print(f"bmlseg-predict: error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(scans)} scan(s) to {arguments.output} (<name>_bml_prob{VOLUME_SUFFIX}, "
        f"_bml_mask{VOLUME_SUFFIX}, _bml_volume.json)"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value
