"""IMaskRCNN's mask branch: two RoIAligns joined by a skip connection and a decoder layer.

The skip head keeps torchvision's call sequence in ``RoIHeads``:
``mask_roi_pool(features, proposals, image_shapes) -> mask_head -> mask_predictor``; only the
value passed from the pool to the head is a pair of tensors instead of one.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation

MASK_CONVS = 4


class RoIAlignPair(nn.Module):
    """RoIAlign of the same FPN levels at two resolutions.

    Returns ``(coarse [K, C, 14, 14], fine [K, C, 28, 28])`` for K boxes: the coarse grid feeds
    the standard conv stack, the fine grid is the skip connection to the decoder layer.
    """

    def __init__(
        self,
        featmap_names: list[str],
        coarse_size: int = 14,
        fine_size: int = 28,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.coarse = MultiScaleRoIAlign(featmap_names, coarse_size, sampling_ratio)
        self.fine = MultiScaleRoIAlign(featmap_names, fine_size, sampling_ratio)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        coarse = self.coarse(features, proposals, image_shapes)
        fine = self.fine(features, proposals, image_shapes)
        return coarse, fine


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018), fewer where ``channels`` is not a multiple."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class SkipMaskHead(nn.Module):
    """Standard mask branch, upsampled and joined with the fine RoIAlign by a decoder layer.

    coarse [K, C, 14, 14] -> 4 x (conv 3x3, [GN], ReLU) -> deconv 2x2/2, ReLU -> [K, W, 28, 28]
    concatenated with fine [K, C, 28, 28] -> decoder conv 3x3, [GN], ReLU -> [K, W, 28, 28],
    W = ``channels`` (torchvision: 256).

    Args:
        norm_layer: None (torchvision's head) or e.g. ``group_norm``: normalized convolutions
            keep the head's activations at one scale whatever the loss does to the predictor,
            as the paper's Keras head (with BatchNorm) had.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.convs = MaskRCNNHeads(
            in_channels, [channels] * MASK_CONVS, dilation=1, norm_layer=norm_layer
        )
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.decoder = Conv2dNormActivation(
            channels + in_channels, channels, kernel_size=3, norm_layer=norm_layer
        )
        self.out_channels = channels
        for conv in (self.upsample, self.decoder[0]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, pooled: tuple[Tensor, Tensor]) -> Tensor:
        coarse, fine = pooled
        upsampled = torch.relu(self.upsample(self.convs(coarse)))
        return self.decoder(torch.cat([upsampled, fine], dim=1))


class MaskPredictor(nn.Conv2d):
    """Per-class 1x1 conv: [K, C, M, M] -> mask logits [K, num_classes, M, M].

    Initialized with small weights (std 0.001, as Detectron2's mask head), so training starts
    from logits near 0. torchvision's fan-out Kaiming init gives this 1x1 conv weights of std 1
    over 256 input channels: from scratch the skip head then starts with logits beyond +-46,
    where the mask loss's clip at Pmin passes no gradient.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.weight, std=0.001)
        nn.init.zeros_(self.bias)


def skip_mask_branch(
    in_channels: int,
    num_classes: int,
    featmap_names: list[str],
    channels: int,
    norm_layer: Callable[[int], nn.Module] | None = None,
) -> tuple[RoIAlignPair, SkipMaskHead, MaskPredictor]:
    """IMaskRCNN's mask branch: (mask_roi_pool, mask_head, mask_predictor)."""
    head = SkipMaskHead(in_channels, channels, norm_layer)
    return RoIAlignPair(featmap_names), head, MaskPredictor(head.out_channels, num_classes)
