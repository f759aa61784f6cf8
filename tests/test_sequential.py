"""sequential: one pass over the calibration set, each kernel slice compressed right before its first use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import compressjax as cj

L, D = 3, 16
RNG = np.random.default_rng(0)
P = {"w": jnp.asarray(RNG.normal(size=(L, D, D)) * 0.3, jnp.float32), "head": jnp.asarray(RNG.normal(size=(D, 4)) * 0.3, jnp.float32)}
XS = [jnp.asarray(RNG.normal(size=(8, D)), jnp.float32) for _ in range(3)]
SPEC = cj.QuantSpec(bits=4)


def _gptq(p, h):
    return cj.gptq(p, h, SPEC)


def scanned(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0] @ p["head"]


def unrolled(p, x):
    for i in range(L):
        x = jnp.tanh(x @ p["w"][i])
    return x @ p["head"]


def _by_hand():
    """Sequential GPTQ written out: slice l calibrated on inputs through the compressed slices 0..l-1."""
    w = P["w"]
    X = np.concatenate([np.asarray(x) for x in XS])
    for i in range(L):
        sub = {"w": w[i], "head": P["head"]}
        hs = {"w": cj.Hessian(jnp.asarray(X.T @ X), jnp.float32(len(X)), (0,)), "head": None}
        w = w.at[i].set(cj.dequantize(_gptq(sub, hs)["w"]))
        X = np.tanh(X @ np.asarray(w[i]))
    hs = {"w": None, "head": cj.Hessian(jnp.asarray(X.T @ X), jnp.float32(len(X)), (0,))}
    head = _gptq({"w": w, "head": P["head"]}, hs)["head"]
    return w, head


@pytest.mark.slow  # over 10 s on 2 cores
def test_scanned_and_unrolled_equal_the_sequential_recipe_by_hand():
    calls = []

    def counted(p, x):
        calls.append(1)
        return scanned(p, x)

    w, head = _by_hand()
    q = cj.sequential(counted, P, XS, _gptq)
    assert len(calls) == 1  # traced once: the batches advance together through one jaxpr
    assert isinstance(q["w"], cj.QArray) and q["w"].shape == (L, D, D) and 0 in q["w"].channel_axes  # per-layer scales
    np.testing.assert_allclose(np.asarray(cj.dequantize(q["w"])), np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cj.dequantize(q["head"])), np.asarray(cj.dequantize(head)), rtol=1e-5, atol=1e-6)
    qu = cj.sequential(unrolled, P, XS, _gptq)
    np.testing.assert_array_equal(np.asarray(qu["w"].ints()), np.asarray(q["w"].ints()))
    np.testing.assert_allclose(np.asarray(qu["w"].scale), np.asarray(q["w"].scale), rtol=1e-6)


def test_plain_model_equals_layerwise_and_later_layers_see_compressed_inputs():
    p = {"w1": P["w"][0], "w2": P["w"][1], "head": P["head"]}

    def f(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["head"]

    seq = cj.sequential(f, p, XS, _gptq)
    lw = cj.layerwise(f, p, XS, _gptq, stages=["w1", "w2", "head"])
    one = _gptq(p, cj.collect_hessians(f, p, XS))
    for k in p:
        np.testing.assert_allclose(np.asarray(cj.dequantize(seq[k])), np.asarray(cj.dequantize(lw[k])), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(cj.dequantize(seq["w2"])), np.asarray(cj.dequantize(one["w2"])))
    keep = lambda x: jnp.arange(x.shape[0]) % 3 != 0  # noqa: E731  padding rows left out, as in layerwise
    seq_m = cj.sequential(f, p, XS, _gptq, row_mask=keep)
    lw_m = cj.layerwise(f, p, XS, _gptq, stages=["w1", "w2", "head"], row_mask=keep)
    for k in p:
        np.testing.assert_allclose(np.asarray(cj.dequantize(seq_m[k])), np.asarray(cj.dequantize(lw_m[k])), rtol=1e-5, atol=1e-6)


def test_sparsegpt_returns_stacked_masks_and_a_where():
    pruned, masks = cj.sequential(scanned, P, XS, lambda p, h: cj.sparsegpt(p, h, 0.5), where="w")
    assert masks["head"] is None and masks["w"].shape == (L, D, D) and masks["w"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(pruned["head"]), np.asarray(P["head"]))
    assert float(jnp.mean(masks["w"])) == pytest.approx(0.5)
    assert bool(jnp.all(jnp.where(masks["w"], True, pruned["w"] == 0)))


@pytest.mark.slow  # over 10 s on 2 cores
def test_moe_experts_and_grouped_conv_are_solved_per_slice():
    E = 3
    pe = {"experts": jnp.asarray(RNG.normal(size=(E, D, 8)), jnp.float32)}
    xe = [jnp.asarray(RNG.normal(size=(E, 5, D)), jnp.float32) for _ in range(2)]
    q = cj.sequential(lambda p, x: jnp.einsum("etd,edf->etf", x, p["experts"]), pe, xe, _gptq)["experts"]
    for e in range(E):
        X = np.concatenate([np.asarray(x[e]) for x in xe])
        ref = _gptq({"experts": pe["experts"][e]}, {"experts": cj.Hessian(jnp.asarray(X.T @ X), jnp.float32(len(X)), (0,))})["experts"]
        np.testing.assert_allclose(np.asarray(cj.dequantize(q)[e]), np.asarray(cj.dequantize(ref)), rtol=1e-5, atol=1e-6)
    k = {"k": jnp.asarray(RNG.normal(size=(3, 3, 2, 8)), jnp.float32)}  # 2 groups of 2 -> 4 channels each

    def conv(p, x):
        return lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)

    xc = [jnp.asarray(RNG.normal(size=(2, 5, 5, 4)), jnp.float32)]
    qc = cj.sequential(conv, k, xc, _gptq)["k"]
    H = cj.collect_hessians(conv, k, xc)["k"]
    for g in range(2):
        ref = _gptq({"k": k["k"][..., 4 * g:4 * g + 4]}, {"k": cj.Hessian(H.h[g], H.count[g], H.in_axes)})["k"]
        np.testing.assert_allclose(np.asarray(cj.dequantize(qc))[..., 4 * g:4 * g + 4], np.asarray(cj.dequantize(ref)), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        cj.sequential(scanned, P, [], _gptq)
    with pytest.raises(ValueError, match="batch 1 has shapes"):
        cj.sequential(scanned, P, [XS[0], XS[0][:4]], _gptq)
    with pytest.raises(TypeError, match="compress"):
        cj.sequential(scanned, P, XS, None)
    with pytest.raises(ValueError, match=r"compress \(for leaf .w.\) must return params"):
        cj.sequential(scanned, P, XS, lambda p, h: 3)

    def branchy(p, x):
        return lax.cond(jnp.sum(x) > 0, lambda x: x @ p["head"], lambda x: -x @ p["head"], x)

    with pytest.raises(ValueError, match="differs between calibration batches"):
        cj.sequential(branchy, P, [jnp.ones((2, D)), -jnp.ones((2, D))], _gptq, where="head")
    with pytest.raises(ValueError, match=r"'w' \(layer \(0,\)\).*zero input rows"):
        cj.sequential(scanned, P, XS, _gptq, row_mask=lambda x: jnp.zeros(x.shape[:1], bool))


def test_one_pass_stacked_hessians_feed_the_stacked_solvers():
    """collect_hessians' stacked Hessian goes straight into gptq / sparsegpt (solved per layer)."""
    H = cj.collect_hessians(scanned, P, XS)
    q = cj.gptq(P, H, SPEC)
    assert isinstance(q["w"], cj.QArray) and q["w"].shape == (L, D, D)
    hw = H["w"]
    for i in range(L):
        ref = _gptq({"w": P["w"][i]}, {"w": cj.Hessian(hw.h[i], hw.count[i], (0,))})["w"]
        np.testing.assert_allclose(np.asarray(cj.dequantize(q["w"])[i]), np.asarray(cj.dequantize(ref)), rtol=1e-5, atol=1e-6)
    out = scanned(cj.dequantize_params(q), XS[0])  # the stacked result runs through the same scanned model
    assert out.shape == (8, 4) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.slow  # over 10 s on 2 cores
def test_linen_nn_scan_with_remat():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(D, use_bias=False, name="down")(nn.gelu(nn.Dense(2 * D, use_bias=False, name="up")(nn.LayerNorm()(x)))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(name="layers")(x, None)
            return nn.Dense(3, name="head")(x)

    m = Model()
    params = m.init(jax.random.key(0), XS[0])

    def unrolled(p, x):  # the same layers applied one by one from static slices of the stacked params
        for i in range(L):
            x, _ = Block().apply({"params": jax.tree.map(lambda a, i=i: a[i], p["params"]["layers"])}, x, None)
        return x @ p["params"]["head"]["kernel"] + p["params"]["head"]["bias"]

    apply = lambda p, x: m.apply(p, x)  # noqa: E731
    H = cj.collect_hessians(apply, params, XS)
    R = cj.collect_hessians(unrolled, params, XS)
    for name in ("up", "down"):
        h, r = H["params"]["layers"][name]["kernel"], R["params"]["layers"][name]["kernel"]
        assert h.layer_axes == (0,) and h.h.shape[0] == L
        np.testing.assert_allclose(np.asarray(h.h), np.asarray(r.h), rtol=1e-4, atol=1e-4)
    assert H["params"]["layers"]["LayerNorm_0"]["scale"] is None  # stacked norm scales (L, d): left out
    q = cj.sequential(apply, params, XS, _gptq)
    assert isinstance(q["params"]["layers"]["up"]["kernel"], cj.QArray) and q["params"]["layers"]["up"]["kernel"].shape == (L, D, 2 * D)
    assert m.apply(cj.dequantize_params(q), XS[0]).shape == (8, 3)


# -- the float target (GPTAQ / QEP): each kernel corrected towards the float model's outputs
def _rtn3(p, h):
    return cj.quantize_params(p, {k: cj.QuantSpec(bits=3) for k, v in h.items() if v is not None})


def test_float_target_equals_the_correction_by_hand():
    """Slice 1's target is ``W + a (H + lambda I)^-1 (X_q^T X_f - H) W`` with ``X_q`` through the compressed
    slice 0 and ``X_f`` through the float one; ``compress`` receives it, here as the identity's input."""
    p = {"w1": P["w"][0], "w2": P["w"][1], "head": P["head"]}

    def f(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["head"]

    seen = {}

    def compress(sub, hs):
        (path, _), = [(k, h) for k, h in hs.items() if h is not None]
        seen[path] = np.asarray(sub[path])
        return _rtn3(sub, hs) if path == "w1" else sub

    alpha = 0.7
    out = cj.sequential(f, p, XS, compress, float_target=alpha)
    X = np.concatenate([np.asarray(x) for x in XS]).astype(np.float64)
    np.testing.assert_allclose(seen["w1"], np.asarray(p["w1"]))  # the first kernel's inputs are exact
    w1q = np.asarray(cj.dequantize(out["w1"]), np.float64)
    xq, xf = np.tanh(X @ w1q), np.tanh(X @ np.asarray(p["w1"], np.float64))
    h, c, w2 = xq.T @ xq, xq.T @ xf, np.asarray(p["w2"], np.float64)
    lam = 0.01 * np.mean(np.diag(h))
    want = w2 + alpha * np.linalg.solve(h + lam * np.eye(D), (c - h) @ w2)
    np.testing.assert_allclose(seen["w2"], want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["w2"]), want, rtol=2e-4, atol=2e-5)


def test_float_target_of_a_lossless_compression_is_the_float_model():
    out = cj.sequential(scanned, P, XS, lambda p, h: p, float_target=1.0)
    for k in P:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(P[k]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about 10 s on 2 cores
def test_float_target_brings_a_scanned_model_closer_to_the_float_outputs():
    """Int3 RTN per slice: with the float target the later slices undo part of the earlier slices' error."""
    xs = [jnp.asarray(RNG.normal(size=(64, D)), jnp.float32) for _ in range(2)]
    ref = np.concatenate([np.asarray(scanned(P, x)) for x in xs])

    def err(q):
        d = cj.dequantize_params(q)
        return float(np.mean((np.concatenate([np.asarray(scanned(d, x)) for x in xs]) - ref) ** 2))

    plain = err(cj.sequential(scanned, P, xs, _rtn3))
    towards_float = err(cj.sequential(scanned, P, xs, _rtn3, float_target=1.0))
    assert towards_float < 0.8 * plain, (towards_float, plain)
    masked = cj.sequential(scanned, P, xs, _rtn3, float_target=1.0, row_mask=lambda x: jnp.arange(x.shape[0]) % 4 != 0)
    assert np.isfinite(err(masked))


@pytest.mark.parametrize("bad, exc", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)])
def test_float_target_must_be_a_fraction(bad, exc):
    with pytest.raises(exc, match="float_target"):
        cj.sequential(scanned, P, XS, _gptq, float_target=bad)
