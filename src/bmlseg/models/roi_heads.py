"""RoI heads whose mask loss is any callable on soft targets."""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    project_masks_on_boxes,
)
from torchvision.ops import roi_align

from bmlseg.losses import MaskLoss

MaskLossFn = Callable[[Tensor, Tensor], Tensor]

# torchvision's Mask R-CNN criterion: binary cross entropy against the target as it is, soft or
# binary (the sce term; bce would cut the target at 0.5 first).
TORCHVISION_MASK_LOSS = MaskLoss(bce=0.0, sce=1.0, normalized=False)


def positive_mask_logits_and_targets(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Pair each positive RoI's logits for its target class with its RoIAligned target.

    Args:
        mask_logits: [P, num_classes, M, M] for the P positive RoIs of all images.
        proposals: per image, [P_i, 4] positive RoI boxes.
        gt_masks: per image, [N_i, H, W] masks, float in [0, 1] or binary of any dtype.
        gt_labels: per image, [N_i] class labels.
        mask_matched_idxs: per image, [P_i] index of the ground truth each RoI matched.

    Returns:
        logits [P, M, M] and targets [P, M, M]. Targets come from torchvision's
        ``project_masks_on_boxes`` (RoIAlign of float masks), so soft values stay soft.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat(
        [labels[idxs] for labels, idxs in zip(gt_labels, mask_matched_idxs, strict=True)]
    )
    targets = torch.cat(
        [
            project_masks_on_boxes(masks, boxes, idxs, size)
            for masks, boxes, idxs in zip(gt_masks, proposals, mask_matched_idxs, strict=True)
        ]
    )
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return logits, targets


def soft_maskrcnn_loss(
    mask_loss: MaskLossFn,
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
    images: list[Tensor] | None = None,
) -> Tensor:
    """torchvision's ``maskrcnn_loss`` with the criterion ``mask_loss(logits, targets)``.

    Logits and targets reach ``mask_loss`` as float32 [P, M, M], also under autocast: the loss
    math needs float32 to resolve probabilities near 0 and 1. When ``images`` (per image,
    [C, H, W]) are given, the loss is called as ``mask_loss(logits, targets, image_patches)``
    with the image under each RoI on the mask grid, [P, C, M, M] (BoxInst's pairwise term).
    """
    logits, targets = positive_mask_logits_and_targets(
        mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs
    )
    if targets.numel() == 0:
        # No positive RoI: a zero that keeps the mask branch in the graph, as torchvision does.
        return mask_logits.sum() * 0
    if images is None:
        return mask_loss(logits.float(), targets.float())
    size = mask_logits.shape[-1]
    # The same sampling as project_masks_on_boxes uses for the targets, so pixels line up.
    image_patches = torch.cat(
        [
            roi_align(image[None].float(), [boxes], (size, size), 1.0)
            for image, boxes in zip(images, proposals, strict=True)
        ]
    )
    return mask_loss(logits.float(), targets.float(), image_patches)


class SoftMaskRoIHeads(RoIHeads):
    """torchvision's RoIHeads with a pluggable mask loss and soft (float) mask targets.

    Args:
        *args, **kwargs: as for ``RoIHeads``.
        mask_loss: called as ``mask_loss(logits [P, M, M], targets [P, M, M]) -> scalar`` on the
            positive RoIs' logits of their target class; None means torchvision's BCE
            (TORCHVISION_MASK_LOSS). A loss
            whose ``needs_image`` is true also gets the image patches [P, C, M, M].
    """

    def __init__(self, *args, mask_loss: MaskLossFn | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_loss = mask_loss if mask_loss is not None else TORCHVISION_MASK_LOSS

    @property
    def mask_loss_needs_image(self) -> bool:
        """Whether the mask loss looks at the image (then each target carries it as "image")."""
        return bool(getattr(self.mask_loss, "needs_image", False))

    @classmethod
    def from_roi_heads(
        cls,
        heads: RoIHeads,
        mask_roi_pool: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
        mask_loss: MaskLossFn | None = None,
    ) -> "SoftMaskRoIHeads":
        """The box branch and settings of ``heads`` (as FasterRCNN built them) with a new mask
        branch and mask loss."""
        return cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            mask_loss=mask_loss,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        # RoIHeads.forward calls the module-level maskrcnn_loss by name, so the mask criterion
        # cannot be swapped without overriding it (torchvision's advice, vision issue #6221).
        # Inference is torchvision's own path; training repeats its box and mask steps and only
        # replaces the mask loss. Keypoint heads are not supported.
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )

        positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
        mask_proposals = [boxes[pos] for boxes, pos in zip(proposals, positives, strict=True)]
        pos_matched_idxs = [idxs[pos] for idxs, pos in zip(matched_idxs, positives, strict=True)]
        mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        loss_mask = soft_maskrcnn_loss(
            self.mask_loss,
            mask_logits,
            mask_proposals,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            pos_matched_idxs,
            [t["image"] for t in targets] if self.mask_loss_needs_image else None,
        )
        losses = {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask,
        }
        return [], losses
