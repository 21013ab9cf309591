"""Soft labels from weak multi-reader rectangles: the paper's pipeline and baselines.

Every method is ``make_label(case, bone_labels, **options) -> [S, H, W] float32 in [0, 1]``,
registered by name in ``METHODS``; ``generate`` writes a method's labels for a dataset folder and
``evaluate`` scores them against the pixelwise truth where the folder has one.
"""

from bmlseg.labels.baselines import (
    binary_any_label,
    binary_majority_label,
    dilate_label,
    dilation_rings,
    staple_label,
    staple_probability,
    svls_kernel,
    svls_label,
    svls_smooth,
    uniform_label,
    uniform_smooth,
)
from bmlseg.labels.files import generate, recorded_options
from bmlseg.labels.kimriss import KimrissOptions, kimriss_label, kimriss_soft_label
from bmlseg.labels.methods import METHODS, label_case, resolve_options
from bmlseg.labels.quality import evaluate, label_scores
from bmlseg.labels.readers import rater_agreement, reader_maps

__all__ = [
    "METHODS",
    "KimrissOptions",
    "binary_any_label",
    "binary_majority_label",
    "dilate_label",
    "dilation_rings",
    "evaluate",
    "generate",
    "kimriss_label",
    "kimriss_soft_label",
    "label_scores",
    "label_case",
    "rater_agreement",
    "reader_maps",
    "recorded_options",
    "resolve_options",
    "staple_label",
    "staple_probability",
    "svls_kernel",
    "svls_label",
    "svls_smooth",
    "uniform_label",
    "uniform_smooth",
]
