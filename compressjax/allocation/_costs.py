"""Every menu option solved on every kernel: its exact bytes in the file and its layer output error.

Cost: the option's result is encoded by the export code path (:func:`compressjax.size_report`) and the
leaf's ``stored_bytes`` taken (codes, scales, zero points, sparse positions, centroids: every stream of the
leaf after zstd). A leaf's streams are coded on their own, so these bytes are what the same leaf takes in
any file; only the file's preamble and JSON header (``overhead_bytes``) are outside the budget.

Damage: ``tr(dW^T H dW)`` with ``dW = W_hat - W`` the option's real error (decoded result minus the float
kernel, in the ``(d_in, d_out)`` layout of the Hessian) and ``H = sum x x^T`` from
:func:`compressjax.collect_hessians`: the squared error the option adds to the layer's outputs over the
calibration rows (the quantity GPTQ and SparseGPT minimise; Frantar et al., 2023).
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.allocation._menu import KernelInfo, Option, check_menu, why_not
from compressjax.codebook import codebook_error_feedback, kmeans_codebooks, refit_centroids
from compressjax.export import size_report
from compressjax.hessians import Hessian
from compressjax.oneshot import gptq, gptq_many, sparsegpt
from compressjax.qarray import QArray
from compressjax.quantization import dequantize, quantize_params

__all__ = ["Candidates", "option_costs_and_damages", "kernel_infos", "hessians_by_path", "solve_option", "layer_error", "leaf_bytes",
           "decoded"]


def decoded(x: Any) -> jax.Array:
    """The float array a (possibly compressed: QArray, Codebook) leaf stands for."""
    if isinstance(x, QArray):
        return dequantize(x)
    return x.decode() if tree.is_compressed_leaf(x) else jnp.asarray(x)


def hessians_by_path(hessians: Any) -> dict[str, Hessian]:
    """``{path: Hessian}`` of a tree from :func:`compressjax.collect_hessians` (``None`` leaves skipped), in
    tree order; ``TypeError`` naming a leaf that is neither."""
    out = {}
    for p, h in tree.leaves_with_paths(hessians, lambda x: isinstance(x, Hessian) or x is None):
        if h is not None and not isinstance(h, Hessian):
            raise TypeError(f"leaf {p!r}: expected a Hessian from collect_hessians, got {type(h).__name__}")
        if h is not None:
            out[p] = h
    return out


def kernel_infos(params: Any, hessians: Any) -> dict[str, tuple[KernelInfo, Any, Any]]:
    """``{path: (info, kernel, Hessian)}`` for every leaf of ``params`` with a :class:`Hessian`, in tree order."""
    hs = hessians_by_path(hessians)
    if not hs:
        raise ValueError("the hessians tree holds no Hessian: no kernel to allocate (check `where`)")
    leaves = dict(tree.leaves_with_paths(params, tree.is_compressed_leaf))
    out = {}
    for p, h in hs.items():
        if p not in leaves:
            raise ValueError(f"the hessians tree has a Hessian at {p!r}, which is not a leaf of params")
        w = leaves[p]
        if tree.is_compressed_leaf(w) or not tree.is_float_array(w):
            raise TypeError(f"leaf {p!r}: allocation needs a float kernel, got {type(w).__name__} {getattr(w, 'dtype', '')}")
        info = KernelInfo(p, tuple(int(d) for d in w.shape), tuple(h.in_axes), tuple(getattr(h, "layer_axes", ())))
        if int(getattr(h, "groups", 1)) != 1:
            raise ValueError(f"leaf {p!r}: grouped-convolution Hessians (groups={h.groups}) are not supported by the allocation")
        out[p] = (info, w, h)
    return out


def _exact(paths) -> str:
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def _only(hessians: Any, keep: set[str]) -> Any:
    """``hessians`` with ``None`` at every path not in ``keep``."""
    def visit(kp, h):
        return h if tree.path_to_str(kp) in keep else None

    return jax.tree_util.tree_map_with_path(visit, hessians, is_leaf=lambda x: isinstance(x, Hessian) or x is None)


def _layer_axes_by_path(hessians: Any) -> dict[str, tuple[int, ...]]:
    """``{path: layer axes}`` of every Hessian (``()`` for an unstacked kernel)."""
    return {p: tuple(getattr(h, "layer_axes", ()) or ())
            for p, h in tree.leaves_with_paths(hessians, lambda x: isinstance(x, Hessian) or x is None) if h is not None}


def solve_option(option: Option, params: Any, hessians: Any, paths: list[str]) -> dict[str, tuple[Any, Any]]:
    """Compresses the kernels ``paths`` of ``params`` with ``option``; ``{path: (leaf, keep_mask or None)}``.

    The public solvers do the work (one call for all the kernels, so kernels of one shape share one
    compilation): :func:`compressjax.gptq`, :func:`compressjax.sparsegpt`, :func:`compressjax.quantize_params`,
    :func:`compressjax.kmeans_codebooks` (+ :func:`compressjax.codebook_error_feedback` and
    :func:`compressjax.refit_centroids`). ``hessians`` holds a :class:`Hessian` at least at ``paths``.
    """
    keep = set(paths)
    leaves = dict(tree.leaves_with_paths(params, tree.is_compressed_leaf))
    if option.method == "float":
        return {p: (leaves[p], None) for p in paths}
    hs = _only(hessians, keep)
    masks = None
    if option.method == "gptq":
        out = gptq(params, hs, option.spec, act_order=option.act_order)
    elif option.method == "rtn":  # a stacked kernel keeps per-layer scales (the layer axes of its Hessian)
        axes = _layer_axes_by_path(hessians)
        rules = {_exact([p]): dataclasses.replace(option.spec, layer_axes=axes.get(p, ())) for p in paths}
        out = quantize_params(params, rules)
    elif option.method == "sparsegpt":
        sparsity = None if option.n is not None else float(option.sparsity)
        out, masks = sparsegpt(params, hs, sparsity, n=option.n, m=option.m, rules=option.spec)
    else:  # kmeans
        out = params
        axes_of = _layer_axes_by_path(hessians)
        by_axes: dict[tuple[int, ...], set[str]] = {}
        for p in paths:  # stacked kernels get one codebook set per layer, as their Hessians have
            by_axes.setdefault(axes_of.get(p, ()), set()).add(p)
        for axes, group in by_axes.items():
            out = kmeans_codebooks(out, option.bits, where=lambda p, _, group=group: p in group,
                                   per_channel=option.per_channel, layer_axes=axes)
        if option.error_feedback:
            out = codebook_error_feedback(out, params, hs)
            out = refit_centroids(out, params, hs)
    got = dict(tree.leaves_with_paths(out, tree.is_compressed_leaf))
    mk = {} if masks is None else dict(tree.leaves_with_paths(masks, tree.is_none_or_compressed))
    return {p: (got[p], mk.get(p)) for p in paths}


def _gptq_batches(options, todos: dict[int, list[str]], params: Any, hessians: Any) -> dict[int, dict[str, tuple[Any, Any]]]:
    """The GPTQ options that apply to the same kernels with the same ``act_order``, solved together by
    :func:`compressjax.gptq_many` (one factorisation per kernel, one compiled sweep for all their bit widths);
    ``{option index: solve_option's result}``."""
    groups: dict[tuple, list[int]] = {}
    for j, todo in todos.items():
        if options[j].method == "gptq":
            groups.setdefault((tuple(todo), options[j].act_order), []).append(j)
    out = {}
    for (todo, act_order), js in groups.items():
        if len(js) < 2:
            continue
        results = gptq_many(params, _only(hessians, set(todo)), [options[j].spec for j in js], act_order=act_order)
        for j, res in zip(js, results, strict=True):
            got = dict(tree.leaves_with_paths(res, tree.is_compressed_leaf))
            out[j] = {p: (got[p], None) for p in todo}
    return out


def leaf_bytes(leaves: list[Any]) -> list[int]:
    """Bytes each leaf takes in a file written by :func:`compressjax.save` (its streams, after zstd)."""
    if not leaves:
        return []
    return [int(s.stored_bytes) for s in size_report(list(leaves)).leaves]


@partial(jax.jit, static_argnames=("perm", "lead", "d_in"))
def _layer_error(w, w_hat, h, perm, lead, d_in):
    dw = (w_hat.astype(jnp.float32) - w.astype(jnp.float32)).transpose(perm)
    dw = dw.reshape(dw.shape[:lead] + (d_in, -1))
    hd = jnp.matmul(h, dw, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(hd * dw)


def _error_of(w: Any, w_hat: Any, h: Hessian, ndim: int) -> float:
    """``tr(dW^T H dW)`` for ``dW = w_hat - w`` of an ``ndim``-axis kernel, with the input and layer axes of
    its Hessian ``h``."""
    in_axes, lay = tuple(sorted(h.in_axes)), tuple(getattr(h, "layer_axes", ()))
    perm = lay + in_axes + tuple(a for a in range(ndim) if a not in in_axes and a not in lay)
    hh = jnp.asarray(h.h, jnp.float32)
    return float(_layer_error(jnp.asarray(w), w_hat, hh, perm, len(lay), hh.shape[-1]))


def layer_error(info: KernelInfo, w: Any, w_hat: Any, h: Hessian) -> float:
    """``tr(dW^T H dW)`` (summed over the layer axes of a stacked kernel) for ``dW = w_hat - w``."""
    return _error_of(w, decoded(w_hat), h, len(info.shape))


def perturbation_error(h: Hessian, dw: Any) -> float:
    """``tr(dW^T H dW)`` of a perturbation ``dw`` of a kernel with Hessian ``h`` (its layer axes summed over)."""
    dw = jnp.asarray(dw, jnp.float32)
    return _error_of(jnp.zeros((), jnp.float32), dw, h, dw.ndim)


@dataclasses.dataclass
class Candidates:
    """Costs and damages of every option on every kernel (the allocator's input).

    Attributes:
        paths: the kernels, in tree order.
        options: the menu.
        infos: each kernel's :class:`KernelInfo`.
        costs: ``(kernels, options)`` int64 bytes in the file; ``-1`` where the option does not apply.
        errors: ``(kernels, options)`` float64 layer output errors ``tr(dW^T H dW)``; ``inf`` where it does not apply.
        skipped: ``{(path, option name): reason}`` for the options that do not apply.
        results: ``{(path, option name): (leaf, mask)}``, kept when asked for (to apply a plan without
            solving again).
    """

    paths: tuple[str, ...]
    options: tuple[Option, ...]
    infos: tuple[KernelInfo, ...]
    costs: np.ndarray
    errors: np.ndarray
    skipped: dict
    results: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_weights(self) -> int:
        return sum(i.size for i in self.infos)


def option_costs_and_damages(params: Any, hessians: Any, menu: Any = None, *, keep_results: bool = False) -> Candidates:
    """Solves every option of ``menu`` on every kernel that has a Hessian; returns exact bytes and errors.

    Each option is solved once for all the kernels it applies to, from the same Hessians (from
    :func:`compressjax.collect_hessians`); the GPTQ options that apply to the same kernels are solved
    together by :func:`compressjax.gptq_many` (one factorisation per kernel, one compiled sweep). Its cost is the leaf's bytes in the library's file (measured by
    encoding the result with :func:`compressjax.size_report`, so scales, indices, positions and centroids
    are counted), its damage the layer output error ``tr(dW^T H dW)`` of the real result.

    Args:
        params: the float params.
        hessians: from :func:`compressjax.collect_hessians` (the selection: kernels with a Hessian).
        menu: a sequence of :class:`Option` (default :func:`default_menu`).
        keep_results: keep every compressed leaf in ``Candidates.results`` (memory: one copy of the kernels
            per option, compressed).

    Raises:
        ValueError: an empty menu, an option of an explicit menu that applies to no kernel (naming it and
            why), a kernel no option applies to, plus what the solvers raise.
        TypeError: a menu entry that is not an :class:`Option`, a Hessian at a leaf that is not a float kernel.
    """
    options, is_default = check_menu(menu)
    items = kernel_infos(params, hessians)
    paths = list(items)
    shape = (len(paths), len(options))
    costs = np.full(shape, -1, np.int64)
    errors = np.full(shape, np.inf, np.float64)
    skipped: dict = {}
    results: dict = {}
    todos: dict[int, list[str]] = {}
    for j, opt in enumerate(options):
        todo = []
        for p in paths:
            reason = why_not(opt, items[p][0])
            if reason is None:
                todo.append(p)
            else:
                skipped[(p, opt.name)] = reason
        if not todo and not is_default:
            example = next(iter(skipped[(p, opt.name)] for p in paths))
            raise ValueError(f"option {opt.name!r} applies to no selected kernel (e.g. {paths[0]!r}: {example})")
        if todo:
            todos[j] = todo
    batched = _gptq_batches(options, todos, params, hessians)
    for j, todo in todos.items():
        opt = options[j]
        solved = batched.pop(j) if j in batched else solve_option(opt, params, hessians, todo)
        sizes = leaf_bytes([solved[p][0] for p in todo])
        for p, nbytes in zip(todo, sizes, strict=True):
            i = paths.index(p)
            info, w, h = items[p]
            costs[i, j] = nbytes
            errors[i, j] = 0.0 if opt.method == "float" else layer_error(info, w, solved[p][0], h)
            if keep_results:
                results[(p, opt.name)] = solved[p]
        del solved
    for i, p in enumerate(paths):
        if not np.any(costs[i] >= 0):
            raise ValueError(f"no option of the menu applies to kernel {p!r}: " +
                             "; ".join(f"{o.name}: {skipped[(p, o.name)]}" for o in options))
    infos = tuple(items[p][0] for p in paths)
    return Candidates(tuple(paths), tuple(options), infos, costs, errors, skipped, results)
