"""gptq_many: several quantizers in one sweep, bit for bit what gptq gives for each alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compressjax as cj

Q = cj.QuantSpec


def _model():
    """A plain kernel and a stacked one run by lax.scan (per-layer Hessians)."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"a": {"kernel": jax.random.normal(k[0], (64, 32))}, "s": {"kernel": jax.random.normal(k[1], (3, 32, 32)) / 4}}

    def apply(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["a"]["kernel"], p["s"]["kernel"])
        return h

    return params, cj.collect_hessians(apply, params, [jax.random.normal(k[2], (256, 64))])


# Groups and channels, symmetric and not, the clipping search, per tensor, a rule mapping, a repeated spec.
SPECS = [Q(bits=4, group_size=16), Q(bits=3, group_size=16, symmetric=False), Q(bits=2, symmetric=False),
         Q(bits=4, calibration="mse", error_power=2.0), Q(bits=8, channel_axes=()),
         {r"^a/": Q(bits=5), r".*": Q(bits=3, symmetric=False)}, Q(bits=4, group_size=16)]


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("act_order", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_each_result_is_gptq_alone_bit_for_bit(act_order):
    """Without act_order, the lazy groups are solved on their own and the channel specs share the sweep."""
    params, h = _model()
    many = cj.gptq_many(params, h, SPECS, act_order=act_order, damp=0.02)
    assert len(many) == len(SPECS)
    for spec, got in zip(SPECS, many, strict=True):
        _equal(got, cj.gptq(params, h, spec, act_order=act_order, damp=0.02))
        assert got["s"]["kernel"].scale.shape[0] == 3  # a stacked kernel keeps per-layer scales


def test_bad_rules():
    params, h = _model()
    with pytest.raises(ValueError, match="rules is empty"):
        cj.gptq_many(params, h, [])
    with pytest.raises(TypeError, match="sequence of QuantSpec"):
        cj.gptq_many(params, h, Q(bits=4))
    with pytest.raises(ValueError, match="'a/kernel'.*group_size=7"):
        cj.gptq_many(params, h, [Q(bits=4), Q(bits=4, group_size=7)])
    with pytest.raises(ValueError, match="2 to 8 bits"):
        cj.gptq_many(params, h, [Q(bits=4), Q(bits=1)])
