"""Atomic file and directory writes, so an interrupted run never leaves half a result.

Every write goes to a temporary ``.<name>.partial-<pid>-<random>`` beside its target and becomes the target in one
rename. A run that is killed leaves its partial behind; the next write into the same folder removes the partials
whose process is gone (:func:`clean_partials`), so they never pile up.

A write that fails because the disk is full or the folder is read-only raises :class:`StorageError`: one sentence
that says which, how much was needed, and that the file already there is unchanged (the rename never happened).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import MapsError

log = logging.getLogger(__name__)

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[^.]*$")
STALE_SECONDS = 24 * 3600  # a partial without a process id (older layout) counts as stale after a day


class StorageError(MapsError, OSError):
    """A result, cache or weights file could not be written: the disk is full, or the folder is read-only or not
    writable. Nothing already written was changed. (An ``OSError`` too, so code that tolerates a failed optional
    write, such as the hash index, still does.)"""

    def __str__(self) -> str:
        return str(self.strerror)


_PROBE = ".write-probe"
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}
_MESSAGES = {errno.ENOSPC: ("no space left on device", "os error 28"), errno.EROFS: ("read-only file system",
                                                                                     "os error 30")}


def storage_errno(err: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s own, or one a library reported in its message (torch's and
    safetensors' writers raise ``RuntimeError`` / their own error with the OS's text)."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err).lower()
    for code, needles in _MESSAGES.items():
        if any(n in text for n in needles):
            return code
    return None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(folder: Path) -> int | None:
    for p in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


_FIX = "pass a writable folder (--results-dir / results_dir, or MAPS_CACHE_DIR for the model cache) and run again"


def storage_error(err: BaseException, target: Path, needed: int | None = None) -> StorageError | None:
    """The one-sentence :class:`StorageError` for a write of ``target`` that failed with ``err`` (None when ``err``
    is not about space or permissions). ``target`` named ``.write-probe`` is :func:`check_writable`'s test file."""
    code = storage_errno(err)
    where = target.parent
    what = "nothing can be written there" if target.name == _PROBE else f"{target.name} was not written"
    if code not in _FULL and not _about(err, target):
        return None  # e.g. a file the block was reading: not this write's fault
    if code in _FULL:
        return StorageError(code, f"The disk holding {where} is full: writing {target.name} needs "
                                  f"{human_bytes(needed)} and {human_bytes(free_bytes(where))} is free; free some space "
                                  "(or point the folder at another disk) and run again; the files already written "
                                  "are kept.")
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = file_in_the_way(target if target.exists() else where)
        if blocker is None:
            return None
        return StorageError(code, f"{blocker} is a file where a folder is needed, so {what}; {_FIX}.")
    if code in _DENIED:
        why = "is read-only" if code == errno.EROFS else "is not writable"
        return StorageError(code, f"{where} {why} ({errno.errorcode.get(code, code)}), so {what}; {_FIX}; nothing "
                                  "already written was changed.")
    return None


def _mapped(err: BaseException, target: str | Path, needed: int | None) -> BaseException:
    """``err``, or its :class:`StorageError` when it is about space or permissions."""
    if isinstance(err, StorageError) or not isinstance(err, Exception):
        return err
    return storage_error(err, Path(target), needed) or err


def file_in_the_way(path: str | Path) -> Path | None:
    """The file that stands where ``path`` or one of its folders should be (None: nothing in the way)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def _about(err: BaseException, target: Path) -> bool:
    """Whether ``err`` concerns ``target``'s folder (or names no file): a permission error of another file is not
    this write's."""
    name = getattr(err, "filename", None)
    if not name:
        return True
    folder = target.parent.resolve()
    named = Path(os.fsdecode(name)).resolve()
    return named == folder or folder in named.parents or named in folder.parents


@contextlib.contextmanager
def storage_errors(target: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a failed write of ``target`` (disk full, read-only, not writable) into its :class:`StorageError`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only a write's space or permission error is mapped; the rest re-raised
        mapped = _mapped(err, target, needed)
        if mapped is err:
            raise
        raise mapped from None


def check_writable(folder: str | Path) -> Path:
    """``folder`` (created when missing) when a file can be written in it, else its :class:`StorageError`; checked
    before a long computation, so a read-only or full place fails at once, not after the work."""
    folder = Path(folder).expanduser()
    probe = folder / _PROBE
    with storage_errors(probe, needed=1):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(probe), dir=folder)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(tmp)
    return folder


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
def atomic_dir(target: str | Path, replace: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds.

    The temporary directory sits beside ``target`` (same filesystem) and is renamed in one step.
    If ``target`` exists: with ``replace`` the old one is exchanged for the new one in one step and deleted;
    without it (a cache entry another process just wrote) the existing one wins and ours is discarded. On any
    exception the temporary directory is removed and ``target`` is untouched; a full disk or a read-only folder
    is a :class:`StorageError` (``needed``: the bytes the directory takes, for its sentence).
    """
    target = Path(target)
    with storage_errors(target, needed):
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the sentence reports the space there is without it
        mapped = _mapped(err, target, needed)
        if mapped is err:
            raise
        raise mapped from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", needed: int | None = None):
    """Yield a file object whose contents become ``path`` (flushed to disk, then renamed) only if the block
    succeeds; on any exception ``path`` is untouched and the temporary file removed. A full disk or a read-only
    folder is a :class:`StorageError` (``needed``: the file's size, for its sentence)."""
    path = Path(path)
    with storage_errors(path, needed):
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
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # first, so the sentence reports the space there is without it
        mapped = _mapped(err, path, needed)
        if mapped is err:
            raise
        raise mapped from None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    with atomic_file(path, "wb", needed=len(data)) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float, busy: Exception):
    """Hold the lock file ``path`` (``filelock``), so writers of one result take turns; ``busy`` (a one-sentence
    error) is raised when another process holds it for longer than ``timeout`` seconds."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    with storage_errors(path, needed=0):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise busy from None
    try:
        yield
    finally:
        lock.release()
