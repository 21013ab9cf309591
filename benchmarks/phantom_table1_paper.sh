#!/usr/bin/env bash
# The phantom Table I at paper scale on one GPU: the rows of experiment=phantom_table1 (the
# clean-label oracle, the BCE baseline, the APL and soft-label rows; seeds 0, 1, 2) on a
# 20-subject phantom sampled as the paper's scans (444 x 448, 0.36 mm), with IMaskRCNN on
# ResNet-50-FPN, 320-pixel crops of its 0.36 mm pixels (data.spacing_mm=0.36: nothing resampled)
# and the paper's schedule (train=paper: 40 000 steps, bf16
# autocast), GroupNorm in the skip head as in the CPU recipe (the paper's Keras head had
# BatchNorm; without it the APL losses push the mask logits past the clip: docs/training.md),
# then the same report as on the CPU. Resumable: run it again to go on.
#
#   benchmarks/phantom_table1_paper.sh [DATA_DIR] [SWEEP_DIR]
set -euo pipefail
data=${1:-data/phantom20_paper}
sweep=${2:-multirun/phantom_table1_paper}
if [ ! -f "$data/dataset.json" ]; then
    bmlseg-synth root="$data" n_subjects=20 seed=0 preset=paper noise=paper
fi
bmlseg-train experiment=phantom_table1 model=imaskrcnn train=paper data.spacing_mm=0.36 \
    data.crop_size=320 \
    +model.maskrcnn_kwargs.mask_head_norm=group train.resume=true data.root="$data" hydra.sweep.dir="$sweep"
bmlseg-report "$sweep"
