"""Weight sharing: Codebook, kmeans_codebooks, centroid training, reassignment, export."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import json_paths, resign, set_field
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import compressjax as cj
from compressjax.codebook import INITS, is_codebook

ROOT = Path(__file__).resolve().parents[1]


def np_lloyd(x, k, init, w=None, max_iter=1000):
    """Direct NumPy Lloyd: nearest centroid by argmin (ties to the lower one), weighted means, empty
    clusters keep their centroid, centroids kept sorted; stops when no assignment changes."""
    x = np.asarray(x, np.float64).ravel()
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    if init == "density":
        cw = np.cumsum(ws)
        t = (np.arange(k) + 0.5) / k * cw[-1]
        c = xs[np.clip(np.searchsorted(cw, t, side="left"), 0, x.size - 1)]
    else:
        c = xs[0] + (xs[-1] - xs[0]) * np.arange(k) / (k - 1)

    def assign(c):
        return np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)

    a = assign(c)
    for _ in range(max_iter):
        sw = np.bincount(a, ws_unsorted := w, minlength=k)
        sx = np.bincount(a, ws_unsorted * x, minlength=k)
        c = np.sort(np.where(sw > 0, sx / np.where(sw > 0, sw, 1), c))
        new = assign(c)
        if np.array_equal(new, a):
            break
        a = new
    return c, assign(c)


def kernel(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


# ------------------------------------------------------------------------------------------------ k-means


@pytest.mark.parametrize("init", ["density", "linear"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_matches_numpy_lloyd_per_kernel(init, bits):
    if bits == 1 and init == "linear":
        pytest.skip("linear init needs two centroids")
    x = kernel((40, 12), seed=bits)
    cb = cj.kmeans_codebooks({"w": x}, bits, init=init, iterations=1000)["w"]
    c_ref, a_ref = np_lloyd(x, 1 << bits, init)
    np.testing.assert_allclose(np.asarray(cb.centroids), c_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(cb.index_array()).ravel(), a_ref)
    np.testing.assert_allclose(np.asarray(cb.decode()).ravel(), c_ref[a_ref], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("init", ["density", "linear"])
def test_matches_numpy_lloyd_per_channel_and_weighted(init):
    x = kernel((50, 6), seed=3)
    w = jnp.abs(kernel((50, 6), seed=4)) + 0.1
    for weights in (None, {"w": w}):
        cb = cj.kmeans_codebooks({"w": x}, 3, per_channel=True, init=init, weights=weights)["w"]
        assert cb.centroids.shape == (6, 8)
        idx = np.asarray(cb.index_array())
        for ch in range(6):
            c_ref, a_ref = np_lloyd(x[:, ch], 8, init, None if weights is None else w[:, ch])
            np.testing.assert_allclose(np.asarray(cb.centroids[ch]), c_ref, rtol=2e-5, atol=2e-6)
            np.testing.assert_array_equal(idx[:, ch], a_ref)


def test_weighted_kmeans_pulls_centroids_to_important_weights():
    x = kernel((400, 1), seed=1)
    w = jnp.where(x > 1.0, 100.0, 1.0)
    plain = cj.kmeans_codebooks({"w": x}, 2)["w"]
    weighted = cj.kmeans_codebooks({"w": x}, 2, weights={"w": w})["w"]
    err = lambda cb: float(jnp.sum(w * (cb.decode() - x) ** 2))  # noqa: E731
    assert err(weighted) < err(plain)
    assert int(jnp.sum(weighted.centroids > 1.0)) >= int(jnp.sum(plain.centroids > 1.0))


@pytest.mark.slow
def test_converged_fixed_point_and_nearest_assignment():
    x = kernel((300, 4), seed=7)
    for init in INITS:
        cb = cj.kmeans_codebooks({"w": x}, 4, per_channel=True, init=init)["w"]
        idx, c = np.asarray(cb.index_array()), np.asarray(cb.centroids, np.float64)
        xn = np.asarray(x, np.float64)
        for ch in range(4):
            d = np.abs(xn[:, ch, None] - c[ch][None, :])
            assert np.all(d[np.arange(300), idx[:, ch]] <= d.min(axis=1) + 1e-6)  # nearest centroid
            for j in np.unique(idx[:, ch]):
                np.testing.assert_allclose(c[ch, j], xn[idx[:, ch] == j, ch].mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_density_beats_linear_and_random_is_deterministic():
    x = kernel((512, 64), seed=2)
    mse = {}
    for init in INITS:
        d = cj.kmeans_codebooks({"w": x}, 3, init=init)["w"].decode()
        mse[init] = float(jnp.mean((d - x) ** 2))
    assert mse["density"] <= mse["linear"] * 1.001
    a = cj.kmeans_codebooks({"w": x}, 3, init="random", key=jax.random.key(5))["w"]
    b = cj.kmeans_codebooks({"w": x}, 3, init="random", key=jax.random.key(5))["w"]
    np.testing.assert_array_equal(np.asarray(a.centroids), np.asarray(b.centroids))
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    raw = cj.kmeans_codebooks({"w": x}, 3, init="random", key=jax.random.PRNGKey(5))["w"]  # raw uint32 key
    np.testing.assert_array_equal(np.asarray(raw.centroids), np.asarray(a.centroids))


def test_iterations_cap_is_respected():
    x = kernel((2000,), seed=9).reshape(200, 10)
    one = cj.kmeans_codebooks({"w": x}, 4, init="linear", iterations=1)["w"]
    c_ref, _ = np_lloyd(x, 16, "linear", max_iter=1)
    np.testing.assert_allclose(np.asarray(one.centroids), c_ref, rtol=2e-5, atol=2e-6)


def np_ecsq(x, k, rate):
    """Direct NumPy entropy-constrained Lloyd (Chou et al., 1989) with linear init: each value goes to
    ``argmin_j (x - c_j)^2 + rate * var(x) * code_len_j`` (ties to the lower index), code lengths
    ``-log2`` of the previous step's cluster shares (an empty cluster: infinite, it stays empty)."""
    x = np.asarray(x, np.float64).ravel()
    lam = rate * x.var()
    c = x.min() + (x.max() - x.min()) * np.arange(k) / (k - 1)
    code_len = np.full(k, np.log2(k))

    def assign(c, code_len):
        cost = (x[:, None] - c[None, :]) ** 2 + np.where(np.isinf(code_len), np.inf, lam * code_len)[None, :]
        return np.argmin(cost, axis=1)

    a = assign(c, code_len)
    for _ in range(1000):
        n = np.bincount(a, minlength=k)
        c = np.where(n > 0, np.bincount(a, x, minlength=k) / np.maximum(n, 1), c)
        order = np.argsort(c, kind="stable")
        c, n = c[order], n[order]
        code_len = np.where(n > 0, -np.log2(np.maximum(n, 1) / x.size), np.inf)
        new = assign(c, code_len)
        if np.array_equal(new, a):
            break
        a = new
    return c, a


def index_entropy(cb) -> float:
    p = np.bincount(np.asarray(cb.index_array()).ravel()) / cb.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.3])
def test_entropy_weight_matches_numpy_ecsq(rate):
    x = kernel((60, 3), seed=11)
    cb = cj.kmeans_codebooks({"w": x}, 4, init="linear", entropy_weight=rate)["w"]
    c_ref, a_ref = np_ecsq(x, 16, rate)
    np.testing.assert_array_equal(np.asarray(cb.index_array()).ravel(), a_ref)
    used = np.unique(a_ref)
    np.testing.assert_allclose(np.asarray(cb.centroids)[used], c_ref[used], rtol=2e-5, atol=2e-6)
    per_ch = cj.kmeans_codebooks({"w": x}, 3, init="linear", per_channel=True, entropy_weight=rate)["w"]
    for ch in range(3):
        c_ref, a_ref = np_ecsq(x[:, ch], 8, rate)
        np.testing.assert_array_equal(np.asarray(per_ch.index_array())[:, ch], a_ref)


def test_entropy_weight_trades_error_for_entropy_and_keeps_pruned_zero():
    x = kernel((64, 64), seed=12)
    masks = {"w": jnp.abs(x) > 0.8}
    entropy, error = [], []
    for rate in (0.0, 0.003, 0.01, 0.03, 0.1):
        cb = cj.kmeans_codebooks({"w": x}, 5, init="linear", masks=masks, entropy_weight=rate)["w"]
        decoded = cb.decode()
        assert bool(jnp.all(jnp.where(masks["w"], True, decoded == 0.0)))  # the reserved zero
        entropy.append(index_entropy(cb))
        error.append(float(jnp.mean((decoded - x)[masks["w"]] ** 2)))
    assert entropy == sorted(entropy, reverse=True) and entropy[-1] < entropy[0] - 1.0
    assert error == sorted(error)
    plain = cj.kmeans_codebooks({"w": x}, 5, init="linear", masks=masks)["w"]
    np.testing.assert_array_equal(np.asarray(plain.indices), np.asarray(
        cj.kmeans_codebooks({"w": x}, 5, init="linear", masks=masks, entropy_weight=0.0)["w"].indices))


@pytest.mark.parametrize("bad,err", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError), ("0.1", TypeError)])
def test_entropy_weight_rejects_bad_values(bad, err):
    with pytest.raises(err, match="entropy_weight"):
        cj.kmeans_codebooks({"w": kernel((8, 8))}, 2, entropy_weight=bad)


def test_where_selection_nbytes_and_skips():
    params = {"dense": {"kernel": kernel((64, 32)), "bias": kernel((32,))}, "emb": kernel((10, 8), seed=1)}
    out = cj.kmeans_codebooks(params, 5, where="kernel")
    cb = out["dense"]["kernel"]
    assert isinstance(cb, cj.Codebook) and cb._cj_compressed_leaf is True
    assert out["dense"]["bias"] is params["dense"]["bias"] and out["emb"] is params["emb"]
    assert cb.indices.dtype == jnp.uint8 and cb.indices.shape == (-(-64 * 32 * 5 // 8),)
    assert cb.nbytes == 1280 + 32 * 4
    pc = cj.kmeans_codebooks(params, 3, per_channel=True, where="kernel")["dense"]["kernel"]
    assert pc.nbytes == 64 * 32 * 3 // 8 + 32 * 8 * 4
    half = pc.astype_centroids(jnp.float16)
    assert half.nbytes == 64 * 32 * 3 // 8 + 32 * 8 * 2 and half.decode().dtype == jnp.float32
    # The default selector skips compressed leaves; an explicit selection of one is an error.
    again = cj.kmeans_codebooks(out, 4)
    assert again["dense"]["kernel"] is cb and isinstance(again["emb"], cj.Codebook)
    with pytest.raises(TypeError, match="'dense/kernel' is already compressed"):
        cj.kmeans_codebooks(out, 4, where="kernel")
    mixed = {"q": cj.quantize(params["emb"], cj.QuantSpec(4)), "w": params["emb"]}
    done = cj.kmeans_codebooks(mixed, 2)  # the QArray is skipped whole
    assert isinstance(done["q"], cj.QArray) and isinstance(done["w"], cj.Codebook)


@pytest.mark.slow
def test_bf16_leaf_keeps_dtype_and_jit_equals_eager():
    params = {"a": kernel((32, 16)).astype(jnp.bfloat16), "b": kernel((48, 8), seed=1)}
    eager = cj.kmeans_codebooks(params, 3, per_channel=True)
    jitted = jax.jit(lambda p: cj.kmeans_codebooks(p, 3, per_channel=True))(params)
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(eager[name].indices), np.asarray(jitted[name].indices))
        np.testing.assert_array_equal(np.asarray(eager[name].centroids), np.asarray(jitted[name].centroids))
    assert eager["a"].decode().dtype == jnp.bfloat16
    dec = jax.jit(cj.decode_params)(eager)
    np.testing.assert_array_equal(np.asarray(dec["b"]), np.asarray(eager["b"].decode()))


def test_jit_equals_eager():
    params = {"w": kernel((64, 16))}
    eager = cj.kmeans_codebooks(params, 3, per_channel=True)["w"]
    jitted = jax.jit(lambda p: cj.kmeans_codebooks(p, 3, per_channel=True))(params)["w"]
    np.testing.assert_array_equal(np.asarray(eager.indices), np.asarray(jitted.indices))
    np.testing.assert_array_equal(np.asarray(eager.centroids), np.asarray(jitted.centroids))
    np.testing.assert_array_equal(np.asarray(jax.jit(cj.decode_params)({"w": eager})["w"]), np.asarray(eager.decode()))


# ------------------------------------------------------------------------------------------------ masks


def test_masks_reserve_an_exact_zero():
    x = kernel((100, 20), seed=5)
    masks = cj.magnitude_masks({"w": x}, 0.9)
    for pc in (False, True):
        cb = cj.kmeans_codebooks({"w": x}, 2, masks=masks, per_channel=pc)["w"]
        m = np.asarray(masks["w"])
        idx = np.asarray(cb.index_array())
        assert cb.zero_reserved and np.all((idx == 0) == ~m)
        d = np.asarray(cb.decode())
        assert np.all(d[~m] == 0) and np.all(d[m] != 0)
        # The survivors alone are clustered: NumPy reference on them (3 centroids, index offset 1).
        if not pc:
            c_ref, a_ref = np_lloyd(np.asarray(x)[m], 3, "density")
            np.testing.assert_allclose(np.asarray(cb.centroids[1:]), c_ref, rtol=2e-5, atol=2e-6)
            np.testing.assert_array_equal(idx[m], a_ref + 1)


def test_fully_pruned_channel_is_allowed_and_stays_zero():
    x = kernel((30, 4), seed=1)
    m = np.ones((30, 4), bool)
    m[:, 2] = False
    cb = cj.kmeans_codebooks({"w": x}, 2, per_channel=True, masks={"w": jnp.asarray(m)})["w"]
    assert np.all(np.asarray(cb.decode())[:, 2] == 0)


def test_pruned_weights_stay_zero_through_training_and_save_load(tmp_path):
    x = kernel((64, 16), seed=2)
    params = {"w": x, "b": jnp.zeros(16)}
    masks = cj.magnitude_masks(params, 0.75)
    q = cj.kmeans_codebooks(params, 3, masks=masks)
    trainable, frozen = cj.split_centroids(q, train_others=True)
    tx = optax.adam(0.05)
    opt = tx.init(trainable)
    inputs = kernel((8, 64), seed=3)

    def loss(t):
        p = cj.decode_params(cj.merge_centroids(t, frozen))
        return jnp.sum((inputs @ p["w"] + p["b"] - 1.0) ** 2)

    first = float(loss(trainable))
    for _ in range(20):
        g = jax.grad(loss)(trainable)
        upd, opt = tx.update(g, opt, trainable)
        trainable = optax.apply_updates(trainable, upd)
    assert float(loss(trainable)) < first
    trained = cj.merge_centroids(trainable, frozen)
    np.testing.assert_array_equal(np.asarray(trained["w"].indices), np.asarray(q["w"].indices))
    assert not np.array_equal(np.asarray(trained["w"].centroids), np.asarray(q["w"].centroids))
    dec = np.asarray(cj.decode_params(trained)["w"])
    assert np.all(dec[~np.asarray(masks["w"])] == 0)
    cj.save(tmp_path / "m.cjx", trained)
    back = cj.load(tmp_path / "m.cjx")
    np.testing.assert_array_equal(np.asarray(back["w"]), dec)
    assert np.all(np.asarray(back["w"])[~np.asarray(masks["w"])] == 0)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("per_channel", [False, True])
def test_centroid_gradient_is_the_summed_weight_gradient(per_channel):
    x = kernel((24, 5), seed=8)
    cb = cj.kmeans_codebooks({"w": x}, 3, per_channel=per_channel)["w"]
    inp = kernel((7, 24), seed=9)

    def loss_w(w):
        return jnp.sum(jnp.tanh(inp @ w) ** 2)

    def loss_c(c):
        return loss_w(cb.with_centroids(c).decode())

    g_c = np.asarray(jax.grad(loss_c)(cb.centroids))
    g_w = np.asarray(jax.grad(loss_w)(cb.decode()))
    idx = np.asarray(cb.index_array())
    expect = np.zeros_like(g_c)
    for i in range(24):
        for o in range(5):
            if per_channel:
                expect[o, idx[i, o]] += g_w[i, o]
            else:
                expect[idx[i, o]] += g_w[i, o]
    np.testing.assert_allclose(g_c, expect, rtol=1e-5, atol=1e-6)
    check_grads(loss_c, (cb.centroids,), order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_reserved_zero_gets_no_gradient():
    x = kernel((32, 8), seed=1)
    masks = cj.magnitude_masks({"w": x}, 0.5)
    cb = cj.kmeans_codebooks({"w": x}, 2, masks=masks)["w"]
    g = jax.grad(lambda c: jnp.sum(cb.with_centroids(c).decode() ** 2 + cb.with_centroids(c).decode()))(cb.centroids)
    assert float(g[0]) == 0.0 and np.all(np.asarray(g[1:]) != 0)
    shifted = cb.with_centroids(cb.centroids.at[0].set(3.0)).decode()  # even a drifted slot 0 decodes to 0
    assert np.all(np.asarray(shifted)[~np.asarray(masks["w"])] == 0)


def test_distill_step_trains_only_centroids():
    rng = jax.random.key(0)
    teacher = {"w": kernel((16, 4), seed=1), "b": jnp.zeros(4)}
    q = cj.kmeans_codebooks(teacher, 2)
    trainable, frozen = cj.split_centroids(q)
    assert trainable["b"] is None and trainable["w"].shape == (4,)
    apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    step = cj.make_distill_step(apply, apply, optax.sgd(0.05), student_transform=cj.codebook_student(frozen),
                                loss_fn=lambda s, t, _: jnp.mean((s - t) ** 2, axis=-1))
    state = cj.DistillState.create(trainable, optax.sgd(0.05)) if hasattr(cj.DistillState, "create") else None
    if state is None:
        pytest.skip("DistillState has no create()")
    x = jax.random.normal(rng, (32, 16))
    losses = []
    for _ in range(10):
        state, metrics = step(state, teacher, x)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = cj.merge_centroids(state.params, frozen)
    np.testing.assert_array_equal(np.asarray(trained["w"].indices), np.asarray(q["w"].indices))


@pytest.mark.slow
def test_reassign_indices_moves_to_nearest_updated_centroid():
    x = kernel((40, 6), seed=4)
    masks = cj.magnitude_masks({"w": x}, 0.5)
    for m in (None, masks):
        cb = cj.kmeans_codebooks({"w": x}, 3, per_channel=True, masks=m)["w"]
        moved = cb.with_centroids(cb.centroids * 1.3 + 0.05)
        out = cj.reassign_indices({"w": moved}, {"w": x})["w"]
        c = np.asarray(moved.centroids)
        idx = np.asarray(out.index_array())
        xs = np.asarray(x)
        for o in range(6):
            cand = c[o, 1:] if m is not None else c[o]
            d = np.abs(xs[:, o, None] - cand[None, :])
            best = d.min(axis=1)
            got = np.abs(xs[:, o] - c[o, idx[:, o]])
            keep = slice(None) if m is None else np.asarray(m["w"])[:, o]
            np.testing.assert_allclose(got[keep], best[keep], rtol=1e-6, atol=1e-7)
        if m is not None:
            assert np.all((idx == 0) == ~np.asarray(m["w"]))
    with pytest.raises(ValueError, match="'w': reference weights of shape"):
        cj.reassign_indices({"w": cb}, {"w": x[:3]})


# ------------------------------------------------------------------------------------------------ packing


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 60), cols=st.integers(1, 5), bits=st.integers(1, 4), scale=st.floats(1e-6, 1e6),
       pc=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_invariants_over_wide_inputs(rows, cols, bits, scale, pc, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * np.float32(scale)
    k = 1 << bits
    n_per = rows if pc else rows * cols
    if n_per < k:  # fewer values than centroids
        with pytest.raises(ValueError, match="fewer than"):
            cj.kmeans_codebooks({"w": jnp.asarray(x)}, bits, per_channel=pc)
        return
    cb = cj.kmeans_codebooks({"w": jnp.asarray(x)}, bits, per_channel=pc)["w"]
    d = np.asarray(cb.decode())
    assert np.all(np.isfinite(d)) and d.shape == x.shape
    assert np.all(np.asarray(cb.index_array()) < k)
    # Weight sharing never does worse than the best constant (the mean).
    ref = x - (x.mean(axis=0) if pc else x.mean())
    assert np.sum((d - x) ** 2, dtype=np.float64) <= np.sum(ref.astype(np.float64) ** 2) * (1 + 1e-4) + 1e-30


# ------------------------------------------------------------------------------------------------ errors


def test_bad_bits_init_iterations():
    p = {"w": kernel((16, 4))}
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match=f"bits must be in 1..8, got {bad}"):
            cj.kmeans_codebooks(p, bad)
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="bits must be an int"):
            cj.kmeans_codebooks(p, bad)
    with pytest.raises(ValueError, match="init must be one of"):
        cj.kmeans_codebooks(p, 2, init="kmeans++")
    with pytest.raises(ValueError, match="iterations must be a positive int, got 0"):
        cj.kmeans_codebooks(p, 2, iterations=0)
    with pytest.raises(ValueError, match="selects no leaf"):
        cj.kmeans_codebooks(p, 2, where="nothing")


def test_more_centroids_than_distinct_values():
    x = jnp.asarray(np.repeat([[-1.0], [0.5], [2.0]], 10, axis=0).astype(np.float32)).reshape(6, 5)
    with pytest.raises(ValueError, match="'w': the weights have 3 distinct values, fewer than the 4 centroids"):
        cj.kmeans_codebooks({"w": x}, 2)
    cj.kmeans_codebooks({"w": x}, 1)  # 2 centroids are fine
    y = kernel((20, 3))
    y = y.at[:, 1].set(1.0)
    with pytest.raises(ValueError, match="'w': channel 1 of the weights have 1 distinct values.*per leaf"):
        cj.kmeans_codebooks({"w": y}, 1, per_channel=True)
    m = jnp.zeros((20, 3), bool).at[:2, 0].set(True)
    with pytest.raises(ValueError, match="2 distinct surviving values, fewer than the 3 centroids.*reserved zero"):
        cj.kmeans_codebooks({"w": kernel((20, 3))}, 2, masks={"w": m})


def test_non_finite_and_bad_auxiliary_trees():
    x = kernel((16, 4))
    with pytest.raises(ValueError, match="'layer/w' holds 1 non-finite value"):
        cj.kmeans_codebooks({"layer": {"w": x.at[3, 1].set(jnp.nan)}}, 2)
    with pytest.raises(ValueError, match="weights and params trees do not match.*only in weights: \\['v'\\]"):
        cj.kmeans_codebooks({"w": x}, 2, weights={"v": x})
    with pytest.raises(ValueError, match="masks and params trees do not match"):
        cj.kmeans_codebooks({"w": x, "b": x}, 2, masks={"w": x > 0})
    with pytest.raises(ValueError, match="'w': the masks entry has shape \\(4, 16\\), the weights \\(16, 4\\)"):
        cj.kmeans_codebooks({"w": x}, 2, masks={"w": x.T > 0})
    with pytest.raises(ValueError, match="'w': weights must be finite and >= 0, found -1.0"):
        cj.kmeans_codebooks({"w": x}, 2, weights={"w": x.at[0, 0].set(-1.0) * 0 + jnp.ones_like(x).at[0, 0].set(-1.0)})
    with pytest.raises(ValueError, match="'w': weights must be finite and >= 0, found nan"):
        cj.kmeans_codebooks({"w": x}, 2, weights={"w": jnp.ones_like(x).at[1, 1].set(jnp.nan)})
    with pytest.raises(TypeError, match="'w': the weights entry must be an array"):
        cj.kmeans_codebooks({"w": x}, 2, weights={"w": "heavy"})
    with pytest.raises(TypeError, match="'w' selected by where='w' has dtype int32"):
        cj.kmeans_codebooks({"w": jnp.ones((4, 4), jnp.int32)}, 2, where="w")


def test_codebook_constructor_validates():
    cb = cj.kmeans_codebooks({"w": kernel((8, 4))}, 3)["w"]
    with pytest.raises(ValueError, match="'x': a 3-bit Codebook of shape \\(8, 4\\) needs packed uint8 indices of shape \\(12,\\)"):
        cj.Codebook(cb.indices[:-1], cb.centroids, bits=3, shape=(8, 4), path="x")
    with pytest.raises(ValueError, match="needs floating-point centroids of shape \\(4, 8\\)"):
        cj.Codebook(cb.indices, cb.centroids, bits=3, shape=(8, 4), per_channel=True)
    with pytest.raises(ValueError, match="index 8 is outside \\[0, 7\\]"):
        cj.Codebook.from_indices(jnp.full((2, 2), 8), jnp.zeros(8), bits=3)
    with pytest.raises(TypeError, match="not a floating-point dtype"):
        cj.Codebook(cb.indices, cb.centroids, bits=3, shape=(8, 4), dtype=jnp.int32)
    leaves, treedef = jax.tree.flatten(cb)
    assert len(leaves) == 2 and is_codebook(jax.tree.unflatten(treedef, leaves))


def test_dequantize_params_decodes_codebooks_and_qarrays():
    params = {"a": kernel((16, 8)), "b": kernel((16, 8), seed=1)}
    mixed = {"a": cj.kmeans_codebooks(params, 4)["a"], "b": cj.quantize(params["b"], cj.QuantSpec(4))}
    for fn in (cj.dequantize_params, cj.decode_params):
        out = fn(mixed)
        np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(mixed["a"].decode()))
        np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(cj.dequantize(mixed["b"])))


@pytest.mark.slow
def test_sharded_kernel_on_eight_devices():
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import compressjax as cj
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
w = jax.random.normal(jax.random.key(0), (64, 32))
ws = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
a = cj.kmeans_codebooks({"k": w}, 3, per_channel=True)["k"]
b = jax.jit(lambda p: cj.kmeans_codebooks(p, 3, per_channel=True))({"k": ws})["k"]
np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
np.testing.assert_allclose(np.asarray(a.centroids), np.asarray(b.centroids), rtol=1e-5, atol=1e-6)
d = jax.jit(lambda c: c.decode())(b)
np.testing.assert_array_equal(np.asarray(d), np.asarray(b.decode()))
print("OK", len(jax.devices()))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK 8" in r.stdout


# ------------------------------------------------------------------------------------------------ export


def _bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize("bits", [5, *(pytest.param(b, marks=pytest.mark.slow) for b in (1, 2, 3, 8))])
def test_save_load_bit_exact(tmp_path, bits):
    x = kernel((300, 8), seed=bits)
    params = {"d": {"kernel": x, "bias": jnp.arange(8.0)}}
    masks = cj.magnitude_masks(params, 0.6)
    for pc in (False, True):
        for m in (None, masks):
            if m is not None and bits == 8:
                continue
            q = cj.kmeans_codebooks(params, bits, per_channel=pc, masks=m)
            if pc:
                q["d"]["kernel"] = q["d"]["kernel"].astype_centroids(jnp.float16)
            path = tmp_path / f"m{bits}{pc}{m is None}.cjx"
            report = cj.save(path, q)
            _bit_equal(cj.load(path), cj.decode_params(q))
            raw = cj.load(path, dequantize=False)["d"]["kernel"]
            cb = q["d"]["kernel"]
            assert isinstance(raw, cj.Codebook) and jax.tree.structure(raw) == jax.tree.structure(cb)
            _bit_equal((raw.indices, raw.centroids), (cb.indices, cb.centroids))
            leaf = next(s for s in report.leaves if s.path == "d/kernel")
            assert leaf.encoding.startswith(f"cb{bits}")
            assert leaf.index_bits is not None and 0 <= leaf.index_entropy <= bits
            # Entropy-coded indices take at most the packed width (plus a little framing).
            assert leaf.index_bits <= bits + 0.5
            # Bits per weight include the codebooks.
            c_bytes = cb.centroids.size * (2 if pc else 4)
            assert leaf.stored_bytes >= c_bytes
            from_file = cj.size_report(path)
            assert from_file.total_bytes == report.total_bytes == path.stat().st_size
            ff = next(s for s in from_file.leaves if s.path == "d/kernel")
            assert (ff.stored_bytes, ff.index_bits, ff.index_entropy) == (leaf.stored_bytes, leaf.index_bits, leaf.index_entropy)
            assert "b/idx H=" in str(from_file)


def test_pruned_codebook_file_is_small(tmp_path):
    x = kernel((300, 100))
    masks = cj.magnitude_masks({"w": x}, 0.92)
    q = cj.kmeans_codebooks({"w": x}, 5, masks=masks)
    report = cj.save(tmp_path / "p.cjx", q)
    leaf = report.leaves[0]
    assert leaf.encoding.startswith("cb5 sparse")
    assert leaf.nnz == int(jnp.sum(masks["w"]))
    assert report.ratio > 30  # 8% survivors at 5 bits + positions


def test_masks_or_rules_with_codebook_leaves_is_an_error(tmp_path):
    q = cj.kmeans_codebooks({"w": kernel((16, 4))}, 2)
    with pytest.raises(ValueError, match="already hold Codebook leaves"):
        cj.save(tmp_path / "x.cjx", q, rules=cj.QuantSpec(4))


@pytest.fixture(scope="module")
def cb_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cb") / "m.cjx"
    x = kernel((40, 8), seed=3)
    q = cj.kmeans_codebooks({"a": x}, 3, masks=cj.magnitude_masks({"a": x}, 0.5))
    q["b"] = cj.kmeans_codebooks({"b": x}, 4, per_channel=True)["b"]
    cj.save(path, q)
    return path.read_bytes(), cj.load(path)




def _cb_leaf(h, which):
    return [i for i, r in enumerate(h["leaves"]) if r.get("e") == "cb"][which]


FORGED = {
    "bits 0": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "bits"], 0)(h),
    "bits 9": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "bits"], 9)(h),
    "bits smaller than the indices": lambda h: set_field(["leaves", _cb_leaf(h, 1), "meta", "bits"], 2)(h),
    "bits bool": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "bits"], True)(h),
    "huge shape": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "shape"], [1 << 40, 8])(h),
    "wrong shape": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "shape"], [8, 40])(h),
    "int dtype": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "dtype"], "int32")(h),
    "per_channel flipped": lambda h: set_field(["leaves", _cb_leaf(h, 1), "meta", "per_channel"], False)(h),
    "per_channel not bool": lambda h: set_field(["leaves", _cb_leaf(h, 1), "meta", "per_channel"], 1)(h),
    "zero missing": lambda h: (h["leaves"][_cb_leaf(h, 0)]["meta"].pop("zero"), h)[1],
    "unknown meta field": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "eval"], "x")(h),
    "wrong format": lambda h: set_field(["leaves", _cb_leaf(h, 0), "meta", "format"], "compressjax.codebook/9")(h),
    "entropy out of range": lambda h: set_field(["leaves", _cb_leaf(h, 0), "h"], 9.5)(h),
    "entropy string": lambda h: set_field(["leaves", _cb_leaf(h, 0), "h"], "2")(h),
    "index record not a dict": lambda h: set_field(["leaves", _cb_leaf(h, 0), "idx"], [1])(h),
    "unknown index encoding": lambda h: set_field(["leaves", _cb_leaf(h, 0), "idx", "e"], "huffman")(h),
    "centroids missing": lambda h: (h["leaves"][_cb_leaf(h, 0)].pop("c"), h)[1],
    "centroid shape": lambda h: set_field(["leaves", _cb_leaf(h, 0), "c", "sh"], [4])(h),
    "extra record field": lambda h: set_field(["leaves", _cb_leaf(h, 0), "x"], 1)(h),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_codebook_records_raise_format_error(tmp_path, cb_file, name):
    original, _ = cb_file
    path = tmp_path / "f.cjx"
    path.write_bytes(resign(original, FORGED[name]))
    with pytest.raises(cj.FormatError) as e:
        cj.load(path, max_bytes=1 << 26)
    assert not str(e.value).startswith("malformed header:"), e.value  # validated, not the safety net


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_codebook_records(tmp_path_factory, cb_file, data):
    """Any value of a codebook record replaced by arbitrary JSON: FormatError, or a well-formed tree."""
    import json

    from compressjax.export import _container

    original, _ = cb_file
    header = json.loads(_container.parse(original)[0])
    slots = [p for i, rec in enumerate(header["leaves"]) if rec.get("e") == "cb" for p in json_paths(rec, ["leaves", i])]
    path = data.draw(st.sampled_from(slots[1:]))
    blob = resign(original, set_field(path, data.draw(JSON)))
    f = tmp_path_factory.mktemp("fz") / "f.cjx"
    f.write_bytes(blob)
    try:
        out = cj.load(f, max_bytes=1 << 26)
    except cj.FormatError as e:
        assert not str(e).startswith("malformed header:"), e
        return
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))


# ------------------------------------------------------------------------------------------------ error feedback


@pytest.mark.slow
def test_error_feedback_lowers_the_layer_output_error():
    from compressjax.codebook import codebook_error_feedback

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 48), np.float32) @ rng.standard_normal((48, 48), np.float32))
    w = kernel((48, 16), seed=1)
    h = x.T @ x
    params = {"w": w}
    out_err = lambda cb: float(jnp.sum((x @ w - x @ cb.decode()) ** 2))  # noqa: E731
    masks = cj.magnitude_masks(params, 0.5)
    for m in (None, masks):
        q = cj.kmeans_codebooks(params, 2, per_channel=True, masks=m,
                                weights={"w": jnp.broadcast_to(jnp.diagonal(h)[:, None], w.shape)})
        fed = codebook_error_feedback(q, params, {"w": h})
        assert out_err(fed["w"]) < out_err(q["w"])
        refit = cj.refit_centroids(fed, params, {"w": h})
        assert out_err(refit["w"]) <= out_err(fed["w"]) * (1 + 1e-5)
        np.testing.assert_array_equal(np.asarray(refit["w"].indices), np.asarray(fed["w"].indices))
        np.testing.assert_array_equal(np.asarray(fed["w"].centroids), np.asarray(q["w"].centroids))
        if m is not None:
            idx = np.asarray(fed["w"].index_array())
            assert np.all((idx == 0) == ~np.asarray(m["w"]))
    untouched = codebook_error_feedback(q, params, {"w": None})
    assert untouched["w"] is q["w"]
    with pytest.raises(ValueError, match="'w': Hessian has shape \\(4, 4\\)"):
        codebook_error_feedback(q, params, {"w": jnp.eye(4)})
    with pytest.raises(ValueError, match="'w': reference weights of shape \\(48, 16\\) needed"):
        codebook_error_feedback(q, {"w": w[:4]}, {"w": h})
    with pytest.raises(ValueError, match="'w': Hessian has shape \\(4, 4\\), expected \\(48, 48\\)"):
        cj.refit_centroids(q, params, {"w": jnp.eye(4)})


# ------------------------------------------------------------------------------------------------ demo


def test_demo_codebook_bits_option():
    from compressjax.cli import build_parser
    from compressjax.demo.pipeline import DemoConfig

    args = build_parser().parse_args(["demo", "--codebook-bits", "5"])
    assert args.codebook_bits == 5
    assert build_parser().parse_args(["demo"]).codebook_bits is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--codebook-bits", "9"])
    assert DemoConfig().codebook_bits is None
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="codebook_bits must be None or an int in 1..8"):
            DemoConfig(codebook_bits=bad)


@pytest.mark.slow
def test_demo_quick_with_codebooks(tmp_path):
    from compressjax.demo.pipeline import DemoConfig, run_demo

    result = run_demo(DemoConfig.quick(codebook_bits=4, sparsity=0.8), tmp_path)
    row = result.stage("compressed")
    assert row.nonzero <= 0.25 * row.params and row.bytes < result.stage("student").bytes / 5
    back = cj.load(result.model_path, dequantize=False)
    kernels = [x for p, x in cj.tree.leaves_with_paths(back, is_codebook) if p.endswith("kernel")]
    assert kernels and all(isinstance(k, cj.Codebook) and k.bits == 4 and k.zero_reserved for k in kernels)
