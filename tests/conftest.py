"""Shared fixtures. Real data is found through ``AMAT_DATA_DIR`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("AMAT_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture
def amat_data_dir() -> Path:
    """The shared real-data folder; skips the test with the reason when it is absent."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set AMAT_DATA_DIR)")
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
