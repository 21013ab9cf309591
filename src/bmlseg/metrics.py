"""Detection, segmentation, calibration and volume metrics against a binary pixelwise truth.

Pure numpy, scipy and pycocotools: this module imports nothing of the package. Definitions, the
paper's beside them, and edge-case choices are written out in docs/metrics.md. In short:

- Detections are a model's per-slice instances: probability masks and scores. AP ranks all of
  them. Every other figure uses those scoring at or above an operating score threshold: their
  probability map (the pixelwise maximum of their masks) is BML at or above the mask threshold.
- Dice and IoU over voxels, per volume (both masks empty gives 1.0) and pooled over the split.
- Lesions are the 26-connected 3D components of the truth; a lesion is found when the predicted
  3D components touching it cover it with IoU >= LESION_IOU.
- Slice instances are the 8-connected components of each truth slice, matched one-to-one to the
  predicted instances greedily by descending IoU, keeping pairs with IoU >= SLICE_IOU.
- Undefined ratios (precision without predictions, recall or AP without truth, ECE without
  voxels) are NaN, never a made-up 0 or 1.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

__all__ = [
    "LESION_IOU",
    "METRIC_KEYS",
    "SCORE_GRID",
    "SLICE_IOU",
    "LesionCounts",
    "Matching",
    "VolumeMetrics",
    "bml_volume_ml",
    "coco_mask_ap",
    "connected_instances",
    "connected_lesions",
    "dice",
    "expected_calibration_error",
    "lesion_counts",
    "match_instances",
    "probability_maps",
]

# The metrics of a summary, in the order of the report's columns (bmlseg.report reads these).
METRIC_KEYS = (
    "ap50",
    "ap75",
    "iou",
    "iou_mean",
    "lesion_recall",
    "lesion_precision",
    "slice_recall",
    "slice_precision",
    "dice",
    "dice_pooled",
    "ece",
    "volume_mae_ml",
)
# Candidate operating score thresholds, 0.05 to 0.95 in steps of 0.05, when one is chosen on
# validation (the one with the best mean Dice).
SCORE_GRID = tuple(round(0.05 * step, 2) for step in range(1, 20))
# A lesion is found at IoU >= 0.1 with the predicted components touching it: a loose criterion
# that asks for overlap, not for a good outline (that is what Dice and IoU measure).
LESION_IOU = 0.1
# Slice instances match at IoU >= 0.5, as COCO's AP50 and the usual instance matching.
SLICE_IOU = 0.5
ECE_BINS = 15

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_TWENTY_SIX_CONNECTED = np.ones((3, 3, 3), dtype=bool)
_BML_CATEGORY = 1


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def _overlap(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Dice or IoU from counts; 1.0 where the denominator is 0 (both masks empty agree)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 1.0)


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
    return float(_overlap(2 * overlap, total))


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
    labels, count = ndimage.label(mask2d, structure=EIGHT_CONNECTED)
    return labels[None, :, :] == np.arange(1, count + 1)[:, None, None]


def connected_lesions(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """The 26-connected 3D components of a volume: voxels sharing a face, edge or corner.

    Args:
        volume: [S, H, W] boolean mask.

    Returns:
        [S, H, W] int32 labels (0 = background, 1..count) and the count.
    """
    volume = np.asarray(volume, dtype=bool)
    if volume.ndim != 3:
        raise ValueError(f"volume must be [S, H, W], got shape {volume.shape}")
    labels, count = ndimage.label(volume, structure=_TWENTY_SIX_CONNECTED)
    return labels, int(count)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-level detection counts of one volume (or several, summed)."""

    found: int  # true lesions found (IoU >= LESION_IOU with the components touching them)
    lesions: int  # true lesions
    touching: int  # predicted components touching a true lesion
    components: int  # predicted components

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(
            self.found + other.found,
            self.lesions + other.lesions,
            self.touching + other.touching,
            self.components + other.components,
        )


def lesion_counts(
    prediction: np.ndarray, truth: np.ndarray, iou_threshold: float = LESION_IOU
) -> LesionCounts:
    """Lesion-level detection: 3D components of the prediction against those of the truth.

    A true lesion (26-connected component of ``truth``) is found when the predicted voxels of
    the predicted components touching it (sharing at least one voxel with it) have IoU >=
    ``iou_threshold`` with it. A predicted component touching no lesion is a false positive.

    Args:
        prediction: [S, H, W] bool, e.g. the probability map at the mask threshold.
        truth: [S, H, W] bool.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    _check_same_shape("prediction", prediction, "truth", truth)
    truth_labels, lesions = connected_lesions(truth)
    labels, components = connected_lesions(prediction)
    if components == 0:
        return LesionCounts(0, lesions, 0, 0)
    truth_sizes = np.bincount(truth_labels.ravel(), minlength=lesions + 1)
    component_sizes = np.bincount(labels.ravel(), minlength=components + 1)
    both = (truth_labels > 0) & (labels > 0)
    pairs, overlaps = np.unique(
        truth_labels[both].astype(np.int64) * (components + 1) + labels[both], return_counts=True
    )
    lesion, component = np.divmod(pairs, components + 1)
    # Every predicted voxel inside a lesion belongs to a component touching it, so the
    # intersection of the lesion with those components is the sum of the pair overlaps.
    intersection = np.bincount(lesion, weights=overlaps, minlength=lesions + 1)
    touching_size = np.bincount(lesion, weights=component_sizes[component], minlength=lesions + 1)
    iou = intersection[1:] / (truth_sizes[1:] + touching_size[1:] - intersection[1:])
    found = int(np.count_nonzero(iou >= iou_threshold))
    return LesionCounts(found, lesions, len(np.unique(component)), components)


def _iou_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, H, W] and [K, H, W] boolean masks -> [N, K] float64."""
    predicted_area = predicted.reshape(len(predicted), -1).sum(1)
    truth_area = truth.reshape(len(truth), -1).sum(1)
    # Counting inside each truth mask only: truths are small, predictions may be many.
    intersection = np.zeros((len(predicted), len(truth)))
    for k, mask in enumerate(truth):
        intersection[:, k] = np.count_nonzero(predicted[:, mask], axis=1)
    union = predicted_area[:, None] + truth_area[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _greedy_matches(ious: np.ndarray, iou_threshold: float) -> list[float]:
    """IoUs of the one-to-one matches of an [N, K] IoU matrix, greedily by descending IoU."""
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
    return match_ious


@dataclass(frozen=True)
class Matching:
    """One-to-one matching of predicted to truth instances; ious holds the IoU of each match."""

    tp: int
    fp: int
    fn: int
    ious: list[float] = field(default_factory=list)


def match_instances(
    predicted: np.ndarray, truth: np.ndarray, iou_threshold: float = SLICE_IOU
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
    match_ious = _greedy_matches(_iou_matrix(predicted, truth), iou_threshold)
    tp = len(match_ious)
    return Matching(tp=tp, fp=len(predicted) - tp, fn=len(truth) - tp, ious=match_ious)


def _calibration_bins(probability: np.ndarray, truth: np.ndarray, n_bins: int) -> np.ndarray:
    """Per map and equal-width bin on [0, 1]: voxel count, sum of probabilities, positives.

    Args:
        probability: [T, V] float, T maps of the same V voxels.
        truth: [V] bool.

    Returns:
        [T, 3, n_bins] float64.
    """
    if probability.size and (probability.min() < 0.0 or probability.max() > 1.0):
        raise ValueError(
            f"probability must lie in [0, 1], got [{probability.min()}, {probability.max()}]"
        )
    maps = len(probability)
    # Bins are [i/n, (i+1)/n); a probability of exactly 1 belongs to the last bin. Map t's bins
    # are offset by t * n_bins, so one bincount fills all of them.
    index = np.minimum((probability * n_bins).astype(np.int64), n_bins - 1)
    index = (index + np.arange(maps)[:, None] * n_bins).ravel()
    size = maps * n_bins
    count = np.bincount(index, minlength=size)
    probability_sum = np.bincount(index, weights=probability.ravel(), minlength=size)
    positives = np.bincount(
        index, weights=np.broadcast_to(truth, probability.shape).ravel(), minlength=size
    )
    return np.stack([count, probability_sum, positives]).reshape(3, maps, n_bins).swapaxes(0, 1)


def _ece_from_bins(bins: np.ndarray) -> float:
    count, probability_sum, positives = bins
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
    n_bins: int = ECE_BINS,
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
    return _ece_from_bins(_calibration_bins(probability.reshape(1, -1), truth.ravel(), n_bins)[0])


def probability_maps(
    masks: np.ndarray, scores: np.ndarray, score_thresholds: Sequence[float]
) -> np.ndarray:
    """The probability map of one slice at each score threshold.

    The map at threshold t is the pixelwise maximum of the masks of the detections scoring >= t
    (scores select detections, they do not weight the masks), 0 where there is none.

    Args:
        masks: [N, H, W] float mask probabilities in [0, 1] (or [N, V]: V pixels of each).
        scores: [N].
        score_thresholds: T thresholds.

    Returns:
        [T, H, W] float32 (or [T, V]).
    """
    masks = np.asarray(masks, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    thresholds = np.asarray(score_thresholds, dtype=np.float64)
    maps = np.zeros((len(thresholds), *masks.shape[1:]), dtype=np.float32)
    # The detections scoring >= t are the first kept[t] by descending score: one running maximum
    # over them gives every map.
    kept = np.count_nonzero(scores[None, :] >= thresholds[:, None], axis=1)
    running = np.zeros(masks.shape[1:], dtype=np.float32)
    for count, index in enumerate(np.argsort(-scores, kind="stable")[: kept.max(initial=0)], 1):
        np.maximum(running, masks[index], out=running)
        maps[kept == count] = running
    return maps


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


@dataclass(frozen=True)
class _SparseVolume:
    """One volume's truth and prediction as flat voxel indices. Lesion figures are taken at the
    chosen threshold only, when summarizing: labelling 3D components is the costly part."""

    shape: tuple[int, ...]
    truth: np.ndarray  # the truth voxels
    predicted: np.ndarray  # the voxels predicted at the lowest threshold
    levels: np.ndarray  # the level of each (see VolumeMetrics.add)

    def lesion_counts(self, k: int, iou_threshold: float) -> LesionCounts:
        """lesion_counts of the prediction at threshold index ``k``."""
        truth = np.zeros(self.shape, dtype=bool)
        truth.flat[self.truth] = True
        prediction = np.zeros(self.shape, dtype=bool)
        prediction.flat[self.predicted[self.levels > k]] = True
        return lesion_counts(prediction, truth, iou_threshold)


def _count_above(levels: np.ndarray, thresholds: int) -> np.ndarray:
    """[T]: entry k counts the voxels whose level exceeds k (predicted at threshold k)."""
    histogram = np.bincount(levels.ravel(), minlength=thresholds + 1)
    return histogram[::-1].cumsum()[::-1][1:]


class VolumeMetrics:
    """Accumulates evaluated volumes and summarizes them as in Table I, plus calibration and volume.

    Every figure but AP depends on the operating score threshold. The voxel, slice, calibration
    and volume counts are accumulated for each of ``score_thresholds`` at once, from the same
    detections, and each volume's predicted voxels are kept (sparse) for the lesion figures:
    :meth:`summary` reports everything at the threshold with the best mean Dice (the lowest on
    ties), so a threshold is chosen on validation without running the model again. Give one
    threshold to evaluate at it.

    Per volume: Dice and IoU, BML volume error in total and per bone. Pooled over the volumes:
    voxel Dice and IoU, lesion and slice detection counts, the ECE of the probability map inside
    bone, and COCO mask AP50/AP75 over every detection.

    Args:
        score_thresholds: increasing candidate operating thresholds in (0, 1].
        mask_threshold: mask probability at or above which a pixel is in an instance, and a
            voxel of the probability map is BML.
        lesion_iou: IoU at which a lesion counts as found.
        slice_iou: IoU at which a predicted instance matches a truth instance of its slice.
    """

    def __init__(
        self,
        score_thresholds: Sequence[float],
        mask_threshold: float,
        lesion_iou: float = LESION_IOU,
        slice_iou: float = SLICE_IOU,
    ) -> None:
        thresholds = np.asarray(score_thresholds, dtype=np.float64)
        if (
            thresholds.ndim != 1
            or not len(thresholds)
            or thresholds[0] <= 0
            or thresholds[-1] > 1
            or np.any(np.diff(thresholds) <= 0)
        ):
            raise ValueError(
                f"score_thresholds must increase within (0, 1], got {list(score_thresholds)}"
            )
        if not 0 < mask_threshold <= 1:
            raise ValueError(f"mask_threshold must lie in (0, 1], got {mask_threshold}")
        self.score_thresholds = thresholds
        self.mask_threshold = mask_threshold
        self.lesion_iou = lesion_iou
        self.slice_iou = slice_iou
        count = len(thresholds)
        # Per volume, per threshold:
        self._dice: list[np.ndarray] = []
        self._iou: list[np.ndarray] = []
        self._volume_errors: dict[str, list[np.ndarray]] = {}
        self._volumes: list[_SparseVolume] = []
        # Pooled, per threshold:
        self._voxels = np.zeros((count, 3), dtype=np.int64)  # TP, FP, FN
        self._slices = np.zeros((count, 3), dtype=np.int64)  # TP, FP, FN
        self._calibration = np.zeros((count, 3, ECE_BINS))
        # Threshold-free: every detection, for AP.
        self._coco_slices: list[_EncodedSlice] = []
        self._detections = 0

    def add(
        self,
        case_id: str,
        detections: Iterable[tuple[np.ndarray, np.ndarray]],
        truth: np.ndarray,
        bones: np.ndarray,
        voxel_volume_ml: float,
        bone_names: Mapping[int, str],
    ) -> None:
        """Add one volume.

        Args:
            detections: one (masks [N, H, W] float probabilities, scores [N]) per slice, in slice
                order; consumed one slice at a time, so it may be a generator running the model.
            truth: [S, H, W] bool pixelwise ground truth.
            bones: [S, H, W] uint8 bone labels (0 = background).
            voxel_volume_ml: volume of one voxel in mL.
            bone_names: bone label -> name.
        """
        truth = np.asarray(truth, dtype=bool)
        bones = np.asarray(bones)
        if truth.ndim != 3:
            raise ValueError(f"{case_id}: truth must be [S, H, W], got {truth.shape}")
        _check_same_shape(f"{case_id}: truth", truth, "bones", bones)
        count = len(self.score_thresholds)
        # Per voxel, how many thresholds are at or below the best score of the detections whose
        # mask covers it: the voxel is BML at thresholds[k] exactly when its level exceeds k.
        levels = np.zeros(truth.shape, dtype=np.min_scalar_type(count))
        slices = 0
        for index, (masks, scores) in enumerate(detections):
            if index >= len(truth):
                raise ValueError(f"{case_id}: more slices of detections than {len(truth)} slices")
            masks = np.asarray(masks, dtype=np.float32)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            if masks.shape != (len(scores), *truth.shape[1:]):
                raise ValueError(
                    f"{case_id}: slice {index}: masks {masks.shape} for {len(scores)} scores "
                    f"on {truth.shape[1:]} slices"
                )
            binary = masks >= self.mask_threshold
            self._add_slice(binary, scores, connected_instances(truth[index]))
            self._add_calibration(masks, scores, truth[index], bones[index] != 0)
            best_score = np.zeros(truth.shape[1:])
            for detection in np.argsort(scores, kind="stable"):  # the highest score last
                best_score[binary[detection]] = scores[detection]
            levels[index] = np.searchsorted(self.score_thresholds, best_score, side="right")
            slices += 1
        if slices != len(truth):
            raise ValueError(f"{case_id}: {slices} slices of detections for {len(truth)} slices")

        predicted = _count_above(levels, count)
        true_positive = _count_above(levels[truth], count)
        in_truth = np.count_nonzero(truth)
        self._dice.append(_overlap(2 * true_positive, predicted + in_truth))
        self._iou.append(_overlap(true_positive, predicted + in_truth - true_positive))
        self._voxels += np.stack(
            [true_positive, predicted - true_positive, in_truth - true_positive], axis=1
        )
        predicted_voxels = np.flatnonzero(levels)
        self._volumes.append(
            _SparseVolume(
                truth.shape, np.flatnonzero(truth), predicted_voxels, levels.flat[predicted_voxels]
            )
        )

        errors = {"total": np.abs(predicted - in_truth) * voxel_volume_ml}
        for label, name in bone_names.items():
            bone = bones == label
            errors[name] = (
                np.abs(_count_above(levels[bone], count) - np.count_nonzero(truth & bone))
                * voxel_volume_ml
            )
        for name, error in errors.items():
            self._volume_errors.setdefault(name, []).append(error)

    def _add_slice(self, binary: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> None:
        encoded = _encode_slice(binary, scores, truth)
        # A slice with neither truth nor detections changes no COCO figure: keep only the others.
        if encoded.predicted or encoded.truth:
            self._coco_slices.append(encoded)
        self._detections += len(scores)
        kept = scores[None, :] >= self.score_thresholds[:, None]  # [T, N]
        tp = np.zeros(len(kept), dtype=np.int64)
        if len(scores) and len(truth):
            ious = _iou_matrix(binary, truth)
            tp[:] = [len(_greedy_matches(ious[row], self.slice_iou)) for row in kept]
        self._slices += np.stack([tp, kept.sum(1) - tp, len(truth) - tp], axis=1)

    def _add_calibration(
        self, masks: np.ndarray, scores: np.ndarray, truth: np.ndarray, region: np.ndarray
    ) -> None:
        """Calibration bins of the slice's probability map inside ``region`` at each threshold."""
        # The map at the lowest threshold is the largest: only its nonzero pixels need binning.
        covered = region & (masks[scores >= self.score_thresholds[0]] > 0).any(axis=0)
        self._calibration += _calibration_bins(
            probability_maps(masks[:, covered], scores, self.score_thresholds),
            truth[covered],
            ECE_BINS,
        )
        # The region's other voxels are 0 at every threshold: the first bin, binned here at once.
        uncovered = region & ~covered
        self._calibration[:, 0, 0] += np.count_nonzero(uncovered)
        self._calibration[:, 2, 0] += np.count_nonzero(truth & uncovered)

    def dice_by_threshold(self) -> np.ndarray:
        """[T]: the mean Dice over the volumes at each of score_thresholds."""
        if not self._dice:
            raise ValueError("VolumeMetrics: no volume was added")
        return np.mean(self._dice, axis=0)

    def chosen(self) -> int:
        """Index of the operating threshold: the best mean Dice, the lowest threshold on ties."""
        return int(np.argmax(self.dice_by_threshold()))

    def summary(self) -> dict[str, float | int]:
        """Metrics over everything added so far at the chosen threshold (docs/metrics.md)."""
        k = self.chosen()
        tp, fp, fn = self._voxels[k].tolist()
        slice_tp, slice_fp, slice_fn = self._slices[k].tolist()
        lesions = sum(
            (volume.lesion_counts(k, self.lesion_iou) for volume in self._volumes),
            LesionCounts(0, 0, 0, 0),
        )
        ap = _coco_ap_encoded(self._coco_slices)
        result: dict[str, float | int] = {
            "score_threshold": float(self.score_thresholds[k]),
            "ap50": ap["ap50"],
            "ap75": ap["ap75"],
            "iou": float(_overlap(tp, tp + fp + fn)),
            "iou_mean": float(np.mean(self._iou, axis=0)[k]),
            "lesion_recall": _ratio(lesions.found, lesions.lesions),
            "lesion_precision": _ratio(lesions.touching, lesions.components),
            "slice_recall": _ratio(slice_tp, slice_tp + slice_fn),
            "slice_precision": _ratio(slice_tp, slice_tp + slice_fp),
            "dice": float(self.dice_by_threshold()[k]),
            "dice_pooled": float(_overlap(2 * tp, 2 * tp + fp + fn)),
            "ece": _ece_from_bins(self._calibration[k]),
        }
        for name, errors in self._volume_errors.items():
            key = "volume_mae_ml" if name == "total" else f"volume_mae_ml_{name}"
            result[key] = float(np.mean(errors, axis=0)[k])
        result |= {
            "n_volumes": len(self._dice),
            "n_lesions": lesions.lesions,
            "n_predicted_lesions": lesions.components,
            "n_truth_instances": slice_tp + slice_fn,
            "n_predicted_instances": slice_tp + slice_fp,
            "n_detections": self._detections,
        }
        return result
