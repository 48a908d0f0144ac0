"""Manifests: what produced a result table (versions, git commit, model, dtype, parameters, wall time).

A manifest also records each table it describes (``files``: its rows, bytes and SHA-256), so a table that was cut
off or changed after it was written is caught when it is read (:func:`check_file`) and rebuilt or reported, never
used as if it were whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import subprocess
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from .errors import MapsError
from .io import atomic_write_text

log = logging.getLogger(__name__)
_PACKAGES = ("torch", "transformers", "numpy", "pandas", "scipy", "gguf", "openai", "llama-cpp-python", "lemminflect",
             "maps-study")


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


def call_arguments(arguments: dict, skip: tuple[str, ...] = ("loaded", "static", "describer", "res"),
                   recorded_as: dict[str, str] | None = None) -> dict:
    """An entry point's arguments (``locals()`` as its first statement) as its manifest records them, so no
    parameter is listed by hand and none can be left out: dataclasses by ``asdict`` (:class:`RunOptions` by its
    ``manifest()``), relations by name, paths as strings, lists and dicts element-wise; ``skip`` names the
    model and result objects (the manifest records the model separately). ``recorded_as`` maps a renamed argument
    to the name manifests have always recorded it under (``{"representation": "variant"}``), in its place, so a
    manifest does not change with the spelling of an argument."""
    names = recorded_as or {}
    return {names.get(name, name): _plain(value) for name, value in arguments.items() if name not in skip}


def _plain(value):
    if callable(getattr(value, "manifest", None)) and is_dataclass(value) and not isinstance(value, type):
        return value.manifest()
    if is_dataclass(value) and not isinstance(value, type):
        return value.name if hasattr(value, "pairs") else asdict(value)  # a Relation by its name
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class DerivedFileError(MapsError):
    """A table no longer matches the record written beside it (cut off, or changed by hand)."""


def file_record(path: str | Path) -> dict:
    """What a written table is: its rows (lines after the header), bytes and SHA-256."""
    data = Path(path).read_bytes()
    return {"rows": max(data.count(b"\n") - 1, 0), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(path: str | Path, manifest: dict, files: list[str | Path] = ()) -> Path:
    """Write ``manifest`` as pretty JSON, atomically, with the record of each of ``files`` (tables just written in
    the same folder) under ``files``."""
    if files:
        manifest = {**manifest, "files": {**manifest.get("files", {}),
                                          **{Path(f).name: file_record(f) for f in files}}}
    return atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(path: str | Path) -> dict | None:
    """A manifest as a dict; None (with a one-line notice) when it is missing, cut off or not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        log.warning("%s could not be read (%s); it will be written again", path, type(err).__name__)
        return None
    if not isinstance(data, dict):
        log.warning("%s is not a manifest (a JSON %s); it will be written again", path, type(data).__name__)
        return None
    return data


def recorded(path: str | Path) -> tuple[Path, dict] | None:
    """The manifest beside ``path`` that records it, and its record (None: no manifest records it); the newest such
    manifest, should two writers have recorded the same table."""
    path = Path(path)
    mans = []
    for man in path.parent.glob("*manifest.json"):
        with contextlib.suppress(OSError):
            mans.append((man.stat().st_mtime_ns, man.name, man))
    for *_, man in sorted(mans, reverse=True):
        with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
            record = (json.loads(man.read_text(encoding="utf-8")).get("files") or {}).get(path.name)
            if isinstance(record, dict):
                return man, record
    return None


def check_file(path: str | Path) -> str | None:
    """Why ``path`` does not match its recorded rows and SHA-256 (None: it matches, or nothing records it)."""
    found = recorded(path)
    if found is None:
        return None
    now = file_record(path)
    if now["sha256"] == found[1].get("sha256"):
        return None
    return (f"{found[1].get('rows')} rows and {found[1].get('bytes')} bytes were written, {now['rows']} rows and "
            f"{now['bytes']} bytes are there")


def verified(path: str | Path, rebuild: str) -> Path:
    """``path`` when it matches its record; else the one-sentence :class:`DerivedFileError` naming ``rebuild``."""
    why = check_file(path)
    if why is not None:
        raise DerivedFileError(f"{path} was cut off or changed after it was written ({why}); {rebuild} to write it "
                               "again.")
    return Path(path)
