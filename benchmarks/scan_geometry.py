"""Does a trained model find the same lesions in a scan whatever its orientation and pixel size?

Each test scan of a phantom dataset is written again as other scanners and tools deliver scans:

- ``as written``: the model's own grid (sagittal, 1.25 mm pixels);
- ``0.3 mm``: resampled in-plane to 0.3 mm pixels (a clinical knee protocol's), same field of
  view (SimpleITK, linear for the image, nearest for bones and truth);
- ``RAS``: the same voxels in RAS array order, as nibabel's ``as_closest_canonical`` writes a
  NIfTI: slices now run foot to head by the header (axial), the array transposed;
- ``0.3 mm + RAS``: both.

Each is predicted by ``bmlseg.predict.predict_volume`` with the checkpoint's model grid, and, for
comparison, as bmlseg did before it had one: the array taken as it comes, pixels as the model's
(``as if on the grid``). Printed and written to ``<out>/scan_geometry.json`` and ``.md``: per
variant, the predicted BML volume against the truth's (mL, summed over the scans) and the Dice
against the truth on the variant's grid.

    python benchmarks/scan_geometry.py CHECKPOINT DATASET_ROOT --out DIR [--split test]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from bmlseg.data.format import load_case, load_dataset
from bmlseg.data.grid import ModelGrid
from bmlseg.engine.evaluate import load_for_inference
from bmlseg.io import Geometry, write_text_atomic
from bmlseg.predict import predict_volume

FINE_MM = 0.3


def as_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    return image


def resampled(image: sitk.Image, spacing_mm: float, interpolator: int) -> sitk.Image:
    """``image`` on pixels of ``spacing_mm`` in-plane, same field of view and slices."""
    old = np.array(image.GetSpacing())
    new = np.array([spacing_mm, spacing_mm, old[2]])
    size = [round(n * o / s) for n, o, s in zip(image.GetSize(), old, new, strict=True)]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((new - old) / 2 * [1, 1, 0])
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        origin.tolist(),
        new.tolist(),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def variants(image: sitk.Image, bones: sitk.Image, truth: sitk.Image) -> dict[str, tuple]:
    fine = [
        resampled(image, FINE_MM, sitk.sitkLinear),
        resampled(bones, FINE_MM, sitk.sitkNearestNeighbor),
        resampled(truth, FINE_MM, sitk.sitkNearestNeighbor),
    ]
    native = [image, bones, truth]
    return {
        "as written": native,
        "0.3 mm": fine,
        "RAS": [sitk.DICOMOrient(volume, "RAS") for volume in native],
        "0.3 mm + RAS": [sitk.DICOMOrient(volume, "RAS") for volume in fine],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("root")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state, model, settings = load_for_inference(
        args.checkpoint,
        torch.device("cpu"),
        batch_size=8,
        score_threshold=None,
        mask_threshold=None,
    )
    grid = ModelGrid.of(state["config"]["data"])
    info, annotations = load_dataset(args.root)
    totals: dict[str, dict[str, float]] = {}
    for record in info.split(args.split):
        case = load_case(args.root, record.id, info=info, annotations=annotations)
        scans = variants(
            as_image(case.image, case.geometry),
            as_image(case.bones, case.geometry),
            as_image(case.mask, case.geometry),
        )
        for name, (image, bones, truth) in scans.items():
            arrays = [sitk.GetArrayFromImage(volume) for volume in (image, bones, truth)]
            geometry = Geometry.of(image)
            # Before the model grid: any array was taken as sagittal slices of the model's pixels.
            as_if = Geometry((grid.spacing_mm, grid.spacing_mm, 1.0), (0.0,) * 3, _direction(grid))
            for how, given in (("model grid", geometry), ("as if on the grid", as_if)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    probability = predict_volume(model, arrays[0], arrays[1], given, grid, settings)
                predicted = probability >= settings.mask_threshold
                truth_mask = arrays[2] > 0
                row = totals.setdefault(
                    f"{name} | {how}",
                    dict.fromkeys(
                        (
                            "predicted_ml",
                            "truth_ml",
                            "overlap_voxels",
                            "predicted_voxels",
                            "truth_voxels",
                        ),
                        0.0,
                    ),
                )
                row["predicted_ml"] += predicted.sum() * geometry.voxel_volume_ml
                row["truth_ml"] += truth_mask.sum() * geometry.voxel_volume_ml
                row["overlap_voxels"] += float((predicted & truth_mask).sum())
                row["predicted_voxels"] += float(predicted.sum())
                row["truth_voxels"] += float(truth_mask.sum())
        print(f"{record.id}: done")
    table = {
        key: {
            "predicted_ml": round(row["predicted_ml"], 3),
            "truth_ml": round(row["truth_ml"], 3),
            "dice_pooled": round(
                2 * row["overlap_voxels"] / max(row["predicted_voxels"] + row["truth_voxels"], 1), 3
            ),
        }
        for key, row in totals.items()
    }
    lines = [
        "| scan | read | predicted BML (mL) | truth (mL) | pooled Dice |",
        "|---|---|---|---|---|",
    ]
    for key, row in table.items():
        name, how = key.split(" | ")
        lines.append(
            f"| {name} | {how} | {row['predicted_ml']:.2f} | {row['truth_ml']:.2f} | {row['dice_pooled']:.3f} |"
        )
    out = Path(args.out)
    write_text_atomic(out / "scan_geometry.json", json.dumps(table, indent=2) + "\n")
    write_text_atomic(out / "scan_geometry.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _direction(grid: ModelGrid) -> tuple[float, ...]:
    return sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(grid.orientation)


if __name__ == "__main__":
    main()
