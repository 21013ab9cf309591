"""How close each method's labels come to the pixelwise truth (``masks/``), before any training.

Scores per case, then averaged over the cases that have a mask:

- soft Dice: 2 sum(y t) / (sum y + sum t);
- Brier score: mean (y - t)^2 over bone voxels;
- recall: share of true BML voxels with y > 0.5;
- mass outside truth: sum of y outside the truth / sum y.

Soft Dice and recall are averaged over the cases whose truth holds BML: on a case without any,
an empty label would score a perfect Dice and the mean would reward labelling nothing. Mass
outside truth leaves out the cases whose label is empty (0 / 0).

And what the detector is taught: the label's training instances (bmlseg.data.instances), slice
by slice, against the truth's lesions (8-connected components of each truth slice), counted over
all cases:

- boxes matching a lesion: share of instance boxes with box IoU >= 0.5 with a truth lesion's box;
- lesions matched: share of truth lesions with box IoU >= 0.5 with some instance box;
- instances per slice: instances per slice that holds at least one.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from bmlseg.data.format import (
    Case,
    load_case,
    load_dataset,
    mask_path,
    softlabel_path,
)
from bmlseg.data.instances import (
    InstanceOptions,
    box_iou,
    label_instances,
    masks_to_boxes,
)
from bmlseg.io import atomic_path, read_volume, write_text_atomic
from bmlseg.labels.files import generate, recorded_options
from bmlseg.metrics import connected_instances

SCORES = ("soft_dice", "brier", "recall", "mass_outside_truth")
INSTANCE_SCORES = ("boxes_matching_lesion", "lesions_matched", "instances_per_slice")
HEADINGS = {
    "method": "method",
    "cases": "cases",
    "soft_dice": "soft Dice",
    "brier": "Brier (bone)",
    "recall": "recall (y > 0.5)",
    "mass_outside_truth": "mass outside truth",
    "instances": "instances",
    "boxes_matching_lesion": "boxes matching a lesion",
    "lesions_matched": "lesions matched",
    "instances_per_slice": "instances per slice",
}
# A training box "is" a lesion at the IoU at which a detection counts in AP50.
BOX_MATCH_IOU = 0.5


def instance_counts(
    label: np.ndarray, truth: np.ndarray, options: InstanceOptions, pixel_area_mm2: float
) -> dict[str, int]:
    """Training instances of ``label`` against the lesions of ``truth`` (both ``[S, H, W]``).

    Returns:
        ``instances`` (boxes), ``matching`` (boxes with box IoU >= 0.5 with a lesion),
        ``lesions`` (truth components, per slice), ``matched`` (lesions with such a box) and
        ``slices`` (slices with at least one instance).
    """
    counts = dict.fromkeys(("instances", "matching", "lesions", "matched", "slices"), 0)
    for label_slice, truth_slice in zip(label, truth, strict=True):
        boxes, _ = label_instances(label_slice, options, pixel_area_mm2)
        lesion_boxes = masks_to_boxes(connected_instances(truth_slice > 0))
        overlap = box_iou(boxes, lesion_boxes) >= BOX_MATCH_IOU
        counts["instances"] += len(boxes)
        counts["matching"] += int(overlap.any(axis=1).sum())
        counts["lesions"] += len(lesion_boxes)
        counts["matched"] += int(overlap.any(axis=0).sum())
        counts["slices"] += int(len(boxes) > 0)
    return counts


def label_scores(label: np.ndarray, truth: np.ndarray, bone: np.ndarray) -> dict[str, float]:
    """The four scores of one case's ``label`` against ``truth`` (both ``[S, H, W]``).

    A score that is undefined on this case (see the module's docstring) is NaN.
    """
    label = label.astype(np.float64)
    truth = truth.astype(bool)
    overlap = label[truth].sum()
    mass = label.sum()
    total = mass + truth.sum()
    has_bml = truth.any()
    return {
        "soft_dice": 2.0 * overlap / total if has_bml else float("nan"),
        "brier": float(np.mean((label[bone] - truth[bone]) ** 2)) if bone.any() else 0.0,
        "recall": float(np.mean(label[truth] > 0.5)) if has_bml else float("nan"),
        "mass_outside_truth": (mass - overlap) / mass if mass > 0 else float("nan"),
    }


def evaluate(
    root: str | os.PathLike,
    methods: Sequence[str],
    *,
    out_dir: str | os.PathLike,
    instances: InstanceOptions | None = None,
) -> list[dict]:
    """Score ``methods``' labels against ``root/masks/``; write a table, a CSV and a figure.

    Instances are cut with ``instances`` (None: InstanceOptions' defaults). Labels missing
    or stale (bmlseg.labels.generate) under ``softlabels/<method>/`` are made first with the
    options recorded there (defaults for a new method). Writes ``label_quality.md``, ``label_quality.csv`` and
    ``label_quality.png`` (one slice: the image with the truth's outline, each method's label).

    Returns:
        One row per method: ``{"method", "cases", "soft_dice", "brier", "recall",
        "mass_outside_truth", "instances", "boxes_matching_lesion", "lesions_matched",
        "instances_per_slice"}``; ``cases`` counts the cases with a mask, each label score is
        averaged over those where it is defined, the instance figures are pooled over them.
    """
    if not methods:
        raise ValueError("evaluate needs at least one label method")
    instances = instances or InstanceOptions()
    info, annotations = load_dataset(root)
    case_ids = [record.id for record in info.cases if mask_path(root, record.id).exists()]
    if not case_ids:
        raise ValueError(f"{root}: no case has a masks/<id>.nii.gz ground truth to score against")
    for method in methods:
        # Makes the labels missing or stale, keeps the others.
        generate(root, method, cases=case_ids, **recorded_options(root, method))
    figures: dict[str, list[tuple[dict, dict]]] = {method: [] for method in methods}
    example = None
    for case_id in tqdm(case_ids, desc="label quality", unit="case"):
        case = load_case(root, case_id, info=info, annotations=annotations)
        labels = {method: _read_label(root, method, case_id, case.mask.shape) for method in methods}
        for method, label in labels.items():
            figures[method].append(case_figures(label, case, instances))
        if example is None and case.mask.any():
            index = int(np.argmax(case.mask.sum(axis=(1, 2))))
            slices = {method: label[index] for method, label in labels.items()}
            example = (f"{case_id}, slice {index}", case.image[index], case.mask[index], slices)
    rows = [summarize(method, figures[method]) for method in methods]
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "label_quality.md", markdown_table(rows))
    write_text_atomic(out_dir / "label_quality.csv", _csv(rows))
    if example is not None:
        _save_figure(out_dir / "label_quality.png", *example)
    return rows


def case_figures(
    label: np.ndarray, case: Case, instances: InstanceOptions
) -> tuple[dict[str, float], dict[str, int]]:
    """``label_scores`` and ``instance_counts`` of one case's label against its mask."""
    pixel_area_mm2 = case.geometry.spacing[0] * case.geometry.spacing[1]
    return (
        label_scores(label, case.mask, case.bones > 0),
        instance_counts(label, case.mask, instances, pixel_area_mm2),
    )


def summarize(method: str, figures: Sequence[tuple[dict[str, float], dict[str, int]]]) -> dict:
    """One row of the table from the ``case_figures`` of a method's cases: each label score
    averaged over the cases where it is defined, the instance counts pooled."""
    counts: Counter = Counter()
    for _, case_counts in figures:
        counts.update(case_counts)
    return {**_average(method, [scores for scores, _ in figures]), **_instance_figures(counts)}


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows of ``evaluate`` as a markdown table, scores to three decimals."""
    lines = [
        "| " + " | ".join(HEADINGS.values()) + " |",
        "|" + "|".join("---" for _ in HEADINGS) + "|",
    ]
    for row in rows:
        cells = [row["method"], str(row["cases"])] + [f"{row[score]:.3f}" for score in SCORES]
        cells += [str(row["instances"])] + [f"{row[score]:.2f}" for score in INSTANCE_SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _read_label(
    root: str | os.PathLike, method: str, case_id: str, shape: tuple[int, ...]
) -> np.ndarray:
    path = softlabel_path(root, method, case_id)
    label, _ = read_volume(path)
    if label.shape != shape:
        raise ValueError(f"{path}: label of shape {label.shape}, its mask has shape {shape}")
    return label


def _average(method: str, case_scores: list[dict[str, float]]) -> dict:
    """Mean of each score over the cases where it is defined."""
    row: dict = {"method": method, "cases": len(case_scores)}
    for score in SCORES:
        values = np.array([scores[score] for scores in case_scores])
        row[score] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    return row


def _instance_figures(counts: Counter) -> dict:
    """Pooled counts of ``instance_counts`` as the shares in HEADINGS (NaN for 0 / 0)."""
    return {
        "instances": counts["instances"],
        "boxes_matching_lesion": _share(counts["matching"], counts["instances"]),
        "lesions_matched": _share(counts["matched"], counts["lesions"]),
        "instances_per_slice": _share(counts["instances"], counts["slices"]),
    }


def _share(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(HEADINGS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _save_figure(
    path: Path,
    where: str,
    image: np.ndarray,
    truth: np.ndarray,
    labels: dict[str, np.ndarray],
) -> None:
    """Image, then one panel per method; the truth's outline in every panel."""
    rows, columns = np.nonzero(truth)
    margin = max(20, int(np.ptp(rows)), int(np.ptp(columns)))
    window = (
        slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
        slice(max(columns.min() - margin, 0), columns.max() + margin + 1),
    )
    panels = {"image": None, **labels}
    columns_per_row = min(len(panels), 4)
    grid_rows = -(-len(panels) // columns_per_row)
    figure = Figure(figsize=(2.6 * columns_per_row + 0.8, 2.7 * grid_rows), layout="constrained")
    axes = figure.subplots(grid_rows, columns_per_row, squeeze=False).ravel()
    for axis in axes[len(panels) :]:
        axis.set_axis_off()
    for axis, (title, label) in zip(axes, panels.items(), strict=False):
        axis.imshow(image[window], cmap="gray")
        if label is not None:
            # Zero is left transparent so the anatomy under an empty label stays visible.
            visible = np.ma.masked_equal(label[window], 0.0)
            heatmap = axis.imshow(visible, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.8)
        axis.contour(truth[window], levels=[0.5], colors="cyan", linewidths=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_axis_off()
    figure.colorbar(heatmap, ax=axes.tolist(), shrink=0.6, label="label value")
    figure.suptitle(f"{where} (cyan: true BML outline)", fontsize=9)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
