"""Manifests: what produced a result table (versions, git commit, model, dtype, parameters, wall time)."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from .io import atomic_write_text

_PACKAGES = ("torch", "transformers", "numpy", "pandas", "scipy", "gguf", "openai", "maps-study")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD commit of the repository holding this package (with ``-dirty`` when it has local changes)."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_manifest(*, parameters: dict, wall_seconds: float, model: dict | None = None) -> dict:
    """A JSON-able manifest; ``model`` is typically ``LoadedModel.manifest()``."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "versions": {pkg: _version(pkg) for pkg in _PACKAGES},
        "model": model,
        "parameters": parameters,
        "wall_seconds": round(wall_seconds, 3),
    }


def write_manifest(path: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` as pretty JSON, atomically."""
    return atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
