"""Bone-marrow lesions: :class:`Lesion` (drawn per subject in subchondral marrow at time point 0,
evolved at time point 1) and :class:`LesionMask` (its truth voxels in one scan), and how a lesion
brightens the rendered image (``_add_lesion``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from bmlseg.data.synthetic.anatomy import Waves, _draw_waves
from bmlseg.data.synthetic.presets import FEMUR, PATELLA, TIBIA


@dataclass(frozen=True)
class Lesion:
    bone: int
    center: tuple[float, float, float]  # (x, y, z) mm, anatomical frame
    radii: tuple[float, float, float]  # (x, y, z) mm
    angle: float  # in-plane rotation, radians
    brightness: float  # 0 (dim) .. 1 (bright)
    irregularity: Waves


@dataclass(frozen=True)
class LesionMask:
    bone: int
    brightness: float
    offset: tuple[int, int, int]  # [S, H, W] index of voxels[0, 0, 0]
    voxels: np.ndarray  # [s, h, w] bool


def _draw_lesions(
    rng: np.random.Generator, subchondral: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> list[Lesion]:
    """0-4 lesions centred in subchondral marrow; size and brightness grow with a severity."""
    lesions = []
    for _ in range(int(rng.integers(0, 5))):
        bone = int(rng.choice([FEMUR, TIBIA, PATELLA], p=[0.45, 0.4, 0.15]))
        candidates = np.flatnonzero(subchondral == bone)
        if candidates.size == 0:
            continue
        s, h, w = np.unravel_index(rng.choice(candidates), subchondral.shape)
        severity = rng.uniform()
        size = np.clip(severity + rng.normal(0, 0.15), 0, 1)
        in_plane = 2.5 * (10.0 / 2.5) ** size * (0.6 if bone == PATELLA else 1.0)
        # 1 to 6 slices of the paper's 3 mm
        across = 1.5 * (1 + round(5 * float(np.clip(severity + rng.normal(0, 0.2), 0, 1))))
        lesions.append(
            Lesion(
                bone=bone,
                center=(float(x[0, w]), float(y[h, 0]), float(z[s])),
                radii=(
                    float(in_plane * rng.uniform(0.7, 1.3)),
                    float(in_plane * rng.uniform(0.7, 1.3)),
                    float(across),
                ),
                angle=float(rng.uniform(0, np.pi)),
                brightness=float(np.clip(severity + rng.normal(0, 0.2), 0.05, 1.0)),
                irregularity=_draw_waves(rng, 4, wavelength_mm=(4.0, 12.0)),
            )
        )
    return lesions


def _evolve(lesion: Lesion, rng: np.random.Generator) -> Lesion:
    """The lesion at the second time point: a little larger or smaller, brighter or dimmer."""
    growth = float(np.exp(rng.normal(0.0, 0.12)))
    return replace(
        lesion,
        radii=tuple(radius * growth for radius in lesion.radii),
        brightness=float(np.clip(lesion.brightness * np.exp(rng.normal(0.0, 0.1)), 0.05, 1.0)),
    )


def _add_lesion(
    image: np.ndarray,
    labels: np.ndarray,
    marrow: np.ndarray,
    texture: np.ndarray,
    lesion: Lesion,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
) -> LesionMask | None:
    """Brighten ``image`` in place around ``lesion``; return its truth voxels (marrow only)."""
    reach = 1.6  # the signal fades out to 1.6 radii
    cx, cy, cz = lesion.center
    rx, ry, rz = lesion.radii
    box = [
        _index_range(z, cz, reach * rz),
        _index_range(y[:, 0], cy, reach * max(rx, ry)),
        _index_range(x[0], cx, reach * max(rx, ry)),
    ]
    if any(start >= stop for start, stop in box):
        return None
    (s0, s1), (h0, h1), (w0, w1) = box
    zz = z[s0:s1, None, None]
    yy = y[None, h0:h1, :]
    xx = x[None, :, w0:w1]
    cos, sin = math.cos(lesion.angle), math.sin(lesion.angle)
    u = (cos * (xx - cx) + sin * (yy - cy)) / rx
    v = (-sin * (xx - cx) + cos * (yy - cy)) / ry
    radius = np.sqrt(u * u + v * v + ((zz - cz) / rz) ** 2)
    radius = radius * (1.0 + 0.3 * lesion.irregularity(xx, yy, zz))
    inside = radius < 1.0
    region = (slice(s0, s1), slice(h0, h1), slice(w0, w1))
    voxels = inside & (marrow[region] >= 0.5) & (labels[region] == lesion.bone)
    if not voxels.any():
        return None
    amplitude = 0.08 + 0.37 * lesion.brightness
    profile = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.12))  # ill-defined edge
    patchy = 1.0 + 0.15 * texture[region]
    image[region] += (amplitude * profile * patchy * marrow[region]).astype(np.float32)
    return LesionMask(lesion.bone, lesion.brightness, (s0, h0, w0), voxels)


def _index_range(coordinates: np.ndarray, center: float, half: float) -> tuple[int, int]:
    """Indices of the sorted ``coordinates`` within ``half`` of ``center``, as (start, stop)."""
    start = int(np.searchsorted(coordinates, center - half, side="left"))
    stop = int(np.searchsorted(coordinates, center + half, side="right"))
    return start, stop
