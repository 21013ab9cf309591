"""The clean-label oracle: the pixelwise truth (``masks/``) used as the training label.

Not a weak label at all: it is the upper bound that every noisy-label row of Table I is measured
against, on datasets that have a truth (the phantom does; real weak-label datasets do not).
"""

from __future__ import annotations

import numpy as np

from bmlseg.data.format import Case


def truth_label(case: Case, bone_labels: dict[str, int]) -> np.ndarray:
    """``masks/<id>`` as a float32 ``[S, H, W]`` label: 1 on BML, 0 elsewhere.

    Raises:
        ValueError: the case has no pixelwise truth.
    """
    if case.mask is None:
        raise ValueError(
            f"case {case.record.id!r}: label method 'truth' needs masks/{case.record.id}.nii.gz "
            "(the pixelwise ground truth), which this dataset does not have; use a label "
            "method made from the readers' rectangles (e.g. kimriss)"
        )
    return (case.mask > 0).astype(np.float32)
