"""IMaskRCNN: torchvision's Mask R-CNN with the Improved-Mask R-CNN mask head and soft targets."""

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from .backbone import FEATURE_MAPS, FPN_CHANNELS, build_backbone, small_lesion_anchor_generator
from .mask_head import group_norm, skip_mask_branch
from .roi_heads import MaskLossFn, SoftMaskRoIHeads
from .transform import SoftMaskTransform

_MASK_BRANCH_KWARGS = ("mask_roi_pool", "mask_head", "mask_predictor")
_BOX_HEAD_KWARGS = ("box_head", "box_predictor")
# torchvision's box head: two fully connected layers of this width on 7x7 RoIAlign features.
BOX_REPRESENTATION_SIZE = 1024
HEAD_NORMS = ("none", "group")


class IMaskRCNN(MaskRCNN):
    """Improved Mask R-CNN (Felfeliyan et al. 2022) on torchvision's MaskRCNN.

    The IMaskRCNN paper improves the mask head by "adding a 2nd RoIAligned block, adding an extra
    decoder layer to the mask header, and connecting them by a skip connection" (U-Net style).
    Our reading, with C = 256 FPN channels and K positive RoIs::

        FPN "0".."3" -- RoIAlign 14x14 -> [K, C, 14, 14] -> 4 x (conv 3x3, 256, ReLU)
                                           -> deconv 2x2 stride 2, ReLU -> [K, 256, 28, 28] --+
        FPN "0".."3" -- RoIAlign 28x28 -> [K, C, 28, 28] ------------- skip connection -------+
                                                              concat -> [K, 256 + C, 28, 28]
                                          -> decoder conv 3x3, 256, ReLU -> [K, 256, 28, 28]
                                          -> conv 1x1 -> mask logits [K, num_classes, 28, 28]

    The first branch is torchvision's standard head (MaskRCNNHeads and the predictor's
    deconvolution); ``skip_connection=False`` gives torchvision's exact standard head, the plain
    Mask R-CNN baseline.

    Soft targets: ``targets[i]["masks"]`` may be float [N, H, W] in [0, 1]; they reach
    ``mask_loss`` as soft values, changed only by RoIAlign's interpolation onto the 28x28 grid.

    Args:
        num_classes: number of classes including the background.
        backbone: "resnet50" (paper scale), "resnet18" or "mobilenet_v3" (MobileNetV3-Large;
            CPU scale), each with an FPN.
        image_size: side of the square input slices; nothing is resized at this size.
        mask_loss: ``mask_loss(logits [P, M, M], targets [P, M, M]) -> scalar``, called in
            float32 on the positive RoIs' logits of their target class; None means torchvision's
            binary cross-entropy.
        skip_connection: True for the IMaskRCNN head, False for torchvision's standard head.
        channels: width of the feature pyramid and of the skip head's convolutions
            (torchvision: 256). 64 makes a CPU step several times cheaper (docs/model.md).
        box_representation_size: width of the box head's two fully connected layers.
        mask_head_norm: ``"none"`` (torchvision's head) or ``"group"``: GroupNorm after each
            convolution of the skip head.
        backbone_weights: None (from scratch, nothing downloaded), a local state_dict file of the
            torchvision classification model or the FPN body, or a torchvision weights name such
            as "ResNet50_Weights.IMAGENET1K_V1" (downloaded).
        **maskrcnn_kwargs: passed to ``MaskRCNN`` (e.g. ``rpn_batch_size_per_image``,
            ``box_detections_per_img``, ``rpn_anchor_generator``). ``anchor_sizes`` (one size
            per pyramid level) and ``anchor_aspect_ratios`` replace the small-lesion anchors
            without building an AnchorGenerator, e.g. from a YAML config.

    Inputs are 3-channel 2.5D slices already normalized per volume, so the transform uses mean 0
    and std 1. Outputs are torchvision's: a loss dict in training, and in eval one dict per image
    with boxes, labels, scores and masks (float [N, 1, H, W], probabilities).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        image_size: int = 320,
        mask_loss: MaskLossFn | None = None,
        skip_connection: bool = True,
        channels: int = FPN_CHANNELS,
        box_representation_size: int = BOX_REPRESENTATION_SIZE,
        mask_head_norm: str = "none",
        backbone_weights: str | None = None,
        **maskrcnn_kwargs: Any,
    ) -> None:
        fixed = sorted(set(_MASK_BRANCH_KWARGS + _BOX_HEAD_KWARGS) & maskrcnn_kwargs.keys())
        if fixed:
            raise ValueError(
                f"IMaskRCNN: {fixed} cannot be passed; the heads are chosen by skip_connection, "
                "channels, box_representation_size and mask_head_norm"
            )
        if mask_head_norm not in HEAD_NORMS:
            raise ValueError(f"mask_head_norm must be one of {HEAD_NORMS}, got {mask_head_norm!r}")
        anchor_options = {
            key.removeprefix("anchor_"): maskrcnn_kwargs.pop(key)
            for key in ("anchor_sizes", "anchor_aspect_ratios")
            if key in maskrcnn_kwargs
        }
        options: dict[str, Any] = {
            "min_size": image_size,
            "max_size": image_size,
            "image_mean": [0.0, 0.0, 0.0],
            "image_std": [1.0, 1.0, 1.0],
            "rpn_anchor_generator": small_lesion_anchor_generator(**anchor_options),
        }
        options.update(maskrcnn_kwargs)
        features = build_backbone(backbone, backbone_weights, channels)
        super().__init__(features, num_classes, **options)

        heads = self.roi_heads
        pooled = channels * heads.box_roi_pool.output_size[0] * heads.box_roi_pool.output_size[1]
        heads.box_head = TwoMLPHead(pooled, box_representation_size)
        heads.box_predictor = FastRCNNPredictor(box_representation_size, num_classes)
        if skip_connection:
            norm_layer = group_norm if mask_head_norm == "group" else None
            mask_branch = skip_mask_branch(
                channels, num_classes, FEATURE_MAPS, channels, norm_layer
            )
        else:
            mask_branch = (heads.mask_roi_pool, heads.mask_head, heads.mask_predictor)
        self.roi_heads = SoftMaskRoIHeads.from_roi_heads(heads, *mask_branch, mask_loss=mask_loss)
        self.transform = SoftMaskTransform.from_transform(self.transform)
        self.backbone_name = backbone
        self.image_size = image_size
        self.skip_connection = skip_connection

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """torchvision's forward; in training, a mask loss that looks at the image (BoxInst's
        pairwise term) finds each image in its target as ``"image"``."""
        if self.training and targets is not None and self.roi_heads.mask_loss_needs_image:
            targets = [
                {**target, "image": image} for image, target in zip(images, targets, strict=True)
            ]
        return super().forward(images, targets)


def probability_map(
    prediction: dict[str, Tensor], image_shape: tuple[int, int], score_threshold: float = 0.5
) -> Tensor:
    """Pixelwise lesion probability [H, W] from one image's eval output.

    The maximum, over the instances with ``score >= score_threshold``, of their mask
    probabilities (``prediction["masks"]``, [N, 1, H, W]). Scores select instances but do not
    multiply the masks, so a pixel's value is a mask probability. Zero where no instance is kept.
    """
    masks = prediction["masks"]
    if tuple(masks.shape[-2:]) != tuple(image_shape):
        raise ValueError(
            f"probability_map: prediction masks are {tuple(masks.shape[-2:])}, "
            f"expected image_shape {tuple(image_shape)}"
        )
    kept = masks[prediction["scores"] >= score_threshold, 0].float()
    if kept.shape[0] == 0:
        return torch.zeros(tuple(image_shape), dtype=torch.float32, device=masks.device)
    return kept.amax(dim=0)
