"""Shared fixtures. Real data is found through ``AMAT_DATA_DIR`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


#: the hippocampus bundle shrunk to a network and a problem that a CPU test can afford
SEG_TINY = {
    "patch_size": [32, 24],
    "network_filters": [8, 16, 32],
    "network_kernels": [[3, 3], [3, 3], [3, 3]],
    "network_strides": [[1, 1], [2, 2], [2, 2]],
    "batch_size": 16,
    "attack_steps": 2,
    "train_slices": "foreground",
    "progress": False,
}


def data_root() -> Path:
    return Path(os.environ.get("AMAT_DATA_DIR") or PROJECT_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture
def amat_data_dir() -> Path:
    """The shared real-data folder; skips the test with the reason when it is absent."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set AMAT_DATA_DIR)")
    return root


@pytest.fixture
def hippocampus_dir() -> Path:
    """MSD Task04_Hippocampus in the shared data folder; skips the test with the reason when it is absent."""
    task = data_root() / "Task04_Hippocampus"
    if not (task / "dataset.json").is_file():
        pytest.skip(f"real data not found at {task} (set AMAT_DATA_DIR)")
    return task


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
