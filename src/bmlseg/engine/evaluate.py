"""Evaluation: a model over every slice of whole volumes, scored with bmlseg.metrics.

Each volume is brought to the model's grid, normalized and cropped as in training
(bmlseg.data.slices.VolumeSlices), every slice goes through the model in batches, and the crop
predictions are pasted back into the volume on the model's grid, so the metrics see the full
volume (outside the crop: no lesion). The detections are scored against a Reference: the
pixelwise truth of ``masks/``, or, on a dataset without it, the confident cores of a label method
(docs/training.md, "Without pixelwise truth"), resampled to the model's grid (nearest
neighbour); on a dataset already on that grid (the phantom) nothing is resampled. A probability
map for a scan (:func:`infer_volume`) is mapped back onto the scan's own grid.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from bmlseg.data.format import (
    Case,
    DatasetInfo,
    load_case,
    load_dataset,
    mask_path,
    read_dataset_json,
)
from bmlseg.data.grid import ModelGrid
from bmlseg.data.instances import InstanceOptions, confident_cores
from bmlseg.data.slices import VolumeSlices, paste_volume, read_softlabel
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.engine.distributed import autocast_dtype, resolve_device
from bmlseg.io import Geometry, atomic_path
from bmlseg.metrics import METRIC_KEYS, SCORE_GRID, VolumeMetrics, probability_maps
from bmlseg.models import probability_map
from bmlseg.summary import run_summary, write_summary


@dataclass(frozen=True)
class InferenceSettings:
    """How a model's detections on a volume become what is scored or written.

    Attributes:
        score_threshold: the operating threshold: detections scoring at or above it make the
            probability map, the BML mask and every metric but AP. None, in evaluation only:
            chosen on the evaluated cases, the value of bmlseg.metrics.SCORE_GRID with the best
            mean Dice.
        mask_threshold: mask probability at or above which a pixel is in an instance, and a voxel
            of the probability map is BML.
        batch_size: slices per forward pass.
        min_score: detections scoring under it (and under score_threshold, if that is lower)
            are dropped; AP ranks all the others. 0.05 is torchvision's default
            ``box_score_thresh``.
    """

    score_threshold: float | None
    mask_threshold: float
    batch_size: int
    min_score: float = 0.05


@dataclass(frozen=True)
class Reference:
    """What detections are scored against: each case's binary reference volume ``[S, H, W]``.

    Attributes:
        label_method: None: the pixelwise truth, ``masks/<id>.nii.gz``. A method's name: the
            confident cores of its label ``softlabels/<method>/<id>.nii.gz``, cut slice by
            slice as training cuts its instances (bmlseg.data.instances.confident_cores), for
            datasets whose readers only drew rectangles.
        instances: the cut (threshold, minimum area) of the label's cores.
    """

    label_method: str | None = None
    instances: InstanceOptions = field(default_factory=InstanceOptions)

    @classmethod
    def labels_of(cls, config: Mapping[str, Any]) -> Reference:
        """The labels' reference of a run's config (composed, or as a checkpoint stores it):
        ``labels.method``'s confident cores, cut as ``data.instances`` cuts its instances."""
        return cls(config["labels"]["method"], InstanceOptions(**config["data"]["instances"]))

    def __str__(self) -> str:
        """``truth``, or e.g. ``labels:kimriss>=0.5,area>=8mm2``: what summary.json records."""
        if self.label_method is None:
            return "truth"
        cut = self.instances
        return f"labels:{self.label_method}>={cut.threshold:g},area>={cut.min_area_mm2:g}mm2"

    def volume(self, root: str | os.PathLike, case: Case) -> np.ndarray:
        """The case's reference, ``[S, H, W]`` bool.

        Raises:
            FileNotFoundError: the truth of a case without ``masks/<id>.nii.gz``, or a label
                that was not written.
        """
        if self.label_method is None:
            if case.mask is None:
                raise FileNotFoundError(
                    f"{mask_path(root, case.record.id)}: missing; evaluating against the truth "
                    "needs the pixelwise ground truth of every evaluated case"
                )
            return case.mask > 0
        label = read_softlabel(Path(root), self.label_method, case)
        pixel_area_mm2 = case.geometry.spacing[0] * case.geometry.spacing[1]
        cores = [confident_cores(plane, self.instances, pixel_area_mm2) for plane in label]
        return np.stack([plane_cores.any(axis=0) for plane_cores in cores])


TRUTH = Reference()


def split_reference(root: str | os.PathLike, cases: Sequence[str], labels: Reference) -> Reference:
    """What a split is scored against: TRUTH when every one of ``cases`` has masks/, else
    ``labels`` (the confident cores of the run's label method)."""
    return TRUTH if all(mask_path(root, case).exists() for case in cases) else labels


@contextlib.contextmanager
def _score_floor(model: nn.Module, score: float) -> Iterator[None]:
    """Make the model keep the detections scoring >= ``score`` (its ``box_score_thresh``)."""
    saved = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = score
    try:
        yield
    finally:
        model.roi_heads.score_thresh = saved


def _model_outputs(
    model: nn.Module,
    slices: VolumeSlices,
    device: torch.device,
    batch_size: int,
    precision: torch.dtype | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The eval output of ``model`` on each slice, in slice order, one batch at a time."""
    for start in range(0, len(slices), batch_size):
        indices = range(start, min(start + batch_size, len(slices)))
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=precision, enabled=precision is not None),
        ):
            outputs = model([slices[index].to(device) for index in indices])
        # Yielded outside the context: grad and autocast modes must not leak to the consumer.
        yield from outputs


def infer_volume(
    model: nn.Module,
    image: np.ndarray,
    bones: np.ndarray,
    geometry: Geometry,
    *,
    grid: ModelGrid,
    device: torch.device,
    settings: InferenceSettings,
    precision: torch.dtype | None = None,
    where: str = "scan",
) -> np.ndarray:
    """The BML probability map ``[S, H, W]`` float32 of one volume on its own grid (``model``
    in eval mode).

    Args:
        image: ``[S, H, W]`` raw intensities; brought to the model's ``grid`` and normalized
            here as in training.
        bones: ``[S, H, W]`` bone labels; they place the crop and the normalization.
        geometry: the scan's geometry (orientation and pixel size).
        settings: its score_threshold must be set.
        where: the scan's name in warnings.
    """
    threshold = settings.score_threshold
    if threshold is None:
        raise ValueError("infer_volume: the probability map needs a score_threshold")
    slices = VolumeSlices(image, bones, geometry, grid, where=where)
    crop_shape = slices.crops.shape[1:]
    probability = np.zeros((len(slices), *crop_shape), dtype=np.float32)
    # Detections under the threshold leave the map unchanged: the mask head is spared them.
    with _score_floor(model, threshold):
        outputs = _model_outputs(model, slices, device, settings.batch_size, precision)
        for index, output in enumerate(outputs):
            probability[index] = probability_map(output, crop_shape, threshold).float().cpu()
    return slices.to_source(slices.paste(probability), "linear")


def volume_detections(
    model: nn.Module,
    slices: VolumeSlices,
    *,
    device: torch.device,
    settings: InferenceSettings,
    floor: float,
    precision: torch.dtype | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per slice, the detections scoring >= ``floor``: (masks ``[N, H, W]`` float32 mask
    probabilities in the volume's grid, scores ``[N]``), as bmlseg.metrics.VolumeMetrics takes
    them. A generator: one batch of slices is in memory at a time."""
    full_shape = slices.shape[1:]
    with _score_floor(model, floor):
        for output in _model_outputs(model, slices, device, settings.batch_size, precision):
            masks = output["masks"][:, 0].float().cpu().numpy()
            scores = output["scores"].float().cpu().numpy()
            yield paste_volume(masks, slices.box, (len(masks), *full_shape)), scores


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
    grid: ModelGrid,
    device: torch.device,
    settings: InferenceSettings,
    precision: torch.dtype | None = None,
    preview_slices: int = 4,
    description: str = "eval",
    reference: Reference = TRUTH,
) -> tuple[dict[str, float], list[Example]]:
    """Volume metrics (bmlseg.metrics.VolumeMetrics.summary) of ``model`` on ``cases``, against
    each case's ``reference`` volume (the pixelwise truth unless given).

    With ``settings.score_threshold`` None the operating threshold is the value of SCORE_GRID
    with the best mean Dice on these cases, found from one inference pass; the summary's
    ``score_threshold`` says which threshold its figures are at.

    Returns:
        The summary, and up to ``preview_slices`` example slices (those with the most reference
        voxels, at most two per case), with the probability map at that threshold.

    Raises:
        FileNotFoundError: a case has no reference volume (Reference.volume).
    """
    info, annotations = load_dataset(root)
    thresholds = SCORE_GRID if settings.score_threshold is None else (settings.score_threshold,)
    # Detections between min_score and the lowest candidate threshold count for AP only.
    floor = min(settings.min_score, thresholds[0])
    metrics = VolumeMetrics(thresholds, settings.mask_threshold)
    # (truth area, title, image, truth, probability map at each candidate threshold)
    previews: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]] = []
    for case_id in tqdm(cases, desc=description, unit="volume", leave=False, disable=None):
        case = load_case(root, case_id, info=info, annotations=annotations)
        slices = VolumeSlices(
            case.image,
            case.bones,
            case.geometry,
            grid,
            truth=reference.volume(root, case).astype(np.uint8),
            where=case_id,
        )
        truth = slices.truth > 0
        areas = truth.sum(axis=(1, 2))
        shown = np.argsort(-areas, kind="stable")[: min(2, preview_slices)].tolist()
        maps: dict[int, np.ndarray] = {}
        detections = volume_detections(
            model,
            slices,
            device=device,
            settings=settings,
            floor=floor,
            precision=precision,
        )
        metrics.add(
            case_id,
            _keeping_maps(detections, shown, thresholds, maps),
            truth,
            slices.bones,
            slices.placed.geometry.voxel_volume_ml,
            info.bones,
        )
        previews += [
            (
                int(areas[index]),
                f"{case_id} slice {index}",
                slices.image[index],
                truth[index],
                maps[index],
            )
            for index in shown
        ]
        # Keep only the slices that can still make the figure.
        previews.sort(key=lambda item: -item[0])
        del previews[preview_slices:]
    chosen = metrics.chosen()
    examples = [
        Example(title, image, mask, maps[chosen]) for _, title, image, mask, maps in previews
    ]
    return metrics.summary(), examples


def _keeping_maps(
    detections: Iterator[tuple[np.ndarray, np.ndarray]],
    indices: Sequence[int],
    thresholds: Sequence[float],
    maps: dict[int, np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pass ``detections`` on, storing the probability maps (``[T, H, W]``) of the slices
    ``indices`` in ``maps``."""
    for index, (masks, scores) in enumerate(detections):
        if index in indices:
            maps[index] = probability_maps(masks, scores, thresholds)
        yield masks, scores


def recorded_score_threshold(checkpoint: dict[str, Any], path: str | os.PathLike) -> float:
    """The score threshold chosen (or fixed) at the validation of the checkpoint's best.pt.

    It is ``checkpoint["best"]["score_threshold"]``; last.pt carries best.pt's too.
    """
    threshold = checkpoint["best"].get("score_threshold")
    if threshold is None:
        raise ValueError(
            f"{path}: no score threshold recorded (written before the first validation, or by an "
            "older bmlseg); pass score_threshold=..."
        )
    return float(threshold)


def load_for_inference(
    path: str | os.PathLike,
    device: torch.device,
    *,
    batch_size: int,
    score_threshold: float | None,
    mask_threshold: float | None,
) -> tuple[dict[str, Any], nn.Module, InferenceSettings]:
    """A trained checkpoint ready for inference: its state, its model on ``device`` in eval
    mode, and the inference settings, where a threshold given as None is the checkpoint's own
    (the recorded score threshold, and its ``train.mask_threshold``)."""
    state = checkpoints.load(path, device)
    settings = InferenceSettings(
        score_threshold=recorded_score_threshold(state, path)
        if score_threshold is None
        else score_threshold,
        mask_threshold=state["config"]["train"]["mask_threshold"]
        if mask_threshold is None
        else mask_threshold,
        batch_size=batch_size,
    )
    return state, checkpoints.model_from_checkpoint(state, device), settings


def write_run_outputs(
    out_dir: Path,
    scores: dict[str, float],
    examples: Sequence[Example],
    checkpoint: dict[str, Any],
    *,
    seed: int,
    split: str,
    reference: Reference,
    steps: int,
    wall_time_s: float,
) -> dict[str, Path]:
    """summary.json (bmlseg.summary: metrics + what was trained) and predictions.png, both
    atomic; ``reference`` is what ``scores`` were scored against."""
    summary = run_summary(
        scores,
        checkpoint,
        run_dir=out_dir,
        seed=seed,
        split=split,
        reference=str(reference),
        steps=steps,
        wall_time_s=wall_time_s,
    )
    paths = {"summary": write_summary(out_dir / "summary.json", summary)}
    if examples:
        paths["predictions"] = save_prediction_figure(
            out_dir / "predictions.png", examples, reference
        )
    return paths


def save_prediction_figure(path: Path, examples: Sequence[Example], reference: Reference) -> Path:
    """One row per example: the image, the reference outlined on it, the predicted
    probability."""
    figure = Figure(figsize=(9, 3 * len(examples)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(examples), 3, squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        row[0].imshow(example.image, cmap="gray")
        row[0].set_title(example.title)
        row[1].imshow(example.image, cmap="gray")
        if example.truth.any():
            row[1].contour(example.truth, levels=[0.5], colors="lime", linewidths=0.8)
        row[1].set_title("ground truth" if reference == TRUTH else str(reference))
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
    batch_size: int,
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    max_cases: int | None = None,
    preview_slices: int = 4,
) -> dict[str, float]:
    """bmlseg-eval: score a checkpoint on ``split`` of ``root`` (default: its training data),
    against the truth where every case has masks/, else against the confident cores of the
    checkpoint's label method (:func:`split_reference`).

    ``score_threshold`` and ``mask_threshold`` None take the checkpoint's (load_for_inference).
    Writes summary.json and predictions.png into ``out_dir``; returns the metrics.
    """
    started = time.perf_counter()
    target = resolve_device(device)
    state, model, settings = load_for_inference(
        checkpoint_path,
        target,
        batch_size=batch_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
    )
    config = state["config"]
    root = root if root is not None else config["data"]["root"]
    cases = split_cases(read_dataset_json(root), split, max_cases)
    reference = split_reference(root, cases, Reference.labels_of(config))
    scores, examples = evaluate_cases(
        model,
        root,
        cases,
        grid=ModelGrid.of(config["data"]),
        device=target,
        settings=settings,
        precision=autocast_dtype(config["train"]["amp"], target) if target.type == "cuda" else None,
        preview_slices=preview_slices,
        description=split,
        reference=reference,
    )
    paths = write_run_outputs(
        Path(out_dir),
        scores,
        examples,
        state,
        seed=config["seed"],
        split=split,
        reference=reference,
        steps=int(state["step"]),
        wall_time_s=time.perf_counter() - started,
    )
    shown = ", ".join(f"{key} {scores[key]:.4f}" for key in METRIC_KEYS)
    print(
        f"{checkpoint_path} on {len(cases)} {split} volumes of {root} against {reference} at "
        f"score threshold {settings.score_threshold}: {shown}"
    )
    print(f"wrote {paths['summary']}")
    return scores
