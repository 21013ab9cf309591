"""Small numeric helpers of the synthetic dataset: seeded random streams (``_rng``), preset
look-up (``_resolve``), rounded ratios, and the 2D signed distances (``_ellipse``, ``_box``,
``_capsule``, ``_smooth_union``, ``_cap``) and smooth random fields the phantom is built from.
Imports nothing of the package.
"""

from __future__ import annotations

import math

import numpy as np


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent streams: key (0, ...) dataset-wide, (1, subject), (2, subject, time point)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _resolve(value, presets: dict, what: str):
    if not isinstance(value, str):
        return value
    if value not in presets:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(presets)}")
    return presets[value]


def _ratio(numerator: float, denominator: float) -> float:
    return round(float(numerator) / float(denominator), 4) if denominator else 0.0


def _cap(t: float, half_width: float) -> float:
    """Half-width of a sphere's section at ``t``, relative to its radius ``half_width``."""
    return math.sqrt(max(0.0, 1.0 - (t / half_width) ** 2))


def _ellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle: float = 0.0,
) -> np.ndarray:
    """First-order signed distance to an ellipse: exact on its boundary, monotone elsewhere."""
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * (x - cx) + sin * (y - cy)
    v = -sin * (x - cx) + cos * (y - cy)
    level = (u / rx) ** 2 + (v / ry) ** 2 - 1.0
    gradient = 2.0 * np.sqrt((u / rx**2) ** 2 + (v / ry**2) ** 2) + 1e-6
    return (level / gradient).astype(np.float32)


def _box(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    dx = np.maximum(x0 - x, x - x1)
    dy = np.maximum(y0 - y, y - y1)
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return (outside + np.minimum(np.maximum(dx, dy), 0.0)).astype(np.float32)


def _capsule(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float], radius: float
) -> np.ndarray:
    ax, ay = a
    bx, by = b
    length2 = (bx - ax) ** 2 + (by - ay) ** 2
    along = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / length2, 0.0, 1.0)
    return (np.hypot(x - ax - along * (bx - ax), y - ay - along * (by - ay)) - radius).astype(
        np.float32
    )


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: unites two shapes with a fillet of about ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + h * (a - b) - k * h * (1.0 - h)


def _smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    wavelength_mm: float,
    per_slice: bool,
) -> np.ndarray:
    """A smooth random field ``[S, H, W]`` in about [-1, 1]; new phases per slice if asked."""
    slices, height, width = shape
    x = (np.arange(width) * spacing[0])[None, None, :]
    y = (np.arange(height) * spacing[1])[None, :, None]
    count = 6
    angles = rng.uniform(0, np.pi, size=count)
    k = 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3, size=count))
    phases = rng.uniform(0, 2 * np.pi, size=(slices if per_slice else 1, count))
    field = np.zeros(shape, dtype=np.float32)
    for i in range(count):
        along_x = (k[i] * math.cos(angles[i]) * x).astype(np.float32)
        along_y = (k[i] * math.sin(angles[i]) * y + phases[:, i, None, None]).astype(np.float32)
        # cos(a + b) = cos a cos b - sin a sin b, evaluated as outer products: no full-size cos
        field += np.cos(along_x) * np.cos(along_y) - np.sin(along_x) * np.sin(along_y)
    return field * np.float32(math.sqrt(2.0 / count))
