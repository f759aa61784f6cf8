"""The outer container of a compressjax model file: preamble, checksum, header, payload, atomic writes.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89CJXMDL\\n" (a non-ASCII first byte and a newline catch text-mode mangling)
    8       2     format version (uint16), currently 1
    10      2     flags (uint16), must be 0 in version 1
    12      4     header_len: stored (zstd) length of the JSON header
    16      4     header_raw_len: its decompressed length
    20      8     payload_len: length of the payload that follows the header
    28      32    SHA-256 of payload + header + bytes [0, 28)
    60      ...   header (one zstd frame of UTF-8 JSON), then payload (the leaves' streams back to back)

The file size must equal ``60 + header_len + payload_len`` exactly. Every length of the preamble is
checked against the bytes really present before anything is decompressed. The digest covers the payload
first so that the writer can hash each stream while it compresses the next; the reader hashes in a
background thread while it decodes (every field is validated on its own, and allocations are capped), and
a load returns only after the digest matched: a corrupted file always ends in ``FormatError``, reported
as a checksum mismatch.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable

import zstandard

__all__ = ["FormatError", "MAGIC", "FORMAT_VERSION", "PREAMBLE_SIZE", "assemble", "parse", "atomic_write"]

MAGIC = b"\x89CJXMDL\n"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHHIIQ")
_DIGEST_SIZE = 32
PREAMBLE_SIZE = _FIXED.size + _DIGEST_SIZE
# A JSON header describes structure only; anything larger than this is not a header we wrote.
MAX_HEADER_RAW = 1 << 28


class FormatError(ValueError):
    """A file is not a valid compressjax model file: foreign, truncated, corrupted or from a newer version."""


def new_hash():
    """SHA-256: hardware-accelerated (SHA-NI) on most x86 CPUs, about twice as fast as blake2b here."""
    return hashlib.sha256()


def assemble(header_json: bytes, payload: list[bytes | memoryview], payload_hash=None) -> list[bytes | memoryview]:
    """Returns the file as a list of byte chunks: preamble, compressed header, payload chunks.

    ``payload_hash``: a :func:`new_hash` object already fed with exactly the payload (else computed here).
    """
    if len(header_json) > MAX_HEADER_RAW:
        raise ValueError(f"the JSON header is {len(header_json)} bytes, more than the format's {MAX_HEADER_RAW}")
    header = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(header_json)
    payload_len = sum(len(p) for p in payload)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(header), len(header_json), payload_len)
    if payload_hash is None:
        payload_hash = new_hash()
        for chunk in payload:
            payload_hash.update(chunk)
    payload_hash.update(header)
    payload_hash.update(fixed)
    return [fixed + payload_hash.digest(), header, *payload]


def parse(
    data: bytes | memoryview, *, max_header_raw: int = MAX_HEADER_RAW
) -> tuple[bytes, memoryview, Callable[[], None]]:
    """Validates the preamble of a whole file; returns ``(header_json, payload, verify)``.

    The SHA-256 is computed in a background thread (hashlib releases the GIL); ``verify()`` waits for it
    and raises ``FormatError`` on a mismatch. Callers must call it before trusting what they decoded.

    Raises:
        FormatError: for a foreign, truncated, padded or future-version file.
    """
    view = memoryview(data)
    size = len(view)
    if size < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        head = bytes(view[: len(MAGIC)])
        raise FormatError(f"not a compressjax model file: it starts with {head!r}, expected the magic bytes {MAGIC!r}")
    if size < PREAMBLE_SIZE:
        raise FormatError(f"truncated file: {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    _, version, flags, header_len, header_raw_len, payload_len = _FIXED.unpack_from(view, 0)
    if version > FORMAT_VERSION:
        raise FormatError(
            f"the file uses format version {version}, written by a newer compressjax; this version reads format "
            f"version {FORMAT_VERSION} and older: upgrade compressjax to load it"
        )
    if version < 1:
        raise FormatError(f"invalid format version {version} in the preamble")
    if flags != 0:
        raise FormatError(f"unknown flags 0x{flags:04x} in a format version {version} file")
    expected = PREAMBLE_SIZE + header_len + payload_len
    if size < expected:
        raise FormatError(
            f"truncated file: {size} bytes, but the preamble declares {expected} "
            f"({PREAMBLE_SIZE} preamble + {header_len} header + {payload_len} payload)"
        )
    if size > expected:
        raise FormatError(f"{size - expected} unexpected trailing bytes after the declared end of the file ({expected} bytes)")
    verify = _verifier(view, header_len)
    if header_raw_len > max_header_raw:
        verify()
        raise FormatError(f"the header declares {header_raw_len} bytes of JSON, more than the limit {max_header_raw}")
    header = view[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len]
    try:
        if zstandard.frame_content_size(header) != header_raw_len:
            raise FormatError("the header's zstd frame does not declare the header length given in the preamble")
        header_json = zstandard.ZstdDecompressor().decompress(header, max_output_size=header_raw_len)
        if len(header_json) != header_raw_len:
            raise FormatError(f"the header decompressed to {len(header_json)} bytes, the preamble declares {header_raw_len}")
    except (FormatError, zstandard.ZstdError) as e:
        verify()
        raise e if isinstance(e, FormatError) else FormatError(f"the header is not a valid zstd frame: {e}") from e
    return header_json, view[PREAMBLE_SIZE + header_len :], verify


def _verifier(view: memoryview, header_len: int) -> Callable[[], None]:
    result: list[bool] = []

    def run():
        h = new_hash()
        h.update(view[PREAMBLE_SIZE + header_len :])
        h.update(view[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len])
        h.update(view[: _FIXED.size])
        result.append(h.digest() == bytes(view[_FIXED.size : PREAMBLE_SIZE]))

    thread = threading.Thread(target=run, daemon=True) if len(view) > 1 << 20 else None
    if thread is None:
        run()
    else:
        thread.start()

    def verify() -> None:
        if thread is not None:
            thread.join()
        if not result[0]:
            raise FormatError("checksum mismatch: the file is corrupted (its SHA-256 does not match the preamble)")

    return verify


def read_file(path: str | os.PathLike) -> bytes:
    """Reads a whole file after checking its preamble, so a foreign file is rejected before a large read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, PREAMBLE_SIZE))
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC or len(head) < PREAMBLE_SIZE:
            parse(head)  # raises the precise FormatError
        f.seek(0)
        return f.read()


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Writes ``chunks`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash or an exception at any point leaves either the old file (or none) under ``path``, never a
    partial one, and the temporary file is removed on error.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = 0o644
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not every platform allows opening a folder
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
