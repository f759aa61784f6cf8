"""The outer container of a compressjax model file: preamble, checksum, header, payload, atomic writes.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89CJXMDL\\n" (a non-ASCII first byte and a newline catch text-mode mangling)
    8       2     format version (uint16), currently 1
    10      2     flags (uint16): bit 0 set = the header is coded with the built-in dictionary
                  (:data:`HEADER_DICT_V1`); bit 1 set = bare zstd frames (every frame, the header's and
                  the payload's, without zstd's magic number and content size: the preamble and the
                  stream table already give both lengths); no other bit is defined in version 1
    12      4     header_len: stored (zstd) length of the JSON header
    16      4     header_raw_len: its decompressed length
    20      8     payload_len: length of the payload that follows the header
    28      32    SHA-256 of payload + header + bytes [0, 28)
    60      ...   header (one zstd frame of UTF-8 JSON), then payload (the leaves' streams back to back)

The header frame is coded against a fixed dictionary of the header's own vocabulary (its keys, record
kinds, dtypes and format names): a zstd frame starts with empty history, so without it every key is
spelled out once per file, which is most of a small model's header (a 43,410-weight MLP's 1,899-byte
header: 498 bytes plain, 256 with the dictionary). Bare frames save 5 bytes per frame (4 of magic, 1-2 of
content size, less a window byte), about 30 bytes of a 4.3 kB weight-shared MLP. Files written before either
flag still load.

The file size must equal ``60 + header_len + payload_len`` exactly. Every length of the preamble is
checked against the file's size (from ``fstat``, before the file is read) and the header's JSON length
against :func:`header_limit` (at most ``HEADER_RATIO`` times the file size, at least ``HEADER_FLOOR``)
before anything is read, decompressed or parsed: every structure of the header (streams, leaves, tree
depth and breadth, strings, metadata) takes at least one byte of that JSON, so all of them are bounded by
the file's own size before they are allocated. The digest covers the payload
first so that the writer can hash each stream while it compresses the next; the reader hashes in a
background thread while it decodes (every field is validated on its own, and allocations are capped), and
a load returns only after the digest matched: a corrupted file always ends in ``FormatError``, reported
as a checksum mismatch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import struct
import threading
from collections.abc import Callable, Iterable

import zstandard

__all__ = [
    "FormatError", "MAGIC", "FORMAT_VERSION", "PREAMBLE_SIZE", "assemble", "parse", "read_file", "atomic_write",
    "header_limit",
]

MAGIC = b"\x89CJXMDL\n"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHHIIQ")
_DIGEST_SIZE = 32
PREAMBLE_SIZE = _FIXED.size + _DIGEST_SIZE
# A JSON header describes structure only; anything larger than this is not a header we wrote.
MAX_HEADER_RAW = 1 << 28
# The decompressed JSON header may be at most HEADER_RATIO x the file size (and always HEADER_FLOOR bytes).
# Real headers measured 11-38x their file (thousands of empty or tiny leaves); a forged 20 KB file whose
# header expands 10,000x is refused before it is decompressed. save() refuses to write what load refuses.
HEADER_RATIO = 64
HEADER_FLOOR = 1 << 20
# Parsed JSON takes up to ~25 bytes of Python objects per byte of text ("[[],[],...]"): charged to max_bytes.
HEADER_EXPANSION = 32


FLAG_HEADER_DICT = 0x0001
FLAG_BARE_FRAMES = 0x0002
_KNOWN_FLAGS = FLAG_HEADER_DICT | FLAG_BARE_FRAMES
# The header's vocabulary, as zstd raw content: frozen, since files coded with it must stay readable (a new
# vocabulary needs a new flag bit). Later bytes are cheaper to refer to, so the commonest come last.
HEADER_DICT_V1 = (
    b'{"t":"var","cls":"Param","m":{},"v":{"t":"py","v":null}},{"t":"tuple","c":[{"t":"none"}]},'
    b'{"e":"q","meta":{"format":"compressjax.qarray/1","bits":8,"shape":[],"dtype":"bfloat16","symmetric":false,'
    b'"packed":false,"channel_axes":[],"group_size":128,"group_axis":0},"codes":{"dt":"int8","sh":[],"e":"dense",'
    b'"s":[]},"scale":{"dt":"float32","sh":[1],"e":"dense","s":[]},"zp":{"dt":"int8","sh":[1],"e":"dense","s":[]}},'
    b'{"e":"q","meta":{"format":"compressjax.qarray/1","bits":4,"shape":[],"dtype":"float32","symmetric":true,'
    b'"packed":true,"channel_axes":[1],"group_size":null,"group_axis":null},"codes":{"dt":"int8","sh":[],'
    b'"e":"sparse","nnz":0,"pos":"delta16","s":[]},"scale":{"dt":"float32","sh":[1,],"e":"dense","s":[]}},'
    b'{"e":"cb","meta":{"format":"compressjax.codebook/1","bits":4,"shape":[],"dtype":"float32","per_channel":true,'
    b'"zero":false},"idx":{"e":"packed","s":[]},"c":{"dt":"float16","sh":[],"e":"dense","s":[]},"h":0.0},'
    b'{"e":"cb","meta":{"format":"compressjax.codebook/1","bits":5,"shape":[],"dtype":"float32","per_channel":false,'
    b'"zero":true},"idx":{"dt":"uint8","sh":[],"e":"sparse","nnz":0,"pos":"delta8","s":[]},"c":{"dt":"float16",'
    b'"sh":[],"e":"dense","s":[]},"h":1.0},{"dt":"bfloat16","sh":[],"e":"sparse","nnz":0,"pos":"bitmask","s":[]},'
    b'{"dt":"float16","sh":[],"e":"dense","s":[]},{"dt":"int32","sh":[],"e":"dense","s":[]},'
    b'{"format":"compressjax","tree":{"t":"dict","k":[["params",{"t":"dict","k":[["bias",{"t":"leaf","i":0}],'
    b'["kernel",{"t":"leaf","i":1}]]}],["layers",{"t":"list","c":[{"t":"leaf","i":2}]}]]},"leaves":['
    b'{"dt":"float32","sh":[],"e":"sparse","nnz":0,"pos":"delta8","s":[]},'
    b'{"dt":"float32","sh":[],"e":"dense","s":[0,1,2,3]}],"streams":[[1,0,0],[0,0,0]]}'
)
_HEADER_DICT = zstandard.ZstdCompressionDict(HEADER_DICT_V1, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def bare_params(level: int, **overrides) -> zstandard.ZstdCompressionParameters:
    """Compression parameters of a bare frame (:data:`FLAG_BARE_FRAMES`) at zstd ``level``."""
    return zstandard.ZstdCompressionParameters.from_level(
        level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=0, write_checksum=0, write_dict_id=0,
        **overrides,
    )


def decompressor(flags: int, dict_data=None) -> zstandard.ZstdDecompressor:
    """A decompressor for the frames of a file with ``flags`` (not thread-safe: one per thread)."""
    fmt = zstandard.FORMAT_ZSTD1_MAGICLESS if flags & FLAG_BARE_FRAMES else zstandard.FORMAT_ZSTD1
    return zstandard.ZstdDecompressor(dict_data=dict_data, format=fmt)


def decompress(dctx: zstandard.ZstdDecompressor, frame, raw_len: int, flags: int, what: str) -> bytes:
    """Exactly ``raw_len`` bytes from one zstd frame, never more: a frame that declares another size (plain
    frames), holds more or less, or is not valid zstd raises ``FormatError`` naming ``what``."""
    try:
        if not flags & FLAG_BARE_FRAMES and zstandard.frame_content_size(frame) != raw_len:
            raise FormatError(f"{what}: the zstd frame does not declare {raw_len} bytes")
        out = dctx.decompress(frame, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: not a valid zstd frame of {raw_len} bytes: {e}") from e
    if len(out) != raw_len:
        raise FormatError(f"{what}: decompressed to {len(out)} bytes, expected {raw_len}")
    return out


def header_limit(file_size: int) -> int:
    """The most bytes of JSON a header may declare in a file of ``file_size`` bytes."""
    return min(MAX_HEADER_RAW, max(HEADER_FLOOR, HEADER_RATIO * file_size))


class FormatError(ValueError):
    """A file is not a valid compressjax model file: foreign, truncated, corrupted or from a newer version."""


def new_hash():
    """SHA-256: hardware-accelerated (SHA-NI) on most x86 CPUs, about twice as fast as blake2b here."""
    return hashlib.sha256()


def assemble(header_json: bytes, payload: list[bytes | memoryview], payload_hash=None) -> list[bytes | memoryview]:
    """Returns the file as a list of byte chunks: preamble, compressed header, payload chunks.

    ``payload_hash``: a :func:`new_hash` object already fed with exactly the payload (else computed here).
    """
    header = zstandard.ZstdCompressor(compression_params=bare_params(19), dict_data=_HEADER_DICT).compress(header_json)
    payload_len = sum(len(p) for p in payload)
    limit = header_limit(PREAMBLE_SIZE + len(header) + payload_len)
    if len(header_json) > limit:
        raise ValueError(
            f"the tree's JSON description takes {len(header_json)} bytes, more than load() accepts for a file of this "
            f"size ({limit} bytes: {HEADER_RATIO} x the file size, at least {HEADER_FLOOR}); save fewer, larger leaves"
        )
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, _KNOWN_FLAGS, len(header), len(header_json), payload_len)
    if payload_hash is None:
        payload_hash = new_hash()
        for chunk in payload:
            payload_hash.update(chunk)
    payload_hash.update(header)
    payload_hash.update(fixed)
    return [fixed + payload_hash.digest(), header, *payload]


def check_preamble(head: bytes | memoryview, size: int) -> tuple[int, int, int, int]:
    """Validates the preamble ``head`` of a file of ``size`` bytes; returns ``(header_len, header_raw_len,
    payload_len, flags)``. Needs only the first :data:`PREAMBLE_SIZE` bytes, so a file is judged before it is read.

    Raises:
        FormatError: for a foreign, truncated, padded or future-version file, or a header longer than
            :func:`header_limit` allows for this file size.
    """
    head = bytes(head[:PREAMBLE_SIZE])
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        raise FormatError(f"not a compressjax model file: it starts with {head[:len(MAGIC)]!r}, expected the magic bytes {MAGIC!r}")
    if size < PREAMBLE_SIZE or len(head) < PREAMBLE_SIZE:
        raise FormatError(f"truncated file: {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    _, version, flags, header_len, header_raw_len, payload_len = _FIXED.unpack_from(head, 0)
    if version > FORMAT_VERSION:
        raise FormatError(
            f"the file uses format version {version}, written by a newer compressjax; this version reads format "
            f"version {FORMAT_VERSION} and older: upgrade compressjax to load it"
        )
    if version < 1:
        raise FormatError(f"invalid format version {version} in the preamble")
    if flags & ~_KNOWN_FLAGS:
        raise FormatError(f"unknown flags 0x{flags:04x} in a format version {version} file")
    expected = PREAMBLE_SIZE + header_len + payload_len
    if size < expected:
        raise FormatError(
            f"truncated file: {size} bytes, but the preamble declares {expected} "
            f"({PREAMBLE_SIZE} preamble + {header_len} header + {payload_len} payload)"
        )
    if size > expected:
        raise FormatError(f"{size - expected} unexpected trailing bytes after the declared end of the file ({expected} bytes)")
    limit = header_limit(size)
    if header_raw_len > limit:
        raise FormatError(
            f"the header declares {header_raw_len} bytes of JSON, more than a {size}-byte file may hold "
            f"({limit} bytes: {HEADER_RATIO} x the file size, at least {HEADER_FLOOR})"
        )
    return header_len, header_raw_len, payload_len, flags


def parse(
    data: bytes | bytearray | memoryview, *, max_header_raw: int = MAX_HEADER_RAW
) -> tuple[bytes, memoryview, Callable[[], None], int]:
    """Validates the preamble of a whole file; returns ``(header_json, payload, verify, flags)``.

    The SHA-256 is computed in a background thread (hashlib releases the GIL); ``verify()`` waits for it
    and raises ``FormatError`` on a mismatch. Callers must call it before trusting what they decoded.

    Args:
        data: the whole file.
        max_header_raw: a further cap on the header's JSON length (the caller's allocation budget).

    Raises:
        FormatError: for a foreign, truncated, padded or future-version file.
    """
    view = memoryview(data)
    header_len, header_raw_len, _, flags = check_preamble(view[:PREAMBLE_SIZE], len(view))
    verify = _verifier(view, header_len)
    if header_raw_len > max_header_raw:
        verify()
        raise FormatError(
            f"the header declares {header_raw_len} bytes of JSON, more than this load's limit of {max_header_raw} "
            "(max_bytes); pass a larger load(..., max_bytes=...) if the file is trusted"
        )
    header = view[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len]
    try:
        dctx = decompressor(flags, _HEADER_DICT if flags & FLAG_HEADER_DICT else None)
        header_json = decompress(dctx, header, header_raw_len, flags, "the header (length from the preamble)")
    except FormatError:
        verify()  # a corrupted file is reported as such
        raise
    return header_json, view[PREAMBLE_SIZE + header_len :], verify, flags


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


def read_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytearray:
    """Reads a model file after judging its preamble against its size, so that a foreign, truncated,
    padded or oversized file is rejected having read only 60 bytes, and only the declared bytes are read.

    Args:
        path: the file.
        max_bytes: if not ``None``, a file larger than this raises ``FormatError`` before it is read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(PREAMBLE_SIZE)
        check_preamble(head, size)
        if max_bytes is not None and size > max_bytes:
            raise FormatError(
                f"the file holds {size} bytes, beyond the allocation limit of this load (max_bytes={max_bytes}); "
                "pass a larger load(..., max_bytes=...) if the file is trusted"
            )
        data = bytearray(size)
        data[:PREAMBLE_SIZE] = head
        view = memoryview(data)
        got = PREAMBLE_SIZE
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise FormatError(f"truncated file: it shrank to {got} bytes while being read ({size} expected)")
            got += n
        return data


# size_report verifies the checksum before reporting a malformed header (so that a corrupted file reads as
# such) only in files up to this size; a larger one gets the header's own error without a full read.
VERIFY_FIRST_BYTES = 1 << 30
_READ_CHUNK = 1 << 20


def _zstd_bound(raw_len: int) -> int:
    """The most bytes a zstd frame of ``raw_len`` bytes takes (ZSTD_compressBound, plus frame overhead)."""
    return raw_len + (raw_len >> 8) + 1024


class HeaderReader:
    """Opens a model file and reads only its preamble and header; the payload is streamed through the
    checksum by :meth:`verify` in 1 MiB pieces, never held in memory (``size_report``, ``inspect``).

    Memory is the header (bounded by :func:`header_limit` and, compressed, by zstd's bound of that) plus one
    piece, whatever sizes a hostile preamble declares; every length is checked against the file size first.
    """

    def __init__(self, path: str | bytes | os.PathLike):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            self.head = self._f.read(PREAMBLE_SIZE)
            header_len, header_raw_len, self.payload_len, flags = check_preamble(self.head, self.size)
            if header_len > _zstd_bound(header_raw_len):
                raise FormatError(f"the preamble declares a {header_len}-byte header frame for {header_raw_len} bytes "
                                  "of JSON, more than zstd can take")
            self.header = self._read_exact(header_len)
            self._verified: bool | None = None
            try:
                dctx = decompressor(flags, _HEADER_DICT if flags & FLAG_HEADER_DICT else None)
                self.header_json = decompress(dctx, self.header, header_raw_len, flags, "the header (length from the preamble)")
            except FormatError:
                self.verify_if_small()
                raise
        except BaseException:
            self._f.close()
            raise

    def _read_exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise FormatError(f"truncated file: it shrank while being read ({n} bytes expected, {len(data)} read)")
        return data

    def verify(self) -> None:
        """Streams the payload through SHA-256; ``FormatError`` if the file's digest does not match."""
        if self._verified is None:
            h = new_hash()
            self._f.seek(PREAMBLE_SIZE + len(self.header))
            left = self.payload_len
            while left:
                chunk = self._f.read(min(_READ_CHUNK, left))
                if not chunk:
                    raise FormatError("truncated file: it shrank while being read")
                h.update(chunk)
                left -= len(chunk)
            h.update(self.header)
            h.update(self.head[: _FIXED.size])
            self._verified = h.digest() == bytes(self.head[_FIXED.size : PREAMBLE_SIZE])
        if not self._verified:
            raise FormatError("checksum mismatch: the file is corrupted (its SHA-256 does not match the preamble)")

    def verify_if_small(self) -> None:
        if self.size <= VERIFY_FIRST_BYTES:
            self.verify()

    def __enter__(self) -> HeaderReader:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


_TMP_SUFFIX = ".cjx-tmp"


def _tmp_prefix(target: str) -> str:
    """``.{name}.``; a long name is replaced by its hash, so the temporary's name stays under 255 bytes."""
    name = os.path.basename(target)
    if len(os.fsencode(name)) > 200:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{name}."


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never remove on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can ask about): leave its file alone
    return True


def remove_stale_temporaries(target: str) -> list[str]:
    """Removes the temporaries that a killed :func:`atomic_write` of ``target`` left behind; returns their names.

    Temporaries are named ``.{name}.{pid}.{random}.cjx-tmp`` next to the target; one is stale when the
    process that wrote it is gone (a save in progress in a live process, this one included, is left alone).
    """
    folder = os.path.dirname(target)
    prefix = _tmp_prefix(target)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        pid, _, token = name[len(prefix) : -len(_TMP_SUFFIX)].partition(".")
        if not (pid.isdigit() and token) or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def atomic_write(path: str | bytes | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Writes ``chunks`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash or an exception at any point leaves either the old file (or none) under ``path``, never a
    partial one; the temporary file is removed on error, and one left by a killed process is removed by
    the next save of the same path. What happens to what is already at ``path`` follows ``numpy.save`` and
    ``safetensors`` (which open the path for writing), except that the write stays atomic:

    * a new file gets mode ``0o666`` minus the process umask; an existing file keeps its mode;
    * a symbolic link is followed: its target is replaced (the link stays a link);
    * a read-only file (no write permission bit, or not writable by this user) is refused with
      ``PermissionError`` instead of being replaced, as ``open(path, "wb")`` would refuse it.

    Raises:
        PermissionError: ``path`` is a read-only file, or its folder cannot be written.
        IsADirectoryError: ``path`` is a folder.
    """
    # A bytes path is decoded as the OS does (os.fsdecode), so bytes and str paths behave alike.
    target = os.path.realpath(os.fsdecode(os.fspath(path)))  # follows symbolic links, as open(path, "wb") would
    folder = os.path.dirname(target)
    mode = None
    try:
        st = os.stat(target)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "cannot save a model file over a folder", os.fspath(path))
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o222 or not os.access(target, os.W_OK):
            raise PermissionError(
                errno.EACCES, "the file is read-only; save() does not replace read-only files (make it writable "
                "or remove it first)", os.fspath(path)
            )
    remove_stale_temporaries(target)
    tmp = os.path.join(folder, f"{_tmp_prefix(target)}{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    # O_EXCL: never write through someone else's file; 0o666 & ~umask, like open(path, "wb").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
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
