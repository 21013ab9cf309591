"""The 2.5D slice dataset: three neighbouring slices as channels, a fixed crop around the knee,
and torchvision detection targets built from soft labels.

Conventions (docs/dataset.md has the long form):

- Image ``[3, C, C]`` float32: channels are slices ``s-1, s, s+1`` of the volume; the first and
  last slice stand in for their missing neighbour.
- Intensities are normalized once per volume: ``(v - median) / (IQR / 1.349)`` over the voxels
  inside the bones mask (1.349 makes the scale equal the standard deviation for Gaussian
  intensities). Bone is what every knee scan shares; fat, fluid and air around it vary.
- Grid: every volume is first brought to the model's grid (bmlseg.data.grid): reoriented to its
  orientation and resampled in-plane to its pixel size, so a crop holds the same millimetres of
  every scan.
- Crop: one box ``(y0, x0, y1, x1)`` (exclusive ends) of ``C x C`` pixels per volume, the same
  for every slice, centred on the bounding box of all bone voxels and kept inside the image
  where the image is large enough. Pixels of the box outside the image are padded with the
  volume's minimum (air) for images and 0 for labels and masks.
- Boxes are ``(x0, y0, x1, y1)`` in crop pixels with *exclusive* ends: a component whose
  columns run from 4 to 9 has ``x0 = 4, x1 = 10`` (torchvision's ``masks_to_boxes`` + 1), so a
  one-pixel instance has width 1 and pixel ``i`` covers ``[i, i + 1)``.
- Instances are the confident parts of the label (bmlseg.data.instances): components of
  ``label >= threshold`` of some minimum area, with the soft values around them as masks.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from bmlseg.data.format import (
    Annotation,
    Case,
    DatasetError,
    DatasetInfo,
    load_case,
    load_dataset,
    softlabel_path,
    softlabel_problems,
)
from bmlseg.data.grid import ModelGrid, from_model_grid, to_model_grid
from bmlseg.data.instances import InstanceOptions, label_instances, masks_to_boxes
from bmlseg.io import Geometry, read_volume
from bmlseg.metrics import connected_instances

# IQR of a standard normal distribution: IQR / 1.349 estimates the standard deviation.
NORMAL_IQR = 1.349
# Warn when more than this share of a volume's bone voxels lies outside its crop.
BONE_OUTSIDE_CROP_WARNING = 0.05


def normalize_volume(image: np.ndarray, bones: np.ndarray) -> np.ndarray:
    """``(image - median) / (IQR / 1.349)`` over the voxels where ``bones > 0``.

    Args:
        image: ``[S, H, W]`` intensities.
        bones: ``[S, H, W]`` bone labels; when it holds no bone, all voxels are used.

    Returns:
        ``[S, H, W]`` float32.
    """
    image = image.astype(np.float32)
    inside = image[bones > 0] if np.any(bones > 0) else image.ravel()
    low, median, high = np.percentile(inside, [25, 50, 75])
    scale = (high - low) / NORMAL_IQR
    # A constant region has nothing to scale; keep it centred.
    return (image - np.float32(median)) / np.float32(scale if scale > 0 else 1.0)


def crop_box(bones: np.ndarray, crop_size: int) -> tuple[int, int, int, int]:
    """The ``crop_size`` square ``(y0, x0, y1, x1)`` (exclusive ends) around a volume's bones.

    Centred on the bounding box of ``bones > 0`` over all slices, then shifted to lie inside
    the image along each axis where the image is at least ``crop_size`` long; along a shorter
    axis the image sits in the middle of the box. Without any bone the image centre is used.

    Args:
        bones: ``[S, H, W]`` bone labels.
    """
    height, width = bones.shape[-2:]
    rows = np.flatnonzero(np.any(bones > 0, axis=(0, 2)))
    columns = np.flatnonzero(np.any(bones > 0, axis=(0, 1)))
    y0 = _box_start(rows, height, crop_size)
    x0 = _box_start(columns, width, crop_size)
    return y0, x0, y0 + crop_size, x0 + crop_size


def warn_if_crop_cuts_bone(
    bones: np.ndarray, box: tuple[int, int, int, int], grid: ModelGrid, where: str
) -> None:
    """Warn when the crop ``box`` leaves out more than 5 % of the bone voxels of ``bones``
    ``[S, H, W]``: the model sees no lesion there, and predicts none."""
    bone = bones > 0
    total = int(bone.sum())
    y0, x0, y1, x1 = box
    inside = int(bone[:, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)].sum())
    if total and (total - inside) / total > BONE_OUTSIDE_CROP_WARNING:
        warnings.warn(
            f"{where}: the crop ({grid.crop_size} pixels of {grid.spacing_mm} mm = "
            f"{grid.crop_mm:.0f} mm) leaves out {100 * (total - inside) / total:.0f} % of the "
            "bone voxels, where nothing is predicted; a larger data.crop_size (or a model "
            "trained with one) covers them",
            stacklevel=2,
        )


def _box_start(occupied: np.ndarray, length: int, crop_size: int) -> int:
    if length < crop_size:
        return -((crop_size - length) // 2)
    centre = (occupied[0] + occupied[-1] + 1) // 2 if occupied.size else length // 2
    return int(np.clip(centre - crop_size // 2, 0, length - crop_size))


def crop_volume(volume: np.ndarray, box: tuple[int, int, int, int], fill: float = 0) -> np.ndarray:
    """Cut ``box`` (y0, x0, y1, x1) out of every slice of ``volume`` ``[S, H, W]``.

    Returns:
        ``[S, y1 - y0, x1 - x0]``, same dtype; pixels of the box outside the image hold ``fill``.
    """
    y0, x0, y1, x1 = box
    height, width = volume.shape[-2:]
    out = np.full((volume.shape[0], y1 - y0, x1 - x0), fill, dtype=volume.dtype)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y1, height), min(x1, width)
    out[:, top - y0 : bottom - y0, left - x0 : right - x0] = volume[:, top:bottom, left:right]
    return out


def paste_volume(
    crops: np.ndarray,
    box: tuple[int, int, int, int],
    shape: tuple[int, int, int],
    fill: float = 0,
) -> np.ndarray:
    """Put crop-sized maps back into a full volume: the inverse of :func:`crop_volume`.

    Args:
        crops: ``[S, C, C]`` maps (e.g. probabilities) for the crop ``box`` of every slice.
        shape: ``(S, H, W)`` of the full volume.

    Returns:
        ``[S, H, W]``, ``crops``' dtype; voxels outside the box hold ``fill``.
    """
    y0, x0, y1, x1 = box
    height, width = shape[-2:]
    out = np.full(shape, fill, dtype=crops.dtype)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y1, height), min(x1, width)
    out[:, top:bottom, left:right] = crops[:, top - y0 : bottom - y0, left - x0 : right - x0]
    return out


def stack_slices(volume: np.ndarray, index: int) -> np.ndarray:
    """Slices ``index - 1, index, index + 1`` of ``volume`` ``[S, H, W]`` as ``[3, H, W]``.

    At the first and last slice the slice itself stands in for the missing neighbour.
    """
    last = volume.shape[0] - 1
    return volume[[max(index - 1, 0), index, min(index + 1, last)]]


class VolumeSlices:
    """Every slice of one volume on the model's grid, as model inputs, in order, for evaluation
    and prediction.

    ``slices[s]`` is the normalized, cropped ``[3, C, C]`` float32 tensor of slice ``s`` of the
    volume on the model's grid (bmlseg.data.grid), whose shape is ``slices.shape``;
    :meth:`paste` puts ``[S, C, C]`` outputs back into that grid, and :meth:`to_source` maps a
    volume on that grid onto the scan's own.

    Args:
        image: ``[S, H, W]`` raw intensities.
        bones: ``[S, H, W]`` bone labels, same grid.
        geometry: the scan's geometry.
        truth: ``[S, H, W]`` ground truth to bring along, or None. ``slices.image``,
            ``slices.bones`` and ``slices.truth`` hold the volumes on the model's grid.
        where: the scan's name in warnings.
    """

    def __init__(
        self,
        image: np.ndarray,
        bones: np.ndarray,
        geometry: Geometry,
        grid: ModelGrid,
        *,
        truth: np.ndarray | None = None,
        where: str,
    ) -> None:
        volumes = {"image": image, "bones": bones} | ({"truth": truth} if truth is not None else {})
        kinds = {"image": "linear", "bones": "nearest", "truth": "nearest"}
        on_grid, self.placed = to_model_grid(volumes, kinds, geometry, grid, where=where)
        self.image: np.ndarray = on_grid["image"]
        self.bones: np.ndarray = on_grid["bones"]
        self.truth: np.ndarray | None = on_grid.get("truth")
        normalized = normalize_volume(on_grid["image"], self.bones)
        self.shape: tuple[int, int, int] = tuple(normalized.shape)
        self.box = crop_box(self.bones, grid.crop_size)
        warn_if_crop_cuts_bone(self.bones, self.box, grid, where)
        self.crops = crop_volume(normalized, self.box, fill=float(normalized.min()))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"slice {index} outside 0..{len(self) - 1}")
        return torch.from_numpy(np.ascontiguousarray(stack_slices(self.crops, index)))

    def paste(self, crops: np.ndarray, fill: float = 0) -> np.ndarray:
        """``[S, C, C]`` -> ``[S, H, W]`` on the model's grid, ``fill`` outside the crop."""
        return paste_volume(crops, self.box, self.shape, fill)

    def to_source(self, volume: np.ndarray, kind: Literal["linear", "nearest"]) -> np.ndarray:
        """``volume`` ``[S, H, W]`` on the model's grid, mapped onto the scan's own grid."""
        return from_model_grid(volume, self.placed, kind)


@dataclass
class _CroppedCase:
    """One case's volumes, normalized and cropped once: every array is ``[S, C, C]``."""

    case_id: str
    box: tuple[int, int, int, int]
    image: np.ndarray  # float32, normalized
    bones: np.ndarray  # uint8
    label: np.ndarray | None  # float32 soft label in [0, 1]
    truth: np.ndarray | None  # uint8 ground truth
    pixel_area_mm2: float


class SliceDataset(Dataset):
    """2.5D slices of one split with torchvision detection targets.

    ``dataset[i]`` is ``(image [3, C, C] float32, target)`` where ``target`` holds
    ``boxes`` float32 ``[N, 4]`` (x0, y0, x1, y1; exclusive ends, crop pixels),
    ``labels`` int64 ``[N]``, ``masks`` float32 ``[N, C, C]`` (soft values of each instance),
    ``case_id`` str, ``slice_index`` int, ``crop_box`` int64 ``[4]`` (y0, x0, y1, x1 in the
    full slice on the model's grid), ``mirrored`` bool, and, for cases with a ``masks/`` ground truth,
    ``truth_masks`` uint8 ``[K, C, C]`` and ``truth_boxes`` float32 ``[K, 4]``.

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        label_method: read soft labels from ``softlabels/<label_method>/<case>.nii.gz``.
        label_volumes: soft labels ``{case_id: [S, H, W]}`` given directly instead.
            With neither, targets hold no instances and every slice is a sample (inference).
        grid: the model's grid (orientation, pixel size, crop side ``C``); every volume is
            brought to it (bmlseg.data.grid).
        mirror: flip each sample horizontally with probability 1/2, drawn from
            ``(seed, epoch, index)``: reproducible with any number of workers, new each epoch
            (see :meth:`set_epoch`).
        lesion_free_ratio: lesion-free slices (with bone, without any instance) drawn per slice
            with an instance; drawn once, seeded.
        per_bone_classes: label each instance with the bone under most of it (1..3 with the
            default bones) instead of 1; an instance lying wholly outside bone is dropped.
        instances: how instances are cut from the label; None: InstanceOptions' defaults.
        seed: seed of the lesion-free draw and the mirroring.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        label_method: str | None = None,
        *,
        label_volumes: dict[str, np.ndarray] | None = None,
        grid: ModelGrid,
        mirror: bool = False,
        lesion_free_ratio: float = 0.25,
        per_bone_classes: bool = False,
        instances: InstanceOptions | None = None,
        seed: int = 0,
    ) -> None:
        if label_method is not None and label_volumes is not None:
            raise ValueError("give label_method or label_volumes, not both")
        self.root = Path(root)
        self.info: DatasetInfo
        self.info, annotations = load_dataset(root)
        records = self.info.split(split)
        if not records:
            raise ValueError(f"{self.root / 'dataset.json'}: no cases in split {split!r}")
        self.grid = grid
        self.mirror = mirror
        self.per_bone_classes = per_bone_classes
        self.instance_options = instances or InstanceOptions()
        self.seed = seed
        self.epoch = 0
        self.has_labels = label_method is not None or label_volumes is not None
        self.cases = [
            self._load(record.id, label_method, label_volumes, annotations)
            for record in tqdm(records, desc=f"loading {split}", unit="case", disable=None)
        ]
        self.samples = self._choose_samples(lesion_free_ratio)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``num_classes`` expects."""
        return 1 + max(self.info.bones) if self.per_bone_classes else 2

    def set_epoch(self, epoch: int) -> None:
        """Draw new mirroring for ``epoch`` (call it before each epoch, as for a sampler).

        DataLoader workers get a copy of the dataset when an epoch's iterator starts, so this
        reaches them unless ``persistent_workers=True``.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        case_index, slice_index = self.samples[index]
        case = self.cases[case_index]
        image = stack_slices(case.image, slice_index)
        bones = case.bones[slice_index]
        label = case.label[slice_index] if case.label is not None else None
        truth = case.truth[slice_index] if case.truth is not None else None
        mirrored = self.mirror and bool(
            np.random.default_rng((self.seed, self.epoch, index)).integers(2)
        )
        if mirrored:
            image, bones = image[..., ::-1], bones[..., ::-1]
            label = label[..., ::-1] if label is not None else None
            truth = truth[..., ::-1] if truth is not None else None
        target = self._instances(label, bones, case.pixel_area_mm2)
        target.update(
            case_id=case.case_id,
            slice_index=slice_index,
            crop_box=torch.tensor(case.box, dtype=torch.int64),
            mirrored=mirrored,
        )
        if truth is not None:
            truth_masks = connected_instances(truth > 0)
            target["truth_masks"] = torch.from_numpy(truth_masks.astype(np.uint8))
            target["truth_boxes"] = torch.from_numpy(masks_to_boxes(truth_masks))
        return torch.from_numpy(np.ascontiguousarray(image)), target

    def _load(
        self,
        case_id: str,
        label_method: str | None,
        label_volumes: dict[str, np.ndarray] | None,
        annotations: list[Annotation],
    ) -> _CroppedCase:
        case = load_case(self.root, case_id, info=self.info, annotations=annotations)
        label = None
        if label_method is not None:
            label = read_softlabel(self.root, label_method, case)
        elif label_volumes is not None:
            if case_id not in label_volumes:
                raise KeyError(f"label_volumes has no volume for case {case_id!r}")
            label = np.asarray(label_volumes[case_id], dtype=np.float32)
        if label is not None and label.shape != case.image.shape:
            raise ValueError(
                f"soft label of case {case_id}: shape {label.shape} differs from its image's "
                f"{case.image.shape}"
            )
        volumes = {"image": case.image, "bones": case.bones}
        volumes |= {"label": label} if label is not None else {}
        volumes |= {"truth": case.mask} if case.mask is not None else {}
        kinds = {"image": "linear", "bones": "nearest", "label": "linear", "truth": "nearest"}
        on_grid, placed = to_model_grid(volumes, kinds, case.geometry, self.grid, where=case_id)
        normalized = normalize_volume(on_grid["image"], on_grid["bones"])
        box = crop_box(on_grid["bones"], self.grid.crop_size)
        warn_if_crop_cuts_bone(on_grid["bones"], box, self.grid, case_id)
        cropped = {name: crop_volume(v, box) for name, v in on_grid.items() if name != "image"}
        return _CroppedCase(
            case_id=case_id,
            box=box,
            image=crop_volume(normalized, box, fill=float(normalized.min())),
            bones=cropped["bones"],
            label=cropped.get("label"),
            truth=cropped.get("truth"),
            pixel_area_mm2=placed.geometry.spacing[0] * placed.geometry.spacing[1],
        )

    def _choose_samples(self, lesion_free_ratio: float) -> list[tuple[int, int]]:
        """(case index, slice index) of every slice with an instance plus a seeded lesion-free
        draw among the slices with bone and without instance."""
        if not self.has_labels:
            return [(c, s) for c, case in enumerate(self.cases) for s in range(len(case.image))]
        with_instance, lesion_free = [], []
        for case_index, case in enumerate(self.cases):
            for slice_index in range(len(case.image)):
                boxes, _ = label_instances(
                    case.label[slice_index], self.instance_options, case.pixel_area_mm2
                )
                if len(boxes):
                    with_instance.append((case_index, slice_index))
                elif case.bones[slice_index].any():
                    lesion_free.append((case_index, slice_index))
        count = min(round(lesion_free_ratio * len(with_instance)), len(lesion_free))
        chosen = np.random.default_rng(self.seed).choice(len(lesion_free), count, replace=False)
        return sorted(with_instance + [lesion_free[i] for i in chosen])

    def _instances(
        self, label: np.ndarray | None, bones: np.ndarray, pixel_area_mm2: float
    ) -> dict[str, torch.Tensor]:
        """boxes [N, 4], labels [N], masks [N, C, C] from one cropped slice's soft label."""
        if label is None:
            label = np.zeros((self.grid.crop_size, self.grid.crop_size), dtype=np.float32)
        boxes, masks = label_instances(label, self.instance_options, pixel_area_mm2)
        classes = np.ones(len(masks), dtype=np.int64)
        if self.per_bone_classes:
            classes = np.array([_majority_bone(bones[mask > 0]) for mask in masks], dtype=np.int64)
            boxes, masks, classes = boxes[classes > 0], masks[classes > 0], classes[classes > 0]
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(classes),
            "masks": torch.from_numpy(masks),
        }


def collate_detection(
    batch: list[tuple[torch.Tensor, dict]],
) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader ``collate_fn`` for detection: a list of images and a list of targets."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _majority_bone(bones_under: np.ndarray) -> int:
    """The most frequent bone label (> 0) among an instance's pixels; 0 when none is bone."""
    counts = np.bincount(bones_under[bones_under > 0], minlength=1)
    return int(counts.argmax()) if counts.any() else 0


def read_softlabel(root: Path, method: str, case: Case) -> np.ndarray:
    """The case's label of ``method``, checked as bmlseg-check checks it."""
    path = softlabel_path(root, method, case.record.id)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; write it with bmlseg-labels (labels={method})")
    label, geometry = read_volume(path)
    grid = (case.image.shape, case.geometry)
    problems = softlabel_problems(label, geometry, path.relative_to(root).as_posix(), grid)
    if problems:
        raise DatasetError(root, problems)
    return label.astype(np.float32)
