"""The sequential (layer by layer) mode of GPTQ and SparseGPT, and the ``compress`` contract.

The ``compress`` contract (shared by :func:`layerwise` and ``sequential``): ``compress(params, hessians)``
returns either

* the new params (a tree of the same structure as ``params``, compressed leaves such as ``QArray`` counting
  as one leaf), e.g. ``lambda p, h: gptq(p, h, rules)``; or
* a :class:`~compressjax.oneshot.Pruned` ``(params, masks)``, the type :func:`~compressjax.sparsegpt`
  returns, e.g. ``lambda p, h: sparsegpt(p, h, 0.5)``; wrap your own masks as ``Pruned(params, masks)``.

The kind of result is read from its type, never from ``isinstance(out, tuple)`` (params may themselves be
a tuple). :func:`split_result` implements the rule; anything else is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from compressjax import tree
from compressjax.hessians import collect_hessians
from compressjax.oneshot._sparsegpt import Pruned

__all__ = ["layerwise", "split_result"]


def split_result(params: Any, out: Any, what: str = "compress") -> tuple[Any, Any]:
    """``(new_params, masks or None)`` from what a ``compress`` callable returned (see the module docstring).

    Raises:
        ValueError: ``out`` is neither a :class:`Pruned` nor a tree of the structure of ``params`` (e.g. a
            plain ``(params, masks)`` tuple: return ``Pruned(params, masks)`` instead), naming ``what``.
    """
    if isinstance(out, Pruned):
        return out.params, out.masks
    is_leaf = tree.with_compressed_leaves(None)
    want = jax.tree_util.tree_structure(params, is_leaf=is_leaf)
    got = jax.tree_util.tree_structure(out, is_leaf=is_leaf)
    if got != want:
        hint = (" (a plain tuple is not read as (params, masks): return compressjax.oneshot.Pruned(params, masks))"
                if isinstance(out, tuple) else "")
        raise ValueError(f"{what} must return params of the same tree structure as its input, or Pruned(params, masks); got {got}, "
                         f"expected {want}{hint}")
    return out, None


def layerwise(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    compress: Callable[[Any, Any], Any],
    *,
    stages: Sequence[tree.Where],
    row_mask: Callable[[Any], Any] | None = None,
) -> Any:
    """Compresses the model stage by stage, each stage calibrated on the model as compressed so far.

    For each stage (a ``where`` selector, e.g. ``"layer_0/"`` for one transformer block), the Hessians of
    that stage's leaves are collected with the params compressed by the earlier stages (``apply_fn`` gets
    float params: ``QArray`` leaves are dequantized for it), so later layers see, and correct for, the
    errors of earlier ones, as in the papers' sequential mode. Then ``compress(params, hessians)`` returns the
    new params, or a :class:`Pruned` ``(params, masks)`` (see the module docstring: the result kind is read
    from its type, so params that are themselves a 2-tuple are never mistaken for ``(params, masks)``).

    Args:
        apply_fn: ``(params, batch) -> output`` (see :func:`collect_hessians`).
        params: the params pytree.
        batches: the calibration batches (read once per stage; an iterator is materialised first).
        compress: e.g. ``lambda p, h: gptq(p, h, rules)`` or ``lambda p, h: sparsegpt(p, h, 0.5)``.
        stages: ``where`` selectors, in model order; a stage's leaves should not have been compressed by an
            earlier stage.
        row_mask: as in :func:`collect_hessians`.

    Returns:
        The compressed params, or a :class:`Pruned` ``(params, masks)`` when ``compress`` returns masks (the masks of all stages
        merged: a keep-mask at every pruned leaf, ``None`` elsewhere).

    Raises:
        ValueError: no stages, a stage that selects nothing, ``compress`` returning something else than params
            (same tree structure) or a ``Pruned``, plus everything :func:`collect_hessians` and the solver raise.
        TypeError: a non-callable ``compress``.
    """
    if not callable(compress):
        raise TypeError(f"compress must be a callable (params, hessians) -> params or (params, masks), got {compress!r}")
    if isinstance(stages, str) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"stages must be a non-empty sequence of `where` selectors, got {stages!r}")
    batches = list(batches)
    masks = None
    for i, stage in enumerate(stages):
        try:
            hess = collect_hessians(apply_fn, params, batches, where=stage, row_mask=row_mask)
        except ValueError as e:
            raise ValueError(f"stage {i} (where={stage!r}): {e}") from e
        params, stage_masks = split_result(params, compress(params, hess), f"compress (stage {i}, where={stage!r})")
        if stage_masks is not None:
            masks = stage_masks if masks is None else _merge(masks, stage_masks)
    return params if masks is None else Pruned(params, masks)


def _merge(a: Any, b: Any) -> Any:
    is_none_or_compressed = lambda x: x is None  # noqa: E731
    return jax.tree_util.tree_map(lambda x, y: x if y is None else y, a, b, is_leaf=is_none_or_compressed)
