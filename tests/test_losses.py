"""Loss math of bmlseg.losses: values against float64 references, properties, gradients,
low-precision inputs, MaskLoss composition and the conf/loss presets (the paper's Table I)."""

from __future__ import annotations

import importlib.resources
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from test_robust_losses import FIELD_PRESETS

from bmlseg.losses import MaskLoss, cross_entropy, mae, reverse_cross_entropy

P_MIN = 1e-20
LOG_P_MIN = math.log(P_MIN)

# Moderate logits (no clipping at Pmin) and targets: hard, soft, and the ends of [0, 1].
Z_GRID = np.array([-8.0, -3.0, -1.0, -0.25, 0.0, 0.4, 1.5, 2.0, 5.0, 9.0])
Y_GRID = np.array([0.0, 1e-6, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0])

EXTREME_Z = [-1e4, -88.0, -1e-3, 0.0, 1e-3, 88.0, 1e4]
EXTREME_Y = [0.0, 1.0, 0.5, 1e-30]

# The paper's Table I: (row, loss weights BCE, SCE, RCE, label kind). The presets must match it;
# all rows but the two baselines use normalized losses (APL).
TABLE_I = {
    "truth_bce": (0, 1.0, 0.0, 0.0, "truth"),  # the clean-label oracle, not a row of the paper
    "baseline_bce": (1, 1.0, 0.0, 0.0, "binary"),
    "apl_binary": (2, 1.0, 0.0, 1.0, "binary"),
    "apl_binary_bce2": (3, 2.0, 0.0, 1.0, "binary"),
    "soft_baseline": (4, 0.0, 1.0, 0.0, "soft"),
    "apl_soft": (5, 0.0, 1.0, 1.0, "soft"),
    "apl_soft_sce2": (6, 0.0, 2.0, 1.0, "soft"),
    "apl_soft_bce": (7, 1.0, 1.0, 1.0, "soft"),
    "apl_soft_bce2": (8, 2.0, 2.0, 1.0, "soft"),
}
# --- float64 references, written from the definitions with plain probabilities ---------------


def ref_cross_entropy(z: float, y: float, normalized: bool) -> float:
    p = 1.0 / (1.0 + math.exp(-z))
    loss = -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))
    if normalized:
        loss /= -math.log(p) - math.log(1.0 - p)
    return loss


def ref_reverse_cross_entropy(z: float, y: float, normalized: bool) -> float:
    p = 1.0 / (1.0 + math.exp(-z))
    y_clipped = min(max(y, P_MIN), 1.0 - P_MIN)
    # 1 - y_clipped rounds to 0 in float64 too for y = 1; write the clipped complement directly.
    not_y_clipped = min(max(1.0 - y, P_MIN), 1.0 - P_MIN)
    loss = -(p * math.log(y_clipped) + (1.0 - p) * math.log(not_y_clipped))
    if normalized:
        loss /= -math.log(P_MIN) - math.log1p(-P_MIN)
    return loss


def ref_mae(z: float, y: float) -> float:
    return abs(1.0 / (1.0 + math.exp(-z)) - y)


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    z, y = np.meshgrid(Z_GRID, Y_GRID, indexing="ij")
    return torch.from_numpy(z.ravel()), torch.from_numpy(y.ravel())


def reference(function, z: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    values = [function(float(a), float(b), **kwargs) for a, b in zip(z, y, strict=True)]
    return torch.tensor(values, dtype=torch.float64)


# --- values ------------------------------------------------------------------------------------


def test_values_given_in_the_task():
    z, y = torch.tensor([2.0]), torch.tensor([0.7])
    assert cross_entropy(z, y).item() == pytest.approx(0.726928011, rel=1e-6)
    assert cross_entropy(z, y, normalized=True).item() == pytest.approx(0.3225263743, rel=1e-6)
    assert reverse_cross_entropy(z, y, normalized=True).item() == pytest.approx(
        0.009938293401, rel=1e-6
    )
    assert reverse_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0])).item() == (
        pytest.approx(23.02585093, rel=1e-7)
    )
    y = torch.from_numpy(Y_GRID)
    torch.testing.assert_close(
        cross_entropy(torch.zeros_like(y), y, normalized=True), torch.full_like(y, 0.5)
    )


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("function", "reference_function"),
    [(cross_entropy, ref_cross_entropy), (reverse_cross_entropy, ref_reverse_cross_entropy)],
    ids=["cross_entropy", "reverse_cross_entropy"],
)
def test_matches_reference(function, reference_function, normalized, dtype):
    z, y = grid()
    expected = reference(reference_function, z, y, normalized=normalized)
    actual = function(z.to(dtype), y.to(dtype), normalized=normalized)
    assert actual.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("normalized", [False, True])
def test_mae_matches_reference_and_needs_no_normalization(normalized):
    z, y = grid()
    expected = reference(ref_mae, z, y)
    torch.testing.assert_close(mae(z, y, normalized=normalized), expected)
    # Ma et al.'s normalizer, the sum over the two hard labels, is 1 for a binary output.
    total = mae(z, torch.zeros_like(z)) + mae(z, torch.ones_like(z))
    torch.testing.assert_close(total, torch.ones_like(z))


def test_cross_entropy_clips_p_at_p_min():
    z = torch.tensor([-1e4, -60.0, 60.0, 1e4], dtype=torch.float64)
    wrong = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(z, wrong), torch.full_like(z, -LOG_P_MIN))
    # Clipped at both ends, -log p - log(1 - p) = -log Pmin - log(1 - Pmin).
    torch.testing.assert_close(cross_entropy(z, wrong, normalized=True), torch.ones_like(z))
    right = 1 - wrong
    assert (cross_entropy(z, right) <= P_MIN).all()


def test_reverse_cross_entropy_clips_labels_separately_in_float32():
    z = torch.tensor([0.0, 0.0])
    y = torch.tensor([1.0, 0.0])
    # 1 - clip(1) would be 0 in float32 and log 0 = -inf; the clipped complement gives log Pmin.
    expected = torch.full_like(z, -0.5 * LOG_P_MIN)
    torch.testing.assert_close(reverse_cross_entropy(z, y), expected)
    assert reverse_cross_entropy(z, torch.tensor([1e-30, 1e-30])).isfinite().all()


# --- properties --------------------------------------------------------------------------------


def test_normalized_cross_entropy_is_in_unit_interval():
    z = torch.tensor(EXTREME_Z + Z_GRID.tolist())[:, None]
    y = torch.tensor(EXTREME_Y + Y_GRID.tolist())[None, :]
    loss = cross_entropy(z.expand(-1, y.shape[1]), y.expand(z.shape[0], -1), normalized=True)
    assert loss.min() >= 0
    assert loss.max() <= 1


@pytest.mark.parametrize("function", [cross_entropy, reverse_cross_entropy])
def test_normalized_loss_sums_to_one_over_the_hard_labels(function):
    z = torch.tensor(EXTREME_Z + Z_GRID.tolist(), dtype=torch.float64)
    total = function(z, torch.zeros_like(z), normalized=True) + function(
        z, torch.ones_like(z), normalized=True
    )
    torch.testing.assert_close(total, torch.ones_like(z))


def test_normalized_reverse_cross_entropy_on_hard_labels_is_absolute_error():
    z = torch.tensor(EXTREME_Z + Z_GRID.tolist(), dtype=torch.float64)
    p = torch.sigmoid(z)
    for label in (0.0, 1.0):
        y = torch.full_like(z, label)
        torch.testing.assert_close(reverse_cross_entropy(z, y, normalized=True), (y - p).abs())


@pytest.mark.parametrize("target", [0.05, 0.3, 0.5, 0.8])
def test_soft_cross_entropy_is_minimal_where_p_equals_target(target):
    z = torch.linspace(-6, 6, 4001, dtype=torch.float64)
    loss = cross_entropy(z, torch.full_like(z, target))
    best_p = torch.sigmoid(z[loss.argmin()]).item()
    assert best_p == pytest.approx(target, abs=2e-3)


def test_normalized_cross_entropy_at_half_does_not_depend_on_logit():
    z = torch.tensor(EXTREME_Z + Z_GRID.tolist(), dtype=torch.float64)
    loss = cross_entropy(z, torch.full_like(z, 0.5), normalized=True)
    torch.testing.assert_close(loss, torch.full_like(z, 0.5))


def test_normalized_cross_entropy_is_linear_in_the_target():
    # docs/design.md ("Facts"): NCE(y) = (1 - y) - (1 - 2y) a / (a + b), a = -log p, b = -log(1 - p).
    z, y = grid()
    a, b = -torch.nn.functional.logsigmoid(z), -torch.nn.functional.logsigmoid(-z)
    expected = (1 - y) - (1 - 2 * y) * a / (a + b)
    torch.testing.assert_close(cross_entropy(z, y, normalized=True), expected)


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=16),
    targets=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=16, max_size=16),
    normalized=st.booleans(),
)
def test_losses_are_finite_nonnegative_and_normalized_in_unit_interval(logits, targets, normalized):
    z = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(targets[: len(logits)])
    losses = {
        "ce": cross_entropy(z, y, normalized=normalized),
        "rce": reverse_cross_entropy(z, y, normalized=normalized),
        "mae": mae(z, y, normalized=normalized),
    }
    for name, loss in losses.items():
        assert loss.isfinite().all(), name
        assert (loss >= 0).all(), name
        if normalized:
            # float32 rounding of a / (a + b) may overshoot 1 by an ulp.
            assert (loss <= 1 + 1e-6).all(), name
    sum(loss.sum() for loss in losses.values()).backward()
    assert z.grad.isfinite().all()


# --- gradients and low precision ---------------------------------------------------------------


# Every loss as (logits, target, normalized) -> loss, for the tests that treat them alike.
LOSSES = {
    "cross_entropy": lambda z, y, normalized: cross_entropy(z, y, normalized=normalized),
    "reverse_cross_entropy": lambda z, y, normalized: reverse_cross_entropy(
        z, y, normalized=normalized
    ),
    "mae": lambda z, y, normalized: mae(z, y, normalized=normalized),
    "MaskLoss": lambda z, y, normalized: MaskLoss(1.0, 0.7, 0.5, 0.3, normalized=normalized)(z, y),
}


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_float64(name, normalized):
    generator = torch.Generator().manual_seed(0)
    z = (4 * torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    y = torch.rand(2, 3, 3, generator=generator, dtype=torch.float64)
    y[0, 0] = torch.tensor([0.0, 1.0, 0.5])
    assert torch.autograd.gradcheck(lambda logits: LOSSES[name](logits, y, normalized), (z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalized", [False, True])
def test_finite_values_and_gradients_at_extremes(dtype, normalized):
    z = torch.tensor(EXTREME_Z)[:, None].expand(-1, len(EXTREME_Y))
    y = torch.tensor(EXTREME_Y)[None, :].expand(len(EXTREME_Z), -1)
    z = z.to(dtype).contiguous().requires_grad_()
    losses = [loss(z, y, normalized) for loss in LOSSES.values()]
    for loss in losses:
        assert loss.dtype == torch.float32
        assert loss.isfinite().all()
    for loss in losses:
        (gradient,) = torch.autograd.grad(loss.sum(), z)
        assert gradient.isfinite().all()


def test_mask_loss_under_bfloat16_autocast_matches_float32():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, generator=generator)
    layer = torch.nn.Linear(16, 14 * 14)
    targets = torch.rand(8, 14, 14, generator=generator)
    targets[:2] = (targets[:2] > 0.5).float()
    mask_loss = MaskLoss(bce=1.0, sce=1.0, rce=1.0, mae=1.0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features).view(8, 14, 14)
        assert logits.dtype == torch.bfloat16
        loss = mask_loss(logits, targets)
    expected = mask_loss(layer(features).view(8, 14, 14), targets)

    assert loss.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: logits differ by ~0.4 %, the mean loss by less than 1 %.
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-3)
    loss.backward()
    assert all(parameter.grad.isfinite().all() for parameter in layer.parameters())


# --- MaskLoss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize(
    "weights",
    [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (2.0, 0.5, 1.5, 0.25)],
)
def test_mask_loss_is_the_weighted_sum_of_the_functions(weights, normalized):
    """Value and (analytic) gradient of MaskLoss equal autograd through the functions."""
    bce, sce, rce, mae_weight = weights
    generator = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(4, 7, 7, generator=generator, dtype=torch.float64)
    z[0, 0, :4] = torch.tensor([60.0, -60.0, 46.0, -1e4])  # beyond and near the clip at Pmin
    z.requires_grad_()
    y = torch.rand(4, 7, 7, generator=generator, dtype=torch.float64)
    hard = (y >= 0.3).double()
    expected = (
        bce * cross_entropy(z, hard, normalized=normalized)
        + sce * cross_entropy(z, y, normalized=normalized)
        + rce * reverse_cross_entropy(z, y, normalized=normalized)
        + mae_weight * mae(z, y, normalized=normalized)
    ).mean()
    mask_loss = MaskLoss(bce, sce, rce, mae_weight, normalized=normalized, hard_threshold=0.3)
    value = mask_loss(z, y)
    torch.testing.assert_close(value, expected)
    (gradient,) = torch.autograd.grad(value, z)
    (expected_gradient,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(gradient, expected_gradient)


def test_unnormalized_mask_loss_is_torchvision_bce_and_the_default_its_normalized_form():
    generator = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(3, 28, 28, generator=generator)
    y = (torch.rand(3, 28, 28, generator=generator) > 0.5).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    torch.testing.assert_close(MaskLoss(normalized=False)(z, y), expected)
    normalized = cross_entropy(z, y, normalized=True).mean()
    torch.testing.assert_close(MaskLoss()(z, y), normalized)


def test_mask_loss_without_rois_is_a_connected_zero():
    logits = torch.zeros(0, 28, 28, dtype=torch.bfloat16, requires_grad=True)
    loss = MaskLoss(bce=1.0, sce=1.0, rce=1.0)(logits, torch.zeros(0, 28, 28))
    assert loss.item() == 0.0
    assert loss.dtype == torch.float32
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad.shape == logits.shape


def test_mask_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        MaskLoss()(torch.zeros(2, 28, 28), torch.zeros(2, 14, 14))
    with pytest.raises(ValueError, match="rce"):
        MaskLoss(rce=-1.0)
    with pytest.raises(ValueError, match="at least one weight"):
        MaskLoss(bce=0.0)
    with pytest.raises(ValueError, match="p_min"):
        MaskLoss(p_min=0.0)


def test_mask_loss_repr_shows_the_terms_in_use():
    text = repr(MaskLoss(bce=2.0, sce=0.5, rce=1.0, normalized=False))
    for part in ("bce=2.0", "sce=0.5", "rce=1.0", "normalized=False", "p_min=1e-20"):
        assert part in text
    assert "mae" not in text and "dice" not in text


# --- presets -----------------------------------------------------------------------------------


def preset_files() -> list:
    folder = importlib.resources.files("bmlseg.conf") / "loss"
    return sorted((folder / f"{name}.yaml" for name in TABLE_I), key=lambda f: f.name)


def test_presets_are_the_rows_of_table_i_the_oracle_and_the_field_losses():
    folder = importlib.resources.files("bmlseg.conf") / "loss"
    names = {f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")}
    assert names == set(TABLE_I) | set(FIELD_PRESETS)


@pytest.mark.parametrize("path", preset_files(), ids=lambda f: f.name)
def test_preset_loads_builds_and_matches_table_i(path):
    preset = OmegaConf.to_container(OmegaConf.load(str(path)))
    assert preset["name"] == path.name.removesuffix(".yaml")
    _, bce, sce, rce, label_kind = TABLE_I[preset["name"]]
    assert preset["label_kind"] == label_kind
    # A preset lists what it changes; MaskLoss's defaults give the rest.
    mask_loss = MaskLoss(**{k: v for k, v in preset.items() if k not in ("name", "label_kind")})
    assert mask_loss.weights == {
        **dict.fromkeys(mask_loss.weights, 0.0),
        "bce": bce,
        "sce": sce,
        "rce": rce,
    }
    assert mask_loss.normalized is (rce > 0)
    assert (mask_loss.p_min, mask_loss.hard_threshold) == (P_MIN, 0.5)
    assert mask_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).isfinite()


@pytest.mark.slow
def test_compiled_fused_kernel_matches_the_eager_one():
    """MaskLoss(compiled=True) (torch.compile of the fused pass; tens of seconds to build on a
    CPU) gives the eager value and gradient, or falls back to eager with a warning."""
    generator = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(6, 14, 14, generator=generator)).requires_grad_()
    y = torch.rand(6, 14, 14, generator=generator)
    y[0] = (y[0] > 0.5).float()
    eager = MaskLoss(bce=1.0, sce=1.0, rce=1.0, mae=0.5)
    compiled = MaskLoss(bce=1.0, sce=1.0, rce=1.0, mae=0.5, compiled=True)
    (eager_grad,) = torch.autograd.grad(eager(z, y), z)
    value = compiled(z, y)
    (compiled_grad,) = torch.autograd.grad(value, z)
    torch.testing.assert_close(value, eager(z, y))
    torch.testing.assert_close(compiled_grad, eager_grad)
