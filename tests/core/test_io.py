"""Atomic storage: partial files of dead writers are cleaned, live ones kept; a replaced folder is never missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from maps_utils.core.io import atomic_dir

ROOT = Path(__file__).resolve().parents[2]


def test_partials_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    from maps_utils.core.io import clean_partials
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".scores.csv.partial-{dead.pid}-abc").write_text("half")
    (tmp_path / f".entry.partial-{dead.pid}-xyz").mkdir()
    live = tmp_path / f".other.csv.partial-{os.getpid()}-def"
    live.write_text("being written")
    assert sorted(clean_partials(tmp_path)) == sorted([f".scores.csv.partial-{dead.pid}-abc",
                                                        f".entry.partial-{dead.pid}-xyz"])
    assert live.exists()


def test_replacing_a_directory_never_leaves_it_missing(tmp_path, monkeypatch):
    from maps_utils.core import io

    target = tmp_path / "entry"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    renames = []
    real = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2" and renames == []  # one exchange, no window without `entry`
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
