"""GeneralizedRCNNTransform that lets soft (float) masks through."""

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform


def resize_soft_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize float masks [N, H, W] to [N, *size] bilinearly; unchanged when already that size."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    resized = F.interpolate(masks[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return resized[:, 0]


class SoftMaskTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that float masks keep their values.

    torchvision resizes ``target["masks"]`` with nearest interpolation and casts the result with
    ``.byte()`` on every call, also at scale 1, which turns soft values in (0, 1) into 0. Here
    float masks are resized bilinearly to the image's new size (not at all when the image keeps
    its size, the normal case for IMaskRCNN) and stay float; other masks take torchvision's path.
    """

    @classmethod
    def from_transform(cls, transform: GeneralizedRCNNTransform) -> "SoftMaskTransform":
        """A SoftMaskTransform with the settings of ``transform``."""
        return cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
        )

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if target is None or "masks" not in target or not target["masks"].is_floating_point():
            return super().resize(image, target)
        without_masks = {key: value for key, value in target.items() if key != "masks"}
        image, resized = super().resize(image, without_masks)
        resized["masks"] = resize_soft_masks(target["masks"], tuple(image.shape[-2:]))
        return image, resized
