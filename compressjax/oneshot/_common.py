"""Shared plumbing of the one-shot solvers: pairing Hessians with kernels, kernel layouts, QArray building."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.hessians import Hessian, auto_mesh
from compressjax.oneshot._sweep import check_hessian_matrix
from compressjax.qarray import QArray, QuantSpec, pack_codes

__all__ = ["KernelLayout", "hessian_items", "map_hessian_leaves", "spec_plan", "build_qarray", "place", "is_qarray"]


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


class KernelLayout:
    """A kernel seen as ``B`` independent ``(d_in, d_out_g)`` matrices (``B = layers x groups``).

    Axes: ``layer_axes`` index independent kernels (a stacked ``(L, in, out)`` kernel, MoE experts), ``in_axes``
    are contracted with the input, the rest are output axes. With ``groups = G > 1`` (a grouped or depthwise
    convolution) the flattened output axes split into ``G`` contiguous blocks, block ``g`` paired with the
    Hessian of group ``g``. Canonical order: layer axes, input axes, output axes (each in kernel order).
    """

    def __init__(self, shape: tuple[int, ...], in_axes: tuple[int, ...], path: str, layer_axes: tuple[int, ...] = (), groups: int = 1):
        self.shape = tuple(int(d) for d in shape)
        self.path = path
        nd = len(self.shape)
        if not in_axes or any(not 0 <= a < nd for a in in_axes) or len(set(in_axes)) != len(in_axes):
            raise ValueError(f"leaf {path!r}: Hessian input axes {in_axes} do not fit a kernel of shape {self.shape}")
        layer_axes = tuple(int(a) for a in layer_axes)
        if any(not 0 <= a < nd for a in layer_axes) or len(set(layer_axes)) != len(layer_axes) or set(layer_axes) & set(in_axes):
            raise ValueError(f"leaf {path!r}: Hessian layer axes {layer_axes} (input axes {tuple(in_axes)}) do not fit a kernel of shape {self.shape}")
        self.layer_axes = tuple(sorted(layer_axes))
        self.in_axes = tuple(sorted(in_axes))
        self.out_axes = tuple(a for a in range(nd) if a not in self.in_axes and a not in self.layer_axes)
        self.perm = self.layer_axes + self.in_axes + self.out_axes
        self.inv = tuple(int(i) for i in np.argsort(self.perm))
        self.layer_shape = tuple(self.shape[a] for a in self.layer_axes)
        self.n_layers = math.prod(self.layer_shape)
        self.d_in = math.prod(self.shape[a] for a in self.in_axes)
        self.d_out = math.prod(self.shape[a] for a in self.out_axes)
        self.last_in = self.in_axes[-1]
        if isinstance(groups, bool) or not isinstance(groups, int | np.integer) or groups < 1:
            raise ValueError(f"leaf {path!r}: Hessian groups must be a positive int, got {groups!r}")
        self.groups = int(groups)
        if self.d_out % self.groups:
            raise ValueError(f"leaf {path!r}: {self.groups} Hessian groups do not divide the {self.d_out} output channels (shape {self.shape})")
        self.d_out_g = self.d_out // self.groups
        self.batch = self.n_layers * self.groups
        self.stacked = bool(self.layer_axes) or self.groups > 1
        self.size = math.prod(self.shape)

    @property
    def h_shape(self) -> tuple[int, ...]:
        """The shape a stacked Hessian's ``h`` must have: ``(*layer_shape, [groups,] d_in, d_in)``."""
        return self.layer_shape + ((self.groups,) if self.groups > 1 else ()) + (self.d_in, self.d_in)

    def to_2d(self, k: jax.Array) -> jax.Array:
        """Unstacked kernels only: the ``(d_in, d_out)`` matrix."""
        return jnp.transpose(k, self.perm).reshape(self.d_in, self.d_out)

    def from_2d(self, m: jax.Array) -> jax.Array:
        return m.reshape([self.shape[a] for a in self.perm]).transpose(self.inv)

    def to_3d(self, k: jax.Array) -> jax.Array:
        """``(batch, d_in, d_out_g)``: slice ``l * groups + g`` is layer ``l``'s (flattened) group ``g``."""
        m = jnp.transpose(k, self.perm).reshape(self.n_layers, self.d_in, self.groups, self.d_out_g)
        return m.transpose(0, 2, 1, 3).reshape(self.batch, self.d_in, self.d_out_g)

    def from_3d(self, m: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_3d` (any trailing ``(rows, d_out_g)`` matrix per slice, e.g. codes)."""
        m = m.reshape(self.n_layers, self.groups, self.d_in, self.d_out_g).transpose(0, 2, 1, 3)
        return m.reshape([self.shape[a] for a in self.perm]).transpose(self.inv)

    def slice_name(self, b: int) -> str:
        """A readable name of slice ``b`` for error messages, e.g. ``layer (2,) group 1``."""
        layer, g = divmod(int(b), self.groups)
        parts = []
        if self.layer_axes:
            parts.append(f"layer {tuple(int(i) for i in np.unravel_index(layer, self.layer_shape))} (axes {self.layer_axes})")
        if self.groups > 1:
            parts.append(f"group {g}")
        return " ".join(parts) or "the kernel"


def _count_check(path: str, count: Any, lay: KernelLayout) -> None:
    """A Hessian summed over zero input rows (for any slice) is an error: the solvers would wipe the kernel."""
    if count is None or isinstance(count, jax.core.Tracer):
        return
    c = np.asarray(count)
    want = lay.h_shape[:-2]
    if c.size == 1:  # one count for every slice (e.g. the same rows reach every group)
        c = np.broadcast_to(c.reshape(()), (lay.batch,))
    if c.size != lay.batch:
        raise ValueError(f"leaf {path!r}: Hessian count has shape {c.shape}, expected {want} (one count per layer / group)")
    zero = np.flatnonzero(c.reshape(-1) == 0)
    if zero.size:
        raise ValueError(
            f"leaf {path!r}: the Hessian of {lay.slice_name(zero[0])} was built from zero input rows (count == 0"
            f"{f' for {zero.size} of {c.size} slices' if c.size > 1 else ''}): a row_mask that is False everywhere or an "
            "empty batch; the solver would wipe the kernel. Calibrate on rows that reach it, or drop its Hessian"
        )


def _as_hessian(path: str, hess: Any, leaf: Any) -> tuple[jax.Array, KernelLayout]:
    count = None
    if isinstance(hess, Hessian):
        h, in_axes, count = hess.h, hess.in_axes, hess.count
        layer_axes, groups = tuple(getattr(hess, "layer_axes", ()) or ()), getattr(hess, "groups", 1)
    elif hasattr(hess, "shape") and len(hess.shape) == 2:
        h = hess
        d = int(hess.shape[0])
        prods = np.cumprod([1, *leaf.shape])
        hits = [k for k in range(1, leaf.ndim + 1) if prods[k] == d]
        if not hits:
            raise ValueError(f"leaf {path!r}: a {tuple(hess.shape)} Hessian matches no leading axes of the kernel shape {tuple(leaf.shape)}")
        in_axes, layer_axes, groups = tuple(range(hits[0])), (), 1
    else:
        raise TypeError(f"leaf {path!r}: expected a Hessian (from collect_hessians) or a (d_in, d_in) array, got {type(hess).__name__}")
    lay = KernelLayout(tuple(leaf.shape), in_axes, path, layer_axes, groups)
    if lay.stacked:
        if tuple(getattr(h, "shape", ())) != lay.h_shape:
            raise ValueError(
                f"leaf {path!r}: stacked Hessian has shape {tuple(getattr(h, 'shape', ()))}, expected {lay.h_shape} "
                f"(layer axes {lay.layer_axes}, groups {lay.groups}, {lay.d_in} input rows) for the kernel shape {lay.shape}"
            )
        check_hessian_matrix(h, lay.d_in, path, batch=lay.h_shape[:-2])
    else:
        check_hessian_matrix(h, lay.d_in, path)
    if lay.size:  # a zero-size kernel passes through whatever its count
        _count_check(path, count, lay)
    return jnp.asarray(h, jnp.float32).reshape(lay.batch, lay.d_in, lay.d_in), lay


def hessian_items(params: Any, hessians: Any) -> dict[str, tuple[Any, jax.Array, KernelLayout]]:
    """``{path: (kernel, H, layout)}`` for every leaf of ``params`` that has a Hessian in ``hessians``.

    ``H`` is float32 ``(layout.batch, d_in, d_in)``: one matrix per layer slice and group (``batch == 1`` for
    an ordinary kernel). Hessians may be stacked (``layer_axes``, ``groups``; see ``CONTRACT``: ``h`` of shape
    ``(*layer_shape, [groups,] d_in, d_in)``).

    Raises:
        ValueError: a Hessian whose path is not a leaf of ``params``, a Hessian at an already quantized
            (``QArray``) leaf, no Hessian at all, a kernel with NaN/Inf, shapes that do not pair, a Hessian
            built from zero rows (``count == 0`` for any slice).
        TypeError: a Hessian at a leaf that is not a float array.
    """
    hs = {p: h for p, h in tree.leaves_with_paths(hessians, lambda x: isinstance(x, Hessian) or x is None) if h is not None}
    if not hs:
        raise ValueError("the hessians tree holds no Hessian: nothing to compress (check `where` of collect_hessians)")
    leaves = dict(tree.leaves_with_paths(params, is_qarray))
    out = {}
    for path, h in hs.items():
        if path not in leaves:
            raise ValueError(f"the hessians tree has a Hessian at {path!r}, which is not a leaf of params (leaves: {list(leaves)[:8]})")
        leaf = leaves[path]
        if isinstance(leaf, QArray):
            raise ValueError(f"leaf {path!r} is already quantized ({leaf!r}) but has a Hessian; drop it from the hessians tree")
        if not tree.is_float_array(leaf):
            raise TypeError(f"leaf {path!r} has dtype {getattr(leaf, 'dtype', type(leaf).__name__)}; a one-shot solver needs a float kernel")
        tree.check_finite(path, leaf)
        H, lay = _as_hessian(path, h, leaf)
        out[path] = (leaf, H, lay)
    return out


def map_hessian_leaves(params: Any, new: dict[str, Any], fill: Callable[[str, Any], Any] | None = None) -> Any:
    """``params`` with ``new[path]`` at the given paths; other leaves kept (or ``fill(path, leaf)``)."""

    def visit(kp, leaf):
        p = tree.path_to_str(kp)
        if p in new:
            return new[p]
        return leaf if fill is None else fill(p, leaf)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)


def spec_plan(items: dict, rules: Any) -> dict[str, QuantSpec]:
    """The :class:`QuantSpec` of every leaf with a Hessian, matched by ``rules`` like ``quantize_params``."""
    from compressjax.quantization import resolve_rules

    sub = {p: leaf for p, (leaf, _, _) in items.items()}
    try:
        plan = resolve_rules(sub, rules, on_unmatched="ignore")
    except ValueError as e:
        if "quantize no leaf" not in str(e):
            raise
        plan = {}
    for path, (leaf, _, lay) in items.items():
        spec = plan.get(path)
        if spec is None:
            raise ValueError(f"leaf {path!r} has a Hessian but no rule of {rules!r} quantizes it; add a rule or drop its Hessian")
        if not 2 <= spec.bits <= 8:
            raise ValueError(f"leaf {path!r}: one-shot quantization supports 2 to 8 bits, got bits={spec.bits}")
        if spec.layer_axes is not None and tuple(sorted(a % leaf.ndim for a in spec.layer_axes)) != lay.layer_axes:
            raise ValueError(
                f"leaf {path!r}: the spec declares layer_axes={spec.layer_axes} but the Hessian records layer axes "
                f"{lay.layer_axes} for the kernel shape {lay.shape}; the solver solves (and scales) per Hessian slice"
            )
        g = spec.group_size
        if g is not None:
            if spec.group_axis is not None and spec.group_axis % leaf.ndim != lay.last_in:
                raise ValueError(
                    f"leaf {path!r}: groups run along the kernel's last input axis ({lay.last_in}), got group_axis={spec.group_axis}"
                )
            n = lay.shape[lay.last_in]
            if n % g:
                raise ValueError(f"leaf {path!r}: group_size={g} does not divide the input axis {lay.last_in} of length {n} (shape {lay.shape})")
    return plan


def store_codes(codes: jax.Array, bits: int) -> jax.Array:
    if bits > 4:
        return codes.astype(jnp.int8)
    return pack_codes((codes.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8), bits)


def build_qarray(path: str, leaf: Any, lay: KernelLayout, spec: QuantSpec, codes3, scale3, zp3) -> QArray:
    """A :class:`QArray` holding a solver's own codes and scales, in the kernel's (stacked) layout.

    ``codes3`` is int ``(batch, d_in, d_out_g)``; ``scale3``/``zp3`` are ``(batch, 1, 1)`` (per tensor),
    ``(batch, 1, d_out_g)`` (per output channel) or ``(batch, d_in / g, d_out_g)`` (per group of ``g``
    consecutive entries of the last input axis). The layer axes always keep their own scales (they join the
    QArray's ``channel_axes``); per-tensor scales of a grouped convolution become per output channel (each
    channel holds its group's scale), since a QArray has no per-group-of-channels granularity.
    """
    shape, L, G, dg = lay.shape, lay.n_layers, lay.groups, lay.d_out_g
    codes = lay.from_3d(codes3)
    g = spec.group_size
    per_tensor = g is None and spec.channel_axes == () and G == 1

    def canon(a):  # (batch, S, d_out_g or 1) -> (L, S, d_out) (or (L, 1, 1) per tensor)
        if a is None:
            return None
        if per_tensor:
            return a.reshape(L, 1, 1)
        a = jnp.broadcast_to(a, a.shape[:2] + (dg,))
        return a.reshape(L, G, a.shape[1], dg).transpose(0, 2, 1, 3).reshape(L, a.shape[1], G * dg)

    s3, z3 = canon(scale3), canon(zp3)
    layer_shape = list(lay.layer_shape)
    ones_in = [1] * len(lay.in_axes)
    if g is None:
        if per_tensor:
            channel_axes: tuple[int, ...] = lay.layer_axes
            cshape = layer_shape + ones_in + [1] * len(lay.out_axes)
        else:
            channel_axes = tuple(sorted(lay.layer_axes + lay.out_axes))
            cshape = layer_shape + ones_in + [shape[a] for a in lay.out_axes]
        fix = lambda a: None if a is None else a.reshape(cshape).transpose(lay.inv)  # noqa: E731
        scale, zp = fix(s3), fix(z3)
        return QArray(store_codes(codes, spec.bits), scale.astype(jnp.float32), None if zp is None else zp.astype(jnp.int32),
                      bits=spec.bits, shape=shape, dtype=leaf.dtype, channel_axes=channel_axes, path=path)
    a = lay.last_in
    # Canonical grouped order: layer axes, other input axes, (groups, 1), output axes. Kernel grouped order:
    # axes in kernel order with axis a split into (groups, group_size).
    canon_labels = [(b, 0) for b in lay.layer_axes] + [(b, 0) for b in lay.in_axes[:-1]] + [(a, 0), (a, 1)] + [(b, 0) for b in lay.out_axes]
    canon_shape = layer_shape + [shape[b] for b in lay.in_axes[:-1]] + [shape[a] // g, 1] + [shape[b] for b in lay.out_axes]
    kernel_labels = sorted(canon_labels)
    perm = [canon_labels.index(lab) for lab in kernel_labels]
    scale = s3.reshape(canon_shape).transpose(perm)
    zp = None if z3 is None else z3.reshape(canon_shape).transpose(perm)
    channel_axes = tuple(b for b in range(len(shape)) if b != a)
    return QArray(store_codes(codes, spec.bits), scale.astype(jnp.float32), None if zp is None else zp.astype(jnp.int32),
                  bits=spec.bits, shape=shape, dtype=leaf.dtype, channel_axes=channel_axes, group_size=g, group_axis=a, path=path)


def place(mesh, w: jax.Array, h: jax.Array):
    """Shards the output channels (last axis) of ``w`` (``(d_in, d_out)`` or stacked ``(batch, d_in, d_out_g)``)
    over every axis of ``mesh``; ``h`` is replicated."""
    if mesh is None:
        return w, h
    mesh = auto_mesh(mesh)
    P = jax.sharding.PartitionSpec
    n = math.prod(mesh.shape.values())
    lead = (None,) * (w.ndim - 1)
    spec = P(*lead, tuple(mesh.axis_names)) if w.shape[-1] % n == 0 else P()
    return (jax.device_put(w, jax.sharding.NamedSharding(mesh, spec)), jax.device_put(h, jax.sharding.NamedSharding(mesh, P())))


def check_finite_result(path: str, ok, damp, lay: KernelLayout | None = None) -> None:
    """Raises naming ``path`` (and the first failing slice of a stacked kernel) when a factorisation failed."""
    ok = np.asarray(ok).reshape(-1)
    if not ok.all():
        where = "" if lay is None or not lay.stacked else f" ({lay.slice_name(int(np.flatnonzero(~ok)[0]))})"
        raise ValueError(
            f"leaf {path!r}{where}: the Hessian is not positive definite even after damping (damp={damp}); "
            "raise damp or collect more calibration data"
        )


def zero_size_result(lay: KernelLayout, spec: QuantSpec | None, leaf: Any, prune: bool) -> dict[str, Any]:
    """What :func:`solve` would return for a zero-size kernel (nothing to solve): the kernel itself, all kept,
    code 0, scale 1 (as ``quantize`` does for zero-size leaves)."""
    B, d_in, dg = lay.batch, lay.d_in, lay.d_out_g
    out: dict[str, Any] = {"ok": jnp.ones((B,), bool)}
    if prune:
        out["keep"] = jnp.ones((B, d_in, dg), bool)
    if spec is None:
        out["q"] = lay.to_3d(jnp.asarray(leaf, jnp.float32))
        return out
    g = spec.group_size
    rows = 1 if g is None else d_in // g
    cols = 1 if (g is None and spec.channel_axes == ()) else dg
    out["codes"] = jnp.zeros((B, d_in, dg), jnp.int8)
    out["scale"] = jnp.ones((B, rows, cols), jnp.float32)
    out["zp"] = None if spec.symmetric else jnp.zeros((B, rows, cols), jnp.float32)
    return out
