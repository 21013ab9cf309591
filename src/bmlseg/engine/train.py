"""The training loop: one run of IMaskRCNN on a dataset folder, from config to summary.json.

Step-based, in the spirit of nanoGPT's train.py: Adam with a linear warm-up, gradient clipping,
optional mixed precision on CUDA, DDP under torchrun, validation every ``eval_every`` steps,
checkpoints that a killed run resumes from, and a final evaluation on the test split.

Outputs in ``run_dir`` (rank 0 only)::

    metrics.csv              one row per validation: step, lr, mean train losses, val metrics
                             (val_score_threshold: the operating threshold they are at)
    checkpoints/last.pt      the latest state (model, optimizer, scaler, step, RNG, config,
                             the dataset's bone names)
    checkpoints/best.pt      the state with the best val ``train.best_metric``, its threshold
                             in ``best["score_threshold"]``, what validation scored against in
                             ``best["reference"]``
    summary.json             test metrics of best.pt at that threshold, what they are scored
                             against (``reference``), loss weights, ...
    predictions.png          a few test slices: image, truth, predicted probability
    tensorboard/             with train.tensorboard=true

A folder holding these outputs of an earlier run is refused, unless ``train.resume`` continues
that run or ``train.overwrite`` deletes them first. Each start removes the temporary files a
killed run left (``.tmp-*``, e.g. a checkpoint being written).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from bmlseg import labels as soft_labels
from bmlseg.data.format import mask_path, read_dataset_json
from bmlseg.data.grid import ModelGrid
from bmlseg.data.instances import InstanceOptions
from bmlseg.data.slices import SliceDataset, collate_detection
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.engine import distributed
from bmlseg.engine.evaluate import (
    TRUTH,
    InferenceSettings,
    Reference,
    evaluate_cases,
    recorded_score_threshold,
    split_cases,
    split_reference,
    write_run_outputs,
)
from bmlseg.io import remove_path, write_text_atomic
from bmlseg.labels.files import LabelOptionsError
from bmlseg.models import build_model

log = logging.getLogger(__name__)

MODEL_TARGET_KEYS = ("boxes", "labels", "masks")
# What a run writes into its folder (Hydra's .hydra/ and log aside).
RUN_OUTPUTS = ("metrics.csv", "summary.json", "checkpoints", "predictions.png", "tensorboard")
# Smallest value of each count of the train config.
TRAIN_MINIMA = {
    "steps": 1,
    "batch_size": 1,
    "warmup_steps": 0,
    "log_every": 1,
    "eval_every": 1,
    "checkpoint_every": 1,
    "max_nonfinite_steps": 1,
    "eval_batch_size": 1,
    "val_max_cases": 1,
    "test_max_cases": 1,
    "preview_slices": 0,
}
# Why a run needs each split it evaluates on.
EVALUATED_SPLITS = {
    "val": "validation chooses best.pt and its score threshold on it",
    "test": "the run ends by scoring best.pt on it",
}


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient."""


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train the run described by ``cfg`` (a composed ``train.yaml``) into ``run_dir``.

    Returns:
        The best validation value of ``train.best_metric`` (what a Hydra sweeper optimizes).

    Raises:
        ValueError: a setting out of its range (the model's grid too); a split the run cannot
            evaluate on (plan_evaluations).
        FileExistsError: ``run_dir`` holds an earlier run, and neither ``train.resume`` nor
            ``train.overwrite`` is set.
    """
    check_settings(cfg.train)
    ModelGrid.of(cfg.data)  # refuses a grid no scan can be brought to, before anything is made
    refuse_earlier_run(Path(run_dir), cfg.train)
    summary_path = Path(run_dir) / "summary.json"
    if cfg.train.resume and summary_path.exists():
        # A sweep rerun with train.resume=true goes on where it stopped: runs that finished
        # the steps asked for are kept as they are.
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary["steps"] == cfg.train.steps:
            log.info("%s: finished %d steps earlier; skipped", summary_path, summary["steps"])
            return float(summary["best"]["value"])
    plan = plan_evaluations(cfg)
    context = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, Path(context.broadcast(str(run_dir))), context, plan)
    finally:
        distributed.teardown(context)


def check_settings(settings: DictConfig) -> None:
    """Refuse train settings no run can use, naming each key and its range.

    Raises:
        ValueError: a count under its minimum (TRAIN_MINIMA), a learning rate that is not
            positive, or resume and overwrite both set.
    """
    problems = [
        f"train.{key} must be at least {minimum}, got {settings[key]}"
        for key, minimum in TRAIN_MINIMA.items()
        if settings[key] is not None and settings[key] < minimum
    ]
    if not settings.lr > 0:
        problems.append(f"train.lr must be positive, got {settings.lr}")
    if settings.resume and settings.overwrite:
        problems.append(
            "train.resume=true continues a run, train.overwrite=true replaces it: set one"
        )
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class EvaluationPlan:
    """The cases a run validates and tests on, and the Reference each split is scored against."""

    val_cases: list[str]
    val_reference: Reference
    test_cases: list[str]
    test_reference: Reference


def plan_evaluations(cfg: DictConfig) -> EvaluationPlan:
    """What the run's validations and final test score against, decided from dataset.json and
    masks/ before any label is made or model built.

    Validation follows ``train.validate_against``: ``truth`` scores against masks/, ``labels``
    against the confident cores of ``labels.method`` (cut as ``data.instances`` cuts the
    training instances), ``auto`` against the truth when every validation case has masks/, else
    the labels. The test split: the truth when every test case has masks/, else the labels.

    Raises:
        ValueError: dataset.json lists no val or no test case; ``truth`` is asked for and a
            validation case has no masks/.
    """
    root = Path(cfg.data.root)
    info = read_dataset_json(root)
    empty = [split for split in EVALUATED_SPLITS if not info.split(split)]
    if empty:
        raise ValueError(
            "; ".join(
                f"{root / 'dataset.json'}: no case in split {split!r} ({EVALUATED_SPLITS[split]})"
                for split in empty
            )
            + "; put the cases of some subjects into it (splits are by subject)"
        )
    val_cases = split_cases(info, "val", cfg.train.val_max_cases)
    test_cases = split_cases(info, "test", cfg.train.test_max_cases)
    labels = Reference.labels_of(cfg)
    val_without = [case for case in val_cases if not mask_path(root, case).exists()]
    wanted = cfg.train.validate_against.value
    if wanted == "truth" and val_without:
        raise ValueError(
            f"train.validate_against=truth, but {len(val_without)} of {len(val_cases)} "
            f"validation cases have no pixelwise truth (e.g. {mask_path(root, val_without[0])} "
            f"is missing); set train.validate_against=auto or labels to validate against {labels}"
        )
    val_truth = wanted == "truth" or (wanted == "auto" and not val_without)
    plan = EvaluationPlan(
        val_cases=val_cases,
        val_reference=TRUTH if val_truth else labels,
        test_cases=test_cases,
        test_reference=split_reference(root, test_cases, labels),
    )
    log.info(
        "validation scores against %s (train.validate_against=%s; %d of %d val cases have masks/)",
        plan.val_reference,
        wanted,
        len(val_cases) - len(val_without),
        len(val_cases),
    )
    if plan.test_reference != TRUTH:
        log.warning(
            "test cases without masks/: the test metrics are scored against %s, not against "
            "pixelwise truth (summary.json records it as its reference)",
            plan.test_reference,
        )
    return plan


def earlier_run(run_dir: Path) -> list[str]:
    """The outputs of an earlier run in ``run_dir`` (RUN_OUTPUTS found there), but for the
    temporary files of a killed run."""
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            if any(not child.name.startswith(".tmp-") for child in path.iterdir()):
                found.append(f"{name}/")
        elif path.exists():
            found.append(name)
    return found


def refuse_earlier_run(run_dir: Path, settings: DictConfig) -> None:
    """Refuse to train into a folder holding an earlier run, unless resumed or replaced.

    Raises:
        FileExistsError: naming the folder, what it holds and the overrides that go on.
    """
    found = earlier_run(run_dir)
    if found and not (settings.resume or settings.overwrite):
        raise FileExistsError(
            f"{run_dir} holds an earlier run ({', '.join(found)}); add train.resume=true to "
            "continue it or train.overwrite=true to replace it, or choose another hydra.run.dir "
            "(hydra.sweep.dir for a multirun)"
        )


def prepare_run_dir(run_dir: Path, settings: DictConfig) -> None:
    """Delete an earlier run's outputs with ``train.overwrite``, and in every case the
    temporary files a killed run left (each up to a checkpoint's size)."""
    if settings.overwrite:
        for name in RUN_OUTPUTS:
            remove_path(run_dir / name)
    leftovers = [*run_dir.glob(".tmp-*"), *(run_dir / "checkpoints").glob(".tmp-*")]
    for path in leftovers:
        remove_path(path)
    if leftovers:
        log.info(
            "removed %d temporary file(s) of an interrupted run: %s",
            len(leftovers),
            ", ".join(path.name for path in leftovers),
        )


def _train(
    cfg: DictConfig, run_dir: Path, context: distributed.Distributed, plan: EvaluationPlan
) -> float:
    started = time.perf_counter()
    settings = cfg.train
    device = context.device
    seed_everything(cfg.seed + context.rank, deterministic=settings.deterministic)
    if context.is_main:
        prepare_run_dir(run_dir, settings)

    # Labels, data, model. Rank 0 writes missing label volumes (those trained on, and those
    # scored against); the others wait for them.
    label_method = label_method_for(cfg)
    if context.is_main:
        references = (plan.val_reference.label_method, plan.test_reference.label_method)
        for method in dict.fromkeys([label_method, *references]):
            if method is not None:
                ensure_labels(cfg, method)
    context.barrier()
    train_set = make_dataset(cfg, "train", label_method)
    info = train_set.info  # read and checked with the training set
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = build_model(config["model"], config["loss"], train_set.num_classes).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    precision = distributed.autocast_dtype(settings.amp.value, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    log.info(
        "run %s: %s on %s (%d process(es)), %s labels, autocast %s",
        run_dir,
        config["loss"]["name"],
        device,
        context.world_size,
        label_method,
        precision,
    )

    # Resume from last.pt, or start at step 0.
    best = Best(
        settings.best_metric.value,
        score_threshold=settings.score_threshold,
        reference=str(plan.val_reference),
    )
    start_step = 0
    if settings.resume:
        last = run_dir / "checkpoints" / "last.pt"
        resumed = resume(last, model, optimizer, scaler, context)
        if resumed is not None:
            start_step, best = resumed[0], Best(**resumed[1])
            if best.reference != str(plan.val_reference):
                # A best value chosen against one reference cannot be beaten against another.
                raise ValueError(
                    f"{last}: its best.pt was chosen against {best.reference}, this run "
                    f"validates against {plan.val_reference}; resume with the "
                    "train.validate_against and masks/ it had, or set train.overwrite=true"
                )
    if start_step >= settings.steps:
        log.info("nothing to train: resumed at step %d of %d", start_step, settings.steps)
    trained = model
    if context.enabled:
        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    batches = training_batches(train_set, cfg, context, start_step)
    metrics_log = MetricsLog(run_dir / "metrics.csv", keep_until=start_step)
    writer = _tensorboard(run_dir) if settings.tensorboard and context.is_main else None
    running = RunningMeans()
    skipped = SkippedSteps(settings.max_nonfinite_steps)

    model.train()
    progress = tqdm(
        total=settings.steps, initial=start_step, desc="train", disable=not context.is_main
    )
    for step in range(start_step + 1, settings.steps + 1):
        # One optimizer step; one with a non-finite loss or gradient changes nothing.
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = to_device(next(batches), device)
        # The forward pass already moves BatchNorm's running statistics: keep them to undo a
        # skipped step entirely.
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            losses = trained(images, targets)
        loss = sum(losses.values())
        if optimizer_step(loss, model, optimizer, scaler, settings.clip_grad_norm, context):
            running.add({"loss": loss, **losses})
            skipped.reset()
        else:
            model.load_state_dict(buffers, strict=False)
            skipped.add(step, losses)
        progress.update(1)
        if running.count and step % settings.log_every == 0 and context.is_main:
            progress.set_postfix(loss=f"{running.means()['loss']:.3f}", lr=f"{lr:.2e}")
            _add_scalars(writer, "train", running.means(), step)

        # Validation picks best.pt and its operating score threshold (rank 0 scores it).
        is_last = step == settings.steps
        new_best = False
        if step % settings.eval_every == 0 or is_last:
            if context.is_main:
                scores = validate(model, cfg, plan, device, precision)
                metrics_log.append(
                    {
                        "step": step,
                        "lr": lr,
                        **running.means(),
                        **{f"val_{name}": value for name, value in scores.items()},
                        "time_s": round(time.perf_counter() - started, 1),
                    }
                )
                _add_scalars(writer, "val", scores, step)
                new_best = best.update(step, scores)
                log.info(
                    "step %d: train loss %.4f, val %s %.4f (best %.4f at step %d)",
                    step,
                    running.means().get("loss", math.nan),
                    best.metric,
                    scores[best.metric],
                    best.value,
                    best.step,
                )
            new_best = context.broadcast(new_best)
            running = RunningMeans()

        # Checkpoints: last.pt every checkpoint_every steps and at the end, best.pt on a new best.
        names = (["last.pt"] if step % settings.checkpoint_every == 0 or is_last else []) + (
            ["best.pt"] if new_best else []
        )
        if names:
            # Every rank builds the state: gathering the RNG states is a collective operation.
            state = {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "best": best.as_dict(),
                "rng": gather_rng_states(context),
                "config": config,
                "num_classes": train_set.num_classes,
                "label_method": label_method,
                "bone_names": info.bones,
            }
            save_checkpoints(run_dir / "checkpoints", names, state, model, context)
            context.barrier()
    progress.close()
    if writer is not None:
        writer.close()

    if context.is_main:
        finish(cfg, run_dir, run_dir / "checkpoints", plan, device, precision, started)
    context.barrier()
    return float(best.value)


@dataclass
class Best:
    """The best validation so far: its ``train.best_metric`` value, step and the operating score
    threshold it was at (fixed, or chosen there), which the test evaluation and bmlseg-eval and
    bmlseg-predict use, and what validation scored against (``str(Reference)``). Stored in
    checkpoints as a dict (``as_dict``)."""

    metric: str
    value: float = -math.inf
    step: int = 0
    score_threshold: float | None = None
    # Checkpoints written before the reference was recorded were all chosen against masks/.
    reference: str = str(TRUTH)

    def update(self, step: int, scores: dict[str, float]) -> bool:
        """Take ``scores`` of the validation at ``step`` if they are the best so far."""
        value = scores[self.metric]
        # NaN (nothing to score) ranks lowest; >=: on ties the later, longer-trained state wins,
        # and the first validation always makes a best.pt.
        value = -math.inf if math.isnan(value) else value
        if value < self.value:
            return False
        self.value, self.step, self.score_threshold = value, step, scores["score_threshold"]
        return True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunningMeans:
    """Mean of each training loss over the updated steps since the last validation."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(value.detach())
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: total / max(self.count, 1) for name, total in self.totals.items()}


class SkippedSteps:
    """Counts steps in a row skipped for a non-finite loss or gradient, and stops training after
    ``limit`` of them (``train.max_nonfinite_steps``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def reset(self) -> None:
        self.in_a_row = 0

    def add(self, step: int, losses: dict[str, Tensor]) -> None:
        self.in_a_row += 1
        log.warning(
            "step %d: non-finite loss or gradient (%s); step skipped (%d in a row)",
            step,
            {name: float(value.detach()) for name, value in losses.items()},
            self.in_a_row,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or "
                "gradient; stopping (lower train.lr, raise train.warmup_steps, or check the "
                "labels). The last good checkpoint is kept."
            )


def save_checkpoints(
    checkpoint_dir: Path,
    names: list[str],
    state: dict[str, Any],
    model: nn.Module,
    context: distributed.Distributed,
) -> None:
    """Write ``state`` under each of ``names`` (rank 0 only), never a model that is not finite."""
    if not context.is_main:
        return
    bad = checkpoints.non_finite_parameters(model)
    if bad:
        raise NonFiniteLossError(
            f"step {state['step']}: parameters {bad[:3]} are not finite; no checkpoint written"
        )
    for name in names:
        checkpoints.save(checkpoint_dir / name, state)


def _add_scalars(writer: Any, prefix: str, values: dict[str, float], step: int) -> None:
    """Log ``values`` to TensorBoard as ``prefix/name``; nothing without a writer."""
    if writer is None:
        return
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def finish(
    cfg: DictConfig,
    run_dir: Path,
    checkpoint_dir: Path,
    plan: EvaluationPlan,
    device: torch.device,
    precision: torch.dtype | None,
    started: float,
) -> None:
    """Evaluate best.pt on the test split, against ``plan.test_reference``, at the score
    threshold of its validation; write summary.json and predictions.png."""
    path = checkpoint_dir / "best.pt"
    state = checkpoints.load(path, device)
    model = checkpoints.model_from_checkpoint(state, device)
    scores, examples = evaluate_split(
        model,
        cfg,
        plan.test_cases,
        plan.test_reference,
        device,
        precision,
        score_threshold=recorded_score_threshold(state, path),
        preview_slices=cfg.train.preview_slices,
        split="test",
    )
    write_run_outputs(
        run_dir,
        scores,
        examples,
        state,
        seed=cfg.seed,
        split="test",
        reference=plan.test_reference,
        steps=cfg.train.steps,
        wall_time_s=time.perf_counter() - started,
    )
    log.info(
        "test against %s: %s",
        plan.test_reference,
        {key: round(value, 4) for key, value in scores.items()},
    )


def validate(
    model: nn.Module,
    cfg: DictConfig,
    plan: EvaluationPlan,
    device: torch.device,
    precision: torch.dtype | None,
) -> dict[str, float]:
    """Volume metrics of the model on the validation cases against ``plan.val_reference``, at
    ``train.score_threshold`` or, when it is None, at the threshold chosen on them
    (``scores["score_threshold"]``); leaves the model in train mode."""
    model.eval()
    try:
        scores, _ = evaluate_split(
            model,
            cfg,
            plan.val_cases,
            plan.val_reference,
            device,
            precision,
            score_threshold=cfg.train.score_threshold,
            preview_slices=0,
            split="val",
        )
    finally:
        model.train()
    return scores


def evaluate_split(
    model: nn.Module,
    cfg: DictConfig,
    cases: list[str],
    reference: Reference,
    device: torch.device,
    precision: torch.dtype | None,
    *,
    score_threshold: float | None,
    preview_slices: int,
    split: str,
) -> tuple[dict[str, float], list]:
    """evaluate_cases against ``reference`` with the run's data and train settings (mask
    threshold, batch) at ``score_threshold`` (None: chosen on ``cases``)."""
    settings = InferenceSettings(
        score_threshold=score_threshold,
        mask_threshold=cfg.train.mask_threshold,
        batch_size=cfg.train.eval_batch_size,
    )
    return evaluate_cases(
        model,
        cfg.data.root,
        cases,
        grid=ModelGrid.of(cfg.data),
        device=device,
        settings=settings,
        precision=precision,
        preview_slices=preview_slices,
        description=split,
        reference=reference,
    )


def optimizer_step(
    loss: Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clip_grad_norm: float | None,
    context: distributed.Distributed,
) -> bool:
    """Backward, clip, step. False (nothing changed) when the loss or the gradient is not finite.

    Every rank takes the same branch: a rank that skipped backward would leave the others
    waiting in DDP's gradient all-reduce.
    """
    optimizer.zero_grad(set_to_none=True)
    if not context.all_true(bool(torch.isfinite(loss.detach()))):
        return False
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm or math.inf)
    if scaler.is_enabled():
        # fp16: the scaler skips the update on inf/NaN gradients and lowers its scale.
        scaler.step(optimizer)
        scaler.update()
        return True
    if not context.all_true(bool(torch.isfinite(norm))):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def learning_rate(step: int, settings: DictConfig) -> float:
    """Linear warm-up over the first ``warmup_steps`` steps (1-based), then constant or a cosine
    decay that reaches 0 after the last step (``lr_schedule``)."""
    if step <= settings.warmup_steps:
        return settings.lr * step / settings.warmup_steps
    if settings.lr_schedule.value == "constant":
        return settings.lr
    progress = (step - settings.warmup_steps) / (settings.steps - settings.warmup_steps + 1)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def label_method_for(cfg: DictConfig) -> str:
    """Soft losses train on ``labels.method``, binary ones on ``binary_labels``, the oracle on
    the ground truth, box-supervised losses on the union of the readers' rectangles."""
    kind = cfg.loss.label_kind.value
    fixed = {"truth": "truth", "boxes": "binary_any", "binary": cfg.binary_labels}
    return fixed.get(kind, cfg.labels.method)


def ensure_labels(cfg: DictConfig, method: str) -> None:
    """Write the label volumes the run needs, if missing or stale (idempotent, so sweeps just
    work).

    Raises:
        LabelOptionsError: the labels there were made with other options; its message gives
            the bmlseg-labels command that remakes them with this run's.
    """
    options = label_options(cfg, method)
    try:
        soft_labels.generate(cfg.data.root, method, **options)
    except LabelOptionsError as error:
        raise error.with_remedy(
            f"remake them with this run's options: {relabel_command(cfg.data.root, method, options)}"
        ) from None


def relabel_command(root: str, method: str, options: dict[str, Any]) -> str:
    """The bmlseg-labels command that remakes ``method``'s labels with ``options``: an override
    for each option whose value is not the default of conf/labels/<method>.yaml."""
    defaults = soft_labels.resolve_options(method)
    wanted = soft_labels.resolve_options(method, **options)
    overrides = [
        f"labels.options.{name}={_override_value(value)}"
        for name, value in wanted.items()
        if value != defaults[name]
    ]
    words = ["bmlseg-labels", f"data.root={root}", f"labels={method}", *overrides, "overwrite=true"]
    return " ".join(shlex.quote(word) for word in words)


def _override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    return str(value)


def label_options(cfg: DictConfig, method: str) -> dict[str, Any]:
    """The options of label ``method`` in this run: ``labels.options`` for ``labels.method``;
    ``kimriss_hard`` takes the kimriss options of the run and cuts at the instance threshold,
    so it has the soft label's coverage and instances."""
    if method == cfg.labels.method:
        return OmegaConf.to_container(cfg.labels.options)
    if method == "kimriss_hard":
        same_pipeline = cfg.labels.method == "kimriss"
        kimriss = OmegaConf.to_container(cfg.labels.options) if same_pipeline else {}
        return {**kimriss, "threshold": cfg.data.instances.threshold}
    return {}


def make_dataset(cfg: DictConfig, split: str, label_method: str) -> SliceDataset:
    data = cfg.data
    return SliceDataset(
        data.root,
        split,
        label_method,
        grid=ModelGrid.of(data),
        mirror=data.mirror,
        lesion_free_ratio=data.lesion_free_ratio,
        per_bone_classes=data.per_bone_classes,
        instances=InstanceOptions(**data.instances),
        seed=cfg.seed,
    )


def training_batches(
    dataset: SliceDataset, cfg: DictConfig, context: distributed.Distributed, start_step: int
) -> Iterator[Any]:
    """Endless batches. Epoch ``e``'s order and mirroring depend only on (seed, e), so a run
    resumed at ``start_step`` draws the batches an uninterrupted run would have drawn."""
    batch_size = cfg.train.batch_size
    sampler = DistributedSampler(
        dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"{cfg.data.root}: the train split has {len(dataset)} training slices, fewer than "
            f"train.batch_size ({batch_size}) x processes ({context.world_size})"
        )
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        order = list(sampler)[skip * batch_size : per_epoch * batch_size]
        generator = torch.Generator()
        generator.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]))
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_detection,
            worker_init_fn=seed_worker,
            generator=generator,
            pin_memory=context.device.type == "cuda",
            drop_last=True,
        )
        yield from loader
        epoch, skip = epoch + 1, 0


def to_device(
    batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and the model's target keys (boxes, labels, soft masks) on ``device``."""
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{key: target[key].to(device) for key in MODEL_TARGET_KEYS} for target in targets]
    return images, targets


def resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    context: distributed.Distributed,
) -> tuple[int, dict[str, Any]] | None:
    """Restore model, optimizer, scaler and RNG from ``path``; None when there is none yet."""
    if not path.exists():
        log.warning("train.resume: %s does not exist; starting from step 0", path)
        return None
    state = checkpoints.load(path, context.device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) == context.world_size:
        checkpoints.set_rng_state(rng[context.rank])
    else:
        log.warning(
            "checkpoint saved with %d process(es), resuming with %d: RNG re-seeded",
            len(rng),
            context.world_size,
        )
        seed_everything(state["config"]["seed"] + state["step"] + context.rank)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), dict(state["best"])


def gather_rng_states(context: distributed.Distributed) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (all ranks must call this)."""
    state = checkpoints.rng_state()
    if not context.enabled:
        return [state]
    gathered: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy's global generator (for any library drawing from it) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)
    if deterministic:
        # Mask R-CNN's RoIAlign backward has no deterministic CUDA kernel: warn, don't fail.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and python seeded from the worker's torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)  # noqa: NPY002
    random.seed(worker_seed)


class MetricsLog:
    """metrics.csv: one row per validation, rewritten atomically on each append.

    On resume, rows after the resumed step (written by the killed run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if keep_until > 0 and path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                self.rows = [
                    row for row in csv.DictReader(handle) if int(row["step"]) <= keep_until
                ]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        columns = list(dict.fromkeys(key for existing in self.rows for key in existing))
        lines = [",".join(columns)]
        lines += [
            ",".join(_csv_value(row.get(column, "")) for column in columns) for row in self.rows
        ]
        write_text_atomic(self.path, "\n".join(lines) + "\n")


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "train.tensorboard=true needs the tensorboard package: pip install 'bmlseg[tensorboard]'"
        ) from error
    return SummaryWriter(str(run_dir / "tensorboard"))
