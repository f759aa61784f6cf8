"""Training the centroids: decoding, optax-friendly splitting, distillation transform, reassignment."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from compressjax import tree
from compressjax.codebook._codebook import Codebook
from compressjax.codebook._kmeans import _rows, _unrows
from compressjax.quantization import dequantize_params

# ------------------------------------------------------------------------------------------------ training


def cast_centroids(params: Any, dtype: Any = jnp.float16) -> Any:
    """Every :class:`Codebook`'s centroids cast to ``dtype`` (float16 halves them in memory and on disk).

    ``save`` stores centroids in their own dtype, so this is how a file gets float16 codebooks; decoded
    weights keep each Codebook's ``dtype``.
    """
    return jax.tree.map(lambda x: x.astype_centroids(dtype) if isinstance(x, Codebook) else x, params,
                        is_leaf=tree.is_compressed_leaf)


# The forward-pass view of a compressed tree is one function, ``dequantize_params`` (every compressed leaf
# decodes itself); ``decode_params`` is the same object under the name the weight-sharing API shipped with.
decode_params = dequantize_params


def split_centroids(params: Any, *, train_others: bool = False) -> tuple[Any, Any]:
    """Splits a tree with :class:`Codebook` leaves into ``(trainable, frozen)`` for optax.

    ``trainable`` has the structure of ``params`` with each Codebook replaced by its centroids array and
    every other leaf replaced by ``None`` (or, with ``train_others``, kept when it is a floating-point
    array, e.g. biases and norms). ``frozen`` is ``params`` itself. Differentiate and optimise
    ``trainable`` only (optax skips ``None``), and rebuild with :func:`merge_centroids`; the integer indices
    never reach ``jax.grad`` or the optimizer.
    """
    def visit(x):
        if isinstance(x, Codebook):
            return jnp.asarray(x.centroids)
        if train_others and tree.is_float_array(x) and not tree.is_compressed_leaf(x):
            return x
        return None

    return jax.tree.map(visit, params, is_leaf=tree.is_compressed_leaf), params


def merge_centroids(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_centroids`: ``frozen`` with its centroids (and trained others) from ``trainable``.

    Raises:
        ValueError: if the trees do not match (naming the paths).
    """
    def visit(kp, t, f):
        if isinstance(f, Codebook):
            if t is None:
                raise ValueError(f"leaf {tree.path_to_str(kp)!r}: trainable tree holds no centroids for this Codebook")
            return f.with_centroids(t)
        return f if t is None else t

    try:
        return jax.tree_util.tree_map_with_path(visit, trainable, frozen, is_leaf=lambda x: x is None or tree.is_compressed_leaf(x))
    except ValueError as e:
        if "leaf " in str(e) and "trainable tree" in str(e):
            raise
        raise ValueError(f"the trainable tree does not match the frozen params: {e}") from e


def codebook_student(frozen: Any, transform: Callable[[Any, jax.Array], Any] | None = None) -> Callable[[Any, jax.Array], Any]:
    """A ``student_transform`` for :func:`~compressjax.make_distill_step` training centroids only.

    The distillation state's params are ``split_centroids(params)[0]``; each step merges them into
    ``frozen``, decodes every Codebook (``jnp.take``, so each centroid gets the summed gradient of its
    weights) and applies ``transform(decoded, step)`` when given.
    """
    def student_transform(trainable, step):
        decoded = dequantize_params(merge_centroids(trainable, frozen))
        return decoded if transform is None else transform(decoded, step)

    return student_transform


@functools.partial(jax.jit, static_argnames=("per_channel", "zero_reserved", "shape", "layer_axes"))
def _nearest(x, centroids, valid, *, per_channel, zero_reserved, shape, layer_axes=()):
    """The index of the nearest centroid of each weight's codebook (``int32``, ``shape``); ``valid`` False:
    the reserved zero."""
    rows = _rows(x.astype(jnp.float32), per_channel, layer_axes)
    c = centroids.astype(jnp.float32).reshape(rows.shape[0], -1)
    if zero_reserved:
        c = c[:, 1:]
    order = jnp.argsort(c, axis=1)
    cs = jnp.take_along_axis(c, order, axis=1)
    b = (cs[:, :-1] + cs[:, 1:]) * 0.5
    a = jax.vmap(lambda bb, v: jnp.searchsorted(bb, v, side="left"))(b, rows)
    a = jnp.take_along_axis(order, a, axis=1)
    if zero_reserved:
        a = jnp.where(_rows(valid, per_channel, layer_axes), a + 1, 0)
    return _unrows(a, shape, per_channel, layer_axes)


def reassign_indices(params: Any, reference: Any) -> Any:
    """Moves every weight to its nearest (updated) centroid: optional, after training the centroids.

    Han et al. keep the assignment fixed while fine-tuning (the default here: simply do not call this);
    with the float weights the codebooks were made from (``reference``, same structure as ``params``),
    this recomputes each index as the nearest centroid of the weight's codebook. Pruned weights (index 0
    of a ``zero_reserved`` codebook) stay pruned.

    Raises:
        ValueError: if ``reference`` does not hold an array of the right shape at each Codebook's path.
    """
    refs = dict(tree.leaves_with_paths(reference, lambda x: x is None or tree.is_compressed_leaf(x)))

    def visit(kp, x):
        if not isinstance(x, Codebook):
            return x
        p = tree.path_to_str(kp)
        r = refs.get(p)
        if r is None or not hasattr(r, "shape") or tuple(r.shape) != x.shape:
            got = None if r is None else getattr(r, "shape", type(r).__name__)
            raise ValueError(f"leaf {p!r}: reference weights of shape {x.shape} needed to reassign, got {got}")
        tree.check_finite(p, r)
        if x.size == 0:
            return x
        valid = x.index_array() != 0 if x.zero_reserved else jnp.ones(x.shape, bool)
        a = _nearest(jnp.asarray(r), x.centroids, valid, per_channel=x.per_channel, zero_reserved=x.zero_reserved,
                     shape=x.shape, layer_axes=x.layer_axes)
        return x.with_indices(a)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=tree.is_compressed_leaf)


