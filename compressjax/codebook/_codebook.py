"""The :class:`Codebook` leaf and its index packing (see :mod:`compressjax.codebook`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.bitpack import pack, packed_nbytes, unpack
from compressjax.tree import CompressedLeaf, pytree_node

INITS = ("density", "linear", "random")
DEFAULT_ITERATIONS = 1000


def is_codebook(x: Any) -> bool:
    """``is_leaf`` predicate that keeps :class:`Codebook` nodes whole when flattening a tree."""
    return isinstance(x, Codebook)


_pack_jit = jax.jit(pack, static_argnums=1)
_unpack_jit = jax.jit(unpack, static_argnums=(1, 2))


@pytree_node(children=("indices", "centroids"),
             static=("bits", "shape", "dtype", "per_channel", "zero_reserved", "layer_axes"))
class Codebook(CompressedLeaf):
    """A weight-shared array: packed integer indices into float centroids, and static metadata.

    A pytree *node* whose children are ``indices`` and ``centroids`` (so it crosses ``jit``, ``grad`` and
    ``device_put``); ``bits``, ``shape``, ``dtype``, ``per_channel``, ``zero_reserved`` and ``layer_axes`` are
    static. It carries ``_cj_compressed_leaf = True``: compressjax's tree utilities treat it as one leaf.
    When flattening a tree yourself, pass ``is_leaf=compressjax.codebook.is_codebook``.

    Attributes:
        indices: ``uint8`` bit stream of ``ceil(size * bits / 8)`` bytes (see :mod:`compressjax.bitpack`).
        centroids: float array (float32 by default; float16 / bfloat16 to store them smaller), shape
            ``(*layer_shape, 2^bits)``, or ``(*layer_shape, shape[-1], 2^bits)`` with ``per_channel``
            (``layer_shape``: the sizes of ``layer_axes``, empty by default).
        bits: index width, 1 to 8.
        shape, dtype: the decoded array's shape and floating-point dtype.
        per_channel: one codebook per output channel (the last axis) instead of one per array.
        zero_reserved: index 0 always decodes to exactly ``0`` whatever ``centroids[..., 0]`` holds (the
            pruned weights' code, so they stay zero through training; its gradient is zero).
        layer_axes: axes that index independent kernels stacked in one leaf (the scan axis of a stacked
            ``(L, in, out)`` kernel, MoE experts): every layer slice has its own codebook(s), as it has its own
            scales in a :class:`~compressjax.QArray`. Sorted; ``()`` (default): the codebooks span the leaf.
    """

    def __init__(self, indices, centroids, *, bits, shape, dtype=jnp.float32, per_channel=False, zero_reserved=False,
                 layer_axes=(), path: str = "Codebook"):
        layer_axes = _check_parts(indices, centroids, bits, shape, dtype, per_channel, zero_reserved, layer_axes, path)
        self.indices, self.centroids = indices, centroids
        self.bits, self.shape, self.dtype = int(bits), tuple(int(d) for d in shape), jnp.dtype(dtype)
        self.per_channel, self.zero_reserved = bool(per_channel), bool(zero_reserved)
        self.layer_axes = layer_axes

    @classmethod
    def from_indices(cls, indices, centroids, *, bits, dtype=jnp.float32, per_channel=False, zero_reserved=False,
                     layer_axes=(), path: str = "Codebook") -> Codebook:
        """Builds a Codebook from unpacked integer indices (any integer dtype, the array's shape)."""
        idx = jnp.asarray(indices)
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"leaf {path!r}: indices must be integers, got dtype {idx.dtype}")
        _check_bits(bits, path)
        if not isinstance(idx, jax.core.Tracer) and idx.size:
            lo, hi = int(jnp.min(idx)), int(jnp.max(idx))
            if lo < 0 or hi >= 1 << int(bits):
                bad = lo if lo < 0 else hi
                raise ValueError(f"leaf {path!r}: index {bad} is outside [0, {(1 << int(bits)) - 1}] for {bits} bits")
        return cls(_pack_jit(idx, int(bits)), centroids, bits=bits, shape=idx.shape, dtype=dtype,
                   per_channel=per_channel, zero_reserved=zero_reserved, layer_axes=layer_axes, path=path)

    def validate(self, path: str = "Codebook") -> None:
        """Raises ``ValueError`` / ``TypeError`` naming ``path`` if the parts disagree with the metadata."""
        _check_parts(self.indices, self.centroids, self.bits, self.shape, self.dtype, self.per_channel,
                     self.zero_reserved, self.layer_axes, path)

    @property
    def num_centroids(self) -> int:
        """Entries per codebook, ``2^bits`` (the reserved zero included)."""
        return 1 << self.bits

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The sizes of ``layer_axes`` (``()`` for an unstacked codebook)."""
        return tuple(self.shape[a] for a in self.layer_axes)

    @property
    def num_codebooks(self) -> int:
        return math.prod(self.layer_shape) * (self.shape[-1] if self.per_channel else 1)

    def book_ids(self) -> jax.Array | None:
        """``int32`` of ``shape``: the codebook (row of ``centroids.reshape(-1, 2^bits)``) of every weight, or
        ``None`` when one codebook serves the whole leaf."""
        return book_ids(self.shape, self.per_channel, self.layer_axes)

    @property
    def nbytes(self) -> int:
        """Honest storage bytes: the packed indices plus the centroids in their dtype."""
        return int(self.indices.size) + int(self.centroids.size) * jnp.dtype(self.centroids.dtype).itemsize

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.size if self.size else 0.0

    def index_array(self) -> jax.Array:
        """The unpacked indices as ``int32`` of shape ``shape``."""
        return unpack(self.indices, self.bits, self.size).astype(jnp.int32).reshape(self.shape)

    def decode(self) -> jax.Array:
        """The float weights: ``centroids[index]`` (per channel: ``centroids[channel, index]``), in ``dtype``.

        A ``jnp.take`` of the centroids, so ``jax.grad`` with respect to ``centroids`` is the sum of the
        gradients of the weights sharing each centroid (Han et al., 2016, eq. 3), with no custom rule.
        """
        if self.size == 0:  # e.g. zero output channels: nothing to look up (and no channel stride to reshape by)
            return jnp.zeros(self.shape, self.dtype)
        u = unpack(self.indices, self.bits, self.size).astype(jnp.int32)
        ids = self.book_ids()
        if ids is None:
            vals = jnp.take(self.centroids, u, mode="clip")
        else:
            vals = jnp.take(self.centroids.reshape(-1), u + ids.reshape(-1) * self.num_centroids, mode="clip")
        if self.zero_reserved:
            vals = jnp.where(u == 0, jnp.zeros((), vals.dtype), vals)
        return vals.astype(self.dtype).reshape(self.shape)

    def with_centroids(self, centroids) -> Codebook:
        """The same indices with new centroids (same shape; any floating dtype, e.g. float16 for storage)."""
        return Codebook(self.indices, centroids, bits=self.bits, shape=self.shape, dtype=self.dtype,
                        per_channel=self.per_channel, zero_reserved=self.zero_reserved, layer_axes=self.layer_axes)

    def with_indices(self, indices) -> Codebook:
        """The same centroids with new unpacked integer indices (of ``shape``), packed at ``bits``."""
        return Codebook(_pack_jit(jnp.asarray(indices), self.bits), self.centroids, bits=self.bits, shape=self.shape,
                        dtype=self.dtype, per_channel=self.per_channel, zero_reserved=self.zero_reserved,
                        layer_axes=self.layer_axes)

    def astype_centroids(self, dtype) -> Codebook:
        """The same codebook with its centroids cast to ``dtype`` (``jnp.float16`` halves their bytes)."""
        return self.with_centroids(jnp.asarray(self.centroids).astype(dtype))

    @classmethod
    def join_slices(cls, parts: list[Codebook], axis: int, new: bool, path: str = "Codebook") -> Codebook:
        """Per-slice codebooks (e.g. :func:`~compressjax.sequential`'s, one per scan iteration) as one leaf.

        ``new``: stacked along a new axis ``axis``, each slice keeping its own centroids (``layer_axes`` gains
        ``axis``). Otherwise concatenated along the existing ``axis``, which must be the channel axis of
        per-channel codebooks (the groups of a grouped convolution).
        """
        c0 = parts[0]
        for c in parts[1:]:
            if (c.bits, c.shape, c.dtype, c.per_channel, c.zero_reserved, c.layer_axes) != (
                c0.bits, c0.shape, c0.dtype, c0.per_channel, c0.zero_reserved, c0.layer_axes
            ):
                raise ValueError(f"leaf {path!r}: the slices' Codebooks differ in layout ({c0!r} and {c!r}); they "
                                 "cannot be joined")
        idx = [c.index_array() for c in parts]
        if new:
            layer_axes = tuple(sorted([a + (a >= axis) for a in c0.layer_axes] + [axis]))
            centroids = jnp.stack([c.centroids for c in parts], layer_axes.index(axis))
            codes = jnp.stack(idx, axis)
        else:
            if not (c0.per_channel and axis == c0.ndim - 1):
                raise ValueError(f"leaf {path!r}: joining codebooks along axis {axis} needs per-channel codebooks on "
                                 f"that (last) axis, got {c0!r}")
            layer_axes = c0.layer_axes
            centroids = jnp.concatenate([c.centroids for c in parts], len(layer_axes))
            codes = jnp.concatenate(idx, axis)
        return cls.from_indices(codes, centroids, bits=c0.bits, dtype=c0.dtype, per_channel=c0.per_channel,
                                zero_reserved=c0.zero_reserved, layer_axes=layer_axes, path=path)

    def __repr__(self) -> str:
        kind = f"{self.shape[-1]} per-channel codebooks" if self.per_channel else "one codebook"
        if self.layer_axes:
            kind += f" per layer (layer axes {self.layer_axes})"
        zero = ", zero reserved" if self.zero_reserved else ""
        return f"Codebook(shape={self.shape}, dtype={self.dtype.name}, bits={self.bits}, {kind}{zero})"


def centroid_shape(shape: tuple[int, ...], bits: int, per_channel: bool, layer_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a Codebook's centroids: ``(*layer sizes, [channels,] 2^bits)``."""
    return (*(shape[a] for a in layer_axes), *((shape[-1],) if per_channel else ()), 1 << int(bits))


def check_layer_axes(layer_axes: Any, shape: tuple[int, ...], per_channel: bool, path: str) -> tuple[int, ...]:
    """``layer_axes`` as a sorted tuple of distinct non-negative axes of ``shape`` (negative ones wrap), checked:
    a per-channel codebook's channel axis (the last) cannot also be a layer axis."""
    try:
        axes = tuple(int(a) for a in layer_axes)
    except TypeError:
        raise TypeError(f"leaf {path!r}: Codebook layer_axes must be a tuple of ints, got {layer_axes!r}") from None
    if any(isinstance(a, bool) for a in layer_axes) or any(not -len(shape) <= a < len(shape) for a in axes):
        raise ValueError(f"leaf {path!r}: Codebook layer_axes {layer_axes!r} are not axes of the shape {shape}")
    axes = tuple(sorted(a % len(shape) for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"leaf {path!r}: Codebook layer_axes {layer_axes!r} repeat an axis")
    if per_channel and len(shape) - 1 in axes:
        raise ValueError(f"leaf {path!r}: the last axis of {shape} holds the per-channel codebooks; it cannot also be a "
                         f"layer axis (layer_axes={layer_axes!r})")
    return axes


def book_ids(shape: tuple[int, ...], per_channel: bool, layer_axes: tuple[int, ...]) -> jax.Array | None:
    """The codebook of every weight of a ``shape`` leaf, ``int32``: layer-major (the layer axes in order), then
    the channel; ``None`` when there is only one codebook."""
    if not layer_axes and not per_channel:
        return None
    ids = jnp.zeros(shape, jnp.int32)
    for a in layer_axes:
        ids = ids * shape[a] + jax.lax.broadcasted_iota(jnp.int32, shape, a)
    if per_channel:
        ids = ids * shape[-1] + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return ids


def _check_parts(indices, centroids, bits, shape, dtype, per_channel, zero_reserved, layer_axes, path: str) -> tuple[int, ...]:
    """The checks of :meth:`Codebook.validate` on the parts, before a Codebook holds them; returns the
    normalised ``layer_axes``."""
    _check_bits(bits, path)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"leaf {path!r}: Codebook shape must be a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"leaf {path!r}: Codebook shape {shape} has a negative dimension")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"leaf {path!r}: Codebook dtype {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"leaf {path!r}: Codebook dtype {dtype} is not a floating-point dtype")
    for name, flag in (("per_channel", per_channel), ("zero_reserved", zero_reserved)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"leaf {path!r}: Codebook {name} must be a bool, got {flag!r}")
    if per_channel and not shape:
        raise ValueError(f"leaf {path!r}: per_channel codebooks need an array with at least one axis")
    layer_axes = check_layer_axes(layer_axes, shape, per_channel, path)
    v = indices
    want = (packed_nbytes(math.prod(shape), int(bits)),)
    if not hasattr(v, "shape") or jnp.dtype(v.dtype) != jnp.uint8 or tuple(v.shape) != want:
        got = (jnp.dtype(v.dtype), tuple(v.shape)) if hasattr(v, "shape") else type(v).__name__
        raise ValueError(f"leaf {path!r}: a {bits}-bit Codebook of shape {shape} needs packed uint8 "
                         f"indices of shape {want}, got {got}")
    c = centroids
    want_c = centroid_shape(shape, bits, per_channel, layer_axes)
    if not hasattr(c, "shape") or not jnp.issubdtype(c.dtype, jnp.floating) or tuple(c.shape) != want_c:
        got = (jnp.dtype(c.dtype), tuple(c.shape)) if hasattr(c, "shape") else type(c).__name__
        raise ValueError(f"leaf {path!r}: a {bits}-bit Codebook of shape {shape} needs floating-point "
                         f"centroids of shape {want_c}, got {got}")
    return layer_axes


def _check_bits(bits: Any, path: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"leaf {path!r}: bits must be an int in 1..8, got {bits!r}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"leaf {path!r}: bits must be in 1..8, got {bits!r}")


