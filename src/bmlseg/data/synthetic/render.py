"""Rendering of one scan (:class:`Scan`): every sagittal slice composed from signed distances of
the femur, tibia, patella, fibula, fluid, cartilage, menisci and tendons, then lesions, trabecular
texture, coil shading (bias field) and Rician noise, stored as uint16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bmlseg.data.synthetic.anatomy import TISSUE, WOBBLE_MM, Anatomy
from bmlseg.data.synthetic.helpers import _box, _cap, _capsule, _ellipse, _smooth_union
from bmlseg.data.synthetic.lesions import (
    Lesion,
    LesionMask,
    _add_lesion,
    _draw_lesions,
    _evolve,
)
from bmlseg.data.synthetic.presets import FEMUR, INTENSITY_SCALE, PATELLA, TIBIA, Preset


@dataclass
class Scan:
    image: np.ndarray  # [S, H, W] uint16
    labels: np.ndarray  # [S, H, W] uint8 true bones
    truth: np.ndarray  # [S, H, W] uint8 union of the lesions
    lesions: list[Lesion]  # as drawn at time point 0
    lesion_masks: list[LesionMask]  # voxels of each lesion present in this scan


@dataclass(frozen=True)
class Layers:
    """One slice's rendering before lesions, bias and noise."""

    image: np.ndarray  # [H, W] float32
    labels: np.ndarray  # [H, W] uint8
    marrow: np.ndarray  # [H, W] float32 fraction of each pixel that is marrow
    subchondral: np.ndarray  # [H, W] uint8 bone label where a lesion may be centred


def _render_scan(
    anatomy: Anatomy,
    lesions: list[Lesion],
    time_point: int,
    phantom: Preset,
    rng: np.random.Generator,
    subject_rng: np.random.Generator,
) -> Scan:
    """Render one scan; at time point 0 the subject's lesions are drawn from ``subject_rng``."""
    slices, height, width = phantom.shape
    spacing_x, spacing_y, spacing_z = phantom.spacing
    shift = rng.normal(0.0, 1.0, size=2) if time_point else np.zeros(2)
    x = ((np.arange(width) + 0.5) * spacing_x - width * spacing_x / 2 - shift[0])[None, :]
    y = ((np.arange(height) + 0.5) * spacing_y - height * spacing_y / 2 - shift[1])[:, None]
    x, y = x.astype(np.float32), y.astype(np.float32)
    z = (np.arange(slices) + 0.5) * spacing_z - slices * spacing_z / 2
    texture = _texture(rng, phantom)
    layers = [
        _render_slice(anatomy, x, y, float(z[index]), min(spacing_x, spacing_y), texture[index])
        for index in range(slices)
    ]
    image = np.stack([layer.image for layer in layers])
    labels = np.stack([layer.labels for layer in layers])
    marrow = np.stack([layer.marrow for layer in layers])
    if time_point == 0:
        subchondral = np.stack([layer.subchondral for layer in layers])
        lesions = _draw_lesions(subject_rng, subchondral, x, y, z)
    else:
        lesions = [_evolve(lesion, rng) for lesion in lesions]
    truth = np.zeros(image.shape, dtype=np.uint8)
    masks = []
    for lesion in lesions:
        mask = _add_lesion(image, labels, marrow, texture, lesion, x, y, z)
        if mask is not None:
            masks.append(mask)
            s, h, w = mask.offset
            ds, dh, dw = mask.voxels.shape
            truth[s : s + ds, h : h + dh, w : w + dw] |= mask.voxels
    image *= _bias_field(rng, x, y, z)
    return Scan(_rician(image, rng), labels, truth, lesions, masks)


def _render_slice(
    anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: float, pixel: float, texture: np.ndarray
) -> Layers:
    """Compose one sagittal slice from signed distances (mm, negative inside) of each structure.

    Tissues are painted back to front with their pixel fractions ``clip(0.5 - sdf / pixel)``,
    which gives the partial-volume blur of an edge one pixel wide.
    """
    a = anatomy
    x, y = x + WOBBLE_MM * a.wobble[0](x, y, z), y + WOBBLE_MM * a.wobble[1](x, y, z)
    t = z / a.half_width  # -1 medial edge .. 1 lateral edge of the condyles

    femur, condyle_y, condyle = _femur(a, x, y, t)
    tibia, tibia_top, plateau_half = _tibia(a, x, y, t)
    patella = _patella(a, x, y, t)
    fibula = _fibula(a, x, y, t, tibia_top)

    def paint(canvas: np.ndarray, sdf: np.ndarray, value: float | np.ndarray) -> np.ndarray:
        fraction = np.clip(0.5 - sdf / pixel, 0.0, 1.0)
        return canvas + fraction * (value - canvas)

    tissue = {name: value * a.intensity_jitter for name, value in TISSUE.items()}
    px, py = a.patella_center
    skin = a.skin_x + 0.0015 * (y - py) ** 2 + 4.0 * (1 - _cap(t, 1.3))
    back = 74.0 - 0.001 * (y - py) ** 2
    body = np.maximum(skin - x, x - back)
    image = paint(np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32), body, tissue["skin"])
    image = paint(image, body + 1.2, tissue["fat"])
    image = paint(image, body + 6.0, tissue["muscle"] * (1 + 0.08 * texture))

    if abs(t) < 0.5:
        fat_pad = _ellipse(x, y, px + 10.0, a.joint_y - 3.0, 9.0, 13.0, 0.3)
        image = paint(image, fat_pad, tissue["fat_pad"])
    fluid = _fluid(a, x, y, t, femur, tibia, patella, condyle, condyle_y)
    image = paint(image, fluid, tissue["fluid"])
    meniscus = np.maximum.reduce(
        [
            femur + tibia - 2 * a.cartilage - 7.0,
            -np.minimum(femur, tibia),
            plateau_half - 9.0 - np.abs(x - a.tibia_x),
            np.abs(x - a.tibia_x) - plateau_half - 1.0,
            y - tibia_top,
        ]
    )
    if abs(t) > 0.25:  # no menisci in the intercondylar notch
        image = paint(image, meniscus, tissue["meniscus"])
    cartilage = _cartilage(a, x, y, femur, tibia, patella, condyle_y, tibia_top, plateau_half)
    image = paint(image, cartilage, tissue["cartilage"])
    if abs(t) < 0.4:
        image = paint(image, _tendons(a, x, y, tibia_top), tissue["tendon"])

    bones = np.minimum.reduce([femur, tibia, patella, fibula])
    image = paint(image, bones, tissue["cortex"])
    marrow_sdf = bones + a.cortex
    image = paint(image, marrow_sdf, tissue["marrow"] * (1 + 0.25 * texture))

    labels = np.zeros(image.shape, dtype=np.uint8)
    for label, sdf in ((FEMUR, femur), (TIBIA, tibia), (PATELLA, patella)):
        labels[(sdf < 0) & (labels == 0)] = label
    articular = {
        FEMUR: (y > condyle_y - 0.3 * a.condyle_radii[1]) & (np.abs(t) > 0.15),
        TIBIA: (y < tibia_top + 14.0) & (np.abs(x - a.tibia_x) < plateau_half - 4.0),
        PATELLA: x > px,
    }
    subchondral = np.zeros_like(labels)
    for label, sdf in ((FEMUR, femur), (TIBIA, tibia), (PATELLA, patella)):
        band = (sdf < -a.cortex - 0.5) & (sdf > -a.cortex - 7.0) & articular[label]
        subchondral[band & (labels == label)] = label
    marrow = np.clip(0.5 - marrow_sdf / pixel, 0.0, 1.0)
    return Layers(image.astype(np.float32), labels, marrow.astype(np.float32), subchondral)


def _femur(
    a: Anatomy, x: np.ndarray, y: np.ndarray, t: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Distal femur: the larger of two condyle sections joined smoothly to the shaft."""
    far = np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    # Medial (t < 0) and lateral condyles as ellipsoids across the slices; between them the
    # notch leaves a small section only.
    reach = max(_cap(t + 0.5, 0.55), _cap(t - 0.5, 0.55) * 0.94)
    if reach <= 0:
        return far, a.joint_y, far
    rx, ry = a.condyle_radii
    size = reach**0.6
    posterior = 4.0 if t < 0 else 0.0  # the medial condyle reaches further back
    condyle_y = a.joint_y - ry * size - 10.0 * (1 - size)
    condyle = _ellipse(x, y, a.condyle_x + posterior, condyle_y, rx * size, ry * size)
    # The metaphysis narrows upward from the condyles into the shaft.
    metaphysis = _ellipse(
        x, y, a.shaft_x + 2.0, condyle_y - 12.0, a.shaft_half * 1.1, 32.0 * size, 0.1
    )
    femur = _smooth_union(condyle, metaphysis, 8.0)
    shaft_half = a.shaft_half * _cap(t, 0.45)
    if shaft_half >= 3.0:
        shaft = _box(x, y, a.shaft_x - shaft_half, a.shaft_x + shaft_half, -1e3, condyle_y)
        femur = _smooth_union(femur, shaft, 10.0)
    return femur, condyle_y, condyle


def _tibia(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float) -> tuple[np.ndarray, float, float]:
    """Proximal tibia: plateau (a rounded box) joined smoothly to the shaft; spines at the notch."""
    top = a.joint_y + a.joint_gap
    reach = _cap(t, 1.02)
    plateau_half = a.plateau_half * (0.55 + 0.45 * reach)
    if reach <= 0:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32), top, 0.0
    height = a.plateau_height
    plateau = (
        _box(
            x, y, a.tibia_x - plateau_half + 4, a.tibia_x + plateau_half - 4, top + 4, top + height
        )
        - 4.0
    )
    spines = _ellipse(x, y, a.tibia_x - 2.0, top, 5.0, 4.0 * math.exp(-((t / 0.12) ** 2)) + 0.1)
    tibia = np.minimum(plateau, spines)
    shaft_half = a.tibia_shaft_half * _cap(t, 0.5)
    if shaft_half >= 3.0:
        shaft = _box(x, y, a.tibia_x - shaft_half - 2, a.tibia_x + shaft_half - 2, top, 1e3)
        tibia = _smooth_union(tibia, shaft, 12.0)
        tuberosity = _ellipse(x, y, a.tibia_x - shaft_half - 2, top + 28.0, 5.0, 9.0)
        tibia = _smooth_union(tibia, tuberosity, 4.0)
    return tibia, top, plateau_half


def _patella(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    reach = _cap(t, 0.5) ** 0.5
    if reach <= 0.1:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    rx, ry = a.patella_radii
    px, py = a.patella_center
    return _ellipse(x, y, px, py, rx * reach, ry * reach, a.patella_angle)


def _fibula(a: Anatomy, x: np.ndarray, y: np.ndarray, t: float, tibia_top: float) -> np.ndarray:
    """Fibular head, lateral and posterior; bone-like but not one of the labelled bones."""
    reach = _cap(t - 0.85, 0.25)
    if reach <= 0.1:
        return np.full(np.broadcast_shapes(x.shape, y.shape), 1e3, np.float32)
    cx = a.tibia_x + 0.6 * a.plateau_half
    return _ellipse(x, y, cx, tibia_top + a.plateau_height + 8.0, 8.0 * reach, 10.0 * reach)


def _fluid(
    a: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    t: float,
    femur: np.ndarray,
    tibia: np.ndarray,
    patella: np.ndarray,
    condyle: np.ndarray,
    condyle_y: float,
) -> np.ndarray:
    """Joint fluid: thin films between the cartilages plus recesses filled by the effusion."""
    film = 2 * a.cartilage + 1.0
    tibiofemoral = np.maximum(femur + tibia - film, -np.minimum(femur, tibia))
    patellofemoral = np.maximum(femur + patella - film, -np.minimum(femur, patella))
    px, py = a.patella_center
    # Recesses: suprapatellar pouch at the centre, posterior recesses behind the condyles.
    central = _cap(t, 0.7)
    swell = a.effusion * central
    suprapatellar = _ellipse(
        x,
        y,
        a.shaft_x - a.shaft_half - 3.0 - swell,
        py - 28.0,
        0.5 + 3.0 * swell,
        18.0 * central + 0.1,
        0.15,
    )
    suprapatellar = np.maximum(suprapatellar, -femur)
    behind = a.effusion * _cap(abs(t) - 0.55, 0.3)
    posterior = _ellipse(
        x, y, a.condyle_x + a.condyle_radii[0] - 2.0, condyle_y - 4.0, 0.5 + 3.0 * behind, 10.0
    )
    posterior = np.maximum(posterior, -condyle)
    return np.minimum.reduce([tibiofemoral, patellofemoral, suprapatellar, posterior])


def _cartilage(
    a: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    femur: np.ndarray,
    tibia: np.ndarray,
    patella: np.ndarray,
    condyle_y: float,
    tibia_top: float,
    plateau_half: float,
) -> np.ndarray:
    """Cartilage shells on the articular surfaces (distance outside the bone < thickness)."""
    px, py = a.patella_center
    femoral = (y > condyle_y - 0.5 * a.condyle_radii[1]) | ((x < a.condyle_x) & (y > py - 12.0))
    tibial = (y < tibia_top + 5.0) & (np.abs(x - a.tibia_x) < plateau_half - 1.0)
    patellar = x > px
    shells = []
    for sdf, surface in ((femur, femoral), (tibia, tibial), (patella, patellar)):
        shell = np.maximum(sdf - a.cartilage, -sdf)
        shells.append(np.where(surface, shell, 1e3))
    return np.minimum.reduce(shells)


def _tendons(a: Anatomy, x: np.ndarray, y: np.ndarray, tibia_top: float) -> np.ndarray:
    px, py = a.patella_center
    ry = a.patella_radii[1]
    patellar = _capsule(
        x, y, (px + 3.0, py + ry - 2.0), (a.tibia_x - a.tibia_shaft_half - 4, tibia_top + 30.0), 2.5
    )
    quadriceps = _capsule(x, y, (px + 2.0, py - ry + 2.0), (a.shaft_x - 22.0, -90.0), 3.5)
    return np.minimum(patellar, quadriceps)


def _texture(rng: np.random.Generator, phantom: Preset) -> np.ndarray:
    """Trabecular / muscle texture ``[S, H, W]``: white noise blurred to ~0.7 mm, unit s.d."""
    noise = rng.standard_normal(phantom.shape, dtype=np.float32)
    sigma = (0.0, 0.7 / phantom.spacing[1], 0.7 / phantom.spacing[0])
    texture = ndimage.gaussian_filter(noise, sigma=sigma, mode="nearest")
    return texture / max(float(texture.std()), 1e-6)


def _bias_field(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Smooth multiplicative coil shading: exp of a random quadratic, about +-15 %."""
    u, v = x[None] / 80.0, y[None] / 80.0
    w = (z[:, None, None] / 60.0).astype(np.float32)
    c = rng.normal(0.0, 0.08, size=6).astype(np.float32)
    in_plane = c[0] * u + c[1] * v + c[3] * u * u + c[4] * v * v + c[5] * u * v  # [1, H, W]
    return np.exp(in_plane) * np.exp(c[2] * w)


def _rician(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise, stored as uint16."""
    sigma = rng.uniform(0.02, 0.035)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary) * INTENSITY_SCALE
    return np.clip(np.round(magnitude), 0, np.iinfo(np.uint16).max).astype(np.uint16)
