"""One-shot solvers: the OBS error-feedback sweep, GPTQ, SparseGPT, Wanda and layerwise compression.

The references are direct NumPy (float64) transcriptions of the papers' algorithms (the reference
implementations' loops, transposed to the ``(d_in, d_out)`` kernel layout).
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax import QuantSpec, apply_masks, dequantize, load, magnitude_masks, quantize, save
from compressjax.hessians import Hessian, collect_hessians
from compressjax.oneshot import error_feedback, gptq, layerwise, sparsegpt, wanda_masks
from compressjax.qarray import QArray


# ------------------------------------------------------------------------------------------ references
def np_inverse_factor(H, damp):
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    return np.linalg.cholesky(np.linalg.inv(H)).T, dead


def np_error_feedback(W, H, quant, block, damp):
    """GPTQ's blocked sweep (Frantar et al., 2023, Algorithm 1), rows = inputs."""
    U, dead = np_inverse_factor(H, damp)
    W = W.astype(np.float64).copy()
    W[dead] = 0
    n = W.shape[0]
    Q = np.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E = W[i1:i2].copy(), np.zeros((i2 - i1, W.shape[1]))
        for i in range(i2 - i1):
            w = W1[i]
            q = quant(w, i1 + i)
            Q[i1 + i] = q
            e = (w - q) / U[i1 + i, i1 + i]
            W1[i:] -= np.outer(U[i1 + i, i1 + i : i2], e)
            E[i] = e
        W[i2:] -= U[i1:i2, i2:].T @ E
    return Q


def correlated(rng, n_rows, d_in, rank=16, noise=0.1):
    z = rng.normal(size=(n_rows, rank))
    return (z @ rng.normal(size=(rank, d_in)) + noise * rng.normal(size=(n_rows, d_in))).astype(np.float32)


def rel_err(X, W, Wq):
    X = X.astype(np.float64)
    return np.linalg.norm(X @ W - X @ Wq) / np.linalg.norm(X @ W)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    X = correlated(rng, 512, 96)
    W = rng.normal(size=(96, 40)).astype(np.float32)
    return X, (X.T @ X).astype(np.float32), W


# ------------------------------------------------------------------------------------- error_feedback
def _halve(col, j):
    return 0.5 * col


def test_error_feedback_matches_numpy_for_a_smooth_quantizer(layer):
    X, H, W = layer
    H = H.copy()
    H[7, :] = H[:, 7] = 0  # a dead input
    ref = np_error_feedback(W, H, lambda w, j: 0.5 * w, 32, 0.01)
    out = error_feedback(jnp.asarray(W), jnp.asarray(H), _halve, block_size=32)
    assert out.shape == W.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    assert np.all(np.asarray(out)[7] == 0)  # dead input: its row is zeroed first


@pytest.mark.parametrize("block", [16, 40, 128])  # 40 does not divide 96: padded last block
def test_error_feedback_rtn_grid_matches_numpy_and_beats_rtn(layer, block):
    X, H, W = layer
    s = np.abs(W).max(0) / 7.5

    def rtn(col, j):
        return jnp.clip(jnp.round(col / s), -7, 7) * s

    ref = np_error_feedback(W, H, lambda w, j: np.clip(np.round(w / s), -7, 7) * s, block, 0.01)
    out = np.asarray(error_feedback(jnp.asarray(W), jnp.asarray(H), rtn, block_size=block))
    codes, ref_codes = np.round(out / s), np.round(ref / s)
    np.testing.assert_allclose(out, codes * s, atol=1e-5)  # on the quantizer's grid
    assert np.mean(codes == ref_codes) > 0.9  # float32 vs float64 rounding flips cascade a little
    assert abs(rel_err(X, W, out) - rel_err(X, W, ref)) < 0.1 * rel_err(X, W, ref)
    assert rel_err(X, W, out) < 0.8 * rel_err(X, W, np.clip(np.round(W / s), -7, 7) * s)


def test_error_feedback_receives_the_row_index(layer):
    _, H, W = layer
    out = error_feedback(jnp.asarray(W), jnp.asarray(H), lambda col, j: jnp.full_like(col, j.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.arange(96.0)[:, None], W.shape))


def test_error_feedback_under_jit_equals_eager(layer):
    _, H, W = layer
    eager = error_feedback(jnp.asarray(W), jnp.asarray(H), _halve, block_size=32)
    jitted = jax.jit(lambda w, h: error_feedback(w, h, _halve, block_size=32))(jnp.asarray(W), jnp.asarray(H))
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-6, atol=1e-6)


def test_error_feedback_bad_inputs(layer):
    _, H, W = layer
    w, h = jnp.asarray(W), jnp.asarray(H)
    with pytest.raises(TypeError, match="callable"):
        error_feedback(w, h, None)
    with pytest.raises(ValueError, match="2-D"):
        error_feedback(w[0], h, _halve)
    with pytest.raises(TypeError, match="floating"):
        error_feedback(w.astype(jnp.int32), h, _halve)
    with pytest.raises(ValueError, match=r"shape \(95, 95\)"):
        error_feedback(w, h[:95, :95], _halve)
    with pytest.raises(ValueError, match="non-finite"):
        error_feedback(w, h.at[3, 3].set(jnp.nan), _halve)
    with pytest.raises(ValueError, match="NaN or Inf"):
        error_feedback(w.at[0, 0].set(jnp.inf), h, _halve)
    with pytest.raises(ValueError, match="damp"):
        error_feedback(w, h, _halve, damp=-0.1)
    with pytest.raises(TypeError, match="block_size"):
        error_feedback(w, h, _halve, block_size=1.5)
    with pytest.raises(ValueError, match="block_size"):
        error_feedback(w, h, _halve, block_size=0)
    # An indefinite Hessian with no damping cannot be factored: an error, never a silent NaN.
    bad = -np.eye(96, dtype=np.float32)
    with pytest.raises(ValueError, match="positive definite"):
        error_feedback(w, jnp.asarray(bad), _halve, damp=0.0)


# ------------------------------------------------------------------------------------ GPTQ reference
TINY = float(np.sqrt(np.finfo(np.float32).tiny))


def np_scales(x, bits, sym, axis=0):
    """The library's absmax scales (AQT/Qwix half-step convention) over ``axis``."""
    qmax = 2 ** (bits - 1) - 1
    if sym:
        mx = np.max(np.abs(x), axis=axis, keepdims=True)
        return np.where(mx > TINY, mx / (qmax + 0.5), 1.0), None
    lo = np.minimum(np.min(x, axis=axis, keepdims=True), 0)
    hi = np.maximum(np.max(x, axis=axis, keepdims=True), 0)
    s = (hi - lo) / (2**bits - 1)
    s = np.where(s > TINY, s, 1.0)
    z = np.clip(-(2 ** (bits - 1)) - np.round(lo / s), -(2 ** (bits - 1)), qmax)
    return s, z


def np_quant(w, s, z, bits, sym):
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if sym else -qmax - 1
    if z is None:
        c = np.clip(np.round(w / s), qmin, qmax)
        return c * s, c
    c = np.clip(np.round(w / s + z), qmin, qmax)
    return (c - z) * s, c


def np_gptq(W, H, bits=4, sym=True, g=None, block=128, damp=0.01, act_order=False):
    """GPTQ (Frantar et al., 2023) with lazy groups from the current weights, or static groups with act_order."""
    W = W.astype(np.float64)
    n = W.shape[0]
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    static = np_scales(W, bits, sym) if g is None else None
    W = W.copy()
    W[dead] = 0
    if g is not None and act_order:
        groups = [np_scales(W[k : k + g], bits, sym) for k in range(0, n, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[perm], H[perm][:, perm]
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros_like(W)
    cur = static
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E = W[i1:i2].copy(), np.zeros((i2 - i1, W.shape[1]))
        for i in range(i2 - i1):
            j = i1 + i
            if g is not None and not act_order and j % g == 0:
                cur = np_scales(W1[i : i + g], bits, sym)
            if g is not None and act_order:
                cur = groups[perm[j] // g]
            s, z = cur
            q, c = np_quant(W1[i], s[0], None if z is None else z[0], bits, sym)
            codes[j] = c
            e = (W1[i] - q) / U[j, j]
            W1[i:] -= np.outer(U[j, j:i2], e)
            E[i] = e
        W[i2:] -= U[i1:i2, i2:].T @ E
    out = np.zeros_like(codes)
    out[perm] = codes
    return out


@pytest.fixture(scope="module")
def wide():
    rng = np.random.default_rng(4)
    X = correlated(rng, 1024, 128, rank=32, noise=0.5)
    W = rng.normal(size=(128, 48)).astype(np.float32)
    H = (X.T @ X).astype(np.float32)
    H[5, :] = H[:, 5] = 0  # one dead input
    X[:, 5] = 0
    return X, H, W


@pytest.mark.parametrize(
    "spec_kw,act_order",
    [
        ({}, False),
        pytest.param({}, True, marks=pytest.mark.slow),
        pytest.param({"group_size": 32}, False, marks=pytest.mark.slow),
        ({"group_size": 32, "symmetric": False}, True),
        pytest.param({"bits": 3, "symmetric": False}, False, marks=pytest.mark.slow),
    ],
)
def test_gptq_matches_numpy_reference_and_beats_rtn(wide, spec_kw, act_order):
    X, H, W = wide
    spec = QuantSpec(**{"bits": 4, **spec_kw})
    g = spec.group_size
    out = gptq({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, spec, block_size=32, act_order=act_order)
    q = out["k"]
    assert isinstance(q, QArray) and q.bits == spec.bits and q.group_size == g and q.shape == W.shape
    ref = np_gptq(W, H, spec.bits, spec.symmetric, g, 32, 0.01, act_order)
    codes = np.asarray(q.ints())
    assert np.mean(codes == ref) > 0.95  # float32 vs float64: a few rounding flips
    wq = np.asarray(dequantize(q))
    rtn = np.asarray(dequantize(quantize(jnp.asarray(W), spec)))
    assert rel_err(X, W, wq) < 0.6 * rel_err(X, W, rtn)
    assert np.all(wq[5] == 0)  # the dead input's row was zeroed


def test_gptq_block_size_equal_to_group_is_the_reference_exactly_on_a_well_conditioned_case():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(4096, 32)).astype(np.float32)
    W = rng.normal(size=(32, 8)).astype(np.float32)
    H = X.T @ X
    q = gptq({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, QuantSpec(bits=4, group_size=16), block_size=16)["k"]
    np.testing.assert_array_equal(np.asarray(q.ints()), np_gptq(W, H, 4, True, 16, 16))


def test_gptq_passes_other_leaves_and_layouts_roundtrip_through_save(tmp_path):
    rng = np.random.default_rng(6)
    conv = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)  # (kh, kw, c_in, c_out)
    eqx_w = jnp.asarray(rng.normal(size=(8, 36)), jnp.float32)  # (out, in)
    done = quantize(jnp.asarray(rng.normal(size=(4, 4)), jnp.float32), QuantSpec(bits=8))
    params = {"conv": conv, "eqx": eqx_w, "bias": jnp.ones((8,)), "done": done}
    Xc = correlated(rng, 512, 36)
    hess = {"conv": Hessian(jnp.asarray(Xc.T @ Xc), jnp.float32(512), (0, 1, 2)), "eqx": Hessian(jnp.asarray(Xc.T @ Xc), jnp.float32(512), (1,)), "bias": None, "done": None}
    out = gptq(params, hess, QuantSpec(bits=4, group_size=2))
    assert out["bias"] is params["bias"] and out["done"] is done
    qc, qe = out["conv"], out["eqx"]
    assert qc.group_axis == 2 and qc.channel_axes == (0, 1, 3) and qe.group_axis == 1 and qe.channel_axes == (0,)
    for w, q, lay in ((conv, qc, lambda a: a.reshape(36, 8)), (eqx_w, qe, lambda a: a.T)):
        wq = lay(np.asarray(dequantize(q)))
        rtn = lay(np.asarray(dequantize(quantize(w, QuantSpec(bits=4, group_size=2, channel_axes=q.channel_axes, group_axis=q.group_axis)))))
        assert rel_err(Xc, lay(np.asarray(w)), wq) < rel_err(Xc, lay(np.asarray(w)), rtn)
    save(tmp_path / "m.cjx", out)
    back = load(tmp_path / "m.cjx")
    np.testing.assert_array_equal(np.asarray(back["conv"]), np.asarray(dequantize(qc)))


def test_gptq_compiles_once_per_shape_and_config(wide):
    _, H, W = wide
    from compressjax.oneshot._solver import solve

    params = {"a": jnp.asarray(W), "b": jnp.asarray(W) * 2}
    hs = {"a": jnp.asarray(H), "b": jnp.asarray(H)}
    gptq(params, hs, QuantSpec(bits=4))
    before = solve._cache_size()
    gptq(params, hs, QuantSpec(bits=4), damp=0.05)  # damp is traced: no recompilation
    assert solve._cache_size() == before


# ------------------------------------------------------------------------------- SparseGPT reference
def np_sparsegpt(W, H, sparsity=None, n=None, m=None, block=128, damp=0.01):
    """SparseGPT (Frantar & Alistarh, 2023): adaptive mask selection per block by w^2 / U_jj^2, OBS update."""
    from compressjax.oneshot._sparsegpt import block_counts

    W = W.astype(np.float64).copy()
    d_in, d_out = W.shape
    U, dead = np_inverse_factor(H, damp)
    W[dead] = 0
    n_pad = -(-d_in // block) * block
    counts = None if m else block_counts(d_in, d_out, block, n_pad, sparsity)
    Q = np.zeros_like(W)
    keep_all = np.zeros(W.shape, bool)
    for b, i1 in enumerate(range(0, d_in, block)):
        i2 = min(i1 + block, d_in)
        W1, E = W[i1:i2].copy(), np.zeros((i2 - i1, d_out))
        d1 = np.diag(U)[i1:i2]
        keep = np.ones(W1.shape, bool)
        if not m:
            sal = (W1**2 / d1[:, None] ** 2).ravel()
            keep.ravel()[np.argsort(sal, kind="stable")[: counts[b]]] = False
        for i in range(i2 - i1):
            j = i1 + i
            if m and i % m == 0:
                sal = W1[i : i + m] ** 2 / d1[i : i + m, None] ** 2
                for c in range(d_out):
                    order = np.lexsort((np.arange(m), sal[:, c]))  # ascending, earlier first among ties
                    keep[i + order[: m - n], c] = False
            q = np.where(keep[i], W1[i], 0.0)
            Q[j] = q
            e = (W1[i] - q) / U[j, j]
            W1[i:] -= np.outer(U[j, j:i2], e)
            E[i] = e
        keep_all[i1:i2] = keep
        W[i2:] -= U[i1:i2, i2:].T @ E
    return Q, keep_all


@pytest.mark.parametrize(
    "kw",
    [
        {"sparsity": 0.5},
        pytest.param({"sparsity": 0.3}, marks=pytest.mark.slow),
        {"sparsity": None, "n": 2, "m": 4},
        pytest.param({"sparsity": None, "n": 1, "m": 4}, marks=pytest.mark.slow),
    ],
)
def test_sparsegpt_matches_numpy_reference_with_exact_counts(wide, kw):
    X, H, W = wide
    out, masks = sparsegpt({"k": jnp.asarray(W), "b": jnp.ones(3)}, {"k": jnp.asarray(H), "b": None}, block_size=32, **kw)
    assert masks["b"] is None and out["b"].shape == (3,)
    keep = np.asarray(masks["k"])
    wq = np.asarray(out["k"])
    assert keep.dtype == bool and keep.shape == W.shape
    assert np.all(wq[~keep] == 0)
    if kw.get("m"):
        per_group = keep.reshape(-1, kw["m"], W.shape[1]).sum(axis=1)
        assert np.all(per_group == kw["n"])  # N:M along the input axis, for every output channel
    else:
        assert int((~keep).sum()) == round(kw["sparsity"] * W.size)  # exact count
    Q, ref_keep = np_sparsegpt(W, H, kw["sparsity"], kw.get("n"), kw.get("m"), 32)
    assert np.mean(keep == ref_keep) > 0.97
    assert abs(rel_err(X, W, wq) - rel_err(X, W, Q)) < 0.05 * rel_err(X, W, Q)
    mag = np.asarray(apply_masks({"k": jnp.asarray(W)}, magnitude_masks({"k": jnp.asarray(W)}, 0.5, scope="layer"))["k"])
    if kw.get("sparsity") == 0.5 or kw.get("n") == 2:
        assert rel_err(X, W, wq) < 0.7 * rel_err(X, W, mag)


@pytest.mark.slow
def test_sparsegpt_joint_quantization_keeps_zeros_and_grid(wide):
    X, H, W = wide
    for spec in (QuantSpec(bits=4), QuantSpec(bits=4, group_size=32, symmetric=False)):
        out, masks = sparsegpt({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, 0.5, rules={"k": spec}, block_size=64)
        q = out["k"]
        assert isinstance(q, QArray) and q.group_size == spec.group_size
        wq = np.asarray(dequantize(q))
        keep = np.asarray(masks["k"])
        assert np.all(wq[~keep] == 0) and int((~keep).sum()) == W.size // 2
        plain, _ = sparsegpt({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, 0.5, block_size=64)
        assert rel_err(X, W, wq) < 1.5 * rel_err(X, W, np.asarray(plain["k"]))


# ------------------------------------------------------------------------------------------------ Wanda
def test_wanda_masks_equal_the_numpy_scores(wide):
    _, H, W = wide
    score = np.abs(W) * np.sqrt(np.diag(H))[:, None]
    masks = wanda_masks({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, 0.25)
    keep = np.asarray(masks["k"])
    k = round(0.25 * W.shape[0])
    ref = np.ones(W.shape, bool)
    for c in range(W.shape[1]):
        ref[np.argsort(score[:, c], kind="stable")[:k], c] = False
    np.testing.assert_array_equal(keep, ref)
    assert np.all((~keep).sum(axis=0) == k)  # exact count in every output channel
    nm = np.asarray(wanda_masks({"k": jnp.asarray(W)}, {"k": jnp.asarray(H)}, None, n=2, m=4)["k"])
    assert np.all(nm.reshape(-1, 4, W.shape[1]).sum(axis=1) == 2)
    g = score.reshape(-1, 4, W.shape[1])
    thresh = np.sort(g, axis=1)[:, 1:2, :]  # the 2nd smallest: kept ones are at least it
    assert np.all(g[nm.reshape(g.shape)] >= np.broadcast_to(thresh, g.shape)[nm.reshape(g.shape)])


# -------------------------------------------------------------------------------------------- layerwise
@pytest.mark.slow
def test_layerwise_calibrates_each_stage_on_the_compressed_model():
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(16), nn.relu, nn.Dense(4)])
    rng = np.random.default_rng(7)
    batches = [jnp.asarray(correlated(rng, 64, 24)) for _ in range(2)]
    params = model.init(jax.random.key(0), batches[0])
    apply = lambda p, x: model.apply(p, x)  # noqa: E731
    rules = QuantSpec(bits=3)
    stages = ["layers_0/kernel", "layers_2/kernel"]
    out = layerwise(apply, params, batches, lambda p, h: gptq(p, h, rules), stages=stages)
    # By hand: stage 2's Hessian comes from the model with layer 0 already quantized.
    p1 = gptq(params, collect_hessians(apply, params, batches, where=stages[0]), rules)
    p2 = gptq(p1, collect_hessians(apply, p1, batches, where=stages[1]), rules)
    for path in ("layers_0", "layers_2"):
        np.testing.assert_array_equal(np.asarray(out["params"][path]["kernel"].ints()), np.asarray(p2["params"][path]["kernel"].ints()))
    assert not isinstance(out["params"]["layers_4"]["kernel"], QArray)
    pruned, masks = layerwise(apply, params, batches, lambda p, h: sparsegpt(p, h, 0.5), stages=stages)
    assert masks["params"]["layers_0"]["kernel"] is not None and masks["params"]["layers_2"]["kernel"] is not None
    assert masks["params"]["layers_4"]["kernel"] is None
    with pytest.raises(ValueError, match="stage 1"):
        layerwise(apply, params, batches, lambda p, h: gptq(p, h, rules), stages=["layers_0/kernel", "nope"])
    with pytest.raises(ValueError, match="non-empty"):
        layerwise(apply, params, batches, lambda p, h: p, stages=[])
    with pytest.raises(TypeError, match="compress"):
        layerwise(apply, params, batches, None, stages=stages)


# ---------------------------------------------------------------------------------------- bad inputs
def test_solver_bad_inputs(wide):
    _, H, W = wide
    p, h = {"k": jnp.asarray(W), "b": jnp.ones(3)}, {"k": jnp.asarray(H), "b": None}
    with pytest.raises(ValueError, match="'k' has a Hessian but no rule"):
        gptq(p, h, {"other": QuantSpec(bits=4)})
    with pytest.raises(ValueError, match="2 to 8 bits"):
        gptq(p, h, QuantSpec(bits=1))
    with pytest.raises(ValueError, match="group_size=7 does not divide"):
        gptq(p, h, QuantSpec(bits=4, group_size=7))
    with pytest.raises(ValueError, match="not a leaf of params"):
        gptq(p, {"zz": jnp.asarray(H)}, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="already quantized"):
        gptq({"k": quantize(jnp.asarray(W), QuantSpec(bits=4))}, {"k": jnp.asarray(H)}, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="no Hessian"):
        gptq(p, {"k": None, "b": None}, QuantSpec(bits=4))
    with pytest.raises(ValueError, match=r"'k'.*matches no leading axes"):
        gptq(p, {"k": jnp.eye(5)}, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="'k'.*non-finite"):
        gptq(p, {"k": jnp.asarray(H).at[0, 1].set(jnp.inf)}, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="'k'.*non-finite"):
        gptq({"k": jnp.asarray(W).at[0, 0].set(jnp.nan)}, h, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="'k'.*positive definite"):
        gptq(p, {"k": -jnp.eye(128)}, QuantSpec(bits=4), damp=0.0)
    with pytest.raises(ValueError, match="damp"):
        gptq(p, h, QuantSpec(bits=4), damp=-1.0)
    with pytest.raises(TypeError, match="act_order"):
        gptq(p, h, QuantSpec(bits=4), act_order=1)
    with pytest.raises(ValueError, match="sparsity must be in"):
        sparsegpt(p, h, 1.5)
    with pytest.raises(TypeError, match="sparsity"):
        sparsegpt(p, h, "half")
    with pytest.raises(ValueError, match="n must be <= m"):
        sparsegpt(p, h, None, n=5, m=4)
    with pytest.raises(ValueError, match="both n and m"):
        wanda_masks(p, h, None, n=2)
    with pytest.raises(ValueError, match="disagrees"):
        sparsegpt(p, h, 0.3, n=2, m=4)
    with pytest.raises(ValueError, match="'k': m=3 does not divide"):
        sparsegpt(p, h, None, n=1, m=3)
    with pytest.raises(ValueError, match="'k': m=3 does not divide"):
        wanda_masks(p, h, None, n=1, m=3)
    # Dead inputs are the documented fallback, not an error: zero row, finite result.
    dead = np.asarray(H).copy()
    dead[:, 9] = dead[9, :] = 0
    q = gptq(p, {"k": jnp.asarray(dead)}, QuantSpec(bits=4))["k"]
    assert np.all(np.asarray(dequantize(q))[9] == 0) and np.all(np.isfinite(np.asarray(dequantize(q))))


# ------------------------------------------------------------------------------------------ 8 devices
@pytest.mark.slow
def test_solvers_on_eight_devices_equal_one():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from compressjax import QuantSpec, dequantize
        from compressjax.oneshot import gptq, sparsegpt
        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        X = rng.normal(size=(512, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(np.float32)
        p = {"k": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}
        h = {"k": jnp.asarray(X.T @ X)}
        mesh = jax.make_mesh((8,), ("model",))
        for kw in ({}, {"act_order": True}):
            qa = gptq(p, h, QuantSpec(bits=4, group_size=16), **kw)["k"]
            qb = gptq(p, h, QuantSpec(bits=4, group_size=16), mesh=mesh, **kw)["k"]
            # Sharded matmuls may sum in another order: scales can differ by an ulp, codes should not.
            same = np.mean(np.asarray(qa.ints()) == np.asarray(qb.ints()))
            assert same > 0.99, same
            np.testing.assert_allclose(np.asarray(dequantize(qa)), np.asarray(dequantize(qb)), rtol=1e-5, atol=1e-5)
        a, ma = sparsegpt(p, h, None, n=2, m=4)
        b, mb = sparsegpt(p, h, None, n=2, m=4, mesh=mesh)
        np.testing.assert_allclose(np.asarray(a["k"]), np.asarray(b["k"]), rtol=1e-4, atol=1e-4)
        a, ma = sparsegpt(p, h, 0.5)
        b, mb = sparsegpt(p, h, 0.5, mesh=mesh)
        assert np.mean(np.asarray(ma["k"]) == np.asarray(mb["k"])) > 0.99
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- hypothesis
@settings(max_examples=60, deadline=None)
@given(d_in=st.integers(1, 700), d_out=st.integers(1, 50), block=st.sampled_from([1, 3, 32, 128]), s=st.floats(0.0, 1.0))
def test_block_counts_sum_to_the_exact_kernel_count(d_in, d_out, block, s):
    from compressjax.oneshot._sparsegpt import block_counts
    from compressjax.oneshot._sweep import padded_block

    blk, n_pad = padded_block(d_in, block)
    counts = block_counts(d_in, d_out, blk, n_pad, s)
    assert sum(counts) == round(s * d_in * d_out)
    for b, c in enumerate(counts):  # never more than the block's real weights
        assert 0 <= c <= (min((b + 1) * blk, d_in) - min(b * blk, d_in)) * d_out


@settings(max_examples=8, deadline=None)
@given(d_in=st.sampled_from([8, 12, 40]), d_out=st.integers(1, 9), s=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_wanda_exact_counts_per_output_channel(d_in, d_out, s, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    x = rng.normal(size=(3 * d_in, d_in)).astype(np.float32)
    keep = np.asarray(wanda_masks({"k": w}, {"k": jnp.asarray(x.T @ x)}, s)["k"])
    assert np.all((~keep).sum(axis=0) == round(s * d_in))
