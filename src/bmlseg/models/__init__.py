"""IMaskRCNN (torchvision Mask R-CNN subclass), its skip-connection mask head and soft targets."""

from .backbone import BACKBONES, build_backbone, small_lesion_anchor_generator
from .build import build_model
from .imaskrcnn import IMaskRCNN, probability_map
from .mask_head import MaskPredictor, RoIAlignPair, SkipMaskHead
from .roi_heads import SoftMaskRoIHeads, soft_maskrcnn_loss
from .transform import SoftMaskTransform

__all__ = [
    "BACKBONES",
    "IMaskRCNN",
    "MaskPredictor",
    "RoIAlignPair",
    "SkipMaskHead",
    "SoftMaskRoIHeads",
    "SoftMaskTransform",
    "build_backbone",
    "build_model",
    "probability_map",
    "small_lesion_anchor_generator",
    "soft_maskrcnn_loss",
]
