"""Where the real data of the tests lives (``../shared/data``, never copied into the repo).

Imported by tests/conftest.py and by test modules (``from _shared import shared_file``);
``pythonpath = ["tests"]`` in pyproject.toml makes it importable whatever the order in which
pytest collects the directories (two ``conftest`` modules cannot both be imported by name).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout and may not be copied into the repository.
SHARED_DATA = Path(os.environ.get("MICRORESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))
# the engine's data loaders read the same folder, wherever the package is installed
os.environ.setdefault("MICRORESTORE_SHARED_DATA", str(SHARED_DATA))


def shared_file(relpath: str) -> Path:
    """Path of one file under ../shared/data, skipping the test when it is absent."""
    p = SHARED_DATA / relpath
    if not p.exists():
        pytest.skip(f"real data file not available: {p}")
    return p
