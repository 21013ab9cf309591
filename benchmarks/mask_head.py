"""The mask head under a loss preset: mask-logit range over the first steps of training.

Trains the CPU recipe (model=imaskrcnn_r18_narrow, train=cpu) on a dataset folder with one loss
preset, its skip head with or without GroupNorm (``--norm``), and every 10 steps prints the mask
loss and the median, minimum and maximum of the mask logits of the step's positive RoIs, the
share with |z| > logit(1 - Pmin) = 46.05 (no gradient flows there) and the share whose
probability is exactly 0 in float32, as JSON lines. Writes nothing.

    OMP_NUM_THREADS=1 python benchmarks/mask_head.py data/phantom20 apl_soft_bce --norm none
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bmlseg.config import register_configs
from bmlseg.engine.distributed import setup
from bmlseg.engine.train import (
    ensure_labels,
    label_method_for,
    learning_rate,
    make_dataset,
    optimizer_step,
    seed_everything,
    to_device,
    training_batches,
)
from bmlseg.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a dataset folder")
    parser.add_argument("preset", help="a loss preset of conf/loss")
    parser.add_argument("--norm", choices=("none", "group"), default="group")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    register_configs()
    overrides = [
        f"data.root={args.root}",
        f"loss={args.preset}",
        f"train.steps={args.steps}",
        f"model.maskrcnn_kwargs.mask_head_norm={args.norm}",
    ]
    with initialize_config_module(config_module="bmlseg.conf", version_base=None):
        cfg = compose("train", overrides=overrides)
    seed_everything(cfg.seed)
    method = label_method_for(cfg)
    ensure_labels(cfg, method)
    dataset = make_dataset(cfg, "train", method)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = build_model(config["model"], config["loss"], dataset.num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    context = setup("cpu")
    logits: list[torch.Tensor] = []
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda module, inputs, output: logits.append(output.detach()[:, 1].flatten())
    )
    clip = math.log((1 - cfg.loss.p_min) / cfg.loss.p_min)
    batches = training_batches(dataset, cfg, context, start_step=0)
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.train)
        images, targets = to_device(next(batches), context.device)
        logits.clear()
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer_step(loss, model, optimizer, scaler, cfg.train.clip_grad_norm, context)
        if step % 10 == 0 or step == 1:
            z = torch.cat(logits)
            row = {
                "step": step,
                "loss_mask": round(float(losses["loss_mask"].detach()), 4),
                "median": round(float(z.median()), 2),
                "min": round(float(z.min()), 1),
                "max": round(float(z.max()), 1),
                "beyond_clip": round(float((z.abs() > clip).float().mean()), 3),
                "p_zero": round(float((torch.sigmoid(z) == 0).float().mean()), 3),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
