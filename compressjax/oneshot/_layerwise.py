"""The sequential (layer by layer) mode of GPTQ and SparseGPT."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from compressjax import tree
from compressjax.hessians import collect_hessians

__all__ = ["layerwise"]


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
    new params, or ``(params, masks)``.

    Args:
        apply_fn: ``(params, batch) -> output`` (see :func:`collect_hessians`).
        params: the params pytree.
        batches: the calibration batches (read once per stage; an iterator is materialised first).
        compress: e.g. ``lambda p, h: gptq(p, h, rules)`` or ``lambda p, h: sparsegpt(p, h, 0.5)``.
        stages: ``where`` selectors, in model order; a stage's leaves should not have been compressed by an
            earlier stage.
        row_mask: as in :func:`collect_hessians`.

    Returns:
        The compressed params, or ``(params, masks)`` when ``compress`` returns masks (the masks of all stages
        merged: a keep-mask at every pruned leaf, ``None`` elsewhere).

    Raises:
        ValueError: no stages, a stage that selects nothing, ``compress`` returning something else than params
            or ``(params, masks)``, plus everything :func:`collect_hessians` and the solver raise.
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
        out = compress(params, hess)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(f"compress must return params or (params, masks), got a tuple of {len(out)}")
            params, stage_masks = out
            masks = stage_masks if masks is None else _merge(masks, stage_masks)
        else:
            params = out
    return params if masks is None else (params, masks)


def _merge(a: Any, b: Any) -> Any:
    is_none = lambda x: x is None  # noqa: E731
    return jax.tree_util.tree_map(lambda x, y: x if y is None else y, a, b, is_leaf=is_none)
