"""Forward + backward time of every loss preset's MaskLoss against torchvision's mask loss.

torchvision's Mask R-CNN mask loss is ``binary_cross_entropy_with_logits`` on ``[P, M, M]``
logits; this times it and the MaskLoss of every preset in conf/loss/ side by side in the same
run, interleaving them in every repeat so that a busy machine slows all alike, and prints the
median time of each and its ratio to BCE (target for the paper's APL MaskLoss(1, 1, 1): at most
3x BCE).

    python benchmarks/loss.py                      # CPU, and CUDA (+ bf16/fp16 AMP) if present
    python benchmarks/loss.py --device cpu --repeats 15 --compile
"""

from __future__ import annotations

import argparse
import importlib.resources
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bmlseg.losses import MaskLoss

SHAPES = [(256, 28, 28), (512, 56, 56)]


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets)


def preset_losses() -> dict[str, Callable]:
    """The MaskLoss of every preset in conf/loss/, by name."""
    folder = importlib.resources.files("bmlseg.conf") / "loss"
    losses = {}
    for path in sorted(folder.iterdir(), key=lambda path: path.name):
        if path.name.endswith(".yaml"):
            preset = OmegaConf.to_container(OmegaConf.load(str(path)))
            options = {k: v for k, v in preset.items() if k not in ("name", "label_kind")}
            losses[preset["name"]] = MaskLoss(**options)
    return losses


def time_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    targets: torch.Tensor,
    amp_dtype: torch.dtype | None,
    number: int,
) -> float:
    """Seconds per forward + backward, averaged over ``number`` calls."""
    device = logits.device
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        logits.grad = None
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            loss = loss_fn(logits, targets)
        loss.backward()
    _synchronize(device)
    return (time.perf_counter() - start) / number


def compare(
    losses: dict[str, Callable],
    shape: tuple[int, int, int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    repeats: int,
) -> dict[str, float]:
    """Median seconds per step of BCE and each loss, measured interleaved on the same tensors."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits_dtype = amp_dtype or torch.float32
    logits = 3 * torch.randn(shape, generator=generator, device=device)
    logits = logits.to(logits_dtype).requires_grad_()
    targets = torch.rand(shape, generator=generator, device=device)
    image_patches = torch.randn((shape[0], 3, *shape[1:]), generator=generator, device=device)
    candidates = {"bce": bce_loss}
    for name, loss in losses.items():
        loss = loss.to(device)
        candidates[name] = lambda z, y, loss=loss: loss(z, y, image_patches)
    # Enough calls per repeat for ~10 ms of work, so timer and launch noise stay small.
    number = max(1, int(0.01 / max(time_step(bce_loss, logits, targets, amp_dtype, 3), 1e-6)))
    for loss_fn in candidates.values():
        time_step(loss_fn, logits, targets, amp_dtype, max(3, number))  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, loss_fn in candidates.items():
            samples[name].append(time_step(loss_fn, logits, targets, amp_dtype, number))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats; the median is kept")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time apl_soft_bce with MaskLoss(compiled=True) (its fused kernel compiled)",
    )
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: no CUDA device")
        devices.remove("cuda")

    losses: dict[str, Callable] = preset_losses()
    if args.compile:
        losses["apl_soft_bce compiled"] = MaskLoss(sce=1.0, rce=1.0, compiled=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<6} {'amp':<9} {'shape':<12} {'loss':<24} {'ms':>9} {'/ bce':>7}")
    for device_name in devices:
        device = torch.device(device_name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        amp_dtypes = [None, torch.bfloat16, torch.float16] if device.type == "cuda" else [None]
        for amp_dtype in amp_dtypes:
            for shape in SHAPES:
                times = compare(losses, shape, device, amp_dtype, args.repeats)
                amp = str(amp_dtype).removeprefix("torch.") if amp_dtype else "off"
                for name, seconds in times.items():
                    print(
                        f"{device_name:<6} {amp:<9} {'x'.join(map(str, shape)):<12} {name:<24} "
                        f"{1e3 * seconds:>9.3f} {seconds / times['bce']:>7.2f}"
                    )
        print(f"({device_name}: {label})")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
