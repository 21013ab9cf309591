"""Backbones (ResNet / MobileNetV3 + FPN) and anchors for small lesions.

Every backbone returns the same pyramid: feature maps "0", "1", "2", "3" at strides 4, 8, 16, 32
(``channels`` each, torchvision's 256 by default) plus "pool" at stride 64, so the RoIAlign layers
and anchors below fit all of them.
"""

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    mobilenet_backbone,
    resnet_fpn_backbone,
)
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

BACKBONES = ("resnet50", "resnet18", "mobilenet_v3")

FEATURE_MAPS = ["0", "1", "2", "3"]
FPN_CHANNELS = 256

# One anchor size per pyramid level, twice the level's stride (torchvision uses 8x the stride:
# 32..512 px, made for COCO objects in 800-pixel images). BMLs in 320-pixel crops span roughly
# 5-80 px, so the smallest anchors must fit a lesion a few pixels wide.
SMALL_LESION_ANCHOR_SIZES = (8, 16, 32, 64, 128)
ASPECT_RATIOS = (0.5, 1.0, 2.0)

# MobileNetV3-Large stages 1-4 end at strides 4, 8, 16 and 32; torchvision's detection default
# ([4, 5]: two stride-32 maps) is too coarse for lesions a few pixels wide.
_MOBILENET_RETURNED_LAYERS = [1, 2, 3, 4]

# Trainable layers with pretrained weights, as in torchvision's detection builders (from scratch,
# every layer trains).
_PRETRAINED_TRAINABLE_LAYERS = {"resnet50": 3, "resnet18": 3, "mobilenet_v3": 3}
_SCRATCH_TRAINABLE_LAYERS = {"resnet50": 5, "resnet18": 5, "mobilenet_v3": 6}

# Prefix of the FPN body's layers in the state_dict of torchvision's classification model.
_BODY_PREFIX = {"resnet50": "", "resnet18": "", "mobilenet_v3": "features."}

_WEIGHTS_NAME = re.compile(r"^\w+_Weights\.\w+$")


def small_lesion_anchor_generator(
    sizes: Sequence[float] = SMALL_LESION_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
) -> AnchorGenerator:
    """Anchors of one size per pyramid level ("0".."3", "pool"), each at every aspect ratio."""
    if len(sizes) != len(FEATURE_MAPS) + 1:
        raise ValueError(
            f"anchor sizes: expected one per pyramid level ({len(FEATURE_MAPS) + 1}), "
            f"got {list(sizes)}"
        )
    return AnchorGenerator(
        sizes=tuple((size,) for size in sizes),
        aspect_ratios=(tuple(aspect_ratios),) * len(sizes),
    )


def build_backbone(
    name: str, weights: str | None = None, channels: int = FPN_CHANNELS
) -> BackboneWithFPN:
    """Build a feature pyramid backbone by name, from scratch unless weights are given.

    Args:
        name: one of ``BACKBONES``.
        weights: None (random initialisation, no download), a path to a local state_dict of the
            torchvision classification model or of the FPN body, or a torchvision weights name
            such as ``"ResNet50_Weights.IMAGENET1K_V1"`` (downloaded by torchvision).

        channels: width of every pyramid level (torchvision: 256). Narrower pyramids make the
            RoIAlign layers and the heads after them cheaper, which is most of a CPU step.

    Returns:
        BackboneWithFPN with ``out_channels == channels``. From scratch, every layer trains and uses
        ordinary BatchNorm2d; with pretrained weights, BatchNorm is frozen and the first layers
        too, as in torchvision's detection builders.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    weights_path, weights_enum = _parse_weights(weights)
    pretrained = weights is not None
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    table = _PRETRAINED_TRAINABLE_LAYERS if pretrained else _SCRATCH_TRAINABLE_LAYERS
    backbone = _fpn_backbone(name, weights_enum, norm_layer, table[name])
    if weights_path is not None:
        _load_body(backbone.body, weights_path, name)
    if channels != backbone.out_channels:
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, channels, LastLevelMaxPool())
        backbone.out_channels = channels
    return backbone


def _fpn_backbone(
    name: str,
    weights: torchvision.models.WeightsEnum | None,
    norm_layer: Callable[..., nn.Module],
    trainable_layers: int,
) -> BackboneWithFPN:
    if name == "mobilenet_v3":
        return mobilenet_backbone(
            backbone_name="mobilenet_v3_large",
            weights=weights,
            fpn=True,
            norm_layer=norm_layer,
            trainable_layers=trainable_layers,
            returned_layers=_MOBILENET_RETURNED_LAYERS,
        )
    return resnet_fpn_backbone(
        backbone_name=name,
        weights=weights,
        norm_layer=norm_layer,
        trainable_layers=trainable_layers,
    )


def _parse_weights(
    weights: str | None,
) -> tuple[Path | None, torchvision.models.WeightsEnum | None]:
    """Split ``weights`` into a local file path or a torchvision weights enum (one of them)."""
    if weights is None:
        return None, None
    path = Path(weights)
    if not path.exists() and _WEIGHTS_NAME.match(str(weights)):
        return None, torchvision.models.get_weight(str(weights))
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone_weights: no such file {str(path)!r} (expected a state_dict saved with "
            "torch.save, or a torchvision weights name like 'ResNet50_Weights.IMAGENET1K_V1')"
        )
    return path, None


def _load_body(body: nn.Module, path: Path, name: str) -> None:
    """Load a classification-model or FPN-body state_dict from ``path`` into ``body``."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"backbone_weights {str(path)!r}: cannot read a state_dict: {error}"
        ) from error
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"backbone_weights {str(path)!r}: expected a state_dict (dict of tensors), "
            f"got {type(state_dict).__name__}"
        )
    # Layers past the last pyramid level (classifier, pooling, MobileNet's last blocks) are not
    # part of the body: their weights are left out.
    layers = {layer for layer, _ in body.named_children()}
    body_state = {}
    for key, value in state_dict.items():
        body_key = key.removeprefix(_BODY_PREFIX[name])
        if body_key.split(".")[0] in layers:
            body_state[body_key] = value
    expected = f"the state_dict of torchvision's {name} classification model or of the FPN body"
    try:
        missing = body.load_state_dict(body_state, strict=False).missing_keys
    except RuntimeError as error:
        raise ValueError(
            f"backbone_weights {str(path)!r} does not fit a {name} backbone "
            f"(expected {expected}): {error}"
        ) from error
    if missing:
        raise ValueError(
            f"backbone_weights {str(path)!r} does not fit a {name} backbone (expected {expected}): "
            f"{len(missing)} of its {len(body.state_dict())} weights are missing, e.g. {missing[:3]}"
        )
