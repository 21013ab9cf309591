"""A synthetic knee-MRI dataset: phantom scans, bone-marrow lesions and noisy KIMRISS readers.

Each subject is a sagittal intermediate-weighted fat-suppressed (IWFS) knee: distal femur with
its two condyles, proximal tibia with its plateau, patella, cartilage, joint fluid, menisci,
tendons, soft tissue and air. Every subject is scanned twice (time points 0 and 1, a small shift
apart, lesions a little grown or shrunk). Bone-marrow lesions (BMLs) are ill-defined hyperintense
blobs in subchondral marrow; their exact voxels are the ground truth in ``masks/``.

Readers mark KIMRISS grid cells: each bone's bounding box on a slice is cut into
``ReaderNoise.grid_cells`` x ``grid_cells`` cells and a reader lists the cells where they see a
lesion, one annotation row per cell. :class:`ReaderNoise` says how they err (missed lesion slices,
extents one cell off, false-positive cells); its presets are ``clean``, ``paper`` and ``heavy``.

All lengths are in mm in a centred anatomical frame: x runs anterior (left of the image) to
posterior, y superior (top row) to inferior, z across the slices (medial to lateral). The
volumes carry that as their direction matrix (:data:`SAGITTAL_DIRECTION`, orientation code PIR
for a right knee), so viewers show them as sagittal slices.
"""

from bmlseg.data.synthetic.dataset import (
    SAGITTAL_DIRECTION,
    format_statistics,
    generate,
    noise_statistics,
    proxy_bones,
    split_subjects,
)
from bmlseg.data.synthetic.presets import (
    BONES,
    NOISE_PRESETS,
    PAPER_TARGETS,
    PRESETS,
    Preset,
    ReaderNoise,
)
from bmlseg.data.synthetic.preview import save_preview
from bmlseg.data.synthetic.readers import kimriss_grid

__all__ = [
    "BONES",
    "NOISE_PRESETS",
    "PAPER_TARGETS",
    "PRESETS",
    "Preset",
    "SAGITTAL_DIRECTION",
    "ReaderNoise",
    "format_statistics",
    "generate",
    "kimriss_grid",
    "noise_statistics",
    "proxy_bones",
    "save_preview",
    "split_subjects",
]
