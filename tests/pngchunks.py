"""Edit a PNG's chunks in place, keeping every other byte: what a tamperer (or a careless tool) does."""

from __future__ import annotations

import struct
import zlib


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, data)`` of each chunk after the signature."""
    found, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        found.append((png[at + 4:at + 8], png[at + 8:at + 8 + length]))
        at += 12 + length
    return found


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for kind, data in parts:
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return bytes(out)


def change_one_pixel(png: bytes) -> bytes:
    """The same file with one byte of one pixel changed (IDAT recompressed, other chunks as they were)."""
    parts = chunks(png)
    first = next(i for i, (kind, _) in enumerate(parts) if kind == b"IDAT")
    raw = bytearray(zlib.decompress(b"".join(data for kind, data in parts if kind == b"IDAT")))
    raw[1] ^= 0x01  # row 0's filter byte is raw[0]; raw[1] is the first pixel's red sample (filter 0: as is)
    rest = [part for part in parts if part[0] != b"IDAT"]
    return build([*rest[:first], (b"IDAT", zlib.compress(bytes(raw))), *rest[first:]])


def rewrite_text(png: bytes, key: str, value: str) -> bytes:
    """The same file with tEXt chunk ``key`` given another ``value``."""
    prefix = key.encode("latin-1") + b"\0"
    return build([(kind, prefix + value.encode("latin-1") if kind == b"tEXt" and data.startswith(prefix) else data)
                  for kind, data in chunks(png)])
