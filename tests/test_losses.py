"""Tests for the distillation losses against NumPy references, gradients, stability and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from compressjax import losses
from compressjax.losses import (
    cosine_loss,
    distillation_loss,
    hint_loss,
    kd_loss,
    mse_loss,
    softmax_cross_entropy_with_integer_labels,
)


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_kd(s, t, temperature, axis=-1):
    ls, lt = np_log_softmax(s / temperature, axis), np_log_softmax(t / temperature, axis)
    return (np.exp(lt) * (lt - ls)).sum(axis=axis) * temperature**2


def np_ce(logits, labels):
    lp = np_log_softmax(logits)
    return -np.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]


def logits(seed, shape=(6, 5), scale=3.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kd_matches_numpy(temperature):
    s, t = logits(0), logits(1)
    got = kd_loss(s, t, temperature=temperature)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np_kd(np.asarray(s), np.asarray(t), temperature), rtol=2e-5, atol=1e-6)


def test_kd_other_axis_and_batch_dims():
    s, t = logits(0, (3, 7, 4)), logits(1, (3, 7, 4))
    got = kd_loss(s, t, temperature=2.0, axis=1)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, np_kd(np.asarray(s), np.asarray(t), 2.0, axis=1), rtol=2e-5, atol=1e-6)


def test_kd_where_excludes_classes():
    s, t = logits(0), logits(1)
    mask = jnp.array([True, True, False, True, False])
    got = kd_loss(s, t, temperature=2.0, where=mask)
    ref = np_kd(np.asarray(s)[:, [0, 1, 3]], np.asarray(t)[:, [0, 1, 3]], 2.0)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    g = jax.grad(lambda x: kd_loss(x, t, temperature=2.0, where=mask).sum())(s)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, [2, 4]] == 0)


def test_kd_zero_for_equal_logits_exactly():
    s = logits(3, (8, 10), scale=50.0)
    for temperature in (0.1, 1.0, 100.0):
        assert np.all(np.asarray(kd_loss(s, s, temperature=temperature)) == 0.0)


def test_kd_stable_for_large_logits_and_temperature():
    s = jnp.array([[1e30, -1e30, 0.0], [3e4, 0.0, -3e4]], jnp.float32)
    t = jnp.array([[-1e30, 1e30, 0.0], [0.0, 3e4, 1.0]], jnp.float32)
    for temperature in (1.0, 1e3):
        v = kd_loss(s, t, temperature=temperature)
        g = jax.grad(lambda x, temperature=temperature: kd_loss(x, t, temperature=temperature).sum())(s)
        assert np.all(np.isfinite(v)) and np.all(np.isfinite(g)) and np.all(np.asarray(v) >= 0)
    # Large temperature on ordinary logits still matches the float64 reference.
    a, b = logits(0), logits(1)
    np.testing.assert_allclose(kd_loss(a, b, temperature=1e4), np_kd(np.asarray(a), np.asarray(b), 1e4), rtol=2e-2)


def test_kd_neg_inf_teacher_logits_contribute_zero():
    s = jnp.array([[1.0, 2.0, 3.0]])
    t = jnp.array([[0.5, -jnp.inf, 1.5]])
    got = kd_loss(s, t)
    # KL(p || q) with p_1 = 0: the class adds 0 * log(0 / q_1) = 0; the rest is the usual sum.
    lp_s = np_log_softmax(np.asarray(s))
    lp_t = np_log_softmax(np.array([[0.5, 1.5]]))
    full = (np.exp(lp_t) * (lp_t - lp_s[:, [0, 2]])).sum(-1)
    np.testing.assert_allclose(got, full, rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda x: kd_loss(x, t).sum())(s)))


def test_kd_t_squared_keeps_gradient_magnitude():
    s, t = logits(0, (32, 10), 1.0), logits(1, (32, 10), 1.0)
    norms, raw = [], []
    for temperature in (4.0, 8.0, 16.0, 32.0):
        g = jax.grad(lambda x, T=temperature: kd_loss(x, t, temperature=T).mean())(s)
        norms.append(float(jnp.linalg.norm(g)))
        raw.append(norms[-1] / temperature**2)  # the gradient without the T^2 factor
    assert max(norms) / min(norms) < 1.3
    assert raw[0] / raw[-1] > 50  # without T^2 it would shrink ~ T^2 (8^2 = 64 over this range)


def test_softmax_cross_entropy_and_distillation_loss_match_numpy():
    s, t = logits(0), logits(1)
    labels = jnp.array([0, 4, 2, 1, 3, 0])
    ce = softmax_cross_entropy_with_integer_labels(s, labels)
    np.testing.assert_allclose(ce, np_ce(np.asarray(s), np.asarray(labels)), rtol=1e-5)
    for alpha in (0.0, 0.3, 1.0):
        got = distillation_loss(s, t, labels, temperature=3.0, alpha=alpha)
        ref = alpha * np_kd(np.asarray(s), np.asarray(t), 3.0) + (1 - alpha) * np_ce(np.asarray(s), np.asarray(labels))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    # Without labels: the soft term alone, whatever alpha.
    np.testing.assert_allclose(distillation_loss(s, t, temperature=3.0, alpha=0.2), kd_loss(s, t, temperature=3.0))


def test_jit_matches_eager():
    s, t = logits(0), logits(1)
    labels = jnp.array([0, 4, 2, 1, 3, 0])
    f = lambda s, t, y: distillation_loss(s, t, y, temperature=2.0, alpha=0.7)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(s, t, labels), f(s, t, labels), rtol=1e-6)
    for fn in (kd_loss, mse_loss, cosine_loss, hint_loss):
        np.testing.assert_allclose(jax.jit(fn)(s, t), fn(s, t), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_gradients_check_grads():
    s, t = logits(0, (3, 4), 1.0), logits(1, (3, 4), 1.0)
    labels = jnp.array([0, 3, 1])
    w = jax.random.normal(jax.random.key(5), (4, 4))
    fns = [
        lambda x: kd_loss(x, t, temperature=2.0),
        lambda x: distillation_loss(x, t, labels, temperature=2.0, alpha=0.4),
        lambda x: mse_loss(x, t),
        lambda x: hint_loss(x, t, w),
        lambda x: cosine_loss(x, t),
    ]
    with jax.enable_x64(True):
        s64 = jnp.asarray(s, jnp.float64)
        for fn in fns:
            check_grads(fn, (s64,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 5),
    st.floats(0.05, 50.0),
    st.floats(0.1, 30.0),
    st.integers(0, 2**16),
)
@pytest.mark.slow
def test_kd_properties(batch, classes, temperature, scale, seed):
    s = np.random.default_rng(seed).normal(size=(batch, classes)).astype(np.float32) * scale
    t = np.random.default_rng(seed + 1).normal(size=(batch, classes)).astype(np.float32) * scale
    v = np.asarray(jax.jit(kd_loss)(s, t, temperature=temperature))
    assert v.shape == (batch,) and np.all(np.isfinite(v)) and np.all(v >= -1e-4 * temperature**2)
    np.testing.assert_allclose(v, np_kd(s, t, temperature), rtol=1e-3, atol=1e-4 * max(1.0, temperature**2))
    assert np.all(np.asarray(kd_loss(s, s, temperature=temperature)) == 0)


def test_mse_loss_axes_and_where():
    p, t = logits(0, (4, 3, 5)), logits(1, (4, 3, 5))
    d2 = (np.asarray(p) - np.asarray(t)) ** 2
    np.testing.assert_allclose(mse_loss(p, t), d2.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(mse_loss(p, t, axis=None), d2.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(mse_loss(p, t, axis=(0, 2)), d2.mean((0, 2)), rtol=1e-5)
    mask = np.array([True, False, True, True, False])
    np.testing.assert_allclose(mse_loss(p, t, where=mask), d2[..., mask].mean(-1), rtol=1e-5)


def test_hint_loss_projection_matrix_and_callable():
    s, t = logits(0, (4, 2, 3)), logits(1, (4, 2, 6))
    w = jax.random.normal(jax.random.key(2), (3, 6))
    ref = ((np.asarray(s) @ np.asarray(w) - np.asarray(t)) ** 2).mean((1, 2))
    np.testing.assert_allclose(hint_loss(s, t, w), ref, rtol=1e-5)
    np.testing.assert_allclose(hint_loss(s, t, lambda x: x @ w), ref, rtol=1e-5)
    same = logits(3, (4, 2, 6))
    np.testing.assert_allclose(hint_loss(same, t), ((np.asarray(same) - np.asarray(t)) ** 2).mean((1, 2)), rtol=1e-5)


def test_cosine_loss_reference_scale_invariance_and_zero_vector():
    p, t = logits(0, (5, 8)), logits(1, (5, 8))
    pn, tn = np.asarray(p, np.float64), np.asarray(t, np.float64)
    ref = 1 - (pn * tn).sum(-1) / (np.linalg.norm(pn, axis=-1) * np.linalg.norm(tn, axis=-1))
    np.testing.assert_allclose(cosine_loss(p, t), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cosine_loss(3.0 * p, 0.5 * t), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cosine_loss(p, p), 0.0, atol=1e-6)
    np.testing.assert_allclose(cosine_loss(p, -p), 2.0, atol=1e-6)
    z = jnp.zeros((2, 8))
    assert np.allclose(cosine_loss(z, t[:2]), 1.0)
    g = jax.grad(lambda x: cosine_loss(x, t[:2]).sum())(z)
    assert np.all(np.isfinite(g))
    mask = np.arange(8) < 5
    ref5 = 1 - (pn[:, :5] * tn[:, :5]).sum(-1) / (
        np.linalg.norm(pn[:, :5], axis=-1) * np.linalg.norm(tn[:, :5], axis=-1)
    )
    np.testing.assert_allclose(cosine_loss(p, t, where=mask), ref5, rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        kd_loss(logits(0), logits(1, (6, 4)))
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(3, 5\)"):
        distillation_loss(logits(0), logits(1, (3, 5)))
    for fn in (mse_loss, cosine_loss):
        with pytest.raises(ValueError, match="shape"):
            fn(logits(0), logits(1, (6, 4)))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=f"temperature={temperature!r}"):
        kd_loss(logits(0), logits(1), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits(0), logits(1), temperature=jnp.array(temperature))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=f"alpha={alpha!r}"):
        distillation_loss(logits(0), logits(1), jnp.zeros(6, jnp.int32), alpha=alpha)


@pytest.mark.parametrize("bad", [5, -1])
def test_labels_out_of_range(bad):
    labels = jnp.array([0, 1, 2, 3, 4, bad])
    with pytest.raises(ValueError, match=f"got label {bad}"):
        distillation_loss(logits(0), logits(1), labels)


def test_labels_out_of_range_under_jit_give_nan_not_a_wrapped_class():
    got = jax.jit(softmax_cross_entropy_with_integer_labels)(jnp.zeros((3, 4)), jnp.array([0, 4, -1]))
    assert np.isfinite(got[0]) and np.isnan(got[1]) and np.isnan(got[2])
    g = jax.grad(lambda x: jax.jit(softmax_cross_entropy_with_integer_labels)(x, jnp.array([0, 4, -1]))[0])(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(g))


def test_float_labels_and_wrong_label_shape():
    with pytest.raises(TypeError, match="float32"):
        distillation_loss(logits(0), logits(1), jnp.zeros(6, jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        softmax_cross_entropy_with_integer_labels(logits(0), jnp.zeros(5, jnp.int32))
    # Under jit the static checks (dtype, shape) still fire.
    with pytest.raises(TypeError, match="integer"):
        jax.jit(distillation_loss)(logits(0), logits(1), jnp.zeros(6, jnp.float32))


def test_non_float_logits_rejected():
    with pytest.raises(TypeError, match="int32"):
        kd_loss(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))


def test_hint_loss_shape_errors_mention_projection():
    s, t = logits(0, (4, 3)), logits(1, (4, 6))
    with pytest.raises(ValueError, match="projection="):
        hint_loss(s, t)
    with pytest.raises(ValueError, match=r"projection matrix has shape \(4, 6\)"):
        hint_loss(s, t, jnp.ones((4, 6)))


def test_bad_axis():
    with pytest.raises(ValueError, match="axis=3"):
        mse_loss(logits(0), logits(1), axis=3)


def test_module_all_is_public():
    for name in losses.__all__:
        assert callable(getattr(losses, name))


# ------------------------------------------------------------------ issue 11 item 7: non-finite teachers
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_teacher_logits_give_nan_not_a_silent_constant(bad):
    s = jnp.array([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]])
    t = jnp.array([[bad, 0.0, 1.0], [1.0, 0.0, -1.0]])
    for temperature in (1.0, 4.0):
        loss = kd_loss(s, t, temperature=temperature)
        assert np.isnan(loss[0]) and np.isfinite(loss[1]), loss
        assert np.isnan(jax.jit(functools.partial(kd_loss, temperature=temperature))(s, t)[0])
        assert np.isnan(distillation_loss(s, t, jnp.array([0, 1]), temperature=temperature)[0])


def test_minus_inf_teacher_logits_stay_a_zero_probability():
    s = jnp.array([[0.5, -1.0, 2.0]])
    t = jnp.array([[-jnp.inf, 0.0, 1.0]])
    assert np.isfinite(kd_loss(s, t)[0])
    # A non-finite logit in a class that `where` leaves out does not count.
    where = jnp.array([[False, True, True]])
    assert np.isfinite(kd_loss(s, t.at[0, 0].set(jnp.nan), where=where)[0])


def test_softmax_cross_entropy_has_one_name():
    import compressjax as cj

    assert not hasattr(losses, "softmax_cross_entropy") and not hasattr(cj, "softmax_cross_entropy")
