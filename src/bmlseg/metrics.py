"""Detection, segmentation, calibration and volume metrics against a binary pixelwise truth.

Pure numpy, scipy and pycocotools: this module imports nothing of the package. Definitions and
edge-case choices are written out in docs/metrics.md. In short:

- Dice over the voxels of one volume; both masks empty gives 1.0.
- Instances are the 8-connected components of each truth slice; predicted instances are matched
  one-to-one to them greedily by descending IoU, keeping pairs with IoU >= 0.5.
- Undefined ratios (precision without predictions, recall or AP without truth, mean IoU without
  matches, ECE without voxels) are NaN, never a made-up 0 or 1.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

__all__ = [
    "Matching",
    "VolumeMetrics",
    "bml_volume_ml",
    "coco_mask_ap",
    "connected_instances",
    "dice",
    "expected_calibration_error",
    "match_instances",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_BML_CATEGORY = 1


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice 2TP / (2TP + FP + FN) of two boolean masks of the same shape.

    Both masks empty gives 1.0: the prediction agrees perfectly with a truth that has nothing.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    _check_same_shape("prediction", prediction, "truth", truth)
    overlap = np.count_nonzero(prediction & truth)
    total = np.count_nonzero(prediction) + np.count_nonzero(truth)
    return 1.0 if total == 0 else 2.0 * overlap / total


def connected_instances(mask2d: np.ndarray) -> np.ndarray:
    """The 8-connected components of one slice as instance masks.

    Args:
        mask2d: [H, W] boolean mask.

    Returns:
        [K, H, W] bool, one mask per component, in the order scipy labels them (raster order of
        each component's first pixel); K = 0 for an empty slice.
    """
    mask2d = np.asarray(mask2d, dtype=bool)
    if mask2d.ndim != 2:
        raise ValueError(f"mask2d must be [H, W], got shape {mask2d.shape}")
    labels, count = ndimage.label(mask2d, structure=_EIGHT_CONNECTED)
    return labels[None, :, :] == np.arange(1, count + 1)[:, None, None]


def _iou_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, H, W] and [K, H, W] boolean masks -> [N, K] float64."""
    pixels = predicted.shape[1] * predicted.shape[2]
    predicted_flat = predicted.reshape(len(predicted), pixels).astype(np.float64)
    truth_flat = truth.reshape(len(truth), pixels).astype(np.float64)
    intersection = predicted_flat @ truth_flat.T
    union = predicted_flat.sum(1)[:, None] + truth_flat.sum(1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


@dataclass(frozen=True)
class Matching:
    """One-to-one matching of predicted to truth instances; ious holds the IoU of each match."""

    tp: int
    fp: int
    fn: int
    ious: list[float] = field(default_factory=list)


def match_instances(
    predicted: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5
) -> Matching:
    """Match predicted to truth instances one-to-one, greedily by descending IoU.

    All pairs with IoU >= iou_threshold are visited from the highest IoU down (ties: lower
    predicted index, then lower truth index first); a pair is a match when neither side is
    matched yet. Unmatched predictions are false positives, unmatched truths false negatives.
    With disjoint truths (connected components) and a threshold of 0.5 or more, a prediction has
    at most one candidate truth (barring an exact tie at 0.5), so greedy matching finds as many
    matches as an optimal (Hungarian) one, and each truth keeps its best prediction.

    Args:
        predicted: [N, H, W] bool.
        truth: [K, H, W] bool.
    """
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if predicted.ndim != 3 or truth.ndim != 3 or predicted.shape[1:] != truth.shape[1:]:
        raise ValueError(
            f"predicted [N, H, W] and truth [K, H, W] must share H, W; got {predicted.shape} "
            f"and {truth.shape}"
        )
    ious = _iou_matrix(predicted, truth)
    candidates = np.argwhere(ious >= iou_threshold)
    order = np.argsort(-ious[candidates[:, 0], candidates[:, 1]], kind="stable")
    matched_predicted: set[int] = set()
    matched_truth: set[int] = set()
    match_ious: list[float] = []
    for p, t in candidates[order].tolist():
        if p in matched_predicted or t in matched_truth:
            continue
        matched_predicted.add(p)
        matched_truth.add(t)
        match_ious.append(float(ious[p, t]))
    tp = len(match_ious)
    return Matching(tp=tp, fp=len(predicted) - tp, fn=len(truth) - tp, ious=match_ious)


def _calibration_bins(
    probability: np.ndarray, truth: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin on [0, 1]: voxel count, sum of probabilities, count of positives."""
    if probability.size and (probability.min() < 0.0 or probability.max() > 1.0):
        raise ValueError(
            f"probability must lie in [0, 1], got [{probability.min()}, {probability.max()}]"
        )
    # Bins are [i/n, (i+1)/n); a probability of exactly 1 belongs to the last bin.
    index = np.minimum((probability * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    probability_sum = np.bincount(index, weights=probability, minlength=n_bins)
    positives = np.bincount(index, weights=truth.astype(np.float64), minlength=n_bins)
    return count, probability_sum, positives


def _ece_from_bins(count: np.ndarray, probability_sum: np.ndarray, positives: np.ndarray) -> float:
    total = count.sum()
    if total == 0:
        return float("nan")
    filled = count > 0
    gap = np.abs(positives[filled] - probability_sum[filled]) / count[filled]
    return float(np.sum(count[filled] / total * gap))


def expected_calibration_error(
    probability: np.ndarray,
    truth: np.ndarray,
    region: np.ndarray | None = None,
    n_bins: int = 15,
) -> float:
    """Expected calibration error of the positive-class probability.

    ECE = sum over bins b of (n_b / n) * |mean(truth in b) - mean(probability in b)|, with n_bins
    equal-width bins on [0, 1]. NaN when no voxel is counted.

    Args:
        probability: float array in [0, 1], any shape.
        truth: bool array of the same shape.
        region: optional bool array of the same shape; only its voxels count (e.g. inside bone).
    """
    probability = np.asarray(probability, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    _check_same_shape("probability", probability, "truth", truth)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        _check_same_shape("probability", probability, "region", region)
        probability, truth = probability[region], truth[region]
    return _ece_from_bins(*_calibration_bins(probability.ravel(), truth.ravel(), n_bins))


def _encode(masks: np.ndarray) -> list[dict]:
    """[N, H, W] bool -> N compressed RLEs as pycocotools wants them (Fortran-ordered uint8)."""
    return [mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))) for mask in masks]


@dataclass
class _EncodedSlice:
    """One slice for COCO evaluation, its masks kept as RLEs to stay small."""

    height: int
    width: int
    predicted: list[dict]
    scores: list[float]
    truth: list[dict]


def _encode_slice(masks: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> _EncodedSlice:
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=bool)
    if masks.ndim != 3 or truth.ndim != 3 or masks.shape[1:] != truth.shape[1:]:
        raise ValueError(
            f"predicted masks [N, H, W] and truth [K, H, W] must share H, W; got {masks.shape} "
            f"and {truth.shape}"
        )
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} predicted masks but {len(scores)} scores")
    height, width = truth.shape[1:]
    return _EncodedSlice(height, width, _encode(masks), scores.tolist(), _encode(truth))


def _coco_ap_encoded(slices: Sequence[_EncodedSlice]) -> dict[str, float]:
    truth_annotations = []
    detections = []
    for image_id, encoded in enumerate(slices, start=1):
        for rle in encoded.truth:
            truth_annotations.append(
                {
                    "id": len(truth_annotations) + 1,
                    "image_id": image_id,
                    "category_id": _BML_CATEGORY,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        # No "bbox" key: loadRes would then take the box area as the mask area.
        detections.extend(
            {
                "image_id": image_id,
                "category_id": _BML_CATEGORY,
                "segmentation": rle,
                "score": score,
            }
            for rle, score in zip(encoded.predicted, encoded.scores, strict=True)
        )
    if not truth_annotations:
        return {"ap50": float("nan"), "ap75": float("nan")}
    if not detections:
        return {"ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        truth_coco = COCO()
        truth_coco.dataset = {
            "images": [
                {"id": image_id, "height": encoded.height, "width": encoded.width}
                for image_id, encoded in enumerate(slices, start=1)
            ],
            "categories": [{"id": _BML_CATEGORY, "name": "bml"}],
            "annotations": truth_annotations,
        }
        truth_coco.createIndex()
        evaluation = COCOeval(truth_coco, truth_coco.loadRes(detections), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # stats[1], stats[2]: AP at IoU 0.50 and 0.75, all areas, 100 detections per image;
    # pycocotools writes -1 where AP is undefined.
    ap50, ap75 = (float(value) if value >= 0 else float("nan") for value in evaluation.stats[1:3])
    return {"ap50": ap50, "ap75": ap75}


def coco_mask_ap(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]], truths: Sequence[np.ndarray]
) -> dict[str, float]:
    """COCO mask AP at IoU 0.5 and 0.75 over a set of slices, computed by pycocotools.

    Each slice is one COCO image with the single category "bml". AP is NaN when no slice has a
    truth instance (pycocotools' -1, undefined) and 0.0 when there are truths but no predictions.

    Args:
        predictions: per slice, (masks [N, H, W] bool, scores [N]).
        truths: per slice, truth instance masks [K, H, W] bool (e.g. connected_instances).

    Returns:
        {"ap50": float, "ap75": float}
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predicted slices but {len(truths)} truth slices")
    slices = [
        _encode_slice(masks, scores, truth)
        for (masks, scores), truth in zip(predictions, truths, strict=True)
    ]
    return _coco_ap_encoded(slices)


def bml_volume_ml(
    mask: np.ndarray,
    voxel_volume_ml: float,
    bones: np.ndarray | None = None,
    bone_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """BML volume in mL, in total and per bone.

    Args:
        mask: [S, H, W] bool BML mask.
        voxel_volume_ml: volume of one voxel in mL (spacing product in mm^3 / 1000).
        bones: optional [S, H, W] uint8 bone labels (0 = background); each BML voxel is counted
            for the bone under it. BML voxels on background count only in the total.
        bone_names: label -> name, e.g. {1: "femur", 2: "tibia", 3: "patella"}; when bones is
            given without names, the nonzero labels present are named "bone_<label>".

    Returns:
        {"total": mL, <bone name>: mL, ...}
    """
    mask = np.asarray(mask, dtype=bool)
    volumes = {"total": float(np.count_nonzero(mask) * voxel_volume_ml)}
    if bones is None:
        return volumes
    bones = np.asarray(bones)
    _check_same_shape("mask", mask, "bones", bones)
    if bone_names is None:
        bone_names = {int(label): f"bone_{label}" for label in np.unique(bones) if label != 0}
    for label, name in bone_names.items():
        volumes[name] = float(np.count_nonzero(mask & (bones == label)) * voxel_volume_ml)
    return volumes


class VolumeMetrics:
    """Accumulates test volumes and summarizes them as in Table I (plus calibration and volume).

    Per volume: Dice of probability >= threshold; BML volume error in total and per bone.
    Pooled over all slices of all volumes: instance matching (precision, recall, mean IoU of the
    matches), COCO mask AP50/AP75, and the ECE of the probabilities inside bone.
    """

    def __init__(self, iou_threshold: float = 0.5, n_bins: int = 15) -> None:
        self.iou_threshold = iou_threshold
        self.n_bins = n_bins
        self.cases: list[dict[str, float | str]] = []
        self._volume_errors: dict[str, list[float]] = {}
        self._tp = self._fp = self._fn = 0
        self._match_ious: list[float] = []
        self._coco_slices: list[_EncodedSlice] = []
        self._bin_count = np.zeros(n_bins)
        self._bin_probability_sum = np.zeros(n_bins)
        self._bin_positives = np.zeros(n_bins)

    def add(
        self,
        case_id: str,
        probability: np.ndarray,
        instances: Sequence[tuple[np.ndarray, np.ndarray]],
        truth: np.ndarray,
        bones: np.ndarray,
        voxel_volume_ml: float,
        bone_names: Mapping[int, str],
        threshold: float = 0.5,
    ) -> dict[str, float | str]:
        """Add one volume; returns its own figures (also kept in self.cases).

        Args:
            probability: [S, H, W] float BML probability in [0, 1].
            instances: one (masks [N, H, W] bool, scores [N]) per slice.
            truth: [S, H, W] bool pixelwise ground truth.
            bones: [S, H, W] uint8 bone labels (0 = background).
            voxel_volume_ml: volume of one voxel in mL.
            bone_names: bone label -> name.
            threshold: probability at or above which a voxel is BML.
        """
        probability = np.asarray(probability, dtype=np.float64)
        truth = np.asarray(truth, dtype=bool)
        bones = np.asarray(bones)
        if probability.ndim != 3:
            raise ValueError(f"{case_id}: probability must be [S, H, W], got {probability.shape}")
        _check_same_shape(f"{case_id}: probability", probability, "truth", truth)
        _check_same_shape(f"{case_id}: probability", probability, "bones", bones)
        if len(instances) != len(probability):
            raise ValueError(
                f"{case_id}: {len(instances)} slices of instances for {len(probability)} slices"
            )

        for (masks, scores), truth_slice in zip(instances, truth, strict=True):
            self._add_slice(masks, scores, connected_instances(truth_slice))

        bone_region = bones != 0
        count, probability_sum, positives = _calibration_bins(
            probability[bone_region], truth[bone_region], self.n_bins
        )
        self._bin_count += count
        self._bin_probability_sum += probability_sum
        self._bin_positives += positives

        predicted = probability >= threshold
        predicted_ml = bml_volume_ml(predicted, voxel_volume_ml, bones, bone_names)
        truth_ml = bml_volume_ml(truth, voxel_volume_ml, bones, bone_names)
        for name in predicted_ml:
            error = abs(predicted_ml[name] - truth_ml[name])
            self._volume_errors.setdefault(name, []).append(error)

        case: dict[str, float | str] = {
            "case_id": case_id,
            "dice": dice(predicted, truth),
            "volume_ml": predicted_ml["total"],
            "truth_volume_ml": truth_ml["total"],
        }
        self.cases.append(case)
        return case

    def _add_slice(self, masks: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> None:
        encoded = _encode_slice(masks, scores, truth)
        matching = match_instances(masks, truth, self.iou_threshold)
        self._tp += matching.tp
        self._fp += matching.fp
        self._fn += matching.fn
        self._match_ious.extend(matching.ious)
        # A slice with neither truth nor predictions changes no COCO figure: keep only the others.
        if encoded.predicted or encoded.truth:
            self._coco_slices.append(encoded)

    def summary(self) -> dict[str, float | int]:
        """Metrics over everything added so far (keys listed in docs/metrics.md)."""
        if not self.cases:
            raise ValueError("VolumeMetrics.summary: no volume was added")
        ap = _coco_ap_encoded(self._coco_slices)
        result: dict[str, float | int] = {
            "dice": float(np.mean([case["dice"] for case in self.cases])),
            "precision": _ratio(self._tp, self._tp + self._fp),
            "recall": _ratio(self._tp, self._tp + self._fn),
            "iou": float(np.mean(self._match_ious)) if self._match_ious else float("nan"),
            "ap50": ap["ap50"],
            "ap75": ap["ap75"],
            "ece": _ece_from_bins(self._bin_count, self._bin_probability_sum, self._bin_positives),
            "volume_mae_ml": float(np.mean(self._volume_errors["total"])),
        }
        for name, errors in self._volume_errors.items():
            if name != "total":
                result[f"volume_mae_ml_{name}"] = float(np.mean(errors))
        result["n_volumes"] = len(self.cases)
        result["n_truth_instances"] = self._tp + self._fn
        result["n_predicted_instances"] = self._tp + self._fp
        return result
