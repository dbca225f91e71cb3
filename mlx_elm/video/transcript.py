"""Transcript tracks (the stand-in for ASR): SRT files or plain text lines with times.

Accepted plain-text lines (one utterance each; blank lines and ``#`` comments are skipped)::

    [00:03] Look, the red circle turns blue.
    0:12.5 the square grows
    75 seventy-five seconds in
    00:01:02,500 --> 00:01:04,000 a range, SRT style

Each line becomes a :class:`Line` with a start time; :func:`assign` hands every line to the
segment containing its start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from mlx_elm.errors import VideoError

_TIME = r"(?:\d+:)?(?:\d+:)?\d+(?:[.,]\d+)?"
_LINE = re.compile(rf"^\s*\[?\s*(?P<start>{_TIME})\s*(?:(?:-->|-|–)\s*(?P<end>{_TIME}))?\s*\]?\s*(?P<text>.*)$")


@dataclass
class Line:
    start: float
    text: str
    end: Optional[float] = None


def parse_time(text: str) -> float:
    """``"1:02:03,5"`` / ``"02:03.5"`` / ``"123.5"`` to seconds."""
    parts = text.replace(",", ".").split(":")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + float(p)
    return seconds


def parse_srt(text: str, name: str = "transcript") -> List[Line]:
    """SubRip blocks: an index line, ``start --> end``, then one or more text lines."""
    lines: List[Line] = []
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip())
    for b, block in enumerate(blocks, 1):
        rows = [r for r in block.split("\n") if r.strip()]
        if rows and rows[0].strip().isdigit():
            rows = rows[1:]
        if not rows or "-->" not in rows[0]:
            raise VideoError(f"{name}: SRT block {b} has no 'start --> end' line; fix the file or use plain '[mm:ss] text' lines")
        start, _, end = rows[0].partition("-->")
        try:
            lines.append(Line(parse_time(start.strip()), " ".join(r.strip() for r in rows[1:]), parse_time(end.strip().split()[0])))
        except (ValueError, IndexError):
            raise VideoError(f"{name}: SRT block {b} has a bad time {rows[0].strip()!r}; use hh:mm:ss,mmm") from None
    return lines


def parse_plain(text: str, name: str = "transcript") -> List[Line]:
    """Plain ``time text`` lines (see the module docstring)."""
    out: List[Line] = []
    for n, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        if not m or not m.group("text").strip():
            raise VideoError(f"{name} line {n}: expected '[mm:ss] text' (a time, then words), got {raw.strip()[:40]!r}")
        end = parse_time(m.group("end")) if m.group("end") else None
        out.append(Line(parse_time(m.group("start")), m.group("text").strip(), end))
    return out


def read_transcript(path: Union[str, Path]) -> List[Line]:
    """Read an ``.srt`` file or a plain text transcript, sorted by start time."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"transcript {path} does not exist; pass an .srt or a text file of '[mm:ss] text' lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VideoError(f"transcript {path.name} is not UTF-8 text; save it as UTF-8") from None
    is_srt = path.suffix.lower() == ".srt" or re.match(r"\s*\d+\s*\n[^\n]*-->", text) is not None
    lines = parse_srt(text, path.name) if is_srt else parse_plain(text, path.name)
    return sorted(lines, key=lambda l: l.start)


def from_pairs(pairs: Sequence[Tuple[float, str]]) -> List[Line]:
    return [Line(float(t), str(s)) for t, s in sorted(pairs)]


def assign(lines: Sequence[Line], boundaries: Sequence[Tuple[float, float]]) -> List[List[str]]:
    """The text lines of each segment ``[start, end)``; lines past the last segment go to it."""
    out: List[List[str]] = [[] for _ in boundaries]
    if not boundaries:
        return out
    for line in lines:
        k = len(boundaries) - 1
        for i, (a, b) in enumerate(boundaries):
            if a <= line.start < b:
                k = i
                break
        else:
            if line.start < boundaries[0][0]:
                k = 0
        out[k].append(line.text)
    return out
