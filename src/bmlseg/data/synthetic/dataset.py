"""Writing a synthetic dataset folder (:func:`generate`): subjects, their two scans and readers,
the proxy bone labels an automatic segmentation would give (:func:`proxy_bones`), the split by
subject (:func:`split_subjects`), and the realized reader-noise statistics written to dataset.json
(:func:`noise_statistics`, :func:`format_statistics`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bmlseg.data.format import (
    Annotation,
    CaseRecord,
    DatasetInfo,
    bones_path,
    image_path,
    mask_path,
    write_annotations,
    write_dataset_json,
)
from bmlseg.data.synthetic.anatomy import _draw_anatomy
from bmlseg.data.synthetic.helpers import _ratio, _resolve, _rng, _smooth_field
from bmlseg.data.synthetic.lesions import Lesion
from bmlseg.data.synthetic.presets import (
    BONES,
    DATASET_ENTRIES,
    NOISE_PRESETS,
    PRESETS,
    TIME_POINTS,
    Preset,
    ReaderNoise,
)
from bmlseg.data.synthetic.preview import save_preview
from bmlseg.data.synthetic.readers import (
    ScanTally,
    _annotation_rows,
    _draw_readers,
    _read_scan,
    _reader_traits,
    _tally,
)
from bmlseg.data.synthetic.render import _render_scan
from bmlseg.io import Geometry, remove_path, write_volume

# The phantom's axes in LPS coordinates (columns of a row-major matrix): columns run anterior to
# posterior (+P), rows superior to inferior (-S), slices medial to lateral of a right knee (-L).
# Sagittal slices, orientation code PIR, as viewers then show them.
SAGITTAL_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


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
    geometry = Geometry(phantom.spacing, (0.0, 0.0, 0.0), SAGITTAL_DIRECTION)
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
                "module": __package__,  # bmlseg.data.synthetic, the public module
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
        remove_path(root / name)


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
