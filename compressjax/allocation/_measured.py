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
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.allocation._costs import Candidates, decoded
from compressjax.allocation._importance import spaced_batches
from compressjax.checks import check_positive_int
from compressjax.losses import kd_loss

__all__ = ["output_damages", "plan_distances", "squared_distance", "softmax_kl_distance"]

Distance = Callable[[Any, Any], jax.Array]


def squared_distance(reference: Any, output: Any) -> jax.Array:
    """``||output - reference||^2`` over every leaf: the default distance of :func:`output_damages`."""
    pairs = zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(output), strict=True)
    return sum(jnp.sum(jnp.square(jnp.asarray(y, jnp.float32) - jnp.asarray(r, jnp.float32))) for r, y in pairs)


def softmax_kl_distance(reference: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum KL(softmax(reference) || softmax(logits))`` over every position: the distance for a model that
    returns logits (what perplexity and accuracy feel); :func:`compressjax.softmax_kl` is its second-order
    form."""
    return jnp.sum(kd_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(reference, jnp.float32)))


@partial(jax.jit, static_argnames=("apply_fn", "treedef"))
def _forward(leaves, batch, *, apply_fn, treedef):
    return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)


@partial(jax.jit, static_argnames=("dist",))
def _distance(reference, output, *, dist):
    return dist(reference, output)


def _output_scorer(apply_fn: Callable, params: Any, batches: Sequence[Any], distance: Distance | None,
                   max_batches: int, what: str) -> Callable[[dict[str, Any]], float]:
    """``score({path: leaf}) -> sum over batches of distance(float output, output with those leaves)``, at
    most ``max_batches`` evenly spaced batches; one compiled forward pass per batch shape serves every call
    (the params are arguments)."""
    dist = squared_distance if distance is None else distance
    if not callable(dist):
        raise TypeError(f"distance must be callable (float_output, output) -> scalar, got {distance!r}")
    max_batches = check_positive_int("max_batches", max_batches)
    batches = spaced_batches(batches, max_batches, what)
    float_params = jax.tree_util.tree_map(decoded, params, is_leaf=tree.is_compressed_leaf)
    flat, treedef = jax.tree_util.tree_flatten_with_path(float_params)
    index = {tree.path_to_str(kp): i for i, (kp, _) in enumerate(flat)}
    leaves = [x for _, x in flat]

    # Compiled once per model and batch shape across calls (auto_compress at several budgets), and the
    # distance on its own: one compilation of the model serves the references and every trial.
    try:
        hash((apply_fn, dist))
        forward = partial(_forward, apply_fn=apply_fn, treedef=treedef)
        distance_of = partial(_distance, dist=dist)
    except TypeError:  # an unhashable callable object: compiled for this call only
        forward = jax.jit(lambda ls, b: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), b))
        distance_of = jax.jit(dist)
    references = [forward(leaves, b) for b in batches]

    def score(replace: dict[str, Any]) -> float:
        trial = list(leaves)
        for p, leaf in replace.items():
            k = index[p]
            trial[k] = decoded(leaf).astype(leaves[k].dtype)
        return sum(float(distance_of(r, forward(trial, b))) for b, r in zip(batches, references, strict=True))

    return score


def _result(cands: Candidates, path: str, name: str) -> Any:
    if (path, name) not in cands.results:
        raise ValueError(f"candidates hold no result for {path!r} / {name!r}: make them with keep_results=True")
    return cands.results[(path, name)][0]


def _finite(value: float, what: str) -> float:
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{what}: the output distance is {value}, not a finite value >= 0")
    return value


def output_damages(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Sequence[Any],
    cands: Candidates,
    *,
    distance: Distance | None = None,
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
        distance: ``(float_output, output) -> scalar`` (default :func:`squared_distance`); for logits,
            :func:`softmax_kl_distance` (the KL divergence of the predictions).
        max_batches: how many batches to run (each costs one forward pass per kernel and option).

    Raises:
        ValueError: no batches, ``max_batches`` below 1, candidates without their results, or a distance that
            is not finite (naming the kernel and option).
        TypeError: a ``distance`` that is not callable.
    """
    score = _output_scorer(apply_fn, params, batches, distance, max_batches, "output_damages")
    out = np.full(cands.costs.shape, np.inf)
    for i, p in enumerate(cands.paths):
        for j, opt in enumerate(cands.options):
            if cands.costs[i, j] < 0:
                continue
            if opt.method == "float":
                out[i, j] = 0.0
                continue
            out[i, j] = _finite(score({p: _result(cands, p, opt.name)}), f"kernel {p!r}, option {opt.name!r}")
    return out


def plan_distances(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Sequence[Any],
    cands: Candidates,
    choices: Sequence[Sequence[int]],
    *,
    distance: Distance | None = None,
    max_batches: int = 2,
) -> np.ndarray:
    """Whole plans measured at the output: every kernel replaced by its chosen option's result at once.

    ``out[k] = sum_batches distance(f(params), f(params with plan k))`` for each plan ``choices[k]`` (one
    option column of ``cands`` per kernel), over at most ``max_batches`` evenly spaced batches. Unlike the
    additive damages the allocator sums, this sees how the kernels' errors combine. Cost: one forward pass
    per plan and batch.

    Raises:
        ValueError: a plan of the wrong length, an option that does not apply to its kernel, candidates
            without their results, a distance that is not finite.
        TypeError: a ``distance`` that is not callable.
    """
    score = _output_scorer(apply_fn, params, batches, distance, max_batches, "plan_distances")
    out = np.empty(len(choices))
    for k, choice in enumerate(choices):
        if len(choice) != len(cands.paths):
            raise ValueError(f"plan {k} chooses {len(choice)} options for {len(cands.paths)} kernels")
        replace = {}
        for i, p in enumerate(cands.paths):
            j = int(choice[i])
            if cands.costs[i, j] < 0:
                raise ValueError(f"plan {k}: option {cands.options[j].name!r} does not apply to kernel {p!r}")
            if cands.options[j].method == "float":
                continue
            replace[p] = _result(cands, p, cands.options[j].name)
        out[k] = _finite(score(replace), f"plan {k}")
    return out
