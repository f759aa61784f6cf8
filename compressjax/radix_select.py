"""Exact k-th smallest value over a whole pytree in O(n), without sorting or concatenating.

Non-negative float32 values order exactly like their uint32 bit patterns (IEEE 754), so the k-th smallest
magnitude can be found by a radix select on the bit patterns: two counting passes over every leaf, each
building a histogram of one digit (the high 16 bits, then the low 15 bits of the elements whose high digit
matches) with per-leaf histograms summed across leaves. A third, elementwise pass writes the masks.

The count of pruned elements is exact: ties at the threshold are split in a fixed order (leaf order of
``jax.tree_util`` flattening, then row-major flat index within a leaf; the earliest ties are pruned). That
order is the order of a stable sort of the concatenated magnitudes, which is what the tests compare to.
Only the one leaf where the run of ties is cut pays for locating the cut.

Layouts (``strategy``): one algorithm, the same threshold, counts and masks bit for bit, with the work laid
out per backend:

* ``"chunked"`` (CPU): leaves are read in chunks of ``CHUNK`` elements (``lax.fori_loop`` over
  ``lax.dynamic_slice``), so beyond the inputs and the boolean masks only O(CHUNK) memory is used, and each
  chunk's bit patterns stay in cache between their computation and the scatter. The tie split also walks
  the chunks (a count per chunk, then one cumsum over the one chunk that holds the cut), under a
  ``lax.cond`` per leaf.
* ``"whole"`` (accelerators): one scatter-add per leaf and digit over the whole leaf, no loop. The
  histograms are kept in up to ``BANKS`` copies (element ``i`` adds to copy ``i % BANKS``), so that
  neighbouring threads of a GPU do not contend for the same counter when many weights share a digit (zeros
  of an already pruned model); in the second pass the elements outside the selected bucket are dropped
  (out-of-bounds index) instead of counted. The tie split is one whole-leaf cumsum in the one leaf where the
  ties are cut, chosen by a single ``lax.switch`` (one conditional per call, not one per leaf: a GPU
  conditional waits for its predicate on the host).
* ``"fused"`` (accelerators): as ``"whole"``, but all leaves' digits go into one scatter per pass (their
  indices concatenated; per-leaf counters of the second pass at an offset per leaf), so the pass is one
  kernel whatever the number of leaves. This costs an int32 index per element unless XLA fuses the
  concatenation into the scatter.

Memory beyond the inputs and masks: O(CHUNK) for ``"chunked"``; for the vectorised layouts up to 8 MiB of
counters and, in the leaf where the ties are cut, an int32 cumsum the size of that leaf (plus the fused
layout's index array if it is not fused away).

``strategy="auto"`` (the default everywhere) reads the environment variable ``COMPRESSJAX_SELECT_STRATEGY``
(one of ``STRATEGIES`` or ``"auto"``) and otherwise picks by the backend of the leaves: ``"chunked"`` on CPU,
``ACCELERATOR_STRATEGY`` on GPU and TPU. Concrete arrays name their devices; under ``jax.jit`` the leaves
are tracers that carry no device, and ``jax.default_backend()`` decides (a jitted function whose inputs
live on a non-default backend should pass ``strategy=`` or set the variable). The pruning functions
(``magnitude_masks``, ``score_masks``, ``channel_masks``) resolve it at every call, outside their jit, so
the variable takes effect on the next call; inside a user's ``jax.jit`` it is read when that function is
traced.

Choice of scheme (``python -m benchmarks.pruning --alternatives``, XLA CPU, one pass over 10M weights):
a fused ``sum(bits < t)`` costs about 5x a chunked histogram pass and bisection needs 31 of them; seven
thresholds in one fused reduction cost ~19x and still need 11 passes; a whole-leaf scatter-add histogram
(or ``jnp.bincount``) costs 6-8x the same scatter done in cache-sized chunks. Hence on CPU: two chunked
scatter-add histogram passes (16 + 15 bits). On a GPU the chunk loop runs its chunks one after another
(12.5 ms on an H200 for 50.8M weights, where concatenate + sort took 2.3 ms), hence the vectorised layouts.

References:
    Radix select: e.g. Alabi et al., "Fast k-selection algorithms for graphics processing units", JEA 2012.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "magnitude_bits",
    "kth_smallest_magnitude",
    "exact_keep_masks",
    "resolve_strategy",
    "round_half_even_count",
    "n_chunks",
    "CHUNK",
    "STRATEGIES",
    "STRATEGY_ENV",
]

_HI_BITS = 16  # the high digit: bits 15..30 of the pattern (bit 31, the sign, is 0 for magnitudes)
_LO_BITS = 15  # the low digit: bits 0..14
_N_HI = 1 << _HI_BITS
_N_LO = 1 << _LO_BITS
# Leaves above this many elements are read in chunks of it, so no temporary outgrows a chunk (the peak
# memory is the params plus the masks plus O(CHUNK)). 2**18 elements = 1 MiB of bit patterns, which stays
# in cache between the bit computation and the scatter: 2**16..2**20 ran alike, 2**22 three times slower.
CHUNK = 1 << 18

STRATEGIES = ("chunked", "whole", "fused")  # the layouts; "auto" picks one (see the module docstring)
STRATEGY_ENV = "COMPRESSJAX_SELECT_STRATEGY"  # overrides what "auto" picks
ACCELERATOR_STRATEGY = "fused"  # what "auto" picks on GPU and TPU (provisional until measured on a GPU)
# Copies of the first digit's histogram in the vectorised layouts (element i adds to copy i % BANKS): 32
# copies take 8 MiB and keep a warp's 32 lanes on distinct counters even when all their digits are equal.
BANKS = 32
# Cap on the second pass's counters in the fused layout (copies x leaves x 2**15), in int32 elements.
_FUSED_LO_BINS = 1 << 20


def _platform(leaves: Sequence) -> str:
    """The platform of the first concrete ``jax.Array`` among ``leaves``, else ``jax.default_backend()``."""
    for x in leaves:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                return next(iter(x.devices())).platform
            except (AttributeError, RuntimeError, StopIteration):  # deleted or device-less arrays
                continue
    return jax.default_backend()


def resolve_strategy(strategy: str = "auto", leaves: Sequence = ()) -> str:
    """The layout that ``strategy`` stands for: itself, or for ``"auto"`` the setting or the backend's choice.

    Args:
        strategy: one of ``STRATEGIES`` or ``"auto"``.
        leaves: the arrays to select over; for ``"auto"`` their backend decides when the environment
            variable ``COMPRESSJAX_SELECT_STRATEGY`` is unset or ``"auto"`` (tracers: ``jax.default_backend()``).

    Returns:
        One of ``STRATEGIES``: ``"chunked"`` on CPU, ``ACCELERATOR_STRATEGY`` elsewhere, unless overridden.

    Raises:
        ValueError: an unknown strategy, or an unknown value of ``COMPRESSJAX_SELECT_STRATEGY``.
    """
    if strategy not in (*STRATEGIES, "auto"):
        raise ValueError(f"strategy must be one of {(*STRATEGIES, 'auto')}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    env = os.environ.get(STRATEGY_ENV, "").strip()
    if env and env != "auto":
        if env not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV} must be one of {(*STRATEGIES, 'auto')}, got {env!r}")
        return env
    return "chunked" if _platform(leaves) == "cpu" else ACCELERATOR_STRATEGY


def magnitude_bits(x: jax.Array) -> jax.Array:
    """uint32 bit patterns of ``|x|`` as float32 (bf16/f16 leaves are widened first); order-preserving."""
    a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    return lax.bitcast_convert_type(a, jnp.uint32).reshape(-1)


def _histogram(idx: jax.Array, nbins: int, acc: jax.Array | None = None) -> jax.Array:
    # Bin ``nbins`` collects the elements that do not take part, so the scatter needs no bounds checks.
    acc = jnp.zeros((nbins + 1,), jnp.int32) if acc is None else acc
    return acc.at[idx].add(1, mode="promise_in_bounds")


def _chunk(flat: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chunk ``i`` of the flat leaf ``flat`` (longer than ``CHUNK``): its magnitude bits, the flat positions,
    and ``valid``, which marks the elements not already in chunk ``i - 1``. The last chunk is clamped to
    end at the leaf's end, so every chunk has the static size ``CHUNK``. The one place for the chunk loop's
    indexing: the counting passes and the tie split both read chunks through it."""
    n = flat.shape[0]
    start = jnp.minimum(i * CHUNK, n - CHUNK)
    pos = start + lax.iota(jnp.int32, CHUNK)
    return magnitude_bits(lax.dynamic_slice(flat, (start,), (CHUNK,))), pos, pos >= i * CHUNK


def _fold_chunks(x: jax.Array, fn, init):
    """``fn(acc, bits, valid, i)`` folded over the chunks of ``x`` (flat), so no temporary is larger than a
    chunk; ``valid`` is ``None`` (and ``i`` is 0) when the leaf is one chunk."""
    flat = x.reshape(-1)
    if flat.shape[0] <= CHUNK:
        return fn(init, magnitude_bits(flat), None, 0)

    def body(i, acc):
        bits, _, valid = _chunk(flat, i)
        return fn(acc, bits, valid, i)

    return lax.fori_loop(0, n_chunks(flat.shape[0]), body, init)


def n_chunks(n: int) -> int:
    """Number of ``CHUNK``-sized chunks that cover ``n`` elements."""
    return -(-n // CHUNK)


def _first_bin_reaching(cum: jax.Array, k: jax.Array) -> jax.Array:
    """Index of the first bin whose inclusive cumulative count reaches ``k`` (0 when ``k <= 0``)."""
    return jnp.minimum(jnp.sum(cum < k, dtype=jnp.int32), cum.shape[0] - 1)


def _hi_digit(b: jax.Array) -> jax.Array:
    return (b >> _LO_BITS).astype(jnp.int32)


def _hist_hi_chunked(leaves: Sequence[jax.Array]) -> jax.Array:
    def hi_pass(acc, b, valid, i):
        del i
        idx = _hi_digit(b)
        return _histogram(idx if valid is None else jnp.where(valid, idx, _N_HI), _N_HI, acc)

    zeros_hi = jnp.zeros((_N_HI + 1,), jnp.int32)
    return sum(_fold_chunks(x, hi_pass, zeros_hi) for x in leaves)[:_N_HI]


def _hist_lo_chunked(leaves: Sequence[jax.Array], d_hi_u: jax.Array) -> jax.Array:
    def lo_pass(acc, b, valid, i):
        del i
        take = (b >> _LO_BITS) == d_hi_u
        take = take if valid is None else take & valid
        # Elements outside the bucket are counted in a second bank of bins, at their high digit (mod 2**15),
        # not in one shared bin: a single hot bin serialises the scatter's adds (about 2x slower on XLA
        # CPU), and the high digit gives the same access pattern as the first pass (measured fastest).
        lo = (b & jnp.uint32(_N_LO - 1)).astype(jnp.int32)
        other = ((b >> _LO_BITS) & jnp.uint32(_N_LO - 1)).astype(jnp.int32) + _N_LO
        return acc.at[jnp.where(take, lo, other)].add(1, mode="promise_in_bounds")

    zeros_lo = jnp.zeros((2 * _N_LO,), jnp.int32)
    return jnp.stack([_fold_chunks(x, lo_pass, zeros_lo)[:_N_LO] for x in leaves])  # per leaf: tie counts


def _bank(n: int, banks: int) -> jax.Array:
    """The histogram copy of each of ``n`` elements: ``i % banks`` (consecutive elements, distinct copies)."""
    return lax.rem(lax.iota(jnp.int32, n), jnp.int32(banks)) if banks > 1 else jnp.zeros((n,), jnp.int32)


def _n_banks(n: int, bins: int, cap: int) -> int:
    """Histogram copies for ``n`` elements over ``bins`` counters: up to ``cap``, never more counters than
    elements (a small input does not pay for zeroing and summing copies it cannot fill)."""
    return max(1, min(cap, n // bins))


def _hist_hi_vector(leaves: Sequence[jax.Array], fused: bool, max_banks: int) -> jax.Array:
    """First-digit histogram, whole leaves: one scatter per leaf, or one for all (``fused``)."""
    banks = _n_banks(sum(int(x.size) for x in leaves), _N_HI, max_banks)
    idx = [_hi_digit(b) + _bank(b.shape[0], banks) * _N_HI for b in map(magnitude_bits, leaves)]
    if fused:
        idx = [jnp.concatenate(idx)]
    acc = jnp.zeros((banks * _N_HI,), jnp.int32)
    for i in idx:
        acc = acc.at[i].add(1, mode="promise_in_bounds")
    return jnp.sum(acc.reshape(banks, _N_HI), axis=0)


def _hist_lo_vector(leaves: Sequence[jax.Array], d_hi_u: jax.Array, fused: bool, max_banks: int) -> jax.Array:
    """Per-leaf second-digit histograms ``(L, 2**15)`` of the elements in bucket ``d_hi_u``, whole leaves.

    Elements outside the bucket get an out-of-bounds index and are dropped by the scatter (no add at all).
    """
    n_leaves = len(leaves)
    if not fused:
        rows = []
        for b in map(magnitude_bits, leaves):
            banks = _n_banks(b.shape[0], _N_LO, max_banks)
            lo = (b & jnp.uint32(_N_LO - 1)).astype(jnp.int32) + _bank(b.shape[0], banks) * _N_LO
            idx = jnp.where((b >> _LO_BITS) == d_hi_u, lo, banks * _N_LO)
            h = jnp.zeros((banks * _N_LO,), jnp.int32).at[idx].add(1, mode="drop")
            rows.append(jnp.sum(h.reshape(banks, _N_LO), axis=0))
        return jnp.stack(rows)
    n_total = sum(int(x.size) for x in leaves)
    banks = _n_banks(n_total, _N_LO, min(max_banks, _FUSED_LO_BINS // (n_leaves * _N_LO)))
    size = banks * n_leaves * _N_LO
    idx = []
    for j, b in enumerate(map(magnitude_bits, leaves)):
        lo = (b & jnp.uint32(_N_LO - 1)).astype(jnp.int32)
        idx.append(jnp.where((b >> _LO_BITS) == d_hi_u, (_bank(b.shape[0], banks) * n_leaves + j) * _N_LO + lo, size))
    h = jnp.zeros((size,), jnp.int32).at[jnp.concatenate(idx)].add(1, mode="drop")
    return jnp.sum(h.reshape(banks, n_leaves, _N_LO), axis=0)


def kth_smallest_magnitude(
    leaves: Sequence[jax.Array], k: jax.Array, *, strategy: str = "auto", banks: int = BANKS
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k``-th smallest (1-indexed) ``|x|`` across several float arrays, in two counting passes.

    Args:
        leaves: float arrays of any shapes (bf16/f16 are widened to float32); at least one.
        k: int32 scalar in ``[0, n]`` (may be traced). ``k == 0`` gives threshold 0 and no element below.
        strategy: the layout of the counting passes, one of ``STRATEGIES`` or ``"auto"`` (see the module
            docstring); every layout returns the same values.
        banks: the most histogram copies of the vectorised layouts (a tuning knob; every value gives the
            same result).

    Returns:
        ``(t, n_below, n_equal)``: the threshold as a float32 bit pattern ``t`` (uint32 scalar), the number
        of elements strictly below it (int32), and per-leaf counts of elements equal to it (int32 ``(L,)``).

    Raises:
        ValueError: an unknown strategy, or no leaves.
    """
    strategy = resolve_strategy(strategy, leaves)
    if not leaves:
        raise ValueError("kth_smallest_magnitude needs at least one leaf")
    k = jnp.asarray(k, jnp.int32)
    vector = strategy != "chunked"
    hist_hi = _hist_hi_vector(leaves, strategy == "fused", banks) if vector else _hist_hi_chunked(leaves)
    cum_hi = jnp.cumsum(hist_hi)
    d_hi = _first_bin_reaching(cum_hi, k)
    below_hi = cum_hi[d_hi] - hist_hi[d_hi]
    k_lo = k - below_hi
    d_hi_u = d_hi.astype(jnp.uint32)
    hist_lo = _hist_lo_vector(leaves, d_hi_u, strategy == "fused", banks) if vector else _hist_lo_chunked(leaves, d_hi_u)
    tot_lo = jnp.sum(hist_lo, axis=0)
    cum_lo = jnp.cumsum(tot_lo)
    d_lo = _first_bin_reaching(cum_lo, k_lo)
    t = (d_hi_u << _LO_BITS) | d_lo.astype(jnp.uint32)
    n_below = below_hi + cum_lo[d_lo] - tot_lo[d_lo]
    n_equal = hist_lo[:, d_lo]
    # k == 0: threshold 0 with nothing below; the caller then prunes no tie (k - n_below == 0).
    t = jnp.where(k > 0, t, jnp.uint32(0))
    n_below = jnp.where(k > 0, n_below, 0)
    return t, n_below, n_equal


def _leaf_mask(x: jax.Array, t: jax.Array, ties_to_prune: jax.Array, n_equal: jax.Array) -> jax.Array:
    """Keeps ``|x| > t`` and the ties at ``t`` after the first ``ties_to_prune`` of them (row-major)."""
    shape = x.shape

    def simple(_):
        # All ties kept (ties_to_prune == 0) or all pruned (== n_equal): one fused elementwise pass.
        b = magnitude_bits(x)
        return ((b > t) | ((b == t) & (ties_to_prune == 0))).reshape(shape)

    def split(_):
        # Only the one leaf where the run of ties is cut gets here. Find the flat index of the last tie to
        # prune, then keep the ties after it: one counting pass over chunks, one cumsum over one chunk.
        flat = x.reshape(-1)
        n = flat.shape[0]
        if n <= CHUNK:
            b = magnitude_bits(flat)
            tie = b == t
            rank = jnp.cumsum(tie.astype(jnp.int32))  # 1-based rank of each tie in row-major order
            return ((b > t) | (tie & (rank > ties_to_prune))).reshape(shape)

        def count(acc, b, valid, i):
            return acc.at[i].set(jnp.sum((b == t) & valid, dtype=jnp.int32))

        per_chunk = _fold_chunks(flat, count, jnp.zeros((n_chunks(n),), jnp.int32))
        cum = jnp.cumsum(per_chunk)
        c = jnp.sum(cum < ties_to_prune, dtype=jnp.int32)  # chunk holding the last tie to prune
        need = ties_to_prune - (cum[c] - per_chunk[c])  # its rank among that chunk's new ties
        bits, pos, valid = _chunk(flat, c)
        tie = (bits == t) & valid
        rank = jnp.cumsum(tie.astype(jnp.int32))
        last = jnp.max(jnp.where(tie & (rank == need), pos, -1))  # flat index of the last pruned tie
        b = magnitude_bits(flat)
        return ((b > t) | ((b == t) & (lax.iota(jnp.int32, n) > last))).reshape(shape)

    partial = (ties_to_prune > 0) & (ties_to_prune < n_equal)
    return lax.cond(partial, split, simple, None)


def _vector_masks(leaves: Sequence[jax.Array], t: jax.Array, ties: jax.Array, n_equal: jax.Array) -> list[jax.Array]:
    """The masks of the vectorised layouts: one ``lax.switch`` finds the cut, then one elementwise pass per leaf.

    Leaf ``i`` prunes its ties at flat positions ``<= last_i``: ``-1`` when it keeps them all, its size when it
    prunes them all, and for the one leaf where the run of ties is cut (if any) the position of its
    ``ties[i]``-th tie, from a whole-leaf cumsum.
    """
    partial = (ties > 0) & (ties < n_equal)  # true for at most one leaf

    def cut(i):
        def find(_):
            tie = magnitude_bits(leaves[i]) == t
            rank = jnp.cumsum(tie.astype(jnp.int32))  # 1-based rank of each tie in row-major order
            return jnp.sum(rank < ties[i], dtype=jnp.int32)  # flat index of the ties[i]-th tie

        return find

    branches = [lambda _: jnp.int32(-1)] + [cut(i) for i in range(len(leaves))]
    which = jnp.where(jnp.any(partial), jnp.argmax(partial).astype(jnp.int32) + 1, 0)
    last_cut = lax.switch(which, branches, None)
    masks = []
    for i, x in enumerate(leaves):
        n = int(x.size)
        last = jnp.where(ties[i] <= 0, -1, jnp.where(ties[i] >= n_equal[i], n, last_cut))
        b = magnitude_bits(x)
        masks.append(((b > t) | ((b == t) & (lax.iota(jnp.int32, n) > last))).reshape(x.shape))
    return masks


def exact_keep_masks(
    leaves: Sequence[jax.Array], k: jax.Array, *, strategy: str = "auto", banks: int = BANKS
) -> list[jax.Array]:
    """Boolean keep-masks (shaped like the leaves) that prune exactly the ``k`` smallest ``|x|`` overall.

    Ties at the threshold are pruned in leaf order, then row-major flat index (a stable-sort order).

    Args:
        leaves: float arrays of any shapes; at least one.
        k: int32 scalar in ``[0, n]`` (may be traced).
        strategy: the layout, one of ``STRATEGIES`` or ``"auto"`` (see the module docstring); every layout
            gives the same masks.
        banks: as in :func:`kth_smallest_magnitude`.

    Raises:
        ValueError: an unknown strategy, or no leaves.
    """
    strategy = resolve_strategy(strategy, leaves)
    k = jnp.asarray(k, jnp.int32)
    t, n_below, n_equal = kth_smallest_magnitude(leaves, k, strategy=strategy, banks=banks)
    ties = k - n_below  # how many of the tied elements must go
    offsets = jnp.cumsum(n_equal) - n_equal  # ties in earlier leaves
    per_leaf = jnp.clip(ties - offsets, 0, n_equal)
    if strategy != "chunked":
        return _vector_masks(leaves, t, per_leaf, n_equal)
    return [_leaf_mask(x, t, per_leaf[i], n_equal[i]) for i, x in enumerate(leaves)]


def round_half_even_count(fraction: jax.Array, n: int) -> jax.Array:
    """``round_half_even(fraction * n)`` for a float32 ``fraction`` in ``[0, 1]``, computed exactly.

    A float32 product ``fraction * n`` rounds once ``n`` passes 2**24; here the product of the 24-bit
    mantissa and ``n`` is formed exactly in two 32-bit limbs (no x64 needed) and then rounded half to even,
    so the result is the exact real product rounded half to even for every float32 ``fraction``.

    Args:
        fraction: float32 scalar in ``[0, 1]`` (may be traced).
        n: static element count, ``0 <= n < 2**31``.
    """
    if not 0 <= n < 2**31:
        raise ValueError(f"element count {n} must be in [0, 2**31)")
    s = lax.bitcast_convert_type(jnp.asarray(fraction, jnp.float32), jnp.uint32)
    e = (s >> 23) & jnp.uint32(0xFF)
    mant = s & jnp.uint32(0x7FFFFF)
    m = jnp.where(e == 0, mant, mant | jnp.uint32(0x800000))
    sh = jnp.where(e == 0, jnp.uint32(149), jnp.uint32(150) - e)  # fraction = m * 2**-sh
    # T = m * n = H * 2**32 + L exactly, from 16-bit limbs.
    m1, m0 = m >> 16, m & jnp.uint32(0xFFFF)
    n1, n0 = jnp.uint32(n >> 16), jnp.uint32(n & 0xFFFF)
    a, mid, c = m1 * n1, m1 * n0 + m0 * n1, m0 * n0
    tmp = mid + (c >> 16)
    lo = ((tmp & jnp.uint32(0xFFFF)) << 16) | (c & jnp.uint32(0xFFFF))
    hi = a + (tmp >> 16)
    big = sh >= 32  # quotient from the high limb only
    shb = jnp.where(big, sh - 32, 0)
    shs = jnp.where(big, 0, sh)
    q_big = jnp.where(shb < 32, hi >> jnp.minimum(shb, 31), 0)
    q_big = jnp.where(shb >= 32, 0, q_big)
    q_small = (hi << (32 - jnp.maximum(shs, 1))) * (shs > 0) | (lo >> jnp.minimum(shs, 31))
    q = jnp.where(big, q_big, q_small)
    # Remainder versus one half (2**(sh-1)), compared as two limbs (rh, rl) vs (hh, hl).
    one = jnp.uint32(1)
    rh = jnp.where(big, jnp.where(shb >= 32, hi, hi & ((one << jnp.minimum(shb, 31)) - 1)), 0)
    rl = jnp.where(big, lo, lo & ((one << jnp.minimum(shs, 31)) - 1))
    hh = jnp.where(big & (sh >= 33), one << jnp.minimum(sh - 33, 31), 0)
    hh = jnp.where(sh >= 65, 0, hh)
    hl = jnp.where(big, jnp.where(sh == 32, jnp.uint32(1 << 31), 0), one << (jnp.maximum(shs, 1) - 1))
    # sh >= 65 means the product is far below one half of 2**sh: quotient and remainder test give 0.
    gt = (rh > hh) | ((rh == hh) & (rl > hl))
    eq = (rh == hh) & (rl == hl)
    up = gt | (eq & ((q & one) == one))
    up = up & (sh < 65)
    q = jnp.where(sh >= 64, 0, q)
    return (q + up.astype(jnp.uint32)).astype(jnp.int32)
