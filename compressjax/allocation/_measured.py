"""Damages measured at the model's output: each option's result put into the float model alone.

The default damage (:func:`~compressjax.allocation.candidate_importance`) is a first-order estimate: the
layer output error ``tr(dW^T H dW)`` times the kernel's amplification ``alpha``, linear in the error. On a
model whose kernels are stacked over many layers (one allocation unit is a kernel in every layer at once),
errors compound beyond that estimate. :func:`output_damages` measures instead: for every kernel and option,
the model runs with that kernel replaced by the option's result and every other kernel float, and the
damage is the distance of its output from the float output, summed over a few calibration batches. Damages
stay additive over kernels in the allocation (interactions between kernels are not measured), as in
mixed-precision searches that score each layer's quantization alone (e.g. the single-layer sensitivity
of HAWQ and ZeroQ).

References:
    Dong, Yao, Gholami, Mahoney & Keutzer, "HAWQ: Hessian AWare Quantization of Neural Networks with
    Mixed-Precision", ICCV 2019 (arXiv:1905.03696).
    Cai, Yao, Dong, Gholami, Mahoney & Keutzer, "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020
    (arXiv:2001.00281): the KL divergence of the output with one layer quantized as its sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.allocation._costs import Candidates, decoded
from compressjax.allocation._importance import spaced_batches
from compressjax.checks import check_positive_int

__all__ = ["output_damages", "squared_distance"]


def squared_distance(reference: Any, output: Any) -> jax.Array:
    """``||output - reference||^2`` over every leaf: the default distance of :func:`output_damages`."""
    pairs = zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(output), strict=True)
    return sum(jnp.sum(jnp.square(jnp.asarray(y, jnp.float32) - jnp.asarray(r, jnp.float32))) for r, y in pairs)


def output_damages(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Sequence[Any],
    cands: Candidates,
    *,
    distance: Callable[[Any, Any], jax.Array] | None = None,
    max_batches: int = 2,
) -> np.ndarray:
    """Each option's damage measured at the output, with its kernel alone compressed: ``(kernels, options)``.

    ``damage[i, j] = sum_batches distance(f(params), f(params with kernel i replaced by option j's result))``
    over at most ``max_batches`` evenly spaced batches; 0 for an option that leaves the kernel unchanged
    (``float``), ``inf`` where the option does not apply (``cands.costs < 0``). One compiled forward pass per
    batch shape serves every kernel and option (the params are arguments). Cost: one forward pass per kernel,
    option and batch, so it suits models with few allocation units (stacked kernels of a scanned model),
    where it replaces the first-order estimate of :func:`candidate_importance` (see the module docstring).
    Pass the result as ``from_candidates(..., damages=)``.

    Args:
        apply_fn: ``(params, batch) -> output``.
        params: the float params.
        batches: calibration batches.
        cands: from :func:`option_costs_and_damages` with ``keep_results=True``.
        distance: ``(float_output, output) -> scalar`` (default :func:`squared_distance`); for logits, e.g.
            ``lambda ref, y: jnp.sum(compressjax.kd_loss(y, ref))`` (the KL divergence of the predictions).
        max_batches: how many batches to run (each costs one forward pass per kernel and option).

    Raises:
        ValueError: no batches, ``max_batches`` below 1, candidates without their results, or a distance that
            is not finite (naming the kernel and option).
        TypeError: a ``distance`` that is not callable.
    """
    dist = squared_distance if distance is None else distance
    if not callable(dist):
        raise TypeError(f"distance must be callable (float_output, output) -> scalar, got {distance!r}")
    max_batches = check_positive_int("max_batches", max_batches)
    batches = spaced_batches(batches, max_batches, "output_damages")
    float_params = jax.tree_util.tree_map(decoded, params, is_leaf=tree.is_compressed_leaf)
    flat, treedef = jax.tree_util.tree_flatten_with_path(float_params)
    leaf_paths = [tree.path_to_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]

    @jax.jit
    def forward(leaves, batch):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    @jax.jit
    def damage(leaves, batch, reference):
        return dist(reference, forward(leaves, batch))

    references = [forward(leaves, b) for b in batches]
    out = np.full(cands.costs.shape, np.inf)
    for i, p in enumerate(cands.paths):
        k = leaf_paths.index(p)
        for j, opt in enumerate(cands.options):
            if cands.costs[i, j] < 0:
                continue
            if opt.method == "float":
                out[i, j] = 0.0
                continue
            if (p, opt.name) not in cands.results:
                raise ValueError(f"candidates hold no result for {p!r} / {opt.name!r}: make them with keep_results=True")
            trial = list(leaves)
            trial[k] = decoded(cands.results[(p, opt.name)][0]).astype(leaves[k].dtype)
            value = sum(float(damage(trial, b, r)) for b, r in zip(batches, references, strict=True))
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"kernel {p!r}, option {opt.name!r}: the output distance is {value}, not a finite value >= 0")
            out[i, j] = value
    return out
