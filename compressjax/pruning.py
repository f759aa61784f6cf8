"""Pruning masks: magnitude and score (global or per layer), N:M, whole channels; apply and summarise.

A *mask tree* has the structure of the params tree with a boolean array (``True`` = keep) at every
selected leaf and ``None`` elsewhere (see ``compressjax.tree`` for the ``where`` selector). Every mask
function is a pure function that runs eagerly or under ``jax.jit``.

Counts are exact: pruning a fraction ``s`` of ``n`` weights removes exactly ``k = round(s * n)`` of them,
where ``s`` is read as a float32 (a Python float is rounded to float32 first, as ``jax.jit`` does with it)
and ``k`` is the exact real product ``float32(s) * n`` rounded half to even. A Python float is counted in
Python, an array or traced sparsity in-graph (``compressjax.radix_select.round_half_even_count``), with the
same result, so ``magnitude_masks(p, s)`` and ``jax.jit(magnitude_masks)(p, s)`` prune the same count even
at exact half-way cases, and changing the sparsity under ``jax.jit`` never retraces. Ties at the threshold are pruned in a fixed order: leaf order (``jax.tree_util``
flattening), then row-major flat index, the earliest first, i.e. the order of a stable sort of the
concatenated magnitudes.

The global threshold is found by an exact radix select over float32 bit patterns with a fixed number of
counting passes (``compressjax.radix_select``): no sort and no concatenation of the parameters. Its layout
follows the backend of the leaves (chunked passes on CPU, whole-leaf passes on GPU and TPU) with the same
masks on every backend; the environment variable ``COMPRESSJAX_SELECT_STRATEGY`` (``chunked``, ``whole``,
``fused`` or ``auto``) overrides the choice.

Training-time transforms (schedules, ``keep_masked``, ``gradual_pruning``) live in
``compressjax.pruning_transforms``.

References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015.
    Mishra et al., "Accelerating Sparse Deep Neural Networks" (2:4 sparsity), arXiv:2104.08378, 2021.
    Li et al., "Pruning Filters for Efficient ConvNets" (channel pruning by norm), ICLR 2017.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.radix_select import exact_keep_masks, resolve_strategy, round_half_even_count
from compressjax.tree import (
    PyTree,
    Where,
    check_finite,
    is_compressed_leaf,
    is_none,
    leaves_with_paths,
    map_with_masks,
    path_to_str,
    selected_leaves,
    selector,
    with_compressed_leaves,
)

__all__ = [
    "magnitude_masks",
    "score_masks",
    "nm_masks",
    "channel_masks",
    "apply_masks",
    "sparsity_summary",
    "SparsitySummary",
    "LeafSparsity",
]

SCOPES = ("global", "layer")


def check_scope(scope: Any) -> str:
    """Raises ``ValueError`` unless ``scope`` is one of :data:`SCOPES`."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int; ``TypeError`` for a bool or non-integer, ``ValueError`` for ``value <= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------- helpers
def check_sparsity(sparsity: Any, name: str = "sparsity") -> float | jax.Array:
    """Validates a sparsity: a Python float is checked; an array is checked when concrete.

    A traced sparsity cannot be checked; it is clipped to ``[0, 1]`` and NaN counts as 0 (no pruning).

    Raises:
        TypeError: if it is a bool, not a real number or not a scalar.
        ValueError: if a concrete value is NaN or outside ``[0, 1]``.
    """
    if isinstance(sparsity, bool | np.bool_):
        raise TypeError(f"{name} must be a float in [0, 1], got the bool {sparsity!r}")
    if isinstance(sparsity, Real):
        s = float(sparsity)
        if not 0.0 <= s <= 1.0:  # also catches NaN
            raise ValueError(f"{name} must be in [0, 1], got {sparsity!r}")
        return s
    arr = sparsity if isinstance(sparsity, jax.Array | np.ndarray) else None
    if arr is None or arr.ndim != 0:
        raise TypeError(f"{name} must be a float or a scalar array, got {sparsity!r}")
    if not isinstance(arr, jax.core.Tracer):
        s = float(arr)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {s!r}")
    s = jnp.asarray(arr, jnp.float32)
    return jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))


def prune_count(sparsity: float | jax.Array, n: int) -> int | jax.Array:
    """``k = round_half_even(float32(sparsity) * n)``, exact: a Python int for a float sparsity, else int32.

    Both branches read the sparsity as a float32 and round the exact real product, so a Python float and
    the same value traced under ``jax.jit`` (where it becomes a float32) give the same count.
    """
    if isinstance(sparsity, float):
        return round(Fraction(float(np.float32(sparsity))) * n)  # exact; Fraction rounds half to even
    return round_half_even_count(sparsity, n)


def _rebuild(tree: PyTree, where: Where, new_leaves: list[Any], is_leaf=None) -> PyTree:
    """A tree like ``tree`` with ``new_leaves`` (in flattening order) at the selected leaves, None elsewhere."""
    pred = selector(where)
    it = iter(new_leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=with_compressed_leaves(is_leaf))
    out = [next(it) if pred(path_to_str(p), leaf) else None for p, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames="strategy")
def _global_flat_masks(leaves: list[jax.Array], k: jax.Array, strategy: str) -> list[jax.Array]:
    return exact_keep_masks(leaves, k, strategy=strategy)


def check_block(block: Any) -> tuple[int, int] | None:
    """``None`` or a pair of positive ints (the tile over the last two axes), else ``ValueError``."""
    if block is None:
        return None
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)
    ):
        raise ValueError(f"block must be None or a pair of positive ints (rows, columns), got {block!r}")
    return int(block[0]), int(block[1])


def _check_tile(path: str, shape: tuple[int, ...], block: tuple[int, int]) -> None:
    r, c = block
    if len(shape) < 2 or shape[-2] % r or shape[-1] % c:
        raise ValueError(
            f"leaf {path!r} of shape {tuple(shape)} does not tile into {r}x{c} blocks: its last two axes must "
            f"be multiples of {block}"
        )


def check_tiles(params: PyTree, where: Where, block: tuple[int, int]) -> None:
    """Raises ``ValueError`` naming the first selected leaf whose last two axes are not multiples of ``block``."""
    for path, leaf in selected_leaves(params, where):
        _check_tile(path, jnp.shape(leaf), block)


def _block_energy(path: str, leaf: Any, block: tuple[int, int]) -> jax.Array:
    """Sum of squares of each ``block`` tile of the last two axes (float32): the blocks' L2 norms, squared."""
    x = jnp.asarray(leaf)
    _check_tile(path, x.shape, block)
    r, c = block
    *lead, a, b = x.shape
    tiles = jnp.square(x.astype(jnp.float32)).reshape(*lead, a // r, r, b // c, c)
    return jnp.sum(tiles, axis=(-3, -1))


def _expand_blocks(mask: jax.Array, block: tuple[int, int]) -> jax.Array:
    return jnp.repeat(jnp.repeat(mask, block[0], axis=-2), block[1], axis=-1)


def _masks_from_scores(
    tree: PyTree, sparsity: Any, scope: str, where: Where, what: str, block: tuple[int, int] | None = None
) -> PyTree:
    check_scope(scope)
    s = check_sparsity(sparsity)
    chosen = selected_leaves(tree, where)
    for path, leaf in chosen:
        check_finite(path, leaf)
        if what == "scores" and not isinstance(leaf, jax.core.Tracer) and np.any(np.asarray(leaf) < 0):
            bad = np.asarray(leaf)[np.asarray(leaf) < 0].ravel()[0]
            raise ValueError(f"scores must be non-negative; leaf {path!r} holds {bad}")
    if block is None:
        leaves = [jnp.asarray(leaf) for _, leaf in chosen]
    else:  # whole tiles compete by their L2 norm; one tile is one unit of the count
        leaves = [_block_energy(path, leaf, block) for path, leaf in chosen]
    # The layout (chunked on CPU, whole-leaf on accelerators) is chosen here, outside the jit, from the
    # leaves' backend and COMPRESSJAX_SELECT_STRATEGY, so that it is part of the jit cache key.
    strategy = resolve_strategy("auto", leaves)
    if scope == "global":
        n = sum(int(x.size) for x in leaves)
        masks = _global_flat_masks(leaves, jnp.asarray(prune_count(s, n), jnp.int32), strategy)
    else:
        masks = [
            _global_flat_masks([x], jnp.asarray(prune_count(s, int(x.size)), jnp.int32), strategy)[0] for x in leaves
        ]
    if block is not None:
        masks = [_expand_blocks(m, block) for m in masks]
    return _rebuild(tree, where, masks)


# ------------------------------------------------------------------------------------------ public masks
def magnitude_masks(
    params: PyTree,
    sparsity: float | jax.Array,
    *,
    scope: str = "global",
    where: Where = None,
    block: tuple[int, int] | None = None,
) -> PyTree:
    """Keep-masks that prune the smallest-magnitude weights, with an exact count.

    Args:
        params: any params pytree (linen dict, ``nnx.State``, equinox module, dict with ``None`` leaves).
        sparsity: fraction to prune, in ``[0, 1]``; a Python float or a (possibly traced) scalar array.
            A traced value is clipped to ``[0, 1]`` and NaN prunes nothing (it cannot raise under jit).
        scope: ``"global"`` prunes exactly ``round(sparsity * n)`` of the ``n`` selected weights across
            all selected leaves together (one threshold); ``"layer"`` prunes ``round(sparsity * n_leaf)``
            in each leaf.
        where: the leaf selector (default: float leaves with ``ndim >= 2``).
        block: ``(r, c)`` prunes whole ``r x c`` tiles of the last two axes, smallest L2 norm first, instead
            of single weights (block sparsity: Narang et al., "Block-Sparse Recurrent Neural Networks",
            2017). The count is exact in tiles: ``round(sparsity * tiles)``. Every selected leaf's last two
            axes must be multiples of ``(r, c)``. ``(1, 1)`` gives the same masks as ``None``. Tiles make
            the survivors' positions cheaper to store: neighbours in a row (``(1, c)``) or rows that repeat
            the one above (``(r, 1)``), which the file's entropy coder stores for a fraction of the bits.

    Returns:
        A tree like ``params`` with a bool array (``True`` = keep) at each selected leaf, ``None`` elsewhere.
        Ties at the threshold are pruned in leaf order, then row-major index (see module docstring).
        bf16/f16 leaves are compared as float32 magnitudes.

    Raises:
        ValueError: sparsity NaN or outside ``[0, 1]`` (Python float or concrete array), unknown scope,
            ``where`` selecting nothing, NaN/Inf weights in an eager call (naming the leaf path), a
            malformed ``block`` or a leaf that does not tile into it.
        TypeError: a selected leaf that is not floating point.
    """
    return _masks_from_scores(params, sparsity, scope, where, "params", check_block(block))


def score_masks(scores: PyTree, sparsity: float | jax.Array, *, scope: str = "global", where: Where = None) -> PyTree:
    """Like :func:`magnitude_masks` for any non-negative importance scores (prune the smallest).

    Use it to bring your own criterion, e.g. the first-order saliency ``|w * g|`` (Molchanov et al.,
    "Importance Estimation for Neural Network Pruning", CVPR 2019). ``scores`` has the structure of the
    params (unselected leaves may be anything, e.g. ``None``). Negative scores raise in an eager call; under
    jit they are compared by absolute value.
    """
    return _masks_from_scores(scores, sparsity, scope, where, "scores")


def nm_masks(params: PyTree, n: int, m: int, *, axis: int = -2, where: Where = None) -> PyTree:
    """N:M structured masks: keep the ``n`` largest-magnitude weights in every ``m`` consecutive ones.

    Groups run along ``axis``; the default ``-2`` is the input (contraction) axis of Flax ``Dense``
    ``(in, out)`` and ``Conv`` ``(..., in, out)`` kernels, the axis 2:4 sparse tensor cores need. Ties
    keep the later element (prune the earliest, as in the magnitude masks).

    Raises:
        ValueError: ``n > m``, non-positive ``n``/``m``, an axis length not divisible by ``m`` or an axis
            out of range (naming the leaf path and shape), NaN/Inf weights in an eager call.
        TypeError: non-integer ``n``/``m``, non-float selected leaves.

    References:
        Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378, 2021.
    """
    n, m = check_positive_int("n", n), check_positive_int("m", m)
    if n > m:
        raise ValueError(f"n must be <= m, got n={n}, m={m}")
    masks = []
    for path, leaf in _leaves_with_axis(params, where, axis):
        shape = tuple(leaf.shape)
        if shape[axis] % m:
            raise ValueError(
                f"leaf {path!r}: length {shape[axis]} of axis {axis} (shape {shape}) is not divisible by m={m}"
            )
        masks.append(_nm_mask(jnp.asarray(leaf), n, m, axis))
    return _rebuild(params, where, masks)


def _leaves_with_axis(params: PyTree, where: Where, axis: int) -> list[tuple[str, Any]]:
    """The selected, finite leaves of ``params``, checked to have ``axis`` (for N:M and channel masks)."""
    chosen = selected_leaves(params, where)
    for path, leaf in chosen:
        check_finite(path, leaf)
        if not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(f"leaf {path!r} with shape {tuple(leaf.shape)} has no axis {axis}")
    return chosen


def _nm_mask(x: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    a = jnp.moveaxis(jnp.abs(x.astype(jnp.float32)), axis, -1)
    g = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    # rank_i = #{j : a_j > a_i, or a_j == a_i and j > i}: O(m^2) per group, fine for small m.
    ai, aj = g[..., :, None], g[..., None, :]
    idx = jnp.arange(m)
    later = idx[None, :] > idx[:, None]
    rank = jnp.sum((aj > ai) | ((aj == ai) & later), axis=-1)
    keep = (rank < n).reshape(a.shape)
    return jnp.moveaxis(keep, -1, axis)


def channel_masks(params: PyTree, sparsity: float | jax.Array, *, axis: int = -1, where: Where = None) -> PyTree:
    """Structured masks that prune whole channels along ``axis`` by L2 norm, per leaf.

    Each selected leaf loses exactly ``round(sparsity * C)`` of its ``C`` channels (the ones with the
    smallest L2 norm over all other axes; ties pruned lowest index first). The mask is constant along every
    other axis. The default ``-1`` is the output axis of Flax ``Dense``/``Conv`` kernels.

    References:
        Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017.
    """
    s = check_sparsity(sparsity)
    masks = []
    for _, leaf in _leaves_with_axis(params, where, axis):
        x = jnp.moveaxis(jnp.asarray(leaf).astype(jnp.float32), axis, -1)
        norms = jnp.sqrt(jnp.sum(jnp.square(x.reshape(-1, x.shape[-1])), axis=0))
        k = jnp.asarray(prune_count(s, norms.size), jnp.int32)
        keep = _global_flat_masks([norms], k, resolve_strategy("auto", [norms]))[0]
        full = jnp.broadcast_to(keep, x.shape)
        masks.append(jnp.moveaxis(full, -1, axis))
    return _rebuild(params, where, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the pruned weights: ``where(mask, w, 0)`` at masked leaves; ``None`` masks pass through.

    Raises:
        ValueError: if the mask tree does not match the params tree or a mask's shape differs from its
            leaf's (no broadcasting), naming the path.
        TypeError: a mask that is not boolean (a float ``0.1`` is not "keep"), or a mask on an already
            compressed leaf, naming the path.
    """

    def apply(path, mask, leaf):
        del path  # map_with_masks checked dtype and shape (tree.check_mask)
        return jnp.where(mask, leaf, jnp.zeros((), jnp.result_type(leaf)))

    return map_with_masks(apply, masks, params)


# ------------------------------------------------------------------------------------------- summaries
@dataclasses.dataclass(frozen=True)
class LeafSparsity:
    """Zero count of one leaf (for masks: the pruned count)."""

    path: str
    size: int
    zeros: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
    """Per-leaf and total zero counts; ``str()`` gives a readable table."""

    leaves: tuple[LeafSparsity, ...]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.leaves)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.leaves)

    @property
    def fraction(self) -> float:
        return self.zeros / self.size if self.size else 0.0

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{path: {"size", "zeros", "fraction"}}`` plus a ``"total"`` entry (JSON-serialisable)."""
        out = {r.path: {"size": r.size, "zeros": r.zeros, "fraction": r.fraction} for r in self.leaves}
        out["total"] = {"size": self.size, "zeros": self.zeros, "fraction": self.fraction}
        return out

    def __str__(self) -> str:
        width = max([len("total")] + [len(r.path) for r in self.leaves])
        lines = [f"{'leaf':<{width}}  {'size':>12}  {'zeros':>12}  {'sparsity':>8}"]
        for r in (*self.leaves, LeafSparsity("total", self.size, self.zeros)):
            if r.path == "total":
                lines.append("-" * len(lines[0]))
            lines.append(f"{r.path:<{width}}  {r.size:>12,}  {r.zeros:>12,}  {r.fraction:>8.2%}")
        return "\n".join(lines)


def sparsity_summary(params_or_masks: PyTree, where: Where = None) -> SparsitySummary:
    """Counts zeros per leaf and in total (eager; reads the values back to the host).

    Bool leaves are read as masks (``False`` = pruned) and always counted; other leaves are counted when
    ``where`` selects them (default: float leaves with ``ndim >= 2``). ``None`` leaves are skipped. A
    :class:`~compressjax.QArray` is one leaf (its scales are never reported): it is always counted, by the
    zeros of its dequantized values; other compressed leaves are skipped.

    Raises:
        ValueError: if nothing is selected.
    """
    from compressjax.qarray import QArray  # deferred: qarray sits above pruning in the layering
    from compressjax.quantization import dequantize

    pred = selector(where)
    rows = []
    for path, leaf in leaves_with_paths(params_or_masks, is_none):
        if isinstance(leaf, QArray):
            leaf = dequantize(leaf, path=path)
        elif leaf is None or is_compressed_leaf(leaf) or not hasattr(leaf, "dtype"):
            continue
        elif not (jnp.dtype(leaf.dtype) == jnp.bool_ or pred(path, leaf)):
            continue
        arr = np.asarray(leaf)
        zeros = int(arr.size - np.count_nonzero(arr))
        rows.append(LeafSparsity(path, int(arr.size), zeros))
    if not rows:
        raise ValueError(f"sparsity_summary: where={where!r} selects no leaf")
    return SparsitySummary(tuple(rows))

