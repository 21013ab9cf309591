"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only::

    {"step", "model", "optimizer", "scaler",
     "best": {"metric", "value", "step", "score_threshold"},
     "rng": [one state per rank], "config": the run's resolved config, "num_classes",
     "label_method", "bone_names": {label: name} of the training dataset}
"""

from __future__ import annotations

import os
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bmlseg.data.grid import ModelGrid
from bmlseg.io import atomic_path
from bmlseg.models import IMaskRCNN, build_model


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` under a temporary name, then rename it into place."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return path


# What bmlseg-train writes into every checkpoint.
CHECKPOINT_KEYS = (
    "step",
    "model",
    "optimizer",
    "scaler",
    "best",
    "rng",
    "config",
    "num_classes",
    "label_method",
    "bone_names",
)


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by bmlseg-train (CHECKPOINT_KEYS).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: torch cannot read it, or it is not a bmlseg checkpoint (e.g. a bare model
            state_dict), saying what it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable bmlseg checkpoint ({error})") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(
            f"{path}: not a bmlseg checkpoint: expected a dict with {', '.join(CHECKPOINT_KEYS)} "
            f"(checkpoints/last.pt or best.pt of a bmlseg-train run), found {_described(state)}"
        )
    data = state["config"].get("data", {})
    without = [field.name for field in fields(ModelGrid) if field.name not in data]
    if without:
        raise ValueError(
            f"{path}: written by a bmlseg from before the model's grid: its config has no "
            f"{', '.join(f'data.{name}' for name in without)} (the orientation and pixel size "
            "its model saw scans at); train it again with this version"
        )
    return state


def _described(value: Any) -> str:
    if not isinstance(value, dict):
        return f"a {type(value).__name__}"
    keys = list(value)
    shown = ", ".join(map(str, keys[:6])) + (", ..." if len(keys) > 6 else "")
    return f"a dict of {len(keys)} key(s): {shown}" if keys else "an empty dict"


def model_from_checkpoint(
    checkpoint: dict[str, Any], device: torch.device | str = "cpu"
) -> IMaskRCNN:
    """The trained model of a checkpoint, in eval mode."""
    config = checkpoint["config"]
    model = build_model(
        config["model"], config["loss"], checkpoint["num_classes"], pretrained=False
    )
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or infinity."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [
        name
        for name, tensor in tensors
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, as plain types and tensors."""
    version, numpy_keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy": {
            "version": version,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, position, has_gauss, cached = (
        state["numpy"][key]
        for key in ("version", "keys", "position", "has_gauss", "cached_gaussian")
    )
    random.setstate(_as_tuples(state["python"]))
    numpy_state = (version, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached)
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([generator.cpu() for generator in state["cuda"]])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a round trip may turn into lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(item) for item in value)
    return value
