"""The file-hash index (maps_utils.core.hashing): a cache of SHA-256 per file, shared by processes."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from maps_utils.core import hashing as HS


def _hash_all(files: list[str], cache: str) -> None:
    for f in files:
        HS.file_sha256(f, cache_dir=cache)


def test_processes_hashing_at_once_lose_no_entry_of_the_index(tmp_path):
    """Four processes each hash their own 25 files at the same time: the index ends with all 100 (each update
    re-reads and rewrites the index under its lock)."""
    files = []
    for i in range(100):
        path = tmp_path / "files" / f"f{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i % 256]) * 1000)
        files.append(str(path))
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hash_all, args=(files[k::4], str(cache))) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    index = json.loads(HS._index_path(cache).read_text())
    assert sorted(index) == sorted(files)
    assert index[files[3]][-1] == HS.hash_file(Path(files[3]))
