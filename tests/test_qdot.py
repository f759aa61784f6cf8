"""Tests for quantized_dot_general (fake and integer paths), QAT with linen and NNX, and calibrate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import compressjax as cj

PER_TENSOR = cj.QuantSpec(8, channel_axes=())


@pytest.fixture(autouse=True)
def exact_float_matmuls():
    # GPUs default to TF32 for float32 matmuls; the fake path must be compared at full float32 precision.
    with jax.default_matmul_precision("highest"):
        yield

SPEC_PAIRS = [
    (cj.QuantSpec(8), PER_TENSOR),
    (cj.QuantSpec(4, group_size=16), PER_TENSOR),
    (cj.QuantSpec(1), cj.QuantSpec(8, channel_axes=(0,))),  # per-row activations
    (cj.QuantSpec(3), cj.QuantSpec(8, channel_axes=(), symmetric=False)),
    (cj.QuantSpec(4, group_size=8, calibration="mse"), cj.QuantSpec(6, channel_axes=(0,), symmetric=False)),
]


def inputs(shape=(6, 64), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("wspec, aspec", SPEC_PAIRS)
@pytest.mark.slow
def test_int_path_matches_fake_path_linen(wspec, aspec):
    x = inputs()
    fake = nn.Dense(32, dot_general=cj.quantized_dot_general(wspec, aspec, mode="fake"))
    intm = nn.Dense(32, dot_general=cj.quantized_dot_general(wspec, aspec, mode="int"))
    params = fake.init(jax.random.key(1), x)
    y_fake, y_int = fake.apply(params, x), intm.apply(params, x)
    assert y_int.dtype == jnp.float32
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)
    # the fake path really quantizes: it differs from the float layer
    y_float = nn.Dense(32).apply(params, x)
    assert float(jnp.max(jnp.abs(y_fake - y_float))) > 1e-4
    # and it equals a float matmul of the fake-quantized operands
    w = cj.fake_quant(params["params"]["kernel"], wspec)
    xq = cj.fake_quant(x, aspec)
    np.testing.assert_allclose(y_fake, xq @ w + params["params"]["bias"], rtol=1e-5, atol=1e-5)


def test_int_path_uses_an_int32_dot_general():
    x = inputs((2, 16))
    f = cj.quantized_dot_general(cj.QuantSpec(8), PER_TENSOR, mode="int")
    jaxpr = jax.make_jaxpr(lambda a, b: f(a, b, (((1,), (0,)), ((), ()))))(x, jnp.ones((16, 4)))
    eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(eqns) == 1
    assert [v.aval.dtype for v in eqns[0].invars] == [jnp.int8, jnp.int8]
    assert eqns[0].outvars[0].aval.dtype == jnp.int32


@pytest.mark.parametrize("wspec, aspec", SPEC_PAIRS[:3])
@pytest.mark.slow
def test_int_path_matches_fake_path_nnx_and_3d_inputs(wspec, aspec):
    x = inputs((2, 3, 64))
    aspec = PER_TENSOR if aspec.channel_axes == (0,) else aspec
    fake = nnx.Linear(64, 8, dot_general=cj.quantized_dot_general(wspec, aspec), rngs=nnx.Rngs(0))
    intm = nnx.Linear(64, 8, dot_general=cj.quantized_dot_general(wspec, aspec, mode="int"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(intm(x), fake(x), rtol=1e-5, atol=1e-5)


def test_forwards_kwargs_like_out_sharding():
    f = cj.quantized_dot_general(cj.QuantSpec(8), PER_TENSOR, mode="int")
    g = cj.quantized_dot_general(cj.QuantSpec(8), PER_TENSOR, mode="fake")
    x, w = inputs((2, 16)), inputs((16, 4), 1)
    dn = (((1,), (0,)), ((), ()))
    np.testing.assert_allclose(f(x, w, dn, out_sharding=None), g(x, w, dn, out_sharding=None), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_jit_equals_eager():
    f = cj.quantized_dot_general(cj.QuantSpec(4, group_size=4), PER_TENSOR, mode="int")
    x, w = inputs((3, 16)), inputs((16, 5), 1)
    dn = (((1,), (0,)), ((), ()))
    # XLA may reassociate the two scale multiplications under jit: equal up to one float rounding.
    np.testing.assert_allclose(jax.jit(lambda a, b: f(a, b, dn))(x, w), f(x, w, dn), rtol=1e-6, atol=1e-6)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="mode must be one of"):
        cj.quantized_dot_general(mode="int4")
    with pytest.raises(ValueError, match="needs both weight_spec and activation_spec"):
        cj.quantized_dot_general(cj.QuantSpec(8), None, mode="int")
    with pytest.raises(ValueError, match="symmetric weight spec"):
        cj.quantized_dot_general(cj.QuantSpec(8, symmetric=False), PER_TENSOR, mode="int")
    with pytest.raises(TypeError, match="weight_spec must be a QuantSpec"):
        cj.quantized_dot_general(8)
    with pytest.raises(ValueError, match="activation_scale was given"):
        cj.quantized_dot_general(cj.QuantSpec(8), None, activation_scale=1.0)
    dn = (((1,), (0,)), ((), ()))
    x, w = inputs((2, 16)), inputs((16, 4), 1)
    per_input = cj.quantized_dot_general(cj.QuantSpec(8, channel_axes=(0,)), PER_TENSOR, mode="int")
    with pytest.raises(ValueError, match="weight scale varies along contraction axis 0"):
        per_input(x, w, dn)
    per_feature = cj.quantized_dot_general(cj.QuantSpec(8), cj.QuantSpec(8, channel_axes=(-1,)), mode="int")
    with pytest.raises(ValueError, match="activation scale varies along contraction axis"):
        per_feature(x, w, dn)
    with pytest.raises(ValueError, match="'dot_general rhs \\(weights\\)'.*group_size=5 does not divide"):
        cj.quantized_dot_general(cj.QuantSpec(8, group_size=5))(x, w, dn)
    with pytest.raises(TypeError, match="'dot_general lhs \\(activations\\)' has dtype int32"):
        cj.quantized_dot_general(cj.QuantSpec(8), PER_TENSOR)(jnp.ones((2, 16), jnp.int32), w, dn)


# ---------------------------------------------------------------- QAT


class MLP(nn.Module):
    dot_general: object = None

    @nn.compact
    def __call__(self, x):
        kw = {} if self.dot_general is None else {"dot_general": self.dot_general}
        x = nn.relu(nn.Dense(32, **kw)(x))
        return nn.Dense(3, **kw)(x)


def toy_data(n=128):
    x = jax.random.normal(jax.random.key(0), (n, 8))
    y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=-1)
    return x, y


@pytest.mark.parametrize("how", ["fake_quant_params", "dot_general"])
@pytest.mark.slow
def test_linen_qat_loss_goes_down(how):
    x, y = toy_data()
    rules = {"kernel": cj.QuantSpec(4)}
    model = MLP(cj.quantized_dot_general(cj.QuantSpec(4), PER_TENSOR) if how == "dot_general" else None)
    params = model.init(jax.random.key(1), x)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    def loss_fn(p):
        p = cj.fake_quant_params(p, rules) if how == "fake_quant_params" else p
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(25):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert step._cache_size() == 1


def test_nnx_qat_loss_goes_down():
    x, y = toy_data()
    qdot = cj.quantized_dot_general(cj.QuantSpec(4), PER_TENSOR)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 32, dot_general=qdot, rngs=rngs), nnx.Linear(32, 3, dot_general=qdot, rngs=rngs)])

        def __call__(self, v):
            return self.layers[1](nnx.relu(self.layers[0](v)))

    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, o):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, g = nnx.value_and_grad(loss_fn)(m)
        o.update(m, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- calibration / PTQ


class SowMLP(nn.Module):
    dot_generals: tuple = (None, None)

    @nn.compact
    def __call__(self, x):
        for i, (dg, width) in enumerate(zip(self.dot_generals, (16, 3), strict=True)):
            self.sow("intermediates", f"in_{i}", x)
            x = nn.Dense(width, **({} if dg is None else {"dot_general": dg}))(x)
            x = nn.relu(x) if i == 0 else x
        return x


@pytest.mark.slow
def test_calibrate_absmax_and_ptq_int_equals_fake():
    x, _ = toy_data()
    batches = [x[i : i + 32] for i in range(0, 128, 32)]
    model = SowMLP()
    params = model.init(jax.random.key(0), x)
    params = {"params": params["params"]}
    collect = lambda p, b: model.apply(p, b, mutable="intermediates")[1]["intermediates"]  # noqa: E731
    ranges = cj.calibrate(collect, params, batches)
    r0 = ranges["in_0"][0]
    assert isinstance(r0, cj.ActivationRange) and r0.zero_point is None and r0.scale.shape == (1, 1)
    np.testing.assert_allclose(r0.scale[0, 0], jnp.max(jnp.abs(x)) / 127.5, rtol=1e-6)
    limited = cj.calibrate(collect, params, batches, max_batches=1)
    np.testing.assert_allclose(limited["in_0"][0].scale[0, 0], jnp.max(jnp.abs(batches[0])) / 127.5, rtol=1e-6)

    def ptq(mode):
        dgs = tuple(cj.quantized_dot_general(cj.QuantSpec(8), PER_TENSOR, mode=mode, activation_scale=ranges[f"in_{i}"][0].scale) for i in range(2))
        return SowMLP(dgs).apply(params, x)

    y_float = model.apply(params, x)
    y_fake, y_int = ptq("fake"), ptq("int")
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(y_int - y_float))) < 0.05 * float(jnp.max(jnp.abs(y_float)))


def test_calibrate_percentile_asymmetric_per_feature():
    acts = [jax.random.normal(jax.random.key(i), (200, 4)) + 3.0 for i in range(3)]
    acts[1] = acts[1].at[0, 0].set(100.0)
    spec = cj.QuantSpec(8, symmetric=False, channel_axes=(-1,), calibration="percentile", percentile=99.0)
    r = cj.calibrate(lambda p, b: {"a": b}, None, acts, spec)["a"]
    assert r.scale.shape == (1, 4) and r.zero_point.shape == (1, 4)
    assert float(r.scale[0, 0]) < 0.1 * 100 / 255  # the outlier is ignored
    assert int(r.zero_point[0, 0]) == -128  # all activations positive: lo clamps to 0


def test_calibrate_bad_inputs():
    good = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="no batch"):
        cj.calibrate(lambda p, b: b, None, [])
    with pytest.raises(ValueError, match="'a' has shape \\(4, 5\\) on batch 1"):
        cj.calibrate(lambda p, b: {"a": b}, None, [good, jnp.ones((4, 5))], jit=False)
    with pytest.raises(ValueError, match="'a' holds 1 non-finite"):
        cj.calibrate(lambda p, b: {"a": b}, None, [good, good.at[0, 0].set(jnp.inf)])
    with pytest.raises(TypeError, match="'a' has dtype int32"):
        cj.calibrate(lambda p, b: {"a": b}, None, [jnp.ones((2, 2), jnp.int32)])
    with pytest.raises(ValueError, match="batch axis"):
        cj.calibrate(lambda p, b: {"a": b}, None, [good], cj.QuantSpec(8, channel_axes=(0,)))


# ------------------------------------------------------------------ the int path reaches an integer dot in XLA
@pytest.mark.parametrize("wspec", [cj.QuantSpec(8), cj.QuantSpec(4, group_size=32)])
def test_int_mode_compiles_to_an_integer_dot(wspec):
    # The check the quantization benchmark runs on every backend (int_dot_in_hlo): the optimized HLO holds
    # an s8 x s8 -> s32 dot, and no float dot on converted codes. On XLA:CPU the int8 dot is kept as such.
    from benchmarks.quantization import int_dot_check  # conftest puts the repository root on sys.path

    dims = (((1,), (0,)), ((), ()))
    x, w = inputs((16, 64)), inputs((64, 24), seed=1)
    f = cj.quantized_dot_general(wspec, PER_TENSOR, mode="int")
    got = int_dot_check(lambda x, w: f(x, w, dims), x, w)
    assert got["int_dot_in_hlo"] and not got["float_dot_in_hlo"], got["dots"]
    assert all(d["result"] == "s32" for d in got["dots"]), got["dots"]
    fake = cj.quantized_dot_general(wspec, PER_TENSOR, mode="fake")
    got = int_dot_check(lambda x, w: fake(x, w, dims), x, w)
    assert got["float_dot_in_hlo"] and not got["int_dot_in_hlo"], got["dots"]
