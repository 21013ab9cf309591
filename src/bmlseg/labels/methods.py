"""The registry of label methods: name -> ``make_label(case, bone_labels, **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from bmlseg.data.format import Case
from bmlseg.labels.baselines import (
    binary_any_label,
    binary_majority_label,
    dilate_label,
    staple_label,
    svls_label,
    uniform_label,
)
from bmlseg.labels.kimriss import KimrissOptions, kimriss_hard_label, kimriss_label
from bmlseg.labels.truth import truth_label

MakeLabel = Callable[..., np.ndarray]

METHODS: dict[str, MakeLabel] = {
    "kimriss": kimriss_label,
    "kimriss_hard": kimriss_hard_label,
    "truth": truth_label,
    "binary_any": binary_any_label,
    "binary_majority": binary_majority_label,
    "staple": staple_label,
    "svls": svls_label,
    "dilate": dilate_label,
    "uniform": uniform_label,
}


def label_case(case: Case, bone_labels: dict[str, int], method: str, **options) -> np.ndarray:
    """``METHODS[method](case, bone_labels, **options)``: ``[S, H, W]`` float32 in [0, 1]."""
    return METHODS[_known(method)](case, bone_labels, **resolve_options(method, **options))


def resolve_options(method: str, **options) -> dict[str, Any]:
    """Every option of ``method``, the given ones over its defaults (what a label was made with).

    Raises:
        ValueError: an unknown method or option, naming the ones that exist.
    """
    if _known(method) in ("kimriss", "kimriss_hard"):
        # kimriss_hard takes kimriss's options and its own threshold.
        own = {
            name: options.pop(name, parameter.default)
            for name, parameter in _keyword_parameters(method).items()
        }
        names = [field.name for field in fields(KimrissOptions)]
        _check_names(method, options, names + list(own))
        return {**asdict(KimrissOptions(**options)), **own}
    parameters = _keyword_parameters(method)
    _check_names(method, options, list(parameters))
    resolved = {name: parameter.default for name, parameter in parameters.items()}
    resolved.update(options)
    return {name: _plain(value) for name, value in resolved.items()}


def _keyword_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The options of ``METHODS[method]`` named in its signature (after case and bone_labels)."""
    parameters = list(inspect.signature(METHODS[method]).parameters.values())[2:]
    return {
        parameter.name: parameter
        for parameter in parameters
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _plain(value: Any) -> Any:
    """Sequences as lists, so options compare equal however they were given (tuple, YAML list)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def _known(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown label method {method!r}; known: {', '.join(METHODS)}")
    return method


def _check_names(method: str, options: dict[str, Any], names: list[str]) -> None:
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"label method {method!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(names) or 'none'}"
        )
