"""Mask logits of trained runs: their range and the share beyond the loss's clip, per run.

For every run folder below DIR (a sweep), loads ``checkpoints/last.pt``, draws the same 16
training slices of the run's own labels (seed 0), runs the model in training mode (so the mask
head sees the positive RoIs of the targets, as in a training step) without a gradient, and
prints the median, minimum and maximum of the mask logits of the target class, the share with
|z| > logit(1 - Pmin) (no gradient flows there) and the share whose probability is exactly 0 in
float32. A model whose mask head died under its loss shows it here.

    OMP_NUM_THREADS=1 python benchmarks/mask_logits.py multirun/phantom_table1
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from bmlseg.data.grid import ModelGrid
from bmlseg.data.instances import InstanceOptions
from bmlseg.data.slices import SliceDataset, collate_detection
from bmlseg.engine import checkpoint as checkpoints
from bmlseg.engine.train import to_device

SLICES = 16


def logit_stats(run_dir: Path) -> dict[str, float]:
    state = checkpoints.load(run_dir / "checkpoints" / "last.pt")
    config = state["config"]
    model = checkpoints.model_from_checkpoint(state, torch.device("cpu")).train()
    data = config["data"]
    dataset = SliceDataset(
        data["root"],
        "train",
        state["label_method"],
        grid=ModelGrid.of(data),
        lesion_free_ratio=0.0,
        instances=InstanceOptions(**data["instances"]),
    )
    chosen = np.random.default_rng(0).choice(len(dataset), min(SLICES, len(dataset)), False)
    batch = collate_detection([dataset[int(index)] for index in sorted(chosen)])
    images, targets = to_device(batch, torch.device("cpu"))
    logits: list[torch.Tensor] = []
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda module, inputs, output: logits.append(output[:, 1].flatten())
    )
    with torch.no_grad():
        model(images, targets)
    z = torch.cat(logits)
    clip = math.log((1 - config["loss"]["p_min"]) / config["loss"]["p_min"])
    return {
        "median": float(z.median()),
        "min": float(z.min()),
        "max": float(z.max()),
        "beyond_clip": float((z.abs() > clip).float().mean()),
        "p_zero": float((torch.sigmoid(z) == 0).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a sweep folder: run folders with checkpoints/last.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| run | median | min | max | beyond the clip | p exactly 0 |")
    print("|---|---|---|---|---|---|")
    for last in sorted(Path(args.directory).rglob("checkpoints/last.pt")):
        run_dir = last.parent.parent
        stats = logit_stats(run_dir)
        print(
            f"| {run_dir.name} | {stats['median']:.2f} | {stats['min']:.1f} | {stats['max']:.1f} "
            f"| {stats['beyond_clip']:.3f} | {stats['p_zero']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
