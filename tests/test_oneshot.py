"""One-shot solvers: the OBS error-feedback sweep, GPTQ, SparseGPT, Wanda and layerwise compression.

The references are direct NumPy (float64) transcriptions of the papers' algorithms (the reference
implementations' loops, transposed to the ``(d_in, d_out)`` kernel layout).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.oneshot import error_feedback


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
