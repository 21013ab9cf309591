"""IMaskRCNN on real torchvision parts, at small sizes (resnet18 / mobilenet_v3, 64-pixel images)."""

import math
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from bmlseg.config import register_configs
from bmlseg.losses import MaskLoss
from bmlseg.models import (
    IMaskRCNN,
    SoftMaskTransform,
    build_model,
    probability_map,
    soft_maskrcnn_loss,
)
from bmlseg.models.build import LOSS_META_KEYS
from bmlseg.models.roi_heads import TORCHVISION_MASK_LOSS

NUM_CLASSES = 3
IMAGE_SIZE = 64
MODEL_CONFIGS = Path(__file__).parents[1] / "conf" / "model"
LOSS_CONFIGS = Path(__file__).parents[1] / "conf" / "loss"
# Fewer proposals and sampled RoIs than torchvision's defaults: a step in a fraction of a second.
SMALL = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 10,
}
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def make_model(**overrides) -> IMaskRCNN:
    torch.manual_seed(0)
    options = {"backbone": "resnet18", "image_size": IMAGE_SIZE, **SMALL, **overrides}
    return IMaskRCNN(NUM_CLASSES, **options)


def blob_sample(mask_value: float = 0.7, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """A noisy image with one bright square, its box, and a constant soft mask on the square."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.3 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    image[:, 20:40, 24:44] += 2.0
    masks = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE)
    masks[0, 20:40, 24:44] = mask_value
    target = {
        "boxes": torch.tensor([[24.0, 20.0, 44.0, 40.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
    }
    return image, target


class SpyLoss(nn.Module):
    """Records what the model hands to its mask loss, then computes the real MaskLoss."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = MaskLoss(bce=1.0, sce=1.0, rce=1.0)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        self.calls.append((logits.detach().clone(), targets.detach().clone()))
        return self.loss(logits, targets)


def test_is_a_torchvision_maskrcnn():
    model = make_model()
    assert isinstance(model, MaskRCNN)
    assert isinstance(model.transform, GeneralizedRCNNTransform)
    assert isinstance(model.roi_heads, torchvision.models.detection.roi_heads.RoIHeads)


def test_from_scratch_every_backbone_layer_trains_with_plain_batchnorm():
    model = make_model()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_train_step_gives_the_five_finite_losses_and_gradients_reach_the_new_head():
    model = make_model().train()
    image, target = blob_sample()
    losses = model([image, image.flip(-1)], [target, target])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()

    head = model.roi_heads.mask_head
    coarse_convs = [block[0] for block in head.convs]
    decoder = head.decoder[0]
    coarse_channels = head.upsample.out_channels
    gradients = {
        **{f"convs.{i}": conv.weight.grad for i, conv in enumerate(coarse_convs)},
        "upsample": head.upsample.weight.grad,
        "decoder (from the 14x14 branch)": decoder.weight.grad[:, :coarse_channels],
        "decoder (from the 28x28 skip)": decoder.weight.grad[:, coarse_channels:],
        "predictor": model.roi_heads.mask_predictor.weight.grad,
        "fpn": model.backbone.fpn.layer_blocks[0][0].weight.grad,
    }
    for name, gradient in gradients.items():
        assert gradient is not None and torch.isfinite(gradient).all(), name
        assert gradient.abs().sum() > 0, name


@pytest.mark.parametrize("skip_connection", [True, False])
def test_mask_loss_gets_soft_float32_targets_of_the_positive_rois(skip_connection):
    spy = SpyLoss()
    model = make_model(mask_loss=spy, skip_connection=skip_connection).train()
    image, target = blob_sample(mask_value=0.7)
    model([image], [target])

    (logits, targets), *_ = spy.calls
    assert logits.dtype == torch.float32 and targets.dtype == torch.float32
    assert logits.shape == targets.shape and logits.shape[1:] == (28, 28)
    # The ground-truth box is always a positive RoI: its target is 0.7 but for RoIAlign's mixing
    # with the background along the edges.
    centres = targets[:, 4:-4, 4:-4]
    assert torch.isclose(centres, torch.tensor(0.7), atol=1e-5).all(dim=(1, 2)).any()
    assert targets.max() <= 0.7 + 1e-5 and targets.min() >= 0.0


def test_soft_maskrcnn_loss_with_bce_is_torchvisions_maskrcnn_loss():
    generator = torch.Generator().manual_seed(0)
    mask_logits = torch.randn(5, NUM_CLASSES, 28, 28, generator=generator)
    proposals = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 50.0, 60.0]])] + [
        torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 60.0, 30.0], [8.0, 1.0, 33.0, 44.0]])
    ]
    gt_masks = [
        (torch.rand(2, 64, 64, generator=generator) > 0.5).to(torch.uint8),
        torch.rand(1, 64, 64, generator=generator),
    ]
    gt_labels = [torch.tensor([1, 2]), torch.tensor([2])]
    matched = [torch.tensor([1, 0]), torch.tensor([0, 0, 0])]

    ours = soft_maskrcnn_loss(
        TORCHVISION_MASK_LOSS, mask_logits, proposals, gt_masks, gt_labels, matched
    )
    theirs = maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, matched)
    torch.testing.assert_close(ours, theirs)


def test_standard_head_is_torchvisions_exactly():
    model = make_model(skip_connection=False)
    heads = model.roi_heads
    assert type(heads.mask_roi_pool) is MultiScaleRoIAlign
    assert heads.mask_roi_pool.output_size == (14, 14)
    reference = nn.ModuleDict(
        {
            "mask_head": MaskRCNNHeads(256, [256, 256, 256, 256], 1),
            "mask_predictor": MaskRCNNPredictor(256, 256, NUM_CLASSES),
        }
    )
    ours = nn.ModuleDict({"mask_head": heads.mask_head, "mask_predictor": heads.mask_predictor})

    def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in module.state_dict().items()}

    assert shapes(ours) == shapes(reference)
    assert shapes(make_model().roi_heads.mask_head) != shapes(heads.mask_head)


def test_transform_keeps_soft_masks_which_torchvision_zeroes():
    image, target = blob_sample(mask_value=0.7)
    transform = make_model().transform.train()
    assert isinstance(transform, SoftMaskTransform)
    _, (same_size,) = transform([image], [target])
    assert torch.equal(same_size["masks"], target["masks"])

    upsampling = SoftMaskTransform(96, 96, [0.0] * 3, [1.0] * 3).train()
    batch, (resized,) = upsampling([image], [target])
    assert resized["masks"].shape == (1, 96, 96)
    assert batch.image_sizes == [(96, 96)]
    assert resized["masks"].dtype == torch.float32
    assert math.isclose(resized["masks"].max().item(), 0.7, abs_tol=1e-5)
    torch.testing.assert_close(resized["boxes"], target["boxes"] * 1.5)

    torchvision_transform = GeneralizedRCNNTransform(64, 64, [0.0] * 3, [1.0] * 3).train()
    _, (zeroed,) = torchvision_transform([image], [target])
    assert zeroed["masks"].max() == 0


def test_binary_uint8_masks_take_torchvisions_path():
    image, target = blob_sample(mask_value=1.0)
    target = {**target, "masks": target["masks"].to(torch.uint8)}
    ours = SoftMaskTransform(96, 96, [0.0] * 3, [1.0] * 3).train()
    theirs = GeneralizedRCNNTransform(96, 96, [0.0] * 3, [1.0] * 3).train()
    assert torch.equal(
        ours([image], [target])[1][0]["masks"], theirs([image], [target])[1][0]["masks"]
    )


def test_eval_output_is_torchvisions_format():
    model = make_model(box_score_thresh=0.0).eval()
    image, _ = blob_sample()
    with torch.no_grad():
        outputs = model([image, image])
    assert len(outputs) == 2
    for output in outputs:
        assert set(output) == {"boxes", "labels", "scores", "masks"}
        count = output["boxes"].shape[0]
        assert 0 < count <= SMALL["box_detections_per_img"]
        assert output["boxes"].shape == (count, 4)
        assert output["labels"].dtype == torch.int64 and output["labels"].min() >= 1
        assert output["masks"].shape == (count, 1, IMAGE_SIZE, IMAGE_SIZE)
        assert output["masks"].dtype == torch.float32
        assert output["masks"].min() >= 0 and output["masks"].max() <= 1


def test_tiny_overfit_lowers_the_mask_loss():
    model = make_model().train()
    image, target = blob_sample(mask_value=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    mask_losses = []
    for _ in range(40):
        losses = model([image], [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        mask_losses.append(losses["loss_mask"].item())
    # The positive RoIs change from step to step (the RPN learns too), so single values jump:
    # compare the mean of the last ten steps with the start.
    assert sum(mask_losses[-10:]) / 10 < 0.5 * mask_losses[0], mask_losses


def test_cpu_bf16_autocast_forward_and_backward_are_finite():
    spy = SpyLoss()
    model = make_model(mask_loss=spy).train()
    image, target = blob_sample()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([image], [target])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    logits, targets = spy.calls[0]
    assert logits.dtype == targets.dtype == torch.float32


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    model = make_model(box_score_thresh=0.0).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    restored = IMaskRCNN(
        NUM_CLASSES, backbone="resnet18", image_size=IMAGE_SIZE, box_score_thresh=0.0, **SMALL
    )
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    image, _ = blob_sample()
    with torch.no_grad():
        (expected,), (actual,) = model([image]), restored([image])
    assert expected["boxes"].shape[0] > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.parametrize(
    ("backbone", "classifier", "first_conv"),
    [
        ("resnet18", torchvision.models.resnet18, "conv1.weight"),
        ("mobilenet_v3", torchvision.models.mobilenet_v3_large, "0.0.weight"),
    ],
)
def test_backbone_weights_from_a_local_file(tmp_path, backbone, classifier, first_conv):
    torch.manual_seed(123)
    state_dict = classifier(weights=None).state_dict()
    path = tmp_path / f"{backbone}.pth"
    torch.save(state_dict, path)

    model = make_model(backbone=backbone, backbone_weights=str(path))
    body = model.backbone.body.state_dict()
    full_model_key = first_conv if backbone == "resnet18" else f"features.{first_conv}"
    assert torch.equal(body[first_conv], state_dict[full_model_key])
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())

    body_path = tmp_path / "body.pth"
    torch.save(model.backbone.body.state_dict(), body_path)
    again = make_model(backbone=backbone, backbone_weights=str(body_path))
    assert torch.equal(again.backbone.body.state_dict()[first_conv], body[first_conv])


def test_bad_backbone_weights_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        make_model(backbone_weights=str(missing))
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="mobilenet.pth.*resnet18"):
        make_model(backbone_weights=str(wrong))


def test_anchor_sizes_can_be_overridden_and_the_mask_branch_cannot():
    assert make_model().rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    model = make_model(anchor_sizes=[4, 8, 16, 32, 64], anchor_aspect_ratios=[1.0])
    assert model.rpn.anchor_generator.sizes == ((4,), (8,), (16,), (32,), (64,))
    assert model.rpn.head.cls_logits.out_channels == 1
    with pytest.raises(ValueError, match="mask_head"):
        make_model(mask_head=nn.Identity())


def test_narrow_pyramid_and_heads_with_group_norm_train():
    model = make_model(channels=32, box_representation_size=64, mask_head_norm="group").train()
    assert model.backbone.out_channels == 32
    assert all(block[0].out_channels == 32 for block in model.backbone.fpn.layer_blocks)
    assert model.roi_heads.box_head.fc7.out_features == 64
    assert model.roi_heads.box_predictor.cls_score.in_features == 64
    head = model.roi_heads.mask_head
    norms = [module for module in head.modules() if isinstance(module, nn.GroupNorm)]
    assert len(norms) == 5  # after each of the four convolutions and the decoder
    image, target = blob_sample()
    losses = model([image], [target])
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert head.decoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask_head_norm"):
        make_model(mask_head_norm="batch")
    with pytest.raises(ValueError, match="box_head"):
        make_model(box_head=nn.Identity())


@pytest.mark.parametrize("preset", sorted(path.stem for path in LOSS_CONFIGS.glob("*.yaml")))
def test_group_norm_head_keeps_mask_logits_inside_the_clip_for_every_preset(preset):
    """A few Adam steps of each loss preset on a tiny batch, with the CPU recipe's head."""
    register_configs()
    with initialize_config_module(config_module="bmlseg.conf", version_base=None):
        loss = OmegaConf.to_container(compose("train", overrides=[f"loss={preset}"]).loss)
    options = {key: value for key, value in loss.items() if key not in LOSS_META_KEYS}
    model = make_model(
        channels=32,
        box_representation_size=64,
        mask_head_norm="group",
        mask_loss=MaskLoss(**options),
    ).train()
    logits = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda *args: logits.append(args[2]))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    image, target = blob_sample()
    for _ in range(5):
        optimizer.zero_grad()
        sum(model([image, image.flip(-1)], [target, target]).values()).backward()
        optimizer.step()
    bound = math.log((1 - loss["p_min"]) / loss["p_min"])  # logit(1 - Pmin): 46.05
    assert all(step.abs().max() < bound for step in logits), preset


def test_probability_map_is_the_max_of_kept_instances_masks():
    masks = torch.zeros(3, 1, 2, 3)
    masks[0, 0] = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.0, 0.0]])
    masks[1, 0] = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    masks[2, 0] = torch.tensor([[0.3, 0.4, 0.0], [0.0, 0.0, 0.6]])
    prediction = {"masks": masks, "scores": torch.tensor([0.8, 0.2, 0.5])}

    expected = torch.tensor([[0.9, 0.4, 0.0], [0.2, 0.0, 0.6]])
    assert torch.equal(probability_map(prediction, (2, 3)), expected)
    assert torch.equal(probability_map(prediction, (2, 3), score_threshold=0.9), torch.zeros(2, 3))
    empty = {"masks": torch.zeros(0, 1, 2, 3), "scores": torch.zeros(0)}
    assert torch.equal(probability_map(empty, (2, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="image_shape"):
        probability_map(prediction, (3, 2))


@pytest.mark.parametrize("name", sorted(path.stem for path in MODEL_CONFIGS.glob("*.yaml")))
def test_the_factory_builds_every_model_config(name):
    """build_model, what bmlseg-train, -eval and -predict call, on each model config as composed
    by bmlseg-train (image_size follows data.crop_size)."""
    register_configs()
    with initialize_config_module(config_module="bmlseg.conf", version_base=None):
        config = compose("train", overrides=[f"model={name}", "loss=baseline_bce"])
    model_config = OmegaConf.to_container(config.model, resolve=True)
    loss_config = OmegaConf.to_container(config.loss, resolve=True)
    assert model_config["name"] == name
    model = build_model(model_config, loss_config, NUM_CLASSES)
    assert model.transform.min_size == (config.data.crop_size,)
    assert model.backbone_name == model_config["backbone"]
    skip = model.roi_heads.mask_head.__class__.__name__ == "SkipMaskHead"
    assert skip == model_config["skip_connection"]
    assert model.roi_heads.mask_loss.weights["bce"] == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_train_step_and_eval():
    spy = SpyLoss()
    model = make_model(mask_loss=spy).cuda().train()
    image, target = blob_sample()
    image = image.cuda()
    target = {key: value.cuda() for key, value in target.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model([image], [target])
    assert set(losses) == LOSS_KEYS
    sum(losses.values()).backward()
    assert all(torch.isfinite(loss) for loss in losses.values())
    logits, targets = spy.calls[0]
    assert logits.dtype == targets.dtype == torch.float32
    assert torch.isclose(targets[:, 4:-4, 4:-4], torch.tensor(0.7, device="cuda")).any()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        (output,) = model([image])
    assert output["masks"].shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE)
