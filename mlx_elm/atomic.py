"""Atomic writes: build a file or folder under a temporary name beside it, then rename it into
place, so a crash or Ctrl-C never leaves a half-written checkpoint, model or plot behind.

Temporary names carry the writer's process id (``.NAME.tmp-PID-RANDOM``), so debris of a writer
that was killed (``kill -9`` leaves no chance to clean up) is recognised as ours and removed by the
next writer of the same target, while a live writer's folder is never touched. Scratch names
without a PID (written by mlx-elm 0.1) count as debris once untouched for ``STALE_AGE_S``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

from mlx_elm.errors import MlxElmError

PathLike = Union[str, Path]
_KINDS = ("tmp", "old")  # work in progress, and a replaced folder waiting to be deleted
STALE_AGE_S = 3600.0


def _scratch(target: Path, kind: str, suffix: str = "") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _writer_pid(path: Path, target: Path) -> int | None:
    """The PID recorded in one of our scratch names for ``target``; -1 for our name without a PID
    (an older version's); None if the name is not ours."""
    for kind in _KINDS:
        prefix = f".{target.name}.{kind}-"
        if path.name.startswith(prefix):
            pid = path.name[len(prefix):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else -1
    return None


def process_alive(pid: int) -> bool:
    """True when a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _dead(pid: int | None, path: Path) -> bool:
    if pid is None or pid == os.getpid():
        return False
    if pid < 0:  # no PID in the name: stale once nobody has touched it for a while
        return _age_s(path) > STALE_AGE_S
    return not process_alive(pid)


def remove_stale(target: PathLike) -> List[Path]:
    """Delete scratch files and folders of ``target`` whose writer process is gone; returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        if _dead(_writer_pid(path, target), path):
            _remove(path)
            removed.append(path)
    return removed


_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def sweep_stale(folder: PathLike) -> List[Path]:
    """Delete every scratch entry in ``folder`` whose writer is gone, whatever its target (a
    checkpoint folder collects them for many step names)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _SCRATCH.match(path.name)
        if m and _dead(int(m.group("pid")), path):
            _remove(path)
            removed.append(path)
    return removed


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format from
    it still work); it replaces ``path`` when the block succeeds and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _scratch(path, "tmp", ".tmp" + path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; it becomes ``target`` when the block succeeds.

    An existing ``target`` folder stays in place until the new one is complete, then the two are
    swapped, so even a crash during the swap leaves one complete folder. With ``replace=False``
    (caches another process may have filled meanwhile) an existing ``target`` is kept and the new
    folder discarded. A ``target`` that is a file is refused, never replaced by a folder.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise MlxElmError(f"{target} is a file, not a folder; choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = _scratch(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not replace:
                return
            old = _scratch(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
