from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout and may not be copied into the repository.
SHARED_DATA = Path(os.environ.get("MICRORESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))
# the engine's data loaders read the same folder, wherever the package is installed
os.environ.setdefault("MICRORESTORE_SHARED_DATA", str(SHARED_DATA))


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; the test is skipped cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def shared_file(relpath: str) -> Path:
    """Path of one file under ../shared/data, skipping the test when it is absent."""
    p = SHARED_DATA / relpath
    if not p.exists():
        pytest.skip(f"real data file not available: {p}")
    return p


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
