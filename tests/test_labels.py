"""Soft labels: exact answers on tiny hand-made volumes, and the dataset-folder round trip."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bmlseg.config import register_configs
from bmlseg.data.format import (
    Annotation,
    Case,
    CaseRecord,
    DatasetInfo,
    bones_path,
    image_path,
    read_dataset_json,
    softlabel_path,
    write_annotations,
    write_dataset_json,
)
from bmlseg.data.instances import InstanceOptions
from bmlseg.io import Geometry, read_volume, write_volume
from bmlseg.labels import (
    METHODS,
    KimrissOptions,
    dilation_rings,
    evaluate,
    generate,
    kimriss_soft_label,
    label_case,
    label_scores,
    rater_agreement,
    reader_maps,
    resolve_options,
    staple_label,
    staple_probability,
    svls_kernel,
    svls_smooth,
    uniform_smooth,
)
from bmlseg.labels.quality import instance_counts

BONE_LABELS = {"femur": 1, "tibia": 2, "patella": 3}
SHAPE = (5, 16, 16)
# No smoothing, no erosion: each voxel's answer follows from its own value.
EXACT = KimrissOptions(
    erode_mm=0, smoothing_sigma_mm=0.0, neighbour_weight=0.5, neighbour_rule="all"
)


def rectangle(reader: str, slice_: int, x0: int, y0: int, x1: int, y1: int, bone="femur"):
    return Annotation("c", reader, slice_, bone, x0, y0, x1, y1)


def femur_volume() -> tuple[np.ndarray, np.ndarray]:
    """A femur filling rows and columns 2..13; marrow alternates 99/101 (median 100, MAD 1)."""
    bones = np.zeros(SHAPE, dtype=np.uint8)
    bones[:, 2:14, 2:14] = 1
    checker = (np.indices(SHAPE).sum(axis=0) % 2).astype(np.float32)
    image = np.where(bones > 0, 99.0 + 2.0 * checker, 10.0).astype(np.float32)
    return image, bones


def make_case(annotations, readers=("a", "b", "c"), mask=None) -> Case:
    image, bones = femur_volume()
    return Case(
        record=CaseRecord("c", "s", tuple(readers), "train"),
        image=image,
        bones=bones,
        geometry=Geometry.identity(),
        annotations=list(annotations),
        mask=mask,
    )


# --- step 1: rater agreement -------------------------------------------------------------------


def test_two_of_three_readers_give_two_thirds():
    rows = [rectangle("a", 2, 4, 4, 8, 8), rectangle("b", 2, 6, 6, 10, 10)]
    agreement = rater_agreement(rows, ("a", "b", "c"), SHAPE, BONE_LABELS)
    assert agreement.dtype == np.float32
    assert agreement[2, 6, 6] == pytest.approx(2 / 3)
    assert agreement[2, 4, 4] == pytest.approx(1 / 3)
    assert agreement[2, 12, 12] == 0.0
    assert agreement[1].max() == 0.0


def test_reader_who_drew_nothing_still_counts():
    rows = [rectangle("a", 0, 0, 0, 4, 4)]
    assert rater_agreement(rows, ("a",), SHAPE, BONE_LABELS)[0, 0, 0] == 1.0
    assert rater_agreement(rows, ("a", "quiet"), SHAPE, BONE_LABELS)[0, 0, 0] == 0.5


def test_reader_counts_once_where_their_rectangles_overlap():
    rows = [rectangle("a", 0, 0, 0, 4, 4), rectangle("a", 0, 2, 2, 6, 6)]
    agreement = rater_agreement(rows, ("a", "b"), SHAPE, BONE_LABELS)
    assert agreement[0, 3, 3] == 0.5


def test_rectangle_only_covers_its_own_bone():
    _, bones = femur_volume()
    bones[:, 8:14, 2:14] = 2  # lower half is tibia
    rows = [rectangle("a", 1, 4, 4, 12, 12, bone="femur")]
    maps = reader_maps(rows, ("a",), SHAPE, BONE_LABELS, bones=bones)
    assert maps[0, 1, 4:8, 4:12].all()
    assert not maps[0, 1, 8:12, 4:12].any()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (rectangle("stranger", 0, 0, 0, 2, 2), "not among the case's readers"),
        (rectangle("a", 0, 0, 0, 2, 2, bone="fibula"), "bone 'fibula'"),
        (rectangle("a", 5, 0, 0, 2, 2), r"slice must lie in \[0, 5\)"),
        (rectangle("a", 0, 0, 0, 17, 2), "x1 <= 16"),
        (rectangle("a", 0, 3, 0, 3, 2), "x0 < x1"),
    ],
)
def test_bad_rectangles_are_named(row, message):
    with pytest.raises(ValueError, match=message):
        rater_agreement([row], ("a",), SHAPE, BONE_LABELS)


# --- steps 2-4: the paper's soft label ---------------------------------------------------------


def test_outside_bone_is_zero():
    image, bones = femur_volume()
    label = kimriss_soft_label(image, bones, np.ones(SHAPE, np.float32), EXACT)
    assert label[bones == 0].max() == 0.0
    assert label[bones > 0].min() > 0.0


def test_rim_is_left_out_when_eroding():
    image, bones = femur_volume()
    agreement = np.ones(SHAPE, np.float32)
    options = KimrissOptions(erode_mm=1.0, smoothing_sigma_mm=0.0, neighbour_weight=0.0)
    label = kimriss_soft_label(image, bones, agreement, options)  # 1 mm pixels: a 1-pixel rim
    assert label[2, 2, 5] == 0.0 and label[2, 13, 5] == 0.0
    assert label[2, 3, 5] == 1.0
    # The rim is in mm: on 0.5 mm rows it is two rows wide.
    label = kimriss_soft_label(image, bones, agreement, options, spacing=(1.0, 0.5, 3.0))
    assert label[2, 3, 5] == 0.0 and label[2, 12, 5] == 0.0
    assert label[2, 4, 5] == 1.0 and label[2, 3, 5:].max() == 0.0


def test_hyperintense_voxel_in_a_rectangle_is_one():
    image, bones = femur_volume()
    image[2, 6, 6] = image[2, 12, 12] = 200.0
    agreement = np.zeros(SHAPE, np.float32)
    agreement[2, 4:9, 4:9] = 1 / 3
    options = KimrissOptions(erode_mm=0, smoothing_sigma_mm=0.0, neighbour_weight=0.0)
    label = kimriss_soft_label(image, bones, agreement, options)
    assert label[2, 6, 6] == 1.0  # bright, marked by one reader of three
    assert label[2, 5, 5] == pytest.approx(1 / 3)  # marrow, keeps the readers' share
    assert label[2, 12, 12] == 0.0  # bright, but no reader marked it


def test_neighbouring_slices_are_raised():
    image, bones = femur_volume()
    agreement = np.zeros(SHAPE, np.float32)
    agreement[2, 4:9, 4:9] = 1.0
    agreement[3, 4:6, 4:6] = 0.25
    label = kimriss_soft_label(image, bones, agreement, EXACT)
    assert label[2, 4:9, 4:9].min() == 1.0
    assert label[1, 4:9, 4:9].min() == 0.5  # w * 1
    assert label[3, 4, 4] == 0.5  # max(0.25, w * 1)
    assert label[4, 4, 4] == 0.125  # from slice 3's own 0.25
    assert label[4, 7, 7] == 0.0 and label[0].max() == 0.0  # one pass, no propagation
    assert label[1, 10, 10] == 0.0


def test_hyperintense_rule_raises_only_bright_neighbours():
    image, bones = femur_volume()
    image[1, 5, 5] = 200.0
    agreement = np.zeros(SHAPE, np.float32)
    agreement[2, 4:9, 4:9] = 1.0
    options = KimrissOptions(
        erode_mm=0, smoothing_sigma_mm=0.0, neighbour_weight=0.5, neighbour_rule="hyperintense"
    )
    label = kimriss_soft_label(image, bones, agreement, options)
    assert label[1, 5, 5] == 0.5
    assert np.count_nonzero(label[1]) == 1
    assert label[3].max() == 0.0


def test_connected_rule_raises_a_lesion_continued_but_not_bright_noise():
    image, bones = femur_volume()
    image[2, 5:7, 5:7] = 200.0  # a lesion the readers marked on slice 2 ...
    image[1, 5:7, 5:7] = 200.0  # ... continued, unmarked, on slice 1
    image[3, 8, 8] = 200.0  # bright noise under slice 2's rectangle, on slice 3
    agreement = np.zeros(SHAPE, np.float32)
    agreement[2, 4:9, 4:9] = 1.0
    options = KimrissOptions(erode_mm=0, neighbour_weight=0.5)
    assert options.neighbour_rule == "connected"
    label = kimriss_soft_label(image, bones, agreement, options)
    assert label[1, 5:7, 5:7].min() == 0.5 and np.count_nonzero(label[1]) == 4
    assert label[3].max() == 0.0
    noisy = kimriss_soft_label(
        image, bones, agreement, replace(options, neighbour_rule="hyperintense")
    )
    assert noisy[3, 8, 8] == 0.5


def test_small_label_components_are_dropped():
    image, bones = femur_volume()
    agreement = np.zeros(SHAPE, np.float32)
    agreement[2, 4:9, 4:9] = 1.0  # 25 voxels
    agreement[2, 12, 12] = 1.0  # 1 voxel
    options = KimrissOptions(erode_mm=0, neighbour_weight=0.0, min_component_mm3=8.0)
    label = kimriss_soft_label(image, bones, agreement, options, spacing=(0.5, 1.0, 1.0))
    assert label[2, 12, 12] == 0.0 and label[2, 4:9, 4:9].min() == 1.0
    kept = kimriss_soft_label(image, bones, agreement, options, spacing=(2.0, 2.0, 2.0))
    assert kept[2, 12, 12] == 1.0


def test_kimriss_hard_is_kimriss_cut_at_the_threshold():
    rows = [rectangle("a", 2, 3, 3, 9, 9), rectangle("b", 2, 5, 5, 13, 13)]
    case = make_case(rows)
    case.image[2, 6:8, 6:8] = 200.0
    soft = label_case(case, BONE_LABELS, "kimriss")
    for threshold in (0.3, 0.5, 1.0):
        hard = label_case(case, BONE_LABELS, "kimriss_hard", threshold=threshold)
        np.testing.assert_array_equal(hard, (soft >= threshold).astype(np.float32))
    assert resolve_options("kimriss_hard")["threshold"] == 0.5
    with pytest.raises(ValueError, match="no option 'z_treshold'"):
        resolve_options("kimriss_hard", z_treshold=3.0)


def test_truth_is_the_mask_and_is_refused_without_one():
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2, 5:7, 5:7] = 1
    label = label_case(make_case([], mask=mask), BONE_LABELS, "truth")
    assert label.dtype == np.float32
    np.testing.assert_array_equal(label, mask.astype(np.float32))
    with pytest.raises(ValueError, match=r"case 'c'.*masks/c\.nii\.gz"):
        label_case(make_case([]), BONE_LABELS, "truth")


# --- baselines -------------------------------------------------------------------------------


def test_binary_fusions_count_readers():
    rows = [rectangle("a", 2, 4, 4, 8, 8), rectangle("b", 2, 6, 6, 10, 10)]
    two = METHODS["binary_majority"](make_case(rows, readers=("a", "b")), BONE_LABELS)
    three = METHODS["binary_majority"](make_case(rows), BONE_LABELS)
    union = METHODS["binary_any"](make_case(rows), BONE_LABELS)
    assert two[2, 4, 4] == 1.0  # 1 of 2 is half
    assert three[2, 4, 4] == 0.0 and three[2, 6, 6] == 1.0  # 2 of 3 needed
    assert union[2].sum() == 16 + 16 - 4


def test_staple_matches_simpleitk():
    rows = [
        rectangle("a", 2, 4, 4, 9, 9),
        rectangle("b", 2, 5, 5, 10, 10),
        rectangle("b", 3, 5, 5, 8, 8),
        rectangle("c", 2, 4, 5, 9, 10),
    ]
    maps = reader_maps(rows, ("a", "b", "c", "quiet"), SHAPE, BONE_LABELS)
    images = [sitk.GetImageFromArray(reader.astype(np.uint8)) for reader in maps]
    expected = sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0, 1.0, 50))
    everywhere = np.ones(SHAPE, dtype=bool)
    probability = staple_probability(maps, everywhere, max_iterations=50)
    np.testing.assert_allclose(probability, expected, rtol=0, atol=1e-6)
    _, bones = femur_volume()
    within_bone = staple_probability(maps, bones > 0, max_iterations=50)
    assert within_bone[bones == 0].max() == 0.0
    assert within_bone[2, 6, 6] > 0.9 and within_bone[2, 12, 12] < 0.1


def test_staple_without_any_rectangle_is_zero():
    assert staple_label(make_case([]), BONE_LABELS).max() == 0.0


def test_svls_kernel_by_hand():
    face, edge, corner = math.exp(-1 / 2), math.exp(-2 / 2), math.exp(-3 / 2)
    others = 6 * face + 12 * edge + 8 * corner
    kernel = svls_kernel(1.0)
    assert kernel[1, 1, 1] == pytest.approx(0.5)
    assert kernel[0, 1, 1] == pytest.approx(face / (2 * others))
    assert kernel[0, 0, 1] == pytest.approx(edge / (2 * others))
    assert kernel[0, 0, 0] == pytest.approx(corner / (2 * others))
    assert kernel.sum() == pytest.approx(1.0)


def test_svls_spreads_a_voxel_by_the_kernel():
    label = np.zeros(SHAPE, dtype=bool)
    label[2, 7, 7] = True
    bone = np.ones(SHAPE, dtype=bool)
    bone[3] = False
    smoothed = svls_smooth(label, bone, sigma=1.0)
    np.testing.assert_allclose(smoothed[1:3, 6:9, 6:9], svls_kernel(1.0)[:2], rtol=1e-6)
    assert smoothed[3].max() == 0.0
    assert smoothed.sum() == pytest.approx(svls_kernel(1.0)[:2].sum(), rel=1e-6)


def test_dilation_rings_by_distance():
    label = np.zeros(SHAPE, dtype=bool)
    label[2, 8, 8] = True
    bone = np.ones(SHAPE, dtype=bool)
    bone[2, :, 10:] = False
    soft = dilation_rings(label, bone, (0.75, 0.5, 0.25))
    rows, columns = np.indices(SHAPE[1:])
    distance = np.abs(rows - 8) + np.abs(columns - 8)  # 4-connected rings
    expected = np.select(
        [distance == 0, distance == 1, distance == 2, distance == 3], [1, 0.75, 0.5, 0.25]
    )
    expected[:, 10:] = 0.0
    np.testing.assert_array_equal(soft[2], expected)
    assert soft[1].max() == 0.0 and soft[3].max() == 0.0  # in-plane


def test_dilation_rings_are_as_wide_as_asked():
    label = np.zeros(SHAPE, dtype=bool)
    label[2, 8, 8] = True
    soft = dilation_rings(label, np.ones(SHAPE, dtype=bool), (0.5,), steps=2)
    rows, columns = np.indices(SHAPE[1:])
    distance = np.abs(rows - 8) + np.abs(columns - 8)
    expected = np.select([distance == 0, distance <= 2], [1.0, 0.5])
    np.testing.assert_array_equal(soft[2], expected)


def test_dilation_rings_must_decrease():
    with pytest.raises(ValueError, match="ring_values"):
        dilation_rings(np.zeros(SHAPE, bool), np.ones(SHAPE, bool), (0.25, 0.5))


def test_uniform_smoothing_inside_bone():
    label = np.zeros(SHAPE, dtype=bool)
    label[2, 5, 5] = True
    bone = np.zeros(SHAPE, dtype=bool)
    bone[:, 2:14, 2:14] = True
    smoothed = uniform_smooth(label, bone, epsilon=0.2)
    assert smoothed[2, 5, 5] == pytest.approx(0.9)
    assert smoothed[2, 6, 6] == pytest.approx(0.1)
    assert smoothed[2, 0, 0] == 0.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_float32_probabilities_of_the_image_shape(method):
    rows = [
        rectangle("a", 2, 3, 3, 9, 9),
        rectangle("b", 2, 5, 5, 13, 13),
        rectangle("b", 3, 5, 5, 8, 8),
    ]
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:4, 5:8, 5:8] = 1
    case = make_case(rows, mask=mask)
    case.image[2:4, 5:8, 5:8] = 200.0
    label = METHODS[method](case, BONE_LABELS)
    assert label.dtype == np.float32 and label.shape == SHAPE
    assert label.min() >= 0.0 and label.max() <= 1.0
    assert label.max() > 0.0
    assert label[case.bones == 0].max() == 0.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_lists_every_option_with_the_code_defaults(method):
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        cfg = compose("labels", overrides=[f"labels={method}"])
    options = OmegaConf.to_container(cfg.labels.options, resolve=True)
    assert cfg.labels.method == method
    assert set(options) == set(resolve_options(method))
    assert resolve_options(method, **options) == resolve_options(method)


# --- dataset folder -------------------------------------------------------------------------


@pytest.fixture
def tiny_root(tmp_path):
    """Two hand-made cases with a non-trivial geometry, three readers each (one silent)."""
    geometry = Geometry((0.4, 0.35, 3.0), (-10.0, 5.0, 2.5), (1.0, 0, 0, 0, 0, -1.0, 0, 1.0, 0))
    image, bones = femur_volume()
    image[2, 5:8, 5:8] = 200.0
    cases = []
    for case_id in ("s000_t0", "s001_t0"):
        write_volume(image_path(tmp_path, case_id), image, geometry)
        write_volume(bones_path(tmp_path, case_id), bones, geometry)
        cases.append(CaseRecord(case_id, case_id[:4], ("a", "b", "c"), "train"))
    write_dataset_json(tmp_path, DatasetInfo("tiny", {1: "femur", 2: "tibia"}, cases))
    write_annotations(
        tmp_path,
        [
            Annotation(case_id, reader, 2, "femur", x, x, x + 6, x + 6)
            for case_id in ("s000_t0", "s001_t0")
            for reader, x in (("a", 3), ("b", 4))
        ],
    )
    return tmp_path, geometry


def test_generate_writes_labels_with_the_image_geometry(tiny_root):
    root, geometry = tiny_root
    paths = generate(root, "kimriss")
    assert paths == [softlabel_path(root, "kimriss", c) for c in ("s000_t0", "s001_t0")]
    label, written = read_volume(paths[0])
    assert label.dtype == np.float32 and label.shape == SHAPE
    assert not written.mismatch(geometry)
    assert label[2, 6, 6] == 1.0


def test_generate_is_idempotent(tiny_root):
    root, _ = tiny_root
    first = generate(root, "svls", sigma=0.8)
    before = [(path.stat().st_mtime_ns, read_volume(path)[0]) for path in first]
    again = generate(root, "svls", sigma=0.8)
    assert [path.stat().st_mtime_ns for path in again] == [stamp for stamp, _ in before]
    remade = generate(root, "svls", overwrite=True, sigma=0.8)
    for path, (_, label) in zip(remade, before, strict=True):
        np.testing.assert_array_equal(read_volume(path)[0], label)


def test_generate_refuses_to_mix_options(tiny_root):
    root, _ = tiny_root
    generate(root, "uniform", epsilon=0.1)
    with pytest.raises(ValueError, match="overwrite=True"):
        generate(root, "uniform", epsilon=0.3)
    generate(root, "uniform", overwrite=True, epsilon=0.3)
    label, _ = read_volume(softlabel_path(root, "uniform", "s000_t0"))
    assert label[0, 5, 5] == pytest.approx(0.15)


def test_generate_names_unknown_methods_options_and_cases(tiny_root):
    root, _ = tiny_root
    with pytest.raises(ValueError, match="unknown label method 'gaussian'"):
        generate(root, "gaussian")
    with pytest.raises(ValueError, match="no option 'sigmaa'; its options: sigma, base"):
        generate(root, "svls", sigmaa=1.0)
    with pytest.raises(KeyError, match="s999_t0"):
        generate(root, "svls", cases=["s999_t0"])


def test_label_scores_by_hand():
    truth = np.zeros((1, 2, 2), dtype=np.uint8)
    truth[0, 0, :] = 1
    label = np.array([[[1.0, 0.5], [0.5, 0.0]]], dtype=np.float32)
    bone = np.ones_like(truth, dtype=bool)
    scores = label_scores(label, truth, bone)
    assert scores["soft_dice"] == pytest.approx(2 * 1.5 / (2.0 + 2))
    assert scores["brier"] == pytest.approx((0 + 0.25 + 0.25 + 0) / 4)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["mass_outside_truth"] == pytest.approx(0.5 / 2.0)
    without_bml = label_scores(label, np.zeros_like(truth), bone)
    assert math.isnan(without_bml["soft_dice"]) and math.isnan(without_bml["recall"])
    assert without_bml["mass_outside_truth"] == 1.0


def test_instance_counts_by_hand():
    truth = np.zeros((2, 12, 12), dtype=np.uint8)
    truth[0, 1:4, 1:4] = 1  # matched by the first box
    truth[0, 8:10, 8:10] = 1  # no box anywhere near
    label = np.zeros((2, 12, 12), dtype=np.float32)
    label[0, 0:4, 1:4] = 0.6  # box IoU 9 / 12 with the first lesion
    label[0, 6:9, 0:3] = 1.0  # a box on no lesion
    label[0, 10:12, 0:2] = 0.4  # under the threshold: no instance
    label[1, 5, 5] = 1.0  # under the minimum area: no instance
    counts = instance_counts(label, truth, InstanceOptions(min_area_mm2=2.0), pixel_area_mm2=1.0)
    assert counts == {"instances": 2, "matching": 1, "lesions": 2, "matched": 1, "slices": 1}


def test_evaluate_writes_table_csv_and_figure(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    methods = ["kimriss", "binary_any", "staple"]
    rows = evaluate(root, methods, out_dir=tmp_path / "quality")
    cases_with_masks = sum(
        (root / "masks" / f"{record.id}.nii.gz").exists()
        for record in read_dataset_json(root).cases
    )
    assert [row["method"] for row in rows] == methods
    assert all(row["cases"] == cases_with_masks > 0 for row in rows)
    assert all(0.0 <= row["soft_dice"] <= 1.0 for row in rows)
    assert all(0.0 <= row["boxes_matching_lesion"] <= 1.0 for row in rows)
    table = (tmp_path / "quality" / "label_quality.md").read_text(encoding="utf-8")
    assert all(f"| {method} |" in table for method in methods)
    csv_lines = (
        (tmp_path / "quality" / "label_quality.csv").read_text(encoding="utf-8").splitlines()
    )
    assert csv_lines[0].startswith("method,cases,soft_dice") and len(csv_lines) == 4
    png = (tmp_path / "quality" / "label_quality.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert softlabel_path(root, "staple", read_dataset_json(root).cases[0].id).exists()
