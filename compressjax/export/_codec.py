"""Array encodings: dense or sparse (bitmask or relative indices), byte planes, zstd-coded streams.

A *stream* is a run of raw bytes stored either as is or as one zstd frame, whichever is smaller. An
*array record* (a small JSON dict) describes one array and names its streams:

* ``{"e": "dense", "s": [i0, ...]}``: every element as one stream per byte plane (plane k holds byte k of
  every element), which groups the slowly varying sign/exponent bytes of floats so that zstd can code
  them (about 15% smaller on N(0, 1) float32 weights, measured) while the random low mantissa bytes are
  stored raw without spending time on them.
* ``{"e": "sparse", "nnz": k, "pos": "bitmask" | "delta8" | "delta16", "s": [p, v0, ...]}``: the non-zero
  elements (all-zero *bit pattern*, so ``-0.0`` and NaN payloads survive) in C order, plus their
  positions as a packed bitmask or as relative indices. Relative indices follow Deep Compression (Han et
  al., 2016, "Deep Compression", ICLR): the gap to the previous non-zero in 8 or 16 bits, where a code of 0
  is a filler that advances by the largest gap (255 or 65535) without placing an element. The cheaper of
  the candidates, measured after zstd, is kept.

The reader validates every length against the record's shape, dtype and ``nnz`` *before* it decompresses
or allocates, and charges each allocation to a byte budget, so a forged record cannot cause a huge
allocation.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ml_dtypes
import numpy as np
import zstandard

from compressjax.export._container import FLAG_BARE_FRAMES, FormatError, bare_params, decompress, decompressor, new_hash

RAW, ZSTD = 0, 1
# A leaf denser than this is stored dense without trying the sparse candidates.
MAX_SPARSE_DENSITY = 0.9
# Above this many bytes, dense-vs-sparse is decided from the density instead of compressing both.
_TRY_BOTH_BYTES = 16 << 20
_DENSITY_CUTOFF_LARGE = 0.5
# Below this density the sparse form always won in our measurements: do not spend time on the dense one.
_DENSITY_CUTOFF = 0.25
_PARALLEL_BYTES = 4 << 20  # streams this large are compressed and hashed on worker threads
_SAMPLE_FROM, _SAMPLE = 1 << 15, 1 << 12
_STRONG_BYTES = 1 << 15

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}
for _name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "int4", "uint4"):
    if hasattr(ml_dtypes, _name):
        _DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


def dtype_name(dtype: Any, path: str) -> str:
    """The format's name for ``dtype``; raises ``TypeError`` naming the leaf for an unsupported one."""
    dt = np.dtype(dtype)
    name = _DTYPE_NAMES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    if name is None:
        raise TypeError(f"leaf {path!r} has dtype {dt}, which the file format does not store; supported: {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise FormatError(f"unknown dtype {name!r} in the header")
    return _DTYPES[name]


class Budget:
    """Counts the bytes a load may allocate; a forged size field fails here before any allocation."""

    def __init__(self, limit: int | None):
        self.left = math.inf if limit is None else int(limit)
        self._lock = threading.Lock()

    def charge(self, nbytes: int, what: str) -> None:
        with self._lock:
            self._charge(nbytes, what)

    def _charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise FormatError(
                f"{what} needs {nbytes} bytes, beyond the allocation limit of this load (max_bytes); "
                "pass a larger load(..., max_bytes=...) if the file is trusted"
            )
        self.left -= nbytes


# ----------------------------------------------------------------------------------------------- writing


class StreamWriter:
    """Compresses streams and collects them, with the table ``[[codec, stored_len, raw_len], ...]``.

    Large streams are compressed on a small thread pool (zstd releases the GIL) and the payload's SHA-256
    is computed in the background as streams are committed, so hashing overlaps compression.
    """

    def __init__(self, level: int | None = None):
        if level is not None and not (isinstance(level, int) and not isinstance(level, bool) and -7 <= level <= 22):
            raise ValueError(f"level must be an int in [-7, 22] (zstd levels) or None, got {level!r}")
        self.level = level
        self.chunks: list[bytes | memoryview] = []
        self.table: list[list[int]] = []
        self.hash = new_hash()
        self._hashing: list[Future] = []
        self._cctx = threading.local()

    def _compressor(self, nbytes: int, level: int | None = None) -> zstandard.ZstdCompressor:
        if level is None:
            level = self.level
        if level is None:
            # Small streams: the strongest level costs little. Large ones: quantized codes, positions and
            # float exponent planes are nearly memoryless bytes, where LZ matching helps little and costs
            # much; level 1 with long minimum matches leaves them to the Huffman literal coder, and was
            # measured smaller than levels 1-15 and faster than levels 3-15 on such streams (4 MiB of int4 codes:
            # 1.66 MB at 437 MB/s, level 3: 1.98 MB at 30 MB/s).
            level = 19 if nbytes <= _STRONG_BYTES else "literal"
        cache = self._cctx.__dict__.setdefault("cache", {})  # a ZstdCompressor is not thread-safe
        if level not in cache:
            # Bare frames (FLAG_BARE_FRAMES): the stream table holds the lengths, so no magic, no content size.
            params = bare_params(1, min_match=7, search_log=1, hash_log=10) if level == "literal" else bare_params(level)
            cache[level] = zstandard.ZstdCompressor(compression_params=params)
        return cache[level]

    def compress(self, raw: np.ndarray) -> tuple[int, bytes | memoryview, int]:
        """``(codec, stored, raw_len)`` for a contiguous uint8 array, zstd only when it is smaller.

        For a large stream, a sample of four 16 KiB slices is compressed first: data that does not shrink
        there (the low mantissa bytes of floats) is stored raw without compressing all of it.
        """
        data = memoryview(np.ascontiguousarray(raw)).cast("B")
        n = len(data)
        if n < 16:
            return RAW, data, n
        if n >= _SAMPLE_FROM:  # a fast level is enough to tell random bytes
            step = n // 4
            sample = b"".join(data[i * step : i * step + _SAMPLE] for i in range(4))
            if len(self._compressor(0, "literal").compress(sample)) > 0.97 * len(sample):
                return RAW, data, n
        packed = self._compressor(n).compress(data)
        return (ZSTD, packed, n) if len(packed) < n else (RAW, data, n)

    def compress_many(self, raws: list[np.ndarray]) -> list[tuple[int, bytes | memoryview, int]]:
        """:meth:`compress` of several streams, in parallel when they are large."""
        if sum(r.nbytes for r in raws) < _PARALLEL_BYTES or len(raws) == 1:
            return [self.compress(r) for r in raws]
        return list(_pool().map(self.compress, raws))

    def commit(self, candidate: tuple[int, bytes | memoryview, int]) -> int:
        codec, stored, raw_len = candidate
        self.chunks.append(stored)
        self.table.append([codec, len(stored), raw_len])
        if len(stored) >= _PARALLEL_BYTES:
            self._hashing.append(_hash_pool().submit(self.hash.update, stored))
        elif self._hashing:
            self._hashing.append(_hash_pool().submit(self.hash.update, stored))  # keep the order
        else:
            self.hash.update(stored)
        return len(self.table) - 1

    def payload_hash(self):
        """The hash object fed with the whole payload, in order."""
        for f in self._hashing:
            f.result()
        return self.hash


_POOLS: dict[str, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):  # a forked child must not reuse the parent's (threadless) pools
    os.register_at_fork(after_in_child=_POOLS.clear)


def leaf_pool() -> ThreadPoolExecutor:
    """Workers that plan or decode whole leaves (separate from :func:`_pool`, which they may wait on)."""
    if "leaf" not in _POOLS:
        _POOLS["leaf"] = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="cjx-leaf")
    return _POOLS["leaf"]


def _pool() -> ThreadPoolExecutor:
    if "work" not in _POOLS:
        _POOLS["work"] = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="cjx-zstd")
    return _POOLS["work"]


def _hash_pool() -> ThreadPoolExecutor:
    if "hash" not in _POOLS:  # one worker: updates run in submission order
        _POOLS["hash"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cjx-hash")
    return _POOLS["hash"]


def _nonzero(flat: np.ndarray) -> np.ndarray:
    """Elements whose bit pattern is not all zeros (so -0.0 counts as non-zero and survives exactly)."""
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):
        return flat.view(f"u{size}") != 0
    return flat.view("u8").reshape(flat.size, size // 8).any(axis=1)


def to_planes(flat: np.ndarray) -> list[np.ndarray]:
    """Byte planes of a 1-D array: plane k holds byte k of every element (one plane for 1-byte dtypes)."""
    size = flat.dtype.itemsize
    u8 = flat.view(np.uint8)
    if size == 1:
        return [u8]
    u8 = u8.reshape(flat.size, size)
    return [np.ascontiguousarray(u8[:, k]) for k in range(size)]


def from_planes(planes: list[np.ndarray], n: int, dtype: np.dtype) -> np.ndarray:
    if dtype.itemsize == 1:
        return planes[0].view(dtype)
    out = np.empty((n, dtype.itemsize), np.uint8)
    for k, plane in enumerate(planes):
        out[:, k] = plane
    return out.view(dtype).reshape(n)


def delta_encode(positions: np.ndarray, width: int) -> np.ndarray:
    """Relative indices with fillers (Deep Compression): code 0 advances by 2**width - 1 without an element."""
    top = (1 << width) - 1
    if positions.size == 0:
        return np.zeros(0, f"<u{width // 8}")
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // top
    slots = np.cumsum(fillers + 1) - 1
    out = np.zeros(int(slots[-1]) + 1, f"<u{width // 8}")
    out[slots] = gaps - fillers * top
    return out


def delta_decode(codes: np.ndarray, width: int, nnz: int, n: int) -> np.ndarray:
    top = (1 << width) - 1
    real = codes != 0
    if int(np.count_nonzero(real)) != nnz:
        raise FormatError(f"the relative indices place {int(np.count_nonzero(real))} elements, the header says {nnz}")
    if codes.size and not real[-1]:
        raise FormatError("the relative indices end with a filler code")
    pos = np.cumsum(np.where(real, codes.astype(np.int64), top)) - 1
    pos = pos[real]
    if pos.size and pos[-1] >= n:
        raise FormatError(f"a relative index points at element {int(pos[-1])} of an array of {n}")
    return pos


def _position_candidates(nz: np.ndarray, nnz: int, sw: StreamWriter) -> tuple[str, tuple]:
    n = nz.size
    cands = {"bitmask": sw.compress(np.packbits(nz, bitorder="little"))}
    positions = np.flatnonzero(nz)
    cands["delta8"] = sw.compress(delta_encode(positions, 8).view(np.uint8))
    if nnz and n / nnz > 64:  # 16-bit gaps only pay off when non-zeros are rare
        cands["delta16"] = sw.compress(delta_encode(positions, 16).view(np.uint8))
    best = min(cands, key=lambda k: len(cands[k][1]))
    return best, cands[best]


def commit_record(rec: dict, sw: StreamWriter) -> dict:
    """Commits the candidate streams of a planned record (nested records included) in order; returns it."""
    for key, value in rec.items():
        if key == "s":
            rec["s"] = [sw.commit(c) for c in value]
        elif isinstance(value, dict) and "s" in value:
            commit_record(value, sw)
    return rec


def encode_array(arr: np.ndarray, path: str, sw: StreamWriter) -> dict:
    """Plans one array: its JSON record (dense or sparse, whichever is smaller) holding compressed candidate
    streams under ``"s"``; :func:`commit_record` then appends them to ``sw`` and puts their indices there.
    Thread-safe, so leaves can be planned in parallel and committed in order."""
    name = dtype_name(arr.dtype, path)
    dt = _DTYPES[name]
    flat = np.ascontiguousarray(arr, dtype=dt).reshape(-1)  # byte-swaps a big-endian array, else no copy
    rec: dict[str, Any] = {"dt": name, "sh": [int(d) for d in arr.shape]}
    n = flat.size
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):  # count without materialising a mask: most dense leaves stop here
        nz, nnz = None, int(np.count_nonzero(flat.view(f"u{size}")))
    else:
        nz = _nonzero(flat)
        nnz = int(np.count_nonzero(nz))
    large = n * dt.itemsize > _TRY_BOTH_BYTES
    sparse = dense = None
    if n and nnz <= MAX_SPARSE_DENSITY * n:
        nz = _nonzero(flat) if nz is None else nz
        pos_kind, pos = _position_candidates(nz, nnz, sw)
        vals = sw.compress_many(to_planes(flat[nz]))
        sparse = (pos_kind, pos, vals)
    if sparse is None or nnz > (_DENSITY_CUTOFF_LARGE if large else _DENSITY_CUTOFF) * n:
        dense = sw.compress_many(to_planes(flat))
    total = lambda cands: sum(len(c[1]) for c in cands)  # noqa: E731
    if sparse is not None and (dense is None or len(sparse[1][1]) + total(sparse[2]) < total(dense)):
        rec.update(e="sparse", nnz=nnz, pos=sparse[0], s=[sparse[1], *sparse[2]])
    else:
        rec.update(e="dense", s=dense)
    return rec


# ----------------------------------------------------------------------------------------------- reading


def check_table(table: Any, payload_len: int) -> list[tuple[int, int, int, int]]:
    """The stream table's ``(codec, offset, stored, raw)`` entries, checked: well formed, and adding up to
    exactly ``payload_len`` bytes (``FormatError`` otherwise). Shared by ``load`` and ``size_report``."""
    if not isinstance(table, list):
        raise FormatError("the header's stream table is not a list")
    entries: list[tuple[int, int, int, int]] = []
    offset = 0
    for i, entry in enumerate(table):
        if not (isinstance(entry, list) and len(entry) == 3 and all(_is_int(v) and v >= 0 for v in entry)):
            raise FormatError(f"stream {i} of the table is malformed: {entry!r}"[:200])
        codec, stored, raw = entry
        if codec not in (RAW, ZSTD):
            raise FormatError(f"stream {i} uses unknown codec {codec}")
        if codec == RAW and stored != raw:
            raise FormatError(f"raw stream {i} stores {stored} bytes but declares {raw}")
        entries.append((codec, offset, stored, raw))
        offset += stored
    if offset != payload_len:
        raise FormatError(f"the streams add up to {offset} bytes but the payload holds {payload_len}")
    return entries


def check_stream(entries: list, index: Any, lo: int, hi: int, what: str) -> int:
    """Stream ``index`` exists and declares between ``lo`` and ``hi`` raw bytes; returns its raw length."""
    if not _is_int(index) or not 0 <= index < len(entries):
        raise FormatError(f"{what}: stream index {index!r} is out of range"[:200])
    raw = entries[index][3]
    if not lo <= raw <= hi:
        expect = f"{lo}" if lo == hi else f"between {lo} and {hi}"
        raise FormatError(f"{what}: stream {index} declares {raw} bytes, expected {expect}")
    return raw


class ArrayHeader:
    """What an array record declares, checked without reading its streams (see :func:`check_array_record`)."""

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], kind: str, nnz: int, pos: str | None,
                 streams: list[int], bounds: list[tuple[int, int]]):
        self.dtype, self.shape, self.kind, self.nnz, self.pos = dtype, shape, kind, nnz, pos
        self.streams, self.bounds = streams, bounds

    @property
    def encoding(self) -> str:
        return f"sparse/{self.pos}" if self.kind == "sparse" else "dense"


def check_array_record(rec: Any, what: str, entries: list | None = None) -> ArrayHeader:
    """Every field of an array record (dtype, shape, encoding, ``nnz``, position code, stream count) and,
    given the stream table's ``entries``, each stream's declared length: the checks ``load`` makes before it
    reads a byte, shared with ``size_report`` so both accept and reject the same headers (``FormatError``)."""
    if not isinstance(rec, dict):
        raise FormatError(f"{what}: the array record is not an object")
    dt = dtype_from_name(rec.get("dt"))
    shape = check_shape(rec.get("sh"), what)
    n = math.prod(shape)
    streams = rec.get("s")
    kind = rec.get("e")
    if not isinstance(streams, list):
        raise FormatError(f"{what}: the record's stream list is missing")
    planes = dt.itemsize
    if kind == "dense":
        if len(streams) != planes:
            raise FormatError(f"{what}: a dense {dt} record has {planes} streams (byte planes), got {len(streams)}")
        head = ArrayHeader(dt, shape, kind, n, None, streams, [(n, n)] * planes)
    elif kind == "sparse":
        nnz, pos_kind = rec.get("nnz"), rec.get("pos")
        if not _is_int(nnz) or not 0 <= nnz <= n:
            raise FormatError(f"{what}: invalid non-zero count {nnz!r} for {n} elements"[:200])
        if len(streams) != 1 + planes:
            raise FormatError(f"{what}: a sparse {dt} record has {1 + planes} streams, got {len(streams)}")
        if pos_kind == "bitmask":
            pos_bounds = ((n + 7) // 8, (n + 7) // 8)
        elif pos_kind in ("delta8", "delta16"):
            width = 8 if pos_kind == "delta8" else 16
            step, top = width // 8, (1 << width) - 1
            pos_bounds = (step * nnz, step * (nnz + n // top))
        else:
            raise FormatError(f"{what}: unknown position encoding {pos_kind!r}"[:200])
        head = ArrayHeader(dt, shape, kind, nnz, pos_kind, streams, [pos_bounds] + [(nnz, nnz)] * planes)
    else:
        raise FormatError(f"{what}: unknown encoding {kind!r}"[:200])
    if entries is not None:
        for index, (lo, hi) in zip(streams, head.bounds, strict=True):
            check_stream(entries, index, lo, hi, what)
    return head


class StreamReader:
    """Hands out the payload's streams, each at most once, after checking its declared lengths.

    ``flags`` are the file's preamble flags; they say how the zstd frames are coded (bare by default, as
    :class:`StreamWriter` writes them).
    """

    def __init__(self, payload: memoryview, table: Any, budget: Budget, flags: int = FLAG_BARE_FRAMES):
        self.payload, self.budget, self.flags = payload, budget, flags
        self.entries = check_table(table, len(payload))
        self.used: set[int] = set()
        self._lock = threading.Lock()
        self._local = threading.local()  # a ZstdDecompressor is not thread-safe

    def get(self, index: Any, lo: int, hi: int, what: str) -> np.ndarray:
        """Stream ``index`` as a uint8 array; its raw length must lie in ``[lo, hi]``."""
        if not _is_int(index) or not 0 <= index < len(self.entries):
            raise FormatError(f"{what}: stream index {index!r} is out of range")
        with self._lock:
            if index in self.used:
                raise FormatError(f"{what}: stream {index} is referenced twice")
            self.used.add(index)
        codec, offset, stored, raw = self.entries[index]
        if not lo <= raw <= hi:
            expect = f"{lo}" if lo == hi else f"between {lo} and {hi}"
            raise FormatError(f"{what}: stream {index} declares {raw} bytes, expected {expect}")
        data = self.payload[offset : offset + stored]
        if codec == RAW:
            return np.frombuffer(data, np.uint8)
        self.budget.charge(raw, what)
        if not hasattr(self._local, "dctx"):
            self._local.dctx = decompressor(self.flags)
        return np.frombuffer(decompress(self._local.dctx, data, raw, self.flags, f"{what}: stream {index}"), np.uint8)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) and 0 <= d < 1 << 48 for d in shape):
        raise FormatError(f"{what}: invalid shape {shape!r}")
    return tuple(shape)


def decode_array(rec: Any, sr: StreamReader, what: str) -> np.ndarray:
    """Rebuilds the array of a record written by :func:`encode_array`, validating it fully first."""
    head = check_array_record(rec, what)
    dt, shape, streams = head.dtype, head.shape, head.streams
    n = math.prod(shape)
    nbytes = n * dt.itemsize
    if head.kind == "dense":
        sr.budget.charge(nbytes, what)
        bufs = [sr.get(i, n, n, what) for i in streams]
        return from_planes(bufs, n, dt).reshape(shape)
    nnz, pos_kind = head.nnz, head.pos
    sr.budget.charge(nbytes + 9 * nnz, what)  # the output, the values and the int64 positions
    if pos_kind == "bitmask":
        bits = sr.get(streams[0], (n + 7) // 8, (n + 7) // 8, what)
        mask = np.unpackbits(bits, count=n, bitorder="little").view(bool)
        if int(np.count_nonzero(mask)) != nnz:
            raise FormatError(f"{what}: the bitmask marks {int(np.count_nonzero(mask))} elements, the header says {nnz}")
        if n % 8 and bits[-1] >> (n % 8):
            raise FormatError(f"{what}: the bitmask has bits set past the end of the array")
        index: np.ndarray = mask
    else:
        width = 8 if pos_kind == "delta8" else 16
        step = width // 8
        top = (1 << width) - 1
        sr.budget.charge(8 * (nnz + n // top), what)
        codes = sr.get(streams[0], step * nnz, step * (nnz + n // top), what)
        if codes.size % step:
            raise FormatError(f"{what}: {pos_kind} stream of odd length {codes.size}")
        index = delta_decode(codes.view(f"<u{step}"), width, nnz, n)
    vals = [sr.get(i, nnz, nnz, what) for i in streams[1:]]
    out = np.zeros(n, dt)
    out[index] = from_planes(vals, nnz, dt)
    return out.reshape(shape)
