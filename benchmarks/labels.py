"""Time of every label method on a paper-size synthetic case (36 x 444 x 448), on one core.

Makes one subject with ``bmlseg.data.synthetic.generate(preset="paper")`` in a temporary folder,
loads its first case, and times each method's ``make_label`` (median of ``--repeats`` runs,
methods interleaved in every repeat so that a busy machine slows all alike), printing the ratio
to ``binary_any`` (the cost of reading the rectangles alone) beside each. Then the same for the
steps of the paper's pipeline. SimpleITK and BLAS are held to one thread.

    OMP_NUM_THREADS=1 python benchmarks/labels.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from bmlseg.data.format import load_case, read_dataset_json
from bmlseg.data.synthetic import generate as synthesize
from bmlseg.labels import METHODS, KimrissOptions, rater_agreement
from bmlseg.labels.kimriss import (
    hyperintense,
    marrow_region,
    raise_from_neighbours,
    rim_pixels,
)


def median_seconds(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, seconds: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'':24s} {'seconds':>9s} {'x ' + baseline:>16s}")
    for name, value in seconds.items():
        print(f"{name:24s} {value:9.3f} {value / seconds[baseline]:16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)

    with tempfile.TemporaryDirectory() as root:
        synthesize(root, n_subjects=1, seed=0, preset="paper", noise="paper")
        info = read_dataset_json(root)
        case = load_case(root, info.cases[0].id, info=info)
    bone_labels = info.bone_labels
    print(
        f"case {case.record.id}: {case.image.shape}, {len(case.record.readers)} readers, "
        f"{len(case.annotations)} rectangles"
    )

    methods = {name: (lambda make=make: make(case, bone_labels)) for name, make in METHODS.items()}
    print_table("make_label per method", median_seconds(methods, arguments.repeats), "binary_any")

    options = KimrissOptions()
    shape = case.image.shape
    readers = case.record.readers
    agreement = rater_agreement(case.annotations, readers, shape, bone_labels, bones=case.bones)
    spacing = case.geometry.spacing
    rim = rim_pixels(options.erode_mm, spacing)
    region = marrow_region(case.bones, rim)
    bright = hyperintense(case.image, case.bones, region, options, spacing)
    probability = np.where(region, agreement, 0.0).astype(np.float32)
    steps = {
        "1 rater_agreement": lambda: rater_agreement(
            case.annotations, readers, shape, bone_labels, bones=case.bones
        ),
        "2 marrow_region": lambda: marrow_region(case.bones, rim),
        "3 hyperintense": lambda: hyperintense(case.image, case.bones, region, options, spacing),
        "4 raise_from_neighbours": lambda: raise_from_neighbours(
            probability, bright, options.neighbour_weight
        ),
        "binary_any": methods["binary_any"],
    }
    print_table("kimriss steps", median_seconds(steps, arguments.repeats), "binary_any")


if __name__ == "__main__":
    main()
