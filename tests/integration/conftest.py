"""End-to-end runs: `make`, papermill notebooks, the `maps` command and process lifecycles. Every test here is marked
``slow``; ``pytest -m "not slow"`` is the quick loop, ``make test`` runs everything."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)
