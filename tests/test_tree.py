"""Tests for leaf paths and the `where` selector."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compressjax import tree


def linen_params():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    return model.init(jax.random.key(0), jnp.ones((1, 3)))


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 2, rngs=rngs)])
        self.norm = nnx.LayerNorm(2, rngs=rngs)


def test_linen_paths_and_default_selection():
    params = linen_params()
    paths = [p for p, _ in tree.leaves_with_paths(params)]
    assert "params/layers_0/kernel" in paths and "params/layers_2/bias" in paths
    chosen = [p for p, _ in tree.selected_leaves(params)]
    assert chosen == ["params/layers_0/kernel", "params/layers_2/kernel"]


def test_nnx_paths_drop_value_and_read_like_linen():
    state = nnx.state(TwoLayer(nnx.Rngs(0)), nnx.Param)
    paths = [p for p, _ in tree.leaves_with_paths(state)]
    assert "first/kernel" in paths and "layers/0/kernel" in paths and "norm/scale" in paths
    assert [p for p, _ in tree.selected_leaves(state)] == ["first/kernel", "layers/0/kernel"]


def test_regex_and_callable_where():
    params = linen_params()
    assert [p for p, _ in tree.selected_leaves(params, "layers_2/kernel")] == ["params/layers_2/kernel"]
    chosen = tree.selected_leaves(params, lambda p, x: x.ndim == 1)
    assert [p for p, _ in chosen] == ["params/layers_0/bias", "params/layers_2/bias"]


def test_plain_dict_with_none_leaves():
    params = {"a": jnp.ones((2, 2)), "b": None, "c": {"d": jnp.ones(3)}}
    masks = tree.map_selected(lambda p, x: x > 0, params)
    assert masks["b"] is None and masks["c"]["d"] is None and masks["a"].dtype == jnp.bool_
    kept = tree.map_selected(lambda p, x: x * 2, params, unselected="keep")
    np.testing.assert_array_equal(kept["a"], 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(kept["c"]["d"], np.ones(3))


def test_equinox_module_paths():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    assert [p for p, _ in tree.selected_leaves(mlp)] == ["layers/0/weight", "layers/1/weight"]


def test_selects_nothing_raises_with_paths():
    with pytest.raises(ValueError, match="selects no leaf.*params/layers_0/kernel"):
        tree.selected_leaves(linen_params(), "nothing_here")


def test_empty_tree_raises():
    with pytest.raises(ValueError, match="empty"):
        tree.selected_leaves({})


def test_integer_leaf_selected_raises_type_error():
    with pytest.raises(TypeError, match="'steps'.*int32"):
        tree.selected_leaves({"steps": jnp.zeros((2, 2), jnp.int32)}, "steps")


def test_bad_where_types():
    with pytest.raises(TypeError, match="where must be"):
        tree.selector(3)
    with pytest.raises(ValueError, match="regular expression"):
        tree.selector("(")


def test_mismatched_trees_name_paths():
    with pytest.raises(ValueError, match="only in params: \\['b'\\]"):
        tree.map_with_masks(lambda p, m, x: x, {"a": None}, {"a": 1.0, "b": 2.0})


def test_check_finite_names_path():
    with pytest.raises(ValueError, match="'w'.*non-finite"):
        tree.check_finite("w", jnp.array([1.0, jnp.nan]))
    jax.jit(lambda x: tree.check_finite("w", x) or x)(jnp.array([jnp.nan]))  # traced: skipped
