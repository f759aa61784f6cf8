"""Tests for QuantSpec, QArray packing, quantize/dequantize, fake_quant (STE) and parameter rules."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_example, run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import compressjax as cj
from compressjax.bitpack import pack, unpack

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def full_scale(q):
    """The scale of every element, in the original shape."""
    lay = q.layout
    return np.asarray(jnp.broadcast_to(q.scale, lay.grouped_shape).reshape(q.shape))


def normal(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


# ---------------------------------------------------------------- QuantSpec


def test_spec_is_frozen_and_hashable():
    spec = cj.QuantSpec(4, channel_axes=[-1])
    assert spec.channel_axes == (-1,) and hash(spec) == hash(cj.QuantSpec(4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 3
    jax.jit(cj.fake_quant, static_argnums=1)(jnp.ones((2, 2)), spec)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "bits must be an integer in 1..8, got 0"),
        ({"bits": 9}, "got 9"),
        ({"bits": 2.5}, "got 2.5"),
        ({"bits": True}, "got True"),
        ({"calibration": "minmax"}, "calibration must be one of"),
        ({"percentile": 0.0}, "percentile must be in"),
        ({"group_size": 0}, "group_size must be None or a positive integer, got 0"),
        ({"bits": 1, "symmetric": False}, "bits=1"),
        ({"error_power": 0}, "error_power"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.QuantSpec(**kwargs)


def test_spec_rejects_bad_axes_type():
    with pytest.raises(TypeError, match="channel_axes"):
        cj.QuantSpec(channel_axes=("a",))


# ---------------------------------------------------------------- numerics


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=3).map(tuple),
    bits=st.integers(2, 8),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    dtype=st.sampled_from(DTYPES),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1e-3, 1.0, 100.0]),
)
@pytest.mark.slow
def test_round_trip_within_half_a_step(shape, bits, gran, dtype, symmetric, seed, spread):
    if gran == "group":
        axis = -2 if len(shape) >= 2 else 0
        n = shape[axis]
        group = max(d for d in range(1, n + 1) if n % d == 0 and d <= 3)
        spec = cj.QuantSpec(bits, symmetric, channel_axes=(-1,) if len(shape) >= 2 else (), group_size=group)
    else:
        spec = cj.QuantSpec(bits, symmetric, channel_axes=() if gran == "tensor" else (-1,))
    x = normal(shape, seed, jnp.float32) * spread
    x = x.astype(dtype)
    q = cj.quantize(x, spec)
    y = cj.dequantize(q)
    assert y.dtype == dtype and y.shape == x.shape
    ints = np.asarray(q.ints())
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert ints.min() >= lo and ints.max() <= hi
    x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
    eps = float(jnp.finfo(dtype).eps)
    bound = 0.5 * full_scale(q) * (1 + 1e-5) + np.abs(y32) * eps
    assert np.all(np.abs(y32 - x32) <= bound)
    np.testing.assert_array_equal(np.asarray(cj.fake_quant(x, spec), np.float32), y32)


def test_textbook_range_never_uses_most_negative_code():
    x = jnp.linspace(-1, 1, 101).reshape(101, 1)
    q = cj.quantize(x, cj.QuantSpec(4))
    assert int(q.ints().min()) == -7 and int(q.ints().max()) == 7


def test_round_half_to_even():
    spec = cj.QuantSpec(8, channel_axes=())
    s = 2.0
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5]) * s
    q = cj.quantize(x, spec, scale=s)
    np.testing.assert_array_equal(q.ints(), [0, 2, 2, 0, -2])


def test_absmax_scale_is_qwix_style_and_error_matches_reference():
    x = normal((1024, 256), seed=1)
    q = cj.quantize(x, cj.QuantSpec(4))
    np.testing.assert_allclose(q.scale[0], jnp.max(jnp.abs(x), axis=0) / 7.5, rtol=1e-6)
    err4 = float(jnp.mean(jnp.abs(cj.dequantize(q) - x)))
    err8 = float(jnp.mean(jnp.abs(cj.dequantize(cj.quantize(x, cj.QuantSpec(8))) - x)))
    assert 0.110 < err4 < 0.118 and 0.0065 < err8 < 0.0069
    # The textbook scale max|x|/(2^(b-1)-1) is worse at 4 bits.
    m = jnp.max(jnp.abs(x), axis=0) / 7
    textbook = float(jnp.mean(jnp.abs(jnp.clip(jnp.round(x / m), -7, 7) * m - x)))
    assert err4 < textbook
    mse = cj.quantize(x, cj.QuantSpec(4, calibration="mse"))
    err_mse = float(jnp.mean(jnp.abs(cj.dequantize(mse) - x)))
    assert err_mse < 0.78 * err4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_and_percentile_calibrations(bits, symmetric):
    x = normal((256, 16), seed=bits)
    base = jnp.mean(jnp.abs(cj.dequantize(cj.quantize(x, cj.QuantSpec(bits, symmetric))) - x))
    mse = jnp.mean(jnp.abs(cj.dequantize(cj.quantize(x, cj.QuantSpec(bits, symmetric, calibration="mse"))) - x))
    assert mse <= base + 1e-7
    x = x.at[0, 0].set(1000.0)
    pct = cj.quantize(x, cj.QuantSpec(bits, symmetric, channel_axes=(), calibration="percentile", percentile=99.0))
    absmax = cj.quantize(x, cj.QuantSpec(bits, symmetric, channel_axes=()))
    assert float(pct.scale.max()) < 0.05 * float(absmax.scale.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_tensor(dtype, bits, symmetric):
    if bits == 1 and not symmetric:
        return
    for calibration in ("absmax", "percentile", "mse") if dtype == jnp.float32 else ("absmax",):
        x = jnp.zeros((8, 4), dtype)
        q = cj.quantize(x, cj.QuantSpec(bits, symmetric, calibration=calibration))
        y = cj.dequantize(q)
        assert np.all(np.isfinite(np.asarray(q.scale))) and y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)
        np.testing.assert_array_equal(q.scale, 0.0 if bits == 1 else 1.0)
        g = jax.grad(lambda v: jnp.sum(cj.fake_quant(v, cj.QuantSpec(bits, symmetric)).astype(jnp.float32)))(x)
        assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("c", [3.7, -0.25, 1e-6])
def test_constant_tensor_within_half_a_step(bits, c):
    x = jnp.full((5, 3), c)
    q = cj.quantize(x, cj.QuantSpec(bits, channel_axes=()))
    err = np.abs(np.asarray(cj.dequantize(q)) - c)
    assert np.all(err <= 0.5 * float(q.scale.max()) * (1 + 1e-5))
    qa = cj.quantize(x, cj.QuantSpec(bits, symmetric=False, channel_axes=()))
    assert np.all(np.abs(np.asarray(cj.dequantize(qa)) - c) <= 0.5 * float(qa.scale.max()) * (1 + 1e-5))


def test_one_bit_is_sign_times_mean_abs():
    x = normal((16, 4), seed=3)
    q = cj.quantize(x, cj.QuantSpec(1))
    want = jnp.where(x >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(x), axis=0, keepdims=True)
    np.testing.assert_allclose(cj.dequantize(q), want, rtol=1e-6)
    assert set(np.unique(q.ints())) <= {-1, 1}


def test_asymmetric_zero_point_and_positive_inputs():
    x = jax.random.uniform(jax.random.key(0), (64, 4), minval=0.5, maxval=3.0)
    q = cj.quantize(x, cj.QuantSpec(8, symmetric=False))
    assert q.zero_point is not None and q.zero_point.dtype == jnp.int32
    np.testing.assert_array_equal(q.zero_point, -128)  # lo clamps to 0, which maps to the lowest code
    assert float(jnp.max(jnp.abs(cj.dequantize(q) - x))) <= 0.5 * float(q.scale.max()) * (1 + 1e-5)
    z = cj.dequantize(cj.quantize(jnp.array([[-1.0], [0.0], [2.0]]), cj.QuantSpec(3, symmetric=False, channel_axes=())))
    assert float(z[1, 0]) == 0.0


def test_grouped_scales_shape():
    x = normal((64, 8))
    q = cj.quantize(x, cj.QuantSpec(4, group_size=16))
    assert q.scale.shape == (4, 1, 8) and q.layout.grouped_shape == (4, 16, 8)
    np.testing.assert_allclose(q.scale[:, 0, :], jnp.max(jnp.abs(x.reshape(4, 16, 8)), axis=1) / 7.5, rtol=1e-6)


# ---------------------------------------------------------------- packing and storage


@pytest.mark.parametrize(
    "bits, shape, values_bytes",
    [(4, (64, 32), 1024), (2, (64, 32), 512), (1, (64, 32), 256), (3, (64, 32), 768), (8, (64, 32), 2048), (4, (3, 5), 8), (1, (3, 3), 2), (3, (5,), 2)],
)
def test_exact_packed_sizes(bits, shape, values_bytes):
    q = cj.quantize(normal(shape), cj.QuantSpec(bits, channel_axes=()))
    assert q.values.nbytes == values_bytes
    assert q.nbytes == values_bytes + 4
    assert q.values.dtype == (jnp.uint8 if bits <= 4 else jnp.int8)
    qa = cj.quantize(normal(shape), cj.QuantSpec(max(bits, 2), symmetric=False))
    n_scales = shape[-1]
    assert qa.nbytes == qa.values.nbytes + 8 * n_scales


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63])
def test_pack_unpack_round_trip(bits, n):
    u = jax.random.randint(jax.random.key(n), (n,), 0, 2**bits).astype(jnp.uint8)
    packed = pack(u, bits)
    assert packed.shape == (-(-n * bits // 8),)
    np.testing.assert_array_equal(unpack(packed, bits, n), u)


def test_four_bit_layout_is_two_nibbles_per_byte():
    q = cj.QArray.from_ints(jnp.array([[1, -2], [7, -7]], jnp.int8), jnp.ones((1, 1)), bits=4)
    # unsigned codes 9, 6, 15, 1: low nibble first
    np.testing.assert_array_equal(np.asarray(q.values), [9 | (6 << 4), 15 | (1 << 4)])


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_parts_and_ints_round_trip(bits, symmetric):
    if bits == 1 and not symmetric:
        return
    x = normal((32, 6), seed=bits)
    q = cj.quantize(x, cj.QuantSpec(bits, symmetric, group_size=8))
    arrays, meta = q.to_parts()
    json.dumps(meta)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    q2 = cj.QArray.from_parts(arrays, meta)
    np.testing.assert_array_equal(cj.dequantize(q2), cj.dequantize(q))
    ints = q.ints()
    assert ints.shape == x.shape and ints.dtype == jnp.int8
    q3 = cj.QArray.from_ints(np.asarray(ints), arrays["scale"], arrays.get("zero_point"), meta)
    np.testing.assert_array_equal(q3.values, q.values)
    assert q3.nbytes == q.nbytes
    flat = cj.QArray.from_ints(np.asarray(ints).ravel(), arrays["scale"], arrays.get("zero_point"), meta)
    np.testing.assert_array_equal(flat.values, q.values)


def test_pruned_zeros_have_zero_codes():
    x = normal((16, 8)).at[::2].set(0.0)
    ints = np.asarray(cj.quantize(x, cj.QuantSpec(4)).ints())
    assert np.all(ints[::2] == 0)


def test_qarray_is_a_pytree_node_and_crosses_jit():
    x = normal((16, 8))
    spec = cj.QuantSpec(4, symmetric=False, group_size=4)
    q = cj.quantize(x, spec)
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 3
    qj = jax.jit(lambda v: cj.quantize(v, spec))(x)
    np.testing.assert_array_equal(qj.values, q.values)
    np.testing.assert_array_equal(jax.jit(cj.dequantize)(q), cj.dequantize(q))
    assert isinstance(jax.tree.map(lambda a: a, q), cj.QArray)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a, m: a.update(values=a["values"][:-1]), "packed uint8 values of shape"),
        (lambda a, m: a.update(values=a["values"].astype(np.int8)), "packed uint8"),
        (lambda a, m: a.update(scale=a["scale"][:, :2]), "scale must be float32 of shape"),
        (lambda a, m: a.update(scale=a["scale"].astype(np.float16)), "scale must be float32"),
        (lambda a, m: a.update(zero_point=np.zeros((1, 4), np.int32)), "zero_point is present"),
        (lambda a, m: m.update(format="other/9"), "unknown QArray format"),
        (lambda a, m: m.update(bits=9), "outside 1..8"),
        (lambda a, m: m.update(shape=[8, 3]), "packed uint8 values of shape"),
        (lambda a, m: m.pop("shape"), "missing"),
        (lambda a, m: m.update(group_size=3), "group_size=3 does not divide"),
        (lambda a, m: m.update(channel_axes=[5]), "channel axis 5 is out of range"),
    ],
)
def test_from_parts_rejects_mismatched_metadata(mutate, match):
    arrays, meta = cj.quantize(normal((8, 4)), cj.QuantSpec(4)).to_parts()
    mutate(arrays, meta)
    with pytest.raises(ValueError, match=match) as e:
        cj.QArray.from_parts(arrays, meta, path="dense/kernel")
    assert "dense/kernel" in str(e.value)


def test_from_ints_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="'w'.*code -8 is outside \\[-7, 7\\]"):
        cj.QArray.from_ints(np.array([[-8, 1]]), np.ones((1, 1), np.float32), bits=4, path="w")
    with pytest.raises(ValueError, match="is 0"):
        cj.QArray.from_ints(np.array([[0, 1]]), np.ones((1, 1), np.float32), bits=1)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_leaf():
    with pytest.raises(TypeError, match="'x' has dtype int32") as e:
        cj.quantize(jnp.ones((2, 2), jnp.int32))
    assert isinstance(e.value, ValueError)  # DTypeError is both
    with pytest.raises(ValueError, match="'x' holds 1 non-finite value.*nan"):
        cj.quantize(jnp.array([[1.0, jnp.nan]]))
    with pytest.raises(ValueError, match="inf"):
        cj.fake_quant(jnp.array([[1.0, jnp.inf]]))
    with pytest.raises(ValueError, match="channel axis 2 is out of range for an array of shape \\(4, 4\\)"):
        cj.quantize(jnp.ones((4, 4)), cj.QuantSpec(channel_axes=(2,)))
    with pytest.raises(ValueError, match="group_size=3 does not divide axis 0 of length 4"):
        cj.quantize(jnp.ones((4, 4)), cj.QuantSpec(group_size=3))
    with pytest.raises(ValueError, match="also a channel axis"):
        cj.quantize(jnp.ones((4, 4)), cj.QuantSpec(group_size=2, channel_axes=(0,)))
    with pytest.raises(TypeError, match="already a QArray"):
        cj.quantize(cj.quantize(jnp.ones((2, 2))))


def test_bad_params_name_the_leaf_path():
    params = {"layer": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4), "steps": jnp.zeros((2, 2), jnp.int32)}}
    with pytest.raises(TypeError, match="'layer/steps'.*int32"):
        cj.quantize_params(params, {"steps|kernel": cj.QuantSpec()})
    with pytest.raises(ValueError, match="'layer/kernel'.*group_size=4 does not divide axis 0 of length 6"):
        cj.quantize_params(params, cj.QuantSpec(group_size=4))
    with pytest.raises(ValueError, match="'layer/kernel'.*channel axis -3"):
        cj.fake_quant_params(params, cj.QuantSpec(channel_axes=(-3,)))
    bad = {"layer": {"kernel": jnp.ones((6, 4)).at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="'layer/kernel' holds 1 non-finite"):
        cj.quantize_params(bad)
    with pytest.raises(TypeError, match="must be a QuantSpec or None"):
        cj.quantize_params(params, {"kernel": 8})


# ---------------------------------------------------------------- rules


def params_tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (10, 8))},
        "dense_0": {"kernel": jax.random.normal(k[1], (8, 16)), "bias": jnp.zeros(16)},
        "dense_1": {"kernel": jax.random.normal(k[2], (16, 4)), "bias": jnp.zeros(4)},
    }


def test_single_spec_uses_default_selection():
    q = cj.quantize_params(params_tree(), cj.QuantSpec(4))
    assert isinstance(q["dense_0"]["kernel"], cj.QArray) and isinstance(q["embed"]["embedding"], cj.QArray)
    assert not isinstance(q["dense_0"]["bias"], cj.QArray)
    d = cj.dequantize_params(q)
    assert jax.tree.structure(d) == jax.tree.structure(params_tree())


def test_mapping_rules_first_match_wins_and_none_keeps_float():
    rules = {"dense_1": None, "kernel": cj.QuantSpec(4), "embedding": cj.QuantSpec(8, channel_axes=(0,))}
    q = cj.quantize_params(params_tree(), rules)
    assert q["dense_0"]["kernel"].bits == 4 and q["embed"]["embedding"].scale.shape == (10, 1)
    assert not isinstance(q["dense_1"]["kernel"], cj.QArray)
    pairs = [("kernel", cj.QuantSpec(2)), ("dense_0/kernel", cj.QuantSpec(8))]
    with pytest.raises(ValueError, match="'dense_0/kernel' only matches leaves taken by earlier patterns"):
        cj.quantize_params(params_tree(), pairs)
    assert cj.quantize_params(params_tree(), pairs, on_unmatched="ignore")["dense_0"]["kernel"].bits == 2


def test_unmatched_pattern_raises_or_warns():
    with pytest.raises(ValueError, match="'conv' matches no leaf; the tree's leaves are"):
        cj.quantize_params(params_tree(), {"kernel": cj.QuantSpec(), "conv": cj.QuantSpec()})
    with pytest.warns(UserWarning, match="'conv' matches no leaf"):
        cj.fake_quant_params(params_tree(), {"kernel": cj.QuantSpec(), "conv": cj.QuantSpec()}, on_unmatched="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cj.fake_quant_params(params_tree(), {"kernel": cj.QuantSpec(), "conv": None}, on_unmatched="ignore")
    with pytest.raises(ValueError, match="quantize no leaf"):
        cj.quantize_params(params_tree(), {"kernel": None})


@pytest.mark.slow
def test_fake_quant_params_jit_equals_eager_and_quantize():
    p = params_tree()
    rules = {"kernel": cj.QuantSpec(4, group_size=4), "embedding": cj.QuantSpec(3, symmetric=False)}
    eager = cj.fake_quant_params(p, rules)
    jitted = jax.jit(lambda t: cj.fake_quant_params(t, rules))(p)
    deq = cj.dequantize_params(cj.quantize_params(p, rules))
    for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(deq), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_nnx_state_round_trip():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    q = cj.quantize_params(state, {"kernel": cj.QuantSpec(4)})
    kinds = [type(x) for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, cj.QArray))]
    assert kinds.count(cj.QArray) == 2
    nnx.update(model, cj.dequantize_params(q))
    assert model(jnp.ones((2, 8))).shape == (2, 4)


# ---------------------------------------------------------------- STE


@pytest.mark.slow
def test_ste_gradient_passes_inside_and_on_boundary_zero_when_clipped():
    spec = cj.QuantSpec(4, channel_axes=())
    s = 0.5
    x = jnp.array([0.0, 0.3, 7 * s, -7 * s, 7.5 * s, -7.5 * s, 7.6 * s, -9.0, 100.0])
    g = jax.grad(lambda v: jnp.sum(cj.fake_quant(v, spec, scale=s)))(x)
    np.testing.assert_array_equal(g, [1, 1, 1, 1, 1, 1, 0, 0, 0])
    # With absmax calibration nothing is clipped: the max element sits on the boundary.
    y = normal((32, 4))
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(cj.fake_quant(v, cj.QuantSpec(4))))(y), 1.0)
    z = jax.grad(lambda v: jnp.sum(cj.fake_quant(v, cj.QuantSpec(1), scale=1.0)))(jnp.array([0.5, -1.9, 2.5]))
    np.testing.assert_array_equal(z, [1, 1, 0])


@pytest.mark.parametrize("spec", [cj.QuantSpec(4, channel_axes=(), calibration="percentile", percentile=90.0), cj.QuantSpec(3, symmetric=False, calibration="mse"), cj.QuantSpec(2, group_size=4)])
@pytest.mark.slow
def test_ste_matches_surrogate_and_check_grads(spec):
    x = normal((8, 3), seed=5) * 2
    w = normal((8, 3), seed=6)

    g_fq = jax.grad(lambda v: jnp.sum(w * cj.fake_quant(v, spec)))(x)
    g_sur = jax.grad(lambda v: jnp.sum(w * cj.quantization.ste_surrogate(v, spec)))(x)
    np.testing.assert_allclose(g_fq, g_sur, rtol=1e-6)
    clipped = np.asarray(cj.quantization.ste_surrogate(x, spec)) != np.asarray(x)
    assert np.all(np.asarray(g_fq)[clipped] == 0)
    # finite differences on the surrogate, away from the clip points (absmax puts the max on one)
    scale, zp = cj.quantization.compute_scale(x, spec)
    scale = scale * 1.01
    sur = lambda v: cj.quantization.ste_surrogate(v, spec, scale=scale, zero_point=zp)  # noqa: E731
    check_grads(lambda v: jnp.sum(w * sur(v) ** 2), (x,), order=1, modes=("fwd", "rev"), eps=1e-3)


@pytest.mark.slow
def test_fake_quant_vmap_and_jit():
    spec = cj.QuantSpec(4)
    x = normal((3, 16, 8))
    per = jnp.stack([cj.fake_quant(x[i], spec) for i in range(3)])
    np.testing.assert_array_equal(jax.vmap(lambda v: cj.fake_quant(v, spec))(x), per)
    np.testing.assert_array_equal(jax.jit(lambda v: cj.fake_quant(v, spec))(x[0]), per[0])
    g = jax.vmap(jax.grad(lambda v: jnp.sum(cj.fake_quant(v, spec) ** 2)))(x)
    np.testing.assert_allclose(g, 2 * per, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_low_precision_dtypes(dtype):
    x = normal((16, 8), dtype=dtype)
    y, vjp = jax.vjp(lambda v: cj.fake_quant(v, cj.QuantSpec(4)), x)
    assert y.dtype == dtype and vjp(jnp.ones_like(y))[0].dtype == dtype


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize("script", ["qat_nnx.py", "ptq_calibrate.py"])
@pytest.mark.slow
def test_examples_run_quick(script):
    assert "OK" in run_example(script, "--quick", timeout=240).stdout


def test_tampered_qarray_in_params_names_the_path():
    q = cj.quantize_params({"enc": {"kernel": normal((8, 4))}}, cj.QuantSpec(4))
    leaves, treedef = jax.tree.flatten(q)
    leaves[0] = leaves[0][:-1]  # drop one byte of the packed codes
    bad = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(ValueError, match="'enc/kernel'.*packed uint8 values of shape \\(16,\\), got uint8 \\(15,\\)"):
        cj.dequantize_params(bad)


@pytest.mark.slow
def test_sharded_params_on_a_mesh():
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import compressjax as cj
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
w = jax.random.normal(jax.random.key(0), (64, 32))
ws = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
spec = cj.QuantSpec(4, group_size=16)
fq = jax.jit(lambda p: cj.fake_quant_params(p, spec))({"k": ws})["k"]
np.testing.assert_array_equal(fq, cj.fake_quant(w, spec))
q = jax.jit(lambda v: cj.quantize(v, spec))(ws)
np.testing.assert_array_equal(cj.dequantize(q), cj.dequantize(cj.quantize(w, spec)))
print("OK", len(jax.devices()))
"""
    assert "OK 8" in run_python(code, devices=8, timeout=240).stdout


@pytest.mark.parametrize("v", [1e-45, 1e-30, 1e-10])
def test_tiny_ranges_never_give_nan(v):
    x = jnp.array([[0.0, v], [v, 0.0]])
    for spec in (cj.QuantSpec(8), cj.QuantSpec(4, symmetric=False, calibration="mse")):
        q = cj.quantize(x, spec)
        y = np.asarray(cj.dequantize(q))
        assert np.all(np.isfinite(y)) and np.all(np.abs(y - np.asarray(x)) <= 0.5 * full_scale(q) * (1 + 1e-5))
        g = jax.grad(lambda a, s=spec: jnp.sum(cj.fake_quant(a, s)))(x)
        assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- issue 11: extreme values, float64, empty leaves
F32_MAX = float(np.finfo(np.float32).max)
EXTREME_SPECS = [
    cj.QuantSpec(b, symmetric=sym, calibration=cal, channel_axes=axes)
    for b in (1, 2, 3, 4, 8)
    for sym in (True, False)
    for cal in ("absmax", "percentile", "mse")
    for axes in ((-1,), ())
    if not (b == 1 and not sym)
]


def _assert_finite_quantization(x, spec):
    q = cj.quantize(x, spec)
    ints = np.asarray(q.ints())
    scale = np.asarray(q.scale)
    assert np.all(np.isfinite(scale)) and np.all(scale >= 0 if spec.bits == 1 else scale > 0), (spec, scale)
    lo, hi = (-1, 1) if spec.bits == 1 else (spec.qmin, spec.qmax)
    assert ints.min() >= lo and ints.max() <= hi
    y = np.asarray(cj.dequantize(q))
    assert np.all(np.isfinite(y)), (spec, x, y)
    fq = np.asarray(cj.fake_quant(x, spec))
    assert np.all(np.isfinite(fq)), (spec, x, fq)
    s, _ = cj.quantization.compute_scale(x, spec)
    assert np.all(np.isfinite(np.asarray(s)))
    return q, ints, y


def test_two_bit_codes_of_huge_weights_are_not_flushed_to_zero():
    # Regression: 1 / scale was subnormal (flushed to 0 on CPU) for max|x| >= 1.3e38: all codes were 0.
    x = jnp.array([[1.4e38], [-1e38], [3.0], [0.0]], jnp.float32)
    q, ints, y = _assert_finite_quantization(x, cj.QuantSpec(2))
    np.testing.assert_array_equal(ints.ravel(), [1, -1, 0, 0])
    np.testing.assert_array_equal(np.asarray(cj.fake_quant(x, cj.QuantSpec(2))), y)
    # Every element is within half a step (absmax clips the largest by at most half a step).
    assert np.all(np.abs(np.asarray(x, np.float64) - y) <= 0.5 * float(q.scale[0, 0]) * (1 + 1e-6))


def test_asymmetric_range_beyond_float32_max_is_finite():
    # Regression: hi - lo overflowed to inf, giving scale inf and NaN outputs.
    x = jnp.array([[F32_MAX], [-F32_MAX], [1.0]], jnp.float32)
    q, ints, y = _assert_finite_quantization(x, cj.QuantSpec(4, symmetric=False))
    step = float(q.scale[0, 0])
    assert abs(step - 2 * F32_MAX / 15) <= 1e-6 * step
    assert np.all(np.abs(np.asarray(x, np.float64) - y) <= step * (1 + 1e-6))


def test_one_bit_scale_whose_mean_would_overflow():
    # Regression: the sum behind mean|x| overflowed to inf.
    x = jnp.full((8, 1), 3e38, jnp.float32).at[0, 0].set(-3e38)
    q, ints, y = _assert_finite_quantization(x, cj.QuantSpec(1))
    np.testing.assert_allclose(float(q.scale[0, 0]), 3e38, rtol=1e-6)
    np.testing.assert_array_equal(ints.ravel(), [-1] + [1] * 7)


_FQ_JIT = {}


def _check_extreme(data, spec):
    x = jnp.asarray(np.resize(np.asarray(data, np.float32), 12).reshape(-1, 1))  # one shape: one compile per spec
    _assert_finite_quantization(x, spec)
    fq = _FQ_JIT.setdefault(spec, jax.jit(lambda v: cj.fake_quant(v, spec)))
    np.testing.assert_array_equal(np.asarray(fq(x)), np.asarray(cj.fake_quant(x, spec)))  # jit == no jit


FLOATS32 = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(data=FLOATS32, spec=st.sampled_from([cj.QuantSpec(1), cj.QuantSpec(2), cj.QuantSpec(4, symmetric=False),
                                             cj.QuantSpec(4, symmetric=False, calibration="percentile"),
                                             cj.QuantSpec(8, calibration="mse")]))
def test_every_finite_float32_input_gives_finite_codes_and_scales(data, spec):
    _check_extreme(data, spec)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(data=FLOATS32, spec=st.sampled_from(EXTREME_SPECS))
def test_every_finite_float32_input_gives_finite_codes_and_scales_wide(data, spec):
    _check_extreme(data, spec)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e20, 1e37, 1.3e38, F32_MAX])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_within_half_a_step_at_every_magnitude(magnitude, bits):
    x = normal((64, 3), seed=bits)
    x = (x / jnp.max(jnp.abs(x), axis=0, keepdims=True) * magnitude).astype(jnp.float32)
    q = cj.quantize(x, cj.QuantSpec(bits))
    err = np.abs(np.asarray(x, np.float64) - np.asarray(cj.dequantize(q), np.float64))
    assert np.all(err <= 0.5 * full_scale(q).astype(np.float64) * (1 + 1e-5)), (magnitude, bits)


def test_float64_leaves_are_rejected_naming_the_path():
    with jax.enable_x64(True):
        x = jnp.asarray([[1e300, 1e39], [1e200, 1e100]])
        assert x.dtype == jnp.float64
        with pytest.raises(TypeError, match=r"'w'.*float64"):
            cj.quantize(x, path="w")
        with pytest.raises(TypeError, match=r"'dense/kernel'.*float64"):
            cj.quantize_params({"dense": {"kernel": x}})
        with pytest.raises(TypeError, match=r"'dense/kernel'.*float64"):
            cj.quantize_params({"dense": {"kernel": x}}, {"kernel": cj.QuantSpec(4)})
        with pytest.raises(TypeError, match=r"'dense/kernel'.*float64"):
            cj.fake_quant_params({"dense": {"kernel": x}})
        with pytest.raises(TypeError, match="float64"):
            cj.quantization.compute_scale(x)
        # float32 leaves still work with x64 on
        q = cj.quantize(jnp.ones((2, 2), jnp.float32))
        assert q.scale.dtype == jnp.float32


def test_numpy_float64_is_narrowed_by_jax_when_x64_is_off():
    # With 64-bit types off JAX itself narrows NumPy float64: that is accepted (documented).
    q = cj.quantize(np.ones((2, 2)))
    assert q.dtype == jnp.float64 or q.dtype == jnp.float32


@pytest.mark.parametrize(
    "spec",
    [cj.QuantSpec(4), cj.QuantSpec(8, symmetric=False), cj.QuantSpec(4, calibration="percentile"), cj.QuantSpec(1),
     cj.QuantSpec(4, calibration="mse"), cj.QuantSpec(4, channel_axes=()), cj.QuantSpec(4, group_size=2)],
)
def test_zero_size_leaves_pass_through(spec):
    x = jnp.zeros((0, 4), jnp.float32)
    q = cj.quantize(x, spec, path="empty")
    assert q.shape == (0, 4) and q.values.size == 0
    assert np.all(np.asarray(q.scale) == 1)
    assert cj.dequantize(q).shape == (0, 4)
    assert cj.fake_quant(x, spec).shape == (0, 4)
    assert jax.jit(lambda v: cj.fake_quant(v, spec))(x).shape == (0, 4)
    assert np.all(np.asarray(cj.quantization.compute_scale(x, spec)[0]) == 1)


def test_zero_size_kernel_in_quantize_params_and_calibration():
    params = {"empty": {"kernel": jnp.zeros((0, 4))}, "dense": {"kernel": normal((3, 4))}}
    qp = cj.quantize_params(params, cj.QuantSpec(4))
    assert qp["empty"]["kernel"].shape == (0, 4)
    back = cj.dequantize_params(qp)
    assert back["empty"]["kernel"].shape == (0, 4)
    assert back["dense"]["kernel"].shape == (3, 4)
    ranges = cj.calibrate(lambda p, x: {"act": x}, None, [jnp.zeros((0, 3))], cj.QuantSpec(8, channel_axes=(), calibration="percentile"))
    assert float(ranges["act"].scale.reshape(())) == 1.0


# ---------------------------------------------------------------- issue 11: QArray leaves stay leaves
def _partly_quantized():
    params = {"d": {"kernel": normal((3, 4)), "bias": jnp.ones(4)}, "e": {"kernel": normal((4, 2), seed=1)}}
    return params, cj.quantize_params(params, {"d/kernel": cj.QuantSpec(4)})


def test_qarray_is_a_compressed_leaf_for_the_tree_utilities():
    from compressjax import tree

    assert cj.QArray._cj_compressed_leaf is True
    _, qp = _partly_quantized()
    paths = [p for p, _ in tree.leaves_with_paths(qp)]
    assert paths == ["d/bias", "d/kernel", "e/kernel"]
    assert not tree.selector(None)("d/kernel", qp["d"]["kernel"])
    assert [p for p, _ in tree.selected_leaves(qp)] == ["e/kernel"]
    # any class with the attribute is a leaf (e.g. another compressed format)

    @jax.tree_util.register_pytree_node_class
    class Coded:
        _cj_compressed_leaf = True

        def __init__(self, a):
            self.a = a

        def tree_flatten(self):
            return (self.a,), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    t = {"c": Coded(jnp.ones((3, 3))), "w": jnp.ones((2, 2))}
    assert [p for p, _ in tree.leaves_with_paths(t)] == ["c", "w"]
    assert [p for p, _ in tree.selected_leaves(t)] == ["w"]


def test_quantize_params_again_skips_or_refuses_quantized_leaves():
    params, qp = _partly_quantized()
    again = cj.quantize_params(qp)  # default selection: the QArray passes through, the float kernel is quantized
    assert again["d"]["kernel"] is qp["d"]["kernel"]
    assert isinstance(again["e"]["kernel"], cj.QArray)
    assert not isinstance(again["d"]["kernel"].scale, cj.QArray)
    back = cj.dequantize_params(again)  # used to crash on a QArray inside a QArray
    np.testing.assert_array_equal(back["d"]["kernel"], cj.dequantize(qp["d"]["kernel"]))
    with pytest.raises(TypeError, match=r"'d/kernel'.*already quantized"):
        cj.quantize_params(qp, {"kernel": cj.QuantSpec(4)})
    with pytest.raises(ValueError, match="already quantized"):
        cj.quantize_params(again)
    with pytest.raises(TypeError, match="already"):
        cj.quantize(qp["d"]["kernel"])


def test_fake_quant_params_leaves_quantized_scales_alone():
    _, qp = _partly_quantized()
    out = cj.fake_quant_params(qp)
    assert out["d"]["kernel"] is qp["d"]["kernel"]
    np.testing.assert_array_equal(out["d"]["kernel"].scale, qp["d"]["kernel"].scale)


def test_sparsity_summary_and_masks_never_see_scale_leaves():
    _, qp = _partly_quantized()
    summary = cj.sparsity_summary(qp)
    assert [r.path for r in summary.leaves] == ["d/kernel", "e/kernel"]
    assert summary.leaves[0].size == 12  # the QArray counted as its 12 weights, not its scales
    masks = cj.magnitude_masks(qp, 0.5)
    assert masks["d"]["kernel"] is None and masks["e"]["kernel"].shape == (4, 2)
    with pytest.raises(TypeError, match=r"'d/kernel'.*already compressed"):
        cj.magnitude_masks(qp, 0.5, where="kernel")


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_given_scale_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match=r"'w'.*finite and > 0"):
        cj.quantize(jnp.ones((2, 2)), cj.QuantSpec(4), scale=bad, path="w")
    with pytest.raises(ValueError, match=r"'w'.*finite and > 0"):
        cj.fake_quant(jnp.ones((2, 2)), cj.QuantSpec(4), scale=bad, path="w")


def test_zero_size_kernel_through_masks_save_and_load(tmp_path):
    params = {"empty": {"kernel": jnp.zeros((0, 4))}, "dense": {"kernel": normal((4, 4))}}
    masks = cj.magnitude_masks(params, 0.5)
    assert masks["empty"]["kernel"].shape == (0, 4)
    path = tmp_path / "m.cjx"
    cj.save(path, params, masks=masks, rules=cj.QuantSpec(4))
    assert cj.load(path)["empty"]["kernel"].shape == (0, 4)
    q = cj.load(path, dequantize=False)["empty"]["kernel"]
    assert isinstance(q, cj.QArray) and q.shape == (0, 4)


def test_extreme_given_scales_still_give_finite_codes():
    x = jnp.array([[0.0, 1e-30, -3e38, 3e38]])
    with pytest.raises(ValueError, match="normal float32"):
        cj.quantize(x, cj.QuantSpec(4), scale=1e-40)  # subnormal: flushed to zero by the CPU
    for scale in (2e-38, 1e-30, 3e38):
        codes = cj.quantize(x, cj.QuantSpec(4), scale=scale).ints()
        assert np.all(np.abs(np.asarray(codes)) <= 7), scale
        assert np.all(np.isfinite(np.asarray(cj.fake_quant(x, cj.QuantSpec(4), scale=scale)))), scale
    q = cj.quantize(jnp.zeros((2, 2)), cj.QuantSpec(1), scale=0.0)  # 1 bit: a zero scale is an all-zero group
    assert np.all(np.asarray(cj.dequantize(q)) == 0)
