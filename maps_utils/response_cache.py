"""The describer's response cache: an append-only JSONL of answers keyed by (model, prompt, generation parameters),
so reruns are free, offline and identical."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

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
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            with open(self.path, "a", encoding="ascii") as f:  # ASCII JSON: no character can split a line
                f.write(("\n" if needs_newline else "") + json.dumps(entry, ensure_ascii=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.entries[entry["key"]] = entry


def cache_key(model_id: str, prompt: str, params: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model_id, "prompt": prompt, "params": params},
                                     sort_keys=True).encode()).hexdigest()


