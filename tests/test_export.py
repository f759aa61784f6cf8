"""Tests for the compact model file: exact round trips, sizes, safety (fuzzing, forged headers), atomicity."""

import hashlib
import json
import os
import struct
from collections import namedtuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zstandard
from conftest import json_paths, resign, set_field, signed_file
from flax import nnx
from flax.core import FrozenDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressjax.export import FORMAT_VERSION, FormatError, _codec, _container, load, save, size_report
from compressjax.qarray import QArray, QuantSpec
from compressjax.quantization import dequantize_params, quantize_params


def assert_bit_equal(got, want):
    """Same tree structure, types, dtypes and bit patterns (so -0.0 and NaN payloads count)."""
    is_q = lambda x: isinstance(x, QArray)  # noqa: E731
    assert jax.tree.structure(got, is_leaf=is_q) == jax.tree.structure(want, is_leaf=is_q)
    for g, w in zip(jax.tree.leaves(got, is_leaf=is_q), jax.tree.leaves(want, is_leaf=is_q), strict=True):
        assert type(g) is type(w) or (isinstance(g, jax.Array) and isinstance(w, jax.Array))
        if isinstance(w, (jax.Array, np.ndarray)):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8), np.asarray(w).reshape(-1).view(np.uint8))
        else:
            assert g == w


def linen_params(seed=0):
    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32), nn.relu, nn.Dense(10)])
    return model.init(jax.random.key(seed), jnp.ones((1, 48)))


def prune(params, sparsity):
    """Global magnitude pruning by hand (so these tests do not depend on compressjax.pruning)."""
    kernels = [np.asarray(x) for x in jax.tree.leaves(params) if x.ndim >= 2]
    threshold = np.quantile(np.abs(np.concatenate([np.ravel(k) for k in kernels])), sparsity)
    cut = lambda x: jnp.asarray(np.where(np.abs(x) > threshold, x, np.float32(0)))  # noqa: E731
    return jax.tree.map(lambda x: cut(np.asarray(x)) if x.ndim >= 2 else x, params)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(12, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 8, rngs=rngs)])
        self.bn = nnx.BatchNorm(8, rngs=rngs)


# ------------------------------------------------------------------------------------------ round trips


def test_plain_float_linen_roundtrip(tmp_path):
    params = linen_params()
    report = save(tmp_path / "m.cjx", params)
    assert report.total_bytes == os.path.getsize(tmp_path / "m.cjx")
    assert_bit_equal(load(tmp_path / "m.cjx"), params)


def test_odd_leaves_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.nan, -np.inf, np.inf, 1e-45, -3.5], np.float32)
    special[2] = np.frombuffer(b"\x01\x00\xc0\x7f", np.float32)[0]  # a NaN with a payload
    params = {
        "bf16": jnp.asarray(rng.standard_normal((8, 5)), jnp.bfloat16),
        "f16": jnp.asarray(rng.standard_normal(7), jnp.float16),
        "ints": jnp.arange(-5, 5, dtype=jnp.int32),
        "u8": np.arange(9, dtype=np.uint8).reshape(3, 3),
        "mask": jnp.array([True, False, True]),
        "special": jnp.asarray(special),
        "scalar": jnp.float32(2.5),
        "empty": jnp.zeros((0, 4)),
        "zeros": jnp.zeros((30, 30)),
        "f64": np.linspace(0, 1, 5),
        "f8": jnp.asarray(rng.standard_normal(6), jnp.float8_e4m3fn),
        "i8": jnp.asarray([-128, 0, 127], jnp.int8),
        "none": None,
        "py": [1, 2.5, True, None],
        "tuple": (jnp.ones(2), {7: jnp.ones(1)}),
    }
    save(tmp_path / "m.cjx", params)
    out = load(tmp_path / "m.cjx")
    assert isinstance(out["f64"], np.ndarray) and out["f64"].dtype == np.float64  # not narrowed by jax
    out["u8"], out["f64"] = np.asarray(out["u8"]), np.asarray(out["f64"])
    assert_bit_equal(out, params)
    assert isinstance(out["tuple"], tuple) and isinstance(out["py"], list) and 7 in out["tuple"][1]


def test_nnx_state_roundtrip_and_update(tmp_path):
    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    state = jax.tree.map(lambda x: x * 0 - 1.5 if x.ndim == 1 else x, state)  # distinguishable values
    save(tmp_path / "m.cjx", state)
    out = load(tmp_path / "m.cjx")
    assert isinstance(out, nnx.State) and isinstance(out["layers"], nnx.State)
    assert type(out["first"]["kernel"]) is nnx.Param and type(out["bn"]["mean"]) is nnx.BatchStat
    assert_bit_equal(out, state)
    fresh = Net(nnx.Rngs(1))
    nnx.update(fresh, out)
    np.testing.assert_array_equal(fresh.layers[0].kernel[...], state["layers"][0]["kernel"][...])
    np.testing.assert_array_equal(fresh.bn.mean[...], np.full(8, -1.5, np.float32))


def test_size_report_of_nnx_file_names_paths(tmp_path, small_file):
    state = nnx.state(Net(nnx.Rngs(0)))
    save(tmp_path / "m.cjx", state)
    report = size_report(tmp_path / "m.cjx")
    assert [leaf.path for leaf in report.leaves] == [leaf.path for leaf in size_report(state).leaves]
    assert "layers/0/kernel" in [leaf.path for leaf in report.leaves]
    blob = bytearray((tmp_path / "m.cjx").read_bytes())
    blob[-3] ^= 0x10
    (tmp_path / "bad.cjx").write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="checksum"):
        size_report(tmp_path / "bad.cjx")


def test_frozendict_roundtrip(tmp_path):
    params = FrozenDict({"a": {"b": jnp.ones((2, 2))}})
    save(tmp_path / "m.cjx", params)
    out = load(tmp_path / "m.cjx")
    assert isinstance(out, FrozenDict)
    assert_bit_equal(out, params)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4), QuantSpec(bits=8), QuantSpec(bits=3, symmetric=False), QuantSpec(bits=2, group_size=16),
     QuantSpec(bits=1), QuantSpec(bits=8, channel_axes=())],
)
def test_quantized_only(tmp_path, spec):
    params = linen_params()
    save(tmp_path / "m.cjx", params, rules=spec)
    assert_bit_equal(load(tmp_path / "m.cjx"), dequantize_params(quantize_params(params, spec)))


def test_prequantized_qarrays_and_dequantize_false(tmp_path):
    qparams = quantize_params(prune(linen_params(), 0.8), QuantSpec(bits=4))
    save(tmp_path / "m.cjx", qparams)
    raw = load(tmp_path / "m.cjx", dequantize=False)
    q_in = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QArray))
    q_out = jax.tree.leaves(raw, is_leaf=lambda x: isinstance(x, QArray))
    for a, b in zip(q_in, q_out, strict=True):
        assert type(a) is type(b)
        if isinstance(a, QArray):
            assert (a.bits, a.shape, a.channel_axes) == (b.bits, b.shape, b.channel_axes)
            np.testing.assert_array_equal(a.ints(), b.ints())
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.scale, b.scale)
    assert_bit_equal(load(tmp_path / "m.cjx"), dequantize_params(qparams))


def test_pruned_and_quantized_nnx(tmp_path):
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    pruned = prune(state, 0.75)
    save(tmp_path / "m.cjx", pruned, rules=QuantSpec(bits=4))
    out = load(tmp_path / "m.cjx")
    assert isinstance(out, nnx.State) and type(out["first"]["kernel"]) is nnx.Param
    assert_bit_equal(out, dequantize_params(quantize_params(pruned, QuantSpec(bits=4))))


def test_masks_and_rules_through_pruning_module(tmp_path):
    pruning = pytest.importorskip("compressjax.pruning")
    params = linen_params()
    masks = pruning.magnitude_masks(params, 0.9)
    save(tmp_path / "masks.cjx", params, masks=masks)
    assert_bit_equal(load(tmp_path / "masks.cjx"), pruning.apply_masks(params, masks))
    spec = QuantSpec(bits=4)
    save(tmp_path / "both.cjx", params, masks=masks, rules=spec)
    want = dequantize_params(quantize_params(pruning.apply_masks(params, masks), spec))
    assert_bit_equal(load(tmp_path / "both.cjx"), want)
    assert os.path.getsize(tmp_path / "both.cjx") < os.path.getsize(tmp_path / "masks.cjx")


# ------------------------------------------------------------------------------------------------ sizes


def test_size_monotonic_in_sparsity(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    sizes = [size_report(prune(params, s)).total_bytes for s in (0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    qsizes = [size_report(prune(params, s), rules=QuantSpec(bits=4)).total_bytes for s in (0.0, 0.5, 0.9, 0.99)]
    assert all(a > b for a, b in zip(qsizes, qsizes[1:], strict=False)), qsizes


def test_position_encodings_chosen_by_size():
    rng = np.random.default_rng(0)
    kinds = {}
    for density in (0.3, 0.03, 0.001):
        x = np.where(rng.random(200_000) < density, rng.standard_normal(200_000), 0).astype(np.float32)
        sw = _codec.StreamWriter()
        rec = _codec.commit_record(_codec.encode_array(x, "w", sw), sw)
        kinds[density] = rec.get("pos")
        sr = _codec.StreamReader(memoryview(b"".join(bytes(c) for c in sw.chunks)), sw.table, _codec.Budget(None))
        np.testing.assert_array_equal(_codec.decode_array(rec, sr, "w"), x)
    assert kinds[0.3] == "bitmask" and kinds[0.03] == "delta8" and kinds[0.001].startswith("delta"), kinds


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.sampled_from([0, 1, 7, 33]), st.booleans(), st.integers(0, 2**31 - 1))
def test_numpy_code_packing_matches_the_library(bits, n, symmetric, seed):
    from compressjax.export._api import pack_codes_np
    from compressjax.qarray import code_range, codes_to_storage

    symmetric = symmetric or bits == 1
    lo, hi = code_range(bits, symmetric)
    ints = np.random.default_rng(seed).integers(lo, hi + 1, size=n).astype(np.int8)
    if bits == 1:
        ints[ints == 0] = 1
    if bits <= 4:
        np.testing.assert_array_equal(pack_codes_np(ints, bits), np.asarray(codes_to_storage(jnp.asarray(ints), bits)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 70_000), min_size=0, max_size=40), st.sampled_from([8, 16]))
def test_relative_indices_roundtrip(gaps, width):
    positions = np.cumsum(np.asarray(gaps, np.int64)) - 1
    n = int(positions[-1]) + 1 if len(gaps) else 5
    codes = _codec.delta_encode(positions, width)
    assert (codes != 0).sum() == len(gaps)
    np.testing.assert_array_equal(_codec.delta_decode(codes, width, len(gaps), n), positions)


def test_lenet_92_percent_4bit_is_40x_smaller():
    rng = np.random.default_rng(0)
    dims = [(784, 300), (300, 100), (100, 10)]
    params = {f"fc{i}": {"kernel": jnp.asarray(rng.standard_normal(d, np.float32) * 0.05),
                         "bias": jnp.asarray(rng.standard_normal(d[1], np.float32) * 0.01)}
              for i, d in enumerate(dims)}
    report = size_report(prune(params, 0.92), rules={"kernel": QuantSpec(bits=4)})
    assert report.ratio >= 40, str(report)


def test_size_report_from_file_and_params(tmp_path):
    params = prune(linen_params(), 0.9)
    spec = QuantSpec(bits=4)
    written = save(tmp_path / "m.cjx", params, rules=spec)
    from_params = size_report(params, rules=spec)
    from_file = size_report(tmp_path / "m.cjx")
    assert written == from_params
    assert from_file.total_bytes == os.path.getsize(tmp_path / "m.cjx") == from_params.total_bytes
    assert [leaf.stored_bytes for leaf in from_file.leaves] == [leaf.stored_bytes for leaf in from_params.leaves]
    assert [leaf.path for leaf in from_file.leaves] == [leaf.path for leaf in from_params.leaves]
    n = sum(x.size for x in jax.tree.leaves(params))
    assert from_file.num_weights == n and from_file.dense_float32_bytes == 4 * n
    assert from_file.ratio == pytest.approx(4 * n / from_file.total_bytes)
    assert from_file.bits_per_weight == pytest.approx(8 * from_file.total_bytes / n)
    assert sum(leaf.stored_bytes for leaf in from_file.leaves) + from_file.overhead_bytes == from_file.total_bytes
    text = str(from_file)
    assert "params/layers_0/kernel" in text and "int4 sparse" in text and "total" in text
    json.dumps(from_file.to_dict())


# ---------------------------------------------------------------------------------------------- safety


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.cjx"
    params = {"w": prune({"w": jax.random.normal(jax.random.key(1), (24, 16))}, 0.7)["w"], "b": jnp.ones(16),
              "q": quantize_params({"k": jax.random.normal(jax.random.key(2), (16, 8))}, QuantSpec(bits=4))["k"]}
    save(path, params)
    return path, path.read_bytes(), load(path)


def _load_bytes(tmp_path, data, name="x.cjx", **kw):
    path = tmp_path / name
    path.write_bytes(data)
    return load(path, **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_and_truncated_files(tmp_path, small_file, data):
    _, original, reference = small_file
    blob = bytearray(original)
    action = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    if action == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif action == "insert":
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = blob[at] ^ data.draw(st.integers(1, 255)) if action == "flip" else data.draw(st.integers(0, 255))
    try:
        out = _load_bytes(tmp_path, bytes(blob))
    except FormatError:
        return
    assert bytes(blob) == original  # only an unchanged file may load
    assert_bit_equal(out, reference)




FORGED = {
    "huge shape": set_field(["leaves", 0, "sh"], [1 << 40, 1 << 7]),
    "negative dim": set_field(["leaves", 0, "sh"], [-1, 16]),
    "huge nnz": set_field(["leaves", 0, "nnz"], 1 << 50),
    "bool nnz": set_field(["leaves", 0, "nnz"], True),
    "huge raw length": lambda h: set_field(["streams", 0, 2], 1 << 45)(h),
    "stored length beyond payload": lambda h: set_field(["streams", 0, 1], h["streams"][0][1] + 10)(h),
    "stream index out of range": set_field(["leaves", 1, "s"], [99]),
    "stream used twice": lambda h: set_field(["leaves", 1, "s"], h["leaves"][0]["s"][:1])(h),
    "unknown dtype": set_field(["leaves", 1, "dt"], "object"),
    "unknown encoding": set_field(["leaves", 1, "e"], "lz77"),
    "unknown codec": lambda h: set_field(["streams", 0, 0], 7)(h),
    "wrong shape for stream": set_field(["leaves", 1, "sh"], [17]),
    "unknown node": set_field(["tree", "t"], "eval"),
    "leaf index out of range": lambda h: set_field(["tree", "k", 0, 1], {"t": "leaf", "i": 10**9})(h),
    "unknown variable class": set_field(["tree"], {"t": "var", "cls": "os.system", "m": {}, "v": {"t": "none"}}),
    "deep nesting": set_field(["tree"], json.loads('{"t":"list","c":[' * 400 + "]}" * 400)),
    "q codes out of range": lambda h: set_field(["leaves", 2, "meta", "bits"], 2)(h),
    "q bad dtype": lambda h: set_field(["leaves", 2, "meta", "dtype"], "int32")(h),
    "not a dict": lambda h: [h],
    "no leaves": lambda h: {k: v for k, v in h.items() if k != "leaves"},
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_headers_with_valid_checksum(tmp_path, small_file, name):
    _, original, _ = small_file
    with pytest.raises(FormatError):
        _load_bytes(tmp_path, resign(original, FORGED[name]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_signed_header_integers(tmp_path, small_file, data):
    """Replace one integer of the (re-signed) header by an arbitrary one: a correct load or FormatError."""
    _, original, reference = small_file
    header = json.loads(_container.parse(original)[0])
    slots = []

    def collect(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                collect(v, [*path, i])
        elif isinstance(node, int) and not isinstance(node, bool):
            slots.append(path)

    collect(header, [])
    path = data.draw(st.sampled_from(slots))
    value = data.draw(st.one_of(st.integers(-2, 300), st.integers(-(2**63), 2**63)))
    blob = resign(original, set_field(path, value))
    try:
        out = _load_bytes(tmp_path, blob, max_bytes=1 << 26)
    except FormatError:
        return
    # A re-signed file may legitimately describe other data (e.g. two leaf indices swapped): it must still
    # be a well-formed tree of arrays.
    assert set(out) == set(reference)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_signed_header_any_value(tmp_path, small_file, data):
    """Replace any value of the (re-signed) header by arbitrary JSON: FormatError or a well-formed tree."""
    _, original, reference = small_file
    header = json.loads(_container.parse(original)[0])
    slots = json_paths(header)
    path = data.draw(st.sampled_from(slots[1:]))
    blob = resign(original, set_field(path, data.draw(JSON)))
    try:
        out = _load_bytes(tmp_path, blob, max_bytes=1 << 26)
    except FormatError:
        return
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))


def test_foreign_empty_and_padded_files(tmp_path, small_file):
    _, original, _ = small_file
    for blob, msg in [(b"", "not a compressjax"), (b"PK\x03\x04" + bytes(100), "not a compressjax"),
                      (original[:30], "truncated"), (original[:-1], "truncated"), (original + b"\0", "trailing")]:
        with pytest.raises(FormatError, match=msg):
            _load_bytes(tmp_path, blob)
    flipped = bytearray(original)
    flipped[-1] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        _load_bytes(tmp_path, bytes(flipped))


def test_future_format_version_is_a_clear_error(tmp_path, small_file):
    _, original, _ = small_file
    blob = bytearray(original)
    struct.pack_into("<H", blob, 8, FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match=f"format version {FORMAT_VERSION + 1}.*newer compressjax"):
        _load_bytes(tmp_path, bytes(blob))


def _rewrite_frames(original: bytes, flags: int) -> bytes:
    """``original`` rewritten with the preamble ``flags`` (bit 0: dictionary-coded header; bit 1: bare zstd
    frames), every frame coded accordingly: how files written before either flag look."""
    header_json, payload, _, old_flags = _container.parse(original)
    assert old_flags == _container.FLAG_HEADER_DICT | _container.FLAG_BARE_FRAMES
    bare = bool(flags & _container.FLAG_BARE_FRAMES)
    dctx = _container.decompressor(old_flags)
    params = (lambda lvl: _container.bare_params(lvl)) if bare else (
        lambda lvl: zstandard.ZstdCompressionParameters.from_level(lvl, write_checksum=0))
    header = json.loads(header_json)
    chunks, offset = [], 0
    for entry in header["streams"]:
        codec, stored, raw = entry
        frame = bytes(payload[offset:offset + stored])
        offset += stored
        if codec == 1:
            frame = zstandard.ZstdCompressor(compression_params=params(19)).compress(
                _container.decompress(dctx, frame, raw, old_flags, "test"))
            entry[1] = len(frame)
        chunks.append(frame)
    header_json = json.dumps(header, separators=(",", ":")).encode()
    dictionary = _container._HEADER_DICT if flags & _container.FLAG_HEADER_DICT else None
    coded = zstandard.ZstdCompressor(compression_params=params(19), dict_data=dictionary).compress(header_json)
    return signed_file(coded, len(header_json), b"".join(chunks), flags)


def test_header_dictionary_and_bare_frame_flags(tmp_path, small_file):
    """New files code the header against the built-in vocabulary (flag bit 0) and write bare zstd frames
    (bit 1: no magic number, no content size); files with any older combination still load; undefined flag
    bits, or frames coded otherwise than the flags say, are clear errors."""
    _, original, _ = small_file
    both = _container.FLAG_HEADER_DICT | _container.FLAG_BARE_FRAMES
    assert struct.unpack_from("<H", original, 10)[0] == both
    new = _load_bytes(tmp_path, original)
    sizes = {}
    for flags in (0, 1, 2, 3):
        blob = _rewrite_frames(original, flags)
        sizes[flags] = len(blob)
        old = _load_bytes(tmp_path, blob)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), old, new)), flags
    assert sizes[3] == len(original) and sizes[3] < sizes[1] < sizes[0] and sizes[3] < sizes[2] < sizes[0]
    plain = _rewrite_frames(original, 0)
    with pytest.raises(FormatError, match="unknown flags 0x0004"):
        _load_bytes(tmp_path, resign_preamble(plain, 4))
    # Frames coded otherwise than the flags say (a plain frame needs no dictionary, so declaring one is
    # harmless; the other mismatches cannot decode).
    for blob, wrong in ((plain, 2), (plain, 3), (_rewrite_frames(original, 1), 0), (original, 1), (original, 0)):
        with pytest.raises(FormatError, match="zstd frame"):
            _load_bytes(tmp_path, resign_preamble(blob, wrong))
    # Files coded with it must stay readable: the dictionary never changes (a new one needs a new flag bit).
    assert hashlib.sha256(_container.HEADER_DICT_V1).hexdigest() == (
        "289c08db3ba8bd92043cbd7f3414148367bd537c807afeb2353a4cdfcf038c37")


def resign_preamble(blob: bytes, flags: int | None = None) -> bytes:
    """``blob`` with its preamble ``flags`` replaced (if given) and its checksum recomputed."""
    _, _, old_flags, header_len, raw_len, _ = struct.unpack_from("<8sHHIIQ", blob)
    head = _container.PREAMBLE_SIZE
    return signed_file(bytes(blob[head:head + header_len]), raw_len, bytes(blob[head + header_len:]),
                       old_flags if flags is None else flags)


def test_bare_frames_that_lie_about_their_length_raise(tmp_path, small_file):
    """A bare frame holds no length of its own: the stream table's is enforced (never more bytes out)."""
    _, original, _ = small_file

    def shift(delta):
        def edit(h):
            i = next(k for k, e in enumerate(h["streams"]) if e[0] == 1)
            h["streams"][i][2] += delta
            return h
        return edit

    for delta in (-1, 1, 1000):
        with pytest.raises(FormatError, match=r"zstd frame|declares|expected"):
            _load_bytes(tmp_path, resign(original, shift(delta)))


def test_max_bytes_limits_allocation(tmp_path):
    save(tmp_path / "z.cjx", {"z": jnp.zeros((1024, 1024))})  # 4 MiB of zeros in a tiny file
    assert os.path.getsize(tmp_path / "z.cjx") < 1000
    with pytest.raises(FormatError, match="max_bytes"):
        load(tmp_path / "z.cjx", max_bytes=1 << 20)
    assert load(tmp_path / "z.cjx")["z"].shape == (1024, 1024)


def test_unsupported_leaves_raise_at_save(tmp_path):
    point = namedtuple("point", "x y")
    cases = [
        ({"a": point(jnp.ones(2), jnp.ones(2))}, "'a' has type .*point"),
        ({"a": {"b": object()}}, "'a/b'.*object"),
        ({"s": np.array(["x", "y"])}, "'s'.*dtype"),
        ({"k": jax.random.key(0)}, "'k'.*PRNG key"),
        ({("t",): jnp.ones(1)}, "key"),
    ]
    for params, msg in cases:
        with pytest.raises(TypeError, match=msg):
            save(tmp_path / "bad.cjx", params)
    assert not os.listdir(tmp_path)
    for level in (99, True, "max"):
        with pytest.raises(ValueError, match="level"):
            save(tmp_path / "bad.cjx", {"a": jnp.ones(2)}, level=level)
    assert not os.listdir(tmp_path)
    with pytest.raises(TypeError, match="tracer"):
        jax.jit(lambda x: size_report({"x": x}).total_bytes)(jnp.ones(2))


# ------------------------------------------------------------------------------------------- atomicity


def test_failed_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "m.cjx", linen_params())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.cjx"
    save(path, {"a": jnp.ones(3)})
    before = path.read_bytes()

    def fail_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="disk full"):
        save(path, {"a": jnp.zeros(3)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.cjx"]
    monkeypatch.undo()
    save(path, {"a": jnp.zeros(3)})
    assert_bit_equal(load(path), {"a": jnp.zeros(3)})


def test_masks_or_rules_on_an_already_quantized_tree_is_a_clear_error(tmp_path):
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    qparams = quantize_params(params, QuantSpec(bits=4))
    for kwargs in ({"rules": QuantSpec(bits=4)}, {"masks": {"w": jnp.ones((8, 4), bool), "b": None}}):
        with pytest.raises(ValueError, match=r"already hold QArray leaves \(e.g. 'w'\)"):
            save(tmp_path / "q.cjx", qparams, **kwargs)
    assert not (tmp_path / "q.cjx").exists()
    save(tmp_path / "q.cjx", qparams)  # the quantized tree itself saves as it is
    equal = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(load(tmp_path / "q.cjx")),
                                                       jax.tree.leaves(dequantize_params(qparams)), strict=True)]
    assert all(equal)
