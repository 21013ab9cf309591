"""bmlseg.engine.evaluate with a stub model whose detections are known: the score floor, the
threshold chosen on the evaluated cases, the probability map shown and predicted, and the
reference scored against (masks/ or a label's confident cores)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bmlseg.data.format import load_case, read_dataset_json, softlabel_path
from bmlseg.data.grid import ModelGrid
from bmlseg.data.instances import InstanceOptions, label_instances, masks_to_boxes
from bmlseg.engine.evaluate import (
    TRUTH,
    InferenceSettings,
    Reference,
    evaluate_cases,
    infer_volume,
    split_cases,
)
from bmlseg.io import read_volume
from bmlseg.labels import generate
from bmlseg.metrics import SCORE_GRID, connected_instances, connected_lesions

CROP = 64
GRID = ModelGrid("PIR", 1.25, CROP)  # the small phantom's grid


class StubDetector(nn.Module):
    """On every slice: a square scoring 0.8 and another scoring 0.3, both with mask 0.9; keeps
    those at or above ``roi_heads.score_thresh``, as torchvision's RoI heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.roi_heads = SimpleNamespace(score_thresh=0.05)
        self.floors: list[float] = []

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.floors.append(self.roi_heads.score_thresh)
        masks = torch.zeros(2, 1, CROP, CROP)
        masks[0, 0, 20:40, 20:40] = 0.9
        masks[1, 0, 0:8, 0:8] = 0.9
        scores = torch.tensor([0.8, 0.3])
        kept = scores >= self.roi_heads.score_thresh
        return [{"masks": masks[kept], "scores": scores[kept]} for _ in images]


def evaluate(
    root: Path,
    score_threshold: float | None,
    model: nn.Module | None = None,
    reference: Reference = TRUTH,
):
    cases = split_cases(read_dataset_json(root), "test")
    settings = InferenceSettings(score_threshold=score_threshold, mask_threshold=0.5, batch_size=4)
    return evaluate_cases(
        model or StubDetector(),
        root,
        cases,
        grid=GRID,
        device=torch.device("cpu"),
        settings=settings,
        preview_slices=2,
        reference=reference,
    )


def test_the_chosen_threshold_is_the_best_of_the_fixed_ones(synthetic_root: Path):
    model = StubDetector()
    chosen, examples = evaluate(synthetic_root, None, model)
    # Every detection down to min_score reaches the metrics; the model's own floor comes back.
    assert set(model.floors) == {0.05} and model.roi_heads.score_thresh == 0.05
    slices = chosen["n_detections"] // 2
    assert chosen["n_detections"] == 2 * slices > 0
    # The stub's detections make three different predictions: at 0.05 (both), 0.5 (the 0.8
    # one) and 0.85 (none). The chosen threshold has the best mean Dice of the three.
    fixed = {threshold: evaluate(synthetic_root, threshold)[0] for threshold in (0.05, 0.5, 0.85)}
    best = max(fixed, key=lambda threshold: fixed[threshold]["dice"])
    assert chosen["dice"] == pytest.approx(fixed[best]["dice"])
    assert chosen["score_threshold"] in SCORE_GRID
    for key in ("iou", "lesion_recall", "slice_recall", "ece", "volume_mae_ml"):
        assert chosen[key] == pytest.approx(fixed[best][key], nan_ok=True), key
    # AP ranks every detection whatever the operating threshold.
    assert fixed[0.85]["ap50"] == pytest.approx(chosen["ap50"], nan_ok=True)
    assert fixed[0.85]["n_predicted_instances"] == 0
    assert fixed[0.5]["n_predicted_instances"] == slices

    # The figure shows the probability map at the chosen threshold, as infer_volume makes it.
    assert len(examples) == 2
    case_id, index = examples[0].title.split(" slice ")
    case = load_case(synthetic_root, case_id)
    settings = InferenceSettings(chosen["score_threshold"], mask_threshold=0.5, batch_size=4)
    probability = infer_volume(
        model,
        case.image,
        case.bones,
        case.geometry,
        grid=GRID,
        device=torch.device("cpu"),
        settings=settings,
    )
    np.testing.assert_array_equal(examples[0].probability, probability[int(index)])
    # infer_volume spares the mask head the detections under the threshold.
    assert model.floors[-1] == chosen["score_threshold"]


def test_without_masks_the_reference_is_the_instances_training_cuts(synthetic_root, tmp_path):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    shutil.rmtree(root / "masks")
    cases = split_cases(read_dataset_json(root), "test")
    generate(root, "kimriss", cases=cases)
    with pytest.raises(FileNotFoundError, match=rf"{root}/masks/{cases[0]}.nii.gz: missing"):
        evaluate(root, 0.5)

    options = InstanceOptions(threshold=0.5, min_area_mm2=8.0)
    reference = Reference("kimriss", options)
    assert str(reference) == "labels:kimriss>=0.5,area>=8mm2"
    lesions = 0
    for case_id in cases:
        case = load_case(root, case_id)
        label, _ = read_volume(softlabel_path(root, "kimriss", case_id))
        volume = reference.volume(root, case)
        pixel_area = case.geometry.spacing[0] * case.geometry.spacing[1]
        # Slice by slice, the reference's components are the cores training boxes.
        for index in range(len(label)):
            boxes, _ = label_instances(label[index], options, pixel_area)
            found = masks_to_boxes(connected_instances(volume[index]))
            assert sorted(map(tuple, found)) == sorted(map(tuple, boxes)), (case_id, index)
        # Speckle under the minimum area is left out; without a minimum the cut is the label's.
        assert volume.sum() < (label >= 0.5).sum()
        whole = Reference("kimriss", InstanceOptions(threshold=0.5, min_area_mm2=0.0))
        np.testing.assert_array_equal(whole.volume(root, case), label >= 0.5)
        lesions += connected_lesions(volume)[1]

    scores, examples = evaluate(root, 0.5, reference=reference)
    assert lesions > 0 and scores["n_lesions"] == lesions
    assert len(examples) == 2 and all(example.truth.any() for example in examples)
