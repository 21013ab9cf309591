"""The dataset folder: its schema, loading, and validation.

```
<root>/dataset.json            format_version, name, bones, cases
<root>/images/<id>.nii.gz      MRI volume [slices, H, W], sagittal slices on the first axis
<root>/bones/<id>.nii.gz       uint8 bone proxy labels (0 = background), same geometry
<root>/annotations.csv         case,reader,slice,bone,x0,y0,x1,y1  (pixels; x1, y1 exclusive)
<root>/masks/<id>.nii.gz       optional uint8 pixelwise BML ground truth
<root>/softlabels/<method>/<id>.nii.gz   float32 in [0, 1], written by bmlseg-labels
```

``bone`` in annotations.csv is a bone *name* declared in dataset.json's ``bones``; x runs along
the image width (last array axis), y along its height.

:func:`check` validates a whole folder and writes nothing; ``bmlseg-check ROOT`` (:func:`main_check`)
prints what it finds. docs/dataset.md describes the format for people filling it with real data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bmlseg.io import Geometry, read_geometry, read_volume, write_text_atomic

FORMAT_VERSION = 1
ANNOTATION_COLUMNS = ("case", "reader", "slice", "bone", "x0", "y0", "x1", "y1")
# The same rows with a DICOM InstanceNumber, as a reader's viewer shows it, in place of the slice
# index; converted with the case's "instance_numbers" in dataset.json.
INSTANCE_COLUMNS = tuple(
    "instance" if column == "slice" else column for column in ANNOTATION_COLUMNS
)
SPLITS = ("train", "val", "test")
VOLUME_SUFFIX = ".nii.gz"
REQUIRED_FIELDS = ("name", "bones", "cases")
KNOWN_FIELDS = ("format_version", *REQUIRED_FIELDS)
CASE_FIELDS = ("id", "subject", "readers", "split")
# Case ids name files, so they stay within characters every file system accepts.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CaseRecord:
    """One scan: ``id`` names its files; ``readers`` lists everyone who rated it;
    ``instance_numbers``, when given, the DICOM InstanceNumber of each slice in bmlseg's slice
    order (bmlseg.io.dicom_instance_numbers), for annotations that give those."""

    id: str
    subject: str
    readers: tuple[str, ...]
    split: str
    instance_numbers: tuple[int, ...] | None = None


@dataclass
class DatasetInfo:
    """The content of dataset.json. ``extra`` keeps any further keys (e.g. noise statistics)."""

    name: str
    bones: dict[int, str]
    cases: list[CaseRecord]
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases:
            if record.id == case_id:
                return record
        raise KeyError(f"case {case_id!r} is not listed in dataset.json")

    def split(self, split: str) -> list[CaseRecord]:
        return [record for record in self.cases if record.split == split]

    @property
    def bone_labels(self) -> dict[str, int]:
        return {name: label for label, name in self.bones.items()}


@dataclass(frozen=True)
class Annotation:
    """One reader's rectangle on one slice: rows ``y0:y1``, columns ``x0:x1`` (exclusive ends)."""

    case: str
    reader: str
    slice: int
    bone: str
    x0: int
    y0: int
    x1: int
    y1: int
    # Where the row came from, for messages; not part of the row's value.
    line: int | None = field(default=None, compare=False)


@dataclass
class Case:
    """A case's volumes and its readers' rectangles, decoded."""

    record: CaseRecord
    image: np.ndarray  # [S, H, W] float32
    bones: np.ndarray  # [S, H, W] uint8
    geometry: Geometry
    annotations: list[Annotation]
    mask: np.ndarray | None = None  # [S, H, W] uint8 ground truth, where present


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a dataset folder: ``where`` (a file, and its line or field) and ``what``."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class DatasetError(ValueError):
    """Data that breaks the format, found where a tool loads it: one ``path: what`` line per
    problem, as bmlseg-check words it, each ``where`` placed under ``root``."""

    def __init__(self, root: str | os.PathLike, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"{Path(root) / p.where}: {p.what}" for p in self.problems))


def image_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "images" / f"{case_id}{VOLUME_SUFFIX}"


def bones_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "bones" / f"{case_id}{VOLUME_SUFFIX}"


def mask_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "masks" / f"{case_id}{VOLUME_SUFFIX}"


def softlabel_path(root: str | os.PathLike, method: str, case_id: str) -> Path:
    return Path(root) / "softlabels" / method / f"{case_id}{VOLUME_SUFFIX}"


def read_dataset_json(root: str | os.PathLike) -> DatasetInfo:
    """Parse ``<root>/dataset.json``; a malformed file raises ValueError naming every bad field."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (every dataset folder needs one)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    info, problems = _parse_dataset_json(raw, str(path))
    if problems:
        raise ValueError("\n".join(map(str, problems)))
    return info


def write_dataset_json(root: str | os.PathLike, info: DatasetInfo) -> Path:
    payload = {
        "format_version": info.format_version,
        "name": info.name,
        "bones": {str(label): name for label, name in sorted(info.bones.items())},
        "cases": [_case_entry(case) for case in info.cases],
        **info.extra,
    }
    return write_text_atomic(Path(root) / "dataset.json", json.dumps(payload, indent=2) + "\n")


def read_annotations(root: str | os.PathLike) -> list[Annotation]:
    """Parse ``<root>/annotations.csv``; a malformed row raises ValueError naming line and field.

    A file giving DICOM InstanceNumbers (an ``instance`` column in place of ``slice``) has them
    converted to slice indices with each case's ``instance_numbers`` from dataset.json.
    """
    path = Path(root) / "annotations.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (a file holding only the header line is fine)")
    header, lines = _csv_lines(path)
    if header not in (ANNOTATION_COLUMNS, INSTANCE_COLUMNS):
        raise ValueError(f"{path}: line 1: {_header_error(header)}")
    cases = (
        {record.id: record for record in read_dataset_json(root).cases}
        if header == INSTANCE_COLUMNS
        else None
    )
    rows = []
    for line, values in lines:
        try:
            rows.append(_parse_annotation(values, line, cases))
        except ValueError as error:
            raise ValueError(f"{path}: line {line}: {error}") from None
    return rows


def write_annotations(root: str | os.PathLike, rows: list[Annotation]) -> Path:
    lines = [",".join(ANNOTATION_COLUMNS)]
    lines += [",".join(str(getattr(row, column)) for column in ANNOTATION_COLUMNS) for row in rows]
    return write_text_atomic(Path(root) / "annotations.csv", "\n".join(lines) + "\n")


def load_dataset(root: str | os.PathLike) -> tuple[DatasetInfo, list[Annotation]]:
    """dataset.json and annotations.csv, each row checked against the cases and bones as
    bmlseg-check does (its slice and rectangle are checked with its case, in :func:`load_case`).

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: either file is malformed; DatasetError when rows name an unlisted case, a
            reader not among the case's readers, an undeclared bone or an empty rectangle.
    """
    info = read_dataset_json(root)
    annotations = read_annotations(root)
    cases = {record.id: record for record in info.cases}
    bone_names = set(info.bones.values())
    problems = [
        Problem(_annotation_where(row), what)
        for row in annotations
        for what in _annotation_errors(row, cases, bone_names, {})
    ]
    if problems:
        raise DatasetError(root, problems)
    return info, annotations


def load_case(
    root: str | os.PathLike,
    case_id: str,
    *,
    info: DatasetInfo | None = None,
    annotations: list[Annotation] | None = None,
) -> Case:
    """Decode one case's image, bones, optional mask and its annotation rows, checked as
    bmlseg-check checks them (readable, finite, same grid, declared bones, binary mask, rows
    inside the volume).

    Pass ``info`` and ``annotations`` (from :func:`load_dataset`) when loading many cases so
    they are parsed once.

    Raises:
        KeyError: ``case_id`` is not listed in dataset.json.
        DatasetError: any problem of the case's files or rows, each one named.
    """
    if info is None or annotations is None:
        info, annotations = load_dataset(root)
    record = info.case(case_id)
    volumes, problems = _read_case_volumes(Path(root), record, info.bones)
    rows = [row for row in annotations if row.case == case_id]
    if volumes.image is not None:
        shapes = {case_id: volumes.image.shape}
        problems += [
            Problem(_annotation_where(row), what)
            for row in rows
            for what in _annotation_errors(row, {case_id: record}, set(info.bones.values()), shapes)
        ]
    if problems:
        raise DatasetError(root, problems)
    return Case(
        record=record,
        image=volumes.image.astype(np.float32),
        bones=volumes.bones.astype(np.uint8),
        geometry=volumes.geometry,
        annotations=rows,
        mask=volumes.mask.astype(np.uint8) if volumes.mask is not None else None,
    )


# Parsing, shared by the readers above and by check() below.


def _parse_dataset_json(raw: Any, where: str) -> tuple[DatasetInfo, list[Problem]]:
    """The valid part of dataset.json's content, and a Problem for each invalid field."""
    if not isinstance(raw, dict):
        return DatasetInfo(name="", bones={}, cases=[]), [
            Problem(where, "must hold a JSON object with name, bones and cases")
        ]
    problems = [
        Problem(where, f"missing field '{key}'") for key in REQUIRED_FIELDS if key not in raw
    ]
    version = raw.get("format_version", FORMAT_VERSION)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        problems.append(
            Problem(
                f"{where} format_version",
                f"must be an integer from 1 to {FORMAT_VERSION}, got {version!r}",
            )
        )
    name = raw.get("name", "")
    if not isinstance(name, str):
        problems.append(Problem(f"{where} name", f"must be a string, got {name!r}"))
    bones, bone_problems = (
        _parse_bones(raw["bones"], f"{where} bones") if "bones" in raw else ({}, [])
    )
    cases, case_problems = (
        _parse_cases(raw["cases"], f"{where} cases") if "cases" in raw else ([], [])
    )
    info = DatasetInfo(
        name=str(name),
        bones=bones,
        cases=cases,
        format_version=version if type(version) is int else FORMAT_VERSION,
        extra={key: value for key, value in raw.items() if key not in KNOWN_FIELDS},
    )
    return info, problems + bone_problems + case_problems


def _parse_bones(raw: Any, where: str) -> tuple[dict[int, str], list[Problem]]:
    if not isinstance(raw, dict) or not raw:
        return {}, [Problem(where, 'must map integer labels to names, e.g. {"1": "femur"}')]
    bones: dict[int, str] = {}
    problems = []
    for key, name in raw.items():
        if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= 255):
            problems.append(Problem(f"{where}[{key!r}]", "labels must be integers from 1 to 255"))
        elif not isinstance(name, str) or not name:
            problems.append(Problem(f"{where}[{key!r}]", f"must be a bone name, got {name!r}"))
        elif name in bones.values():
            problems.append(Problem(f"{where}[{key!r}]", f"bone name {name!r} is used twice"))
        else:
            bones[int(key)] = name
    return bones, problems


def _parse_cases(raw: Any, where: str) -> tuple[list[CaseRecord], list[Problem]]:
    """The valid cases; duplicate ids and subjects spread over two splits are problems."""
    if not isinstance(raw, list):
        return [], [Problem(where, "must be a list of {id, subject, readers, split} objects")]
    cases, problems = [], []
    first_index: dict[str, int] = {}
    subject_split: dict[str, tuple[str, str]] = {}  # subject -> (split, id of its first case)
    for index, entry in enumerate(raw):
        record, entry_problems = _parse_case(entry, f"{where}[{index}]")
        problems += entry_problems
        if record is None:
            continue
        if record.id in first_index:
            problems.append(
                Problem(
                    f"{where}[{index}].id",
                    f"duplicate case id {record.id!r} (also {where}[{first_index[record.id]}])",
                )
            )
            continue
        first_index[record.id] = index
        cases.append(record)
        if record.split not in SPLITS:
            continue
        split, first_case = subject_split.setdefault(record.subject, (record.split, record.id))
        if split != record.split:
            problems.append(
                Problem(
                    f"{where}[{index}].split",
                    f"subject {record.subject!r} is in split {record.split!r} here and in "
                    f"{split!r} for case {first_case!r}; a subject must stay in one split",
                )
            )
    return cases, problems


def _parse_case(raw: Any, where: str) -> tuple[CaseRecord | None, list[Problem]]:
    """A case entry; with an unknown split or no readers the record still comes back, so that
    its files and annotation rows get checked, next to that Problem."""
    if not isinstance(raw, dict):
        return None, [Problem(where, "must be an object with id, subject, readers, split")]
    problems = [Problem(where, f"missing field '{key}'") for key in CASE_FIELDS if key not in raw]
    if problems:
        return None, problems
    for key in ("id", "subject", "split"):
        if not isinstance(raw[key], str) or not raw[key]:
            problems.append(
                Problem(f"{where}.{key}", f"must be a non-empty string, got {raw[key]!r}")
            )
    if not problems and not CASE_ID_PATTERN.fullmatch(raw["id"]):
        problems.append(
            Problem(
                f"{where}.id",
                f"{raw['id']!r} must be a file name: letters, digits, '.', '_', '-'",
            )
        )
    readers = raw["readers"]
    if not isinstance(readers, list) or not all(isinstance(r, str) and r for r in readers):
        problems.append(Problem(f"{where}.readers", f"must be a list of names, got {readers!r}"))
    elif len(set(readers)) != len(readers):
        problems.append(Problem(f"{where}.readers", f"lists a reader twice: {readers}"))
    numbers = raw.get("instance_numbers")
    if numbers is not None and (
        not isinstance(numbers, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
        or len(set(numbers)) != len(numbers)
    ):
        problems.append(
            Problem(
                f"{where}.instance_numbers",
                "must be a list of distinct integers, the DICOM InstanceNumber of each slice in "
                f"slice order, got {numbers!r}",
            )
        )
    if problems:
        return None, problems
    instance_numbers = tuple(numbers) if numbers is not None else None
    record = CaseRecord(raw["id"], raw["subject"], tuple(readers), raw["split"], instance_numbers)
    if not record.readers:
        problems.append(
            Problem(
                f"{where}.readers",
                "lists no reader; list everyone who rated the case, also those who drew nothing "
                "(the labels divide by their number)",
            )
        )
    if record.split not in SPLITS:
        problems.append(
            Problem(
                f"{where}.split", f"unknown split {record.split!r} (expected {', '.join(SPLITS)})"
            )
        )
    return record, problems


def _csv_lines(path: Path) -> tuple[tuple[str, ...], list[tuple[int, list[str]]]]:
    """The header of a CSV file and each non-blank row with its line number (from 1)."""
    # utf-8-sig: spreadsheet programs start a UTF-8 CSV with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = tuple(value.strip() for value in next(reader, []))
        lines = [(reader.line_num, values) for values in reader if any(v.strip() for v in values)]
    return header, lines


def _header_error(header: tuple[str, ...]) -> str:
    got = ",".join(header)
    # Invisible characters (a zero-width space, a second byte-order mark) shown escaped, so the
    # two headers of the message never look the same.
    shown = got if got.isascii() and got.isprintable() else ascii(got)
    return (
        f"header must be {','.join(ANNOTATION_COLUMNS)} (or with instance for slice: DICOM "
        f"InstanceNumbers), got {shown}"
    )


def _parse_annotation(
    values: list[str], line: int, cases: dict[str, CaseRecord] | None = None
) -> Annotation:
    """One annotations.csv row, from line ``line``; ValueError names the field that is wrong.

    With ``cases``, the row gives an ``instance`` (DICOM InstanceNumber) for its slice, looked up
    in its case's ``instance_numbers``.
    """
    columns = ANNOTATION_COLUMNS if cases is None else INSTANCE_COLUMNS
    if len(values) != len(columns):
        raise ValueError(f"expected {len(columns)} values ({','.join(columns)}), got {len(values)}")
    fields = dict(zip(columns, (value.strip() for value in values), strict=True))
    for column in ("case", "reader", "bone"):
        if not fields[column]:
            raise ValueError(f"field '{column}' is empty")
    numbers = {}
    for column in (columns[2], "x0", "y0", "x1", "y1"):  # slice or instance, then the box
        try:
            numbers[column] = int(fields[column])
        except ValueError:
            raise ValueError(
                f"field '{column}' must be an integer, got {fields[column]!r}"
            ) from None
    if cases is not None:
        instance = numbers.pop("instance")
        numbers["slice"] = _slice_of_instance(instance, fields["case"], cases.get(fields["case"]))
    return Annotation(
        case=fields["case"], reader=fields["reader"], bone=fields["bone"], **numbers, line=line
    )


def _slice_of_instance(instance: int, case_id: str, record: CaseRecord | None) -> int:
    """The slice index of DICOM InstanceNumber ``instance`` in the scan of case ``case_id``."""
    if record is None:
        raise ValueError(
            f"case {case_id!r} is not listed in dataset.json, so its instance cannot be placed"
        )
    if record.instance_numbers is None:
        raise ValueError(
            f"field 'instance': case {record.id} has no instance_numbers in dataset.json to "
            "turn InstanceNumbers into slices (bmlseg.io.dicom_instance_numbers gives them)"
        )
    if instance not in record.instance_numbers:
        shown = sorted(record.instance_numbers)
        raise ValueError(
            f"field 'instance': {instance} is not among case {record.id}'s instance_numbers "
            f"({shown[0]}..{shown[-1]})"
        )
    return record.instance_numbers.index(instance)


def _case_entry(case: CaseRecord) -> dict[str, Any]:
    """A case as dataset.json holds it; ``instance_numbers`` only where given."""
    entry = {**asdict(case), "readers": list(case.readers)}
    if case.instance_numbers is None:
        del entry["instance_numbers"]
    else:
        entry["instance_numbers"] = list(case.instance_numbers)
    return entry


# Validation: bmlseg-check.


def check(root: str | os.PathLike, *, progress: bool = False) -> list[Problem]:
    """Every problem found in the dataset folder ``root``; empty when it is valid.

    Reads dataset.json, annotations.csv and every volume (images, bones, masks, softlabels)
    and writes nothing. ``where`` in each Problem is relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "no such folder")]
    path = root / "dataset.json"
    if not path.exists():
        return [Problem("dataset.json", "missing (every dataset folder needs one)")]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [Problem("dataset.json", f"not valid JSON ({error})")]
    info, problems = _parse_dataset_json(raw, "dataset.json")
    if not isinstance(raw, dict) or any(key not in raw for key in REQUIRED_FIELDS):
        # Files and rows are checked against the cases and bones: without them, every one fails.
        return problems
    grids: dict[str, Grid] = {}
    for record in tqdm(info.cases, desc="checking volumes", unit="case", disable=not progress):
        volumes, volume_problems = _read_case_volumes(root, record, info.bones)
        problems += volume_problems
        if volumes.image is not None:
            grids[record.id] = (volumes.image.shape, volumes.geometry)
    known = {record.id for record in info.cases}
    problems += _check_unlisted_files(root, known)
    problems += _check_softlabels(root, known, grids)
    problems += _check_annotations(root, info, {case: grid[0] for case, grid in grids.items()})
    return problems


@dataclass
class _CaseVolumes:
    """A case's volumes as read for checking; None where missing or unreadable."""

    image: np.ndarray | None = None
    geometry: Geometry | None = None
    bones: np.ndarray | None = None
    mask: np.ndarray | None = None


def _read_case_volumes(
    root: Path, record: CaseRecord, bone_names: dict[int, str]
) -> tuple[_CaseVolumes, list[Problem]]:
    """One case's image, bones and mask (if any), and every problem found in them."""
    volumes = _CaseVolumes()
    volumes.image, volumes.geometry, problems = _read_for_check(image_path(root, record.id), root)
    grid = None
    if volumes.image is not None:
        problems += image_problems(volumes.image, _relative(image_path(root, record.id), root))
        grid = (volumes.image.shape, volumes.geometry)
        numbers = record.instance_numbers
        if numbers is not None and len(numbers) != volumes.image.shape[0]:
            problems.append(
                Problem(
                    "dataset.json",
                    f"case {record.id}: instance_numbers lists {len(numbers)} numbers, its image "
                    f"has {volumes.image.shape[0]} slices",
                )
            )
    bones, bones_geometry, read_problems = _read_for_check(bones_path(root, record.id), root)
    problems += read_problems
    if bones is not None:
        where = _relative(bones_path(root, record.id), root)
        problems += bones_problems(bones, bones_geometry, where, grid, bone_names)
        volumes.bones = bones
    if mask_path(root, record.id).exists():
        mask, mask_geometry, read_problems = _read_for_check(mask_path(root, record.id), root)
        problems += read_problems
        if mask is not None:
            where = _relative(mask_path(root, record.id), root)
            problems += mask_problems(mask, mask_geometry, where, grid)
            volumes.mask = mask
    return volumes, problems


# The grid a volume must share: its image's shape and geometry (None where the image is
# unreadable, and nothing can be compared).
Grid = tuple[tuple[int, ...], Geometry] | None


def image_problems(image: np.ndarray, where: str) -> list[Problem]:
    """An image's problems: NaN or infinite voxels, or a blank image (one value everywhere)."""
    problems = _non_finite_problems(image, where)
    if not problems and image.size and image.min() == image.max():
        problems.append(Problem(where, f"blank: every voxel is {image.flat[0]}"))
    return problems


def bones_problems(
    bones: np.ndarray,
    geometry: Geometry,
    where: str,
    grid: Grid,
    bone_names: dict[int, str] | None,
) -> list[Problem]:
    """A bone volume's problems: not finite, labels not in ``bone_names`` (unless None), no
    bone voxel, not on the image's grid."""
    return _label_problems(bones, where, bone_names) + _grid_problems(
        bones.shape, geometry, where, grid
    )


def mask_problems(mask: np.ndarray, geometry: Geometry, where: str, grid: Grid) -> list[Problem]:
    """A ground-truth mask's problems: values other than 0 and 1, not on the image's grid."""
    problems = _non_finite_problems(mask, where)
    extra = np.setdiff1d(np.unique(mask[np.isfinite(mask)]), [0, 1])
    if extra.size:
        problems.append(Problem(where, f"values must be 0 or 1, found {extra[:5]}"))
    return problems + _grid_problems(mask.shape, geometry, where, grid)


def softlabel_problems(
    label: np.ndarray, geometry: Geometry, where: str, grid: Grid
) -> list[Problem]:
    """A soft label's problems: values outside [0, 1] (NaN included), not on the image's grid."""
    problems = []
    if np.isnan(label).any() or label.min() < 0 or label.max() > 1:
        problems.append(
            Problem(where, f"values must lie in [0, 1], found {label.min()}..{label.max()}")
        )
    return problems + _grid_problems(label.shape, geometry, where, grid)


def _read_for_check(
    path: Path, root: Path
) -> tuple[np.ndarray | None, Geometry | None, list[Problem]]:
    try:
        array, geometry = read_volume(path)
    except FileNotFoundError:
        return None, None, [Problem(_relative(path, root), "missing")]
    except ValueError as error:
        # read_volume's message starts with the full path; the Problem names it already.
        reason = str(error).removeprefix(f"{path}: ")
        return None, None, [Problem(_relative(path, root), f"unreadable: {reason}")]
    return array, geometry, []


def _non_finite_problems(array: np.ndarray, where: str) -> list[Problem]:
    if not np.issubdtype(array.dtype, np.floating):
        return []
    count = int(np.count_nonzero(~np.isfinite(array)))
    if count:
        return [Problem(where, f"{count} NaN or infinite voxel(s)")]
    return []


def _label_problems(
    bones: np.ndarray, where: str, bone_names: dict[int, str] | None
) -> list[Problem]:
    problems = _non_finite_problems(bones, where)
    if problems:
        return problems
    labels = np.unique(bones)
    names = bone_names or {}
    undeclared = [value for value in labels.tolist() if value != 0 and value not in names]
    if bone_names is not None and undeclared:
        declared = ", ".join(f"{label} {name}" for label, name in sorted(names.items()))
        problems.append(
            Problem(
                where,
                f"labels {undeclared[:10]} are not declared in dataset.json bones ({declared})",
            )
        )
    if not np.any(labels != 0):
        problems.append(Problem(where, "no bone voxels (the crop is centred on the bones)"))
    return problems


def _grid_problems(
    shape: tuple[int, ...], geometry: Geometry, where: str, grid: Grid
) -> list[Problem]:
    """Shape and geometry differences from the case's image, each field named."""
    if grid is None:
        return []
    image_shape, image_geometry = grid
    if shape != image_shape:
        return [Problem(where, f"shape {shape} differs from the image's {image_shape}")]
    return [
        Problem(
            where,
            f"{name} {getattr(geometry, name)} differs from the image's "
            f"{getattr(image_geometry, name)}",
        )
        for name in image_geometry.mismatch(geometry)
    ]


def _check_unlisted_files(root: Path, known: set[str]) -> list[Problem]:
    problems = []
    for folder in ("images", "bones", "masks"):
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            case_id = path.name.removesuffix(VOLUME_SUFFIX)
            if path.name.startswith("."):
                continue
            if not path.name.endswith(VOLUME_SUFFIX):
                problems.append(
                    Problem(_relative(path, root), f"expected <case id>{VOLUME_SUFFIX} files here")
                )
            elif case_id not in known:
                problems.append(
                    Problem(
                        _relative(path, root), f"case {case_id!r} is not listed in dataset.json"
                    )
                )
    return problems


def _check_softlabels(root: Path, known: set[str], grids: dict[str, Grid]) -> list[Problem]:
    """Soft labels, where present: a listed case, the image's geometry, values in [0, 1]."""
    problems = []
    for path in sorted((root / "softlabels").glob(f"*/*{VOLUME_SUFFIX}")):
        where = _relative(path, root)
        case_id = path.name.removesuffix(VOLUME_SUFFIX)
        if case_id not in known:
            problems.append(Problem(where, f"case {case_id!r} is not listed in dataset.json"))
            continue
        label, geometry, read_problems = _read_for_check(path, root)
        problems += read_problems
        if label is not None:
            problems += softlabel_problems(label, geometry, where, grids.get(case_id))
    return problems


def _check_annotations(
    root: Path, info: DatasetInfo, shapes: dict[str, tuple[int, ...]]
) -> list[Problem]:
    path = root / "annotations.csv"
    if not path.exists():
        return [Problem("annotations.csv", "missing (a file holding only the header is fine)")]
    try:
        header, lines = _csv_lines(path)
    except (UnicodeDecodeError, csv.Error) as error:
        return [Problem("annotations.csv", f"not a readable CSV file ({error})")]
    if header not in (ANNOTATION_COLUMNS, INSTANCE_COLUMNS):
        return [Problem("annotations.csv line 1", _header_error(header))]
    cases = {record.id: record for record in info.cases}
    bone_names = set(info.bones.values())
    problems = []
    for line, values in lines:
        where = f"annotations.csv line {line}"
        try:
            row = _parse_annotation(values, line, cases if header == INSTANCE_COLUMNS else None)
        except ValueError as error:
            problems.append(Problem(where, str(error)))
            continue
        problems += [
            Problem(where, what) for what in _annotation_errors(row, cases, bone_names, shapes)
        ]
    return problems


def _annotation_errors(
    row: Annotation,
    cases: dict[str, CaseRecord],
    bone_names: set[str],
    shapes: dict[str, tuple[int, ...]],
) -> list[str]:
    errors = []
    record = cases.get(row.case)
    if record is None:
        errors.append(f"case {row.case!r} is not listed in dataset.json")
    elif row.reader not in record.readers:
        errors.append(
            f"reader {row.reader!r} is not among case {row.case}'s readers "
            f"({', '.join(record.readers)})"
        )
    if row.bone not in bone_names:
        errors.append(
            f"bone {row.bone!r} is not declared in dataset.json bones ({', '.join(sorted(bone_names))})"
        )
    if row.x1 <= row.x0 or row.y1 <= row.y0:
        errors.append(
            f"empty rectangle x0={row.x0} x1={row.x1} y0={row.y0} y1={row.y1} "
            "(needs x1 > x0 and y1 > y0; x1, y1 are exclusive)"
        )
    if row.case in shapes:
        slices, height, width = shapes[row.case]
        if not 0 <= row.slice < slices:
            errors.append(f"slice {row.slice} is outside 0..{slices - 1} of case {row.case}")
        if row.x0 < 0 or row.y0 < 0 or row.x1 > width or row.y1 > height:
            errors.append(
                f"rectangle x {row.x0}..{row.x1}, y {row.y0}..{row.y1} leaves the image "
                f"(width {width}, height {height})"
            )
    return errors


def _annotation_where(row: Annotation) -> str:
    return f"annotations.csv line {row.line}" if row.line is not None else "annotations.csv"


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def main_check(argv: Sequence[str] | None = None) -> int:
    """``bmlseg-check ROOT``: print every problem and return 1, or an OK summary and return 0."""
    parser = argparse.ArgumentParser(
        prog="bmlseg-check",
        description="Validate a bmlseg dataset folder (see docs/dataset.md). Writes nothing.",
    )
    parser.add_argument("root", type=Path, help="the dataset folder, holding dataset.json")
    args = parser.parse_args(argv)
    problems = check(args.root, progress=True)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.root}: {len(problems)} problem(s)")
        return 1
    print(_summary(args.root))
    return 0


def _summary(root: Path) -> str:
    """The OK line of a valid folder, and a line saying which evaluations it supports."""
    info = read_dataset_json(root)
    splits = ", ".join(f"{len(info.split(split))} {split}" for split in SPLITS)
    subjects = len({record.subject for record in info.cases})
    readers = len({reader for record in info.cases for reader in record.readers})
    methods = sorted(path.name for path in (root / "softlabels").glob("*") if path.is_dir())
    return (
        f"OK {root}: {len(info.cases)} cases ({splits}), {subjects} subjects, {readers} readers, "
        f"{len(read_annotations(root))} annotations, "
        f"soft labels: {', '.join(methods) or 'none'}\n{_evaluations(root, info)}\n"
        f"{_scan_grids(root, info)}"
    )


def _scan_grids(root: Path, info: DatasetInfo) -> str:
    """The orientations and pixel sizes of the images, which training brings to the model's
    grid (docs/dataset.md, "Orientation, pixel size and the model's grid")."""
    geometries = [read_geometry(image_path(root, record.id)) for record in info.cases]
    orientations = Counter(geometry.orientation for geometry in geometries)
    pixels = Counter(f"{g.spacing[0]:.3g} x {g.spacing[1]:.3g} mm" for g in geometries)
    thickness = sorted({round(g.spacing[2], 3) for g in geometries})
    slices = f"{thickness[0]:g}" + (f"-{thickness[-1]:g}" if len(thickness) > 1 else "")
    return (
        "images/: orientation "
        + ", ".join(f"{code} ({count})" for code, count in orientations.most_common())
        + "; pixels "
        + ", ".join(f"{size} ({count})" for size, count in pixels.most_common())
        + f"; slices {slices} mm apart: bmlseg-train and bmlseg-predict "
        "reorient them to data.orientation and resample them to data.spacing_mm"
    )


def _evaluations(root: Path, info: DatasetInfo) -> str:
    """Which cases have masks/, and so what bmlseg-train validates and tests against (its
    train.validate_against=auto; docs/training.md, "Without pixelwise truth")."""
    with_mask = {record.id for record in info.cases if mask_path(root, record.id).exists()}
    counts = {
        split: (sum(record.id in with_mask for record in info.split(split)), len(info.split(split)))
        for split in ("val", "test")
    }
    found, total = counts["val"]
    if total == 0:
        validation = "no val split: bmlseg-train refuses the folder (validation chooses best.pt)"
    elif found == total:
        validation = "validation selects against the pixelwise truth"
    else:
        validation = "validation selects against the soft labels' confident cores"
    found, total = counts["test"]
    if total == 0:
        test = "no test split: bmlseg-train refuses the folder (it ends by testing best.pt)"
    elif found == total:
        test = "test metrics against the pixelwise truth"
    else:
        test = (
            "no test metrics against pixelwise truth (bmlseg-train scores the test split against "
            "the soft labels' confident cores)"
        )
    per_split = ", ".join(f"{split} {found}/{total}" for split, (found, total) in counts.items())
    return (
        f"masks/: {len(with_mask)} of {len(info.cases)} cases ({per_split}): {validation}; {test}"
    )
