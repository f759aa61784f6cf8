"""Per-kernel importance: how much of a kernel's layer output error reaches the model's output.

``tr(dW^T H dW) = ||X dW||^2`` measures the error at the layer's own outputs. What matters is the error at
the model's output, to first order ``||J X dW||^2`` with ``J`` the Jacobian of the output with respect to
the layer's outputs: the Gauss-Newton (for a squared-error output loss, the Fisher) quadratic form along
the compression error. We estimate, per kernel ``l``, the amplification

    alpha_l = sum_batches ||J_l X_l dW_l||^2 / sum_batches ||X_l dW_l||^2

along a probe direction ``dW_l`` (by default the real error of one of the kernel's options), both sums over
the same batches; the damage of every option of that kernel is then ``alpha_l * tr(dW^T H dW)``. The
numerators come exactly from one forward-mode product per kernel and batch (``jax.linearize`` once per
batch, so the primal pass is shared, and the kernels' tangent passes vectorised in chunks), or as an
unbiased estimate from one backward pass per sample for all kernels at once (random output probes, as in
Hutchinson's trace estimator), which is far cheaper when there are many kernels. This is a per-layer sensitivity weight
in the spirit of HAWQ-V2 (Dong et al., NeurIPS 2020: the Hessian trace of the loss per layer) and of
NVIDIA ModelOpt's ``auto_quantize`` (output-gradient-weighted output error, a Fisher approximation), for
models whose output is not a loss (embeddings, logits): the output's squared change stands in for it.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines", Communications in Statistics - Simulation and Computation 19(2), 1990.
    Kunstner, Hennig & Balles, "Limitations of the empirical Fisher approximation for natural gradient
    descent", NeurIPS 2019.
    Dong, Yao, Arfeen, Gholami, Mahoney & Keutzer, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of
    Neural Networks", NeurIPS 2020 (arXiv:1911.03852).
    Martens, "New insights and perspectives on the natural gradient method", JMLR 21, 2020 (Gauss-Newton
    and Fisher).
    NVIDIA TensorRT Model Optimizer, ``modelopt.torch.quantization.auto_quantize``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.allocation._costs import _exact, decoded, hessians_by_path, perturbation_error
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


METHODS = ("forward", "reverse", "auto")
AUTO_REVERSE_BYTES = 2 << 30  # method="auto": the most bytes of per-sample gradients reverse mode may hold
DEFAULT_BATCHES = {"forward": 4, "reverse": 16}  # max_batches=None: a backward pass per sample is cheap


def kernel_importance(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Sequence[Any],
    probes: dict[str, Any],
    *,
    row_mask: Callable[[Any], Any] | None = None,
    max_batches: int | None = None,
    chunk_size: int = 6,
    output_metric: OutputMetric | None = None,
    method: str = "forward",
    num_probes: int = 1,
    seed: int = 0,
    hessians: Any = None,
) -> dict[str, float]:
    """How much of each kernel's layer output error reaches the model's output: ``{path: alpha}``.

    ``alpha = sum ||J X dW||^2 / sum ||X dW||^2`` along the probe ``dW`` (see the module docstring); with
    ``output_metric`` the numerator is ``sum metric(y, J X dW)`` instead, e.g. :func:`softmax_kl` for logits.

    Two ways to get the numerators:

    * ``method="forward"`` (exact): one forward-mode tangent pass per kernel and batch, about two forward
      passes each; the cost grows with the number of kernels.
    * ``method="reverse"`` (an unbiased estimate): one backward pass per calibration sample for all the
      kernels at once. For a random ``v_s`` over sample ``s``'s output with covariance the metric's
      (``N(0, I)`` for :func:`squared_change`), ``c = <d(v_s . y_s)/dW, dW> = v_s . J_s X_s dW`` has
      ``E[c^2]`` equal to the sample's numerator, so the sum of ``c^2`` over the samples estimates the total
      (Hutchinson, 1990; the per-sample form of the trick behind Fisher estimates such as Kunstner, Hennig &
      Balles, NeurIPS 2019). Its relative error shrinks as one over the square root of the number of
      samples times ``num_probes``. It needs a leading sample axis on every leaf of a batch and of the
      output, with each sample's output depending on that sample alone: the first batch is checked (its
      output against the output of its first and last samples alone), and a model that mixes samples is a
      ``ValueError``. Only the two built-in metrics are supported (their probes are known).
    * ``method="auto"``: reverse where that check passes, the metric is built in, one sample's float32
      gradient of the probed kernels takes at most 2 GiB (``chunk_size`` is then lowered so that a chunk's
      gradients fit in 2 GiB) and it is expected to be at least twice as cheap (about 3 batch passes per
      batch against 2 per kernel and batch: ``kernels x forward batches >= 3 x reverse batches``; true
      for MiniLM's 36 kernels, not for a scanned LLM's 7 stacked ones), else forward.

    Args:
        apply_fn: ``(params, batch) -> output`` (any pytree of float arrays).
        params: the float params (compressed leaves are decoded first).
        batches: calibration batches; at most ``max_batches`` of them, evenly spaced, are used.
        probes: ``{path: dW}``, a perturbation of each kernel's shape (e.g. an option's error ``W_hat - W``).
        row_mask: as for :func:`compressjax.collect_hessians` (the denominators leave the same rows out).
        max_batches: how many batches to use (default 4 forward, 16 reverse: a backward pass per sample is
            cheap, and more samples mean a closer estimate).
        chunk_size: forward: kernels whose tangent passes share one linearisation (a primal pass) and run
            vectorised; reverse: samples whose backward passes run vectorised. Memory grows with it (forward:
            a zero-padded tangent of every selected kernel each; reverse: a gradient of every selected kernel
            each).
        output_metric: ``(output, output_tangent) -> scalar``, a quadratic form in the tangent measuring the
            output change (default :func:`squared_change`).
        method: ``"forward"``, ``"reverse"`` or ``"auto"`` (see above).
        num_probes: reverse: random probes per sample.
        seed: reverse: the seed of the probes (the estimate is a deterministic function of it).
        hessians: Hessians of ``params`` over these ``batches`` and ``row_mask`` (from
            :func:`compressjax.collect_hessians`, e.g. the ones the options were solved from): when every batch
            is used, the denominators come from them instead of a second capture pass. Ignored when only some
            batches are used or a probed kernel has none.

    Returns:
        ``{path: alpha}``, ``alpha >= 0``; 1.0 for a zero probe (nothing to measure).

    Raises:
        ValueError: no batches, ``max_batches``, ``chunk_size`` or ``num_probes`` below 1, an unknown
            ``method``, ``method="reverse"`` on batches without a shared leading sample axis or a model
            whose samples' outputs depend on each other.
        TypeError: a size or ``seed`` that is not an int, an ``output_metric`` that is not callable, or
            (reverse) not built in, ``hessians`` with a leaf that is not a Hessian.
    """
    metric = squared_change if output_metric is None else output_metric
    if not callable(metric):
        raise TypeError(f"output_metric must be callable (output, tangent) -> scalar, got {output_metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "reverse" and metric not in PROBE_SAMPLERS:
        raise TypeError(f"method='reverse' supports output_metric squared_change or softmax_kl (their probes are known), "
                        f"got {metric!r}; use method='forward'")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: importance needs at least one calibration batch")
    if max_batches is not None:
        max_batches = check_positive_int("max_batches", max_batches)
    given = {} if hessians is None else hessians_by_path(hessians)
    float_params = jax.tree_util.tree_map(decoded, params, is_leaf=tree.is_compressed_leaf)
    if method == "auto":
        # Reverse mode holds a float32 gradient of every probed kernel per sample in a chunk: keep that
        # within AUTO_REVERSE_BYTES, and leave models whose one-sample gradient is larger to forward mode.
        grad_bytes = 4 * sum(int(np.prod(jnp.shape(probes[p]))) for p in probes)
        # Work in passes over a batch: forward about 2 per kernel and batch, reverse about 3 per batch
        # (a backward pass per sample); reverse only where it is at least 2x cheaper, as it is noisy.
        n_fwd, n_rev = (min(len(batches), max_batches or DEFAULT_BATCHES[m]) for m in ("forward", "reverse"))
        worth_it = metric in PROBE_SAMPLERS and grad_bytes <= AUTO_REVERSE_BYTES and 2 * len(probes) * n_fwd >= 2 * 3 * n_rev
        method = "reverse" if worth_it and _sample_axis_problem(apply_fn, float_params, batches[0]) is None else "forward"
        if method == "reverse":
            chunk_size = min(check_positive_int("chunk_size", chunk_size), max(1, AUTO_REVERSE_BYTES // max(grad_bytes, 1)))
    elif method == "reverse":
        problem = _sample_axis_problem(apply_fn, float_params, batches[0])
        if problem is not None:
            raise ValueError(f"method='reverse' needs independent samples along the leading axis of the batch: {problem}; "
                             "use method='forward'")
    max_batches = max_batches or DEFAULT_BATCHES[method]
    chunk_size = check_positive_int("chunk_size", chunk_size)
    num_probes = check_positive_int("num_probes", num_probes)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    n_given = len(batches)
    batches = spaced_batches(batches, max_batches, "importance")
    paths = list(probes)
    flat, treedef = jax.tree_util.tree_flatten_with_path(float_params)
    leaf_paths = [tree.path_to_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]
    sel = [leaf_paths.index(p) for p in paths]
    dws = [jnp.asarray(probes[p], jnp.float32) for p in paths]
    if method == "reverse":
        num = _reverse_numerators(apply_fn, leaves, treedef, sel, dws, batches, PROBE_SAMPLERS[metric], chunk_size,
                                  num_probes, seed)
    else:
        num = _forward_numerators(apply_fn, leaves, treedef, sel, dws, batches, metric, chunk_size)
    hs = given if len(batches) == n_given else {}
    if not all(p in hs for p in paths):
        hs = hessians_by_path(collect_hessians(apply_fn, float_params, batches, where=_exact(paths), row_mask=row_mask))
    out = {}
    for j, p in enumerate(paths):
        den = perturbation_error(hs[p], dws[j])
        out[p] = float(num[j]) / den if den > 0 else 1.0
    return out


def _with_kernels(leaves: list, treedef: Any, sel: Sequence[int], kernels: Sequence[Any]) -> Any:
    """The params tree of ``leaves`` with the leaves at positions ``sel`` replaced by ``kernels``."""
    ls = list(leaves)
    for i, k in zip(sel, kernels, strict=True):
        ls[i] = k
    return jax.tree_util.tree_unflatten(treedef, ls)


@partial(jax.jit, static_argnames=("apply_fn", "treedef", "sel", "metric"))
def _forward_batch(leaves, dws, which, batch, *, apply_fn, treedef, sel, metric):
    """``metric(y, J X dW_j)`` for the kernels ``which`` (``-1``: padding, 0): one linearisation of the model at
    ``batch`` (its primal pass computed once), then the tangent pass of each kernel, vectorised."""
    def f(ks):
        return apply_fn(_with_kernels(leaves, treedef, sel, ks), batch)

    y, lin = jax.linearize(f, [leaves[i] for i in sel])

    def one(k):
        return metric(y, lin([jnp.where(k == j, dws[j], 0.0).astype(leaves[i].dtype) for j, i in enumerate(sel)]))

    return jax.vmap(one)(which)


def _forward_numerators(apply_fn, leaves, treedef, sel, dws, batches, metric, chunk_size) -> np.ndarray:
    """``sum_batches metric(y, J X dW_j)`` for every kernel ``j``, exactly, by forward mode."""
    n_chunks = -(-len(sel) // chunk_size)
    chunk = -(-len(sel) // n_chunks)  # balanced chunks: the least padding
    which = np.full(n_chunks * chunk, -1, np.int32)
    which[: len(sel)] = np.arange(len(sel))
    num = np.zeros(n_chunks * chunk)
    static = {"apply_fn": apply_fn, "treedef": treedef, "sel": tuple(sel), "metric": metric}
    for batch in batches:
        for c in range(n_chunks):
            num[c * chunk:(c + 1) * chunk] += np.asarray(_forward_batch(leaves, dws, jnp.asarray(which[c * chunk:(c + 1) * chunk]),
                                                                        batch, **static))
    return num[: len(sel)]


def _gaussian_probe(y: Any, key: jax.Array) -> Any:
    """``v ~ N(0, I)`` shaped like the output ``y``: the probe of :func:`squared_change`."""
    ys, tdef = jax.tree_util.tree_flatten(y)
    keys = jax.random.split(key, len(ys))
    return jax.tree_util.tree_unflatten(tdef, [jax.random.normal(k, jnp.shape(a), jnp.float32).astype(a.dtype)
                                               for k, a in zip(keys, ys, strict=True)])


def _softmax_kl_probe(logits: jax.Array, key: jax.Array) -> jax.Array:
    """``v`` with covariance ``1/2 (diag p - p p^T)`` over the last axis (``p = softmax(logits)``): the probe
    of :func:`softmax_kl`. With ``g ~ N(0, I)``, ``v = sqrt(1/2) (sqrt(p) g - p (sqrt(p) . g))``."""
    p = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32)), axis=-1)
    g = jax.random.normal(key, p.shape, jnp.float32)
    sg = jnp.sqrt(p) * g
    return (np.sqrt(0.5) * (sg - p * jnp.sum(sg, axis=-1, keepdims=True))).astype(logits.dtype)


PROBE_SAMPLERS: dict[Callable, Callable[[Any, jax.Array], Any]] = {squared_change: _gaussian_probe,
                                                                   softmax_kl: _softmax_kl_probe}


def _leading_size(batch: Any, what: str) -> tuple[int | None, str | None]:
    """The leading axis size shared by every leaf of ``batch``, or ``(None, why not)``."""
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not flat:
        return None, f"the {what} has no arrays"
    sizes = {tree.path_to_str(kp) or "(root)": (jnp.shape(x)[0] if jnp.ndim(x) else None) for kp, x in flat}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        return None, f"the {what}'s leaves have no common leading axis (leading sizes {sizes})"
    return next(iter(sizes.values())), None


def _sample_axis_problem(apply_fn, params, batch) -> str | None:
    """``None`` when ``batch`` and its output share a leading sample axis and the outputs of the first and
    last samples run alone match theirs in the batch (to 1e-3 of the output's scale; 3e-2 below float32),
    else what is wrong."""
    n, why = _leading_size(batch, "batch")
    if why is not None:
        return why
    y = apply_fn(params, batch)
    m, why = _leading_size(y, "output")
    if why is not None:
        return why
    if m != n:
        return f"the batch has {n} samples but the output's leading axis has {m}"
    for s in sorted({0, n - 1}):
        alone = apply_fn(params, jax.tree_util.tree_map(lambda x, s=s: x[s:s + 1], batch))
        for x, b in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(alone), strict=True):
            a = np.asarray(x[s], np.float64)
            b = np.asarray(b[0], np.float64)
            tol = 1e-3 if jnp.dtype(x.dtype).itemsize >= 4 else 3e-2
            scale = float(np.sqrt(np.mean(a * a))) or 1.0
            diff = float(np.sqrt(np.mean((a - b) ** 2))) if a.shape == b.shape else np.inf
            if not diff <= tol * scale:
                return (f"sample {s}'s output alone differs from its output in the batch of {n} "
                        f"(rms difference {diff:.3g}, output rms {scale:.3g})")
    return None


@partial(jax.jit, static_argnames=("apply_fn", "treedef", "sel", "sample_probe", "chunk_size", "num_probes"))
def _reverse_batch(leaves, dws, batch, key, *, apply_fn, treedef, sel, sample_probe, chunk_size, num_probes):
    """``sum_s c_sj^2 / num_probes`` over the samples of ``batch``, ``c_sj = <grad_W (v . y_s), dW_j>``."""
    def one(sample, key):
        def f(ks):
            return apply_fn(_with_kernels(leaves, treedef, sel, ks), jax.tree_util.tree_map(lambda x: x[None], sample))

        y, vjp = jax.vjp(f, [leaves[i] for i in sel])

        def probe(total, k):  # one gradient of the kernels at a time, not a vmap over probes
            grads = vjp(sample_probe(y, k))[0]
            c = jnp.stack([jnp.vdot(jnp.asarray(g, jnp.float32), dw) for g, dw in zip(grads, dws, strict=True)])
            return total + c * c, None

        total, _ = jax.lax.scan(probe, jnp.zeros(len(sel), jnp.float32), jax.random.split(key, num_probes))
        return total / num_probes

    # Balanced chunks of samples, the last padded with copies of sample 0 weighted 0: one compiled body.
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    n_chunks = -(-n // chunk_size)
    chunk = -(-n // n_chunks)
    pad = n_chunks * chunk - n

    def chunked(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    weight = (jnp.arange(n_chunks * chunk) < n).astype(jnp.float32).reshape(n_chunks, chunk)
    keys = chunked(jax.random.split(key, n))
    sums = jax.lax.map(lambda a: jax.vmap(one)(*a[:2]) * a[2][:, None], (jax.tree_util.tree_map(chunked, batch), keys, weight))
    return jnp.sum(sums, axis=(0, 1))


def _reverse_numerators(apply_fn, leaves, treedef, sel, dws, batches, sample_probe, chunk_size, num_probes, seed) -> np.ndarray:
    """An unbiased estimate of ``sum_batches metric(y, J X dW_j)`` for every kernel ``j``: per sample, ``c_j =
    <grad_W (v . y), dW_j>`` for random probes ``v`` of the metric's covariance, squared and summed."""
    static = {"apply_fn": apply_fn, "treedef": treedef, "sel": tuple(sel), "sample_probe": sample_probe,
              "chunk_size": chunk_size, "num_probes": num_probes}
    key = jax.random.PRNGKey(seed)
    num = np.zeros(len(sel))
    for batch in batches:
        key, sub = jax.random.split(key)
        num += np.asarray(_reverse_batch(leaves, dws, batch, sub, **static), np.float64)
    return num
