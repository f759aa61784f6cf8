"""Per-kernel importance: how much of a kernel's layer output error reaches the model's output.

``tr(dW^T H dW) = ||X dW||^2`` measures the error at the layer's own outputs. What matters is the error at
the model's output, to first order ``||J X dW||^2`` with ``J`` the Jacobian of the output with respect to
the layer's outputs: the Gauss-Newton (for a squared-error output loss, the Fisher) quadratic form along
the compression error. We estimate, per kernel ``l``, the amplification

    alpha_l = sum_batches ||J_l X_l dW_l||^2 / sum_batches ||X_l dW_l||^2

along a probe direction ``dW_l`` (by default the real error of one of the kernel's options), with one
forward-mode product per kernel and batch (``jax.linearize`` once per batch, so the primal pass is shared,
and the kernels' tangent passes vectorised in chunks), and both sums over the same batches; the damage
of every option of that kernel is then ``alpha_l * tr(dW^T H dW)``. This is a per-layer sensitivity weight
in the spirit of HAWQ-V2 (Dong et al., NeurIPS 2020: the Hessian trace of the loss per layer) and of
NVIDIA ModelOpt's ``auto_quantize`` (output-gradient-weighted output error, a Fisher approximation), for
models whose output is not a loss (embeddings, logits): the output's squared change stands in for it.

References:
    Dong, Yao, Arfeen, Gholami, Mahoney & Keutzer, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of
    Neural Networks", NeurIPS 2020 (arXiv:1911.03852).
    Martens, "New insights and perspectives on the natural gradient method", JMLR 21, 2020 (Gauss-Newton
    and Fisher).
    NVIDIA TensorRT Model Optimizer, ``modelopt.torch.quantization.auto_quantize``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.allocation._costs import _exact, decoded
from compressjax.checks import check_positive_int
from compressjax.hessians import collect_hessians

__all__ = ["kernel_importance", "squared_change", "softmax_kl"]

OutputMetric = Callable[[Any, Any], jax.Array]


def squared_change(output: Any, tangent: Any) -> jax.Array:
    """``||dy||^2``: the squared change of every output (the Gauss-Newton form of a squared-error loss); the
    default output metric of :func:`kernel_importance`. ``output`` is unused."""
    del output
    return sum(jnp.sum(jnp.square(jnp.asarray(t, jnp.float32))) for t in jax.tree_util.tree_leaves(tangent))


def softmax_kl(logits: jax.Array, tangent: jax.Array) -> jax.Array:
    """The second-order KL divergence between ``softmax(z)`` and ``softmax(z + dz)`` over the last axis,
    summed over positions: ``1/2 sum dz^T (diag(p) - p p^T) dz``, the Fisher metric of a classifier's or a
    language model's predictive distribution (``logits`` ``z``, ``tangent`` ``dz``). Use it as
    :func:`kernel_importance`'s ``output_metric`` (or ``auto_compress(importance=softmax_kl)``) when
    ``apply_fn`` returns logits: it weights a logit change by how much it moves the predictions.

    References:
        Martens, "New insights and perspectives on the natural gradient method", JMLR 21, 2020.
    """
    z, dz = jnp.asarray(logits, jnp.float32), jnp.asarray(tangent, jnp.float32)
    p = jax.nn.softmax(z, axis=-1)
    mean = jnp.sum(p * dz, axis=-1)
    return 0.5 * jnp.sum(jnp.sum(p * dz * dz, axis=-1) - mean * mean)


def spaced_batches(batches: Sequence[Any], max_batches: int, what: str) -> list[Any]:
    """At most ``max_batches`` of ``batches``, evenly spaced (first and last kept); ``ValueError`` naming
    ``what`` needs them when there are none."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"batches is empty: {what} needs at least one calibration batch")
    if len(batches) > max_batches:
        idx = np.linspace(0, len(batches) - 1, max_batches).round().astype(int)
        batches = [batches[i] for i in sorted(set(idx.tolist()))]
    return batches


def kernel_importance(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Sequence[Any],
    probes: dict[str, Any],
    *,
    row_mask: Callable[[Any], Any] | None = None,
    max_batches: int = 4,
    chunk_size: int = 6,
    output_metric: OutputMetric | None = None,
) -> dict[str, float]:
    """How much of each kernel's layer output error reaches the model's output: ``{path: alpha}``.

    ``alpha = sum ||J X dW||^2 / sum ||X dW||^2`` along the probe ``dW`` (see the module docstring); with
    ``output_metric`` the numerator is ``sum metric(y, J X dW)`` instead, e.g. :func:`softmax_kl` for logits.

    Args:
        apply_fn: ``(params, batch) -> output`` (any pytree of float arrays).
        params: the float params (compressed leaves are decoded first).
        batches: calibration batches; at most ``max_batches`` of them, evenly spaced, are used.
        probes: ``{path: dW}``, a perturbation of each kernel's shape (e.g. an option's error ``W_hat - W``).
        row_mask: as for :func:`compressjax.collect_hessians` (the denominators leave the same rows out).
        max_batches: how many batches to use (one tangent pass per kernel and batch).
        chunk_size: kernels whose tangent passes share one linearisation (a primal pass) and run vectorised;
            memory grows with it (each holds a zero-padded tangent of every selected kernel).
        output_metric: ``(output, output_tangent) -> scalar``, a quadratic form in the tangent measuring the
            output change (default :func:`squared_change`).

    Returns:
        ``{path: alpha}``, ``alpha >= 0``; 1.0 for a zero probe (nothing to measure).

    Raises:
        ValueError: no batches, ``max_batches`` or ``chunk_size`` below 1.
        TypeError: ``max_batches`` or ``chunk_size`` not an int, an ``output_metric`` that is not callable.
    """
    metric = squared_change if output_metric is None else output_metric
    if not callable(metric):
        raise TypeError(f"output_metric must be callable (output, tangent) -> scalar, got {output_metric!r}")
    max_batches = check_positive_int("max_batches", max_batches)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    batches = spaced_batches(batches, max_batches, "importance")
    float_params = jax.tree_util.tree_map(decoded, params, is_leaf=tree.is_compressed_leaf)
    paths = list(probes)
    hess = collect_hessians(apply_fn, float_params, batches, where=_exact(paths), row_mask=row_mask)
    hs = {p: h for p, h in tree.leaves_with_paths(hess, lambda x: x is None or hasattr(x, "in_axes")) if h is not None}
    flat, treedef = jax.tree_util.tree_flatten_with_path(float_params)
    leaf_paths = [tree.path_to_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]
    sel = [leaf_paths.index(p) for p in paths]

    @jax.jit
    def sq_jvps(leaves, dws, which, batch):
        """``||J X dW_j||^2`` for the kernels ``which`` (``-1``: padding, 0): one linearisation of the model
        at ``batch`` (its primal pass computed once), then the tangent pass of each kernel, vectorised."""
        def f(ks):
            ls = list(leaves)
            for j, i in enumerate(sel):
                ls[i] = ks[j]
            return apply_fn(jax.tree_util.tree_unflatten(treedef, ls), batch)

        y, lin = jax.linearize(f, [leaves[i] for i in sel])

        def one(k):
            return metric(y, lin([jnp.where(k == j, dws[j], 0.0).astype(leaves[i].dtype) for j, i in enumerate(sel)]))

        return jax.vmap(one)(which)

    dws = [jnp.asarray(probes[p], jnp.float32) for p in paths]
    n_chunks = -(-len(paths) // chunk_size)
    chunk = -(-len(paths) // n_chunks)  # balanced chunks: the least padding
    which = np.full(n_chunks * chunk, -1, np.int32)
    which[: len(paths)] = np.arange(len(paths))
    num = np.zeros(n_chunks * chunk)
    for batch in batches:
        for c in range(n_chunks):
            num[c * chunk:(c + 1) * chunk] += np.asarray(sq_jvps(leaves, dws, jnp.asarray(which[c * chunk:(c + 1) * chunk]), batch))
    out = {}
    for j, p in enumerate(paths):
        h = hs[p]
        in_axes = tuple(sorted(h.in_axes))
        lay = tuple(getattr(h, "layer_axes", ()))
        rest = tuple(a for a in range(dws[j].ndim) if a not in in_axes and a not in lay)
        dw = jnp.transpose(dws[j], lay + in_axes + rest)
        d_in = int(np.prod([dws[j].shape[a] for a in in_axes]))
        dw = dw.reshape(dw.shape[: len(lay)] + (d_in, -1))
        den = float(jnp.sum(jnp.matmul(jnp.asarray(h.h, jnp.float32), dw, precision=jax.lax.Precision.HIGHEST) * dw))
        out[p] = num[j] / den if den > 0 else 1.0
    return out
