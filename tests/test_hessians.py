"""collect_hessians: finds the matmul weights of linen, NNX, equinox and plain-function models."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compressjax import QuantSpec, quantize_params
from compressjax.hessians import Hessian, collect_hessians

KEY = jax.random.key(0)


def _quad(H: Hessian, kernel) -> float:
    """tr(W^T H W) with the kernel laid out as (inputs..., outputs...) -> (d_in, d_out)."""
    k = np.asarray(kernel, np.float64)
    out_axes = [a for a in range(k.ndim) if a not in H.in_axes]
    w = k.transpose(list(H.in_axes) + out_axes).reshape(H.d_in, -1)
    return float(np.sum(w * (np.asarray(H.h, np.float64) @ w)))


def _is_h(x):
    return isinstance(x, Hessian)


def test_hessian_is_a_pytree_through_jit():
    hs = Hessian(jnp.eye(3), jnp.asarray(5.0), (1,), layer_axes=(), groups=1)
    leaves, treedef = jax.tree.flatten(hs)
    assert len(leaves) == 2 and all(isinstance(x, jax.Array) for x in leaves)
    out = jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t))({"k": hs})["k"]
    assert isinstance(out, Hessian) and out.in_axes == (1,)
    np.testing.assert_array_equal(np.asarray(out.h), 2 * np.eye(3))
    assert float(out.count) == 10.0


def test_plain_function_of_a_dict_is_exact():
    rng = np.random.default_rng(0)
    p = {"w1": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.ones((5,))}

    def f(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b"]) @ p["w2"]

    xs = [jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(3)]
    H = collect_hessians(f, p, xs)
    X = np.concatenate([np.asarray(x) for x in xs])
    A = np.maximum(X @ np.asarray(p["w1"]) + 1, 0)
    np.testing.assert_allclose(np.asarray(H["w1"].h), X.T @ X, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(H["w2"].h), A.T @ A, rtol=1e-5, atol=1e-4)
    assert H["b"] is None and float(H["w1"].count) == 12.0 and H["w1"].in_axes == (0,)


class _Zoo(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, T, 3)
        x = nn.Einsum((3, 2, 5), "btd,dnh->btnh", use_bias=False, name="einsum")(x)
        x = nn.DenseGeneral((4,), axis=(-2, -1), use_bias=False, name="dense_general")(x)
        x = nn.Conv(3, (3, 2), strides=(2, 1), padding=((1, 0), (2, 1)), use_bias=False, name="conv")(x.reshape(2, 4, 2, 2))
        return nn.Dense(5, use_bias=False, name="dense")(jnp.tanh(x))


def _layer_outputs_sq(params, x, name):
    """sum ||layer output||^2 of one layer, from the model's captured intermediates."""
    _, st = _Zoo().apply(params, x, capture_intermediates=lambda mdl, _: mdl.name == name, mutable=["intermediates"])
    (y,) = st["intermediates"][name]["__call__"]
    return float(jnp.sum(jnp.square(y.astype(jnp.float64) if jax.config.jax_enable_x64 else y)))


@pytest.mark.parametrize("name,in_axes", [("einsum", (0,)), ("dense_general", (0, 1)), ("conv", (0, 1, 2)), ("dense", (0,))])
def test_linen_layers_are_found_with_their_input_axes(name, in_axes):
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    params = _Zoo().init(KEY, x)
    H = collect_hessians(lambda p, b: _Zoo().apply(p, b), params, [x])
    h = H["params"][name]["kernel"]
    assert h.in_axes == in_axes
    k = params["params"][name]["kernel"]
    # ||X W||^2 == tr(W^T H W): checks the Gram matrix and its row order against the kernel's layout.
    np.testing.assert_allclose(_quad(h, k), _layer_outputs_sq(params, x, name), rtol=2e-4)
    if name == "conv":  # H is (kh*kw*c_in)^2 in the order of kernel.reshape(-1, c_out)
        assert h.h.shape == (12, 12)


def test_conv_gram_matches_explicit_patches():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    k = jnp.asarray(rng.normal(size=(3, 2, 3, 4)), jnp.float32)

    def f(p, x):
        return jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    H = collect_hessians(f, {"k": k}, [jnp.asarray(x)])
    rows = [x[n, i : i + 3, j : j + 2, :].reshape(-1) for n in range(2) for i in range(3) for j in range(3)]
    P = np.stack(rows)  # patch order (kh, kw, c_in) == kernel.reshape(-1, c_out)
    np.testing.assert_allclose(np.asarray(H["k"].h), P.T @ P, rtol=1e-5, atol=1e-4)
    assert float(H["k"].count) == len(rows)


def test_nnx_split_merge_and_equinox():
    lin = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    x = jax.random.normal(KEY, (8, 6))
    H = collect_hessians(lambda s, b: nnx.merge(gdef, s)(b), state, [x])
    np.testing.assert_allclose(np.asarray(H["kernel"].h), np.asarray(x.T @ x), rtol=1e-5, atol=1e-4)
    assert jax.tree.leaves(H["bias"]) == []  # nnx keeps a Param(None) there

    m = eqx.nn.Linear(6, 4, key=KEY)  # weight is (out, in): contracted over axis 1
    params, static = eqx.partition(m, eqx.is_array)
    He = collect_hessians(lambda p, b: jax.vmap(eqx.combine(p, static))(b), params, [x])
    assert He.weight.in_axes == (1,)
    np.testing.assert_allclose(np.asarray(He.weight.h), np.asarray(x.T @ x), rtol=1e-5, atol=1e-4)


def test_kernel_used_twice_accumulates_both_uses_and_wrappers_are_entered():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)

    @jax.custom_vjp
    def mm(a, b):
        return a @ b

    mm.defvjp(lambda a, b: (a @ b, (a, b)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def f(p, x):
        y = jax.jit(lambda a, b: a @ b.astype(jnp.bfloat16).astype(jnp.float32))(x, p["w"])
        return jax.checkpoint(lambda a: mm(jax.nn.relu(a), p["w"].T.T))(y)

    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    H = collect_hessians(f, {"w": w}, [x])
    y = np.asarray(x) @ np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32))
    r = np.maximum(y, 0)
    np.testing.assert_allclose(np.asarray(H["w"].h), np.asarray(x).T @ np.asarray(x) + r.T @ r, rtol=1e-4, atol=1e-3)
    assert float(H["w"].count) == 14.0


def test_padding_rows_do_not_count():
    model = nn.Dense(4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    params = model.init(KEY, x)
    apply = lambda p, b: model.apply(p, b["x"])  # noqa: E731
    mask_fn = lambda b: b["mask"]  # noqa: E731
    plain = collect_hessians(apply, params, [{"x": x, "mask": np.ones((2, 5), bool)}], row_mask=mask_fn)
    padded_x = np.concatenate([x, np.full((2, 3, 3), np.nan, np.float32)], axis=1)  # even NaN padding
    mask = np.concatenate([np.ones((2, 5), bool), np.zeros((2, 3), bool)], axis=1)
    padded = collect_hessians(apply, params, [{"x": padded_x, "mask": mask}], row_mask=mask_fn)
    np.testing.assert_allclose(np.asarray(padded["params"]["kernel"].h), np.asarray(plain["params"]["kernel"].h), rtol=1e-6)
    assert float(padded["params"]["kernel"].count) == 10.0
    with pytest.raises(ValueError, match="row_mask has shape"):
        collect_hessians(apply, params, [{"x": x, "mask": np.ones((3,), bool)}], row_mask=mask_fn)


def test_one_trace_per_batch_shape_and_quantized_leaves_pass():
    calls = []
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jnp.ones((4, 6))
    params = model.init(KEY, x)

    def apply(p, b):
        calls.append(1)
        return model.apply(p, b)

    batches = [jax.random.normal(jax.random.key(i), (4, 6)) for i in range(3)]
    collect_hessians(apply, params, batches)
    assert len(calls) == 1
    qp = quantize_params(params, {"layers_0/kernel": QuantSpec(bits=4)})
    H = collect_hessians(lambda p, b: model.apply(p, b), qp, batches)
    assert H["params"]["layers_0"]["kernel"] is None and H["params"]["layers_2"]["kernel"] is not None


def test_repeated_cycle_of_more_than_sixteen_shapes_is_traced_once():
    # A sequential pass cycles through stages x batch shapes; a small first-in-first-out cache missed on
    # every call of its second run.
    calls = []
    model = nn.Dense(3)
    params = model.init(KEY, jnp.ones((1, 6)))

    def apply(p, b):
        calls.append(1)
        return model.apply(p, b)

    shapes = [jnp.ones((n, 6)) for n in range(1, 21)]
    for _ in range(2):
        for x in shapes:
            collect_hessians(apply, params, [x])
    assert len(calls) == len(shapes)


def test_bad_inputs():
    model = nn.Dense(3)
    x = jnp.ones((4, 6))
    params = model.init(KEY, x)
    apply = lambda p, b: model.apply(p, b)  # noqa: E731
    with pytest.raises(ValueError, match="selects no"):
        collect_hessians(apply, params, [x], where="nothing_here")
    with pytest.raises(ValueError, match="empty"):
        collect_hessians(apply, params, [])
    with pytest.raises(ValueError, match="'params/kernel'.*NaN or Inf"):
        collect_hessians(apply, params, [x.at[0, 0].set(jnp.nan)])
    with pytest.raises(TypeError, match="apply_fn"):
        collect_hessians(None, params, [x])
    with pytest.raises(TypeError, match="row_mask"):
        collect_hessians(apply, params, [x], row_mask=3)
    emb = {"table": jnp.ones((10, 4)), "w": jnp.ones((4, 2))}
    f = lambda p, ids: p["table"][ids] @ p["w"]  # noqa: E731
    H = collect_hessians(f, emb, [jnp.arange(3)])  # default where: the gathered table is skipped
    assert H["table"] is None and H["w"].h.shape == (4, 4)
    with pytest.raises(ValueError, match="'table'.*not the weight of any matmul"):
        collect_hessians(f, emb, [jnp.arange(3)], where="table|w")


@pytest.mark.slow
def test_eight_devices_equal_one():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
        from compressjax.hessians import collect_hessians
        assert jax.device_count() == 8
        model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        xs = [jax.random.normal(jax.random.key(i), (16, 12)) for i in range(2)]
        params = model.init(jax.random.key(0), xs[0])
        apply = lambda p, b: model.apply(p, b)
        one = collect_hessians(apply, params, xs)
        mesh = jax.make_mesh((8,), ("data",))
        many = collect_hessians(apply, params, xs, mesh=mesh)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
        try:
            collect_hessians(apply, params, [xs[0][:12]], mesh=mesh)
        except ValueError as e:
            assert "divisible" in str(e)
        else:
            raise AssertionError("no error")
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
