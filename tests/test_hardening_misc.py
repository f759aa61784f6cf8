"""Issue 22 (losses, distillation, demo flags, k-means arguments): extreme temperatures, bounded seeds,
clear argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compressjax as cj
from compressjax.cli import build_parser, main
from compressjax.losses import distillation_loss, kd_loss


def _np_kd(s, t, temperature):
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature
    ls = s - s.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    lt = t - t.max(-1, keepdims=True)
    lt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
    return (np.exp(lt) * (lt - ls)).sum(-1) * temperature**2


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((4, 10)).astype(np.float32) * 3),
            jnp.asarray(rng.standard_normal((4, 10)).astype(np.float32) * 3))


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 1e6, 1e20, 1e38])
@pytest.mark.parametrize("jit", [False, True])
def test_kd_loss_is_finite_at_extreme_temperatures(logits, temperature, jit):
    s, t = logits
    f = (jax.jit(lambda a, b: kd_loss(a, b, temperature=temperature))) if jit else (lambda a, b: kd_loss(a, b, temperature=temperature))
    v = np.asarray(f(s, t))
    g = np.asarray(jax.grad(lambda a: f(a, t).sum())(s))
    assert np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(np.isfinite(g))
    if temperature >= 1e6:  # the limit: half the variance of s - t over the classes
        diff = np.asarray(s, np.float64) - np.asarray(t, np.float64)
        np.testing.assert_allclose(v, 0.5 * diff.var(-1), rtol=1e-4)
    else:  # T -> 0: T^2 KL -> 0 (about T times the logit gap)
        assert np.all(v <= 2 * temperature * 20 + 1e-6)


@pytest.mark.parametrize("temperature", [1e-2, 0.5, 3.0, 1e3])
def test_kd_loss_still_matches_float64(logits, temperature):
    s, t = logits
    np.testing.assert_allclose(np.asarray(kd_loss(s, t, temperature=temperature)), _np_kd(s, t, temperature),
                               rtol=2e-4, atol=1e-6)


def test_kd_loss_traced_temperature_under_jit(logits):
    s, t = logits
    f = jax.jit(lambda a, b, T: kd_loss(a, b, temperature=T))
    for temperature in (1e-30, 1e20):
        assert np.all(np.isfinite(np.asarray(f(s, t, jnp.float32(temperature)))))


@pytest.mark.parametrize("temperature", [1e-30, 1e20])
def test_distill_step_keeps_params_finite(temperature):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 6)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 5, 8))
    student = {"w": jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))}
    teacher = {"w": jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))}
    apply = lambda p, inputs: inputs @ p["w"]  # noqa: E731
    tx = optax.sgd(0.1)
    loss = lambda s, t, y: distillation_loss(s, t, y, temperature=temperature, alpha=0.5)  # noqa: E731
    step = cj.make_distill_step(apply, apply, tx, loss_fn=loss, donate=False)
    state = cj.DistillState.create(student, tx)
    for _ in range(2):
        state, metrics = step(state, teacher, (x, labels))
        assert np.isfinite(float(metrics["loss"]))
    assert np.all(np.isfinite(np.asarray(state.params["w"])))


def test_demo_seed_is_bounded_in_argument_parsing(capsys):
    for bad in ("99999999999999999999", "-1", "4294967296", "x"):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--quick", "--seed", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --seed: must be an integer in [0, 4294967295]" in err and "Traceback" not in err
    assert build_parser().parse_args(["demo", "--seed", "4294967295"]).seed == 4294967295
    from compressjax.demo.pipeline import DemoConfig

    with pytest.raises(ValueError, match="seed must be an int in \\[0, 4294967295\\], got 99999999999999999999"):
        DemoConfig(seed=99999999999999999999)
