"""The model's grid: scans of any orientation and pixel size in, outputs back on their own grid.

One physical scene (a block of bone with a bright ball in it) is sampled onto grids of different
orientations, tilts and pixel sizes; what the pipeline finds must stay where the scene put it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import Tensor, nn

from bmlseg.data.format import image_path, mask_path, read_dataset_json, write_annotations
from bmlseg.data.grid import (
    ModelGrid,
    acquisition_plane,
    from_model_grid,
    reorient,
    slice_plane,
    to_model_grid,
)
from bmlseg.data.slices import SliceDataset, VolumeSlices, normalize_volume
from bmlseg.engine.evaluate import InferenceSettings, infer_volume
from bmlseg.io import Geometry, read_volume, write_volume

GRID = ModelGrid("PIR", 1.25, 64)  # 80 mm crops of sagittal slices
BALL_CENTRE = np.array([3.0, -4.0, 5.0])  # mm, LPS
BALL_RADIUS = 8.0  # mm
BONE_HALF_SIDE = 28.0  # mm: a cube of bone around the origin


def rotation_about_x(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])


def scan_geometry(
    orientation: str, spacing: tuple[float, float, float], shape: tuple[int, int, int], tilt: float
) -> Geometry:
    """A grid of ``shape`` ``[S, H, W]`` centred on the origin, its axes along ``orientation``
    turned by ``tilt`` degrees about the left-right axis."""
    cosines = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation)
    direction = rotation_about_x(tilt) @ np.asarray(cosines).reshape(3, 3)
    extent = np.array(spacing) * (np.array(shape[::-1]) - 1)
    origin = -direction @ extent / 2
    return Geometry(spacing, tuple(origin.tolist()), tuple(direction.ravel().tolist()))


def physical_points(shape: tuple[int, int, int], geometry: Geometry) -> np.ndarray:
    """``[S, H, W, 3]`` LPS coordinates (mm) of every voxel centre."""
    slices, rows, columns = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    index_xyz = np.stack([columns, rows, slices], axis=-1) * np.array(geometry.spacing)
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return np.asarray(geometry.origin) + index_xyz @ direction.T


def render(shape: tuple[int, int, int], geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """image (bone 100 +- a texture of 20, the ball 500, air 0) and bones (1 in the cube) of the
    scene. The texture gives the normalization a spread to scale by, as marrow does."""
    points = physical_points(shape, geometry)
    bones = (np.abs(points).max(axis=-1) <= BONE_HALF_SIDE).astype(np.uint8)
    ball = np.linalg.norm(points - BALL_CENTRE, axis=-1) <= BALL_RADIUS
    texture = 20.0 * np.sin(points[..., 0] / 3.0) * np.sin(points[..., 1] / 4.0)
    image = np.where(bones > 0, 100.0 + texture, 0.0) + np.where(ball, 400.0, 0.0)
    return image.astype(np.float32), bones


class BrightnessDetector(nn.Module):
    """Stands in for a trained model: on each slice, one detection (score 0.9) whose mask is the
    middle channel's voxels brighter than ``threshold`` (normalized intensity), which is all the
    geometry needs."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.roi_heads = SimpleNamespace(score_thresh=0.05)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [
            {
                "masks": (image[1] > self.threshold).float()[None, None],
                "scores": torch.tensor([0.9]),
            }
            for image in images
        ]


# Scans of the same scene: the model's own grid; sagittal with the slices the other way;
# coronal, anisotropic and tilted 6 degrees; axial with fine pixels.
SCANS = {
    "model grid": ("PIR", (1.25, 1.25, 2.0), (40, 64, 64), 0.0),
    "sagittal, slices to the left": ("PIL", (0.5, 0.45, 3.0), (26, 170, 160), 0.0),
    "coronal, tilted": ("LIP", (0.4, 0.45, 2.5), (32, 170, 190), 6.0),
    "axial": ("LPS", (0.3, 0.3, 3.0), (26, 256, 256), 0.0),
}


@pytest.mark.parametrize("name", SCANS)
def test_a_lesion_is_found_where_it_is(name):
    orientation, spacing, shape, tilt = SCANS[name]
    geometry = scan_geometry(orientation, spacing, shape, tilt)
    image, bones = render(shape, geometry)
    settings = InferenceSettings(score_threshold=0.5, mask_threshold=0.5, batch_size=8)
    # Halfway between bone and ball (raw 300), in the normalized units the model sees.
    normalized = normalize_volume(image, bones)  # affine in the raw intensity
    slope = (normalized.max() - normalized.min()) / (image.max() - image.min())
    halfway = float(normalized.min() + slope * (300.0 - image.min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coronal and axial scans warn about their plane
        probability = infer_volume(
            BrightnessDetector(halfway),
            image,
            bones,
            geometry,
            grid=GRID,
            device=torch.device("cpu"),
            settings=settings,
        )
    assert probability.shape == image.shape
    found = probability >= 0.5
    centre = physical_points(shape, geometry)[found].mean(axis=0)
    # Within a model pixel of the ball's centre, and the ball's volume to within 15 %.
    assert np.linalg.norm(centre - BALL_CENTRE) < GRID.spacing_mm
    ball_ml = 4 / 3 * np.pi * BALL_RADIUS**3 / 1000
    assert found.sum() * geometry.voxel_volume_ml == pytest.approx(ball_ml, rel=0.15)


def test_scans_out_of_the_models_plane_are_reoriented_with_a_warning():
    geometry = scan_geometry(*SCANS["coronal, tilted"][:2], SCANS["coronal, tilted"][2], 6.0)
    image, bones = render(SCANS["coronal, tilted"][2], geometry)
    assert geometry.orientation == "LIP" and slice_plane("LIP") == "coronal"
    with pytest.warns(UserWarning, match="acquired in coronal slices 2.50 mm thick .* reoriented"):
        slices = VolumeSlices(image, bones, geometry, GRID, where="knee.nii.gz")
    # Sagittal slices on the model's grid: as many as the scan has columns, at ~1.25 mm in-plane.
    assert slices.shape[0] == image.shape[2]
    assert slices.placed.geometry.orientation == "PIR"
    np.testing.assert_allclose(slices.placed.geometry.spacing[:2], 1.25, rtol=0.01)


@pytest.mark.parametrize(
    ("orientation", "spacing", "plane"),
    [
        ("PIR", (0.3, 0.3, 3.0), "sagittal"),
        ("RAS", (3.0, 0.3, 0.3), "sagittal"),  # nibabel's canonical order of a sagittal scan
        ("LIP", (0.3, 0.3, 3.0), "coronal"),
        ("LPS", (0.3, 0.3, 3.0), "axial"),
        ("RAS", (1.0, 1.0, 1.2), None),  # near-isotropic: a 3D acquisition
    ],
)
def test_the_acquisition_plane_is_across_the_thickest_axis(orientation, spacing, plane):
    geometry = scan_geometry(orientation, spacing, (8, 8, 8), 0.0)
    assert acquisition_plane(geometry) == plane
    image, bones = render((8, 8, 8), geometry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_model_grid({"image": image}, {"image": "linear"}, geometry, GRID, where="scan")
    planes = [str(w.message) for w in caught if "acquired in" in str(w.message)]
    assert len(planes) == (plane not in (None, "sagittal"))


def test_reorientation_alone_is_exact_and_keeps_every_voxel_in_place():
    # Sagittal slices (3 mm left-right) stored in coronal array order: turned, their pixels are
    # the model's 1.25 mm, so nothing is resampled, and nothing is worth a warning.
    geometry = scan_geometry("LIP", (3.0, 1.25, 1.25), (50, 48, 20), 0.0)
    image = np.random.default_rng(0).normal(size=(50, 48, 20)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_grid, placed = to_model_grid(
            {"image": image}, {"image": "linear"}, geometry, GRID, where="x"
        )
    turned = on_grid["image"]
    assert turned.shape == (20, 48, 50)
    source = sitk.GetImageFromArray(image)
    geometry.apply_to(source)
    for index in [(0, 0, 0), (7, 11, 3), (49, 47, 19)]:
        point = sitk.GetImageFromArray(turned)
        placed.geometry.apply_to(point)
        physical = point.TransformIndexToPhysicalPoint(index)
        back = source.TransformPhysicalPointToIndex(physical)
        assert turned[index[::-1]] == image[back[::-1]]
    np.testing.assert_array_equal(from_model_grid(turned, placed, "linear"), image)


@pytest.mark.parametrize("name", [name for name in SCANS if name != "model grid"])
def test_resampling_round_trips_onto_the_input_grid(name):
    orientation, spacing, shape, tilt = SCANS[name]
    geometry = scan_geometry(orientation, spacing, shape, tilt)
    points = physical_points(shape, geometry)
    smooth = np.exp(-np.sum((points - BALL_CENTRE) ** 2, axis=-1) / (2 * 15.0**2)).astype(
        np.float32
    )
    _, bones = render(shape, geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_grid, placed = to_model_grid(
            {"smooth": smooth, "bones": bones},
            {"smooth": "linear", "bones": "nearest"},
            geometry,
            GRID,
            where=name,
        )
    back = from_model_grid(on_grid["smooth"], placed, "linear")
    bones_back = from_model_grid(on_grid["bones"], placed, "nearest")
    assert back.shape == bones_back.shape == shape and bones_back.dtype == np.uint8
    # A smooth field comes back to within 2 % of its peak; labels lose at most their rim.
    assert np.abs(back - smooth).max() < 0.02
    assert (bones_back != bones).mean() < 0.03


def test_a_volume_on_the_models_grid_is_passed_through():
    geometry = scan_geometry(*SCANS["model grid"][:2], SCANS["model grid"][2], 0.0)
    image, bones = render(SCANS["model grid"][2], geometry)
    on_grid, placed = to_model_grid(
        {"image": image, "bones": bones},
        {"image": "linear", "bones": "nearest"},
        geometry,
        GRID,
        where="x",
    )
    assert on_grid["image"] is image and on_grid["bones"] is bones
    assert from_model_grid(image, placed, "linear") is image
    assert reorient(image, geometry, "PIR")[0] is image


def test_a_crop_that_leaves_out_bone_warns():
    geometry = scan_geometry(*SCANS["model grid"][:2], SCANS["model grid"][2], 0.0)
    image, bones = render(SCANS["model grid"][2], geometry)
    with pytest.warns(
        UserWarning, match=r"knee: the crop \(32 pixels of 1.25 mm = 40 mm\) leaves out"
    ):
        VolumeSlices(image, bones, geometry, ModelGrid("PIR", 1.25, 32), where="knee")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VolumeSlices(image, bones, geometry, GRID, where="knee")


@pytest.mark.parametrize("code", ["PIX", "PPR", "PI", "pirr"])
def test_an_orientation_names_each_axis_once(code):
    with pytest.raises(ValueError, match="three letters out of L/R, P/A, S/I"):
        ModelGrid(code, 1.25, 64)


def test_the_phantom_is_written_as_sagittal_slices(synthetic_root):
    _, geometry = read_volume(image_path(synthetic_root, "s000_t0"))
    assert geometry.orientation == GRID.orientation
    assert slice_plane(geometry.orientation) == "sagittal"


def test_a_dataset_in_another_axis_order_gives_the_same_training_samples(synthetic_root, tmp_path):
    # The phantom written again in nibabel's RAS array order (exact: no voxel changes value; its
    # rectangles left out, they are drawn on the old slices), its masks as labels: on the model's
    # grid it is the same data, sample for sample.
    turned_root = Path(shutil.copytree(synthetic_root, tmp_path / "ras"))
    write_annotations(turned_root, [])
    for path in turned_root.glob("[ibm]*/*.nii.gz"):
        array, geometry = read_volume(path)
        image = sitk.GetImageFromArray(array)
        geometry.apply_to(image)
        turned = sitk.DICOMOrient(image, "RAS")
        write_volume(path, sitk.GetArrayFromImage(turned), Geometry.of(turned))
    assert read_volume(image_path(turned_root, "s000_t0"))[1].orientation == "RAS"

    def dataset(root: Path) -> SliceDataset:
        info = read_dataset_json(root)
        labels = {
            record.id: 0.8 * read_volume(mask_path(root, record.id))[0].astype(np.float32)
            for record in info.split("train")
        }
        grid = ModelGrid("PIR", 1.25, 128)
        return SliceDataset(root, "train", label_volumes=labels, grid=grid)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still sagittal slices: nothing to warn about
        original, turned = dataset(synthetic_root), dataset(turned_root)
    assert original.samples == turned.samples and len(original) > 0
    for index in range(len(original)):
        (image, target), (turned_image, turned_target) = original[index], turned[index]
        assert torch.equal(image, turned_image)
        for key in ("boxes", "labels", "masks", "truth_masks", "crop_box"):
            assert torch.equal(target[key], turned_target[key]), key
