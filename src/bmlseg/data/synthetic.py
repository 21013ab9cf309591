"""A synthetic knee-MRI dataset: phantom scans, bone-marrow lesions and noisy KIMRISS readers.

Each subject is a sagittal intermediate-weighted fat-suppressed (IWFS) knee: distal femur with
its two condyles, proximal tibia with its plateau, patella, cartilage, joint fluid, menisci,
tendons, soft tissue and air. Every subject is scanned twice (time points 0 and 1, a small shift
apart, lesions a little grown or shrunk). Bone-marrow lesions (BMLs) are ill-defined hyperintense
blobs in subchondral marrow; their exact voxels are the ground truth in ``masks/``.

Readers mark KIMRISS grid cells: each bone's bounding box on a slice is cut into
``ReaderNoise.grid_cells`` x ``grid_cells`` cells and a reader lists the cells where they see a
lesion, one annotation row per cell. :class:`ReaderNoise` says how they err (missed lesion slices,
extents one cell off, false-positive cells); its presets are ``clean``, ``paper`` and ``heavy``.

All lengths are in mm in a centred anatomical frame: x runs anterior (left of the image) to
posterior, y superior (top row) to inferior, z across the slices (medial to lateral).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from bmlseg.data.format import (
    Annotation,
    CaseRecord,
    DatasetInfo,
    bones_path,
    image_path,
    load_case,
    load_dataset,
    mask_path,
    write_annotations,
    write_dataset_json,
)
from bmlseg.io import Geometry, atomic_path, write_volume

BONES = {1: "femur", 2: "tibia", 3: "patella"}
# What a dataset folder holds: the files bmlseg-synth writes and what the tools derive from them
# there (labels and their evaluation). overwrite=true deletes these, and only these.
DATASET_ENTRIES = (
    "dataset.json",
    "annotations.csv",
    "images",
    "bones",
    "masks",
    "softlabels",
    "label_quality",
    "preview.png",
)
FEMUR, TIBIA, PATELLA = 1, 2, 3
MAX_READERS = 7
TIME_POINTS = 2
# Stored intensities are the rendered signal (background 0, fluid about 1) times this.
INTENSITY_SCALE = 1000.0


@dataclass(frozen=True)
class Preset:
    """Sampling of the phantom: array shape ``[S, H, W]`` and spacing (x, y, z) in mm."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


PRESETS = {
    # The paper's OAI scans: 444 x 448 matrix, 159 x 160 mm field of view, 3 mm slices.
    "paper": Preset("paper", (36, 444, 448), (0.36, 0.36, 3.0)),
    # Same field of view and knee, sampled coarsely for CPU tests and demos.
    "small": Preset("small", (16, 128, 128), (1.25, 1.25, 6.75)),
}


@dataclass(frozen=True)
class ReaderNoise:
    """How simulated KIMRISS readers err. Probabilities are per event named in each field."""

    grid_cells: int = 6  # KIMRISS grid: cells per side of a bone's bounding box on a slice
    detect_max: float = 1.0  # P(mark a lesion slice) for a large, bright lesion on a middle slice
    size_half_mm2: float = 0.0  # lesion area on the slice at which that probability halves
    brightness_half: float = 0.0  # lesion brightness (0..1) at which it halves
    steepness: float = 3.0  # Hill exponent of those two drops: high = all-or-nothing
    end_slice_factor: float = 1.0  # multiplies it on the first and last of >= 3 lesion slices
    reader_spread: float = 0.0  # s.d. of each reader's log-odds offset (a reader's threshold)
    p_miss_lesion: float = 0.0  # P(a reader overlooks a whole lesion): inattention
    p_shrink_side: float = 0.0  # per side of a marked region: P(one cell short)
    p_grow_side: float = 0.0  # per side of a marked region: P(one cell too far)
    max_cell_threshold: float = 0.0  # readers skip cells whose bone area the lesion covers
    #   less than their own threshold, drawn per reader in [0, max_cell_threshold]
    false_cells_per_scan: float = 0.0  # mean number of false-positive cells per reader and scan
    p_blank: float = 0.0  # P(a listed reader drew nothing on a scan)

    def __post_init__(self) -> None:
        probabilities = (
            "detect_max",
            "end_slice_factor",
            "p_miss_lesion",
            "p_shrink_side",
            "p_grow_side",
            "max_cell_threshold",
            "p_blank",
        )
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"ReaderNoise.{name} must lie in [0, 1], got {getattr(self, name)}"
                )
        if self.p_shrink_side + self.p_grow_side > 1.0:
            raise ValueError("ReaderNoise.p_shrink_side + p_grow_side must not exceed 1")
        if self.grid_cells < 1:
            raise ValueError(f"ReaderNoise.grid_cells must be >= 1, got {self.grid_cells}")
        non_negative = (
            "size_half_mm2",
            "brightness_half",
            "steepness",
            "reader_spread",
            "false_cells_per_scan",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"ReaderNoise.{name} must be >= 0, got {getattr(self, name)}")


NOISE_PRESETS = {
    "clean": ReaderNoise(),
    # Calibrated on 20 subjects (docs/synthetic.md) to the paper's follow-up reading: about half
    # of the BML area missed or underestimated by the consensus, over 60 % by single readers.
    "paper": ReaderNoise(
        detect_max=0.95,
        size_half_mm2=8.0,
        brightness_half=0.15,
        steepness=4.0,
        end_slice_factor=0.5,
        reader_spread=1.0,
        p_miss_lesion=0.25,
        p_shrink_side=0.1,
        p_grow_side=0.15,
        max_cell_threshold=0.3,
        false_cells_per_scan=1.0,
        p_blank=0.15,
    ),
    "heavy": ReaderNoise(
        detect_max=0.85,
        size_half_mm2=20.0,
        brightness_half=0.3,
        steepness=3.0,
        end_slice_factor=0.3,
        reader_spread=1.2,
        p_miss_lesion=0.3,
        p_shrink_side=0.25,
        p_grow_side=0.25,
        max_cell_threshold=0.5,
        false_cells_per_scan=3.0,
        p_blank=0.2,
    ),
}

# What the ``paper`` preset aims at (share of true BML voxels left uncovered); tests hold it here.
PAPER_TARGETS = {"consensus_missed": (0.40, 0.65), "reader_missed": (0.55, 0.80)}


# --------------------------------------------------------------------------- public API


def generate(
    root: str | os.PathLike,
    *,
    n_subjects: int,
    seed: int,
    preset: str | Preset = "small",
    noise: str | ReaderNoise = "paper",
    preview: bool = False,
    overwrite: bool = False,
) -> DatasetInfo:
    """Write a synthetic dataset folder (docs/design.md) for ``n_subjects`` subjects, two scans each.

    Same ``seed`` gives byte-identical arrays and annotations.csv; a subject's scans do not
    depend on ``n_subjects``. The realized reader-noise statistics (see :func:`noise_statistics`)
    go to dataset.json under ``"noise"`` with the noise parameters; the generator settings go
    under ``"generator"``. ``preview`` also writes ``<root>/preview.png`` (:func:`save_preview`)
    of the first scan holding a lesion. dataset.json is written last: a folder without it is an
    unfinished one, which every tool refuses.

    Raises:
        FileExistsError: ``root`` is a file, or a folder that is not empty and ``overwrite`` is
            False; with ``overwrite`` the dataset folder there (DATASET_ENTRIES) is deleted first.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    phantom = _resolve(preset, PRESETS, "preset")
    reader_noise = _resolve(noise, NOISE_PRESETS, "noise")
    root = Path(root)
    _clear_root(root, overwrite=overwrite)
    geometry = Geometry.identity((phantom.spacing[0], phantom.spacing[1], phantom.spacing[2]))
    traits = _reader_traits(seed, reader_noise)
    splits = split_subjects(n_subjects, seed)

    records: list[CaseRecord] = []
    rows: list[Annotation] = []
    tallies: list[ScanTally] = []
    progress = tqdm(total=n_subjects * TIME_POINTS, desc="bmlseg-synth", unit="case")
    for index in range(n_subjects):
        subject = f"s{index:03d}"
        subject_rng = _rng(seed, 1, index)
        anatomy = _draw_anatomy(subject_rng)
        lesions: list[Lesion] = []
        for time_point in range(TIME_POINTS):
            case_id = f"{subject}_t{time_point}"
            scan_rng = _rng(seed, 2, index, time_point)
            scan = _render_scan(anatomy, lesions, time_point, phantom, scan_rng, subject_rng)
            if time_point == 0:
                lesions = scan.lesions
            proxy = proxy_bones(scan.labels, phantom.spacing, scan_rng)
            readers = _draw_readers(scan_rng)
            marked = {
                reader: _read_scan(scan, traits[reader], reader_noise, phantom.spacing, scan_rng)
                for reader in readers
            }
            rows += _annotation_rows(case_id, marked)
            tallies.append(_tally(scan, marked))
            write_volume(image_path(root, case_id), scan.image, geometry)
            write_volume(bones_path(root, case_id), proxy, geometry)
            write_volume(mask_path(root, case_id), scan.truth, geometry)
            records.append(CaseRecord(case_id, subject, tuple(readers), splits[index]))
            progress.update()
    progress.close()

    statistics = noise_statistics(tallies)
    noise_name = noise if isinstance(noise, str) else "custom"
    info = DatasetInfo(
        name=f"synthetic-{phantom.name}-{noise_name}-seed{seed}",
        bones=dict(BONES),
        cases=records,
        extra={
            "generator": {
                "module": __name__,
                "seed": seed,
                "n_subjects": n_subjects,
                "preset": asdict(phantom),
                "time_points": TIME_POINTS,
            },
            "noise": {
                "preset": noise_name,
                "parameters": asdict(reader_noise),
                "realized": statistics,
            },
        },
    )
    write_annotations(root, rows)
    write_dataset_json(root, info)
    print(format_statistics(statistics))
    if preview:
        with_lesion = [
            record for record, tally in zip(records, tallies, strict=True) if tally.truth_voxels
        ]
        shown = (with_lesion or records)[0]
        save_preview(root, shown.id, root / "preview.png")
    return info


def _clear_root(root: Path, *, overwrite: bool) -> None:
    """Make ``root`` ready for a new dataset folder: absent or empty, or cleared of a dataset
    folder's entries with ``overwrite`` (anything else there is left as it is)."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: a file, not a folder; choose another root")
    held = sorted(path.name for path in root.iterdir()) if root.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise FileExistsError(
            f"{root}: not empty (holds {shown}); bmlseg-synth writes a new dataset folder: "
            "choose another root, or add overwrite=true to replace the dataset there (its "
            "labels included)"
        )
    for name in DATASET_ENTRIES:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def split_subjects(n_subjects: int, seed: int) -> list[str]:
    """Split per subject index: ``round(0.2 n)`` (at least 1) to test, the same to val, rest train.

    Val gets its subject only from 3 subjects on, test from 2; the subjects are shuffled with the
    seed first.
    """
    n_held = max(1, round(0.2 * n_subjects))
    n_test = n_held if n_subjects >= 2 else 0
    n_val = n_held if n_subjects >= 3 else 0
    order = _rng(seed, 0, 0).permutation(n_subjects)
    splits = ["train"] * n_subjects
    for position, subject in enumerate(order):
        if position < n_test:
            splits[subject] = "test"
        elif position < n_test + n_val:
            splits[subject] = "val"
    return splits


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


def proxy_bones(
    labels: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Bone labels ``[S, H, W]`` as an automatic segmentation gives them: boundaries one pixel off.

    Where a smooth random field is high the bone is dilated by one pixel, where it is low eroded,
    slice by slice (a 2D segmenter's errors do not line up across slices).
    """
    error_field = _smooth_field(rng, labels.shape, spacing, wavelength_mm=12.0, per_slice=True)
    proxy = np.zeros_like(labels)
    for label in BONES:
        bone = labels == label
        grown = _dilate_in_plane(bone) & (labels == 0)
        shrunk = ~_dilate_in_plane(~bone)
        sign = 1.0 if label % 2 else -1.0  # neighbouring bones err independently
        field = sign * error_field
        mask = np.where(field > 0.5, bone | grown, np.where(field < -0.5, shrunk, bone))
        proxy[mask & (proxy == 0)] = label
    return proxy


def _dilate_in_plane(mask: np.ndarray) -> np.ndarray:
    """Dilation of ``[S, H, W]`` by the 4-neighbour cross of each slice (shifted ORs: fast)."""
    grown = mask.copy()
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    grown[:, :, 1:] |= mask[:, :, :-1]
    grown[:, :, :-1] |= mask[:, :, 1:]
    return grown


def noise_statistics(tallies: list[ScanTally]) -> dict[str, float | int]:
    """The realized reader noise over a set of scans.

    - ``consensus_missed``: share of all true BML voxels (pooled over scans) not covered by the
      consensus, i.e. by rectangles of at least half of the scan's listed readers;
    - ``reader_missed``: the same for single readers: true BML voxels not covered by a reader's
      rectangles, summed over every (scan, listed reader) pair, over the BML voxels summed over
      the same pairs (the voxel-weighted mean over readers; a blank reader misses all);
    - ``false_positive_cells``: share of all marked cells holding no true BML voxel;
    - ``lesion_slices_missed``: share of (listed reader, slice of a lesion) pairs where the reader
      did not mark the lesion (a blank reader misses every one).
    """
    truth = sum(tally.truth_voxels for tally in tallies)
    cells = sum(tally.cells for tally in tallies)
    lesion_slices = sum(tally.lesion_slices for tally in tallies)
    return {
        "consensus_missed": _ratio(sum(t.consensus_missed_voxels for t in tallies), truth),
        "reader_missed": _ratio(
            sum(t.reader_missed_voxels for t in tallies),
            sum(t.truth_voxels * t.readers for t in tallies),
        ),
        "false_positive_cells": _ratio(sum(t.false_cells for t in tallies), cells),
        "lesion_slices_missed": _ratio(sum(t.lesion_slices_missed for t in tallies), lesion_slices),
        "scans": len(tallies),
        "scans_with_bml": sum(1 for tally in tallies if tally.truth_voxels),
        "lesions": sum(tally.lesions for tally in tallies),
        "bml_voxels": int(truth),
        "marked_cells": int(cells),
        "blank_readers": sum(tally.blank_readers for tally in tallies),
    }


def format_statistics(statistics: dict[str, float | int]) -> str:
    return (
        f"{statistics['scans']} scans ({statistics['scans_with_bml']} with BML, "
        f"{statistics['lesions']} lesions, {statistics['bml_voxels']} BML voxels): "
        f"consensus missed {statistics['consensus_missed']:.1%}, single readers missed "
        f"{statistics['reader_missed']:.1%} on average, false-positive cells "
        f"{statistics['false_positive_cells']:.1%} of {statistics['marked_cells']}, "
        f"lesion slices missed {statistics['lesion_slices_missed']:.1%}, "
        f"blank readers {statistics['blank_readers']}"
    )


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


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class Waves:
    """A smooth random field: a sum of plane waves, amplitude 1 in total."""

    wavevectors: np.ndarray  # [N, 3] radians per mm along (x, y, z)
    phases: np.ndarray  # [N]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float) -> np.ndarray:
        """The field at broadcastable coordinates; cheapest when ``x`` varies along one axis."""
        field = 0.0
        for (kx, ky, kz), phase in zip(self.wavevectors, self.phases, strict=True):
            along_x = kx * x
            rest = ky * y + kz * z + phase
            # cos(a + b) = cos a cos b - sin a sin b: cosines of the small factors only
            field = field + np.cos(along_x) * np.cos(rest) - np.sin(along_x) * np.sin(rest)
        return field / len(self.phases)


@dataclass(frozen=True)
class Anatomy:
    """One subject's knee, in mm of the centred anatomical frame."""

    joint_y: float  # joint line
    half_width: float  # half the medial-lateral width of the knee (condyles)
    condyle_x: float
    condyle_radii: tuple[float, float]
    shaft_x: float
    shaft_half: float
    tibia_x: float
    plateau_half: float
    plateau_height: float
    tibia_shaft_half: float
    joint_gap: float  # bone to bone across the tibiofemoral joint
    patella_center: tuple[float, float]
    patella_radii: tuple[float, float]
    patella_angle: float  # radians
    cartilage: float
    cortex: float
    effusion: float  # 0 (none) .. 1.5 (large)
    skin_x: float  # anterior skin at the patella's height
    intensity_jitter: float
    wobble: tuple[Waves, Waves]  # bend every contour along x and y by up to ``WOBBLE_MM``


WOBBLE_MM = 1.5
TISSUE = {  # signal (fluid about 1) on fat-suppressed intermediate-weighted images
    "skin": 0.35,
    "fat": 0.09,
    "muscle": 0.27,
    "fat_pad": 0.12,
    "fluid": 0.95,
    "cartilage": 0.45,
    "meniscus": 0.05,
    "tendon": 0.04,
    "cortex": 0.03,
    "marrow": 0.14,
}


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    scale = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))

    def jitter(value: float, spread: float = 0.05) -> float:
        return float(value * scale * rng.uniform(1 - spread, 1 + spread))

    joint_y = float(rng.normal(8.0, 3.0))
    shift = float(rng.normal(0.0, 3.0))
    condyle_radii = (jitter(24.0), jitter(21.0))
    patella_radii = (jitter(9.5, 0.08), jitter(19.0, 0.08))
    patella_x = shift - 30.0 * scale + rng.normal(0, 1.5)
    return Anatomy(
        joint_y=joint_y,
        half_width=jitter(46.0),
        condyle_x=shift + 6.0 * scale,
        condyle_radii=condyle_radii,
        shaft_x=shift,
        shaft_half=jitter(14.0),
        tibia_x=shift + 4.0 * scale,
        plateau_half=jitter(27.0),
        plateau_height=jitter(17.0),
        tibia_shaft_half=jitter(13.0),
        joint_gap=float(rng.uniform(5.0, 7.0)),
        patella_center=(float(patella_x), float(joint_y - 28.0 * scale + rng.normal(0, 4.0))),
        patella_radii=patella_radii,
        patella_angle=float(np.deg2rad(rng.normal(-12.0, 5.0))),
        cartilage=float(rng.uniform(2.0, 2.8)),
        cortex=float(rng.uniform(1.0, 1.5)),
        effusion=float(rng.uniform(0.0, 1.5)),
        skin_x=float(patella_x - patella_radii[0] - rng.uniform(6.0, 10.0)),
        intensity_jitter=float(rng.uniform(0.95, 1.05)),
        wobble=(
            _draw_waves(rng, 4, wavelength_mm=(25.0, 70.0)),
            _draw_waves(rng, 4, wavelength_mm=(25.0, 70.0)),
        ),
    )


def _draw_waves(rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> Waves:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=(count, 1))
    return Waves(directions * (2 * np.pi / wavelengths), rng.uniform(0, 2 * np.pi, size=count))


# --------------------------------------------------------------------------- rendering


@dataclass
class Scan:
    image: np.ndarray  # [S, H, W] uint16
    labels: np.ndarray  # [S, H, W] uint8 true bones
    truth: np.ndarray  # [S, H, W] uint8 union of the lesions
    lesions: list[Lesion]  # as drawn at time point 0
    lesion_masks: list[LesionMask]  # voxels of each lesion present in this scan


@dataclass(frozen=True)
class Lesion:
    bone: int
    center: tuple[float, float, float]  # (x, y, z) mm, anatomical frame
    radii: tuple[float, float, float]  # (x, y, z) mm
    angle: float  # in-plane rotation, radians
    brightness: float  # 0 (dim) .. 1 (bright)
    irregularity: Waves


@dataclass(frozen=True)
class LesionMask:
    bone: int
    brightness: float
    offset: tuple[int, int, int]  # [S, H, W] index of voxels[0, 0, 0]
    voxels: np.ndarray  # [s, h, w] bool


@dataclass(frozen=True)
class Layers:
    """One slice's rendering before lesions, bias and noise."""

    image: np.ndarray  # [H, W] float32
    labels: np.ndarray  # [H, W] uint8
    marrow: np.ndarray  # [H, W] float32 fraction of each pixel that is marrow
    subchondral: np.ndarray  # [H, W] uint8 bone label where a lesion may be centred


def _render_scan(
    anatomy: Anatomy,
    lesions: list[Lesion],
    time_point: int,
    phantom: Preset,
    rng: np.random.Generator,
    subject_rng: np.random.Generator,
) -> Scan:
    """Render one scan; at time point 0 the subject's lesions are drawn from ``subject_rng``."""
    slices, height, width = phantom.shape
    spacing_x, spacing_y, spacing_z = phantom.spacing
    shift = rng.normal(0.0, 1.0, size=2) if time_point else np.zeros(2)
    x = ((np.arange(width) + 0.5) * spacing_x - width * spacing_x / 2 - shift[0])[None, :]
    y = ((np.arange(height) + 0.5) * spacing_y - height * spacing_y / 2 - shift[1])[:, None]
    x, y = x.astype(np.float32), y.astype(np.float32)
    z = (np.arange(slices) + 0.5) * spacing_z - slices * spacing_z / 2
    texture = _texture(rng, phantom)
    layers = [
        _render_slice(anatomy, x, y, float(z[index]), min(spacing_x, spacing_y), texture[index])
        for index in range(slices)
    ]
    image = np.stack([layer.image for layer in layers])
    labels = np.stack([layer.labels for layer in layers])
    marrow = np.stack([layer.marrow for layer in layers])
    if time_point == 0:
        subchondral = np.stack([layer.subchondral for layer in layers])
        lesions = _draw_lesions(subject_rng, subchondral, x, y, z)
    else:
        lesions = [_evolve(lesion, rng) for lesion in lesions]
    truth = np.zeros(image.shape, dtype=np.uint8)
    masks = []
    for lesion in lesions:
        mask = _add_lesion(image, labels, marrow, texture, lesion, x, y, z)
        if mask is not None:
            masks.append(mask)
            s, h, w = mask.offset
            ds, dh, dw = mask.voxels.shape
            truth[s : s + ds, h : h + dh, w : w + dw] |= mask.voxels
    image *= _bias_field(rng, x, y, z)
    return Scan(_rician(image, rng), labels, truth, lesions, masks)


def _render_slice(
    anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: float, pixel: float, texture: np.ndarray
) -> Layers:
    """Compose one sagittal slice from signed distances (mm, negative inside) of each structure.

    Tissues are painted back to front with their pixel fractions ``clip(0.5 - sdf / pixel)``,
    which gives the partial-volume blur of an edge one pixel wide.
    """
    a = anatomy
    x, y = x + WOBBLE_MM * a.wobble[0](x, y, z), y + WOBBLE_MM * a.wobble[1](x, y, z)
    t = z / a.half_width  # -1 medial edge .. 1 lateral edge of the condyles

    femur, condyle_y, condyle = _femur(a, x, y, t)
    tibia, tibia_top, plateau_half = _tibia(a, x, y, t)
    patella = _patella(a, x, y, t)
    fibula = _fibula(a, x, y, t, tibia_top)

    def paint(canvas: np.ndarray, sdf: np.ndarray, value: float | np.ndarray) -> np.ndarray:
        fraction = np.clip(0.5 - sdf / pixel, 0.0, 1.0)
        return canvas + fraction * (value - canvas)

    tissue = {name: value * a.intensity_jitter for name, value in TISSUE.items()}
    px, py = a.patella_center
    skin = a.skin_x + 0.0015 * (y - py) ** 2 + 4.0 * (1 - _cap(t, 1.3))
    back = 74.0 - 0.001 * (y - py) ** 2
    body = np.maximum(skin - x, x - back)
    image = paint(np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32), body, tissue["skin"])
    image = paint(image, body + 1.2, tissue["fat"])
    image = paint(image, body + 6.0, tissue["muscle"] * (1 + 0.08 * texture))

    if abs(t) < 0.5:
        fat_pad = _ellipse(x, y, px + 10.0, a.joint_y - 3.0, 9.0, 13.0, 0.3)
        image = paint(image, fat_pad, tissue["fat_pad"])
    fluid = _fluid(a, x, y, t, femur, tibia, patella, condyle, condyle_y)
    image = paint(image, fluid, tissue["fluid"])
    meniscus = np.maximum.reduce(
        [
            femur + tibia - 2 * a.cartilage - 7.0,
            -np.minimum(femur, tibia),
            plateau_half - 9.0 - np.abs(x - a.tibia_x),
            np.abs(x - a.tibia_x) - plateau_half - 1.0,
            y - tibia_top,
        ]
    )
    if abs(t) > 0.25:  # no menisci in the intercondylar notch
        image = paint(image, meniscus, tissue["meniscus"])
    cartilage = _cartilage(a, x, y, femur, tibia, patella, condyle_y, tibia_top, plateau_half)
    image = paint(image, cartilage, tissue["cartilage"])
    if abs(t) < 0.4:
        image = paint(image, _tendons(a, x, y, tibia_top), tissue["tendon"])

    bones = np.minimum.reduce([femur, tibia, patella, fibula])
    image = paint(image, bones, tissue["cortex"])
    marrow_sdf = bones + a.cortex
    image = paint(image, marrow_sdf, tissue["marrow"] * (1 + 0.25 * texture))

    labels = np.zeros(image.shape, dtype=np.uint8)
    for label, sdf in ((FEMUR, femur), (TIBIA, tibia), (PATELLA, patella)):
        labels[(sdf < 0) & (labels == 0)] = label
    articular = {
        FEMUR: (y > condyle_y - 0.3 * a.condyle_radii[1]) & (np.abs(t) > 0.15),
        TIBIA: (y < tibia_top + 14.0) & (np.abs(x - a.tibia_x) < plateau_half - 4.0),
        PATELLA: x > px,
    }
    subchondral = np.zeros_like(labels)
    for label, sdf in ((FEMUR, femur), (TIBIA, tibia), (PATELLA, patella)):
        band = (sdf < -a.cortex - 0.5) & (sdf > -a.cortex - 7.0) & articular[label]
        subchondral[band & (labels == label)] = label
    marrow = np.clip(0.5 - marrow_sdf / pixel, 0.0, 1.0)
    return Layers(image.astype(np.float32), labels, marrow.astype(np.float32), subchondral)


def _femur(
    a: Anatomy, x: np.ndarray, y: np.ndarray, t: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Distal femur: the larger of two condyle sections joined smoothly to the shaft."""
    far = np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    # Medial (t < 0) and lateral condyles as ellipsoids across the slices; between them the
    # notch leaves a small section only.
    reach = max(_cap(t + 0.5, 0.55), _cap(t - 0.5, 0.55) * 0.94)
    if reach <= 0:
        return far, a.joint_y, far
    rx, ry = a.condyle_radii
    size = reach**0.6
    posterior = 4.0 if t < 0 else 0.0  # the medial condyle reaches further back
    condyle_y = a.joint_y - ry * size - 10.0 * (1 - size)
    condyle = _ellipse(x, y, a.condyle_x + posterior, condyle_y, rx * size, ry * size)
    # The metaphysis narrows upward from the condyles into the shaft.
    metaphysis = _ellipse(
        x, y, a.shaft_x + 2.0, condyle_y - 12.0, a.shaft_half * 1.1, 32.0 * size, 0.1
    )
    femur = _smooth_union(condyle, metaphysis, 8.0)
    shaft_half = a.shaft_half * _cap(t, 0.45)
    if shaft_half >= 3.0:
        shaft = _box(x, y, a.shaft_x - shaft_half, a.shaft_x + shaft_half, -1e3, condyle_y)
        femur = _smooth_union(femur, shaft, 10.0)
    return femur, condyle_y, condyle


def _tibia(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float) -> tuple[np.ndarray, float, float]:
    """Proximal tibia: plateau (a rounded box) joined smoothly to the shaft; spines at the notch."""
    top = a.joint_y + a.joint_gap
    reach = _cap(t, 1.02)
    plateau_half = a.plateau_half * (0.55 + 0.45 * reach)
    if reach <= 0:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32), top, 0.0
    height = a.plateau_height
    plateau = (
        _box(
            x, y, a.tibia_x - plateau_half + 4, a.tibia_x + plateau_half - 4, top + 4, top + height
        )
        - 4.0
    )
    spines = _ellipse(x, y, a.tibia_x - 2.0, top, 5.0, 4.0 * math.exp(-((t / 0.12) ** 2)) + 0.1)
    tibia = np.minimum(plateau, spines)
    shaft_half = a.tibia_shaft_half * _cap(t, 0.5)
    if shaft_half >= 3.0:
        shaft = _box(x, y, a.tibia_x - shaft_half - 2, a.tibia_x + shaft_half - 2, top, 1e3)
        tibia = _smooth_union(tibia, shaft, 12.0)
        tuberosity = _ellipse(x, y, a.tibia_x - shaft_half - 2, top + 28.0, 5.0, 9.0)
        tibia = _smooth_union(tibia, tuberosity, 4.0)
    return tibia, top, plateau_half


def _patella(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    reach = _cap(t, 0.5) ** 0.5
    if reach <= 0.1:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    rx, ry = a.patella_radii
    px, py = a.patella_center
    return _ellipse(x, y, px, py, rx * reach, ry * reach, a.patella_angle)


def _fibula(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float, tibia_top: float) -> np.ndarray:
    """Fibular head, lateral and posterior; bone-like but not one of the labelled bones."""
    reach = _cap(t - 0.85, 0.25)
    if reach <= 0.1:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    cx = a.tibia_x + 0.6 * a.plateau_half
    return _ellipse(x, y, cx, tibia_top + a.plateau_height + 8.0, 8.0 * reach, 10.0 * reach)


def _fluid(
    a: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    t: float,
    femur: np.ndarray,
    tibia: np.ndarray,
    patella: np.ndarray,
    condyle: np.ndarray,
    condyle_y: float,
) -> np.ndarray:
    """Joint fluid: thin films between the cartilages plus recesses filled by the effusion."""
    film = 2 * a.cartilage + 1.0
    tibiofemoral = np.maximum(femur + tibia - film, -np.minimum(femur, tibia))
    patellofemoral = np.maximum(femur + patella - film, -np.minimum(femur, patella))
    px, py = a.patella_center
    # Recesses: suprapatellar pouch at the centre, posterior recesses behind the condyles.
    central = _cap(t, 0.7)
    swell = a.effusion * central
    suprapatellar = _ellipse(
        x,
        y,
        a.shaft_x - a.shaft_half - 3.0 - swell,
        py - 28.0,
        0.5 + 3.0 * swell,
        18.0 * central + 0.1,
        0.15,
    )
    suprapatellar = np.maximum(suprapatellar, -femur)
    behind = a.effusion * _cap(abs(t) - 0.55, 0.3)
    posterior = _ellipse(
        x, y, a.condyle_x + a.condyle_radii[0] - 2.0, condyle_y - 4.0, 0.5 + 3.0 * behind, 10.0
    )
    posterior = np.maximum(posterior, -condyle)
    return np.minimum.reduce([tibiofemoral, patellofemoral, suprapatellar, posterior])


def _cartilage(
    a: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    femur: np.ndarray,
    tibia: np.ndarray,
    patella: np.ndarray,
    condyle_y: float,
    tibia_top: float,
    plateau_half: float,
) -> np.ndarray:
    """Cartilage shells on the articular surfaces (distance outside the bone < thickness)."""
    px, py = a.patella_center
    femoral = (y > condyle_y - 0.5 * a.condyle_radii[1]) | ((x < a.condyle_x) & (y > py - 12.0))
    tibial = (y < tibia_top + 5.0) & (np.abs(x - a.tibia_x) < plateau_half - 1.0)
    patellar = x > px
    shells = []
    for sdf, surface in ((femur, femoral), (tibia, tibial), (patella, patellar)):
        shell = np.maximum(sdf - a.cartilage, -sdf)
        shells.append(np.where(surface, shell, 1e3))
    return np.minimum.reduce(shells)


def _tendons(a: Anatomy, x: np.ndarray, y: np.ndarray, tibia_top: float) -> np.ndarray:
    px, py = a.patella_center
    ry = a.patella_radii[1]
    patellar = _capsule(
        x, y, (px + 3.0, py + ry - 2.0), (a.tibia_x - a.tibia_shaft_half - 4, tibia_top + 30.0), 2.5
    )
    quadriceps = _capsule(x, y, (px + 2.0, py - ry + 2.0), (a.shaft_x - 22.0, -90.0), 3.5)
    return np.minimum(patellar, quadriceps)


def _texture(rng: np.random.Generator, phantom: Preset) -> np.ndarray:
    """Trabecular / muscle texture ``[S, H, W]``: white noise blurred to ~0.7 mm, unit s.d."""
    noise = rng.standard_normal(phantom.shape, dtype=np.float32)
    sigma = (0.0, 0.7 / phantom.spacing[1], 0.7 / phantom.spacing[0])
    texture = ndimage.gaussian_filter(noise, sigma=sigma, mode="nearest")
    return texture / max(float(texture.std()), 1e-6)


def _bias_field(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Smooth multiplicative coil shading: exp of a random quadratic, about +-15 %."""
    u, v = x[None] / 80.0, y[None] / 80.0
    w = (z[:, None, None] / 60.0).astype(np.float32)
    c = rng.normal(0.0, 0.08, size=6).astype(np.float32)
    in_plane = c[0] * u + c[1] * v + c[3] * u * u + c[4] * v * v + c[5] * u * v  # [1, H, W]
    return np.exp(in_plane) * np.exp(c[2] * w)


def _rician(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise, stored as uint16."""
    sigma = rng.uniform(0.02, 0.035)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary) * INTENSITY_SCALE
    return np.clip(np.round(magnitude), 0, np.iinfo(np.uint16).max).astype(np.uint16)


# --------------------------------------------------------------------------- lesions


def _draw_lesions(
    rng: np.random.Generator, subchondral: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> list[Lesion]:
    """0-4 lesions centred in subchondral marrow; size and brightness grow with a severity."""
    lesions = []
    for _ in range(int(rng.integers(0, 5))):
        bone = int(rng.choice([FEMUR, TIBIA, PATELLA], p=[0.45, 0.4, 0.15]))
        candidates = np.flatnonzero(subchondral == bone)
        if candidates.size == 0:
            continue
        s, h, w = np.unravel_index(rng.choice(candidates), subchondral.shape)
        severity = rng.uniform()
        size = np.clip(severity + rng.normal(0, 0.15), 0, 1)
        in_plane = 2.5 * (10.0 / 2.5) ** size * (0.6 if bone == PATELLA else 1.0)
        # 1 to 6 slices of the paper's 3 mm
        across = 1.5 * (1 + round(5 * float(np.clip(severity + rng.normal(0, 0.2), 0, 1))))
        lesions.append(
            Lesion(
                bone=bone,
                center=(float(x[0, w]), float(y[h, 0]), float(z[s])),
                radii=(
                    float(in_plane * rng.uniform(0.7, 1.3)),
                    float(in_plane * rng.uniform(0.7, 1.3)),
                    float(across),
                ),
                angle=float(rng.uniform(0, np.pi)),
                brightness=float(np.clip(severity + rng.normal(0, 0.2), 0.05, 1.0)),
                irregularity=_draw_waves(rng, 4, wavelength_mm=(4.0, 12.0)),
            )
        )
    return lesions


def _evolve(lesion: Lesion, rng: np.random.Generator) -> Lesion:
    """The lesion at the second time point: a little larger or smaller, brighter or dimmer."""
    growth = float(np.exp(rng.normal(0.0, 0.12)))
    return replace(
        lesion,
        radii=tuple(radius * growth for radius in lesion.radii),
        brightness=float(np.clip(lesion.brightness * np.exp(rng.normal(0.0, 0.1)), 0.05, 1.0)),
    )


def _add_lesion(
    image: np.ndarray,
    labels: np.ndarray,
    marrow: np.ndarray,
    texture: np.ndarray,
    lesion: Lesion,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
) -> LesionMask | None:
    """Brighten ``image`` in place around ``lesion``; return its truth voxels (marrow only)."""
    reach = 1.6  # the signal fades out to 1.6 radii
    cx, cy, cz = lesion.center
    rx, ry, rz = lesion.radii
    box = [
        _index_range(z, cz, reach * rz),
        _index_range(y[:, 0], cy, reach * max(rx, ry)),
        _index_range(x[0], cx, reach * max(rx, ry)),
    ]
    if any(start >= stop for start, stop in box):
        return None
    (s0, s1), (h0, h1), (w0, w1) = box
    zz = z[s0:s1, None, None]
    yy = y[None, h0:h1, :]
    xx = x[None, :, w0:w1]
    cos, sin = math.cos(lesion.angle), math.sin(lesion.angle)
    u = (cos * (xx - cx) + sin * (yy - cy)) / rx
    v = (-sin * (xx - cx) + cos * (yy - cy)) / ry
    radius = np.sqrt(u * u + v * v + ((zz - cz) / rz) ** 2)
    radius = radius * (1.0 + 0.3 * lesion.irregularity(xx, yy, zz))
    inside = radius < 1.0
    region = (slice(s0, s1), slice(h0, h1), slice(w0, w1))
    voxels = inside & (marrow[region] >= 0.5) & (labels[region] == lesion.bone)
    if not voxels.any():
        return None
    amplitude = 0.08 + 0.37 * lesion.brightness
    profile = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.12))  # ill-defined edge
    patchy = 1.0 + 0.15 * texture[region]
    image[region] += (amplitude * profile * patchy * marrow[region]).astype(np.float32)
    return LesionMask(lesion.bone, lesion.brightness, (s0, h0, w0), voxels)


def _index_range(coordinates: np.ndarray, center: float, half: float) -> tuple[int, int]:
    """Indices of the sorted ``coordinates`` within ``half`` of ``center``, as (start, stop)."""
    start = int(np.searchsorted(coordinates, center - half, side="left"))
    stop = int(np.searchsorted(coordinates, center + half, side="right"))
    return start, stop


# --------------------------------------------------------------------------- readers


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


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent streams: key (0, ...) dataset-wide, (1, subject), (2, subject, time point)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _resolve(value, presets: dict, what: str):
    if not isinstance(value, str):
        return value
    if value not in presets:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(presets)}")
    return presets[value]


def _ratio(numerator: float, denominator: float) -> float:
    return round(float(numerator) / float(denominator), 4) if denominator else 0.0


def _cap(t: float, half_width: float) -> float:
    """Half-width of a sphere's section at ``t``, relative to its radius ``half_width``."""
    return math.sqrt(max(0.0, 1.0 - (t / half_width) ** 2))


def _ellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle: float = 0.0,
) -> np.ndarray:
    """First-order signed distance to an ellipse: exact on its boundary, monotone elsewhere."""
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * (x - cx) + sin * (y - cy)
    v = -sin * (x - cx) + cos * (y - cy)
    level = (u / rx) ** 2 + (v / ry) ** 2 - 1.0
    gradient = 2.0 * np.sqrt((u / rx**2) ** 2 + (v / ry**2) ** 2) + 1e-6
    return (level / gradient).astype(np.float32)


def _box(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    dx = np.maximum(x0 - x, x - x1)
    dy = np.maximum(y0 - y, y - y1)
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return (outside + np.minimum(np.maximum(dx, dy), 0.0)).astype(np.float32)


def _capsule(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float], radius: float
) -> np.ndarray:
    ax, ay = a
    bx, by = b
    length2 = (bx - ax) ** 2 + (by - ay) ** 2
    along = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / length2, 0.0, 1.0)
    return (np.hypot(x - ax - along * (bx - ax), y - ay - along * (by - ay)) - radius).astype(
        np.float32
    )


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: unites two shapes with a fillet of about ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + h * (a - b) - k * h * (1.0 - h)


def _smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    wavelength_mm: float,
    per_slice: bool,
) -> np.ndarray:
    """A smooth random field ``[S, H, W]`` in about [-1, 1]; new phases per slice if asked."""
    slices, height, width = shape
    x = (np.arange(width) * spacing[0])[None, None, :]
    y = (np.arange(height) * spacing[1])[None, :, None]
    count = 6
    angles = rng.uniform(0, np.pi, size=count)
    k = 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3, size=count))
    phases = rng.uniform(0, 2 * np.pi, size=(slices if per_slice else 1, count))
    field = np.zeros(shape, dtype=np.float32)
    for i in range(count):
        along_x = (k[i] * math.cos(angles[i]) * x).astype(np.float32)
        along_y = (k[i] * math.sin(angles[i]) * y + phases[:, i, None, None]).astype(np.float32)
        # cos(a + b) = cos a cos b - sin a sin b, evaluated as outer products: no full-size cos
        field += np.cos(along_x) * np.cos(along_y) - np.sin(along_x) * np.sin(along_y)
    return field * np.float32(math.sqrt(2.0 / count))
