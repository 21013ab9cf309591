"""Small pieces of the training loop that need no training run."""

import math

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bmlseg.config import TrainConfig, register_configs
from bmlseg.engine.train import label_method_for, learning_rate


def settings(**overrides):
    return OmegaConf.structured(
        TrainConfig(
            **{"lr": 1.0, "steps": 10, "warmup_steps": 2, "lr_schedule": "constant", **overrides}
        )
    )


def test_warm_up_then_constant():
    rates = [learning_rate(step, settings()) for step in range(1, 11)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2:] == [1.0] * 8


def test_warm_up_then_cosine_to_zero():
    rates = [learning_rate(step, settings(lr_schedule="cosine")) for step in range(1, 11)]
    assert rates[:2] == [0.5, 1.0]
    # Steps 3..10 are 8 steps of the decay: step 3 at progress 1/9, step 10 at 8/9.
    assert rates[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(8 * math.pi / 9)))
    assert all(later < earlier for earlier, later in zip(rates[1:-1], rates[2:], strict=True))
    assert 0 < rates[-1] < 0.05


@pytest.mark.parametrize(
    ("loss", "method"),
    [
        ("apl_soft_bce", "kimriss"),
        ("baseline_bce", "kimriss_hard"),
        ("truth_bce", "truth"),
        ("boxinst", "binary_any"),
    ],
)
def test_each_label_kind_trains_on_its_labels(loss, method):
    register_configs()
    with initialize_config_module("bmlseg.conf", version_base=None):
        cfg = compose("train", overrides=[f"loss={loss}"])
    assert label_method_for(cfg) == method
