"""Detection instances from a soft label: the boxes and soft masks Mask R-CNN trains on.

A soft label says how sure the readers (and the label pipeline) are that a voxel is BML. The
detector needs objects, so an instance is a *confident* part of the label:

- its **core** is an 8-connected component of ``label >= threshold`` with at least
  ``min_area_mm2`` of area (smaller ones are speckle: dropped);
- its **box** is the core's tight box;
- its **mask** holds the soft values of the ``label > 0`` region around the core. A voxel of that
  region that could belong to two cores (both lie in one component of ``label > 0``) goes to the
  nearer core (Euclidean distance, ties to the lower index), so instance masks never overlap.

Soft values of a ``label > 0`` region without any core belong to no instance: as in torchvision,
the mask loss sees them only where an instance's RoI covers them. Binary labels go through the
same code (their core is the label itself), so every Table I row is built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bmlseg.metrics import EIGHT_CONNECTED, connected_instances


@dataclass
class InstanceOptions:
    """How instances are cut from a soft label (``data.instances`` in the configs, where these
    defaults are the only ones: the config schema uses this class).

    Attributes:
        threshold: a voxel is confident when its label is at least this; the default is the
            hard target of MaskLoss's BCE term, so the boxes and the hard target agree.
        min_area_mm2: cores smaller than this in-plane area are dropped. 8 mm^2 is 5 pixels of
            the ``small`` phantom (1.25 mm pixels) and 62 pixels at the paper's 0.36 mm: about
            the smallest lesion of the phantom's truth (docs/dataset.md has the measurement).
    """

    threshold: float = 0.5
    min_area_mm2: float = 8.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"data.instances.threshold must lie in (0, 1], got {self.threshold}")
        if self.min_area_mm2 < 0:
            raise ValueError(f"data.instances.min_area_mm2 must be >= 0, got {self.min_area_mm2}")

    def min_area_px(self, pixel_area_mm2: float) -> int:
        """The minimum core area in pixels of ``pixel_area_mm2`` each (at least 1)."""
        return max(1, int(np.ceil(self.min_area_mm2 / pixel_area_mm2 - 1e-9)))


def confident_cores(
    label: np.ndarray, options: InstanceOptions, pixel_area_mm2: float
) -> np.ndarray:
    """The cores of one slice's soft label: 8-connected components of ``label >= threshold``
    of at least ``min_area_mm2``.

    Args:
        label: ``[H, W]`` soft label in [0, 1].
        pixel_area_mm2: in-plane area of one pixel (spacing x times spacing y).

    Returns:
        ``[N, H, W]`` bool, one core each.
    """
    cores = connected_instances(label >= options.threshold)
    return cores[cores.sum(axis=(1, 2)) >= options.min_area_px(pixel_area_mm2)]


def label_instances(
    label: np.ndarray, options: InstanceOptions, pixel_area_mm2: float
) -> tuple[np.ndarray, np.ndarray]:
    """The instances of one slice's soft label.

    Args:
        label: ``[H, W]`` soft label in [0, 1].
        pixel_area_mm2: in-plane area of one pixel (spacing x times spacing y).

    Returns:
        ``boxes [N, 4]`` float32 (x0, y0, x1, y1; exclusive ends) of the cores, and
        ``masks [N, H, W]`` float32: each instance's soft values, 0 elsewhere.
    """
    cores = confident_cores(label, options, pixel_area_mm2)
    if len(cores) == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, *label.shape), np.float32)
    return masks_to_boxes(cores), _grow_into_label(cores, label)


def _grow_into_label(cores: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Each core's share of the ``label > 0`` components it lies in: ``[N, H, W]`` soft masks."""
    owner = np.zeros(label.shape, dtype=np.int64)
    for index, core in enumerate(cores, start=1):
        owner[core & (owner == 0)] = index
    # Every pixel takes the index of its nearest core pixel...
    _, (rows, columns) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest = owner[rows, columns]
    # ...but only within the label > 0 components that hold a core.
    regions, _ = ndimage.label(label > 0, structure=EIGHT_CONNECTED)
    with_core = np.unique(regions[owner > 0])
    inside = np.isin(regions, with_core[with_core > 0])
    masks = np.zeros((len(cores), *label.shape), dtype=np.float32)
    for index in range(len(cores)):
        mine = inside & (nearest == index + 1)
        masks[index][mine] = label[mine]
    return masks


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (x0, y0, x1, y1), exclusive ends, of non-empty masks ``[N, H, W]``.

    Returns:
        ``[N, 4]`` float32.
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        columns = np.flatnonzero(mask.any(axis=0))
        boxes[index] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``[N, 4]`` and ``[K, 4]`` (x0, y0, x1, y1; exclusive ends): ``[N, K]``."""
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(boxes_a[:, 2:] - boxes_a[:, :2], axis=1)
    area_b = np.prod(boxes_b[:, 2:] - boxes_b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)
