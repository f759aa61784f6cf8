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
    """A kernel seen as a ``(d_in, d_out)`` matrix: its input axes first (kernel order), then the rest."""

    def __init__(self, shape: tuple[int, ...], in_axes: tuple[int, ...], path: str):
        self.shape = tuple(int(d) for d in shape)
        self.path = path
        nd = len(self.shape)
        if not in_axes or any(not 0 <= a < nd for a in in_axes) or len(set(in_axes)) != len(in_axes):
            raise ValueError(f"leaf {path!r}: Hessian input axes {in_axes} do not fit a kernel of shape {self.shape}")
        self.in_axes = tuple(sorted(in_axes))
        self.out_axes = tuple(a for a in range(nd) if a not in self.in_axes)
        self.perm = self.in_axes + self.out_axes
        self.inv = tuple(int(i) for i in np.argsort(self.perm))
        self.d_in = math.prod(self.shape[a] for a in self.in_axes)
        self.d_out = math.prod(self.shape[a] for a in self.out_axes)
        self.last_in = self.in_axes[-1]

    def to_2d(self, k: jax.Array) -> jax.Array:
        return jnp.transpose(k, self.perm).reshape(self.d_in, self.d_out)

    def from_2d(self, m: jax.Array) -> jax.Array:
        return m.reshape([self.shape[a] for a in self.perm]).transpose(self.inv)


def _as_hessian(path: str, hess: Any, leaf: Any) -> tuple[jax.Array, KernelLayout]:
    if isinstance(hess, Hessian):
        h, in_axes = hess.h, hess.in_axes
    elif hasattr(hess, "shape") and len(hess.shape) == 2:
        h = hess
        d = int(hess.shape[0])
        prods = np.cumprod([1, *leaf.shape])
        hits = [k for k in range(1, leaf.ndim + 1) if prods[k] == d]
        if not hits:
            raise ValueError(f"leaf {path!r}: a {tuple(hess.shape)} Hessian matches no leading axes of the kernel shape {tuple(leaf.shape)}")
        in_axes = tuple(range(hits[0]))
    else:
        raise TypeError(f"leaf {path!r}: expected a Hessian (from collect_hessians) or a (d_in, d_in) array, got {type(hess).__name__}")
    lay = KernelLayout(tuple(leaf.shape), in_axes, path)
    check_hessian_matrix(h, lay.d_in, path)
    return jnp.asarray(h, jnp.float32), lay


def hessian_items(params: Any, hessians: Any) -> dict[str, tuple[Any, jax.Array, KernelLayout]]:
    """``{path: (kernel, H, layout)}`` for every leaf of ``params`` that has a Hessian in ``hessians``.

    Raises:
        ValueError: a Hessian whose path is not a leaf of ``params``, a Hessian at an already quantized
            (``QArray``) leaf, no Hessian at all, a kernel with NaN/Inf, shapes that do not pair.
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


def build_qarray(path: str, leaf: Any, lay: KernelLayout, spec: QuantSpec, codes2d, scale2d, zp2d) -> QArray:
    """A :class:`QArray` holding a solver's own codes and scales.

    ``codes2d`` is int ``(d_in, d_out)``; ``scale2d``/``zp2d`` are ``(1, 1)`` (per tensor), ``(1, d_out)``
    (per output channel) or ``(d_in / g, d_out)`` (per group of ``g`` consecutive entries of the last input axis).
    """
    shape = lay.shape
    codes = lay.from_2d(codes2d)
    g = spec.group_size
    if g is None:
        if scale2d.shape == (1, 1):
            channel_axes: tuple[int, ...] = ()
            sshape = (1,) * len(shape)
            scale = scale2d.reshape(sshape)
            zp = None if zp2d is None else zp2d.reshape(sshape)
        else:
            channel_axes = lay.out_axes
            canon = [1] * len(lay.in_axes) + [shape[a] for a in lay.out_axes]
            scale = scale2d.reshape(canon).transpose(lay.inv)
            zp = None if zp2d is None else zp2d.reshape(canon).transpose(lay.inv)
        return QArray(store_codes(codes, spec.bits), scale.astype(jnp.float32), None if zp is None else zp.astype(jnp.int32),
                      bits=spec.bits, shape=shape, dtype=leaf.dtype, channel_axes=channel_axes, path=path)
    a = lay.last_in
    # Canonical grouped order: other input axes, (groups, 1), output axes. Kernel grouped order: axes in
    # kernel order with axis a split into (groups, group_size).
    canon_labels = [(b, 0) for b in lay.in_axes[:-1]] + [(a, 0), (a, 1)] + [(b, 0) for b in lay.out_axes]
    canon_shape = [shape[b] for b in lay.in_axes[:-1]] + [shape[a] // g, 1] + [shape[b] for b in lay.out_axes]
    kernel_labels = sorted(canon_labels)
    perm = [canon_labels.index(lab) for lab in kernel_labels]
    scale = scale2d.reshape(canon_shape).transpose(perm)
    zp = None if zp2d is None else zp2d.reshape(canon_shape).transpose(perm)
    channel_axes = tuple(b for b in range(len(shape)) if b != a)
    return QArray(store_codes(codes, spec.bits), scale.astype(jnp.float32), None if zp is None else zp.astype(jnp.int32),
                  bits=spec.bits, shape=shape, dtype=leaf.dtype, channel_axes=channel_axes, group_size=g, group_axis=a, path=path)


def place(mesh, w2d: jax.Array, h: jax.Array):
    """Shards the output channels (columns) of ``w2d`` over every axis of ``mesh``; ``h`` is replicated."""
    if mesh is None:
        return w2d, h
    mesh = auto_mesh(mesh)
    P = jax.sharding.PartitionSpec
    n = math.prod(mesh.shape.values())
    spec = P(None, tuple(mesh.axis_names)) if w2d.shape[1] % n == 0 else P()
    return (jax.device_put(w2d, jax.sharding.NamedSharding(mesh, spec)), jax.device_put(h, jax.sharding.NamedSharding(mesh, P())))


def check_finite_result(path: str, ok, damp) -> None:
    if not bool(ok):
        raise ValueError(
            f"leaf {path!r}: the Hessian is not positive definite even after damping (damp={damp}); "
            "raise damp or collect more calibration data"
        )
