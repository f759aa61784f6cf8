"""File records for weight-shared :class:`~compressjax.Codebook` leaves.

A codebook leaf is stored as one JSON record::

    {"e": "cb", "meta": {"format": "compressjax.codebook/1", "bits": b, "shape": [...], "dtype": "float32",
                         "per_channel": bool, "zero": bool, "layers": [axes]},
     "idx": <index record>, "c": <array record of the centroids>, "h": <Shannon entropy, bits per index>}

The indices are entropy coded: the index record is either an ordinary array record
(:func:`compressjax.export._codec.encode_array`) of the unpacked ``uint8`` indices, dense or sparse (index 0
of a ``zero_reserved`` codebook is the pruned weights' code, so a pruned leaf is stored as positions plus
the surviving indices), each byte stream coded by zstd, whose literal coder is Huffman / FSE, or, when
smaller, ``{"e": "packed", "s": [i]}``: the bit-packed stream of :func:`compressjax.bitpack.pack`
as one stream. ``"layers"`` (the ``layer_axes`` of a stacked codebook, one codebook set per layer slice) is
written only when not empty, so files of unstacked codebooks are unchanged. The centroids are stored in their own dtype (float32, or float16 / bfloat16 after
``Codebook.astype_centroids``), so a round trip is bit-exact. ``"h"`` is the empirical entropy of the
indices, kept so that :func:`~compressjax.size_report` can print the measured bits per index next to the
ideal (Han et al., 2016, "Deep Compression", ICLR: Huffman coding of the shared-weight indices).

Every field is validated on load (``FormatError`` otherwise) and every allocation is bounded by the
declared shape and charged to the load's byte budget before it happens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from compressjax.bitpack import pack_np, unpack_np
from compressjax.codebook import Codebook
from compressjax.codebook._codebook import centroid_shape
from compressjax.export import _codec
from compressjax.export._container import FormatError

FORMAT = "compressjax.codebook/1"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_CENTROID_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_codebook(x: Any) -> bool:
    return isinstance(x, Codebook)


def entropy_bits(u: np.ndarray, k: int) -> float:
    """Empirical Shannon entropy of the indices ``u``, in bits per index."""
    if u.size == 0:
        return 0.0
    p = np.bincount(u.reshape(-1), minlength=k).astype(np.float64) / u.size
    p = p[p > 0]
    return float(max(0.0, -np.sum(p * np.log2(p))))


def plan(x: Any, path: str, sw: _codec.StreamWriter) -> tuple[dict, tuple]:
    """The leaf's record with candidate streams (committed later) and its :class:`LeafSize` fields."""
    packed = np.asarray(x.indices)
    centroids = np.asarray(x.centroids)
    n = x.size
    u = unpack_np(packed, x.bits, n).reshape(x.shape)
    coded = _codec.encode_array(u, path + " indices", sw)
    bitpacked = sw.compress(packed)
    if len(bitpacked[1]) < sum(len(c[1]) for c in coded["s"]):
        coded = {"e": "packed", "s": [bitpacked]}
    meta = {"format": FORMAT, "bits": x.bits, "shape": list(x.shape), "dtype": x.dtype.name,
            "per_channel": x.per_channel, "zero": x.zero_reserved}
    if x.layer_axes:
        meta["layers"] = list(x.layer_axes)
    rec = {"e": "cb", "meta": meta, "idx": coded, "c": _codec.encode_array(centroids, path + " centroids", sw),
           "h": round(entropy_bits(u, 1 << x.bits), 4)}
    nnz = int(coded.get("nnz", n)) if coded["e"] == "sparse" else int(np.count_nonzero(u)) if x.zero_reserved else n
    return rec, (path, tuple(x.shape), x.dtype.name, _encoding(rec), nnz)


def _encoding(rec: dict) -> str:
    meta, idx = rec["meta"], rec["idx"]
    kind = {"sparse": f"sparse/{idx.get('pos')}", "dense": "dense", "packed": "packed"}.get(idx.get("e"), "?")
    return f"cb{meta['bits']}{'/ch' if meta['per_channel'] else ''}{'/layer' if meta.get('layers') else ''} {kind}"


def index_stats(rec: dict, table: list, n: int) -> tuple[float, float]:
    """``(measured bits per index, Shannon entropy)`` of a committed record (stream table ``table``)."""
    stored = sum(int(table[s][1]) for s in rec["idx"]["s"])
    h = rec.get("h")
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not (0.0 <= h <= 8.0):
        raise FormatError(f"invalid index entropy {h!r} in a codebook record")
    return (8.0 * stored / n if n else 0.0), float(h)


def record_streams(rec: dict) -> list:
    return [*rec["idx"]["s"], *rec["c"]["s"]]


def _meta(rec: dict, what: str) -> tuple[int, tuple[int, ...], str, bool, bool, tuple[int, ...]]:
    meta = rec.get("meta")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{what}: malformed codebook metadata (expected format {FORMAT!r})")
    extra = set(meta) - {"format", "bits", "shape", "dtype", "per_channel", "zero", "layers"}
    if extra:
        raise FormatError(f"{what}: unknown codebook metadata fields {sorted(extra)}")
    bits = meta.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise FormatError(f"{what}: invalid codebook bit width {bits!r}")
    shape = _codec.check_shape(meta.get("shape"), what)
    dtype = meta.get("dtype")
    if dtype not in _FLOAT_DTYPES:
        raise FormatError(f"{what}: invalid codebook dtype {dtype!r}")
    per_channel, zero = meta.get("per_channel"), meta.get("zero")
    if not isinstance(per_channel, bool) or not isinstance(zero, bool):
        raise FormatError(f"{what}: per_channel and zero must be booleans, got {per_channel!r} and {zero!r}")
    if per_channel and not shape:
        raise FormatError(f"{what}: a per-channel codebook needs an array with at least one axis")
    layers = meta.get("layers", [])
    if (not isinstance(layers, list) or len(layers) > len(shape)
            or any(not isinstance(a, int) or isinstance(a, bool) for a in layers)
            or layers != sorted(set(layers)) or any(not 0 <= a < len(shape) for a in layers)
            or (per_channel and len(shape) - 1 in layers)):
        raise FormatError(f"{what}: invalid codebook layer axes {str(layers)[:80]} for the shape {shape}")
    return bits, shape, dtype, per_channel, zero, tuple(layers)


class RecordHeader:
    """What a codebook record declares, checked against itself (see :func:`check_record`)."""

    def __init__(self, bits, shape, dtype, per_channel, zero, layers, idx_head, c_head, streams):
        self.bits, self.shape, self.dtype, self.per_channel, self.zero = bits, shape, dtype, per_channel, zero
        self.layers = layers
        self.idx_head, self.c_head, self.streams = idx_head, c_head, streams

    @property
    def nnz(self) -> int:
        n = math.prod(self.shape)
        return n if self.idx_head is None else self.idx_head.nnz


def check_record(rec: Any, what: str, entries: list | None = None) -> RecordHeader:
    """Every field of a codebook record that can be judged without its streams: the metadata, the index
    record (bit-packed, or an array record of ``uint8`` indices of the leaf's shape with a valid ``nnz``),
    the centroid record (a float array of ``(2^bits,)``, or ``(channels, 2^bits)`` per channel), the entropy,
    and (given the stream table's ``entries``) each stream's declared length. ``load`` and ``size_report``
    both call it, so they accept and reject the same headers (``FormatError``)."""
    if not isinstance(rec, dict):
        raise FormatError(f"{what}: malformed codebook record")
    bits, shape, dtype, per_channel, zero, layers = _meta(rec, what)
    if set(rec) - {"e", "meta", "idx", "c", "h"}:
        raise FormatError(f"{what}: unknown codebook record fields {sorted(map(str, set(rec) - {'e', 'meta', 'idx', 'c', 'h'}))[:5]}")
    h = rec.get("h")
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 <= h <= 8.0:
        raise FormatError(f"{what}: invalid index entropy {h!r} in a codebook record"[:200])
    n = math.prod(shape)
    idx = rec.get("idx")
    if not isinstance(idx, dict):
        raise FormatError(f"{what}: malformed codebook index record")
    if idx.get("e") == "packed":
        streams = idx.get("s")
        if set(idx) != {"e", "s"} or not isinstance(streams, list) or len(streams) != 1:
            raise FormatError(f"{what}: malformed packed index record")
        if entries is not None:
            plen = -(-n * bits // 8)
            _codec.check_stream(entries, streams[0], plen, plen, what + " indices")
        idx_head = None
        idx_streams = list(streams)
    else:
        idx_head = _codec.check_array_record(idx, what + " indices", entries)
        if idx_head.dtype != np.uint8 or idx_head.shape != shape:
            raise FormatError(f"{what}: the indices ({idx_head.dtype} {idx_head.shape}) do not match the metadata {shape}")
        idx_streams = list(idx_head.streams)
    c_head = _codec.check_array_record(rec.get("c"), what + " centroids", entries)
    want = centroid_shape(shape, bits, per_channel, layers)
    if c_head.dtype.name not in _CENTROID_DTYPES or c_head.shape != want:
        raise FormatError(f"{what}: the centroids ({c_head.dtype} {c_head.shape}) do not match the metadata "
                          f"(float {want}: bits={bits}, per_channel={per_channel}, layer axes {layers})")
    return RecordHeader(bits, shape, dtype, per_channel, zero, layers, idx_head, c_head,
                        idx_streams + list(c_head.streams))


def report_leaf(rec: dict, entries: list, what: str) -> tuple[tuple, int, float, float, list]:
    """``(LeafSize fields, stored bytes, bits per index, entropy, streams)`` of a record, from the header alone,
    after :func:`check_record`."""
    head = check_record(rec, what, entries)
    n = math.prod(head.shape)
    stored_idx = sum(entries[s][2] for s in rec["idx"]["s"])
    bpi = 8.0 * stored_idx / n if n else 0.0
    stored = sum(entries[s][2] for s in head.streams)
    return (what, head.shape, head.dtype, _encoding(rec), int(head.nnz)), stored, bpi, float(rec["h"]), head.streams


def decode(rec: dict, sr: _codec.StreamReader, what: str, dequantize: bool) -> Any:
    """Rebuilds the Codebook (or, with ``dequantize``, its decoded float array) of a record, validated."""
    import jax.numpy as jnp

    head = check_record(rec, what, sr.entries)
    bits, shape, dtype, per_channel, zero, layers = head.bits, head.shape, head.dtype, head.per_channel, head.zero, head.layers
    n = math.prod(shape)
    k = 1 << bits
    idx = rec["idx"]
    plen = -(-n * bits // 8)
    if idx.get("e") == "packed":
        packed = sr.get(idx["s"][0], plen, plen, what + " indices")
        if (n * bits) % 8 and int(packed[-1]) >> ((n * bits) % 8):
            raise FormatError(f"{what}: the packed indices have bits set past the last index")
        sr.budget.charge(n * (bits + 1), what)  # the unpacking planes and the indices
        u = unpack_np(packed, bits, n)
    else:
        u = _codec.decode_array(idx, sr, what + " indices")
        if u.dtype != np.uint8 or tuple(u.shape) != shape:
            raise FormatError(f"{what}: the indices ({u.dtype} {u.shape}) do not match the metadata {shape}")
        if u.size and int(u.max()) >= k:
            raise FormatError(f"{what}: index {int(u.max())} is outside the {k} centroids of a {bits}-bit codebook")
        sr.budget.charge(n * bits + plen, what)  # packing planes and the packed stream
        packed = pack_np(u, bits)
    c = _codec.decode_array(rec.get("c"), sr, what + " centroids")
    want = centroid_shape(shape, bits, per_channel, layers)
    if c.dtype.name not in _CENTROID_DTYPES or tuple(c.shape) != want:
        raise FormatError(f"{what}: the centroids ({c.dtype} {c.shape}) do not match the metadata (float {want})")
    if dequantize:
        sr.budget.charge(n * (8 + np.dtype(_codec.dtype_from_name(dtype)).itemsize), what)  # indices + output
    try:
        cb = Codebook(jnp.asarray(packed), jnp.asarray(c), bits=bits, shape=shape, dtype=dtype,
                      per_channel=per_channel, zero_reserved=zero, layer_axes=layers, path=what)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{what}: invalid codebook: {e}") from e
    return cb.decode() if dequantize else cb
