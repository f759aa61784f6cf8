"""The menu: named ways to compress one kernel, and which of them apply to which kernel."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from compressjax.qarray import QuantSpec

__all__ = ["METHODS", "Option", "default_menu", "check_menu", "KernelInfo", "why_not"]

METHODS = ("float", "gptq", "rtn", "sparsegpt", "kmeans")


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to compress a kernel (frozen, hashable).

    Attributes:
        name: unique label in the plan, e.g. ``"gptq-int4-g128"``.
        method: ``"float"`` (kept as it is), ``"gptq"`` (:func:`compressjax.gptq` with ``spec``), ``"rtn"``
            (round to nearest, :func:`compressjax.quantize_params` with ``spec``), ``"sparsegpt"``
            (:func:`compressjax.sparsegpt` at ``sparsity`` or ``n:m``, quantized jointly when ``spec`` is set),
            ``"kmeans"`` (:func:`compressjax.kmeans_codebooks` at ``bits``, then, with ``error_feedback``,
            :func:`compressjax.codebook_error_feedback` and :func:`compressjax.refit_centroids`).
        spec: the quantizer of ``gptq``, ``rtn`` and (optionally) ``sparsegpt``.
        sparsity, n, m: SparseGPT's unstructured fraction, or ``n`` kept of every ``m`` inputs.
        bits: codebook index width of ``kmeans`` (``2^bits`` centroids).
        per_channel: one codebook per output channel (``kmeans``).
        error_feedback: GPTQ-style index assignment plus least-squares centroids (``kmeans``).
        act_order: GPTQ's descending-``diag(H)`` order (``gptq``).
    """

    name: str
    method: str
    spec: QuantSpec | None = None
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    bits: int | None = None
    per_channel: bool = True
    error_feedback: bool = True
    act_order: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Option.name must be a non-empty string, got {self.name!r}")
        if self.method not in METHODS:
            raise ValueError(f"option {self.name!r}: method must be one of {METHODS}, got {self.method!r}")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise TypeError(f"option {self.name!r}: spec must be a QuantSpec or None, got {self.spec!r}")
        if self.method in ("gptq", "rtn") and self.spec is None:
            raise ValueError(f"option {self.name!r}: method {self.method!r} needs a QuantSpec in spec=")
        if self.method == "gptq" and not 2 <= self.spec.bits <= 8:
            raise ValueError(f"option {self.name!r}: GPTQ takes 2 to 8 bits, got bits={self.spec.bits}")
        if self.method == "sparsegpt":
            if (self.n is None) != (self.m is None):
                raise ValueError(f"option {self.name!r}: give both n and m, got n={self.n!r}, m={self.m!r}")
            if self.n is None and self.sparsity is None:
                raise ValueError(f"option {self.name!r}: sparsegpt needs sparsity= or n= and m=")
            if self.n is not None and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n <= self.m):
                raise ValueError(f"option {self.name!r}: need ints 0 < n <= m, got n={self.n!r}, m={self.m!r}")
            if self.sparsity is not None and not (isinstance(self.sparsity, float | int) and 0.0 <= self.sparsity <= 1.0):
                raise ValueError(f"option {self.name!r}: sparsity must be in [0, 1], got {self.sparsity!r}")
        if self.method == "kmeans" and not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"option {self.name!r}: kmeans needs bits= an int in 1..8, got {self.bits!r}")
        if self.method == "float" and (self.spec is not None or self.sparsity is not None or self.n is not None):
            raise ValueError(f"option {self.name!r}: the float option takes no spec, sparsity or n:m")


def default_menu() -> list[Option]:
    """The default menu (19 options), from 32 bits down to about 2 bits per weight.

    ``float``; GPTQ (act-order) int8 per channel, int4 per channel (clipping search for least squared error)
    and in groups of 128 and 64 inputs (symmetric), int3 and int2 per channel and in groups of 128 and 64
    (asymmetric: all ``2^b`` levels, which the MiniLM validation slice favours at 3 bits); round to nearest
    int8 and int4 g128; SparseGPT 50% and 2:4, alone and jointly with int4 g128; k-means codebooks of 3 and
    4 bits per output channel with GPTQ-style error feedback and least-squares centroids. A group size or
    an ``m`` that does not divide a kernel's input axis makes that option skip that kernel.
    """
    Q = QuantSpec
    menu = [Option("float", "float"),
            Option("gptq-int8", "gptq", Q(bits=8)),
            Option("gptq-int4", "gptq", Q(bits=4, calibration="mse", error_power=2.0))]
    for g in (128, 64):
        menu.append(Option(f"gptq-int4-g{g}", "gptq", Q(bits=4, group_size=g)))
    for b in (3, 2):
        menu.append(Option(f"gptq-int{b}", "gptq", Q(bits=b, symmetric=False)))
        for g in (128, 64):
            menu.append(Option(f"gptq-int{b}-g{g}", "gptq", Q(bits=b, group_size=g, symmetric=False)))
    menu += [Option("rtn-int8", "rtn", Q(bits=8)), Option("rtn-int4-g128", "rtn", Q(bits=4, group_size=128))]
    int4 = Q(bits=4, group_size=128)
    menu += [Option("sparsegpt-50%", "sparsegpt", sparsity=0.5), Option("sparsegpt-2:4", "sparsegpt", n=2, m=4),
             Option("sparsegpt-50%+int4-g128", "sparsegpt", int4, sparsity=0.5),
             Option("sparsegpt-2:4+int4-g128", "sparsegpt", int4, n=2, m=4)]
    menu += [Option(f"kmeans-{b}b", "kmeans", bits=b) for b in (3, 4)]
    return menu


def check_menu(menu: Any) -> tuple[list[Option], bool]:
    """``(options, is_default)``; a non-empty sequence of :class:`Option` with unique names, or ``None``."""
    if menu is None:
        return default_menu(), True
    if isinstance(menu, Option) or isinstance(menu, str | bytes) or not isinstance(menu, Sequence):
        raise TypeError(f"menu must be a sequence of Option (or None for default_menu()), got {menu!r}")
    if len(menu) == 0:
        raise ValueError("menu is empty: give at least one Option (or menu=None for default_menu())")
    for o in menu:
        if not isinstance(o, Option):
            raise TypeError(f"menu entries must be Option, got {o!r}")
    names = [o.name for o in menu]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"menu has options with the same name: {dup}")
    return list(menu), False


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """What decides applicability: the kernel's shape, its contracted axes and its layer (stacking) axes."""

    path: str
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    layer_axes: tuple[int, ...] = ()

    @property
    def last_in(self) -> int:
        return self.shape[max(self.in_axes)]

    @property
    def d_in(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def why_not(option: Option, k: KernelInfo) -> str | None:
    """Why ``option`` cannot compress kernel ``k`` (``None`` when it can)."""
    g = None if option.spec is None else option.spec.group_size
    if g is not None and k.last_in % g:
        return f"group_size={g} does not divide the input axis of length {k.last_in} (shape {k.shape})"
    if option.m is not None and k.last_in % option.m:
        return f"m={option.m} does not divide the input axis of length {k.last_in} (shape {k.shape})"
    if option.method == "kmeans":
        if len(k.shape) < 2 or (option.per_channel and len(k.shape) - 1 in k.layer_axes):
            return f"k-means with error feedback takes kernels with an output (last) axis, got shape {k.shape}"
        books = math.prod(k.shape[a] for a in k.layer_axes) * (k.shape[-1] if option.per_channel else 1)
        per = k.size // books
        if per < 2 ** option.bits:
            return f"{2 ** option.bits} centroids need at least as many weights per codebook, got {per} (shape {k.shape})"
    return None
