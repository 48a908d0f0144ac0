"""Fault injection (issue 35): every writer on a real full disk (ENOSPC) and a real read-only file system (EROFS).

Each case mounts a small tmpfs of its own (the tests run as root, as CI does), writes a good file, then makes the
disk full or read-only and writes again. Every writer must say what happened in one sentence
(:class:`~maps_utils.core.io.StorageError`), leave no partial file, and keep the previous good file as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from maps_utils.core import hashing
from maps_utils.core.io import StorageError, check_writable
from maps_utils.core.manifest import write_manifest
from maps_utils.core.store import Slots, write_table
from maps_utils.human.annotations import AnnotationStore
from maps_utils.report.run_manifest import record_step

from ..conftest import relation_file, tiny_checkpoint


@dataclass
class SmallDisk:
    """A tmpfs mounted for one test: ``fill`` leaves about ``leave`` bytes free, ``readonly`` remounts it."""

    path: Path

    def fill(self, leave: int = 0) -> None:
        filler = self.path / "filler"
        block = b"\0" * 4096
        with filler.open("wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
        os.truncate(filler, max(filler.stat().st_size - leave, 0))

    def readonly(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:  # the tests need root (CI runs as root); never skip silently
        pytest.fail(f"cannot mount a tmpfs for the fault-injection tests: {done.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _parts(folder: Path, size: int) -> tuple[list[Path], str]:
    folder.mkdir(parents=True, exist_ok=True)
    blob = bytes(range(256)) * (size // 256)
    parts = [folder / "a.bin", folder / "b.bin"]
    parts[0].write_bytes(blob[: size // 2])
    parts[1].write_bytes(blob[size // 2:])
    return parts, hashlib.sha256(blob).hexdigest()


def _annotate(path: Path, size: int) -> None:
    AnnotationStore(path).answer("item-001", pattern_observable="yes", comment="x" * size)


def _respond(path: Path, size: int) -> None:
    from maps_utils.describe.response_cache import ResponseCache

    ResponseCache(path).append({"key": f"k{size}", "text": "z" * size})


def _figure(folder: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from maps_utils.report.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot(np.random.default_rng(size).normal(size=size // 20))  # the SVG grows with the points
    save_figure(fig, folder, "m", "fig")
    plt.close(fig)


def _assemble(target: Path, size: int, scratch: Path) -> None:
    parts, sha = _parts(scratch / f"parts{size}", size)
    hashing.assemble(parts, target, sha, what="the test GGUF", fix="reinstall it")


# writer name -> (write(folder, size, scratch), the file it writes under folder)
WRITERS: dict[str, tuple[Callable, str]] = {
    "store slot": (lambda d, n, s: Slots(d).write("rel", "key", {"x": torch.ones(n // 4)}), "rel.pt"),
    "table": (lambda d, n, s: write_table(pd.DataFrame({"v": ["x" * 50] * (n // 50)}), d / "scores.csv",
                                          {"m": 1}), "scores.csv"),
    "manifest": (lambda d, n, s: write_manifest(d / "manifest.json", {"blob": "y" * n}), "manifest.json"),
    "run manifest": (lambda d, n, s: record_step(d, "m", "s" * n, 1.0), "m/manifest.json"),
    "annotation save": (lambda d, n, s: _annotate(d / "alice.csv", n), "alice.csv"),
    "assembled GGUF": (lambda d, n, s: _assemble(d / "model.gguf", n, s), "model.gguf"),
    "figure": (lambda d, n, s: _figure(d, n), "m/fig.svg"),
    "describer response cache": (lambda d, n, s: _respond(d / "cache.jsonl", n), "cache.jsonl"),
}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial-" in p.name]


def _one_sentence(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Errno" not in text and text.endswith("."), text
    return text


# fault -> (make the disk faulty, the size of the second write, what its sentence says)
FAULTS = {
    "full": (lambda disk: disk.fill(leave=8_192), 600_000, ("is full", "needs", "is free", "kept")),
    "read-only": (lambda disk: disk.readonly(), 3_000, ("read-only (EROFS)", "writable folder")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_faulty_disk_is_one_sentence_and_keeps_the_good_file(writer, fault, disk, tmp_path):
    write, name = WRITERS[writer]
    make_faulty, size, says = FAULTS[fault]
    folder = disk.path / "out"
    write(folder, 2_000, tmp_path)
    good = (folder / name).read_bytes()
    make_faulty(disk)
    with pytest.raises(StorageError) as caught:
        write(folder, size, tmp_path)
    text = _one_sentence(caught.value)
    assert all(s in text for s in says), text
    assert (folder / name).read_bytes() == good
    assert _leftovers(disk.path) == []


def test_check_writable_names_each_fault(disk, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="afile is a file where a folder is needed"):
        check_writable(tmp_path / "afile" / "results")
    assert check_writable(disk.path / "ok") == disk.path / "ok"
    disk.fill()
    with pytest.raises(StorageError, match="is full"):
        check_writable(disk.path / "ok")
    disk.readonly()
    with pytest.raises(StorageError, match="read-only"):
        check_writable(disk.path / "new")


# ---- converted weights: a real GGUF conversion into a full or read-only cache ---------------------------
@pytest.mark.embedded
def test_converted_weights_on_a_full_disk_leave_nothing_behind(disk, model_cache):
    from maps_utils.models import weights as W

    gguf = W.smollm2_gguf(model_cache)
    target = disk.path / "converted" / "smollm2"
    with pytest.raises(StorageError) as caught:
        W.convert_gguf(gguf, target)
    text = _one_sentence(caught.value)
    assert "is full" in text and "MB" in text, text
    assert not target.exists() and _leftovers(disk.path) == []


@pytest.mark.embedded
def test_a_read_only_cache_fails_before_the_conversion(disk, model_cache, monkeypatch):
    from maps_utils.models import weights as W

    gguf = W.smollm2_gguf(model_cache)
    monkeypatch.setattr(W, "convert_gguf", lambda *a: pytest.fail("converted although the cache is read-only"))
    disk.readonly()
    with pytest.raises(StorageError, match="read-only .*MAPS_CACHE_DIR"):
        W.ensure_converted(gguf, disk.path)


# ---- the CLI on a read-only or full results folder: fails before computing, or keeps what it wrote -------
def _no_compute(monkeypatch):
    from maps_utils.static import scores as SC

    monkeypatch.setattr(SC, "target_ranks", lambda *a, **k: pytest.fail("computed although nothing can be written"))


def test_a_read_only_results_folder_fails_before_computing(disk, tmp_path, monkeypatch, capsys):
    from maps_utils.cli import main

    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, rel = tiny_checkpoint(tmp_path / "ckpt"), relation_file(tmp_path, "r", 3)
    disk.readonly()
    _no_compute(monkeypatch)
    capsys.readouterr()
    assert main(["score", str(ckpt), "--relation", str(rel), "--results-dir", str(disk.path / "R")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar, before any ranks
    assert err == (f"error: {disk.path / 'R'} is read-only (EROFS), so nothing can be written there; pass a writable "
                   "folder (--results-dir / results_dir, or MAPS_CACHE_DIR for the model cache) and run again; "
                   "nothing already written was changed.")


def test_a_full_results_disk_is_one_sentence_and_keeps_earlier_results(disk, tmp_path, monkeypatch, capsys):
    from maps_utils.cli import main

    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, first, second = tiny_checkpoint(tmp_path / "ckpt"), relation_file(tmp_path, "a", 3), relation_file(tmp_path, "b", 5, n=400)
    assert main(["score", str(ckpt), "--relation", str(first), "--results-dir", str(disk.path / "R")]) == 0
    kept = {p: p.read_bytes() for p in (disk.path / "R").rglob("*") if p.is_file() and p.name != ".lock"}
    disk.fill(leave=4096)
    capsys.readouterr()
    assert main(["score", str(ckpt), "--relation", str(second), "--results-dir", str(disk.path / "R")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: The disk holding ") and "is full: writing b.pt needs" in err and "\n" not in err
    assert {p: p.read_bytes() for p in kept} == kept and _leftovers(disk.path) == []


def test_stored_results_are_read_from_a_read_only_folder(disk, tmp_path, monkeypatch, capsys, caplog):
    from maps_utils.cli import main

    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, rel = tiny_checkpoint(tmp_path / "ckpt"), relation_file(tmp_path, "r", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(disk.path / "R")]
    assert main(args) == 0
    first = capsys.readouterr().out
    table = next((disk.path / "R").rglob("scores.csv"))
    os.truncate(table, table.stat().st_size // 2)
    disk.readonly()
    _no_compute(monkeypatch)
    assert main(args) == 0  # the scores come from the stored ranks, whole; the cut table cannot be mended here
    assert capsys.readouterr().out.split("\n\n")[0] == first.split("\n\n")[0]
    assert "scores.csv could not be rebuilt" in caplog.text and "read-only" in caplog.text
