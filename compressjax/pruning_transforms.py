"""Training-time pruning: the Zhu & Gupta sparsity schedule and optax transforms that keep masks.

Chain the transforms AFTER the optimizer so they see its final updates::

    tx = optax.chain(optax.adamw(1e-3), gradual_pruning(schedule, update_every=100))
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)
    masks = masks_from_state(opt_state)                       # the masks now applied to params

Both transforms return ``update = -param`` at pruned positions, so ``param + update`` is exactly ``0.0``
(``p + (-p) == 0`` in IEEE arithmetic) whatever the optimizer did there (momentum, weight decay).

References:
    Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression",
    arXiv:1710.01878, 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from compressjax.pruning import (
    check_block,
    check_positive_int,
    check_scope,
    check_sparsity,
    check_tiles,
    magnitude_masks,
)
from compressjax.tree import (
    PyTree,
    Where,
    check_mask,
    check_same_structure,
    is_none,
    leaves_with_paths,
    map_selected,
    path_to_str,
    selected_leaves,
)

__all__ = [
    "polynomial_sparsity",
    "keep_masked",
    "gradual_pruning",
    "GradualPruningState",
    "masks_from_state",
]


def polynomial_sparsity(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    power: float = 3,
) -> Callable[[Any], jax.Array]:
    """Zhu & Gupta's polynomial schedule ``step -> sparsity`` (an optax-style schedule).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` for ``t0 <= t <= t1``; ``s_i`` before
    ``begin_step`` and ``s_f`` after ``end_step``. Works on Python ints and traced steps.

    Raises:
        ValueError: sparsities outside ``[0, 1]``, ``begin_step < 0``, ``end_step <= begin_step``,
            ``power <= 0``.
    """
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    if not isinstance(s_f, float) or not isinstance(s_i, float):
        raise TypeError("polynomial_sparsity takes Python floats for its sparsities")
    if not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"begin_step must be a non-negative int, got {begin_step!r}")
    if not isinstance(end_step, int) or end_step <= begin_step:
        raise ValueError(f"end_step must be an int > begin_step={begin_step}, got {end_step!r}")
    if not isinstance(power, Real) or not power > 0:
        raise ValueError(f"power must be > 0, got {power!r}")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
        return jnp.asarray(s_f + (s_i - s_f) * (1.0 - frac) ** power, jnp.float32)

    return schedule


def _masked_updates(masks: PyTree, updates: PyTree, params: PyTree | None) -> PyTree:
    """``update`` where kept; ``-param`` (or 0 without params) where pruned; unmasked leaves untouched."""
    check_same_structure(masks, updates, "masks", "updates")
    if params is None:
        return jax.tree.map(
            lambda m, u: u if m is None else jnp.where(m, u, jnp.zeros((), u.dtype)), masks, updates, is_leaf=is_none
        )
    return jax.tree.map(
        lambda m, u, p: u if m is None else jnp.where(m, u, (-p).astype(u.dtype)),
        masks,
        updates,
        params,
        is_leaf=is_none,
    )


def keep_masked(masks: PyTree) -> optax.GradientTransformation:
    """Keeps pruned weights exactly zero under any optimizer when chained after it.

    ``update()`` returns the incoming updates where the mask is ``True``; where it is ``False`` it returns
    ``-params`` when ``params`` are passed (so the weight becomes and stays exactly 0 even if it was not
    zero yet) and ``0`` otherwise (then apply the masks to the params first with ``apply_masks``).

    Args:
        masks: a mask tree from e.g. :func:`compressjax.magnitude_masks` (``None`` = leaf not masked).

    Raises:
        ValueError: if the masks do not match the params (at ``init``) or updates (at ``update``) tree, or a
            mask's shape differs from its leaf's (no broadcasting: a scalar ``False`` or a ``(4, 1)`` mask is
            refused, naming the path).
        TypeError: a mask that is not a boolean array, naming the path.
    """
    for path, mask in leaves_with_paths(masks, is_none):
        if mask is not None and getattr(mask, "dtype", None) != jnp.bool_:
            check_mask(path, mask, mask)  # raises the TypeError naming the path

    def init(params):
        _check_masks(masks, params, "params")
        return optax.EmptyState()

    def update(updates, state, params=None):
        _check_masks(masks, updates, "updates")
        return _masked_updates(masks, updates, params), state

    return optax.GradientTransformation(init, update)


def _check_masks(masks: PyTree, tree: PyTree, name: str) -> None:
    """Same structure, and at each masked leaf a boolean mask of the leaf's exact shape (static facts)."""
    check_same_structure(masks, tree, "masks", name)
    flat_t = dict(leaves_with_paths(tree, is_none))
    for path, mask in leaves_with_paths(masks, is_none):
        if mask is not None:
            check_mask(path, mask, flat_t[path])


class GradualPruningState(NamedTuple):
    """State of :func:`gradual_pruning`: the step ``count`` (int32) and the current ``masks`` tree."""

    count: jax.Array
    masks: PyTree


def gradual_pruning(
    schedule: Callable[[Any], Any] | float,
    *,
    update_every: int,
    scope: str = "global",
    where: Where = None,
    block: tuple[int, int] | None = None,
) -> optax.GradientTransformation:
    """Gradual magnitude pruning (Zhu & Gupta 2017) as an optax transform; chain it after the optimizer.

    At every step whose ``count % update_every == 0`` the masks are recomputed with
    :func:`compressjax.magnitude_masks` at ``schedule(count)`` from the weights the step would produce
    (``params + updates``, with already-pruned weights counted as 0 so they stay pruned while the
    sparsity does not decrease). The recomputation runs under ``lax.cond``: one trace, no retracing, and
    only the steps that prune pay for it. On every step the returned updates are ``-param`` at pruned
    positions, so pruned weights are exactly zero after ``optax.apply_updates``.

    Read the masks with :func:`masks_from_state` (or ``state.masks`` of the ``GradualPruningState``).
    Masks start all-True at ``init``.

    Args:
        schedule: ``step -> sparsity`` (e.g. :func:`polynomial_sparsity`) or a constant float.
        update_every: recompute the masks every this many steps (positive int).
        scope: ``"global"`` or ``"layer"`` (see :func:`compressjax.magnitude_masks`).
        where: the leaf selector.
        block: ``(r, c)`` prunes whole ``r x c`` tiles of the last two axes (see
            :func:`compressjax.magnitude_masks`); the schedule's sparsity is then counted in tiles.

    Raises:
        ValueError: non-positive ``update_every``, unknown scope, ``update()`` called without params,
            ``where`` selecting nothing or a leaf that does not tile into ``block`` (at ``init``), a
            malformed ``block``.
    """
    try:
        check_positive_int("update_every", update_every)
    except TypeError as e:
        raise ValueError(str(e)) from None  # documented as ValueError since the first release
    check_scope(scope)
    block = check_block(block)
    if not callable(schedule):
        constant = check_sparsity(schedule, "schedule")

        def schedule(step):
            del step
            return jnp.asarray(constant, jnp.float32)

    def init(params):
        selected_leaves(params, where)  # raises for an empty selection or non-float leaves, naming them
        if block is not None:  # a leaf that does not tile raises here, naming it, not at the first update
            check_tiles(params, where, block)
        masks = map_selected(lambda p, x: jnp.ones(jnp.shape(x), jnp.bool_), params, where)
        return GradualPruningState(jnp.zeros((), jnp.int32), masks)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_pruning needs params: call tx.update(grads, opt_state, params)")
        count = state.count

        def recompute(_):
            nxt = jax.tree.map(
                lambda m, u, p: None if m is None else jnp.where(m, p + u.astype(p.dtype), jnp.zeros((), p.dtype)),
                state.masks,
                updates,
                params,
                is_leaf=is_none,
            )
            sparsity = jnp.asarray(schedule(count), jnp.float32)
            return magnitude_masks(nxt, sparsity, scope=scope, where=_same_leaves(state.masks), block=block)

        masks = lax.cond(count % update_every == 0, recompute, lambda _: state.masks, None)
        new_updates = _masked_updates(masks, updates, params)
        return new_updates, GradualPruningState(count + 1, masks)

    return optax.GradientTransformation(init, update)


def _same_leaves(masks: PyTree) -> Callable[[str, Any], bool]:
    """A ``where`` selecting exactly the leaves that hold a mask (paths are taken from the mask tree)."""
    paths = {
        path_to_str(p) for p, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0] if m is not None
    }
    return lambda path, leaf: path in paths and leaf is not None


def masks_from_state(opt_state: Any) -> PyTree:
    """The masks of the first :class:`GradualPruningState` found inside an optax state (chains included).

    Raises:
        ValueError: if the state holds no ``GradualPruningState``.
    """
    found = _find_state(opt_state)
    if found is None:
        raise ValueError("opt_state holds no GradualPruningState; was gradual_pruning part of the optimizer?")
    return found.masks


def _find_state(node: Any) -> GradualPruningState | None:
    if isinstance(node, GradualPruningState):
        return node
    if isinstance(node, dict):
        children = list(node.values())
    elif isinstance(node, tuple | list):
        children = list(node)
    else:
        return None
    for child in children:
        hit = _find_state(child)
        if hit is not None:
            return hit
    return None
