"""The results store: one slot per item (a relation, a task), keyed by the content of its inputs.

Static, dynamic and ablation results are cached the same way. A :class:`Slots` folder holds ``<name>.pt`` files,
each ``{"key": ..., "value": ...}``; ``key`` is :func:`~maps_utils.core.hashing.content_key` of everything that changes
the value (the model's weights hash among it). A slot is used only when its key matches, so a changed input is
recomputed and an unchanged one reused; a query for a few items reads what a larger run stored and writes only
what it adds. Writes are atomic; a slot that cannot be read (a truncated or corrupt file) is removed with a
one-line notice and recomputed. :meth:`Slots.lock` serialises writers that update a shared table.

:class:`RunOptions` is how a step runs and where it keeps its results; every engine entry point takes one, and
:meth:`RunOptions.folder` is the one place a result folder's path is made (``<results_dir>/<model-slug>/...``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .errors import MapsError, OptionError
from .io import atomic_write_bytes, atomic_write_text, check_writable, file_in_the_way, file_lock
from .manifest import verified, write_manifest
from .params import check_parameters

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 600.0  # seconds a writer waits for another writer of the same folder
_UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
               AttributeError, TypeError, OSError)


class StoreBusyError(MapsError):
    """Another run held a results folder's lock for longer than the timeout."""


def model_slug(name: str) -> str:
    """A file-system-safe name for a model id (``EleutherAI/pythia-6.9b`` -> ``EleutherAI__pythia-6.9b``)."""
    return str(name).replace("/", "__").replace("\\", "__")


@dataclass(frozen=True)
class RunOptions:
    """How a step runs and where its results go: what travels together through the static, dynamic, ablation,
    description and detection entry points.

    Attributes:
        results_dir: where slots, tables and manifests go (``<results_dir>/<model-slug>/...``); None: no files.
        use_cache: False recomputes every item (and still stores the results).
        progress: show progress bars.
        seed: seeds every random choice (pair subsets, head samples, random heads, control order, negatives).
        batch_size: prompts per forward pass; None: the step's own default (64 dynamic, 512 ablation).
        memory_budget_mb: working memory of the rank engine (speed only; results are identical).
    """

    results_dir: str | Path | None = "results"
    use_cache: bool = True
    progress: bool = True
    seed: int = 0
    batch_size: int | None = None
    memory_budget_mb: float = 512.0

    def __post_init__(self):
        check_parameters(seed=self.seed, batch_size=self.batch_size, memory_budget_mb=self.memory_budget_mb)

    def folder(self, model: str, *parts: str, writable: bool = True) -> Path | None:
        """``<results_dir>/<model-slug>/<parts...>`` (:func:`result_folder`); None when this run keeps no files.
        With ``writable`` (a step that always writes its tables) the results folder must be writable (checked once
        per process), so the step fails before it computes, not after."""
        if not self.results_dir:
            return None
        return result_folder(check_results_dir(self.results_dir, writable=writable), model, *parts)

    def batch(self, default: int) -> int:
        """The batch size: this run's, else the step's ``default``."""
        return default if self.batch_size is None else self.batch_size

    def manifest(self) -> dict:
        """The options as a manifest records them (the results folder as a string)."""
        out = asdict(self)
        out["results_dir"] = None if self.results_dir is None else str(self.results_dir)
        return out


def result_folder(results_dir: str | Path, model: str, *parts: str) -> Path:
    """Where a model's results go: ``<results_dir>/<model-slug>/<parts...>`` (the folder checked, see
    :func:`check_results_dir`). Every result path is made here."""
    return check_results_dir(results_dir).joinpath(model_slug(model), *parts)


_WRITABLE: set[Path] = set()  # results folders this process has written in


def check_results_dir(path: str | Path, writable: bool = False) -> Path:
    """``path`` as a results folder; a path that cannot be one is one sentence. With ``writable`` the folder is
    created and a file written in it (once per process), so a read-only or full place fails before any work."""
    path = Path(path).expanduser()
    if (p := file_in_the_way(path)) is not None:
        raise OptionError(f"The results folder {path} cannot be created: {p} is a file; pass a folder "
                          "(--results-dir / results_dir).")
    if writable and path.resolve() not in _WRITABLE:
        check_writable(path)
        _WRITABLE.add(path.resolve())
    return path


def read_pt(path: Path, *, weights_only: bool = True):
    """``torch.load`` of a result file; None (and the file removed, with a one-line notice) when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=weights_only)
    except _UNREADABLE as err:
        log.warning("%s could not be read (%s); removing it, it will be recomputed", path, type(err).__name__)
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def write_pt(path: Path, obj) -> Path:
    """``torch.save`` atomically (a kill mid-write leaves the old file or none, never half of one). The object is
    serialised in memory first, so a full disk is the OS's error (with the size needed), not the serialiser's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


class Slots:
    """Keyed result slots in one folder (None: nothing is stored, every read misses)."""

    def __init__(self, folder: str | Path | None, *, enabled: bool = True, weights_only: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.enabled = enabled and self.folder is not None
        self.weights_only = weights_only

    def path(self, name: str) -> Path | None:
        return self.folder / f"{name}.pt" if self.folder is not None else None

    def read(self, name: str, key: str):
        """The slot's value when it was stored under ``key``, else None."""
        if not self.enabled:
            return None
        saved = read_pt(self.path(name), weights_only=self.weights_only)
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        return saved.get("value")

    def write(self, name: str, key: str, value) -> None:
        if self.folder is not None:
            write_pt(self.path(name), {"key": key, "value": value})

    def entries(self) -> Iterator[tuple[str, dict]]:
        """Every readable slot, as ``(name, {"key", "value"})``, in name order."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.pt")):
            saved = read_pt(path, weights_only=self.weights_only)
            if isinstance(saved, dict) and "key" in saved:
                yield path.stem, saved

    def remove(self, name: str) -> None:
        if self.folder is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT):
        """Hold the folder's lock (``<folder>/.lock``): writers of a shared table take turns."""
        if self.folder is None:
            yield
            return
        busy = StoreBusyError(f"Another run has been writing {self.folder} for over {timeout:.0f} s; wait for it to "
                              "finish (or stop it) and run again.")
        with file_lock(self.folder / ".lock", timeout, busy):
            yield


REBUILD = "run again the step that wrote it (`make all`, or its notebook)"


def read_table(path: str | Path, rebuild: str = REBUILD, **kwargs) -> pd.DataFrame:
    """A CSV table this package wrote, checked against the record its manifest keeps (a cut-off or edited table is
    one sentence naming ``rebuild``, see :func:`~maps_utils.core.manifest.verified`). Only ``"\\n"`` ends a row: a token
    holding a bare carriage return is written unquoted by Python's csv module, and pandas' default reader would
    split its row there."""
    return pd.read_csv(verified(path, rebuild), lineterminator="\n", **kwargs)


def write_table(table: pd.DataFrame, path: str | Path, manifest: dict) -> Path:
    """Write a result table as CSV with its manifest beside it (``<name>.manifest.json``, which records the table's
    rows and hash), both atomically."""
    path = Path(path)
    atomic_write_text(path, table.to_csv(index=False))
    write_manifest(path.with_suffix(".manifest.json"), manifest, files=[path])
    return path
