"""One subject's knee: the :class:`Anatomy` drawn per subject (bone sizes and positions,
cartilage, effusion, intensity jitter) with its smooth contour wobble (:class:`Waves`), and the
tissue signals (``TISSUE``) the scans are painted with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Waves:
    """A smooth random field: a sum of plane waves, amplitude 1 in total."""

    wavevectors: np.ndarray  # [N, 3] radians per mm along (x, y, z)
    phases: np.ndarray  # [N]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float) -> np.ndarray:
        """The field at broadcastable coordinates; cheapest when ``x`` varies along one axis."""
        field = 0.0
        for (kx, ky, kz), phase in zip(self.wavevectors, self.phases, strict=True):
            along_x = kx * x
            rest = ky * y + kz * z + phase
            # cos(a + b) = cos a cos b - sin a sin b: cosines of the small factors only
            field = field + np.cos(along_x) * np.cos(rest) - np.sin(along_x) * np.sin(rest)
        return field / len(self.phases)


@dataclass(frozen=True)
class Anatomy:
    """One subject's knee, in mm of the centred anatomical frame."""

    joint_y: float  # joint line
    half_width: float  # half the medial-lateral width of the knee (condyles)
    condyle_x: float
    condyle_radii: tuple[float, float]
    shaft_x: float
    shaft_half: float
    tibia_x: float
    plateau_half: float
    plateau_height: float
    tibia_shaft_half: float
    joint_gap: float  # bone to bone across the tibiofemoral joint
    patella_center: tuple[float, float]
    patella_radii: tuple[float, float]
    patella_angle: float  # radians
    cartilage: float
    cortex: float
    effusion: float  # 0 (none) .. 1.5 (large)
    skin_x: float  # anterior skin at the patella's height
    intensity_jitter: float
    wobble: tuple[Waves, Waves]  # bend every contour along x and y by up to ``WOBBLE_MM``


WOBBLE_MM = 1.5
TISSUE = {  # signal (fluid about 1) on fat-suppressed intermediate-weighted images
    "skin": 0.35,
    "fat": 0.09,
    "muscle": 0.27,
    "fat_pad": 0.12,
    "fluid": 0.95,
    "cartilage": 0.45,
    "meniscus": 0.05,
    "tendon": 0.04,
    "cortex": 0.03,
    "marrow": 0.14,
}


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    scale = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))

    def jitter(value: float, spread: float = 0.05) -> float:
        return float(value * scale * rng.uniform(1 - spread, 1 + spread))

    joint_y = float(rng.normal(8.0, 3.0))
    shift = float(rng.normal(0.0, 3.0))
    condyle_radii = (jitter(24.0), jitter(21.0))
    patella_radii = (jitter(9.5, 0.08), jitter(19.0, 0.08))
    patella_x = shift - 30.0 * scale + rng.normal(0, 1.5)
    return Anatomy(
        joint_y=joint_y,
        half_width=jitter(46.0),
        condyle_x=shift + 6.0 * scale,
        condyle_radii=condyle_radii,
        shaft_x=shift,
        shaft_half=jitter(14.0),
        tibia_x=shift + 4.0 * scale,
        plateau_half=jitter(27.0),
        plateau_height=jitter(17.0),
        tibia_shaft_half=jitter(13.0),
        joint_gap=float(rng.uniform(5.0, 7.0)),
        patella_center=(float(patella_x), float(joint_y - 28.0 * scale + rng.normal(0, 4.0))),
        patella_radii=patella_radii,
        patella_angle=float(np.deg2rad(rng.normal(-12.0, 5.0))),
        cartilage=float(rng.uniform(2.0, 2.8)),
        cortex=float(rng.uniform(1.0, 1.5)),
        effusion=float(rng.uniform(0.0, 1.5)),
        skin_x=float(patella_x - patella_radii[0] - rng.uniform(6.0, 10.0)),
        intensity_jitter=float(rng.uniform(0.95, 1.05)),
        wobble=(
            _draw_waves(rng, 4, wavelength_mm=(25.0, 70.0)),
            _draw_waves(rng, 4, wavelength_mm=(25.0, 70.0)),
        ),
    )


def _draw_waves(rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> Waves:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=(count, 1))
    return Waves(directions * (2 * np.pi / wavelengths), rng.uniform(0, 2 * np.pi, size=count))
