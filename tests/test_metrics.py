"""Metrics against hand-computed values and against pycocotools run directly."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmlseg.metrics import (
    SCORE_GRID,
    LesionCounts,
    VolumeMetrics,
    bml_volume_ml,
    coco_mask_ap,
    connected_instances,
    connected_lesions,
    dice,
    expected_calibration_error,
    lesion_counts,
    match_instances,
    probability_maps,
)


def box_mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def stack(*masks: np.ndarray, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, *shape), dtype=bool)


# Dice ---------------------------------------------------------------------------------------


def test_dice_hand_case():
    prediction = np.array([1, 1, 1, 0, 0], dtype=bool)
    truth = np.array([0, 0, 1, 1, 0], dtype=bool)
    # TP = 1, FP = 2, FN = 1: 2 / (2 + 2 + 1)
    assert dice(prediction, truth) == pytest.approx(0.4)


def test_dice_empty_cases():
    empty = np.zeros((2, 3, 3), dtype=bool)
    full = np.ones((2, 3, 3), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


# Instances and matching ----------------------------------------------------------------------


def test_connected_instances_are_eight_connected():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one instance
    mask[4:6, 4:6] = True
    instances = connected_instances(mask)
    assert instances.shape == (2, 6, 6)
    assert instances.dtype == bool
    assert instances[0].sum() == 2 and instances[0, 0, 0] and instances[0, 1, 1]
    assert instances[1].sum() == 4
    assert connected_instances(np.zeros((6, 6), bool)).shape == (0, 6, 6)


def test_match_instances_hand_case():
    shape = (10, 10)
    truth_mask = box_mask(shape, slice(0, 1), slice(0, 4)) | box_mask(
        shape, slice(6, 8), slice(6, 8)
    )
    truth = connected_instances(truth_mask)
    # Hit: columns 1..4 of row 0 against truth columns 0..3: I = 3, U = 5, IoU = 0.6.
    hit = box_mask(shape, slice(0, 1), slice(1, 5))
    false_positive = box_mask(shape, slice(4, 5), slice(0, 2))
    matching = match_instances(stack(false_positive, hit), truth)
    assert (matching.tp, matching.fp, matching.fn) == (1, 1, 1)
    assert matching.ious == [pytest.approx(0.6)]


def test_match_instances_is_one_to_one_by_descending_iou():
    shape = (10, 10)
    truth = stack(box_mask(shape, slice(0, 1), slice(0, 10)))
    loose = box_mask(shape, slice(0, 1), slice(0, 6))  # IoU 0.6
    tight = box_mask(shape, slice(0, 1), slice(0, 9))  # IoU 0.9
    matching = match_instances(stack(loose, tight), truth)
    assert (matching.tp, matching.fp, matching.fn) == (1, 1, 0)
    assert matching.ious == [pytest.approx(0.9)]
    below = match_instances(stack(loose), truth, iou_threshold=0.75)
    assert (below.tp, below.fp, below.fn, below.ious) == (0, 1, 1, [])


# Lesions ------------------------------------------------------------------------------------


def test_connected_lesions_are_26_connected():
    volume = np.zeros((3, 4, 4), dtype=bool)
    volume[0, 0, 0] = volume[1, 1, 1] = True  # corner neighbours across slices: one lesion
    volume[2, 3, 3] = True  # two slices from the first voxel: another
    labels, count = connected_lesions(volume)
    assert count == 2
    assert labels[0, 0, 0] == labels[1, 1, 1] != labels[2, 3, 3]


def cuboid(shape, slices: slice, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices, rows, cols] = True
    return mask


def test_lesion_counts_hit_miss_and_false_positive():
    shape = (4, 12, 12)
    hit = cuboid(shape, slice(0, 2), slice(1, 4), slice(1, 4))
    miss = cuboid(shape, slice(2, 4), slice(8, 11), slice(8, 11))
    false_positive = cuboid(shape, slice(0, 2), slice(8, 11), slice(1, 4))
    # The hit is predicted one column short: IoU 12 / 18, found.
    prediction = cuboid(shape, slice(0, 2), slice(1, 4), slice(1, 3)) | false_positive
    counts = lesion_counts(prediction, hit | miss)
    assert counts == LesionCounts(found=1, lesions=2, touching=1, components=2)
    # lesion_recall = found / lesions, lesion_precision = touching / components.
    assert (counts.found / counts.lesions, counts.touching / counts.components) == (0.5, 0.5)


def test_a_lesion_is_found_by_the_union_of_the_components_touching_it():
    shape = (1, 1, 24)
    lesion = cuboid(shape, slice(0, 1), slice(0, 1), slice(0, 20))
    # Two one-voxel components: IoU 1/20 each, 2/20 together, which is LESION_IOU.
    two = cuboid(shape, slice(0, 1), slice(0, 1), slice(0, 1))
    two |= cuboid(shape, slice(0, 1), slice(0, 1), slice(10, 11))
    assert lesion_counts(two, lesion) == LesionCounts(1, 1, 2, 2)
    # One voxel touches the lesion without finding it: not found, yet no false positive.
    one = cuboid(shape, slice(0, 1), slice(0, 1), slice(0, 1))
    assert lesion_counts(one, lesion) == LesionCounts(0, 1, 1, 1)
    # A component that also spills outside the lesion counts with all its voxels: 20 / 24.
    spill = cuboid(shape, slice(0, 1), slice(0, 1), slice(0, 24))
    assert lesion_counts(spill, lesion, iou_threshold=20 / 24) == LesionCounts(1, 1, 1, 1)
    assert lesion_counts(np.zeros(shape, bool), lesion) == LesionCounts(0, 1, 0, 0)


# Calibration --------------------------------------------------------------------------------


def test_ece_two_bins_hand_case():
    probability = np.array([0.1, 0.1, 0.9, 0.9, 0.9])
    truth = np.array([0, 1, 1, 1, 0], dtype=bool)
    region = np.array([1, 1, 1, 1, 0], dtype=bool)
    # Inside region: bin [0, .5): conf .1, acc .5 (gap .4); bin [.5, 1]: conf .9, acc 1 (gap .1).
    assert expected_calibration_error(probability, truth, region, n_bins=2) == pytest.approx(0.25)
    # Everywhere: gaps .4 (2 voxels) and |2/3 - .9| (3 voxels).
    expected = 2 / 5 * 0.4 + 3 / 5 * (0.9 - 2 / 3)
    assert expected_calibration_error(probability, truth, n_bins=2) == pytest.approx(expected)


def test_ece_edges():
    certain = np.array([0.0, 1.0])
    assert expected_calibration_error(certain, np.array([False, True])) == 0.0
    assert expected_calibration_error(certain, np.array([True, False])) == 1.0
    assert math.isnan(expected_calibration_error(certain, certain > 0, np.zeros(2, bool)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([1.5]), np.array([True]))


# Volume -------------------------------------------------------------------------------------


def test_bml_volume_per_bone():
    bones = np.zeros((2, 4, 4), dtype=np.uint8)
    bones[:, :2] = 1
    bones[:, 2:] = 2
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 0, :3] = True  # 3 voxels on bone 1
    mask[1, 3, 0] = True  # 1 voxel on bone 2
    names = {1: "femur", 2: "tibia", 3: "patella"}
    volumes = bml_volume_ml(mask, 0.5, bones, names)
    assert volumes == {"total": 2.0, "femur": 1.5, "tibia": 0.5, "patella": 0.0}
    assert bml_volume_ml(mask, 0.5) == {"total": 2.0}
    assert bml_volume_ml(mask, 0.5, bones) == {"total": 2.0, "bone_1": 1.5, "bone_2": 0.5}


# COCO AP ------------------------------------------------------------------------------------


def reference_ap(predictions, truths) -> tuple[float, float]:
    """AP50/AP75 from pycocotools, with the COCO dicts built here, independently of the module."""
    images, annotations, results = [], [], []
    for image_id, ((masks, scores), truth) in enumerate(
        zip(predictions, truths, strict=True), start=1
    ):
        images.append({"id": image_id, "height": truth.shape[1], "width": truth.shape[2]})
        for mask in truth:
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                }
            )
        for mask, score in zip(masks, scores, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            results.append(
                {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth_coco = COCO()
        truth_coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "lesion"}],
        }
        truth_coco.createIndex()
        evaluation = COCOeval(truth_coco, truth_coco.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1]), float(evaluation.stats[2])


def square(top: int, left: int, size: int = 4, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return box_mask(shape, slice(top, top + size), slice(left, left + size))


def test_coco_ap_matches_pycocotools_run_directly():
    truths = [stack(square(0, 0), square(8, 8)), stack(square(0, 8)), stack()]
    predictions = [
        (stack(square(0, 0), square(4, 4), square(8, 9)), np.array([0.9, 0.8, 0.3])),
        (stack(square(1, 8)), np.array([0.7])),  # IoU 12/20 = 0.6
        (stack(square(10, 10)), np.array([0.6])),  # slice without truth
    ]
    expected_ap50, expected_ap75 = reference_ap(predictions, truths)
    ap = coco_mask_ap(predictions, truths)
    assert 0.0 < expected_ap75 < expected_ap50 < 1.0
    assert ap["ap50"] == pytest.approx(expected_ap50)
    assert ap["ap75"] == pytest.approx(expected_ap75)


def test_coco_ap_perfect_and_shifted():
    truths = [stack(square(2, 2, size=10))]
    perfect = coco_mask_ap([(truths[0], np.array([0.9]))], truths)
    assert perfect == {"ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}
    # Shifted by 2 columns: IoU 80 / 120 = 0.67, a hit at 0.5 but not at 0.75.
    shifted = coco_mask_ap([(stack(square(2, 4, size=10)), np.array([0.9]))], truths)
    assert shifted == {"ap50": pytest.approx(1.0), "ap75": pytest.approx(0.0)}


def test_coco_ap_without_truth_or_predictions():
    truths = [stack(square(0, 0))]
    no_predictions = coco_mask_ap([(stack(), np.zeros(0))], truths)
    assert no_predictions == {"ap50": 0.0, "ap75": 0.0}
    no_truth = coco_mask_ap([(stack(square(0, 0)), np.array([0.5]))], [stack()])
    assert math.isnan(no_truth["ap50"]) and math.isnan(no_truth["ap75"])


def test_coco_ap_rejects_score_count_mismatch():
    with pytest.raises(ValueError, match="1 predicted masks but 2 scores"):
        coco_mask_ap([(stack(square(0, 0)), np.array([0.5, 0.4]))], [stack()])


# Probability maps ---------------------------------------------------------------------------


def test_probability_maps_take_the_maximum_over_the_detections_at_each_threshold():
    masks = np.array([[[0.2, 0.9]], [[0.7, 0.1]], [[0.4, 0.4]]], dtype=np.float32)
    scores = np.array([0.3, 0.8, 0.5])
    maps = probability_maps(masks, scores, [0.1, 0.5, 0.6, 0.9])
    expected = [[[0.7, 0.9]], [[0.7, 0.4]], [[0.7, 0.1]], [[0.0, 0.0]]]
    np.testing.assert_allclose(maps, expected)
    assert maps.shape == (4, 1, 2) and maps.dtype == np.float32


# VolumeMetrics ------------------------------------------------------------------------------

NAMES = {1: "femur", 2: "tibia", 3: "patella"}


def no_detections(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, *shape)), np.zeros(0)


def test_volume_metrics_end_to_end():
    shape = (8, 8)
    bones = np.zeros((2, *shape), dtype=np.uint8)
    bones[:, :4] = 1  # femur: rows 0..3
    bones[:, 4:] = 2  # tibia: rows 4..7
    found = box_mask(shape, slice(1, 3), slice(1, 3))  # slice 0, femur
    missed = box_mask(shape, slice(5, 7), slice(5, 7))  # slice 1, tibia
    false_positive = box_mask(shape, slice(1, 3), slice(5, 7))  # slice 1, femur
    truth = np.stack([found, missed])
    # The hit's mask is 0.8 on the lesion and 0.3, under the mask threshold, on the row above.
    hit = 0.8 * found + 0.3 * box_mask(shape, slice(0, 1), slice(1, 3))
    detections = [(hit[None], np.array([0.9])), (0.6 * false_positive[None], np.array([0.6]))]

    metrics = VolumeMetrics([0.5], mask_threshold=0.5)
    metrics.add("s000_t0", detections, truth, bones, 0.01, NAMES)
    # A second volume with nothing in it and no bone: Dice and IoU 1, no ECE voxel, no error.
    empty = np.zeros((1, *shape), dtype=bool)
    metrics.add("s001_t0", [no_detections(shape)], empty, empty.astype(np.uint8), 0.01, NAMES)

    summary = metrics.summary()
    assert summary["score_threshold"] == 0.5
    # First volume: 8 voxels predicted, 8 true, 4 of them both.
    assert summary["dice"] == pytest.approx((8 / 16 + 1) / 2)
    assert summary["iou_mean"] == pytest.approx((4 / 12 + 1) / 2)
    assert summary["dice_pooled"] == pytest.approx(8 / 16)
    assert summary["iou"] == pytest.approx(4 / 12)
    # Lesions: the found one and the missed one; components: the hit and the false positive.
    assert summary["lesion_recall"] == pytest.approx(0.5)
    assert summary["lesion_precision"] == pytest.approx(0.5)
    assert summary["slice_recall"] == pytest.approx(0.5)
    assert summary["slice_precision"] == pytest.approx(0.5)
    # Ranked: hit (0.9), false positive (0.6); recall stops at 1/2, where precision is 1:
    # 51 of COCO's 101 recall points have precision 1.
    assert summary["ap50"] == pytest.approx(51 / 101)
    assert summary["ap75"] == pytest.approx(51 / 101)
    # 128 bone voxels: 4 at 0.8 all BML (gap .2), 2 at 0.3 none BML (.3), 4 at 0.6 none BML
    # (.6), 118 at 0 of which 4 BML (4 / 118).
    expected_ece = (4 * 0.2 + 2 * 0.3 + 4 * 0.6 + 118 * 4 / 118) / 128
    assert summary["ece"] == pytest.approx(expected_ece)
    # Totals agree (8 voxels each); femur 8 vs 4 voxels and tibia 0 vs 4 in the first volume.
    assert summary["volume_mae_ml"] == pytest.approx(0.0)
    assert summary["volume_mae_ml_femur"] == pytest.approx(0.02)
    assert summary["volume_mae_ml_tibia"] == pytest.approx(0.02)
    assert summary["volume_mae_ml_patella"] == pytest.approx(0.0)
    counts = {key: value for key, value in summary.items() if key.startswith("n_")}
    assert counts == {
        "n_volumes": 2,
        "n_lesions": 2,
        "n_predicted_lesions": 2,
        "n_truth_instances": 2,
        "n_predicted_instances": 2,
        "n_detections": 2,
    }


def test_ap_counts_detections_under_the_operating_threshold():
    truth = square(2, 2)[None]
    bones = np.ones((1, 16, 16), dtype=np.uint8)
    metrics = VolumeMetrics([0.5], mask_threshold=0.5)
    # The only detection is perfect but scores 0.3: AP ranks it, the operating threshold drops it.
    metrics.add("s000_t0", [(square(2, 2)[None], np.array([0.3]))], truth, bones, 1.0, NAMES)
    summary = metrics.summary()
    assert summary["ap50"] == pytest.approx(1.0)
    assert summary["ap75"] == pytest.approx(1.0)
    assert summary["dice"] == 0.0 and summary["slice_recall"] == 0.0
    assert math.isnan(summary["slice_precision"]) and math.isnan(summary["lesion_precision"])
    assert summary["n_detections"] == 1 and summary["n_predicted_instances"] == 0


def test_pooled_iou_weighs_voxels_and_can_fall_below_one_half():
    bones = np.ones((1, 16, 16), dtype=np.uint8)
    metrics = VolumeMetrics([0.5], mask_threshold=0.5)
    # A small lesion found exactly, then a large one (36 voxels) missed entirely.
    metrics.add(
        "small",
        [(square(0, 0, 2)[None], np.array([0.9]))],
        square(0, 0, 2)[None],
        bones,
        1.0,
        NAMES,
    )
    metrics.add("large", [no_detections((16, 16))], square(0, 0, 6)[None], bones, 1.0, NAMES)
    summary = metrics.summary()
    assert summary["iou"] == pytest.approx(4 / 40)
    assert summary["dice_pooled"] == pytest.approx(8 / 44)
    assert summary["iou_mean"] == pytest.approx(0.5)
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["lesion_recall"] == pytest.approx(0.5)


def test_the_operating_threshold_is_the_one_with_the_best_mean_dice():
    truth = square(0, 0)[None]
    bones = np.ones((1, 16, 16), dtype=np.uint8)
    # The lesion's detection scores 0.7, a false positive 0.3.
    masks = stack(square(0, 0), square(8, 8)).astype(np.float32)
    metrics = VolumeMetrics(SCORE_GRID, mask_threshold=0.5)
    metrics.add("s000_t0", [(masks, np.array([0.7, 0.3]))], truth, bones, 1.0, NAMES)
    grid = np.array(SCORE_GRID)
    expected = np.where(grid <= 0.3, 2 * 16 / 48, np.where(grid <= 0.7, 1.0, 0.0))
    np.testing.assert_allclose(metrics.dice_by_threshold(), expected)
    summary = metrics.summary()
    # Dice is 1 from 0.35 to 0.7; ties go to the lowest threshold.
    assert summary["score_threshold"] == 0.35
    assert summary["dice"] == 1.0
    assert summary["slice_precision"] == 1.0 and summary["lesion_precision"] == 1.0
    assert summary["ap50"] == pytest.approx(1.0)


def test_volume_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="increase within"):
        VolumeMetrics([0.5, 0.3], mask_threshold=0.5)
    metrics = VolumeMetrics([0.5], mask_threshold=0.5)
    with pytest.raises(ValueError, match="no volume"):
        metrics.summary()
    volume = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="s000_t0: 1 slices of detections for 2 slices"):
        metrics.add(
            "s000_t0", [no_detections((4, 4))], volume, volume.astype(np.uint8), 1.0, {1: "femur"}
        )
    with pytest.raises(ValueError, match=r"s000_t0: slice 0: masks \(1, 4, 4\) for 2 scores"):
        metrics.add(
            "s000_t0",
            [(np.zeros((1, 4, 4)), np.array([0.5, 0.6]))],
            volume,
            volume.astype(np.uint8),
            1.0,
            {1: "femur"},
        )
