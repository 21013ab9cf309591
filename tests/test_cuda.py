"""CUDA and AMP: the loss, a model step and short training runs on a GPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from bmlseg.config import register_configs
from bmlseg.engine.train import train
from bmlseg.losses import MaskLoss
from bmlseg.metrics import METRIC_KEYS
from bmlseg.models import IMaskRCNN

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_mask_loss_on_cuda_matches_cpu_and_stays_float32_under_autocast(amp_dtype):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 32, generator=generator)
    layer = torch.nn.Linear(32, 28 * 28)
    targets = torch.rand(16, 28, 28, generator=generator)
    mask_loss = MaskLoss(bce=1.0, sce=1.0, rce=1.0)
    expected = mask_loss(layer(features).view(16, 28, 28), targets)

    layer = layer.cuda()
    with torch.autocast("cuda", dtype=amp_dtype):
        logits = layer(features.cuda()).view(16, 28, 28)
        assert logits.dtype == amp_dtype
        loss = mask_loss(logits, targets.cuda())
    assert loss.dtype == torch.float32
    # Half-precision logits carry 8 (bf16) or 11 (fp16) significant bits.
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-2, atol=1e-3)
    loss.backward()
    assert all(parameter.grad.isfinite().all() for parameter in layer.parameters())

    extreme = torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4], device="cuda", dtype=amp_dtype)
    extreme = extreme.view(1, 1, 5).requires_grad_()
    value = mask_loss(extreme, torch.tensor([[[0.0, 1.0, 0.5, 0.0, 1.0]]], device="cuda"))
    (gradient,) = torch.autograd.grad(value, extreme)
    assert value.isfinite() and gradient.isfinite().all()


def test_model_train_step_on_cuda_under_bf16_autocast():
    torch.manual_seed(0)
    model = IMaskRCNN(2, backbone="resnet18", image_size=128, mask_loss=MaskLoss(1, 1, 1)).cuda()
    image = 0.3 * torch.randn(3, 128, 128, device="cuda")
    image[:, 40:70, 50:80] += 2.0
    masks = torch.zeros(1, 128, 128, device="cuda")
    masks[0, 40:70, 50:80] = 0.7
    target = {
        "boxes": torch.tensor([[50.0, 40.0, 80.0, 70.0]], device="cuda"),
        "labels": torch.tensor([1], device="cuda"),
        "masks": masks,
    }
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(
            [image, image.flip(-1)],
            [
                target,
                {
                    **target,
                    "masks": masks.flip(-1),
                    "boxes": torch.tensor([[48.0, 40.0, 78.0, 70.0]], device="cuda"),
                },
            ],
        )
    assert all(value.dtype == torch.float32 and value.isfinite() for value in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda_data") / "data"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_training_run_on_cuda_with_amp_writes_a_finite_summary(amp, dataset: Path, tmp_path):
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "train=smoke",
                "train.steps=4",
                "train.device=cuda",
                f"train.amp={amp}",
                f"data.root={dataset}",
            ],
        )
    train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    for key in (*METRIC_KEYS, "score_threshold"):
        assert key in summary
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 4
    assert all(
        value.isfinite().all() for value in state["model"].values() if value.is_floating_point()
    )
