"""The field's other mask losses (GCE/NGCE, NNCE, soft Dice, T-Loss, BoxInst's terms): values at
hand-computed points, the properties each is defined by, finite values and gradients in every
precision, their presets, and the image patches the RoI heads hand to the pairwise term."""

from __future__ import annotations

import importlib.resources
import math

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import roi_align

from bmlseg.losses import (
    MaskLoss,
    box_projection,
    generalized_cross_entropy,
    negative_cross_entropy,
    pairwise_affinity,
    soft_dice,
    student_t,
)
from bmlseg.models.roi_heads import soft_maskrcnn_loss

Z = torch.tensor([-9.0, -2.0, -0.5, 0.0, 0.3, 1.5, 4.0], dtype=torch.float64)
EXTREME_Z = [-1e4, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 1e4]
EXTREME_Y = [0.0, 1.0, 0.5, 0.3, 1e-30]

# The presets beside the paper's Table I: name -> (term weights, normalized, label kind).
FIELD_PRESETS = {
    "gce": ({"gce": 1.0}, False, "soft"),
    "ngce_nrce": ({"gce": 1.0, "rce": 1.0}, True, "soft"),
    "sce": ({"sce": 1.0, "rce": 1.0}, False, "soft"),
    "anl": ({"sce": 1.0, "nnce": 1.0}, True, "soft"),
    "tloss": ({"tloss": 1.0}, False, "soft"),
    "dice_soft": ({"dice": 1.0}, False, "soft"),
    "dice_sce": ({"dice": 1.0, "sce": 1.0}, False, "soft"),
    "boxinst": ({"projection": 1.0, "pairwise": 1.0}, False, "boxes"),
}
TERMS = ("bce", "sce", "rce", "mae", "gce", "nnce", "dice", "tloss", "projection", "pairwise")


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --- generalized cross entropy ------------------------------------------------------------------


def test_generalized_cross_entropy_at_hand_computed_points():
    z, y = torch.tensor([0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    p = sigmoid(2.0)
    expected = [(1 - 0.5**0.7) / 0.7, (1 - p**0.7) / 0.7, (1 - (1 - p) ** 0.7) / 0.7]
    torch.testing.assert_close(generalized_cross_entropy(z, y), torch.tensor(expected))
    # q = 1 is MAE (on hard labels, 1 - p_y = |y - p|).
    torch.testing.assert_close(generalized_cross_entropy(z, y, q=1.0), (y - torch.sigmoid(z)).abs())


def test_generalized_cross_entropy_soft_form_is_linear_in_the_target():
    y = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    for normalized in (False, True):
        hard_0 = generalized_cross_entropy(Z, torch.zeros_like(Z), normalized=normalized)
        hard_1 = generalized_cross_entropy(Z, torch.ones_like(Z), normalized=normalized)
        for value in y:
            soft = generalized_cross_entropy(Z, torch.full_like(Z, value), normalized=normalized)
            torch.testing.assert_close(soft, value * hard_1 + (1 - value) * hard_0)


@pytest.mark.parametrize("q", [0.3, 0.7, 1.0])
def test_normalized_generalized_cross_entropy_sums_to_one_over_the_hard_labels(q):
    z = torch.tensor(EXTREME_Z, dtype=torch.float64)
    total = generalized_cross_entropy(
        z, torch.zeros_like(z), q=q, normalized=True
    ) + generalized_cross_entropy(z, torch.ones_like(z), q=q, normalized=True)
    torch.testing.assert_close(total, torch.ones_like(z))


def test_generalized_cross_entropy_refuses_q_outside_the_unit_interval():
    with pytest.raises(ValueError, match="q must be in"):
        generalized_cross_entropy(Z, Z, q=0.0)


# --- normalized negative cross entropy -----------------------------------------------------------


def test_negative_cross_entropy_at_a_hand_computed_point():
    p_min = 1e-7
    shift = -math.log(p_min)
    p = sigmoid(2.0)
    a, b = shift + math.log(p), shift + math.log(1 - p)
    expected = [1 - a / (a + b), 1 - b / (a + b), 1 - (0.3 * a + 0.7 * b) / (a + b)]
    z = torch.full((3,), 2.0, dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)
    torch.testing.assert_close(
        negative_cross_entropy(z, y, p_min=p_min), torch.tensor(expected, dtype=torch.float64)
    )


def test_negative_cross_entropy_sums_to_one_and_is_in_unit_interval():
    z = torch.tensor(EXTREME_Z, dtype=torch.float64)
    hard_0 = negative_cross_entropy(z, torch.zeros_like(z))
    hard_1 = negative_cross_entropy(z, torch.ones_like(z))
    torch.testing.assert_close(hard_0 + hard_1, torch.ones_like(z))
    soft = negative_cross_entropy(z, torch.full_like(z, 0.3))
    torch.testing.assert_close(soft, 0.3 * hard_1 + 0.7 * hard_0)
    assert ((hard_1 >= 0) & (hard_1 <= 1)).all()
    # The passive loss decreases as p moves to the label.
    assert (hard_1.diff() <= 1e-12).all()


# --- soft Dice ------------------------------------------------------------------------------------


def test_soft_dice_is_zero_where_p_equals_the_soft_target_and_larger_elsewhere():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 6, 6, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    exact = torch.logit(target)
    torch.testing.assert_close(soft_dice(exact, target), torch.zeros(3, dtype=torch.float64))
    for shift in (-0.5, -0.05, 0.05, 0.5):
        assert (soft_dice(exact + shift, target) > 1e-4).all()


def test_soft_dice_on_hard_targets_is_the_usual_dice():
    generator = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(2, 5, 5, generator=generator, dtype=torch.float64)
    y = (torch.rand(2, 5, 5, generator=generator) > 0.5).double()
    p = torch.sigmoid(z)
    smooth = 1e-5
    usual = 1 - (2 * (p * y).sum((1, 2)) + smooth) / (p.sum((1, 2)) + y.sum((1, 2)) + smooth)
    torch.testing.assert_close(soft_dice(z, y), usual)


def test_soft_dice_of_an_empty_prediction_on_an_empty_target_is_zero():
    assert soft_dice(torch.full((1, 4, 4), -1e4), torch.zeros(1, 4, 4)).item() == pytest.approx(
        0.0, abs=1e-6
    )


# --- T-Loss ---------------------------------------------------------------------------------------


def reference_student_t(p: torch.Tensor, y: torch.Tensor, log_nu: float) -> list[float]:
    """The T-Loss of Gonzalez-Jimenez et al. for each [M, M] sample (lambdas = 1), over D."""
    epsilon = 1e-8
    values = []
    for sample_p, sample_y in zip(p, y, strict=True):
        d = sample_p.numel()
        nu = math.exp(log_nu) + epsilon
        squared = float(((sample_p - sample_y) ** 2).sum()) * math.exp(1 + epsilon)
        value = (
            -math.lgamma((nu + d) / 2)
            + math.lgamma(nu / 2)
            - 0.5 * d * (1 + epsilon)
            + d / 2 * math.log(math.pi)
            + d / 2 * (log_nu + epsilon)
            + (nu + d) / 2 * math.log(1 + squared / nu)
        )
        values.append(value / d)
    return values


@pytest.mark.parametrize("log_nu", [-1.0, 1.0, 3.0])
def test_student_t_matches_the_reference_formula(log_nu):
    generator = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(3, 7, 7, generator=generator, dtype=torch.float64)
    y = torch.rand(3, 7, 7, generator=generator, dtype=torch.float64)
    expected = reference_student_t(torch.sigmoid(z), y, log_nu)
    actual = student_t(z, y, torch.tensor(log_nu, dtype=torch.float64))
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_student_t_is_smallest_at_the_target_and_learns_nu():
    y = torch.rand(2, 6, 6, dtype=torch.float64) * 0.9 + 0.05
    log_nu = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    at_target = student_t(torch.logit(y), y, log_nu)
    off_target = student_t(torch.logit(y) + 1.0, y, log_nu)
    assert (at_target < off_target).all()
    off_target.sum().backward()
    assert log_nu.grad is not None and log_nu.grad.isfinite()


def test_mask_loss_registers_log_nu_only_for_the_t_loss():
    assert [name for name, _ in MaskLoss(bce=0.0, tloss=1.0).named_parameters()] == ["tloss_log_nu"]
    assert list(MaskLoss().parameters()) == []


# --- BoxInst ------------------------------------------------------------------------------------


def box_target(size: int = 8, box: tuple[int, int, int, int] = (2, 6, 1, 5)) -> torch.Tensor:
    target = torch.zeros(1, size, size, dtype=torch.float64)
    y0, y1, x0, x1 = box
    target[0, y0:y1, x0:x1] = 1.0
    return target


def test_box_projection_is_zero_for_a_mask_with_the_box_projections():
    target = box_target()
    # A mask that is not the box but has its projections on both axes: a cross.
    cross = torch.zeros_like(target)
    cross[0, 2:6, 2] = 1.0
    cross[0, 3, 1:5] = 1.0
    logits = torch.where(cross > 0, 30.0, -30.0).double()
    torch.testing.assert_close(box_projection(logits, target), torch.zeros(1, dtype=torch.float64))


def test_box_projection_at_a_hand_computed_point():
    target = box_target()  # rows 2..5, columns 1..4: 4 of 8 on each axis
    logits = torch.zeros_like(target)  # p = 0.5 everywhere: each projection is 0.5 everywhere
    per_axis = 1 - 2 * (0.5 * 4) / (0.25 * 8 + 4)
    torch.testing.assert_close(
        box_projection(logits, target), torch.tensor([2 * per_axis], dtype=torch.float64)
    )


def test_pairwise_affinity_rewards_labels_that_follow_the_image_inside_the_box():
    target = torch.ones(1, 8, 8, dtype=torch.float64)
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    image[..., 4:] = 5.0  # a strong edge between columns 3 and 4
    follows = torch.where(image[:, 0] > 0, 20.0, -20.0)
    # Stripes two columns wide: the neighbours two columns away have the other label.
    ignores = torch.where(torch.arange(8) // 2 % 2 == 0, 20.0, -20.0).double().expand(1, 8, 8)

    def pairwise(logits):
        return pairwise_affinity(logits, image, target, sigma=0.5, threshold=0.3)

    # Pairs across the edge are dissimilar and do not count; within each side the labels agree.
    assert pairwise(follows).item() == pytest.approx(0.0, abs=1e-6)
    # Every counted horizontal and diagonal pair disagrees.
    assert pairwise(ignores).item() > 1.0
    # At p = 0.5 everywhere, P(same label) = 0.5 on every counted edge.
    assert pairwise(torch.zeros(1, 8, 8, dtype=torch.float64)).item() == pytest.approx(math.log(2))


def test_pairwise_affinity_counts_only_pairs_inside_the_box():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    logits = torch.where(torch.arange(8) % 2 == 0, 20.0, -20.0).double().expand(1, 8, 8)
    outside = torch.zeros(1, 8, 8, dtype=torch.float64)
    assert pairwise_affinity(logits, image, outside, sigma=0.5, threshold=0.3).item() == 0.0


def test_roi_heads_hand_the_pairwise_term_the_image_under_each_roi():
    """Image patches line up with the targets: a mask equal to the image projects to the patch."""
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 32, 32, generator=generator)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 18.0], [10.0, 3.0, 30.0, 28.0]])
    seen = {}

    def loss(logits, targets, image_patches):
        seen["targets"], seen["patches"] = targets, image_patches
        return logits.sum() * 0

    soft_maskrcnn_loss(
        loss,
        torch.zeros(2, 2, 14, 14),
        [boxes],
        [image[:1]],  # one ground-truth mask: the image's first channel
        [torch.tensor([1])],
        [torch.tensor([0, 0])],
        [image],
    )
    assert seen["patches"].shape == (2, 3, 14, 14)
    torch.testing.assert_close(seen["patches"][:, 0], seen["targets"])
    torch.testing.assert_close(seen["patches"], roi_align(image[None], [boxes], (14, 14), 1.0))


def test_mask_loss_asks_for_image_patches_only_with_the_pairwise_term():
    assert MaskLoss(bce=0.0, projection=1.0, pairwise=1.0).needs_image
    assert not MaskLoss(bce=0.0, projection=1.0).needs_image
    with pytest.raises(ValueError, match="image_patches"):
        MaskLoss(bce=0.0, pairwise=1.0)(torch.zeros(1, 4, 4), torch.ones(1, 4, 4))


# --- every term: finite in every precision, composition ------------------------------------------


ONE_TERM = {
    "gce": dict(bce=0.0, gce=1.0, normalized=False),
    "ngce": dict(bce=0.0, gce=1.0, normalized=True),
    "nnce": dict(bce=0.0, nnce=1.0),
    "dice": dict(bce=0.0, dice=1.0),
    "tloss": dict(bce=0.0, tloss=1.0),
    "projection": dict(bce=0.0, projection=1.0),
    "pairwise": dict(bce=0.0, pairwise=1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ONE_TERM)
def test_every_term_is_finite_with_finite_gradients_at_extreme_logits(name, dtype):
    z = torch.tensor(EXTREME_Z)[:, None, None].expand(-1, len(EXTREME_Y), len(EXTREME_Y))
    y = torch.tensor(EXTREME_Y)
    y = (y[:, None] * y[None, :]).expand(len(EXTREME_Z), -1, -1).contiguous()
    z = z.to(dtype).contiguous().requires_grad_()
    image = torch.randn(len(EXTREME_Z), 3, len(EXTREME_Y), len(EXTREME_Y)).to(dtype)
    loss = MaskLoss(**ONE_TERM[name])(z, y, image)
    assert loss.dtype == torch.float32
    assert loss.isfinite()
    (gradient,) = torch.autograd.grad(loss, z)
    assert gradient.isfinite().all()


def test_mask_loss_adds_the_weighted_terms():
    generator = torch.Generator().manual_seed(4)
    z = 3 * torch.randn(3, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.rand(3, 6, 6, generator=generator, dtype=torch.float64)
    loss = MaskLoss(bce=0.0, gce=0.5, nnce=2.0, dice=1.5, normalized=True, p_min=1e-7)
    expected = (
        0.5 * generalized_cross_entropy(z, y, normalized=True).mean()
        + 2.0 * negative_cross_entropy(z, y, p_min=1e-7).mean()
        + 1.5 * soft_dice(z, y).mean()
    )
    torch.testing.assert_close(loss(z, y), expected)


# --- presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIELD_PRESETS)
def test_field_preset_builds_the_documented_loss(name):
    path = importlib.resources.files("bmlseg.conf") / "loss" / f"{name}.yaml"
    preset = OmegaConf.to_container(OmegaConf.load(str(path)))
    weights, normalized, label_kind = FIELD_PRESETS[name]
    assert preset["name"] == name
    assert preset["label_kind"] == label_kind
    mask_loss = MaskLoss(**{k: v for k, v in preset.items() if k not in ("name", "label_kind")})
    assert mask_loss.normalized is normalized
    assert {term: weight for term, weight in mask_loss.weights.items() if weight} == weights
    z = torch.zeros(2, 6, 6, requires_grad=True)
    value = mask_loss(z, torch.ones(2, 6, 6), torch.zeros(2, 3, 6, 6))
    assert value.isfinite()
