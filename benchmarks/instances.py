"""What the detector is taught, before and after confident instances: every label method's
training instances against the truth's lesions, on a dataset folder with masks/.

"before" is the old rule (an instance is any component of label > 0, kimriss's step 4 may raise
any hyperintense voxel); "after" is data.instances' defaults and kimriss's "connected" step 4.
Prints one markdown table (soft Dice, Brier and the instance figures of bmlseg.labels.quality)
and writes nothing.

    bmlseg-synth root=data/phantom20 n_subjects=20 seed=0
    OMP_NUM_THREADS=1 python benchmarks/instances.py data/phantom20 [--split train]
"""

from __future__ import annotations

import argparse

from bmlseg.data.format import load_case, load_dataset
from bmlseg.data.instances import InstanceOptions
from bmlseg.labels import METHODS, label_case
from bmlseg.labels.quality import case_figures, summarize

# label > 0 as a threshold, every core size kept: the rule before data.instances existed.
BEFORE = InstanceOptions(threshold=1e-6, min_area_mm2=0.0)
BEFORE_KIMRISS = {"neighbour_rule": "hyperintense"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a dataset folder with masks/")
    parser.add_argument("--split", help="only this split (default: every case)")
    args = parser.parse_args()
    info, annotations = load_dataset(args.root)
    cases = [
        load_case(args.root, record.id, info=info, annotations=annotations)
        for record in info.cases
        if args.split is None or record.split == args.split
    ]
    print(
        "| method | rule | soft Dice | Brier | instances | boxes matching a lesion | "
        "lesions matched | instances per slice |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        kimriss_like = method in ("kimriss", "kimriss_hard")
        rules = {
            "before": (BEFORE_KIMRISS if kimriss_like else {}, BEFORE),
            "after": ({}, InstanceOptions()),
        }
        for rule, (label_options, instance_options) in rules.items():
            row = summarize(
                method,
                [
                    case_figures(
                        label_case(case, info.bone_labels, method, **label_options),
                        case,
                        instance_options,
                    )
                    for case in cases
                ],
            )
            print(
                f"| {method} | {rule} | {row['soft_dice']:.3f} | {row['brier']:.4f} | "
                f"{row['instances']} | {row['boxes_matching_lesion']:.2f} | "
                f"{row['lesions_matched']:.2f} | {row['instances_per_slice']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
