"""Typed schemas of the Hydra configs, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` hold the values; these dataclasses say which keys exist and of
which type, so a mistyped override (``loss.bcee=1``, ``train.amp=fp61``) fails at composition
with an error naming the key, instead of being silently ignored. Each primary config
(``train.yaml``, ``evaluate.yaml``, ...) lists its schema first in its defaults list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from bmlseg.data.instances import InstanceOptions

# OmegaConf reads the annotations at runtime: keep typing.Optional/Dict/List spellings that
# Python 3.10 can evaluate, hence the noqa below.
# ruff: noqa: UP007, UP045


class LabelKind(str, Enum):
    """The labels a loss preset trains on: ``labels.method`` (soft), ``binary_labels`` (binary)
    or the pixelwise ground truth (truth: the clean-label oracle)."""

    binary = "binary"
    soft = "soft"
    truth = "truth"


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


@dataclass
class DataConfig:
    """A dataset folder (see bmlseg.data.format) and how slices are cut from it."""

    root: str = "data/synthetic"
    crop_size: int = 128
    mirror: bool = True
    lesion_free_ratio: float = 0.1
    per_bone_classes: bool = False
    num_workers: int = 0
    instances: InstanceOptions = field(default_factory=InstanceOptions)


@dataclass
class LabelsConfig:
    """A soft-label method of bmlseg.labels and its options."""

    method: str = "kimriss"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Keyword arguments of bmlseg.models.IMaskRCNN (num_classes and mask_loss come from data
    and loss)."""

    name: str = "imaskrcnn_r18"
    backbone: str = "resnet18"
    image_size: int = 128
    skip_connection: bool = True
    backbone_weights: Optional[str] = None
    maskrcnn_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Weights of bmlseg.losses.MaskLoss; ``label_kind`` picks soft or binary label volumes."""

    name: str = "apl_soft_bce"
    bce: float = 1.0
    sce: float = 0.0
    rce: float = 0.0
    mae: float = 0.0
    normalized: bool = True
    p_min: float = 1e-20
    hard_threshold: float = 0.5
    label_kind: LabelKind = LabelKind.soft


@dataclass
class TrainConfig:
    """The training loop: step-based, Adam with linear warm-up (then constant or cosine),
    evaluation every few steps."""

    name: str = "cpu"
    steps: int = 400
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: LrSchedule = LrSchedule.constant
    clip_grad_norm: Optional[float] = 5.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    best_metric: BestMetric = BestMetric.dice
    amp: Amp = Amp.auto
    device: str = "auto"
    # A run folder holding an earlier run is refused unless it is resumed (resume) or replaced
    # (overwrite: its outputs are deleted first).
    resume: bool = False
    overwrite: bool = False
    max_nonfinite_steps: int = 10
    deterministic: bool = False
    tensorboard: bool = False
    # Inference during validation and the final test evaluation (docs/metrics.md). The operating
    # score threshold: None chooses it at each validation (bmlseg.metrics.SCORE_GRID, best mean
    # Dice) and tests best.pt at the one chosen with it; a number is used everywhere.
    eval_batch_size: int = 8
    score_threshold: Optional[float] = None
    mask_threshold: float = 0.5
    val_max_cases: Optional[int] = None
    test_max_cases: Optional[int] = None
    preview_slices: int = 4


@dataclass
class TrainApp:
    """bmlseg-train."""

    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Label method used when loss.label_kind is binary; soft losses use labels.method.
    binary_labels: str = "kimriss_hard"
    seed: int = 0


@dataclass
class EvalData:
    """Dataset of an evaluation; None means the one the checkpoint was trained on."""

    root: Optional[str] = None


@dataclass
class EvalApp:
    """bmlseg-eval: a checkpoint on every volume of one split."""

    checkpoint: str = MISSING
    data: EvalData = field(default_factory=EvalData)
    split: str = "test"
    device: str = "auto"
    batch_size: int = 8
    # None: the checkpoint's: the score threshold recorded in it, its train.mask_threshold.
    score_threshold: Optional[float] = None
    mask_threshold: Optional[float] = None
    max_cases: Optional[int] = None
    preview_slices: int = 4


@dataclass
class PredictApp:
    """bmlseg-predict: one volume in, BML probability and mask volumes out."""

    checkpoint: str = MISSING
    input: str = MISSING
    bones: str = MISSING
    output_dir: str = "predictions"
    device: str = "auto"
    batch_size: int = 8
    # None: the checkpoint's: the score threshold recorded in it, its train.mask_threshold.
    score_threshold: Optional[float] = None
    mask_threshold: Optional[float] = None


@dataclass
class LabelsApp:
    """bmlseg-labels: write softlabels/<method>/ for a dataset folder."""

    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    evaluate: bool = False
    overwrite: bool = False
    out_dir: Optional[str] = None


@dataclass
class SynthApp:
    """bmlseg-synth: a synthetic knee-MRI dataset folder."""

    root: str = "data/synthetic"
    n_subjects: int = 10
    seed: int = 0
    preset: str = "small"
    noise: str = "paper"
    preview: bool = False
    # A non-empty root is refused unless overwrite: then what a dataset folder holds (its files,
    # labels and label evaluation) is deleted first.
    overwrite: bool = False


def register_configs() -> None:
    """Store the schemas under the names the primary configs list first in their defaults."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainApp)
    store.store(name="evaluate_schema", node=EvalApp)
    store.store(name="predict_schema", node=PredictApp)
    store.store(name="labels_schema", node=LabelsApp)
    store.store(name="synth_schema", node=SynthApp)
