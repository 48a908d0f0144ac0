"""Where the study keeps what it downloads or builds outside the results folder: the model cache."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MAPS_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$MAPS_CACHE_DIR`` if set, else ``~/.cache/maps-study``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "maps-study"
