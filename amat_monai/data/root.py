"""Where the real data sets live: ``$AMAT_DATA_DIR``, by default ``../shared/data`` next to the project."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root"]


def data_root() -> Path:
    """``$AMAT_DATA_DIR``, or ``../shared/data`` next to the project folder when it is unset."""
    return Path(os.environ.get("AMAT_DATA_DIR") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
