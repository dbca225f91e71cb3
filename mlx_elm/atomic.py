"""Atomic writes: build a file or folder under a temporary name beside it, then rename it into
place, so a crash or Ctrl-C never leaves a half-written checkpoint, model or plot behind."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

try:
    import fcntl
except ImportError:  # Windows: no flock; stale folders are then recognised by age alone
    fcntl = None

PathLike = Union[str, Path]


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format from
    it still work); it replaces ``path`` when the block succeeds and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` when the block succeeds.

    An existing ``target`` is replaced, or, with ``replace=False`` (caches that another process
    may have filled meanwhile), kept and the new folder discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            if not replace:
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Stale temporary folders. A build killed with SIGKILL or a power cut cannot remove its temporary
# folder, so the next build does. Only folders named as ``atomic_folder`` names them for the same
# target are touched, and only when their writer is gone: a writer marks its folder with an flock
# on a file inside it (:func:`writer_lock`); the kernel drops that lock when the process dies,
# however it dies, so no PID (which may be reused) is trusted. A folder without the mark (a writer
# killed in the instant before it took the lock, or an older mlx-elm) counts as stale only when it
# has not changed for ``STALE_AGE_S``.

WRITER_LOCK = ".writer.lock"
STALE_AGE_S = 3600.0


@contextmanager
def writer_lock(folder: PathLike) -> Iterator[None]:
    """Mark ``folder`` (a temporary one) as being written by this process for the block.

    The mark is removed before the block ends, so it is never published with the folder.
    """
    lock = Path(folder) / WRITER_LOCK
    fresh = lock.with_name(WRITER_LOCK + ".new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock on this filesystem: cleaners fall back to the folder's age
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(fresh, lock)  # so a cleaner never sees the lock file before it is locked
        yield
    finally:
        lock.unlink(missing_ok=True)  # unlink while still holding the lock (see _writer_gone)
        fresh.unlink(missing_ok=True)
        os.close(fd)


def remove_stale_temp_folders(target: PathLike, min_age_s: float = STALE_AGE_S) -> List[Path]:
    """Remove the temporary folders :func:`atomic_folder` left beside ``target`` whose writer is
    gone; returns those removed. Safe to call while other processes build the same target."""
    target = Path(target)
    removed = []
    try:
        candidates = sorted(target.parent.glob(f".{glob.escape(target.name)}.tmp-*"))
    except OSError:
        return removed
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir() or not _writer_gone(folder, min_age_s):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _writer_gone(folder: Path, min_age_s: float) -> bool:
    lock = folder / WRITER_LOCK
    if fcntl is None:
        return _age_s(folder) > min_age_s
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _age_s(folder) > min_age_s
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:
        return _age_s(folder) > min_age_s  # no flock here
    else:
        # A writer unlinks the lock file before releasing it, so a lock we could take on an
        # unlinked file belongs to a writer that has just finished and is renaming its folder.
        return os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)
