"""The 2.5D slice dataset: inputs, targets, crops, mirroring and sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bmlseg.data.format import (
    CaseRecord,
    DatasetError,
    DatasetInfo,
    bones_path,
    image_path,
    mask_path,
    read_dataset_json,
    softlabel_path,
    write_annotations,
    write_dataset_json,
)
from bmlseg.data.grid import ModelGrid
from bmlseg.data.instances import InstanceOptions, label_instances
from bmlseg.data.slices import (
    SliceDataset,
    VolumeSlices,
    collate_detection,
    crop_box,
    crop_volume,
    normalize_volume,
    paste_volume,
    stack_slices,
)
from bmlseg.io import Geometry, read_volume, write_volume

SHAPE = (12, 40, 48)  # [S, H, W]
CROP = 32
# Sagittal slices of 0.5 mm pixels, on the grid of the model they are cut for: nothing resampled.
GEOMETRY = Geometry(
    (0.5, 0.5, 3.0), (1.0, 2.0, 3.0), (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
)
GRID = ModelGrid("PIR", 0.5, CROP)
FEMUR, TIBIA = (slice(4, 18), slice(10, 40)), (slice(20, 36), slice(12, 38))  # rows, columns


def knee_volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image, bones (femur 1 above tibia 2, on every slice) and a ground-truth mask."""
    rng = np.random.default_rng(seed)
    image = rng.normal(50.0, 5.0, SHAPE).astype(np.float32)
    bones = np.zeros(SHAPE, dtype=np.uint8)
    bones[(slice(None), *FEMUR)] = 1
    bones[(slice(None), *TIBIA)] = 2
    image[bones > 0] += 100.0
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3, 6:9, 14:20] = 1
    return image, bones, mask


# 1 mm^2 is 4 pixels of 0.5 mm (write_folder's spacing).
INSTANCES = InstanceOptions(threshold=0.5, min_area_mm2=1.0)


def soft_label() -> np.ndarray:
    """Instances (label >= 0.5, at least 4 pixels) on slices 3 (two: one on the femur with a
    0.3 halo, one on the tibia), 4 and 8. Slice 4 also holds what is no instance: a blob under
    the threshold and a one-pixel speckle."""
    label = np.zeros(SHAPE, dtype=np.float32)
    label[3, 5:10, 13:21] = 0.3
    label[3, 6:9, 14:20] = 0.7
    label[3, 24:27, 30:33] = 0.8
    label[3, 26, 33] = 0.8  # touches the tibia blob diagonally: the same 8-connected instance
    label[4, 10:12, 20:30] = 0.7
    label[4, 24:27, 14:18] = 0.4
    label[4, 30, 30] = 0.9
    label[8, 30:34, 16:18] = 1.0
    return label


def write_folder(root: Path, case_ids: tuple[str, ...] = ("k000_t0",)) -> Path:
    geometry = GEOMETRY
    for index, case_id in enumerate(case_ids):
        image, bones, mask = knee_volumes(seed=index)
        write_volume(image_path(root, case_id), image, geometry)
        write_volume(bones_path(root, case_id), bones, geometry)
        write_volume(mask_path(root, case_id), mask, geometry)
    cases = [CaseRecord(case_id, case_id[:4], ("r1",), "train") for case_id in case_ids]
    bones_names = {1: "femur", 2: "tibia", 3: "patella"}
    write_dataset_json(root, DatasetInfo(name="knee", bones=bones_names, cases=cases))
    write_annotations(root, [])
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("knee"))


def dataset(root: Path, **options) -> SliceDataset:
    options = {"grid": GRID, "lesion_free_ratio": 0.0, "instances": INSTANCES, **options}
    return SliceDataset(root, "train", label_volumes={"k000_t0": soft_label()}, **options)


def sample_of_slice(data: SliceDataset, slice_index: int) -> tuple[torch.Tensor, dict]:
    (index,) = [i for i, (_, s) in enumerate(data.samples) if s == slice_index]
    return data[index]


def test_sample_shapes_and_dtypes(root):
    data = dataset(root)
    image, target = sample_of_slice(data, 3)
    assert image.shape == (3, CROP, CROP) and image.dtype == torch.float32
    assert target["boxes"].shape == (2, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 1]
    assert target["masks"].shape == (2, CROP, CROP) and target["masks"].dtype == torch.float32
    assert target["truth_masks"].shape == (1, CROP, CROP)
    assert target["truth_masks"].dtype == torch.uint8
    assert target["truth_boxes"].shape == (1, 4) and target["truth_boxes"].dtype == torch.float32
    assert target["case_id"] == "k000_t0" and target["slice_index"] == 3
    assert target["crop_box"].dtype == torch.int64
    assert target["crop_box"].tolist() == list(crop_box(knee_volumes()[1], CROP))


def test_samples_are_the_labelled_slices(root):
    assert [s for _, s in dataset(root).samples] == [3, 4, 8]


def test_soft_values_are_kept_per_instance(root):
    data = dataset(root)
    _, target = sample_of_slice(data, 3)
    box = target["crop_box"].tolist()
    expected = crop_volume(soft_label(), tuple(box))[3]
    masks = target["masks"].numpy()
    # Each instance holds the label of the label > 0 region around its core (the femur's halo
    # included) and 0 elsewhere; together, all of this slice's label.
    np.testing.assert_array_equal(masks.sum(axis=0), expected)
    values = sorted(tuple(np.unique(mask[mask > 0]).astype(float).round(2)) for mask in masks)
    assert values == [(0.3, 0.7), (0.8,)]


def test_unconfident_and_tiny_label_parts_are_no_instance(root):
    _, target = sample_of_slice(dataset(root), 4)
    box = target["crop_box"].tolist()
    label = crop_volume(soft_label(), tuple(box))[4]
    assert len(target["boxes"]) == 1
    np.testing.assert_array_equal(target["masks"][0].numpy(), np.where(label == 0.7, label, 0))


def test_two_cores_in_one_region_split_it_by_distance():
    label = np.zeros((8, 12), dtype=np.float32)
    label[2:6, 0:2] = 1.0
    label[2:6, 6:8] = 1.0
    label[3, 2:6] = 0.2  # a bridge: one label > 0 region holding both cores
    boxes, masks = label_instances(label, InstanceOptions(min_area_mm2=4.0), pixel_area_mm2=1.0)
    assert boxes.tolist() == [[0, 2, 2, 6], [6, 2, 8, 6]]
    np.testing.assert_array_equal(masks.sum(axis=0), label)  # no pixel shared, none lost
    assert masks[0, 3, 2:6].tolist() == pytest.approx([0.2, 0.2, 0.0, 0.0])  # nearer core wins
    assert masks[1, 3, 2:6].tolist() == pytest.approx([0.0, 0.0, 0.2, 0.2])
    boxes, _ = label_instances(label, InstanceOptions(min_area_mm2=9.0), pixel_area_mm2=1.0)
    assert len(boxes) == 0  # cores of 8 pixels are under 9 mm^2 of 1 mm^2 pixels


def test_boxes_are_tight_around_the_cores_with_exclusive_ends(root):
    data = dataset(root)
    for index in range(len(data)):
        _, target = data[index]
        for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy(), strict=True):
            rows, columns = np.nonzero(mask >= INSTANCES.threshold)
            assert box == [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
            assert 0 <= box[0] < box[2] <= CROP and 0 <= box[1] < box[3] <= CROP


def test_known_box_in_crop_pixels(root):
    data = dataset(root)
    _, target = sample_of_slice(data, 8)
    y0, x0, _, _ = target["crop_box"].tolist()
    # label[8, 30:34, 16:18]: rows 30..33, columns 16..17 of the full slice.
    assert target["boxes"].tolist() == [[16 - x0, 30 - y0, 18 - x0, 34 - y0]]


def test_neighbour_channels_and_repeated_edges():
    image, bones, _ = knee_volumes()
    slices = VolumeSlices(image, bones, GEOMETRY, GRID, where="knee")
    assert len(slices) == SHAPE[0]
    for index in range(1, len(slices)):
        assert torch.equal(slices[index][0], slices[index - 1][1])
        assert torch.equal(slices[index - 1][2], slices[index][1])
    assert torch.equal(slices[0][0], slices[0][1])
    assert torch.equal(slices[len(slices) - 1][2], slices[len(slices) - 1][1])
    with pytest.raises(IndexError):
        slices[len(slices)]


def test_dataset_channels_match_volume_slices(root):
    image, bones, _ = knee_volumes()
    slices = VolumeSlices(image, bones, GEOMETRY, GRID, where="knee")
    data = dataset(root)
    for index in range(len(data)):
        sample, target = data[index]
        assert torch.equal(sample, slices[target["slice_index"]])


def test_stack_slices_picks_neighbours():
    volume = np.arange(4)[:, None, None] * np.ones((4, 2, 3))
    assert stack_slices(volume, 0)[:, 0, 0].tolist() == [0, 0, 1]
    assert stack_slices(volume, 2)[:, 0, 0].tolist() == [1, 2, 3]
    assert stack_slices(volume, 3)[:, 0, 0].tolist() == [2, 3, 3]


def test_mirroring_flips_image_masks_and_boxes_together(root):
    plain = dataset(root)
    mirrored = dataset(root, mirror=True, seed=3)
    flips = []
    for epoch in range(4):
        mirrored.set_epoch(epoch)
        for index in range(len(plain)):
            image, target = plain[index]
            image_m, target_m = mirrored[index]
            flips.append(target_m["mirrored"])
            if not target_m["mirrored"]:
                assert torch.equal(image_m, image)
                continue
            assert torch.equal(image_m, image.flip(-1))
            assert torch.equal(target_m["masks"], target["masks"].flip(-1))
            assert torch.equal(target_m["truth_masks"], target["truth_masks"].flip(-1))
            x0, y0, x1, y1 = target["boxes"].unbind(1)
            flipped = torch.stack([CROP - x1, y0, CROP - x0, y1], dim=1)
            assert torch.equal(target_m["boxes"], flipped)
    assert any(flips) and not all(flips)
    mirrored.set_epoch(0)
    again = dataset(root, mirror=True, seed=3)
    assert [again[i][1]["mirrored"] for i in range(len(again))] == flips[: len(again)]


def test_lesion_free_slices_follow_the_ratio(root):
    labelled = {3, 4, 8}
    for ratio, expected in [(0.0, 0), (0.34, 1), (1.0, 3), (10.0, 9)]:
        data = dataset(root, lesion_free_ratio=ratio, seed=1)
        free = [s for _, s in data.samples if s not in labelled]
        assert len(free) == expected  # 9 bone slices carry no label: the most there are
        for index, (_, slice_index) in enumerate(data.samples):
            if slice_index in free:
                assert len(data[index][1]["boxes"]) == 0
    draws = {tuple(dataset(root, lesion_free_ratio=0.34, seed=seed).samples) for seed in range(8)}
    assert len(draws) > 1
    assert dataset(root, lesion_free_ratio=1.0, seed=5).samples == (
        dataset(root, lesion_free_ratio=1.0, seed=5).samples
    )


def test_per_bone_classes_take_the_bone_under_most_of_the_instance(root):
    label = soft_label()
    label[8, 0:2, 0:2] = 0.9  # wholly outside bone: no bone class, dropped
    data = SliceDataset(
        root,
        "train",
        label_volumes={"k000_t0": label},
        grid=ModelGrid("PIR", 0.5, 48),
        per_bone_classes=True,
        instances=INSTANCES,
    )
    assert data.num_classes == 4
    _, target = sample_of_slice(data, 3)
    by_row = sorted(zip(target["boxes"][:, 1].tolist(), target["labels"].tolist(), strict=True))
    assert [bone for _, bone in by_row] == [1, 2]  # femur blob above, tibia blob below
    _, target = sample_of_slice(data, 8)
    assert target["labels"].tolist() == [2]
    assert dataset(root).num_classes == 2


def test_crop_box_is_centred_on_the_bones_and_inside_the_image():
    bones = np.zeros((2, 100, 80), dtype=np.uint8)
    bones[1, 40:60, 30:50] = 1
    assert crop_box(bones, 20) == (40, 30, 60, 50)
    assert crop_box(bones, 40) == (30, 20, 70, 60)
    corner = np.zeros_like(bones)
    corner[0, 2:4, 2:4] = 3  # centred there, the box would start above and left of the image
    assert crop_box(corner, 40) == (0, 0, 40, 40)
    # Longer than the image along x: the image sits in the middle of the box.
    assert crop_box(corner, 90) == (0, -5, 90, 85)


@pytest.mark.parametrize("size", [24, 64])
def test_crop_then_paste_is_identity_inside_the_crop(size):
    image, bones, _ = knee_volumes()
    box = crop_box(bones, size)
    crops = crop_volume(image, box, fill=-1.0)
    assert crops.shape == (SHAPE[0], size, size)
    pasted = paste_volume(crops, box, SHAPE, fill=np.nan)
    y0, x0, y1, x1 = box
    inside = np.zeros(SHAPE, dtype=bool)
    inside[:, max(y0, 0) : y1, max(x0, 0) : x1] = True
    np.testing.assert_array_equal(pasted[inside], image[inside])
    assert np.isnan(pasted[~inside]).all()
    if size > SHAPE[2]:  # padded: every voxel is inside, and the padding holds the fill
        assert inside.all() and (crops == -1.0).sum() == crops.size - image.size


def test_volume_slices_paste_back_to_the_full_grid():
    image, bones, _ = knee_volumes()
    slices = VolumeSlices(image, bones, GEOMETRY, GRID, where="knee")
    probabilities = np.stack([slices[s][1].numpy() for s in range(len(slices))])
    pasted = slices.paste(probabilities)
    assert pasted.shape == SHAPE
    y0, x0, y1, x1 = slices.box
    normalized = normalize_volume(image, bones)
    np.testing.assert_array_equal(pasted[:, y0:y1, x0:x1], normalized[:, y0:y1, x0:x1])


def test_normalization_centres_and_scales_the_bone():
    image, bones, _ = knee_volumes()
    normalized = normalize_volume(image * 3.0 + 7.0, bones)
    low, median, high = np.percentile(normalized[bones > 0], [25, 50, 75])
    assert median == pytest.approx(0.0, abs=1e-5)
    assert high - low == pytest.approx(1.349, rel=1e-5)
    np.testing.assert_allclose(normalized, normalize_volume(image, bones), atol=1e-4)


def test_soft_labels_on_disk(root, tmp_path):
    folder = write_folder(tmp_path / "with_labels")
    geometry = read_volume(image_path(folder, "k000_t0"))[1]
    write_volume(softlabel_path(folder, "kimriss", "k000_t0"), soft_label(), geometry)
    from_disk = SliceDataset(
        folder, "train", "kimriss", grid=GRID, lesion_free_ratio=0, instances=INSTANCES
    )
    given = dataset(root)
    assert from_disk.samples == given.samples
    for index in range(len(given)):
        assert torch.equal(from_disk[index][1]["masks"], given[index][1]["masks"])
    with pytest.raises(FileNotFoundError, match=r"softlabels/staple/k000_t0\.nii\.gz"):
        SliceDataset(folder, "train", "staple", grid=GRID)
    # A label off the image's grid is refused, the file and the field named.
    write_volume(softlabel_path(folder, "svls", "k000_t0"), soft_label(), Geometry.identity())
    with pytest.raises(DatasetError, match=r"softlabels/svls/k000_t0\.nii\.gz: spacing"):
        SliceDataset(folder, "train", "svls", grid=GRID)


def test_label_volume_of_the_wrong_shape_names_the_case(root):
    with pytest.raises(ValueError, match="case k000_t0: shape"):
        SliceDataset(root, "train", label_volumes={"k000_t0": np.zeros((2, 3, 4))}, grid=GRID)


def test_without_labels_every_slice_is_a_sample(root):
    data = SliceDataset(root, "train", grid=GRID)
    assert [s for _, s in data.samples] == list(range(SHAPE[0]))
    _, target = data[3]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, CROP, CROP)
    assert len(target["truth_masks"]) == 1


def test_collate_makes_lists_for_detection(tmp_path):
    folder = write_folder(tmp_path / "two", case_ids=("k000_t0", "k001_t0"))
    labels = {case_id: soft_label() for case_id in ("k000_t0", "k001_t0")}
    data = SliceDataset(folder, "train", label_volumes=labels, grid=GRID, instances=INSTANCES)
    loader = DataLoader(data, batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 4
    for index in range(4):
        image, target = data[index]
        assert torch.equal(images[index], image)
        assert targets[index]["case_id"] == target["case_id"]
        assert torch.equal(targets[index]["masks"], target["masks"])


def test_generated_folder_with_its_masks_as_labels(synthetic_root):
    info = read_dataset_json(synthetic_root)
    labels = {
        case.id: 0.7 * read_volume(mask_path(synthetic_root, case.id))[0].astype(np.float32)
        for case in info.split("train")
    }
    every_size = InstanceOptions(min_area_mm2=0.0)
    data = SliceDataset(
        synthetic_root,
        "train",
        label_volumes=labels,
        grid=ModelGrid("PIR", 1.25, 96),
        instances=every_size,
    )
    assert len(data) > 0
    for index in range(len(data)):
        image, target = data[index]
        assert image.shape == (3, 96, 96) and torch.isfinite(image).all()
        # The label is the ground truth times 0.7: the same instances, soft.
        assert torch.equal(target["masks"] > 0, target["truth_masks"] > 0)
        assert torch.equal(target["boxes"], target["truth_boxes"])
        assert set(target["masks"].unique().tolist()) <= {0.0, float(np.float32(0.7))}
