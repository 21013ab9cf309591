"""Simulated KIMRISS readers: the grid over a bone's bounding box on a slice
(:func:`kimriss_grid`), each reader's traits, which cells a reader marks on a scan and how they
err (:class:`~bmlseg.data.synthetic.presets.ReaderNoise`), the annotation rows, and the per-scan
tally (:class:`ScanTally`) the realized noise statistics are computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bmlseg.data.format import Annotation
from bmlseg.data.synthetic.helpers import _rng
from bmlseg.data.synthetic.presets import BONES, MAX_READERS, ReaderNoise
from bmlseg.data.synthetic.render import Scan


def kimriss_grid(bone_mask: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cell edges (rows ``[cells + 1]``, columns ``[cells + 1]``) over a 2D mask's bounding box.

    Edges are integer pixel positions; cell (i, j) spans rows ``ys[i]:ys[i+1]`` and columns
    ``xs[j]:xs[j+1]``. None when the mask is empty.
    """
    rows = np.flatnonzero(bone_mask.any(axis=1))
    columns = np.flatnonzero(bone_mask.any(axis=0))
    if rows.size == 0:
        return None
    steps = np.arange(cells + 1) / cells
    ys = rows[0] + np.round(steps * (rows[-1] + 1 - rows[0])).astype(np.int64)
    xs = columns[0] + np.round(steps * (columns[-1] + 1 - columns[0])).astype(np.int64)
    return ys, xs


@dataclass(frozen=True)
class ReaderTraits:
    offset: float  # log-odds added to every detection probability
    cell_threshold: float  # smallest share of a cell's bone the lesion must cover


Cell = tuple[int, int, int, int]  # (slice, bone, row, column) on the KIMRISS grid


@dataclass
class ScanTally:
    """What :func:`noise_statistics` needs from one scan."""

    truth_voxels: int
    consensus_missed_voxels: int
    readers: int
    reader_missed_voxels: int
    cells: int
    false_cells: int
    lesions: int
    lesion_slices: int
    lesion_slices_missed: int
    blank_readers: int


@dataclass
class ReaderMarks:
    cells: dict[Cell, tuple[int, int, int, int]]  # cell -> (x0, y0, x1, y1)
    lesion_slices_missed: int = 0


def _reader_traits(seed: int, noise: ReaderNoise) -> dict[str, ReaderTraits]:
    """Each reader's own bias, the same on every scan of the dataset."""
    rng = _rng(seed, 0, 1)
    return {
        f"r{number}": ReaderTraits(
            offset=float(rng.normal(0.0, noise.reader_spread)) if noise.reader_spread else 0.0,
            cell_threshold=float(rng.uniform(0.0, noise.max_cell_threshold)),
        )
        for number in range(1, MAX_READERS + 1)
    }


def _draw_readers(rng: np.random.Generator) -> list[str]:
    count = int(rng.integers(2, MAX_READERS + 1))
    chosen = rng.choice(MAX_READERS, size=count, replace=False)
    return [f"r{number + 1}" for number in sorted(chosen)]


def _read_scan(
    scan: Scan,
    traits: ReaderTraits,
    noise: ReaderNoise,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
) -> ReaderMarks | None:
    """One reader's KIMRISS cells on one scan; None for a reader who drew nothing."""
    if rng.uniform() < noise.p_blank:
        return None
    grids = _GridCache(scan.labels, noise.grid_cells)
    marks = ReaderMarks(cells={})
    pixel_mm2 = spacing[0] * spacing[1]
    for lesion in scan.lesion_masks:
        overlooked = rng.uniform() < noise.p_miss_lesion
        present = np.flatnonzero(lesion.voxels.any(axis=(1, 2)))
        for position, local in enumerate(present):
            index = lesion.offset[0] + int(local)
            rows, columns = np.nonzero(lesion.voxels[local])
            rows, columns = rows + lesion.offset[1], columns + lesion.offset[2]
            # A lesion's first and last slices, when it spans three or more.
            end = len(present) >= 3 and position in (0, len(present) - 1)
            p = _detection_probability(noise, traits, rows.size * pixel_mm2, lesion.brightness, end)
            detected = not overlooked and rng.uniform() < p
            grid = grids.get(index, lesion.bone)
            if not detected or grid is None:
                marks.lesion_slices_missed += 1
                continue
            cells = grids.covered_cells(index, lesion.bone, rows, columns, traits.cell_threshold)
            cells = _perturb_extent(cells, noise, rng)
            for row, column in cells:
                box = grids.box(index, lesion.bone, row, column)
                if box is not None:
                    marks.cells[(index, lesion.bone, row, column)] = box
    for _ in range(int(rng.poisson(noise.false_cells_per_scan))):
        cell = grids.random_cell(rng)
        if cell is not None:
            box = grids.box(*cell)
            if box is not None:
                marks.cells[cell] = box
    return marks


def _detection_probability(
    noise: ReaderNoise, traits: ReaderTraits, area_mm2: float, brightness: float, end: bool
) -> float:
    base = noise.detect_max
    base *= _hill(area_mm2, noise.size_half_mm2, noise.steepness)
    base *= _hill(brightness, noise.brightness_half, noise.steepness)
    if end:
        base *= noise.end_slice_factor
    if base <= 0.0 or base >= 1.0 or traits.offset == 0.0:
        return base
    log_odds = math.log(base / (1.0 - base)) + traits.offset
    return 1.0 / (1.0 + math.exp(-log_odds))


def _hill(value: float, half: float, steepness: float) -> float:
    """``value**n / (value**n + half**n)``: 1 for ``half`` = 0, 0.5 at ``value`` = ``half``."""
    if half <= 0.0:
        return 1.0
    return 1.0 / (1.0 + (half / max(value, 1e-12)) ** steepness)


def _perturb_extent(
    cells: set[tuple[int, int]], noise: ReaderNoise, rng: np.random.Generator
) -> set[tuple[int, int]]:
    """Move each side of a marked region one cell in (shrink) or out (grow), at random."""
    cells = set(cells)
    for axis in (0, 1):
        for direction in (-1, 1):
            draw = rng.uniform()
            if not cells:
                return cells
            edge_value = (min if direction < 0 else max)(cell[axis] for cell in cells)
            edge = {cell for cell in cells if cell[axis] == edge_value}
            if draw < noise.p_shrink_side:
                if len(edge) < len(cells):
                    cells -= edge
            elif draw < noise.p_shrink_side + noise.p_grow_side:
                step = (direction, 0) if axis == 0 else (0, direction)
                grown = {(row + step[0], column + step[1]) for row, column in edge}
                cells |= {
                    cell
                    for cell in grown
                    if 0 <= cell[0] < noise.grid_cells and 0 <= cell[1] < noise.grid_cells
                }
    return cells


class _GridCache:
    """KIMRISS grids of one scan, computed per (slice, bone) when first asked for."""

    def __init__(self, labels: np.ndarray, cells: int) -> None:
        self.labels = labels
        self.cells = cells
        self._grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray] | None] = {}

    def get(self, index: int, bone: int) -> tuple[np.ndarray, np.ndarray] | None:
        key = (index, bone)
        if key not in self._grids:
            self._grids[key] = kimriss_grid(self.labels[index] == bone, self.cells)
        return self._grids[key]

    def box(self, index: int, bone: int, row: int, column: int) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) of a cell; None for a cell with no pixels (a tiny bone)."""
        ys, xs = self.get(index, bone)
        x0, x1, y0, y1 = int(xs[column]), int(xs[column + 1]), int(ys[row]), int(ys[row + 1])
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def covered_cells(
        self, index: int, bone: int, rows: np.ndarray, columns: np.ndarray, threshold: float
    ) -> set[tuple[int, int]]:
        """Cells holding lesion pixels that cover at least ``threshold`` of the cell's bone.

        The most covered cell is kept whatever the threshold: a reader who sees a lesion marks it.
        """
        ys, xs = self.get(index, bone)
        lesion_cells = self._cell_index(ys, xs, rows, columns)
        bone_rows, bone_columns = np.nonzero(self.labels[index] == bone)
        bone_cells = self._cell_index(ys, xs, bone_rows, bone_columns)
        size = self.cells * self.cells
        lesion_count = np.bincount(lesion_cells, minlength=size)
        bone_count = np.bincount(bone_cells, minlength=size)
        share = lesion_count / np.maximum(bone_count, 1)
        keep = (lesion_count > 0) & (share >= threshold)
        keep[np.argmax(share)] = True
        return {(int(cell) // self.cells, int(cell) % self.cells) for cell in np.flatnonzero(keep)}

    def random_cell(self, rng: np.random.Generator) -> Cell | None:
        """A uniformly drawn cell holding bone, on a uniformly drawn slice and bone."""
        present = [
            (index, bone)
            for index in range(self.labels.shape[0])
            for bone in BONES
            if self.get(index, bone) is not None
        ]
        if not present:
            return None
        index, bone = present[int(rng.integers(len(present)))]
        ys, xs = self.get(index, bone)
        bone_rows, bone_columns = np.nonzero(self.labels[index] == bone)
        cells = np.unique(self._cell_index(ys, xs, bone_rows, bone_columns))
        cell = int(cells[int(rng.integers(cells.size))])
        return index, bone, cell // self.cells, cell % self.cells

    def _cell_index(
        self, ys: np.ndarray, xs: np.ndarray, rows: np.ndarray, columns: np.ndarray
    ) -> np.ndarray:
        last = self.cells - 1
        row = np.clip(np.searchsorted(ys, rows, side="right") - 1, 0, last)
        column = np.clip(np.searchsorted(xs, columns, side="right") - 1, 0, last)
        return row * self.cells + column


def _annotation_rows(case_id: str, marked: dict[str, ReaderMarks | None]) -> list[Annotation]:
    rows = []
    for reader, marks in marked.items():
        if marks is None:
            continue
        for (index, bone, _, _), (x0, y0, x1, y1) in sorted(marks.cells.items()):
            rows.append(Annotation(case_id, reader, index, BONES[bone], x0, y0, x1, y1))
    return rows


def _tally(scan: Scan, marked: dict[str, ReaderMarks | None]) -> ScanTally:
    truth = scan.truth.astype(bool)
    total_voxels = int(truth.sum())
    lesion_slices = sum(int(m.voxels.any(axis=(1, 2)).sum()) for m in scan.lesion_masks)
    votes = np.zeros(truth.shape, dtype=np.int32)
    reader_missed, cells, false_cells, missed_slices = 0, 0, 0, 0
    for marks in marked.values():
        covered = np.zeros(truth.shape, dtype=bool)
        if marks is None:
            missed_slices += lesion_slices
        else:
            for (index, _, _, _), (x0, y0, x1, y1) in marks.cells.items():
                covered[index, y0:y1, x0:x1] = True
                cells += 1
                false_cells += not truth[index, y0:y1, x0:x1].any()
            missed_slices += marks.lesion_slices_missed
        votes += covered
        reader_missed += int((truth & ~covered).sum())
    consensus = 2 * votes >= len(marked)
    return ScanTally(
        truth_voxels=total_voxels,
        consensus_missed_voxels=int((truth & ~consensus).sum()),
        readers=len(marked),
        reader_missed_voxels=reader_missed,
        cells=cells,
        false_cells=false_cells,
        lesions=len(scan.lesion_masks),
        lesion_slices=lesion_slices * len(marked),
        lesion_slices_missed=missed_slices,
        blank_readers=sum(1 for marks in marked.values() if marks is None),
    )
