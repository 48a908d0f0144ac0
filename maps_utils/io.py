"""Atomic file and directory writes, so an interrupted run never leaves half a result.

Every write goes to a temporary ``.<name>.partial-<pid>-<random>`` beside its target and becomes the target in one
rename. A run that is killed leaves its partial behind; the next write into the same folder removes the partials
whose process is gone (:func:`clean_partials`), so they never pile up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[^.]*$")
STALE_SECONDS = 24 * 3600  # a partial without a process id (older layout) counts as stale after a day


def is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(folder: str | Path) -> list[str]:
    """Remove the ``.partial-`` / ``.old-`` leftovers in ``folder`` whose writing process is gone; returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _PARTIAL.match(entry.name)
            if m is None:
                continue
            pid = m.group("pid")
            if pid is not None and is_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if pid is None and time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_SECONDS:
                    continue
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
                removed.append(entry.name)
    if removed:
        log.info("removed %d leftover partial write(s) in %s", len(removed), folder)
    return removed


def _prefix(target: Path, kind: str = "partial") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: Path, target: Path) -> None:
    """Make ``tmp`` the directory ``target``, removing the old one, with no moment at which ``target`` is missing
    (where the platform can exchange two paths; elsewhere a crash between two renames leaves the old one as a
    ``.old-`` leftover)."""
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
    os.replace(target, old / "x")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds.

    The temporary directory sits beside ``target`` (same filesystem) and is renamed in one step.
    If ``target`` exists: with ``replace`` the old one is exchanged for the new one in one step and deleted;
    without it (a cache entry another process just wrote) the existing one wins and ours is discarded. On any
    exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            _swap_in(tmp, target)
            return
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb"):
    """Yield a file object whose contents become ``path`` (flushed to disk, then renamed) only if the block
    succeeds; on any exception ``path`` is untouched and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it the file
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return Path(path)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float, busy: Exception):
    """Hold the lock file ``path`` (``filelock``), so writers of one result take turns; ``busy`` (a one-sentence
    error) is raised when another process holds it for longer than ``timeout`` seconds."""
    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise busy from None
    try:
        yield
    finally:
        lock.release()
