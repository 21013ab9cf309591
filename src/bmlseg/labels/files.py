"""Writing a method's labels for a dataset folder: ``softlabels/<method>/<case>.nii.gz``.

Beside the volumes, ``softlabels/<method>/options.json`` records the options they were made with,
so a rerun with other options cannot silently mix old and new labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bmlseg.data.format import (
    Case,
    load_case,
    read_annotations,
    read_dataset_json,
    softlabel_path,
    write_text_atomic,
)
from bmlseg.io import write_volume
from bmlseg.labels.methods import METHODS, resolve_options

OPTIONS_FILE = "options.json"


def generate(
    root: str | os.PathLike,
    method: str,
    *,
    cases: Iterable[str] | None = None,
    overwrite: bool = False,
    **options,
) -> list[Path]:
    """Write ``method``'s label of every case (or of ``cases``) under ``root/softlabels/``.

    Labels are float32 ``[S, H, W]`` in [0, 1] with the image's geometry, written atomically.
    Existing files are kept unless ``overwrite``: a rerun only fills in what is missing, and
    gives the same files either way (every method is deterministic).

    Returns:
        The label paths, one per case, in the order of ``cases`` (or of dataset.json).

    Raises:
        ValueError: unknown method, option or case; or existing labels were made with other
            options and ``overwrite`` is False.
    """
    resolved = resolve_options(method, **options)
    info = read_dataset_json(root)
    annotations = read_annotations(root)
    case_ids = [record.id for record in info.cases] if cases is None else list(cases)
    for case_id in case_ids:
        info.case(case_id)
    _record_options(root, method, resolved, overwrite=overwrite)
    paths = []
    for case_id in tqdm(case_ids, desc=f"labels {method}", unit="case"):
        path = softlabel_path(root, method, case_id)
        if overwrite or not path.exists():
            case = load_case(root, case_id, info=info, annotations=annotations)
            label = METHODS[method](case, info.bone_labels, **resolved)
            _check_label(label, case, method)
            write_volume(path, label, case.geometry)
        paths.append(path)
    return paths


def recorded_options(root: str | os.PathLike, method: str) -> dict[str, Any]:
    """The options ``softlabels/<method>/`` was made with; empty when nothing is recorded."""
    path = Path(root) / "softlabels" / method / OPTIONS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["options"] if path.exists() else {}


def _record_options(
    root: str | os.PathLike, method: str, options: dict[str, Any], *, overwrite: bool
) -> None:
    path = Path(root) / "softlabels" / method / OPTIONS_FILE
    if path.exists() and not overwrite:
        recorded = recorded_options(root, method)
        if recorded != options:
            raise ValueError(
                f"{path}: the labels there were made with options {recorded}, not {options}; "
                "pass overwrite=True (labels.overwrite=true) to remake them"
            )
        return
    write_text_atomic(path, json.dumps({"method": method, "options": options}, indent=2) + "\n")


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
