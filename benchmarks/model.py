"""Train-step time and peak memory of IMaskRCNN against torchvision's MaskRCNN built the same way.

Both models get the same backbone, image size, batch, anchors and RPN/box settings (from a
conf/model config) and the same seed, so they differ only in the mask head (and IMaskRCNN's
soft-target plumbing). A step is forward + backward + optimizer step on a synthetic batch of
bright blobs with soft masks (IMaskRCNN) or their binary masks (torchvision); the SGD step has
learning rate 0, so both models keep the same proposals and send the same RoIs through their mask
heads (about --lesions x --batch: the ground-truth boxes, as early in training). Steps alternate
between the two models after a warm-up, so a busy machine slows both alike; the table shows the
median step time, the mean number of RoIs through the mask head per step, the CUDA peak memory
of a step above what was allocated before it, and the ratios (target: at most 1.15x).

    python benchmarks/model.py                              # imaskrcnn_r18: resnet18, 128 px, CPU
    python benchmarks/model.py --config imaskrcnn --batch 4 --device cuda --amp   # paper scale
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from bmlseg.models import IMaskRCNN, build_backbone, small_lesion_anchor_generator
from bmlseg.models.backbone import FPN_CHANNELS
from bmlseg.models.imaskrcnn import BOX_REPRESENTATION_SIZE

NUM_CLASSES = 2


def model_config(name: str) -> dict:
    """conf/model/<name>.yaml, composed by Hydra (profiles inherit), as a plain dict."""
    with initialize_config_module(config_module="bmlseg.conf", version_base=None):
        return OmegaConf.to_container(compose(overrides=[f"+model={name}"]).model)


def build_models(backbone: str, image_size: int, maskrcnn_kwargs: dict) -> dict[str, nn.Module]:
    """IMaskRCNN and torchvision's MaskRCNN with the same backbone, pyramid width and box head;
    torchvision's keeps its own mask head (256 wide, no normalization)."""
    kwargs = dict(maskrcnn_kwargs)
    torch.manual_seed(0)
    imaskrcnn = IMaskRCNN(NUM_CLASSES, backbone=backbone, image_size=image_size, **kwargs)
    anchor_options = {
        key.removeprefix("anchor_"): kwargs.pop(key)
        for key in ("anchor_sizes", "anchor_aspect_ratios")
        if key in kwargs
    }
    channels = kwargs.pop("channels", FPN_CHANNELS)
    representation = kwargs.pop("box_representation_size", BOX_REPRESENTATION_SIZE)
    kwargs.pop("mask_head_norm", None)
    torch.manual_seed(0)
    maskrcnn = MaskRCNN(
        build_backbone(backbone, channels=channels),
        None,
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, NUM_CLASSES),
        mask_predictor=MaskRCNNPredictor(256, 256, NUM_CLASSES),
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=small_lesion_anchor_generator(**anchor_options),
        **kwargs,
    )
    return {"torchvision MaskRCNN": maskrcnn, "IMaskRCNN": imaskrcnn}


def synthetic_batch(
    batch: int, image_size: int, lesions: int, device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Noisy images with ``lesions`` bright squares each, and soft masks (0.8 inside)."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        image = torch.randn(3, image_size, image_size, generator=generator)
        sides = torch.randint(6, image_size // 4, (lesions,), generator=generator)
        corners = torch.randint(0, image_size - image_size // 4, (lesions, 2), generator=generator)
        masks = torch.zeros(lesions, image_size, image_size)
        boxes = []
        for index, (side, (x0, y0)) in enumerate(
            zip(sides.tolist(), corners.tolist(), strict=True)
        ):
            masks[index, y0 : y0 + side, x0 : x0 + side] = 0.8
            image[:, y0 : y0 + side, x0 : x0 + side] += 3.0
            boxes.append([x0, y0, x0 + side, y0 + side])
        images.append(image.to(device))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                "labels": torch.ones(lesions, dtype=torch.int64, device=device),
                "masks": masks.to(device),
            }
        )
    return images, targets


def binary_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same targets with uint8 masks, as torchvision's MaskRCNN expects."""
    return [{**target, "masks": (target["masks"] > 0).to(torch.uint8)} for target in targets]


class MaskRoICounter:
    """Counts the RoIs that go through a model's mask head."""

    def __init__(self, model: nn.Module) -> None:
        self.rois: list[int] = []
        model.roi_heads.mask_predictor.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
        self.rois.append(output.shape[0])


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    amp: bool,
) -> tuple[float, int]:
    """Seconds for one forward + backward + optimizer step, and the step's peak memory in bytes
    above what was allocated before it (CUDA only; 0 on CPU)."""
    device = images[0].device
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
    else:
        peak = 0
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="imaskrcnn_r18", help="conf/model config to read")
    parser.add_argument("--backbone", help="overrides the config's backbone")
    parser.add_argument("--image-size", type=int, help="overrides the config's image_size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lesions", type=int, default=3, help="lesions per image")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()

    config = model_config(args.config)
    backbone = args.backbone or config["backbone"]
    image_size = args.image_size or config["image_size"]
    device = torch.device(args.device)
    models = build_models(backbone, image_size, config["maskrcnn_kwargs"])
    counters = {}
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        counters[name] = MaskRoICounter(model)
        # lr 0: the step costs what any SGD step costs, and both models keep their identical
        # weights outside the mask head, hence the same proposals and the same mask RoIs.
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    images, soft = synthetic_batch(args.batch, image_size, args.lesions, device)
    targets = {"torchvision MaskRCNN": binary_targets(soft), "IMaskRCNN": soft}

    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, list[int]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        # Alternate which model goes first, so neither always runs on a warmer cache.
        order = list(models) if step % 2 == 0 else list(reversed(list(models)))
        for name in order:
            seconds, peak = train_step(
                models[name], optimizers[name], images, targets[name], args.amp
            )
            if step >= args.warmup:
                times[name].append(seconds)
                peaks[name].append(peak)

    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {device_label}, {torch.get_num_threads()} CPU threads; "
        f"{args.config}: {backbone}, {image_size} px, batch {args.batch}, {args.lesions} lesions "
        f"per image, amp {'bf16' if args.amp else 'off'}, {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    baseline = "torchvision MaskRCNN"
    median = {name: statistics.median(values) for name, values in times.items()}
    peak_mib = {name: max(values) / 2**20 for name, values in peaks.items()}
    print(
        f"{'model':<22} {'params M':>9} {'step ms':>9} {'min ms':>9} {'mask RoIs':>10} "
        f"{'peak MiB':>9} {'memory x':>9} {'time x':>7}"
    )
    for name, model in models.items():
        rois = counters[name].rois[args.warmup :]
        if device.type == "cuda":
            memory = f"{peak_mib[name]:>9.1f} {peak_mib[name] / peak_mib[baseline]:>9.2f}"
        else:
            memory = f"{'n/a':>9} {'n/a':>9}"
        print(
            f"{name:<22} {sum(p.numel() for p in model.parameters()) / 1e6:>9.2f} "
            f"{1e3 * median[name]:>9.1f} {1e3 * min(times[name]):>9.1f} "
            f"{statistics.mean(rois):>10.1f} {memory} {median[name] / median[baseline]:>7.2f}"
        )


if __name__ == "__main__":
    main()
