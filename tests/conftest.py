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
