"""bmlseg: soft labels and noise-robust mask losses for weakly supervised instance segmentation."""

__version__ = "0.1.0"
