"""Content hashes: of files (cached by path, size and mtime, so an unchanged file is hashed once), of the
weights a model was loaded from, and of the inputs of a result (the key its cache entry is stored under).

Every result cache keys its entries by :func:`content_key` of everything that changes the result, the weights'
SHA-256 included, so a checkpoint whose weights change at the same path is recomputed, never read stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import MapsError
from .io import atomic_file, atomic_write_text, check_writable, file_lock
from .paths import default_cache_dir

log = logging.getLogger(__name__)

_INDEX = "sha256-index.json"  # in the cache directory: {path: [size, mtime_ns, inode, sha256]}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_CONFIGS = ("config.json", "generation_config.json")  # the architecture is part of what the weights compute


def content_key(obj: object, length: int = 20) -> str:
    """A short SHA-256 of ``obj`` as canonical JSON (keys sorted); the key a result is cached under."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


INDEX_LOCK_SECONDS = 60.0  # a writer of the hash index waits this long for another


def _index_path(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / _INDEX


def _read_index(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}  # missing or corrupt: it is only a cache of hashes, rebuilt as files are hashed


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _update_index(index_path: Path, path: Path, entry: list | None) -> None:
    """Add (or drop) one entry; processes hashing at once take turns, so none loses another's entries."""
    lock = index_path.with_name(index_path.name + ".lock")
    with contextlib.suppress(MapsError, OSError), file_lock(lock, INDEX_LOCK_SECONDS, MapsError("busy")):
        index = _read_index(index_path)  # re-read under the lock: another process may have added entries
        if entry is None:
            index.pop(str(path), None)
        else:
            index[str(path)] = entry
        atomic_write_text(index_path, json.dumps(index, indent=0))  # a read-only or busy cache only costs speed


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """SHA-256 of a file. The result is remembered (under the cache directory) with the file's size, mtime and
    inode, so an unchanged file is not read again and a rewritten one always is."""
    path = Path(path).resolve()
    stamp = _stamp(path.stat())
    index_path = _index_path(cache_dir)
    hit = _read_index(index_path).get(str(path))
    if isinstance(hit, list) and len(hit) == 4 and hit[:3] == stamp:
        return hit[3]
    sha = hash_file(path)
    _update_index(index_path, path, [*stamp, sha])
    return sha


def remember(path: str | Path, sha256: str, cache_dir: str | Path | None = None) -> None:
    """Record the hash of a file just written (and hashed while writing), so it is not read again."""
    path = Path(path).resolve()
    _update_index(_index_path(cache_dir), path, [*_stamp(path.stat()), sha256])


def weight_files(folder: str | Path) -> list[Path]:
    """The files of a checkpoint folder that determine what it computes: weights and configs, sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_CONFIGS))


def files_sha256(files: Iterable[str | Path], cache_dir: str | Path | None = None) -> str:
    """One SHA-256 over several files (their names and contents), e.g. a checkpoint's shards and config."""
    lines = [f"{Path(f).name} {file_sha256(f, cache_dir)}" for f in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def tensors_sha256(tensors: Iterable[tuple[str, object]]) -> str:
    """SHA-256 of named tensors' bytes, for weights that came from no file this module can find."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def assemble(parts: list[Path], target: Path, sha256: str, *, what: str, fix: str, error=None) -> Path:
    """Concatenate ``parts`` into ``target`` atomically, unless ``target`` already has ``sha256``.

    A missing, partial or corrupt ``target`` (a killed earlier assembly) is rebuilt with a one-line notice. Parts
    that do not assemble to ``sha256`` raise ``error`` (a :class:`~maps_utils.core.errors.MapsError` subclass) with
    ``fix`` in its sentence.
    """
    error = error or MapsError
    if target.is_file():
        if file_sha256(target) == sha256:
            return target
        log.warning("%s at %s is incomplete or corrupt; rebuilding it", what, target)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise error(f"{what} is missing {len(missing)} of its {len(parts)} parts ({missing[0]} …); {fix}.")
    log.info("assembling %s from %d parts into %s (one-off)", what, len(parts), target)
    check_writable(target.parent)
    h = hashlib.sha256()
    with atomic_file(target, needed=sum(p.stat().st_size for p in parts)) as out:
        for part in parts:
            with part.open("rb") as src:
                for block in iter(lambda s=src: s.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
        if h.hexdigest() != sha256:
            raise error(f"The parts of {what} assemble to a file with the wrong SHA-256; {fix}.")
    remember(target, sha256)
    return target
