"""Readers' rectangles as voxel maps, and their agreement (the paper's step 1).

A KIMRISS reader marks grid regions on a bone; each region is a rectangle on one slice
(``Annotation``: rows ``y0:y1``, columns ``x0:x1``, exclusive ends). Every method in
``bmlseg.labels`` starts from the per-reader maps built here, so they all see the same input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bmlseg.data.format import Annotation, Case


def reader_maps(
    annotations: Sequence[Annotation],
    readers: Sequence[str],
    shape: tuple[int, int, int],
    bone_labels: dict[str, int],
    *,
    bones: np.ndarray | None = None,
) -> np.ndarray:
    """Union of each reader's rectangles: ``[R, S, H, W]`` bool, one map per listed reader.

    A reader listed in ``readers`` who drew nothing gets an empty map (they still rated the scan).
    With ``bones`` (``[S, H, W]`` labels), a rectangle only covers the voxels of the bone it was
    drawn on: the KIMRISS grid is laid over one bone, and its squares reaching into a
    neighbouring bone or the joint space say nothing about them.

    Raises:
        ValueError: a row names a reader not in ``readers`` or a bone not in ``bone_labels``, or
            its slice or rectangle lies outside ``shape`` or is empty.
    """
    index = {reader: i for i, reader in enumerate(readers)}
    maps = np.zeros((len(readers), *shape), dtype=bool)
    for row in annotations:
        _check_row(row, index, shape, bone_labels)
        window = (row.slice, slice(row.y0, row.y1), slice(row.x0, row.x1))
        covered = True if bones is None else bones[window] == bone_labels[row.bone]
        maps[(index[row.reader], *window)] |= covered
    return maps


def rater_agreement(
    annotations: Sequence[Annotation],
    readers: Sequence[str],
    shape: tuple[int, int, int],
    bone_labels: dict[str, int],
    *,
    bones: np.ndarray | None = None,
) -> np.ndarray:
    """Share of the scan's readers whose rectangles cover each voxel: ``[S, H, W]`` float32.

    The denominator is ``len(readers)``: everyone who rated the scan, including readers who
    drew nothing. A reader counts once per voxel however many of their rectangles overlap.
    ``bones`` restricts each rectangle to its own bone, as in ``reader_maps``.
    """
    if not readers:
        raise ValueError("no readers given: agreement is normalized by the readers who rated it")
    maps = reader_maps(annotations, readers, shape, bone_labels, bones=bones)
    return (maps.sum(axis=0, dtype=np.float32) / np.float32(len(readers))).astype(np.float32)


def _check_row(
    row: Annotation,
    reader_index: dict[str, int],
    shape: tuple[int, int, int],
    bone_labels: dict[str, int],
) -> None:
    where = f"annotation of case {row.case!r} by reader {row.reader!r} on slice {row.slice}"
    if row.reader not in reader_index:
        raise ValueError(
            f"{where}: reader {row.reader!r} is not among the case's readers "
            f"{sorted(reader_index)} in dataset.json"
        )
    if row.bone not in bone_labels:
        raise ValueError(f"{where}: bone {row.bone!r} is not one of {sorted(bone_labels)}")
    slices, height, width = shape
    if not 0 <= row.slice < slices:
        raise ValueError(f"{where}: slice must lie in [0, {slices}), the volume's slices")
    if not (0 <= row.x0 < row.x1 <= width and 0 <= row.y0 < row.y1 <= height):
        raise ValueError(
            f"{where}: rectangle x0={row.x0}, y0={row.y0}, x1={row.x1}, y1={row.y1} must satisfy "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (x1, y1 exclusive)"
        )


def case_readers(case: Case) -> tuple[str, ...]:
    """The readers who rated ``case``; a case without any cannot be labelled from ratings."""
    if not case.record.readers:
        raise ValueError(f"case {case.record.id!r}: dataset.json lists no readers for it")
    return case.record.readers


def case_reader_maps(case: Case, bone_labels: dict[str, int]) -> np.ndarray:
    """``reader_maps`` of ``case``, each rectangle kept to its own bone: ``[R, S, H, W]`` bool."""
    return reader_maps(
        case.annotations, case_readers(case), case.image.shape, bone_labels, bones=case.bones
    )
