from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _shared import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; the test is skipped cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
