"""Small helpers for files we do not trust: quoting their content in messages, opening them.

A checkpoint chooses its own names, keys and persistent ids, so a message that quotes them could
otherwise carry terminal escape sequences, newlines, or a repr that takes minutes to build
(``str()`` of a memo-shared nested tuple is exponential in its depth). ``quote`` escapes, cuts
short and never does more work than its limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, List

from mlx_elm.errors import ConversionError

LIMIT = 60


def quote(value: Any, limit: int = LIMIT) -> str:
    """A repr of ``value`` on one line: control and other non-printable characters escaped, at most
    about ``limit`` characters, and never more work than that (whatever ``value`` is)."""
    out: List[str] = []
    _brief(value, out, [limit])
    text = "".join(out)
    return text if len(text) <= 4 * limit else text[: 4 * limit] + "..."


def plain(value: Any, limit: int = 2 * LIMIT) -> str:
    """A name as it is when it is a short printable string (most are), else ``quote(value)``."""
    if isinstance(value, str) and len(value) <= limit and value.isprintable():
        return value
    return quote(value)


def file_name(path: str | Path) -> str:
    """A file's name as given, unless it holds characters a terminal would act on."""
    return plain(Path(path).name, 200)


def human(n: float) -> str:
    """A byte count for a message (KiB = 1024 B)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def regular_file(path: Path, name: str) -> int:
    """The size of ``path`` if it is a regular file; opening a FIFO would block forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConversionError(f"cannot read {name} ({e.strerror}); check the path and its permissions.") from e
    if not stat.S_ISREG(st.st_mode):
        raise ConversionError(f"{name} is not a regular file (a folder, FIFO or device); pass a checkpoint file.")
    return st.st_size


def _brief(value: Any, out: List[str], budget: List[int]) -> None:
    """Append a short repr of ``value`` to ``out``; ``budget[0]`` characters are left to spend."""
    if budget[0] <= 0:
        out.append("...")
        return
    if isinstance(value, (str, bytes, bytearray)):
        cut = value[: budget[0]]
        text = repr(bytes(cut) if isinstance(cut, bytearray) else cut)
        if len(value) > len(cut):
            text += f"...({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    elif isinstance(value, bool) or value is None:
        text = repr(value)
    elif isinstance(value, int):
        text = repr(value) if value.bit_length() <= 128 else f"<{value.bit_length()}-bit int>"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (tuple, list)):
        opening, closing = ("(", ")") if isinstance(value, tuple) else ("[", "]")
        out.append(opening)
        budget[0] -= 1
        for i, item in enumerate(value):
            if budget[0] <= 0:
                out.append(f"...{len(value) - i} more")
                break
            if i:
                out.append(", ")
                budget[0] -= 2
            _brief(item, out, budget)
        out.append(closing)
        return
    else:
        text = f"<{type(value).__name__}>"
    budget[0] -= len(text)
    out.append(text)
