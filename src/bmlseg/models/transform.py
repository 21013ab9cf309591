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


# Target entries resized bilinearly with the image: the soft masks [N, H, W], and the image
# itself [C, H, W] when the mask loss looks at it (see SoftMaskRoIHeads).
FLOAT_MAPS = ("masks", "image")


class SoftMaskTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that float masks keep their values.

    torchvision resizes ``target["masks"]`` with nearest interpolation and casts the result with
    ``.byte()`` on every call, also at scale 1, which turns soft values in (0, 1) into 0. Here
    float masks are resized bilinearly to the image's new size (not at all when the image keeps
    its size, the normal case for IMaskRCNN) and stay float; other masks take torchvision's path.
    A float ``target["image"]`` is resized the same way.
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
        if target is None:
            return super().resize(image, target)
        float_maps = {
            key: target[key]
            for key in FLOAT_MAPS
            if key in target and target[key].is_floating_point()
        }
        others = {key: value for key, value in target.items() if key not in float_maps}
        image, resized = super().resize(image, others)
        for key, maps in float_maps.items():
            resized[key] = resize_soft_masks(maps, tuple(image.shape[-2:]))
        return image, resized
