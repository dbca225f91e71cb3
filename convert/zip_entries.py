"""The entries of a zip archive, with every size and offset checked against the file before use.

``zipfile`` parses the central directory, reading through a memory map so that a lying size
cannot make it allocate, but no entry is read through it: stored entries are viewed in the map,
deflated ones are inflated in a stream that stops at their declared size, and each entry's CRC-32
is checked before its bytes are used (unless the caller opts out). Every failure is one
``ConversionError`` line.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Tuple, Union

from convert.untrusted import file_name, human, quote, regular_file
from mlx_elm.errors import ConversionError

# torch.save never compresses, so a deflated entry is someone else's archive; it may still inflate
# to this multiple of its compressed size (plus 1 MiB), far above what real weights compress by.
INFLATE_RATIO = 64
_CHUNK = 1 << 20
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
               NotImplementedError, OverflowError, IndexError, KeyError)

Buffer = Union[mmap.mmap, bytearray]


class ZipArchive:
    """A zip file's entries by name; ``read`` and ``storage`` give their checked bytes."""

    def __init__(self, path: Path, check_crc: bool = True) -> None:
        self.path, self.name, self.check_crc = path, file_name(path), check_crc
        self._crcs: Dict[str, int] = {}  # entry name -> CRC-32 of its stored bytes
        regular_file(path, self.name)
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ConversionError(f"{self.name} is empty or unreadable ({type(e).__name__}); pass a file written "
                                  "by torch.save.") from e
        try:
            infos = zipfile.ZipFile(self.map).infolist()
        except _ZIP_ERRORS as e:
            raise ConversionError(self._not_a_zip(e)) from e
        self.entries: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename != info.orig_filename.replace("\\", "/") or info.filename in self.entries:
                raise ConversionError(f"{self.name}: entry name {quote(info.orig_filename)} is duplicated or holds a "
                                      "NUL byte; the archive is corrupt or crafted, so it was refused.")
            self.entries[info.filename] = info

    def _not_a_zip(self, err: Exception) -> str:
        if self.map[:1] == b"\x80":
            return (f"{self.name} is a legacy (pre-1.6) torch file or a bare pickle, which this reader does not "
                    "open; re-save it with a current torch.save (zip format).")
        return (f"{self.name} is not a readable torch checkpoint ({type(err).__name__}: {quote(str(err))}); "
                "the file is truncated or not a .pt/.bin zip.")

    def span(self, info: zipfile.ZipInfo) -> Tuple[int, int]:
        """(start, end) of an entry's bytes in the file, after checking its local header."""
        what = f"{self.name}: entry {quote(info.filename)}"
        if info.flag_bits & 0x1:
            raise ConversionError(f"{what} is encrypted; torch checkpoints never are, so it was refused.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ConversionError(f"{what} uses zip compression method {info.compress_type}, which torch.save never "
                                  "writes; re-save the checkpoint with torch.save.")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ConversionError(f"{what} is stored uncompressed but gives two sizes ({info.compress_size} and "
                                  f"{info.file_size}); the file is corrupt.")
        head = self.map[info.header_offset: info.header_offset + 30] if info.header_offset >= 0 else b""
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise ConversionError(f"{what} has no local zip header where the directory says; the file is corrupt.")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        raw_name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if self.map[info.header_offset + 30: info.header_offset + 30 + name_len] != raw_name:
            raise ConversionError(f"{what}: its local header names another file; the archive is corrupt or crafted.")
        start = info.header_offset + 30 + name_len + extra_len
        end = start + info.compress_size
        if end > len(self.map):
            raise ConversionError(f"{what} runs past the end of the file; the checkpoint is truncated.")
        if info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > INFLATE_RATIO * info.compress_size + _CHUNK:
            raise ConversionError(f"{what} inflates from {human(info.compress_size)} to {human(info.file_size)}, over "
                                  f"{INFLATE_RATIO}x; torch.save never compresses, so the archive was refused (re-save "
                                  "it with torch.save).")
        return start, end

    def read(self, info: zipfile.ZipInfo, limit: int | None = None) -> bytes:
        """A small entry's bytes (data.pkl, byteorder), CRC-checked."""
        if limit is not None and info.file_size > limit:
            raise ConversionError(f"{self.name}: entry {quote(info.filename)} holds {info.file_size} bytes, more than "
                                  f"the {limit} it can hold; the file is corrupt.")
        buf, offset = self.storage(info)
        return bytes(buf[offset: offset + info.file_size])

    def storage(self, info: zipfile.ZipInfo) -> Tuple[Buffer, int]:
        """(buffer, offset) of an entry's uncompressed bytes: the memory map itself for a stored entry
        (no copy), an inflated bytearray for a deflated one. CRC-checked before it is returned."""
        start, end = self.span(info)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            return self._inflate(info, start, end), 0
        if self.check_crc:
            self._check_crc(info, self._stored_crc(info.filename, start, end))
        return self.map, start

    def _stored_crc(self, name: str, start: int, end: int) -> int:
        """The CRC-32 of a stored entry, computed once (on first use) and remembered."""
        if name not in self._crcs:
            with memoryview(self.map)[start:end] as view:
                self._crcs[name] = zlib.crc32(view)
        return self._crcs[name]

    def _inflate(self, info: zipfile.ZipInfo, start: int, end: int) -> bytearray:
        """Inflate into exactly ``file_size`` bytes; a stream that would write more stops there."""
        size, pos, crc = info.file_size, 0, 0
        out = bytearray(size)
        inflater = zlib.decompressobj(-15)
        try:
            with memoryview(self.map)[start:end] as view:
                for i in range(0, len(view), _CHUNK):
                    data = view[i: i + _CHUNK]
                    while data and not inflater.eof:
                        piece = inflater.decompress(data, size - pos + 1)
                        if pos + len(piece) > size:
                            raise ConversionError(f"{self.name}: entry {quote(info.filename)} inflates past its "
                                                  f"declared {size} bytes; the archive is corrupt or crafted.")
                        out[pos: pos + len(piece)] = piece
                        pos += len(piece)
                        if self.check_crc:
                            crc = zlib.crc32(piece, crc)
                        data = inflater.unconsumed_tail
                    if inflater.eof:
                        break
        except zlib.error as e:
            raise ConversionError(f"{self.name}: entry {quote(info.filename)} is not valid deflate data "
                                  f"({quote(str(e))}); the file is corrupt.") from e
        if not inflater.eof or pos != size:
            raise ConversionError(f"{self.name}: entry {quote(info.filename)} inflates to {pos} of its {size} bytes; "
                                  "the file is truncated or corrupt.")
        if self.check_crc:
            self._check_crc(info, crc)
        return out

    def _check_crc(self, info: zipfile.ZipInfo, crc: int) -> None:
        """Raise unless ``crc`` is the one the central directory records."""
        if crc != info.CRC:
            raise ConversionError(f"{self.name}: entry {quote(info.filename)} fails its CRC-32 check (stored "
                                  f"{info.CRC:08x}, read {crc:08x}); the file is corrupt: download or copy it again "
                                  "(or pass --no-check-crc / check_crc=False to convert it anyway).")

