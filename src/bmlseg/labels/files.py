"""Writing a method's labels for a dataset folder: ``softlabels/<method>/<case>.nii.gz``.

Beside the volumes, ``softlabels/<method>/options.json`` records what they were made from: the
options, so a rerun with other options cannot silently mix old and new labels, and a digest of
each case's inputs, so a label whose image, bones, mask or ratings changed is made again.

The folder is written as a whole: a temporary folder (``softlabels/.tmp-*-<method>``) takes the
labels kept and the labels made, then replaces the folder. An interrupted run leaves the old
folder as it was; only a killed one can leave its temporary folder, removed by the next run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bmlseg.data.format import (
    ANNOTATION_COLUMNS,
    VOLUME_SUFFIX,
    Annotation,
    Case,
    CaseRecord,
    DatasetInfo,
    bones_path,
    image_path,
    load_case,
    load_dataset,
    mask_path,
    softlabel_path,
)
from bmlseg.io import atomic_folder, write_text_atomic, write_volume
from bmlseg.labels.methods import METHODS, resolve_options

log = logging.getLogger(__name__)

OPTIONS_FILE = "options.json"


class LabelOptionsError(ValueError):
    """Labels exist that were made with other options than those asked for."""

    def __init__(
        self,
        path: Path,
        recorded: dict[str, Any],
        asked: dict[str, Any],
        remedy: str = "pass overwrite=True to remake them",
    ) -> None:
        self.path, self.recorded, self.asked = path, recorded, asked
        super().__init__(
            f"{path}: the labels there were made with options {recorded}, not {asked}; {remedy}"
        )

    def with_remedy(self, remedy: str) -> LabelOptionsError:
        """The same error, telling the way out of the tool that raises it."""
        return LabelOptionsError(self.path, self.recorded, self.asked, remedy)


def generate(
    root: str | os.PathLike,
    method: str,
    *,
    cases: Iterable[str] | None = None,
    overwrite: bool = False,
    **options,
) -> list[Path]:
    """Write ``method``'s label of every case (or of ``cases``) under ``root/softlabels/``.

    Labels are float32 ``[S, H, W]`` in [0, 1] with the image's geometry. Existing labels are
    kept unless ``overwrite``, or unless their case's inputs changed since (they are made again,
    with a warning naming the case and the input): a rerun only fills in what is missing or
    stale, and gives the same files either way (every method is deterministic). Each case is
    checked as it is loaded (bmlseg.data.format.load_case).

    Returns:
        The label paths, one per case, in the order of ``cases`` (or of dataset.json).

    Raises:
        ValueError: unknown method or option; DatasetError for a broken case.
        KeyError: a case of ``cases`` is not listed in dataset.json.
        LabelOptionsError: existing labels were made with other options and ``overwrite`` is
            False.
    """
    resolved = resolve_options(method, **options)
    info, annotations = load_dataset(root)
    case_ids = [record.id for record in info.cases] if cases is None else list(cases)
    for case_id in case_ids:
        info.case(case_id)
    folder = Path(root) / "softlabels" / method
    with _locked(Path(root), folder):
        record = _read_record(folder)
        if record is not None and record["options"] != resolved and not overwrite:
            raise LabelOptionsError(folder / OPTIONS_FILE, record["options"], resolved)
        inputs = {case.id: case_inputs(root, case, info, annotations) for case in info.cases}
        kept = {} if overwrite or record is None else _still_valid(folder, record, inputs)
        missing = [case_id for case_id in case_ids if case_id not in kept]
        if missing:
            made = {case_id: inputs[case_id] for case_id in missing}
            _write_folder(root, method, resolved, info, annotations, kept, made)
    return [softlabel_path(root, method, case_id) for case_id in case_ids]


def recorded_options(root: str | os.PathLike, method: str) -> dict[str, Any]:
    """The options ``softlabels/<method>/`` was made with; empty when nothing is recorded."""
    record = _read_record(Path(root) / "softlabels" / method)
    return record["options"] if record is not None else {}


def case_inputs(
    root: str | os.PathLike,
    record: CaseRecord,
    info: DatasetInfo,
    annotations: list[Annotation],
) -> dict[str, str | None]:
    """SHA-256 digests of what a case's labels are made from: its image, bones and mask files
    (None for a missing file: no mask, or a file that load_case will refuse), and its ratings
    (the case's readers, its annotation rows and the bones they name)."""
    rows = [
        [getattr(row, column) for column in ANNOTATION_COLUMNS]
        for row in annotations
        if row.case == record.id
    ]
    ratings = {"readers": list(record.readers), "rows": rows, "bones": info.bones}
    return {
        "image": _file_digest(image_path(root, record.id)),
        "bones": _file_digest(bones_path(root, record.id)),
        "mask": _file_digest(mask_path(root, record.id)),
        "ratings": hashlib.sha256(json.dumps(ratings, sort_keys=True).encode()).hexdigest(),
    }


def _still_valid(
    folder: Path, record: dict[str, Any], inputs: dict[str, dict[str, str | None]]
) -> dict[str, dict[str, str | None]]:
    """The recorded labels whose case is still listed, whose file is there and whose inputs are
    those recorded; a warning names each label left out because an input changed."""
    kept = {}
    for case_id, recorded in record["inputs"].items():
        if case_id not in inputs or not (folder / f"{case_id}{VOLUME_SUFFIX}").exists():
            continue
        changed = [name for name, digest in inputs[case_id].items() if recorded.get(name) != digest]
        if changed:
            log.warning(
                "%s: case %s's %s changed since its label was made; making it again",
                folder,
                case_id,
                ", ".join(changed),
            )
        else:
            kept[case_id] = recorded
    return kept


def _write_folder(
    root: str | os.PathLike,
    method: str,
    options: dict[str, Any],
    info: DatasetInfo,
    annotations: list[Annotation],
    kept: dict[str, dict[str, str | None]],
    made: dict[str, dict[str, str | None]],
) -> None:
    """Replace ``softlabels/<method>/`` with the ``kept`` labels and those of the ``made`` cases,
    and the record of both."""
    folder = Path(root) / "softlabels" / method
    with atomic_folder(folder) as staging:
        for case_id in kept:
            _link_or_copy(
                folder / f"{case_id}{VOLUME_SUFFIX}", staging / f"{case_id}{VOLUME_SUFFIX}"
            )
        for case_id in tqdm(made, desc=f"labels {method}", unit="case"):
            case = load_case(root, case_id, info=info, annotations=annotations)
            label = METHODS[method](case, info.bone_labels, **options)
            _check_label(label, case, method)
            write_volume(staging / f"{case_id}{VOLUME_SUFFIX}", label, case.geometry)
        record = {"method": method, "options": options, "inputs": {**kept, **made}}
        write_text_atomic(staging / OPTIONS_FILE, json.dumps(record, indent=2) + "\n")


def _read_record(folder: Path) -> dict[str, Any] | None:
    """options.json of a label folder, ``inputs`` empty where an older bmlseg wrote none (its
    labels are then made again); None when there is none."""
    path = folder / OPTIONS_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return {"inputs": {}, **record}


@contextmanager
def _locked(root: Path, folder: Path) -> Iterator[None]:
    """Hold a lock on the dataset folder ``root`` and remove what killed runs left of the label
    folder ``folder`` (its temporary folders).

    Runs of one sweep may make the same labels at once: the lock makes the later ones wait and
    then keep the labels the first one made. Inside it, a temporary folder of the method can
    only be a killed run's leftover. The lock is on the folder itself, so it writes nothing.
    """
    descriptor = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        for leftover in folder.parent.glob(f".*-{folder.name}"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no copy of the data), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_label(label: np.ndarray, case: Case, method: str) -> None:
    """Guard the contract every consumer of softlabels/ relies on."""
    if label.dtype != np.float32 or label.shape != case.image.shape:
        raise RuntimeError(
            f"label method {method!r} returned {label.dtype} {label.shape} for case "
            f"{case.record.id!r}, expected float32 {case.image.shape}"
        )
    if not np.all((label >= 0.0) & (label <= 1.0)):
        raise RuntimeError(
            f"label method {method!r} returned values outside [0, 1] for case {case.record.id!r}"
        )
