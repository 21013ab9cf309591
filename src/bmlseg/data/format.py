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
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmlseg.io import Geometry, read_volume

FORMAT_VERSION = 1
ANNOTATION_COLUMNS = ("case", "reader", "slice", "bone", "x0", "y0", "x1", "y1")
SPLITS = ("train", "val", "test")
VOLUME_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class CaseRecord:
    """One scan: ``id`` names its files; ``readers`` lists everyone who rated it."""

    id: str
    subject: str
    readers: tuple[str, ...]
    split: str


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


@dataclass
class Case:
    """A case's volumes and its readers' rectangles, decoded."""

    record: CaseRecord
    image: np.ndarray  # [S, H, W] float32
    bones: np.ndarray  # [S, H, W] uint8
    geometry: Geometry
    annotations: list[Annotation]
    mask: np.ndarray | None = None  # [S, H, W] uint8 ground truth, where present


def image_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "images" / f"{case_id}{VOLUME_SUFFIX}"


def bones_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "bones" / f"{case_id}{VOLUME_SUFFIX}"


def mask_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / "masks" / f"{case_id}{VOLUME_SUFFIX}"


def softlabel_path(root: str | os.PathLike, method: str, case_id: str) -> Path:
    return Path(root) / "softlabels" / method / f"{case_id}{VOLUME_SUFFIX}"


def read_dataset_json(root: str | os.PathLike) -> DatasetInfo:
    """Parse ``<root>/dataset.json``; a malformed file raises ValueError naming the field."""
    path = Path(root) / "dataset.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (every dataset folder needs one)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    for key in ("name", "bones", "cases"):
        if key not in raw:
            raise ValueError(f"{path}: missing field '{key}'")
    try:
        bones = {int(label): str(name) for label, name in raw["bones"].items()}
    except (AttributeError, ValueError):
        raise ValueError(
            f"{path}: field 'bones' must map integer labels to names, e.g. {{\"1\": \"femur\"}}"
        ) from None
    cases = []
    for index, case in enumerate(raw["cases"]):
        missing = [key for key in ("id", "subject", "readers", "split") if key not in case]
        if missing:
            raise ValueError(f"{path}: cases[{index}] is missing {', '.join(missing)}")
        cases.append(
            CaseRecord(
                id=str(case["id"]),
                subject=str(case["subject"]),
                readers=tuple(str(reader) for reader in case["readers"]),
                split=str(case["split"]),
            )
        )
    known = {"format_version", "name", "bones", "cases"}
    return DatasetInfo(
        name=str(raw["name"]),
        bones=bones,
        cases=cases,
        format_version=int(raw.get("format_version", FORMAT_VERSION)),
        extra={key: value for key, value in raw.items() if key not in known},
    )


def write_dataset_json(root: str | os.PathLike, info: DatasetInfo) -> Path:
    payload = {
        "format_version": info.format_version,
        "name": info.name,
        "bones": {str(label): name for label, name in sorted(info.bones.items())},
        "cases": [{**asdict(case), "readers": list(case.readers)} for case in info.cases],
        **info.extra,
    }
    return write_text_atomic(Path(root) / "dataset.json", json.dumps(payload, indent=2) + "\n")


def read_annotations(root: str | os.PathLike) -> list[Annotation]:
    """Parse ``<root>/annotations.csv``; a malformed row raises ValueError naming its line."""
    path = Path(root) / "annotations.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (an empty file with the header is fine)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != ANNOTATION_COLUMNS:
            raise ValueError(
                f"{path}: header must be {','.join(ANNOTATION_COLUMNS)}, got "
                f"{','.join(reader.fieldnames or [])}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(
                    Annotation(
                        case=row["case"],
                        reader=row["reader"],
                        slice=int(row["slice"]),
                        bone=row["bone"],
                        **{key: int(row[key]) for key in ("x0", "y0", "x1", "y1")},
                    )
                )
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}: line {line}: slice, x0, y0, x1, y1 must be integers, got {row}"
                ) from None
    return rows


def write_annotations(root: str | os.PathLike, rows: list[Annotation]) -> Path:
    lines = [",".join(ANNOTATION_COLUMNS)]
    lines += [",".join(str(getattr(row, column)) for column in ANNOTATION_COLUMNS) for row in rows]
    return write_text_atomic(Path(root) / "annotations.csv", "\n".join(lines) + "\n")


def load_case(
    root: str | os.PathLike,
    case_id: str,
    *,
    info: DatasetInfo | None = None,
    annotations: list[Annotation] | None = None,
) -> Case:
    """Decode one case's image, bones, optional mask and its annotation rows.

    Pass ``info`` and ``annotations`` when loading many cases so they are parsed once.
    """
    info = info or read_dataset_json(root)
    annotations = annotations if annotations is not None else read_annotations(root)
    image, geometry = read_volume(image_path(root, case_id))
    bones, _ = read_volume(bones_path(root, case_id))
    mask = None
    if mask_path(root, case_id).exists():
        mask = read_volume(mask_path(root, case_id))[0].astype(np.uint8)
    return Case(
        record=info.case(case_id),
        image=image.astype(np.float32),
        bones=bones.astype(np.uint8),
        geometry=geometry,
        annotations=[row for row in annotations if row.case == case_id],
        mask=mask,
    )


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
