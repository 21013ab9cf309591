"""The dataset folder: records round trip, malformed input errors, and bmlseg-check."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bmlseg.data.format import (
    Annotation,
    CaseRecord,
    DatasetInfo,
    Problem,
    bones_path,
    check,
    image_path,
    main_check,
    mask_path,
    read_annotations,
    read_dataset_json,
    softlabel_path,
    write_annotations,
    write_dataset_json,
)
from bmlseg.io import Geometry, read_volume, write_volume

BONES = {1: "femur", 2: "tibia", 3: "patella"}
SHAPE = (6, 24, 32)  # [S, H, W]


def write_tiny_dataset(root: Path) -> Path:
    """Three cases of two subjects, with masks, a soft label and four annotation rows."""
    geometry = Geometry((0.5, 0.6, 3.0), (10.0, -20.0, 5.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    cases = [
        CaseRecord("s000_t0", "s000", ("r1", "r2"), "train"),
        CaseRecord("s000_t1", "s000", ("r1",), "train"),
        CaseRecord("s001_t0", "s001", ("r1", "r2"), "test"),
    ]
    rng = np.random.default_rng(0)
    bones = np.zeros(SHAPE, dtype=np.uint8)
    bones[:, 2:10, 4:28], bones[:, 12:20, 4:28], bones[:, 10:12, 26:30] = 1, 2, 3
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2, 4:7, 10:14] = 1
    for case in cases:
        image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
        write_volume(image_path(root, case.id), image, geometry)
        write_volume(bones_path(root, case.id), bones, geometry)
        write_volume(mask_path(root, case.id), mask, geometry)
    write_volume(softlabel_path(root, "kimriss", "s000_t0"), mask * np.float32(0.5), geometry)
    write_dataset_json(root, DatasetInfo(name="tiny", bones=BONES, cases=cases))
    write_annotations(
        root,
        [
            Annotation("s000_t0", "r1", 2, "femur", 10, 4, 14, 7),
            Annotation("s000_t0", "r2", 2, "femur", 9, 3, 15, 8),
            Annotation("s000_t1", "r1", 0, "tibia", 0, 12, 32, 24),
            Annotation("s001_t0", "r2", 5, "patella", 26, 10, 30, 12),
        ],
    )
    return root


@pytest.fixture(scope="module")
def good_root(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def root(good_root, tmp_path) -> Path:
    """A fresh copy of the good folder, to break."""
    return Path(shutil.copytree(good_root, tmp_path / "dataset"))


def listing(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


def edit_json(root: Path, change) -> None:
    path = root / "dataset.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw))


def add_annotation_line(root: Path, line: str) -> int:
    """Append ``line`` to annotations.csv; its line number."""
    path = root / "annotations.csv"
    text = path.read_text(encoding="utf-8")
    path.write_text(text + line + "\n")
    return len(text.splitlines()) + 1


def rewrite_volume(path: Path, change) -> None:
    array, geometry = read_volume(path)
    array, geometry = change(array.copy(), geometry)
    write_volume(path, array, geometry)


def assert_one_problem(problems: list[Problem], where: str, what: str) -> None:
    assert len(problems) == 1, "\n".join(map(str, problems))
    assert problems[0].where == where
    assert what in problems[0].what, problems[0].what


def test_good_folder_has_no_problems_and_check_writes_nothing(good_root):
    before = listing(good_root)
    assert check(good_root) == []
    assert listing(good_root) == before


def test_cli_prints_an_ok_summary_for_a_good_folder(good_root, capsys):
    assert main_check([str(good_root)]) == 0
    output = capsys.readouterr().out.strip().splitlines()
    assert len(output) == 3
    assert output[0].startswith(f"OK {good_root}: 3 cases (2 train, 0 val, 1 test), 2 subjects")
    # Identity direction: the slices are axial by the header, which training reorients.
    assert output[2].startswith(
        "images/: orientation LPS (3); pixels 0.5 x 0.6 mm (3); slices 3 mm apart: "
    )
    assert "4 annotations" in output[0] and "soft labels: kimriss" in output[0]
    assert output[1] == (
        "masks/: 3 of 3 cases (val 0/0, test 1/1): no val split: bmlseg-train refuses the folder "
        "(validation chooses best.pt); test metrics against the pixelwise truth"
    )


def test_check_says_what_a_folder_without_masks_is_evaluated_against(root, capsys):
    def splits(raw):
        raw["cases"][1].update(subject="s002", split="test")
        raw["cases"][2].update(split="val")

    edit_json(root, splits)
    assert main_check([str(root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1] == (
        "masks/: 3 of 3 cases (val 1/1, test 1/1): validation selects against the pixelwise "
        "truth; test metrics against the pixelwise truth"
    )
    # The val case loses its mask: validation falls back to the labels; the test keeps truth.
    mask_path(root, "s001_t0").unlink()
    main_check([str(root)])
    assert capsys.readouterr().out.strip().splitlines()[1] == (
        "masks/: 2 of 3 cases (val 0/1, test 1/1): validation selects against the soft labels' "
        "confident cores; test metrics against the pixelwise truth"
    )
    # Rectangles only: no metric against pixelwise truth at all.
    shutil.rmtree(root / "masks")
    assert main_check([str(root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1] == (
        "masks/: 0 of 3 cases (val 0/1, test 0/1): validation selects against the soft labels' "
        "confident cores; no test metrics against pixelwise truth (bmlseg-train scores the test "
        "split against the soft labels' confident cores)"
    )


def test_problem_reads_where_colon_what():
    assert str(Problem("annotations.csv line 3", "slice 9 is outside 0..5")) == (
        "annotations.csv line 3: slice 9 is outside 0..5"
    )


def test_missing_dataset_json(root):
    (root / "dataset.json").unlink()
    assert_one_problem(check(root), "dataset.json", "missing")


def test_invalid_json(root):
    (root / "dataset.json").write_text('{"name": "tiny",')
    assert_one_problem(check(root), "dataset.json", "not valid JSON")


def test_missing_field(root):
    edit_json(root, lambda raw: raw.pop("cases"))
    assert_one_problem(check(root), "dataset.json", "missing field 'cases'")


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("split", "trian", "unknown split 'trian'"),
        ("readers", "r1", "must be a list of names"),
        ("id", "s000/t0", "must be a file name"),
        ("readers", [], "lists no reader"),
    ],
)
def test_bad_case_field(root, field, value, what):
    edit_json(root, lambda raw: raw["cases"][2].update({field: value}))
    problems = check(root)
    assert any(p.where == f"dataset.json cases[2].{field}" and what in p.what for p in problems), (
        problems
    )


def test_duplicate_case_id(root):
    edit_json(root, lambda raw: raw["cases"][1].update(id="s000_t0"))
    problems = check(root)
    assert (
        Problem(
            "dataset.json cases[1].id", "duplicate case id 's000_t0' (also dataset.json cases[0])"
        )
        in problems
    )


def test_subject_in_two_splits(root):
    edit_json(root, lambda raw: raw["cases"][2].update(subject="s000"))
    assert_one_problem(check(root), "dataset.json cases[2].split", "subject 's000'")


def test_missing_image(root):
    image_path(root, "s000_t1").unlink()
    problems = check(root)
    assert Problem("images/s000_t1.nii.gz", "missing") in problems


def test_unreadable_bones(root):
    bones_path(root, "s001_t0").write_bytes(b"garbage")
    assert_one_problem(check(root), "bones/s001_t0.nii.gz", "unreadable")


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("shape", lambda a, g: (a[:, :-1], g)),
        ("spacing", lambda a, g: (a, Geometry((0.5, 0.6, 3.5), g.origin, g.direction))),
        ("origin", lambda a, g: (a, Geometry(g.spacing, (10.0, -20.0, 6.0), g.direction))),
        (
            "direction",
            lambda a, g: (a, Geometry(g.spacing, g.origin, (0, 1.0, 0, -1.0, 0, 0, 0, 0, 1.0))),
        ),
    ],
)
def test_geometry_mismatch_names_the_field(root, field, change):
    rewrite_volume(mask_path(root, "s000_t0"), change)
    assert_one_problem(check(root), "masks/s000_t0.nii.gz", f"{field} ")


def test_nan_voxels(root):
    def add_nan(array, geometry):
        array[1, 2, 3] = np.nan
        array[2, 2, 3] = np.inf
        return array, geometry

    rewrite_volume(image_path(root, "s000_t0"), add_nan)
    assert_one_problem(check(root), "images/s000_t0.nii.gz", "2 NaN or infinite voxel(s)")


def test_undeclared_bone_label(root):
    def add_label(array, geometry):
        array[0, 0, 0] = 7
        return array, geometry

    rewrite_volume(bones_path(root, "s000_t1"), add_label)
    assert_one_problem(check(root), "bones/s000_t1.nii.gz", "labels [7] are not declared")


def test_mask_that_is_not_binary(root):
    rewrite_volume(mask_path(root, "s001_t0"), lambda array, geometry: (array * 255, geometry))
    assert_one_problem(check(root), "masks/s001_t0.nii.gz", "values must be 0 or 1")


def test_soft_label_out_of_range(root):
    rewrite_volume(softlabel_path(root, "kimriss", "s000_t0"), lambda a, g: (a * 4, g))
    assert_one_problem(check(root), "softlabels/kimriss/s000_t0.nii.gz", "[0, 1]")


def test_volume_of_an_unlisted_case(root):
    shutil.copy(image_path(root, "s000_t0"), image_path(root, "s009_t0"))
    assert_one_problem(check(root), "images/s009_t0.nii.gz", "not listed in dataset.json")


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ("s404_t0,r1,2,femur,10,4,14,7", "case 's404_t0' is not listed"),
        ("s000_t1,r2,2,femur,10,4,14,7", "reader 'r2' is not among case s000_t1's readers (r1)"),
        ("s000_t0,r1,2,fibula,10,4,14,7", "bone 'fibula' is not declared"),
        ("s000_t0,r1,6,femur,10,4,14,7", "slice 6 is outside 0..5"),
        ("s000_t0,r1,-1,femur,10,4,14,7", "slice -1 is outside 0..5"),
        ("s000_t0,r1,2,femur,14,4,14,7", "empty rectangle"),
        ("s000_t0,r1,2,femur,10,7,14,4", "empty rectangle"),
        ("s000_t0,r1,2,femur,10,4,33,7", "leaves the image (width 32, height 24)"),
        ("s000_t0,r1,2,femur,-1,4,14,7", "leaves the image"),
        ("s000_t0,r1,2,femur,x,4,14,7", "field 'x0' must be an integer, got 'x'"),
        ("s000_t0,r1,2,femur,10,4,14", "expected 8 values"),
    ],
)
def test_bad_annotation_row_names_its_line(root, row, what):
    line = add_annotation_line(root, row)
    assert_one_problem(check(root), f"annotations.csv line {line}", what)


def test_annotation_header(root):
    path = root / "annotations.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("x0,y0", "y0,x0", 1))
    assert_one_problem(check(root), "annotations.csv line 1", "header must be")


def test_annotations_with_a_byte_order_mark_are_read(root):
    # As spreadsheet programs save "CSV UTF-8".
    path = root / "annotations.csv"
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert check(root) == []
    assert len(read_annotations(root)) == 4


def test_an_invisible_character_in_the_header_is_shown(root):
    path = root / "annotations.csv"
    path.write_text("\u200b" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert_one_problem(check(root), "annotations.csv line 1", "got '\\u200bcase,reader,")


def test_blank_image(root):
    rewrite_volume(image_path(root, "s000_t1"), lambda array, geometry: (array * 0, geometry))
    assert_one_problem(check(root), "images/s000_t1.nii.gz", "blank: every voxel is 0")


def test_missing_annotations(root):
    (root / "annotations.csv").unlink()
    assert_one_problem(check(root), "annotations.csv", "missing")


def test_every_problem_is_collected_and_the_cli_fails(root, capsys):
    edit_json(root, lambda raw: raw["cases"][2].update(subject="s000"))
    bones_path(root, "s000_t1").unlink()
    line = add_annotation_line(root, "s001_t0,r1,9,femur,1,1,2,2")
    problems = check(root)
    assert [p.where for p in problems] == [
        "dataset.json cases[2].split",
        "bones/s000_t1.nii.gz",
        f"annotations.csv line {line}",
    ], problems
    assert main_check([str(root)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed == [*map(str, problems), f"{root}: 3 problem(s)"]


def test_cli_on_a_missing_folder(tmp_path, capsys):
    assert main_check([str(tmp_path / "absent")]) == 1
    assert "no such folder" in capsys.readouterr().out


def test_dataset_json_round_trip(tmp_path):
    info = DatasetInfo(
        name="round trip",
        bones=BONES,
        cases=[
            CaseRecord("a_t0", "a", ("r1", "r2"), "val"),
            CaseRecord("b_t0", "b", ("r3",), "test"),
        ],
        extra={"noise": {"readers": 3}},
    )
    write_dataset_json(tmp_path, info)
    assert read_dataset_json(tmp_path) == info
    assert [path.name for path in tmp_path.iterdir()] == ["dataset.json"]


def test_annotations_round_trip(tmp_path):
    rows = [
        Annotation("a_t0", "r1", 0, "femur", 1, 2, 3, 4),
        Annotation("a_t0", "reader two", 11, "patella", 0, 0, 320, 320),
    ]
    write_annotations(tmp_path, rows)
    assert read_annotations(tmp_path) == rows
    write_annotations(tmp_path, [])
    assert read_annotations(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "case,reader,slice,bone,x0,y0,x1,y1\na,r,0,femur,1,2,3,4\na,r,0,femur,1,2,3.5,4\n",
            "line 3: field 'x1' must be an integer, got '3.5'",
        ),
        ("case,reader,slice,bone,x0,y0,x1,y1\na,r,0,femur,1,2,3\n", "line 2: expected 8 values"),
        (
            "case,reader,slice,bone,x0,y0,x1,y1\n,r,0,femur,1,2,3,4\n",
            "line 2: field 'case' is empty",
        ),
        ("case,reader,slice,x0,y0,x1,y1\n", "line 1: header must be case,reader,slice,bone"),
    ],
)
def test_read_annotations_names_line_and_field(tmp_path, text, message):
    (tmp_path / "annotations.csv").write_text(text)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")) as error:
        read_annotations(tmp_path)
    assert str(tmp_path / "annotations.csv") in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["cases"][1].pop("split"), r"cases\[1\]: missing field 'split'"),
        (
            lambda raw: raw["cases"][0].update(split="dev"),
            r"cases\[0\]\.split: unknown split 'dev'",
        ),
        (
            lambda raw: raw.update(bones={"one": "femur"}),
            r"bones\['one'\]: labels must be integers",
        ),
        (
            lambda raw: raw.update(format_version=99),
            "format_version: must be an integer from 1 to 1",
        ),
    ],
)
def test_read_dataset_json_names_the_field(good_root, tmp_path, change, message):
    shutil.copy(good_root / "dataset.json", tmp_path / "dataset.json")
    edit_json(tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        read_dataset_json(tmp_path)
    assert str(tmp_path / "dataset.json") in str(error.value)


def test_generated_folder_passes_and_check_writes_nothing(synthetic_root):
    before = listing(synthetic_root)
    assert check(synthetic_root) == []
    assert listing(synthetic_root) == before


def test_problems_in_a_broken_generated_folder(synthetic_root, tmp_path, capsys):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "dataset"))
    first, second = read_dataset_json(root).cases[:2]
    image, image_geometry = read_volume(image_path(root, first.id))
    slices, height, width = image.shape
    mask_path(root, second.id).write_bytes(b"")
    shifted = (*image_geometry.origin[:2], image_geometry.origin[2] + 9.0)
    rewrite_volume(
        bones_path(root, first.id),
        lambda array, geometry: (array, Geometry(geometry.spacing, shifted, geometry.direction)),
    )
    reader = first.readers[0]
    lines = [
        add_annotation_line(root, f"{first.id},{reader},{slices},femur,0,0,4,4"),
        add_annotation_line(root, f"{first.id},{reader},0,femur,0,0,{width + 1},4"),
        add_annotation_line(root, f"{first.id},nobody,0,femur,0,0,4,4"),
    ]
    problems = check(root)
    assert [str(p) for p in problems] == [
        f"bones/{first.id}.nii.gz: origin {shifted} differs from the image's "
        f"{image_geometry.origin}",
        f"masks/{second.id}.nii.gz: unreadable: SimpleITK cannot read it: "
        f'sitk::ERROR: Unable to determine ImageIO reader for "{mask_path(root, second.id)}"',
        f"annotations.csv line {lines[0]}: slice {slices} is outside 0..{slices - 1} of case {first.id}",
        f"annotations.csv line {lines[1]}: rectangle x 0..{width + 1}, y 0..4 leaves the image "
        f"(width {width}, height {height})",
        f"annotations.csv line {lines[2]}: reader 'nobody' is not among case {first.id}'s readers "
        f"({', '.join(first.readers)})",
    ]
    assert main_check([str(root)]) == 1
    assert capsys.readouterr().out.splitlines()[:-1] == [str(p) for p in problems]


def give_instance_numbers(root: Path) -> None:
    """Every case numbered as a viewer might: InstanceNumber 6 for slice 0 down to 1 for slice 5;
    annotations.csv rewritten to give those numbers."""
    numbers = list(range(SHAPE[0], 0, -1))
    edit_json(root, lambda raw: [case.update(instance_numbers=numbers) for case in raw["cases"]])
    rows = read_annotations(root)
    lines = ["case,reader,instance,bone,x0,y0,x1,y1"]
    lines += [
        f"{r.case},{r.reader},{numbers[r.slice]},{r.bone},{r.x0},{r.y0},{r.x1},{r.y1}" for r in rows
    ]
    (root / "annotations.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_annotations_may_give_dicom_instance_numbers(root, good_root):
    give_instance_numbers(root)
    assert check(root) == []
    # The same rectangles on the same slices as the slice-indexed file.
    assert read_annotations(root) == read_annotations(good_root)
    assert read_dataset_json(root).cases[0].instance_numbers == (6, 5, 4, 3, 2, 1)


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        ("unknown", "annotations.csv line 6", "field 'instance': 9 is not among case s000_t0"),
        ("unnumbered", "annotations.csv line 2", "case s000_t0 has no instance_numbers"),
        (
            "short",
            "dataset.json",
            "case s000_t0: instance_numbers lists 5 numbers, its image has 6",
        ),
        ("repeated", "dataset.json cases[0].instance_numbers", "list of distinct integers"),
    ],
)
def test_instance_numbers_that_do_not_fit_are_named(root, change, where, what):
    give_instance_numbers(root)
    if change == "unknown":
        add_annotation_line(root, "s000_t0,r1,9,femur,1,1,4,4")
    first = {
        "unnumbered": lambda case: case.pop("instance_numbers"),
        "short": lambda case: case.update(instance_numbers=[6, 5, 4, 3, 2]),
        "repeated": lambda case: case.update(instance_numbers=[6, 5, 4, 3, 2, 2]),
    }.get(change)
    if first is not None:
        edit_json(root, lambda raw: first(raw["cases"][0]))
    problems = [p for p in check(root) if p.where == where]
    assert problems and what in problems[0].what, check(root)
