"""The describer's response cache: an append-only JSONL of answers keyed by (model, prompt, generation parameters),
so reruns are free, offline and identical."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from ..core.io import storage_errors

log = logging.getLogger(__name__)


class ResponseCache:
    """Append-only JSONL of answers, one object per line, keyed by ``key``.

    A line cut short by an interrupted run is ignored on reading (and a newline is written before the next
    append), so nothing already written is lost.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.bad_lines = 0
        self._lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_bytes().split(b"\n"):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line.decode("utf-8"))
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    self.bad_lines += 1

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: dict) -> None:
        """Append one answer. A full disk or a read-only folder is one sentence (:class:`~maps_utils.core.io.StorageError`)
        and the file is cut back to what it held (a line cut by a kill is skipped on reading)."""
        line = json.dumps(entry, ensure_ascii=True) + "\n"  # ASCII JSON: no character can split a line
        with self._lock, storage_errors(self.path, needed=len(line)):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            size = self.path.stat().st_size if self.path.is_file() else 0
            needs_newline = False
            if size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            try:
                with open(self.path, "a", encoding="ascii") as f:
                    f.write(("\n" if needs_newline else "") + line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
                raise
            self.entries[entry["key"]] = entry


def cache_key(model_id: str, prompt: str, params: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model_id, "prompt": prompt, "params": params},
                                     sort_keys=True).encode()).hexdigest()


