"""Constants and presets of the synthetic dataset: bone labels, the entries of a dataset folder,
reader and time-point counts, the intensity scale, the phantom's sampling presets (:class:`Preset`,
``PRESETS``), the readers' noise models (:class:`ReaderNoise`, ``NOISE_PRESETS``) and what the
``paper`` noise preset aims at (``PAPER_TARGETS``). Imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

BONES = {1: "femur", 2: "tibia", 3: "patella"}
# What a dataset folder holds: the files bmlseg-synth writes and what the tools derive from them
# there (labels and their evaluation). overwrite=true deletes these, and only these.
DATASET_ENTRIES = (
    "dataset.json",
    "annotations.csv",
    "images",
    "bones",
    "masks",
    "softlabels",
    "label_quality",
    "preview.png",
)
FEMUR, TIBIA, PATELLA = 1, 2, 3
MAX_READERS = 7
TIME_POINTS = 2
# Stored intensities are the rendered signal (background 0, fluid about 1) times this.
INTENSITY_SCALE = 1000.0


@dataclass(frozen=True)
class Preset:
    """Sampling of the phantom: array shape ``[S, H, W]`` and spacing (x, y, z) in mm."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


PRESETS = {
    # The paper's OAI scans: 444 x 448 matrix, 159 x 160 mm field of view, 3 mm slices.
    "paper": Preset("paper", (36, 444, 448), (0.36, 0.36, 3.0)),
    # Same field of view and knee, sampled coarsely for CPU tests and demos.
    "small": Preset("small", (16, 128, 128), (1.25, 1.25, 6.75)),
}


@dataclass(frozen=True)
class ReaderNoise:
    """How simulated KIMRISS readers err. Probabilities are per event named in each field."""

    grid_cells: int = 6  # KIMRISS grid: cells per side of a bone's bounding box on a slice
    detect_max: float = 1.0  # P(mark a lesion slice) for a large, bright lesion on a middle slice
    size_half_mm2: float = 0.0  # lesion area on the slice at which that probability halves
    brightness_half: float = 0.0  # lesion brightness (0..1) at which it halves
    steepness: float = 3.0  # Hill exponent of those two drops: high = all-or-nothing
    end_slice_factor: float = 1.0  # multiplies it on the first and last of >= 3 lesion slices
    reader_spread: float = 0.0  # s.d. of each reader's log-odds offset (a reader's threshold)
    p_miss_lesion: float = 0.0  # P(a reader overlooks a whole lesion): inattention
    p_shrink_side: float = 0.0  # per side of a marked region: P(one cell short)
    p_grow_side: float = 0.0  # per side of a marked region: P(one cell too far)
    max_cell_threshold: float = 0.0  # readers skip cells whose bone area the lesion covers
    #   less than their own threshold, drawn per reader in [0, max_cell_threshold]
    false_cells_per_scan: float = 0.0  # mean number of false-positive cells per reader and scan
    p_blank: float = 0.0  # P(a listed reader drew nothing on a scan)

    def __post_init__(self) -> None:
        probabilities = (
            "detect_max",
            "end_slice_factor",
            "p_miss_lesion",
            "p_shrink_side",
            "p_grow_side",
            "max_cell_threshold",
            "p_blank",
        )
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"ReaderNoise.{name} must lie in [0, 1], got {getattr(self, name)}"
                )
        if self.p_shrink_side + self.p_grow_side > 1.0:
            raise ValueError("ReaderNoise.p_shrink_side + p_grow_side must not exceed 1")
        if self.grid_cells < 1:
            raise ValueError(f"ReaderNoise.grid_cells must be >= 1, got {self.grid_cells}")
        non_negative = (
            "size_half_mm2",
            "brightness_half",
            "steepness",
            "reader_spread",
            "false_cells_per_scan",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"ReaderNoise.{name} must be >= 0, got {getattr(self, name)}")


NOISE_PRESETS = {
    "clean": ReaderNoise(),
    # Calibrated on 20 subjects (docs/synthetic.md) to the paper's follow-up reading: about half
    # of the BML area missed or underestimated by the consensus, over 60 % by single readers.
    "paper": ReaderNoise(
        detect_max=0.95,
        size_half_mm2=8.0,
        brightness_half=0.15,
        steepness=4.0,
        end_slice_factor=0.5,
        reader_spread=1.0,
        p_miss_lesion=0.25,
        p_shrink_side=0.1,
        p_grow_side=0.15,
        max_cell_threshold=0.3,
        false_cells_per_scan=1.0,
        p_blank=0.15,
    ),
    "heavy": ReaderNoise(
        detect_max=0.85,
        size_half_mm2=20.0,
        brightness_half=0.3,
        steepness=3.0,
        end_slice_factor=0.3,
        reader_spread=1.2,
        p_miss_lesion=0.3,
        p_shrink_side=0.25,
        p_grow_side=0.25,
        max_cell_threshold=0.5,
        false_cells_per_scan=3.0,
        p_blank=0.2,
    ),
}

# What the ``paper`` preset aims at (share of true BML voxels left uncovered); tests hold it here.
PAPER_TARGETS = {"consensus_missed": (0.40, 0.65), "reader_missed": (0.55, 0.80)}
