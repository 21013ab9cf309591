"""A PNG preview of a dataset folder's case (:func:`save_preview`): a few slices with the bone
proxy, the truth and every reader's rectangles. Reads the folder only, through the format loaders.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bmlseg.data.format import load_case, load_dataset
from bmlseg.io import atomic_path


def save_preview(
    root: str | os.PathLike,
    case_id: str,
    path: str | os.PathLike,
    slices: list[int] | None = None,
) -> Path:
    """Save a PNG of a few slices of a case with bones, truth and every reader's rectangles.

    ``slices`` defaults to up to four slices holding the most truth voxels (or rectangles, or
    evenly spaced ones when the case has neither).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    info, annotations = load_dataset(root)
    case = load_case(root, case_id, info=info, annotations=annotations)
    slices = list(slices) if slices is not None else _preview_slices(case)
    readers = case.record.readers
    colours = {reader: f"C{index % 10}" for index, reader in enumerate(readers)}
    aspect = case.geometry.spacing[1] / case.geometry.spacing[0]

    figure = Figure(figsize=(3.2 * len(slices), 3.6), dpi=90, layout="constrained")
    axes = figure.subplots(1, len(slices), squeeze=False)[0]
    ceiling = float(np.percentile(case.image, 99.5)) or 1.0
    for axis, index in zip(axes, slices, strict=True):
        # Pixel coordinates throughout: pixel (row, column) is centred on (y, x) = (row, column).
        axis.imshow(case.image[index], cmap="gray", vmin=0, vmax=ceiling, aspect=aspect)
        for label in info.bones:
            bone = case.bones[index] == label
            if bone.any():
                axis.contour(bone.astype(float), levels=[0.5], colors=["#4fc3f7"], linewidths=0.6)
        if case.mask is not None and case.mask[index].any():
            truth = case.mask[index].astype(float)
            axis.contourf(truth, levels=[0.5, 1.5], colors=["#ff1744"], alpha=0.45)
        for row in case.annotations:
            if row.slice == index:
                axis.add_patch(
                    Rectangle(
                        (row.x0 - 0.5, row.y0 - 0.5),
                        row.x1 - row.x0,
                        row.y1 - row.y0,
                        fill=False,
                        edgecolor=colours.get(row.reader, "yellow"),
                        linewidth=0.8,
                    )
                )
        axis.set_title(f"{case_id} slice {index}", fontsize=8)
        axis.set_axis_off()
    handles = [Line2D([], [], color="#4fc3f7", label="bone proxy")]
    handles += [Line2D([], [], color="#ff1744", linewidth=4, alpha=0.45, label="BML truth")]
    handles += [Line2D([], [], color=colours[reader], label=reader) for reader in readers]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)

    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def _preview_slices(case, count: int = 4) -> list[int]:
    """Up to ``count`` slices with the most truth voxels, else rectangles, else evenly spaced."""
    slices = case.image.shape[0]
    if case.mask is not None and case.mask.any():
        weight = case.mask.sum(axis=(1, 2)).astype(float)
    else:
        weight = np.bincount([row.slice for row in case.annotations], minlength=slices)
    if not np.any(weight):
        return sorted({int(v) for v in np.linspace(0, slices - 1, count + 2)[1:-1].round()})
    ranked = np.argsort(-weight, kind="stable")[:count]
    return sorted(int(index) for index in ranked if weight[index] > 0)
