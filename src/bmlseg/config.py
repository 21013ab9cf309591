"""Typed schemas of the Hydra configs, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` hold the values; these dataclasses say which keys exist and of
which type, so a mistyped override (``loss.bcee=1``, ``train.amp=fp61``) fails at composition
with an error naming the key, instead of being silently ignored. Each primary config
(``train.yaml``, ``evaluate.yaml``, ...) lists its schema first in its defaults list.

Each value is written once. A field is ``MISSING`` here when a YAML file supplies it (a config
group's option, or an app's own YAML); the exceptions are settings whose defaults belong to the
code that uses them: the mask loss's terms (``MaskLoss``'s signature) and the instance options
(``InstanceOptions``), which presets then override only where they differ.
(tests/test_config.py checks both rules.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from bmlseg.data.instances import InstanceOptions
from bmlseg.losses import MaskLoss

# OmegaConf reads the annotations at runtime: keep typing.Optional/Dict/List spellings that
# Python 3.10 can evaluate, hence the noqa below.
# ruff: noqa: UP007, UP045


class LabelKind(str, Enum):
    """The labels a loss preset trains on: ``labels.method`` (soft), ``binary_labels`` (binary),
    the pixelwise ground truth (truth: the clean-label oracle) or the readers' rectangles alone
    (boxes: ``binary_any``, for box-supervised losses)."""

    binary = "binary"
    soft = "soft"
    truth = "truth"
    boxes = "boxes"


class Amp(str, Enum):
    """Mixed precision on CUDA. ``auto``: bf16 where supported, else fp16; always off on CPU."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class LrSchedule(str, Enum):
    """After the linear warm-up: ``constant``, or ``cosine`` decay to 0 at the last step."""

    constant = "constant"
    cosine = "cosine"


class BestMetric(str, Enum):
    """Validation metric that picks ``checkpoints/best.pt`` (higher is better)."""

    dice = "dice"
    ap50 = "ap50"


class ValidateAgainst(str, Enum):
    """What validation scores against: ``truth`` (masks/), ``labels`` (the confident cores of
    ``labels.method``), or ``auto`` (truth when every validation case has masks/, else labels)."""

    auto = "auto"
    truth = "truth"
    labels = "labels"


@dataclass
class DataConfig:
    """A dataset folder (see bmlseg.data.format) and how slices are cut from it."""

    root: str = MISSING
    orientation: str = MISSING
    spacing_mm: float = MISSING
    crop_size: int = MISSING
    mirror: bool = MISSING
    lesion_free_ratio: float = MISSING
    per_bone_classes: bool = MISSING
    num_workers: int = MISSING
    instances: InstanceOptions = field(default_factory=InstanceOptions)


@dataclass
class LabelsConfig:
    """A soft-label method of bmlseg.labels and its options."""

    method: str = MISSING
    options: dict[str, Any] = MISSING


@dataclass
class ModelConfig:
    """Keyword arguments of bmlseg.models.IMaskRCNN (num_classes and mask_loss come from data
    and loss; image_size from data.crop_size, in train.yaml)."""

    name: str = MISSING
    backbone: str = MISSING
    image_size: int = MISSING
    skip_connection: bool = MISSING
    backbone_weights: Optional[str] = MISSING
    maskrcnn_kwargs: dict[str, Any] = MISSING


_MASK_LOSS = {
    name: parameter.default for name, parameter in inspect.signature(MaskLoss).parameters.items()
}


@dataclass
class LossConfig:
    """Arguments of bmlseg.losses.MaskLoss, with its defaults; ``label_kind`` picks the label
    volumes. A preset (conf/loss/) gives its name and label kind and the arguments it changes."""

    name: str = MISSING
    label_kind: LabelKind = MISSING
    bce: float = _MASK_LOSS["bce"]
    sce: float = _MASK_LOSS["sce"]
    rce: float = _MASK_LOSS["rce"]
    mae: float = _MASK_LOSS["mae"]
    gce: float = _MASK_LOSS["gce"]
    nnce: float = _MASK_LOSS["nnce"]
    dice: float = _MASK_LOSS["dice"]
    tloss: float = _MASK_LOSS["tloss"]
    projection: float = _MASK_LOSS["projection"]
    pairwise: float = _MASK_LOSS["pairwise"]
    normalized: bool = _MASK_LOSS["normalized"]
    p_min: float = _MASK_LOSS["p_min"]
    hard_threshold: float = _MASK_LOSS["hard_threshold"]
    q: float = _MASK_LOSS["q"]
    tloss_log_nu: float = _MASK_LOSS["tloss_log_nu"]
    pairwise_sigma: float = _MASK_LOSS["pairwise_sigma"]
    pairwise_threshold: float = _MASK_LOSS["pairwise_threshold"]
    compiled: bool = _MASK_LOSS["compiled"]


@dataclass
class TrainConfig:
    """The training loop: step-based, Adam with linear warm-up (then constant or cosine),
    evaluation every few steps. Values: conf/train/ (cpu.yaml explains each)."""

    name: str = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    lr_schedule: LrSchedule = MISSING
    clip_grad_norm: Optional[float] = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    best_metric: BestMetric = MISSING
    validate_against: ValidateAgainst = MISSING
    amp: Amp = MISSING
    device: str = MISSING
    resume: bool = MISSING
    overwrite: bool = MISSING
    max_nonfinite_steps: int = MISSING
    deterministic: bool = MISSING
    tensorboard: bool = MISSING
    eval_batch_size: int = MISSING
    score_threshold: Optional[float] = MISSING
    mask_threshold: float = MISSING
    val_max_cases: Optional[int] = MISSING
    test_max_cases: Optional[int] = MISSING
    preview_slices: int = MISSING


@dataclass
class TrainApp:
    """bmlseg-train."""

    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    binary_labels: str = MISSING
    seed: int = MISSING


@dataclass
class EvalData:
    """Dataset of an evaluation; None means the one the checkpoint was trained on."""

    root: Optional[str] = MISSING


@dataclass
class EvalApp:
    """bmlseg-eval: a checkpoint on every volume of one split."""

    checkpoint: str = MISSING
    data: EvalData = field(default_factory=EvalData)
    split: str = MISSING
    device: str = MISSING
    batch_size: int = MISSING
    score_threshold: Optional[float] = MISSING
    mask_threshold: Optional[float] = MISSING
    max_cases: Optional[int] = MISSING
    preview_slices: int = MISSING


@dataclass
class LabelsApp:
    """bmlseg-labels: write softlabels/<method>/ for a dataset folder."""

    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    evaluate: bool = MISSING
    overwrite: bool = MISSING
    out_dir: Optional[str] = MISSING


@dataclass
class SynthApp:
    """bmlseg-synth: a synthetic knee-MRI dataset folder."""

    root: str = MISSING
    n_subjects: int = MISSING
    seed: int = MISSING
    preset: str = MISSING
    noise: str = MISSING
    preview: bool = MISSING
    overwrite: bool = MISSING


def register_configs() -> None:
    """Store the schemas under the names the primary configs list first in their defaults."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainApp)
    store.store(name="evaluate_schema", node=EvalApp)
    store.store(name="labels_schema", node=LabelsApp)
    store.store(name="synth_schema", node=SynthApp)
