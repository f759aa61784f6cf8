"""Wanda: pruning by weight magnitude times input activation norm (Sun et al., 2024)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from compressjax.oneshot._common import hessian_items, map_hessian_leaves
from compressjax.oneshot._solver import _nm_keep
from compressjax.oneshot._sparsegpt import check_nm

__all__ = ["wanda_masks"]


@partial(jax.jit, static_argnames=("k", "n", "m"))
def _wanda_2d(w2d, h, k, n, m):
    score = jnp.abs(w2d.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))[:, None]
    if m:
        d_in, d_out = score.shape
        g = score.reshape(d_in // m, m, d_out)
        return jax.vmap(lambda s: _nm_keep(s, n))(g).reshape(d_in, d_out)
    # Per output channel (column): prune exactly the k smallest; a stable sort prunes the earliest ties.
    order = jnp.argsort(score, axis=0, stable=True)
    rank = jnp.argsort(order, axis=0, stable=True)
    return rank >= k


@partial(jax.jit, static_argnames=("k", "n", "m"))
def _wanda_3d(w3, h3, k, n, m):
    # Slices are independent and the score is elementwise plus a per-column sort: vmap is exact here.
    return jax.vmap(lambda w, h: _wanda_2d(w, h, k, n, m))(w3, h3)


def wanda_masks(params: Any, hessians: Any, sparsity: float | None, *, n: int | None = None, m: int | None = None) -> Any:
    """Keep-masks by the Wanda score ``|w_jk| * ||x_j||_2``, compared within each output channel.

    ``||x_j||_2 = sqrt(H_jj)`` comes from the Hessian (the input Gram matrix). Unstructured: each output
    channel loses exactly ``round(sparsity * d_in)`` weights (ties: the earliest input pruned). ``n``/``m``:
    the ``n`` highest scores of every ``m`` consecutive entries of the last input axis are kept (ties keep
    the later one, as ``nm_masks``). No weight is updated: apply the masks with ``apply_masks``. A stacked
    kernel with a stacked Hessian (``layer_axes``, ``groups``) is scored per layer slice (and group) on its own
    Hessian; the mask keeps the kernel's stacked layout.

    Args:
        params: the params pytree.
        hessians: from :func:`collect_hessians` (the selection), or a tree of ``(d_in, d_in)`` arrays.
        sparsity: fraction to prune per output channel, in ``[0, 1]`` (``None`` with ``n``/``m``).
        n, m: N:M sparsity (``n`` kept of every ``m``).

    Returns:
        A tree like ``params`` with a bool keep-mask at each leaf with a Hessian and ``None`` elsewhere (the
        ``magnitude_masks`` convention).

    Raises:
        ValueError/TypeError: as :func:`sparsegpt` for the sparsity, ``n``, ``m`` and the Hessians (including
            a Hessian built from zero rows, ``count == 0``, naming the leaf).

    References:
        Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
        ICLR 2024 (arXiv:2306.11695).
    """
    sparsity, n, m = check_nm(sparsity, n, m)
    items = hessian_items(params, hessians)
    masks = {}
    for path, (leaf, h, lay) in items.items():
        if m is not None and lay.shape[lay.last_in] % m:
            raise ValueError(f"leaf {path!r}: m={m} does not divide the input axis {lay.last_in} of length {lay.shape[lay.last_in]} (shape {lay.shape})")
        k = 0 if m is not None else round(sparsity * lay.d_in)
        if lay.size == 0:
            masks[path] = jnp.ones(lay.shape, bool)
        elif lay.stacked:
            masks[path] = lay.from_3d(_wanda_3d(lay.to_3d(jnp.asarray(leaf)), h, k, n or 0, m or 0))
        else:
            masks[path] = lay.from_2d(_wanda_2d(lay.to_2d(jnp.asarray(leaf)), h[0], k, n or 0, m or 0))
    return map_hessian_leaves(params, masks, fill=lambda p, x: None)
