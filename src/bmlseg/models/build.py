"""The model of a run, from its config: what bmlseg-train, bmlseg-eval and bmlseg-predict build."""

from __future__ import annotations

from typing import Any

from bmlseg.losses import MaskLoss

from .imaskrcnn import IMaskRCNN

# Keys of the loss config that are not MaskLoss arguments.
LOSS_META_KEYS = ("name", "label_kind")


def build_model(
    model: dict[str, Any], loss: dict[str, Any], num_classes: int, *, pretrained: bool = True
) -> IMaskRCNN:
    """IMaskRCNN from a model config and a loss config (plain dicts, as in a checkpoint).

    ``pretrained=False`` skips ``backbone_weights``: for a model whose weights come from a
    checkpoint right after.
    """
    mask_loss = MaskLoss(**{key: value for key, value in loss.items() if key not in LOSS_META_KEYS})
    return IMaskRCNN(
        num_classes,
        backbone=model["backbone"],
        image_size=model["image_size"],
        mask_loss=mask_loss,
        skip_connection=model["skip_connection"],
        backbone_weights=model["backbone_weights"] if pretrained else None,
        **model["maskrcnn_kwargs"],
    )
