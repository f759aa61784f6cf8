"""save / load / size_report: the public face of the compact model file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.bitpack import pack_np
from compressjax.export import _codebook, _codec, _container, _structure
from compressjax.export import _validate as v
from compressjax.export._container import FormatError
from compressjax.pruning import apply_masks
from compressjax.qarray import PARTS_FORMAT, Layout, QArray, code_range
from compressjax.quantization import dequantize as _dequantize
from compressjax.quantization import quantize_params
from compressjax.tree import leaves_with_paths

_EXPANSION_LIMIT = 1024  # default max_bytes: max(1 GiB, 1024 x file size)
_PARALLEL_LEAVES_BYTES = 16 << 20  # trees at least this large are encoded/decoded leaf-parallel


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _is_leaf(x: Any) -> bool:
    return _structure.is_array(x) or _is_qarray(x) or _codebook.is_codebook(x)


@dataclasses.dataclass(frozen=True)
class LeafSize:
    """Storage of one leaf: ``stored_bytes`` in the file for ``num_elements`` weights."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    nnz: int
    stored_bytes: int
    # Codebook leaves only: measured bits per stored index and the indices' Shannon entropy (bits).
    index_bits: float | None = None
    index_entropy: float | None = None

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.num_elements if self.num_elements else 0.0

    @property
    def ratio(self) -> float:
        """Dense float32 bytes over stored bytes."""
        return 4 * self.num_elements / self.stored_bytes if self.stored_bytes else math.inf


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Bytes on disk per leaf and in total, against the same weights stored as dense float32.

    ``total_bytes`` is the exact file size; ``overhead_bytes`` is the preamble and the JSON header (tree
    structure, shapes, stream table). ``str(report)`` is a table.
    """

    leaves: tuple[LeafSize, ...]
    total_bytes: int
    overhead_bytes: int

    @property
    def num_weights(self) -> int:
        return sum(leaf.num_elements for leaf in self.leaves)

    @property
    def dense_float32_bytes(self) -> int:
        return 4 * self.num_weights

    @property
    def ratio(self) -> float:
        """How many times smaller the file is than dense float32 storage of every weight."""
        return self.dense_float32_bytes / self.total_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.num_weights if self.num_weights else 0.0

    def to_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes, "overhead_bytes": self.overhead_bytes,
            "dense_float32_bytes": self.dense_float32_bytes, "ratio": self.ratio,
            "bits_per_weight": self.bits_per_weight,
            "leaves": [dict(dataclasses.asdict(leaf), bits_per_weight=leaf.bits_per_weight) for leaf in self.leaves],
        }

    def __str__(self) -> str:
        head = ("leaf", "shape", "dtype", "encoding", "density", "bytes", "bits/w", "x f32")
        rows = [
            (leaf.path or "<root>", "x".join(map(str, leaf.shape)) or "()", leaf.dtype,
             leaf.encoding if leaf.index_bits is None else  # codebooks: measured bits per index vs entropy
             f"{leaf.encoding} {leaf.index_bits:.2f}b/idx H={leaf.index_entropy:.2f}",
             f"{leaf.nnz / leaf.num_elements:.3f}" if leaf.num_elements else "-", f"{leaf.stored_bytes:,}",
             f"{leaf.bits_per_weight:.2f}", f"{leaf.ratio:.1f}")
            for leaf in self.leaves
        ]
        rows.append(("(header)", "", "", "", "", f"{self.overhead_bytes:,}", "", ""))
        rows.append(("total", f"{self.num_weights:,} w", "", "", "", f"{self.total_bytes:,}",
                     f"{self.bits_per_weight:.2f}", f"{self.ratio:.1f}"))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {4, 5, 6, 7}
        fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()  # noqa: E731
        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])


def _prepare(params: Any, masks: Any, rules: Any) -> Any:
    if masks is not None or rules is not None:
        is_q = lambda x: isinstance(x, QArray) or _codebook.is_codebook(x)  # noqa: E731
        quantized = [p for p, x in leaves_with_paths(params, is_leaf=is_q) if is_q(x)]
        kinds = {type(x).__name__ for _, x in leaves_with_paths(params, is_leaf=is_q) if is_q(x)}
        kind = " and ".join(sorted(kinds))  # "QArray", "Codebook" or both
        if quantized:
            raise ValueError(
                f"params already hold {kind} leaves (e.g. {quantized[0]!r}); masks= and rules= "
                "apply to float params: save the quantized tree as it is, or pass the float params with masks/rules"
            )
    if masks is not None:
        params = apply_masks(params, masks)
    if rules is not None:
        params = quantize_params(params, rules)
    return params


def _host(x: Any, path: str) -> np.ndarray:
    _check_leaf(x, path)
    return np.asarray(x)


def _check_leaf(x: Any, path: str) -> None:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"leaf {path!r} is a tracer: save() runs outside jax.jit on concrete arrays")
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise TypeError(f"leaf {path!r} is a typed PRNG key array; save jax.random.key_data(key) instead")
    if not _is_qarray(x) and not _codebook.is_codebook(x):
        _codec.dtype_name(x.dtype, path)


def _plan_leaf(x: Any, path: str, sw: _codec.StreamWriter) -> tuple[dict, tuple]:
    """The leaf's record with candidate streams (not yet committed) and its report fields."""
    if _codebook.is_codebook(x):
        _check_leaf(x.indices, path)
        _check_leaf(x.centroids, path)
        return _codebook.plan(x, path, sw)
    if _is_qarray(x):
        arrays, meta = x.to_parts()
        ints = _host(x.ints(), path)
        rec = {"e": "q", "meta": meta, "codes": _codec.encode_array(ints, path, sw),
               "scale": _codec.encode_array(arrays["scale"], path, sw)}
        if "zero_point" in arrays:
            rec["zp"] = _codec.encode_array(arrays["zero_point"], path, sw)
        codes = rec["codes"]
        enc = f"int{x.bits} " + (f"sparse/{codes['pos']}" if codes["e"] == "sparse" else "dense")
        return rec, (path, tuple(x.shape), x.dtype.name, enc, int(codes.get("nnz", x.size)))
    arr = _host(x, path)
    rec = _codec.encode_array(arr, path, sw)
    enc = f"sparse/{rec['pos']}" if rec["e"] == "sparse" else "dense"
    return rec, (path, tuple(arr.shape), rec["dt"], enc, int(rec.get("nnz", arr.size)))


def _encode(params: Any, masks: Any, rules: Any, level: int | None) -> tuple[list, SizeReport]:
    if sys.byteorder != "little":
        raise NotImplementedError("the compressjax file format is written on little-endian machines only")
    params = _prepare(params, masks, rules)
    node, leaves = _structure.flatten(params, _is_leaf)
    for path, x in leaves:  # fail fast, before any work, on what cannot be stored
        _check_leaf(x, path)
    sw = _codec.StreamWriter(level)
    big = sum(getattr(x, "size", 0) for _, x in leaves) * 4 >= _PARALLEL_LEAVES_BYTES
    if big:
        planned = [_codec.leaf_pool().submit(_plan_leaf, x, path, sw) for path, x in leaves]
    records, sizes = [], []
    for i, (path, x) in enumerate(leaves):
        rec, info = planned[i].result() if big else _plan_leaf(x, path, sw)
        first = len(sw.table)
        records.append(_codec.commit_record(rec, sw))
        size = LeafSize(*info, sum(entry[1] for entry in sw.table[first:]))
        if rec.get("e") == "cb":
            size = dataclasses.replace(size, **dict(zip(("index_bits", "index_entropy"), _codebook.index_stats(rec, sw.table, size.num_elements), strict=True)))
        sizes.append(size)
    header = {"format": "compressjax", "tree": node, "leaves": records, "streams": sw.table}
    header_json = json.dumps(header, separators=(",", ":")).encode()
    chunks = _container.assemble(header_json, sw.chunks, sw.payload_hash())
    total = sum(len(c) for c in chunks)
    payload = sum(s.stored_bytes for s in sizes)
    return chunks, SizeReport(tuple(sizes), total, total - payload)


def save(path: str | bytes | os.PathLike, params: Any, *, masks: Any = None, rules: Any = None, level: int | None = None) -> SizeReport:
    """Writes ``params`` to one compact file; what is stored is ``quantize_params(apply_masks(params, masks), rules)``.

    Each array is stored dense, or sparse as its non-zero values plus their positions (a bitmask or Deep
    Compression-style relative indices, whichever is smaller); each :class:`~compressjax.QArray` (given, or
    made on the fly by ``rules``) as its integer codes (sparse when that is smaller) plus scales; each
    :class:`~compressjax.Codebook` as its indices (entropy coded, sparse when pruned) plus its centroids in
    their own dtype (see ``compressjax.export._codebook``). Every
    stream is zstd-coded when that makes it smaller (Han et al., 2016, "Deep Compression: Compressing Deep
    Neural Networks with Pruning, Trained Quantization and Huffman Coding", ICLR). The write is atomic: a
    temporary file in the same folder (``.{name}.{pid}.{random}.cjx-tmp``), flushed and fsynced, then renamed
    over ``path``; a temporary left by a killed save is removed by the next save of the same path.

    What happens at ``path`` follows ``numpy.save`` and ``safetensors``: a new file gets mode ``0o666`` minus
    the umask, an existing file keeps its mode, a symbolic link is followed (its target is replaced, the link
    stays), and a read-only file is refused with ``PermissionError`` rather than replaced.

    Args:
        path: the file to write (replaced atomically if it exists): ``str``, ``bytes`` (as ``open`` takes it,
            and as :func:`load` accepts it) or ``os.PathLike``.
        params: a pytree of dicts, lists, tuples, ``nnx.State``/NNX variables, ``FrozenDict``, arrays,
            QArrays, ``None`` and Python scalars (see ``compressjax.export._structure``).
        masks: optional pruning masks (as from ``magnitude_masks``), applied with ``apply_masks`` first.
        rules: optional quantization rules (a ``QuantSpec`` or a ``{regex: spec}`` mapping), applied with
            ``quantize_params`` after the masks.
        level: zstd level for every stream; ``None`` picks per stream (19 up to 128 KiB; above, level 1
            with long minimum matches, which codes quantized integers, positions and float exponent bytes
            about as small as level 19 at hundreds of MB/s).

    Returns:
        The :class:`SizeReport` of the file written.

    Raises:
        TypeError: for a container, dtype or leaf the format cannot store (naming its path), or a ``path``
            that is not a ``str``, ``bytes`` or ``os.PathLike``.
        ValueError: for a tree whose structure alone is too large for :func:`load` to accept (its JSON
            description over 64 x the file size, e.g. hundreds of thousands of ``None`` leaves).
        PermissionError: ``path`` is a read-only file or its folder cannot be written.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"save(path=...) must be a str, bytes or os.PathLike file path, got {type(path).__name__}")
    chunks, report = _encode(params, masks, rules, level)
    _container.atomic_write(path, chunks)
    return report


def _decode_leaf(rec: Any, sr: _codec.StreamReader, what: str, dequantize: bool) -> Any:
    if not isinstance(rec, dict):
        raise FormatError(f"{what}: malformed leaf record")
    if rec.get("e") == "cb":
        return _codebook.decode(rec, sr, what, dequantize)
    if rec.get("e") != "q":
        arr = _codec.decode_array(rec, sr, what)
        if jax.dtypes.canonicalize_dtype(arr.dtype) != arr.dtype:
            return arr  # a 64-bit array (complex128 included) with x64 off stays NumPy: jax would narrow it
        return jnp.asarray(arr)
    meta = _check_q_record(rec, what, sr.entries)
    ints = _codec.decode_array(rec["codes"], sr, what + " codes")
    scale = _codec.decode_array(rec["scale"], sr, what + " scale")
    zp = _codec.decode_array(rec["zp"], sr, what + " zero point") if "zp" in rec else None
    if ints.dtype != np.int8 or list(ints.shape) != meta["shape"]:
        raise FormatError(f"{what}: the integer codes ({ints.dtype} {ints.shape}) do not match the metadata shape {meta['shape']}")
    want = meta["layout"].scale_shape
    if scale.dtype != np.float32 or scale.shape != want:
        raise FormatError(f"{what}: the scales ({scale.dtype} {scale.shape}) must be float32 of shape {want}")
    if zp is not None and (zp.dtype != np.int32 or zp.shape != want):
        raise FormatError(f"{what}: the zero points ({zp.dtype} {zp.shape}) must be int32 of shape {want}")
    sr.budget.charge(8 * ints.size, what)  # the float32 codes and the result inside dequantize
    try:
        q = _qarray_from_codes(ints, scale, zp, meta, what)
        return _dequantize(q, path=what) if dequantize else q
    except (TypeError, ValueError, ArithmeticError) as e:
        raise FormatError(f"{what}: invalid quantized array: {e}") from e


def _check_q_record(rec: dict, what: str, entries: list | None) -> dict:
    """A QArray record's metadata and its code, scale and zero-point records, checked against each other
    without reading a stream (shared by ``load`` and ``size_report``); returns the checked metadata."""
    v.require_keys(rec, what, required={"e", "meta", "codes", "scale"}, optional={"zp"})
    meta = _check_qmeta(rec["meta"], "zp" not in rec, what)
    codes = _codec.check_array_record(rec["codes"], what + " codes", entries)
    if codes.dtype != np.int8 or list(codes.shape) != meta["shape"]:
        raise FormatError(f"{what}: the integer codes ({codes.dtype} {codes.shape}) do not match the metadata shape {meta['shape']}")
    want = meta["layout"].scale_shape
    scale = _codec.check_array_record(rec["scale"], what + " scale", entries)
    if scale.dtype != np.float32 or scale.shape != tuple(want):
        raise FormatError(f"{what}: the scales ({scale.dtype} {scale.shape}) must be float32 of shape {want}")
    if "zp" in rec:
        zp = _codec.check_array_record(rec["zp"], what + " zero point", entries)
        if zp.dtype != np.int32 or zp.shape != tuple(want):
            raise FormatError(f"{what}: the zero points ({zp.dtype} {zp.shape}) must be int32 of shape {want}")
    return dict(meta, _heads=(codes, scale, zp if "zp" in rec else None))


_QMETA_KEYS = ("format", "bits", "shape", "dtype", "symmetric", "packed", "channel_axes", "group_size", "group_axis")


def _float_dtype_names() -> tuple[str, ...]:
    return tuple(n for n, dt in _codec._DTYPES.items() if jnp.issubdtype(dt, jnp.floating))


def _check_qmeta(meta: Any, symmetric_from_streams: bool, what: str) -> dict:
    """Every field of a QArray record's metadata, checked alone and against the others (``FormatError``).

    Returns the metadata with a ``"layout"`` entry (the :class:`compressjax.qarray.Layout` it describes).
    """
    what = f"{what} metadata"
    v.require_keys(meta, what, required=_QMETA_KEYS)
    v.require_choice(meta, "format", (PARTS_FORMAT,), what)
    bits = v.require_int(meta, "bits", 1, 8, what)
    shape = _codec.check_shape(meta["shape"], what)
    nd = len(shape)
    v.require_choice(meta, "dtype", _float_dtype_names(), what)
    symmetric = v.require_bool(meta, "symmetric", what)
    if symmetric != symmetric_from_streams:
        raise FormatError(f"{what}: symmetric={symmetric} but the record {'has' if not symmetric_from_streams else 'lacks'} zero points")
    if bits == 1 and not symmetric:
        raise FormatError(f"{what}: a 1-bit QArray must be symmetric")
    if v.require_bool(meta, "packed", what) != (bits <= 4):
        raise FormatError(f"{what}: packed={meta['packed']} does not match bits={bits}")
    axes = v.require_int_list(meta, "channel_axes", -nd, nd - 1, what, max_len=nd)
    group_size = v.require_optional_int(meta, "group_size", 1, max(shape, default=0), what)
    if group_size is None:
        if meta["group_axis"] is not None:
            raise FormatError(f"{what}: group_axis={meta['group_axis']!r} without a group_size")
    else:
        v.require_int(meta, "group_axis", 0, nd - 1, what)
    try:
        layout = Layout(shape, axes, group_size, meta["group_axis"], what)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise FormatError(f"{what}: {e}") from e
    return dict(meta, layout=layout)


def pack_codes_np(ints: np.ndarray, bits: int) -> np.ndarray:
    """NumPy twin of ``compressjax.qarray.codes_to_storage`` for 1-4 bits (the documented export layout:
    unsigned code ``u = q + 2^(b-1)``, or ``(q + 1) / 2`` for 1 bit, at bits ``[b*i, b*i + b)`` of a
    little-endian bit stream). Eager JAX packing costs ~10x more on large leaves; a test checks both agree."""
    flat = ints.reshape(-1)
    u = (flat > 0).astype(np.uint8) if bits == 1 else (flat.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return pack_np(u, bits)


def _qarray_from_codes(ints: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, meta: dict, what: str):
    """A validated QArray from decoded integer codes (range-checked here: a forged code must not wrap)."""
    bits = meta["bits"]
    lo, hi = code_range(bits, zp is None)
    if ints.size and (int(ints.min()) < lo or int(ints.max()) > hi or (bits == 1 and not ints.all())):
        raise FormatError(f"{what}: {bits}-bit codes outside [{lo}, {hi}]")
    values = pack_codes_np(ints, bits) if bits <= 4 else ints
    arrays = {"values": values, "scale": scale} | ({} if zp is None else {"zero_point": zp})
    return QArray.from_parts(arrays, {k: meta[k] for k in _QMETA_KEYS}, path=what)


def _header_budget(max_bytes: int | None, file_size: int) -> int:
    """The most bytes of header JSON a load may parse: what the file may hold, and what ``max_bytes`` pays for
    (the file itself plus the parsed JSON's Python objects, at most ``HEADER_EXPANSION`` bytes per byte)."""
    limit = _container.header_limit(file_size)
    if max_bytes is not None:
        limit = min(limit, max(0, max_bytes - file_size) // _container.HEADER_EXPANSION)
    return limit


def _decode(data: bytes | bytearray, *, dequantize: bool, max_bytes: int | None) -> tuple[Any, dict]:
    header_json, payload, verify, flags = _container.parse(data, max_header_raw=_header_budget(max_bytes, len(data)))
    if max_bytes is not None:  # the file and the parsed header are allocations of this load too
        max_bytes -= len(data) + _container.HEADER_EXPANSION * len(header_json)
    try:
        out = _decode_verified_later(header_json, payload, flags, dequantize=dequantize, max_bytes=max_bytes)
    except FormatError:
        verify()  # a corrupted file is reported as such, whatever the decoder tripped on first
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, ArithmeticError, RecursionError) as e:
        verify()
        # Intact bytes, but a header we did not write (every field is checked; this is the safety net).
        raise FormatError(f"malformed header: {type(e).__name__}: {e}") from e
    verify()
    return out


def _decode_verified_later(
    header_json: bytes, payload: memoryview, flags: int, *, dequantize: bool, max_bytes: int | None
) -> tuple[Any, dict]:
    header = _parse_header(header_json)
    records = header["leaves"]
    budget = _codec.Budget(max_bytes)
    sr = _codec.StreamReader(payload, header.get("streams"), budget, flags)
    decode = lambda i: _decode_leaf(records[i], sr, f"leaf #{i}", dequantize)  # noqa: E731
    if len(payload) >= _PARALLEL_LEAVES_BYTES // 4 and len(records) > 1:
        leaves = list(_codec.leaf_pool().map(decode, range(len(records))))
    else:
        leaves = [decode(i) for i in range(len(records))]
    if len(sr.used) != len(sr.entries):
        raise FormatError(f"{len(sr.entries) - len(sr.used)} streams of the payload are not referenced by any leaf")
    return _structure.unflatten(header.get("tree"), leaves), header


def _parse_header(header_json: bytes) -> dict:
    """The header object, with its top-level fields checked (their contents are checked where they are used)."""
    try:
        header = json.loads(header_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, int digit limit
        raise FormatError(f"the header is not valid JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != "compressjax":
        raise FormatError("the header does not describe a compressjax model")
    v.require_keys(header, "the header", required={"format", "tree", "leaves", "streams"})
    if not isinstance(header["leaves"], list) or not isinstance(header["streams"], list):
        raise FormatError("the header's leaf list or stream table is not a list")
    if len(header["leaves"]) > len(header["streams"]):  # every leaf record names at least one stream
        raise FormatError(f"the header lists {len(header['leaves'])} leaves but only {len(header['streams'])} streams")
    return header


def _check_max_bytes(max_bytes: Any) -> int | None | str:
    if max_bytes is None or (isinstance(max_bytes, str) and max_bytes == "auto"):
        return max_bytes
    if isinstance(max_bytes, str):  # the right type for "auto", a wrong value
        raise ValueError(f"load(max_bytes=...) must be an int, None or 'auto', got {max_bytes!r}")
    if isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes, (int, np.integer)):
        raise TypeError(f"load(max_bytes=...) must be an int, None or 'auto', got {max_bytes!r} ({type(max_bytes).__name__})")
    if max_bytes < 0:
        raise ValueError(f"load(max_bytes=...) must be >= 0, got {max_bytes}")
    return int(max_bytes)


def load(path: str | os.PathLike, *, dequantize: bool = True, max_bytes: int | None | str = "auto") -> Any:
    """Reads a file written by :func:`save`; returns the params with dense arrays.

    The result equals ``dequantize_params(quantize_params(apply_masks(params, masks), rules))`` of what was
    saved bit for bit (same tree structure, dtypes and values; ``-0.0`` and NaN payloads included), with
    ``nnx.State`` and NNX variables rebuilt as such, so ``nnx.update(model, load(path))`` works. Quantized
    leaves are dequantized with :func:`compressjax.dequantize` itself. Arrays come back as ``jax.Array``
    (NumPy leaves included), except 64-bit ones while ``jax_enable_x64`` is off, which stay NumPy rather
    than being narrowed.

    Args:
        path: the file.
        dequantize: ``False`` returns quantized leaves as :class:`~compressjax.QArray` instead.
        max_bytes: the most bytes the load may allocate (the file's bytes, its parsed header and the
            arrays); ``"auto"`` allows ``max(1 GiB, 1024 x file size)``, ``None`` means no limit beyond the
            format's own (a header's JSON is at most 64 x the file size). A file whose declared sizes need
            more raises ``FormatError`` before allocating.

    On untrusted files: nothing in a file is executed or imported (no pickle; NNX variable classes come from
    a fixed table), memory and time are bounded by the file's size and ``max_bytes`` (every length is
    checked before the bytes are read, decompressed, parsed or allocated), and anything wrong with the
    file is a ``FormatError``.

    Raises:
        FormatError: the file is not a compressjax file, or is truncated, corrupted, from a newer format
            version, internally inconsistent, or needs more than ``max_bytes``; the message says which.
        TypeError: ``max_bytes`` is not an int, ``None`` or a string (``bool`` included), or ``dequantize``
            is not a bool.
        ValueError: ``max_bytes`` is negative, or a string other than ``"auto"``.
        OSError: the file cannot be opened or read (``FileNotFoundError``, ``PermissionError``, ...).
    """
    max_bytes = _check_max_bytes(max_bytes)
    if not isinstance(dequantize, (bool, np.bool_)):
        raise TypeError(f"load(dequantize=...) must be a bool, got {dequantize!r}")
    if max_bytes == "auto":
        max_bytes = max(1 << 30, _EXPANSION_LIMIT * os.stat(path).st_size)
    data = _container.read_file(path, max_bytes)
    tree, _ = _decode(data, dequantize=bool(dequantize), max_bytes=max_bytes)
    return tree


class _Marker:
    """Stands for a leaf when only the tree's paths are needed."""


def _report_from_header(header: dict, total: int, payload_len: int) -> SizeReport:
    """The report of a file from its header alone, after the checks ``load`` makes before reading a stream
    (the same functions: a header that ``load`` rejects is rejected here too, with ``FormatError``)."""
    entries = _codec.check_table(header["streams"], payload_len)
    sizes, used = [], set()
    for i, rec in enumerate(header["leaves"]):
        what = f"leaf #{i}"
        if not isinstance(rec, dict):
            raise FormatError(f"{what}: malformed leaf record")
        if rec.get("e") == "cb":
            info, stored, bpi, h, streams = _codebook.report_leaf(rec, entries, what)
            size = LeafSize(*info, stored, index_bits=bpi, index_entropy=h)
        elif rec.get("e") == "q":
            meta = _check_q_record(rec, what, entries)
            codes = meta["_heads"][0]
            streams = [s for head in meta["_heads"] if head is not None for s in head.streams]
            size = LeafSize(what, tuple(meta["shape"]), meta["dtype"], f"int{meta['bits']} {codes.encoding}", codes.nnz,
                            sum(entries[s][2] for s in streams))
        else:
            head = _codec.check_array_record(rec, what, entries)
            streams = head.streams
            size = LeafSize(what, head.shape, rec["dt"], head.encoding, head.nnz, sum(entries[s][2] for s in streams))
        for s in streams:
            if s in used:
                raise FormatError(f"{what}: stream {s} is referenced twice")
            used.add(s)
        sizes.append(size)
    if len(used) != len(entries):
        raise FormatError(f"{len(entries) - len(used)} streams of the payload are not referenced by any leaf")
    payload = sum(s.stored_bytes for s in sizes)
    return SizeReport(tuple(sizes), total, total - payload)


def _report_file(path: Any) -> SizeReport:
    with _container.HeaderReader(path) as reader:  # reads the preamble and the header, never the payload at once
        try:
            header = _parse_header(reader.header_json)
            report = _report_from_header(header, reader.size, reader.payload_len)
            markers = [_Marker() for _ in header["leaves"]]
            tree = _structure.unflatten(header["tree"], markers)
            order = {id(m): p for p, m in _structure.flatten(tree, lambda x: isinstance(x, _Marker))[1]}
            paths = [order[id(m)] for m in markers]
        except Exception as e:
            # A corrupted file is reported as such (checked first when that is cheap); otherwise the header
            # is intact and was not written by us: every field is checked, this is the safety net.
            reader.verify_if_small()
            if isinstance(e, FormatError):
                raise
            if isinstance(e, (KeyError, TypeError, IndexError, AttributeError, ValueError, ArithmeticError, RecursionError)):
                raise FormatError(f"malformed header: {type(e).__name__}: {e}") from e
            raise
        reader.verify()  # the report is returned only once the whole file's checksum matched
    return dataclasses.replace(
        report, leaves=tuple(dataclasses.replace(s, path=p) for s, p in zip(report.leaves, paths, strict=True))
    )


def size_report(path_or_params: Any, *, masks: Any = None, rules: Any = None, level: int | None = None) -> SizeReport:
    """Per-leaf and total bytes, bits per weight and the ratio against dense float32.

    Args:
        path_or_params: a file written by :func:`save` (``str``, ``bytes`` or ``os.PathLike``), or a params
            pytree, which is encoded in memory exactly as :func:`save` would write it. A file's header is
            validated with the same checks as :func:`load` (every record, shape, count and stream length)
            and its checksum verified while the payload is streamed through SHA-256 in 1 MiB pieces: memory
            stays within the header's bound (at most 64 x the file size of JSON, 256 MiB, before anything is
            parsed) plus 1 MiB, whatever the file declares; time is one read of the file.
        masks, rules, level: as for :func:`save` (only with params).

    Returns:
        A :class:`SizeReport`; ``print(report)`` shows the table.

    Raises:
        FormatError: a file that ``load`` would reject for its preamble, header or checksum.
        OSError: the file cannot be opened or read.
    """
    if isinstance(path_or_params, (str, bytes, os.PathLike)):
        if masks is not None or rules is not None:
            raise ValueError("masks= and rules= apply to params, not to a saved file")
        return _report_file(path_or_params)
    _, report = _encode(path_or_params, masks, rules, level)
    return report
