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


# ------------------------------------------------------------------ issue 13: the public API surface
MOVED = {
    "leaves_with_paths": "compressjax.tree.leaves_with_paths",
    "path_to_str": "compressjax.tree.path_to_str",
    "selector": "compressjax.tree.selector",
    "compute_scale": "compressjax.quantization.compute_scale",
    "resolve_rules": "compressjax.quantization.resolve_rules",
    "ste_surrogate": "compressjax.quantization.ste_surrogate",
    "softmax_cross_entropy": "compressjax.losses.softmax_cross_entropy_with_integer_labels",
    "qarray_to_parts": "compressjax.qarray.QArray.to_parts",
    "qarray_from_parts": "compressjax.qarray.QArray.from_parts",
    "quantized_ints": "compressjax.qarray.QArray.ints",
    "qarray_from_ints": "compressjax.qarray.QArray.from_ints",
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_helpers_live_in_their_modules_not_at_the_top_level(name):
    # 0.1.0 is the first release: no deprecation shims, each helper has one home.
    import importlib

    import compressjax as cj

    assert name not in cj.__all__ and not hasattr(cj, name)
    module, _, attr = MOVED[name].rpartition(".")
    if module.endswith("QArray"):
        module, attr = module.rpartition(".")[0], "QArray." + attr
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert callable(obj)


def test_unknown_top_level_name_is_an_attribute_error():
    import compressjax as cj

    with pytest.raises(AttributeError, match="no_such_name"):
        cj.no_such_name  # noqa: B018


def test_every_exported_name_resolves_and_init_is_grouped():
    import compressjax as cj

    for name in cj.__all__:
        assert getattr(cj, name) is not None
    text = open(cj.__file__).read()
    groups = [line[len("# --- "):] for line in text.splitlines() if line.startswith("# --- ")]
    assert groups == ["tree selection", "pruning", "quantization", "distillation", "export", "one-shot compression",
                      "weight sharing", "allocation"]


def test_from_ints_takes_meta_or_keywords_not_both():
    import compressjax as cj

    q = cj.quantize(jnp.arange(12.0).reshape(3, 4), cj.QuantSpec(4))
    arrays, meta = q.to_parts()
    with pytest.raises(ValueError, match="either meta or keywords"):
        cj.QArray.from_ints(q.ints(), arrays["scale"], meta=meta, bits=4)
    a = cj.QArray.from_ints(q.ints(), arrays["scale"], meta=meta)
    b = cj.QArray.from_ints(q.ints(), arrays["scale"], bits=4, channel_axes=(1,))
    np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(ValueError, match="needs bits"):
        cj.QArray.from_ints(q.ints(), arrays["scale"])


def test_dead_helpers_are_gone():
    from compressjax import pruning

    assert not hasattr(tree, "iter_selected")
    assert not hasattr(pruning, "masks_match")


def test_map_selected_and_masks_keep_compressed_leaves_whole():
    import compressjax as cj

    params = {"q": cj.quantize(jnp.ones((4, 4))), "w": jnp.ones((4, 4))}
    seen = []
    tree.map_selected(lambda p, x: seen.append(p) or x, params, lambda p, x: True, unselected="keep")
    assert seen == ["q", "w"]
    masks = {"q": None, "w": jnp.ones((4, 4), bool)}
    out = cj.apply_masks(params, masks)
    assert out["q"] is params["q"]
    with pytest.raises(TypeError, match="'q'.*already compressed"):
        cj.apply_masks(params, {"q": jnp.ones((4, 4), bool), "w": None})


def test_pytree_node_unflattens_without_init_and_keeps_static_fields():
    from compressjax.tree import CompressedLeaf, pytree_node

    calls = []

    @pytree_node(children=("a", "b"), static=("shape", "dtype"))
    class Leaf(CompressedLeaf):
        def __init__(self, a, b, shape, dtype):
            calls.append(1)
            if not hasattr(a, "shape"):
                raise TypeError("validating constructor")
            self.a, self.b, self.shape, self.dtype = a, b, tuple(shape), jnp.dtype(dtype)

        def decode(self):
            return self.a * self.b

    x = Leaf(jnp.ones((2, 3)), jnp.asarray(2.0), (2, 3), "float32")
    leaves, treedef = jax.tree.flatten(x)
    assert len(leaves) == 2 and len(calls) == 1
    y = jax.tree.unflatten(treedef, [object(), None])  # placeholders, as jax passes them: no __init__
    assert isinstance(y, Leaf) and y.shape == (2, 3) and len(calls) == 1
    z = jax.jit(lambda t: jax.tree.map(lambda v: v + 1, t))(x)
    assert isinstance(z, Leaf) and z.dtype == jnp.float32 and (z.ndim, z.size) == (2, 6)
    np.testing.assert_array_equal(np.asarray(z.decode()), np.full((2, 3), 6.0))
    assert tree.is_compressed_leaf(x) and len(tree.leaves_with_paths({"x": x})) == 1


def test_replace_leaves_by_path_keeps_compressed_leaves_whole():
    from compressjax import QuantSpec, quantize

    q = quantize(jnp.ones((4, 4)), QuantSpec(bits=4))
    params = {"a": {"kernel": jnp.ones((2, 2))}, "q": q, "b": [jnp.zeros(3)]}
    out = tree.replace_leaves(params, {"a/kernel": jnp.full((2, 2), 7.0), "b/0": None, "missing": 1})
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), 7.0)
    assert out["q"] is q and out["b"] == [None]
