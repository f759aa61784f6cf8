"""Quantization specs, the packed :class:`QArray` container and its export helpers.

Numerics used everywhere in compressjax:

* **Symmetric b-bit** (``2 <= b <= 8``): integer codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the lone
  ``-2^(b-1)`` is never used), ``x_hat = q * scale``.
* **Asymmetric b-bit**: codes in ``[-2^(b-1), 2^(b-1)-1]`` (all ``2^b`` levels) and an integer zero point,
  ``x_hat = (q - zero_point) * scale``.
* **1 bit** (XNOR-Net binary weights, Rastegari et al., 2016): codes ``-1`` or ``+1`` (``sign(x)`` with
  ``sign(0) = +1``), ``x_hat = q * scale`` with ``scale = mean|x|`` per channel.

Storage: codes of 4 bits or fewer are bit-packed into a flat ``uint8`` array (two int4, four int2, eight
1-bit codes per byte; 3-bit codes as a dense bit stream), codes of 5 to 8 bits are ``int8`` in the
original shape. Packing layout (what :meth:`QArray.to_parts` exports): flatten the codes in C order,
store the *unsigned* code ``u = q + 2^(b-1)`` (``u = (q + 1) / 2`` for 1 bit), code ``i`` at bits
``[b*i, b*i + b)`` of a little-endian bit stream; the stream takes ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax.bitpack import pack, packed_nbytes, unpack
from compressjax.tree import CompressedLeaf, pytree_node

__all__ = [
    "QuantSpec",
    "QArray",
    "code_range",
]

CALIBRATIONS = ("absmax", "percentile", "mse")
PARTS_FORMAT = "compressjax.qarray/1"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one array (frozen and hashable, so it can be a static ``jit`` argument).

    Attributes:
        bits: code width, 1 to 8. 1 bit is XNOR-Net style ``sign(x) * mean|x|`` per channel (symmetric only,
            ``calibration`` is not used because ``mean|x|`` is already the least-squares scale for signs).
        symmetric: symmetric codes ``[-(2^(b-1)-1), 2^(b-1)-1]`` and no zero point, or asymmetric codes
            ``[-2^(b-1), 2^(b-1)-1]`` with an integer zero point (the range always includes 0, so zero is
            exact).
        channel_axes: axes that keep their own scale; ``(-1,)`` (default) is per output channel of a Dense
            kernel ``(in, out)``, ``()`` (or ``None``) is one scale for the whole tensor; an int means one axis.
        group_size: ``None``, or the size of the blocks along ``group_axis`` (the contraction axis) that
            share a scale. The axis length must be divisible by it.
        calibration: how the clipping range is chosen per scale group: ``"absmax"`` (no clipping beyond
            half a step), ``"percentile"`` (the ``percentile``-th percentile of ``|x|``), or ``"mse"`` (a grid
            search over clipping ratios that minimises the mean quantization error ``mean|x - x_hat|^error_power``).
        percentile: used by ``calibration="percentile"``, in ``(0, 100]``.
        error_power: the exponent of the error the ``"mse"`` search minimises: ``1.0`` (default) is the mean
            absolute error, the metric reported in BENCHMARKS.md (about 27% below absmax at int4 per channel on
            N(0,1) weights); ``2.0`` is the literal mean squared error (about 21% below absmax on that metric).
        group_axis: the contraction axis that ``group_size`` splits; ``None`` means ``-2`` (the ``in`` axis of a
            Dense kernel ``(in, out)`` or of a conv kernel ``(..., in, out)``) for arrays with 2 or more axes
            and ``0`` for vectors.
        layer_axes: axes that index independent kernels stacked in one leaf (the scan axis of a stacked
            ``(L, in, out)`` kernel: ``(0,)``; MaxText's ``(in, L, out)``: ``(1,)``; MoE experts ``(E, in, out)``:
            ``(0,)``). Each layer keeps its own scales (the axes are added to ``channel_axes``), and a
            ``group_axis`` on a layer axis is an error. ``None`` (default) means undeclared: a 2-D kernel has no
            layer axis, and :func:`~compressjax.quantize_params` warns, naming the leaf, for an undeclared 3-D
            leaf whose scales would span its first two axes (a stacked ``(L, in, out)`` kernel and a conv1d
            ``(k, in, out)`` kernel look the same; declare ``layer_axes=(0,)`` or ``layer_axes=()``). The
            one-shot solvers take the layer axes from the Hessian and reject a spec that declares others.
    """

    bits: int = 8
    symmetric: bool = True
    channel_axes: tuple[int, ...] = (-1,)
    group_size: int | None = None
    calibration: str = "absmax"
    percentile: float = 99.99
    group_axis: int | None = None
    error_power: float = 1.0
    layer_axes: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an integer in 1..8, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise TypeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if self.bits == 1 and not self.symmetric:
            raise ValueError("QuantSpec(bits=1) is sign * scale and must be symmetric; got symmetric=False")
        axes = () if self.channel_axes is None else self.channel_axes  # None reads as per tensor
        if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
            axes = (axes,)
        try:
            axes = tuple(axes)
        except TypeError:
            raise TypeError(f"QuantSpec.channel_axes must be a tuple of ints, got {self.channel_axes!r}") from None
        if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
            raise TypeError(f"QuantSpec.channel_axes must be a tuple of ints, got {self.channel_axes!r}")
        object.__setattr__(self, "channel_axes", tuple(int(a) for a in axes))
        if self.group_size is not None:
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs < 1:
                raise ValueError(f"QuantSpec.group_size must be None or a positive integer, got {gs!r}")
            object.__setattr__(self, "group_size", int(gs))
        if self.group_axis is not None and (isinstance(self.group_axis, bool) or not isinstance(self.group_axis, (int, np.integer))):
            raise TypeError(f"QuantSpec.group_axis must be None or an int, got {self.group_axis!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"QuantSpec.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if not isinstance(self.percentile, (int, float, np.floating)) or not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (0, 100], got {self.percentile!r}")
        if not isinstance(self.error_power, (int, float, np.floating)) or not float(self.error_power) > 0:
            raise ValueError(f"QuantSpec.error_power must be a positive number, got {self.error_power!r}")
        if self.layer_axes is not None:
            la = self.layer_axes
            if isinstance(la, (int, np.integer)) and not isinstance(la, bool):
                la = (la,)
            try:
                la = tuple(la)
            except TypeError:
                raise TypeError(f"QuantSpec.layer_axes must be None or a tuple of ints, got {self.layer_axes!r}") from None
            if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in la):
                raise TypeError(f"QuantSpec.layer_axes must be None or a tuple of ints, got {self.layer_axes!r}")
            object.__setattr__(self, "layer_axes", tuple(int(a) for a in la))

    def scale_axes(self, shape: tuple[int, ...], path: str = "x") -> tuple[int, ...]:
        """The axes that keep their own scale on an array of ``shape``: ``channel_axes`` plus ``layer_axes``.

        Raises:
            ValueError: naming ``path``, a layer axis out of range or repeated, or a ``group_axis`` that is a
                layer axis (its scale groups would run across layers).
        """
        nd = len(shape)
        chans = [a for a in self.channel_axes]
        if not self.layer_axes:
            return tuple(chans)
        layers = []
        for a in self.layer_axes:
            if not -nd <= a < nd:
                raise ValueError(f"leaf {path!r}: layer axis {a} is out of range for an array of shape {tuple(shape)}")
            layers.append(a % nd)
        if len(set(layers)) != len(layers):
            raise ValueError(f"leaf {path!r}: layer_axes {self.layer_axes} repeat an axis of shape {tuple(shape)}")
        if self.group_size is not None:
            ga = (self.group_axis if self.group_axis is not None else (-2 if nd >= 2 else 0)) % max(nd, 1)
            if ga in layers:
                raise ValueError(
                    f"leaf {path!r}: the group axis {ga} is a layer axis {self.layer_axes} of shape {tuple(shape)}; "
                    "scale groups would span layers (set group_axis to the input axis)"
                )
        known = {a % nd for a in chans if -nd <= a < nd}
        return tuple(chans) + tuple(a for a in layers if a not in known)

    @property
    def qmax(self) -> int:
        """Largest code: ``2^(b-1)-1`` (1 for 1 bit)."""
        return max(2 ** (self.bits - 1) - 1, 1)

    @property
    def qmin(self) -> int:
        """Smallest code: ``-qmax`` when symmetric, ``-2^(b-1)`` when asymmetric."""
        return -self.qmax if self.symmetric else -(2 ** (self.bits - 1))


class Layout:
    """Normalised axes of a spec applied to one shape (internal; raises naming ``path``)."""

    def __init__(self, shape: tuple[int, ...], channel_axes, group_size, group_axis, path: str = "x"):
        shape = tuple(int(d) for d in shape)
        nd = len(shape)
        self.shape = shape
        chans = []
        for a in channel_axes:
            if not -nd <= a < nd:
                raise ValueError(f"leaf {path!r}: channel axis {a} is out of range for an array of shape {shape}")
            chans.append(a % nd)
        if len(set(chans)) != len(chans):
            raise ValueError(f"leaf {path!r}: channel_axes {tuple(channel_axes)} repeat an axis of shape {shape}")
        self.channel_axes = tuple(sorted(chans))
        self.group_size = group_size
        self.group_axis = None
        if group_size is not None:
            if nd == 0:
                raise ValueError(f"leaf {path!r}: group_size={group_size} needs an array with at least one axis")
            ga = group_axis if group_axis is not None else (-2 if nd >= 2 else 0)
            if not -nd <= ga < nd:
                raise ValueError(f"leaf {path!r}: group axis {ga} is out of range for an array of shape {shape}")
            ga %= nd
            if ga in self.channel_axes:
                raise ValueError(f"leaf {path!r}: group axis {ga} is also a channel axis {tuple(channel_axes)}")
            if shape[ga] % group_size:
                raise ValueError(
                    f"leaf {path!r}: group_size={group_size} does not divide axis {ga} of length {shape[ga]} "
                    f"(shape {shape}); pick a divisor of {shape[ga]}"
                )
            self.group_axis = ga
        # The grouped view splits the group axis into (n_groups, group_size).
        if self.group_axis is None:
            self.grouped_shape = shape
            kept = set(self.channel_axes)
        else:
            ga = self.group_axis
            self.grouped_shape = shape[:ga] + (shape[ga] // group_size, group_size) + shape[ga + 1 :]
            kept = {a if a < ga else a + 1 for a in self.channel_axes} | {ga}
        self.reduce_axes = tuple(a for a in range(len(self.grouped_shape)) if a not in kept)
        self.scale_shape = tuple(1 if a in self.reduce_axes else d for a, d in enumerate(self.grouped_shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@pytree_node(children=("values", "scale", "zero_point"),
             static=("bits", "shape", "dtype", "channel_axes", "group_size", "group_axis"))
class QArray(CompressedLeaf):
    """A quantized array: integer codes, float32 scales (and a zero point), and static metadata.

    A pytree *node*: ``values``, ``scale`` and ``zero_point`` are its children (so a QArray crosses ``jit``
    and ``device_put``), ``bits``, ``shape``, ``dtype`` and the layout are static. Every compressjax tree
    function treats a QArray as ONE leaf (the class sets ``_cj_compressed_leaf = True``, see
    :func:`compressjax.tree.is_compressed_leaf`); with ``jax.tree_util`` directly, pass
    ``is_leaf=lambda x: isinstance(x, QArray)`` to keep them whole.

    Attributes:
        values: ``uint8`` bit stream of ``ceil(n * bits / 8)`` bytes when ``bits <= 4``, else ``int8`` codes of
            shape ``shape``.
        scale: float32, shape ``scale_shape`` (the grouped view of ``shape`` with reduced axes kept as 1).
        zero_point: int32 of the same shape as ``scale`` when asymmetric, else ``None``.
        bits, shape, dtype: code width, original shape and dtype (what :func:`dequantize` returns).
        channel_axes: normalised (non-negative) axes with their own scale.
        group_size, group_axis: the grouping along the contraction axis, or ``None``.
    """

    def __init__(self, values, scale, zero_point, *, bits, shape, dtype, channel_axes=(), group_size=None, group_axis=None, path="QArray"):
        self.values = values
        self.scale = scale
        self.zero_point = zero_point
        self.bits = int(bits)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = jnp.dtype(dtype)
        lay = Layout(self.shape, tuple(int(a) for a in channel_axes), None if group_size is None else int(group_size), group_axis, path)
        self.channel_axes = lay.channel_axes
        self.group_size = lay.group_size
        self.group_axis = lay.group_axis
        self.validate(path)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def layout(self) -> Layout:
        return Layout(self.shape, self.channel_axes, self.group_size, self.group_axis)

    @property
    def nbytes(self) -> int:
        """Honest storage bytes: codes (packed when <= 4 bits) + scales (+ zero points)."""
        total = int(self.values.size) * jnp.dtype(self.values.dtype).itemsize
        for arr in (self.scale, self.zero_point):
            if arr is not None:
                total += int(arr.size) * jnp.dtype(arr.dtype).itemsize
        return total

    def validate(self, path: str = "QArray") -> None:
        """Raises ``ValueError`` naming ``path`` if values, scale or zero point disagree with the metadata."""
        if not 1 <= self.bits <= 8:
            raise ValueError(f"leaf {path!r}: QArray bits={self.bits} is outside 1..8")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"leaf {path!r}: QArray dtype={self.dtype} is not a floating-point dtype")
        lay = Layout(self.shape, self.channel_axes, self.group_size, self.group_axis, path)
        v = self.values
        if not hasattr(v, "shape"):
            raise ValueError(f"leaf {path!r}: QArray values must be an array, got {type(v).__name__}")
        if self.packed:
            want = (packed_nbytes(lay.size, self.bits),)
            if jnp.dtype(v.dtype) != jnp.uint8 or tuple(v.shape) != want:
                raise ValueError(
                    f"leaf {path!r}: {self.bits}-bit QArray of shape {self.shape} needs packed uint8 values of "
                    f"shape {want}, got {jnp.dtype(v.dtype)} {tuple(v.shape)}"
                )
        elif jnp.dtype(v.dtype) != jnp.int8 or tuple(v.shape) != self.shape:
            raise ValueError(
                f"leaf {path!r}: {self.bits}-bit QArray needs int8 values of shape {self.shape}, "
                f"got {jnp.dtype(v.dtype)} {tuple(v.shape)}"
            )
        s = self.scale
        if not hasattr(s, "shape") or tuple(s.shape) != lay.scale_shape or jnp.dtype(s.dtype) != jnp.float32:
            got = (jnp.dtype(s.dtype), tuple(s.shape)) if hasattr(s, "shape") else type(s).__name__
            raise ValueError(f"leaf {path!r}: QArray scale must be float32 of shape {lay.scale_shape}, got {got}")
        z = self.zero_point
        if z is not None:
            if self.bits == 1:
                raise ValueError(f"leaf {path!r}: a 1-bit QArray is symmetric and has no zero point")
            if not hasattr(z, "shape") or tuple(z.shape) != lay.scale_shape or jnp.dtype(z.dtype) != jnp.int32:
                got = (jnp.dtype(z.dtype), tuple(z.shape)) if hasattr(z, "shape") else type(z).__name__
                raise ValueError(f"leaf {path!r}: QArray zero_point must be int32 of shape {lay.scale_shape}, got {got}")

    def decode(self) -> jax.Array:
        """The dequantized array ``(codes - zero_point) * scale`` in the original shape and dtype.

        The compressed-leaf protocol: every compressed leaf (``QArray``, ``Codebook``) decodes itself, so tree
        functions decode any of them without importing its class. Does not validate (see
        :func:`compressjax.dequantize`).
        """
        return _decode(self)

    # ------------------------------------------------------------------ codes and export parts
    def ints(self) -> jax.Array:
        """The signed integer codes as ``int8`` in ``self.shape`` (unpacked; ``-1``/``+1`` for 1 bit).

        Symmetric codes lie in ``[-(2^(b-1)-1), 2^(b-1)-1]``, asymmetric ones in ``[-2^(b-1), 2^(b-1)-1]``; a
        weight that was exactly zero has code 0 when symmetric (so pruned weights stay sparse in the codes).
        ``dequantize(q) == (ints - zero_point) * scale`` evaluated in the grouped view ``q.layout.grouped_shape``.
        """
        if not self.packed:
            return jnp.asarray(self.values).astype(jnp.int8)
        return _unpacked(self)

    @classmethod
    def from_ints(
        cls, ints, scale, zero_point=None, meta: Mapping[str, Any] | None = None, *, bits=None, dtype=None,
        channel_axes=None, group_size=None, group_axis=None, path: str = "QArray",
    ) -> QArray:
        """Builds (and packs) a QArray from unpacked integer codes, the inverse of :meth:`ints`.

        The metadata comes EITHER from ``meta`` (as returned by :meth:`to_parts`) OR from the keywords.

        Args:
            ints: integer codes of the original shape, or flat when ``meta`` has a ``shape`` (any integer
                dtype; range checked when concrete).
            scale: float32 scales of shape ``layout.scale_shape`` (as stored in ``QArray.scale``).
            zero_point: int32 zero points (same shape as ``scale``) for asymmetric arrays, else ``None``.
            meta: a metadata dict with keys ``bits`` and optionally ``dtype``, ``shape``, ``channel_axes``,
                ``group_size``, ``group_axis``.
            bits, dtype, channel_axes, group_size, group_axis: the metadata as keywords (``dtype`` defaults to
                float32, ``channel_axes`` to ``()``).
            path: the leaf name used in error messages.

        Raises:
            ValueError: ``meta`` and keywords both given, no ``bits``, a code outside the range for ``bits``,
                or shapes that disagree with the metadata.
        """
        keywords = {"bits": bits, "dtype": dtype, "channel_axes": channel_axes, "group_size": group_size, "group_axis": group_axis}
        given = sorted(k for k, v in keywords.items() if v is not None)
        if meta is not None and given:
            raise ValueError(f"leaf {path!r}: QArray.from_ints takes either meta or keywords, not both (got meta and {given})")
        m = dict(meta) if meta is not None else {k: v for k, v in keywords.items() if v is not None}
        return _from_ints(ints, scale, zero_point, m, path)

    def to_parts(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Splits the QArray into NumPy arrays and JSON-serialisable metadata (for the file format).

        Returns:
            ``(arrays, meta)``: ``arrays`` has ``"values"`` (packed ``uint8`` stream or ``int8`` codes, see the
            module docstring for the bit layout), ``"scale"`` (float32) and, when asymmetric, ``"zero_point"``
            (int32). ``meta`` has ``format``, ``bits``, ``shape``, ``dtype``, ``symmetric``, ``packed``,
            ``channel_axes``, ``group_size``, ``group_axis`` (plain ints, lists, strings, bools, None).
        """
        arrays = {"values": np.asarray(self.values), "scale": np.asarray(self.scale)}
        if self.zero_point is not None:
            arrays["zero_point"] = np.asarray(self.zero_point)
        meta = {
            "format": PARTS_FORMAT, "bits": self.bits, "shape": list(self.shape), "dtype": self.dtype.name,
            "symmetric": self.symmetric, "packed": self.packed, "channel_axes": list(self.channel_axes),
            "group_size": self.group_size, "group_axis": self.group_axis,
        }
        return arrays, meta

    @classmethod
    def from_parts(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any], path: str = "QArray") -> QArray:
        """Rebuilds a QArray from :meth:`to_parts` output, validating everything.

        Raises:
            ValueError: naming ``path`` on a wrong format tag, missing keys or arrays, or arrays that do not
                match the metadata (shape, dtype, packed length, zero point presence).
        """
        if meta.get("format", PARTS_FORMAT) != PARTS_FORMAT:
            raise ValueError(f"leaf {path!r}: unknown QArray format {meta.get('format')!r}, expected {PARTS_FORMAT!r}")
        missing = [k for k in ("bits", "shape", "dtype") if k not in meta] + [k for k in ("values", "scale") if k not in arrays]
        if missing:
            raise ValueError(f"leaf {path!r}: QArray parts are missing {missing}")
        symmetric = bool(meta.get("symmetric", "zero_point" not in arrays))
        if symmetric == ("zero_point" in arrays):
            raise ValueError(f"leaf {path!r}: symmetric={symmetric} but zero_point is {'present' if symmetric else 'absent'}")
        try:
            dtype = jnp.dtype(meta["dtype"])
        except TypeError as e:
            raise ValueError(f"leaf {path!r}: bad dtype {meta['dtype']!r}") from e
        zp = arrays.get("zero_point")
        return cls(
            jnp.asarray(arrays["values"]), jnp.asarray(arrays["scale"]), None if zp is None else jnp.asarray(zp),
            bits=int(meta["bits"]), shape=tuple(meta["shape"]), dtype=dtype,
            channel_axes=tuple(meta.get("channel_axes", ())), group_size=meta.get("group_size"),
            group_axis=meta.get("group_axis"), path=path,
        )

    @classmethod
    def join_slices(cls, parts: list[QArray], axis: int, new: bool, path: str = "QArray") -> QArray:
        """Per-slice QArrays (e.g. :func:`~compressjax.sequential`'s, one per scan iteration) as one leaf.

        ``new``: stacked along a new axis ``axis``, which becomes a channel axis (each slice keeps its own
        scales). Otherwise concatenated along the existing ``axis``, which must be a channel axis (the groups
        of a grouped convolution, each with its own scales).
        """
        q0 = parts[0]
        for q in parts[1:]:
            if (q.bits, q.shape, q.dtype, q.channel_axes, q.group_size, q.group_axis, q.zero_point is None) != (
                q0.bits, q0.shape, q0.dtype, q0.channel_axes, q0.group_size, q0.group_axis, q0.zero_point is None
            ):
                raise ValueError(f"leaf {path!r}: compress returned QArrays of different layouts for its slices; they cannot be joined")
        ga = q0.group_axis
        if new:
            chans = tuple(sorted([c + (c >= axis) for c in q0.channel_axes] + [axis]))
            ga = None if ga is None else ga + (ga >= axis)
        else:
            if axis not in q0.channel_axes:
                raise ValueError(f"leaf {path!r}: the groups of a grouped convolution need their own scales along output axis {axis}, but compress gave channel axes {q0.channel_axes}")
            chans = q0.channel_axes
        pos = axis if ga is None or axis < ga else axis + 1  # the axis in the grouped view of the scales

        def cat(xs):
            return jnp.stack(xs, pos) if new else jnp.concatenate(xs, pos)

        codes = jnp.stack([q.ints() for q in parts], axis) if new else jnp.concatenate([q.ints() for q in parts], axis)
        zp = None if q0.zero_point is None else cat([q.zero_point for q in parts])
        return cls(codes_to_storage(codes, q0.bits), cat([q.scale for q in parts]), zp, bits=q0.bits, shape=codes.shape,
                   dtype=q0.dtype, channel_axes=chans, group_size=q0.group_size, group_axis=ga, path=path)

    def __repr__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        grp = f", group_size={self.group_size}" if self.group_size else ""
        return f"QArray(int{self.bits} {kind}, shape={self.shape}, dtype={self.dtype.name}, channel_axes={self.channel_axes}{grp}, nbytes={self.nbytes})"


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer codes (``(-1, 1)`` for 1 bit)."""
    if bits == 1:
        return -1, 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def codes_to_storage(q: jax.Array, bits: int) -> jax.Array:
    """Signed codes (any int dtype) in the original shape -> the ``values`` stored in a QArray."""
    if bits > 4:
        return q.astype(jnp.int8)
    u = (q > 0).astype(jnp.uint8) if bits == 1 else (q.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)
    return pack(u, bits)


_codes_to_storage_jit = jax.jit(codes_to_storage, static_argnums=1)  # one compiled kernel for eager callers


@jax.jit
def _unpacked(q: QArray) -> jax.Array:
    u = unpack(q.values, q.bits, q.size).astype(jnp.int8)
    codes = 2 * u - 1 if q.bits == 1 else u - jnp.int8(2 ** (q.bits - 1))
    return codes.reshape(q.shape)


def _from_ints(ints, scale, zero_point, m: dict[str, Any], path: str) -> QArray:
    if "bits" not in m:
        raise ValueError(f"leaf {path!r}: QArray.from_ints needs bits (as a keyword or in meta)")
    b = int(m["bits"])
    if not 1 <= b <= 8:
        raise ValueError(f"leaf {path!r}: bits={b} is outside 1..8")
    ints_arr = ints if isinstance(ints, jax.Array) else np.asarray(ints)
    if not jnp.issubdtype(ints_arr.dtype, jnp.integer):
        raise ValueError(f"leaf {path!r}: integer codes expected, got dtype {ints_arr.dtype}")
    lo, hi = code_range(b, zero_point is None)
    if not isinstance(ints_arr, jax.core.Tracer) and ints_arr.size:
        a = np.asarray(ints_arr)
        bad = (a < lo) | (a > hi) | ((a == 0) if b == 1 else False)
        if np.any(bad):
            raise ValueError(f"leaf {path!r}: {b}-bit code {a[bad].ravel()[0]} is outside [{lo}, {hi}]" + (" or is 0" if b == 1 else ""))
    shape = tuple(ints_arr.shape)
    if m.get("shape") is not None and tuple(m["shape"]) != shape:
        want = tuple(int(d) for d in m["shape"])
        if math.prod(want) != ints_arr.size:
            raise ValueError(f"leaf {path!r}: {ints_arr.size} integer codes cannot take the shape {want} from meta")
        ints_arr, shape = ints_arr.reshape(want), want  # e.g. codes stored flat by a file format
    lay = Layout(shape, tuple(m.get("channel_axes", ())), m.get("group_size"), m.get("group_axis"), path)
    zp = None if zero_point is None else jnp.asarray(zero_point, jnp.int32)
    return QArray(
        _codes_to_storage_jit(jnp.asarray(ints_arr), b), jnp.asarray(scale, jnp.float32), zp,
        bits=b, shape=shape, dtype=m.get("dtype", "float32"), channel_axes=lay.channel_axes,
        group_size=lay.group_size, group_axis=lay.group_axis, path=path,
    )


def clip_finite(y: jax.Array, dtype) -> jax.Array:
    """``y`` clipped to the finite range of ``dtype`` (a dequantized value may sit half a step past the max)."""
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(y, -big, big)


@jax.jit
def _decode(q: QArray) -> jax.Array:
    lay = q.layout
    codes = q.ints().astype(jnp.float32).reshape(lay.grouped_shape)
    if q.zero_point is not None:
        codes = codes - q.zero_point.astype(jnp.float32)
    return clip_finite(codes * q.scale, q.dtype).reshape(q.shape).astype(q.dtype)
