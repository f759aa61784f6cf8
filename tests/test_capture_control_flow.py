"""collect_hessians inside control flow (scan, fori/while, cond/switch), batched and grouped matmuls:
each form against the Hessians of the same model unrolled by hand, and the cases that must raise."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import compressjax as cj
from compressjax.hessians import Hessian, collect_hessians

L, D = 3, 8
RNG = np.random.default_rng(0)


def _arr(*shape, scale=0.3):
    return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def _hs(tree):
    return {k: v for k, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Hessian))[0]}


def _same(a, b):
    """Two Hessian trees hold the same matrices, counts and layouts (to float32 rounding)."""
    fa, fb = _hs(a), _hs(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        assert (x is None) == (y is None), k
        if x is None:
            continue
        assert (x.in_axes, x.layer_axes, x.groups) == (y.in_axes, y.layer_axes, y.groups), (k, x, y)
        np.testing.assert_allclose(np.asarray(x.h), np.asarray(y.h), rtol=1e-5, atol=1e-5, err_msg=str(k))
        np.testing.assert_array_equal(np.asarray(x.count), np.asarray(y.count))


XS = [_arr(4, 5, D, scale=1.0) for _ in range(2)]
STACK = {"w": _arr(L, D, D), "head": _arr(D, 2)}


def _unrolled(p, x, order=range(L)):
    for i in order:
        x = jnp.tanh(x @ p["w"][i])
    return x @ p["head"]


def test_issue_example_scan_is_not_silent():
    """The issue's example: on main 'layers/kernel' got None; now one Hessian per layer."""
    params = {"layers": {"kernel": jnp.ones((3, 16, 16)) / 16}, "head": {"kernel": jnp.ones((16, 4))}}

    def apply(p, x):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])
        return h @ p["head"]["kernel"]

    H = collect_hessians(apply, params, [jnp.ones((32, 16))])
    hk = H["layers"]["kernel"]
    assert hk.h.shape == (3, 16, 16) and hk.layer_axes == (0,) and hk.in_axes == (1,) and hk.layer_shape == (3,)
    np.testing.assert_array_equal(np.asarray(hk.count), [32.0, 32.0, 32.0])
    np.testing.assert_allclose(np.asarray(hk.h[0]), np.full((16, 16), 32.0))


@pytest.mark.parametrize("unroll", [1, 2])
def test_scan_axis0_with_remat_and_jit_in_the_body(unroll):
    def body(h, w):
        return jax.checkpoint(jax.jit(lambda h, w: jnp.tanh(h @ w)))(h, w), None

    def f(p, x):
        return lax.scan(body, x, p["w"], unroll=unroll)[0] @ p["head"]

    _same(collect_hessians(f, STACK, XS), collect_hessians(_unrolled, STACK, XS))


def test_reverse_scan_indexes_the_right_layer():
    def f(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"], reverse=True)[0] @ p["head"]

    _same(collect_hessians(f, STACK, XS), collect_hessians(lambda p, x: _unrolled(p, x, reversed(range(L))), STACK, XS))


def test_scan_over_axis1_like_maxtext():
    p = {"w": jnp.moveaxis(STACK["w"], 0, 1), "head": STACK["head"]}  # (in, L, out)

    def f(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, jnp.moveaxis(p["w"], 1, 0))[0] @ p["head"]

    def g(p, x):
        for i in range(L):
            x = jnp.tanh(x @ p["w"][:, i, :])
        return x @ p["head"]

    H = collect_hessians(f, p, XS)
    assert H["w"].layer_axes == (1,) and H["w"].in_axes == (0,) and H["w"].h.shape == (L, D, D)
    _same(H, collect_hessians(g, p, XS))


def test_nested_scans_give_two_layer_axes():
    p = {"w": _arr(2, L, D, D), "head": STACK["head"]}

    def f(p, x):
        def outer(h, wo):
            return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, wo)[0], None

        return lax.scan(outer, x, p["w"])[0] @ p["head"]

    def g(p, x):
        for i in range(2):
            for j in range(L):
                x = jnp.tanh(x @ p["w"][i, j])
        return x @ p["head"]

    H = collect_hessians(f, p, XS)
    assert H["w"].layer_axes == (0, 1) and H["w"].h.shape == (2, L, D, D) and H["w"].count.shape == (2, L)
    _same(H, collect_hessians(g, p, XS))


def test_fori_and_while_loops_over_a_stacked_tree():
    def fori(p, x):
        return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ jax.tree.map(lambda a: a[i], p)["w"]), x) @ p["head"]

    def fori_dynamic(p, x):  # a trip count only known at run time: a while_loop
        n = L + (jnp.sum(x) * 0).astype(jnp.int32)  # traced: fori_loop becomes a while_loop
        return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ lax.dynamic_index_in_dim(p["w"], i, keepdims=False)), x) @ p["head"]

    def wl(p, x):
        def body(c):
            i, h = c
            return i + 1, jnp.tanh(h @ p["w"][i])

        return lax.while_loop(lambda c: c[0] < L, body, (0, x))[1] @ p["head"]

    def carried(p, x):  # the stacked tree passed through the loop carry unchanged
        return lax.fori_loop(0, L, lambda i, c: (jnp.tanh(c[0] @ c[1]["w"][i]), c[1]), (x, p))[0] @ p["head"]

    ref = collect_hessians(_unrolled, STACK, XS)
    _same(collect_hessians(fori, STACK, XS), ref)
    _same(collect_hessians(carried, STACK, XS), ref)
    _same(collect_hessians(wl, STACK, XS), ref)
    _same(collect_hessians(fori_dynamic, STACK, XS), ref)


def test_python_loop_static_slices_are_per_slice():
    """On main each static slice w[i] made the layer axis an input axis: an (L*d)^2 block-diagonal Hessian."""
    H = collect_hessians(_unrolled, STACK, XS)
    assert H["w"].h.shape == (L, D, D) and H["w"].layer_axes == (0,) and H["w"].in_axes == (1,)
    X = np.concatenate([np.asarray(x).reshape(-1, D) for x in XS])
    np.testing.assert_allclose(np.asarray(H["w"].h[0]), X.T @ X, rtol=1e-5, atol=1e-4)
    x1 = np.tanh(X @ np.asarray(STACK["w"][0]))
    np.testing.assert_allclose(np.asarray(H["w"].h[1]), x1.T @ x1, rtol=1e-5, atol=1e-4)


def test_cond_and_switch_count_rows_only_in_the_branch_taken():
    p = {"a": _arr(D, D), "b": _arr(D, D), "c": _arr(D, D)}

    def f(p, x):
        return lax.cond(jnp.sum(x) > 0, lambda x: x @ p["a"], lambda x: x @ p["b"], x)

    def g(p, x):
        i = jnp.clip(jnp.floor(jnp.sum(x)).astype(jnp.int32), 0, 2)
        return lax.switch(i, [lambda x: x @ p["a"], lambda x: x @ p["b"] + x @ p["a"], lambda x: x @ p["c"]], x)

    xs = [jnp.full((6, D), v, jnp.float32) * _arr(6, D, scale=0.01) ** 0 for v in (0.1, -0.1, 0.02, -0.2)]
    H = collect_hessians(f, p, xs, where="a|b")
    pos = [x for x in xs if float(jnp.sum(x)) > 0]
    neg = [x for x in xs if float(jnp.sum(x)) <= 0]
    ga = sum(np.asarray(x).T @ np.asarray(x) for x in pos)
    gb = sum(np.asarray(x).T @ np.asarray(x) for x in neg)
    np.testing.assert_allclose(np.asarray(H["a"].h), ga, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(H["b"].h), gb, rtol=1e-5)
    assert float(H["a"].count) == 6 * len(pos) and float(H["b"].count) == 6 * len(neg)
    xs3 = [jnp.full((2, D), v / (2 * D), jnp.float32) for v in (0.5, 1.5, 2.5, 1.2)]  # branches 0, 1, 2, 1
    H3 = collect_hessians(g, p, xs3)
    assert [float(H3[k].count) for k in "abc"] == [6.0, 4.0, 2.0]
    gram = [np.asarray(x).T @ np.asarray(x) for x in xs3]
    np.testing.assert_allclose(np.asarray(H3["a"].h), gram[0] + gram[1] + gram[3], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(H3["c"].h), gram[2], rtol=1e-5)


def test_moe_batched_dot_general_one_hessian_per_expert():
    E, T = 4, 6
    p = {"experts": _arr(E, D, 5)}
    xs = [_arr(E, T, D, scale=1.0) for _ in range(2)]
    H = collect_hessians(lambda p, x: jnp.einsum("etd,edf->etf", x, p["experts"]), p, xs)["experts"]
    assert H.layer_axes == (0,) and H.in_axes == (1,) and H.h.shape == (E, D, D)
    for e in range(E):
        want = sum(np.asarray(x[e]).T @ np.asarray(x[e]) for x in xs)
        np.testing.assert_allclose(np.asarray(H.h[e]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(H.count), np.full(E, 2 * T))
    # Experts laid out (d, E, f) and contracted from the other side give the same matrices.
    q = {"experts": jnp.moveaxis(p["experts"], 0, 1)}
    Hq = collect_hessians(lambda p, x: jnp.einsum("def,etd->eft", p["experts"], x), q, xs)["experts"]
    assert Hq.layer_axes == (1,) and Hq.in_axes == (0,)
    np.testing.assert_allclose(np.asarray(Hq.h), np.asarray(H.h), rtol=1e-6)


def _conv(x, k, groups, padding="SAME"):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@pytest.mark.parametrize("groups, c_in, c_out", [(2, 4, 6), (4, 4, 8)])  # grouped; depthwise (c_in groups)
def test_grouped_and_depthwise_conv_one_hessian_per_group(groups, c_in, c_out):
    k = _arr(3, 2, c_in // groups, c_out)
    xs = [_arr(2, 5, 4, c_in, scale=1.0) for _ in range(2)]
    H = collect_hessians(lambda p, x: _conv(x, p["k"], groups), {"k": k}, xs)["k"]
    cg, og = c_in // groups, c_out // groups
    assert H.groups == groups and H.layer_axes == () and H.h.shape == (groups, 3 * 2 * cg, 3 * 2 * cg) and H.count.shape == (groups,)
    for g in range(groups):
        part = {"k": k[..., g * og:(g + 1) * og]}
        ref = collect_hessians(lambda p, x, g=g: _conv(x[..., g * cg:(g + 1) * cg], p["k"], 1), part, xs)["k"]
        assert ref.in_axes == H.in_axes
        np.testing.assert_allclose(np.asarray(H.h[g]), np.asarray(ref.h), rtol=1e-5, atol=1e-5)
        assert float(H.count[g]) == float(ref.count)


def test_conv_without_spatial_dims_is_a_matmul():
    k = _arr(5, D)  # (O, I)
    xs = [_arr(7, D, scale=1.0)]
    f = lambda p, x: lax.conv_general_dilated(x, p["k"], (), (), dimension_numbers=("NC", "OI", "NC"))  # noqa: E731
    H = collect_hessians(f, {"k": k}, xs)["k"]
    x = np.asarray(xs[0])
    assert H.in_axes == (1,)
    np.testing.assert_allclose(np.asarray(H.h), x.T @ x, rtol=1e-5, atol=1e-5)


def test_tied_embedding_gets_its_hessian_from_the_lm_head():
    p = {"emb": _arr(11, D), "w": _arr(D, D)}

    def f(p, ids):
        h = jnp.tanh(p["emb"][ids] @ p["w"])
        return h @ p["emb"].T

    ids = [jnp.asarray(RNG.integers(0, 11, size=(3, 4)))]
    H = collect_hessians(f, p, ids)
    hid = np.tanh(np.asarray(p["emb"])[np.asarray(ids[0])].reshape(-1, D) @ np.asarray(p["w"]))
    assert H["emb"].in_axes == (1,) and H["emb"].h.shape == (D, D)
    np.testing.assert_allclose(np.asarray(H["emb"].h), hid.T @ hid, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_followed_is_an_error_naming_leaf_and_primitive():
    p = {"w": _arr(D, D), "emb": _arr(11, D)}
    x = [_arr(3, D)]
    with pytest.raises(ValueError, match=r"'w'.*dot_general.*'mul'"):
        collect_hessians(lambda p, x: x @ (p["w"] * 2.0), p, x, where="w")
    with pytest.raises(ValueError, match=r"'w'.*'mul'"):  # the default where too (on main: a silent None)
        collect_hessians(lambda p, x: x @ (p["w"] * 2.0), p, x)
    experts = {"experts": _arr(4, D, D)}
    ids = jnp.asarray([0, 2, 1])
    with pytest.raises(ValueError, match=r"'experts'.*'gather'"):  # weights gathered per token
        collect_hessians(lambda p, x: jnp.einsum("td,tdf->tf", x, p["experts"][ids]), experts, x)
    with pytest.raises(ValueError, match=r"'w'.*'custom_thing'|'w'.*'sin'"):  # any op the capture does not know
        collect_hessians(lambda p, x: x @ jnp.sin(p["w"]), {"w": p["w"]}, x)
    # Embeddings that only feed a gather and elementwise ops are left out, as before.
    H = collect_hessians(lambda p, ids: (p["emb"][ids] + 1.0) @ p["w"], p, [jnp.arange(3)])
    assert H["emb"] is None and H["w"] is not None


def test_zero_rows_is_an_error_naming_the_kernel():
    p = {"w": _arr(D, 3)}
    with pytest.raises(ValueError, match=r"'w'.*zero input rows"):
        collect_hessians(lambda p, x: x @ p["w"], p, [_arr(4, D)], row_mask=lambda x: jnp.zeros(4, bool))
    with pytest.raises(ValueError, match=r"'w'.*zero input rows"):
        collect_hessians(lambda p, x: x @ p["w"], p, [jnp.zeros((0, D))])
    with pytest.raises(ValueError, match=r"'w'.*layer \(2,\).*zero input rows"):  # a slice never used
        collect_hessians(lambda p, x: x @ p["w"][0] @ p["w"][1], {"w": _arr(3, D, D)}, [_arr(4, D)])


def test_shard_map_on_one_device_equals_the_plain_model():
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sm = jax.shard_map(lambda w, x: jnp.tanh(x @ w), mesh=mesh, in_specs=(jax.P(), jax.P("d")), out_specs=jax.P("d"))
    p = {"w": _arr(D, D)}
    _same(collect_hessians(lambda p, x: sm(p["w"], x), p, XS), collect_hessians(lambda p, x: jnp.tanh(x @ p["w"]), p, XS))


SHARD_MAP_8 = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from compressjax.hessians import collect_hessians
assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
P = jax.P
rng = np.random.default_rng(0)
p = {"w1": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
     "stack": jnp.asarray(rng.normal(size=(3, 8, 8)) * 0.3, jnp.float32)}
def body(w1, w2, st, x):
    h = jnp.tanh(x @ w1)                                            # replicated weight, rows split over 'data'
    h = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, st)[0]    # a scanned stack inside the shard_map
    return h @ w2                                                   # column-parallel: w2's outputs split over 'model'
sm = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P("data")), out_specs=P("data", "model"))
xs = [jnp.asarray(rng.normal(size=(16, 6)), jnp.float32) for _ in range(2)]
with jax.set_mesh(mesh):
    H = collect_hessians(lambda p, x: sm(p["w1"], p["w2"], p["stack"], x), p, xs)
R = collect_hessians(lambda p, x: body(p["w1"], p["w2"], p["stack"], x), p, xs)
for k in p:
    np.testing.assert_allclose(np.asarray(H[k].h), np.asarray(R[k].h), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(H[k].count), np.asarray(R[k].count))
    assert (H[k].in_axes, H[k].layer_axes) == (R[k].in_axes, R[k].layer_axes)
assert H["stack"].h.shape == (3, 8, 8)
rowpar = jax.shard_map(lambda w, x: lax.psum(x @ w, "model"), mesh=mesh, in_specs=(P("model", None), P("data", "model")), out_specs=P("data"))
try:
    with jax.set_mesh(mesh):
        collect_hessians(lambda p, x: rowpar(p["w2"], x), {"w2": p["w2"]}, [jnp.ones((16, 8))])
except ValueError as e:
    assert "'w2'" in str(e) and "shard_map" in str(e) and "contracted" in str(e), e
else:
    raise AssertionError("a weight split along its input axis gave no error")
print("OK")
"""


@pytest.mark.slow
def test_shard_map_on_eight_devices_equals_the_plain_model():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARD_MAP_8)], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@settings(max_examples=6, deadline=None)
@given(n_layers=st.integers(2, 4), d=st.integers(2, 5), axis=st.sampled_from([0, 1, 2]), reverse=st.booleans(), unroll=st.sampled_from([1, 2]))
def test_scan_over_any_kernel_axis_equals_static_slices(n_layers, d, axis, reverse, unroll):
    """Property: scanning a stacked kernel over any of its axes (moved first) gives the Hessians of the
    same layers applied from static slices, with that axis recorded as the layer axis."""
    rng = np.random.default_rng(n_layers * 100 + d * 10 + axis)
    p = {"w": jnp.asarray(np.moveaxis(rng.normal(size=(n_layers, d, d)) * 0.5, 0, axis), jnp.float32)}
    xs = [jnp.asarray(rng.normal(size=(3, d)), jnp.float32)]

    def scanned(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, jnp.moveaxis(p["w"], axis, 0), reverse=reverse, unroll=unroll)[0]

    def by_slices(p, x):
        for i in (reversed(range(n_layers)) if reverse else range(n_layers)):
            x = jnp.tanh(x @ lax.index_in_dim(p["w"], i, axis, keepdims=False))
        return x

    H = collect_hessians(scanned, p, xs)
    assert H["w"].layer_axes == (axis,) and H["w"].h.shape == (n_layers, d, d)
    _same(H, collect_hessians(by_slices, p, xs))


def _n_eqns(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                if hasattr(sub, "eqns"):
                    n += _n_eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += _n_eqns(sub.jaxpr)
    return n


def test_the_traced_capture_does_not_grow_with_the_number_of_layers():
    """The scan stays a scan in the accumulation step: the same equations for 2 and for 16 layers."""
    from compressjax.hessians._api import _build

    def size(n_layers):
        p = {"w": jnp.ones((n_layers, D, D))}

        def f(leaf_list, x):
            return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, leaf_list[0])[0]

        step, found = _build(f, [p["w"]], XS[0], [0], ["w"], None, None, None)
        acc = {i: (jnp.zeros((lay.n, lay[1], lay[1])), jnp.zeros((lay.n,))) for i, lay in found.items()}
        return _n_eqns(jax.make_jaxpr(step)(acc, [p["w"]], XS[0]).jaxpr)

    assert size(2) == size(16)


@pytest.mark.parametrize("model", ["scan", "fori", "tied", "moe_and_plain", "mixed_then_matmul"])
def test_analysis_followed_a_leaf_at_a_time_finds_the_same_sites(model, monkeypatch):
    """Large models are analysed a chunk of leaves at a time (bounded memory); a chunk of one weight (every
    leaf alone) must give the same Hessians, the same silent-free errors and the same sequential result."""
    import compressjax.hessians._api as api

    ids = [jnp.asarray(RNG.integers(0, 11, size=(3, 4)))]
    if model == "scan":
        p, xs = STACK, XS

        def f(p, x):
            h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
            return h @ p["head"]
    elif model == "fori":
        p, xs = STACK, XS

        def f(p, x):
            x = jax.lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ p["w"][i]), x)
            return x @ p["head"]
    elif model == "tied":
        p, xs = {"emb": _arr(11, D), "w": _arr(D, D)}, ids

        def f(p, ids):
            return jnp.tanh(p["emb"][ids] @ p["w"]) @ p["emb"].T
    elif model == "moe_and_plain":
        p, xs = {"experts": _arr(4, D, 5), "w": _arr(5, 3)}, [_arr(4, 6, D, scale=1.0) for _ in range(2)]

        def f(p, x):
            return jnp.einsum("etd,edf->etf", x, p["experts"]) @ p["w"]
    else:  # two leaves mixed before a matmul: an error in one chunk and in separate ones alike
        p, xs = {"a": _arr(D, D), "b": _arr(D, D)}, [_arr(3, D)]

        def f(p, x):
            return x @ (p["a"] + p["b"])

    def capture():
        try:
            return collect_hessians(f, p, xs)
        except ValueError as e:
            return str(e)

    whole = capture()
    monkeypatch.setattr(api, "_ANALYSIS_CHUNK", 1)
    alone = capture()
    if isinstance(whole, str):
        assert model == "mixed_then_matmul" and isinstance(alone, str) and "'add'" in whole and "'add'" in alone
        return
    _same(whole, alone)
    if model in ("scan", "moe_and_plain"):
        compress = lambda q, h: cj.gptq(q, h, cj.QuantSpec(bits=4))  # noqa: E731
        got = cj.sequential(f, p, xs, compress)
        monkeypatch.setattr(api, "_ANALYSIS_CHUNK", 2**24)
        want = cj.sequential(f, p, xs, compress)
        for a, b in zip(jax.tree.leaves(cj.dequantize_params(got)), jax.tree.leaves(cj.dequantize_params(want)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
