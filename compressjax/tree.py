"""Leaf paths and the ``where`` selector shared by every compressjax function.

A *path string* joins the keys that lead to a leaf with ``/``: dict keys, attribute names and sequence
indices. The trailing ``value`` key of a Flax NNX ``Variable`` is dropped, so ``nnx.state(model)`` and a
linen ``params`` dict give paths that read alike (``"Dense_0/kernel"``, ``"layers/0/kernel"``).

``where`` selects the leaves a function touches:

* ``None`` (default): floating-point array leaves with ``ndim >= 2`` (kernels and embeddings, not biases
  or norm scales), never a compressed leaf;
* a string: a regular expression searched (``re.search``) in the path string;
* a callable ``(path: str, leaf) -> bool``.

Unselected leaves pass through untouched; functions that return per-leaf data (masks, statistics) hold
``None`` there.

*Compressed leaves*: any object whose class sets ``_cj_compressed_leaf = True`` (:class:`compressjax.QArray`,
a codebook-coded array, ...) is a pytree node for JAX (its codes and scales are children, so it crosses
``jit``) but ONE leaf for every function here: its scales are never listed, selected, masked or
quantized on their own. The default selector skips compressed leaves.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

PyTree: TypeAlias = Any
Where: TypeAlias = None | str | Callable[[str, Any], bool]

__all__ = [
    "PyTree",
    "Where",
    "path_to_str",
    "leaves_with_paths",
    "Selector",
    "selector",
    "selected_leaves",
    "map_selected",
    "map_with_masks",
    "replace_leaves",
    "check_same_structure",
    "check_mask",
    "is_compressed_leaf",
    "CompressedLeaf",
    "pytree_node",
    "with_compressed_leaves",
    "check_not_float64",
    "is_none_or_compressed",
    "is_float_array",
    "check_finite",
]


def is_compressed_leaf(x: Any) -> bool:
    """True for an object whose class sets ``_cj_compressed_leaf = True`` (a QArray, a codebook array, ...)."""
    return bool(getattr(type(x), "_cj_compressed_leaf", False))


def pytree_node(*, children: tuple[str, ...], static: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: registers the class as a JAX pytree node with named array and static fields.

    The one way compressjax declares its pytree types (``QArray``, ``Codebook``, ``Hessian``,
    ``DistillState``). ``children`` are the fields JAX traces (arrays, subtrees, or ``None``); ``static`` are
    hashable metadata kept in the tree definition. Unflattening sets the fields without calling
    ``__init__``, because JAX unflattens with tracers, float0 cotangents and placeholder objects that a
    validating constructor would reject (as ``equinox.Module`` unflattens).

    Args:
        children: names of the traced fields, in flattening order.
        static: names of the static fields.

    Returns:
        A decorator that registers the class and returns it unchanged.
    """
    fields = tuple(children) + tuple(static)

    def register(cls: type) -> type:
        def flatten(node):
            return tuple(getattr(node, f) for f in children), tuple(getattr(node, f) for f in static)

        def unflatten(aux, leaves):
            node = object.__new__(cls)
            for name, value in zip(fields, (*leaves, *aux), strict=True):
                object.__setattr__(node, name, value)  # also on frozen dataclasses
            return node

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return register


class CompressedLeaf:
    """The compressed-leaf protocol: a pytree node that every compressjax tree function treats as one leaf.

    Subclasses (``QArray``, ``Codebook``) define ``shape``, ``dtype`` and :meth:`decode`; tree functions
    decode any of them without importing its class (see :func:`is_compressed_leaf`). A subclass may also
    define a classmethod ``join_slices(parts, axis, new, path)`` that stacks (``new``) or concatenates
    per-slice leaves into one (``QArray`` and ``Codebook`` do); :func:`~compressjax.sequential` uses it to
    assemble stacked kernels.
    """

    _cj_compressed_leaf = True
    shape: tuple[int, ...]
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def decode(self) -> jax.Array:
        """The array this leaf stands for, in its shape and dtype."""
        raise NotImplementedError


def is_none_or_compressed(x: Any) -> bool:
    """``is_leaf`` predicate that keeps ``None`` (and compressed leaves) as leaves; masks hold ``None`` at
    unselected leaves."""
    return x is None or is_compressed_leaf(x)


def with_compressed_leaves(is_leaf: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
    """``is_leaf`` extended so that compressed leaves are always leaves."""
    if is_leaf is None:
        return is_compressed_leaf
    return lambda x: is_compressed_leaf(x) or bool(is_leaf(x))


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: tuple[Any, ...]) -> str:
    """Turns a ``jax.tree_util`` key path into ``"a/b/0/kernel"`` (NNX's trailing ``value`` dropped)."""
    parts = [_key_str(k) for k in path]
    if len(path) > 0 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """All leaves of ``tree`` with their path strings, in ``jax.tree_util`` flattening order.

    Compressed leaves (see the module docstring) are kept whole, whatever ``is_leaf`` says.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=with_compressed_leaves(is_leaf))
    return [(path_to_str(p), leaf) for p, leaf in flat]


def is_float_array(leaf: Any) -> bool:
    """True for arrays (JAX, NumPy or tracers) with a floating-point dtype (compressed leaves excluded)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and not is_compressed_leaf(leaf) and jnp.issubdtype(dtype, jnp.floating)


def check_not_float64(path: str, leaf: Any, what: str = "compressjax") -> None:
    """Raises ``TypeError`` naming ``path`` for a leaf that JAX would hold as float64 (64-bit types on).

    compressjax computes in float32 (thresholds on float32 bit patterns, float32 scales); narrowing a
    float64 leaf silently would reorder or overflow values (``1e300`` becomes ``inf``), so it is rejected.
    With 64-bit types off, JAX itself narrows NumPy float64 arrays to float32 and they are accepted.
    """
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.canonicalize_dtype(dtype) == jnp.float64:
        raise TypeError(
            f"leaf {path!r} has dtype float64; {what} works in float32: cast it first "
            "(e.g. jax.tree.map(lambda x: x.astype(jnp.float32), params)), deliberately, where 1e300 cannot occur"
        )


def _default_where(path: str, leaf: Any) -> bool:
    del path
    return is_float_array(leaf) and getattr(leaf, "ndim", 0) >= 2


@dataclasses.dataclass(frozen=True)
class Selector:
    """A normalised ``where``: the predicate ``(path, leaf) -> bool``, compared and hashed by the ``where`` it
    was made from (so caches and static ``jit`` arguments can key on it). Make one with :func:`selector`."""

    where: Where
    _pattern: re.Pattern | None = dataclasses.field(default=None, compare=False, repr=False)

    def __call__(self, path: str, leaf: Any) -> bool:
        if self.where is None:
            return _default_where(path, leaf)
        if leaf is None:
            return False
        if self._pattern is not None:
            return self._pattern.search(path) is not None
        return bool(self.where(path, leaf))


def selector(where: Where) -> Selector:
    """Normalises a ``where`` argument into a :class:`Selector` (a predicate ``(path, leaf) -> bool``).

    Raises:
        TypeError: if ``where`` is not ``None``, a string or a callable.
        ValueError: if ``where`` is a string that is not a valid regular expression.
    """
    if isinstance(where, Selector):
        return where
    if where is None:
        return Selector(None)
    if isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from e
        return Selector(where, pattern)
    if callable(where):
        return Selector(where)
    raise TypeError(f"where must be None, a regex string or a callable (path, leaf) -> bool, got {where!r}")


def selected_leaves(
    tree: PyTree,
    where: Where = None,
    *,
    require_float: bool = True,
    allow_empty: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs of ``tree`` that ``where`` selects.

    Args:
        tree: any pytree (linen params, ``nnx.State``, equinox module, dict with ``None`` leaves).
        where: the selector (see module docstring).
        require_float: raise ``TypeError`` when a selected leaf is not a floating-point array.
        allow_empty: return an empty list instead of raising when nothing is selected.
        is_leaf: forwarded to ``jax.tree_util`` flattening.

    Raises:
        ValueError: if nothing is selected (unless ``allow_empty``), or the tree is empty.
        TypeError: if a selected leaf is not a floating-point array, is float64 or is a compressed leaf
            (when ``require_float``), naming its path.
    """
    pred = selector(where)
    chosen = [(p, leaf) for p, leaf in leaves_with_paths(tree, is_leaf) if pred(p, leaf)]
    if require_float:
        for p, leaf in chosen:
            if is_compressed_leaf(leaf):
                raise TypeError(
                    f"leaf {p!r} selected by where={where!r} is already compressed ({type(leaf).__name__}); "
                    "decompress it first (e.g. compressjax.dequantize_params) or leave it out of `where`"
                )
            check_not_float64(p, leaf)
            if not is_float_array(leaf):
                dtype = getattr(leaf, "dtype", type(leaf).__name__)
                raise TypeError(f"leaf {p!r} selected by where={where!r} has dtype {dtype}; expected a floating-point array")
    if not chosen and not allow_empty:
        paths = [p for p, _ in leaves_with_paths(tree, is_leaf)]
        if not paths:
            raise ValueError("the params pytree is empty: there are no leaves to select")
        shown = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise ValueError(f"where={where!r} selects no leaf; the tree's leaves are {shown}")
    return chosen


def map_selected(
    fn: Callable[[str, Any], Any],
    tree: PyTree,
    where: Where = None,
    *,
    unselected: str = "none",
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """Maps ``fn(path, leaf)`` over the leaves that ``where`` selects.

    Args:
        fn: called with the path string and the leaf.
        tree: the pytree.
        where: the selector.
        unselected: ``"none"`` puts ``None`` at unselected leaves (the shape of masks); ``"keep"`` passes
            them through unchanged.
        is_leaf: forwarded to ``jax.tree_util``.
    """
    if unselected not in ("none", "keep"):
        raise ValueError(f"unselected must be 'none' or 'keep', got {unselected!r}")
    pred = selector(where)

    def visit(path, leaf):
        p = path_to_str(path)
        if pred(p, leaf):
            return fn(p, leaf)
        return None if unselected == "none" else leaf

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=with_compressed_leaves(is_leaf))


def map_with_masks(fn: Callable[[str, Any, Any], Any], masks: PyTree, params: PyTree) -> PyTree:
    """Maps ``fn(path, mask, leaf)`` over ``params`` where ``masks`` (``None`` = unselected) is not None.

    Leaves with a ``None`` mask pass through. The two trees must have the same structure once ``None``
    is treated as a leaf of ``masks``.

    Raises:
        ValueError: if the structures differ, naming the first differing path.
    """
    check_same_structure(masks, params, "masks", "params")

    def visit(path, mask, leaf):
        if mask is None:
            return leaf
        p = path_to_str(path)
        check_mask(p, mask, leaf)
        return fn(p, mask, leaf)

    return jax.tree_util.tree_map_with_path(visit, masks, params, is_leaf=is_none_or_compressed)


def replace_leaves(tree: PyTree, new: Mapping[str, Any]) -> PyTree:
    """``tree`` with the leaves at the path strings in ``new`` replaced by their values (compressed leaves whole).

    Paths not in ``new`` keep their leaf; a path in ``new`` that names no leaf is ignored.
    """

    def visit(kp, x):
        return new.get(path_to_str(kp), x)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_compressed_leaf)


def check_same_structure(a: PyTree, b: PyTree, name_a: str = "masks", name_b: str = "params") -> None:
    """Raises ``ValueError`` naming the differing paths when ``a`` (``None`` as leaf) and ``b`` differ."""
    pa = [p for p, _ in leaves_with_paths(a, is_none_or_compressed)]
    pb = [p for p, _ in leaves_with_paths(b, is_none_or_compressed)]
    if pa == pb and jax.tree.structure(a, is_leaf=is_none_or_compressed) == jax.tree.structure(b, is_leaf=is_none_or_compressed):
        return
    only_a = sorted(set(pa) - set(pb))
    only_b = sorted(set(pb) - set(pa))
    detail = []
    if only_a:
        detail.append(f"only in {name_a}: {only_a[:5]}")
    if only_b:
        detail.append(f"only in {name_b}: {only_b[:5]}")
    if not detail:
        detail.append(f"{name_a} has {len(pa)} leaves, {name_b} has {len(pb)}")
    raise ValueError(f"{name_a} and {name_b} trees do not match: " + "; ".join(detail))


def check_mask(path: str, mask: Any, leaf: Any) -> None:
    """Raises naming ``path`` unless ``mask`` is a boolean array of exactly ``leaf``'s shape.

    Static facts only (dtype and shape), so the check also runs under ``jit``. A float mask is refused
    (``0.1`` would read as "keep"), and so is any broadcasting (a scalar ``False`` or a ``(4, 1)`` mask would
    prune a whole layer or whole rows).

    Raises:
        TypeError: the mask is not an array of dtype bool, or the leaf is a compressed leaf.
        ValueError: the mask's shape differs from the leaf's.
    """
    if is_compressed_leaf(leaf):
        raise TypeError(f"leaf {path!r} is already compressed ({type(leaf).__name__}); masks apply to float leaves")
    dtype = getattr(mask, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.bool_:
        got = f"dtype {dtype}" if dtype is not None else type(mask).__name__
        raise TypeError(f"mask for leaf {path!r} must be a boolean array (True = keep), got {got}")
    if tuple(jnp.shape(mask)) != tuple(jnp.shape(leaf)):
        raise ValueError(
            f"mask for leaf {path!r} has shape {tuple(jnp.shape(mask))}, the leaf has {tuple(jnp.shape(leaf))}; "
            "masks must have the leaf's exact shape (no broadcasting)"
        )


def check_finite(path: str, leaf: Any) -> None:
    """Raises ``ValueError`` if a concrete (non-traced) leaf holds NaN or Inf; tracers are skipped."""
    if isinstance(leaf, jax.core.Tracer):
        return
    arr = np.asarray(leaf)
    if arr.size and not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)].ravel()[0]
        n = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"leaf {path!r} holds {n} non-finite value(s) (e.g. {bad}); clean the weights first")
