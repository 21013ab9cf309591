"""Shared fixtures: small synthetic dataset folders, generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bmlseg.data.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 subjects (6 scans), preset small, paper reader noise, seed 0. Treat as read-only."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_subjects=3, seed=0, preset="small", noise="paper")
    return root


@pytest.fixture(scope="session")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 subjects (4 scans), preset small, perfect readers, seed 0. Treat as read-only."""
    root = tmp_path_factory.mktemp("synthetic_clean")
    generate(root, n_subjects=2, seed=0, preset="small", noise="clean")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained IMaskRCNN (imaskrcnn_r18_narrow, 64-pixel crops) saved as bmlseg-train saves
    its checkpoints, with a recorded score threshold of 0.05: prediction runs without training.
    Treat as read-only."""
    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from bmlseg.config import register_configs
    from bmlseg.data.format import read_dataset_json
    from bmlseg.engine.checkpoint import save
    from bmlseg.models import build_model

    register_configs()
    overrides = ["train=smoke", "data.crop_size=64", "model=imaskrcnn_r18_narrow"]
    with initialize_config_module("bmlseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"data.root={synthetic_root}"])
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(0)
    model = build_model(config["model"], config["loss"], 2, pretrained=False)
    state = {
        "step": 0,
        "model": model.state_dict(),
        "optimizer": {},
        "scaler": {},
        "best": {"metric": "dice", "value": 0.0, "step": 0, "score_threshold": 0.05},
        "rng": [],
        "config": config,
        "num_classes": 2,
        "label_method": config["labels"]["method"],
        "bone_names": read_dataset_json(synthetic_root).bones,
    }
    return save(tmp_path_factory.mktemp("checkpoint") / "best.pt", state)
