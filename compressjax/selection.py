"""Exact k-th smallest value over a whole pytree in O(n), without sorting or concatenating.

Non-negative float32 values order exactly like their uint32 bit patterns (IEEE 754), so the k-th smallest
magnitude can be found by a radix select on the bit patterns: two counting passes over every leaf, each
building a histogram of one digit (the high 16 bits, then the low 15 bits of the elements whose high digit
matches) with per-leaf histograms summed across leaves. A third, elementwise pass writes the masks. Leaves
are read in chunks of ``CHUNK`` elements (``lax.fori_loop`` over ``lax.dynamic_slice``), so beyond the
inputs and the boolean masks only O(CHUNK) memory is used; no array of size ``n`` is ever built except the
masks.

The count of pruned elements is exact: ties at the threshold are split in a fixed order (leaf order of
``jax.tree_util`` flattening, then row-major flat index within a leaf; the earliest ties are pruned). That
order is the order of a stable sort of the concatenated magnitudes, which is what the tests compare to.
Only the one leaf where the run of ties is cut (chosen by ``lax.cond``) pays for locating the cut.

Choice of scheme (``python -m benchmarks.pruning --alternatives``, XLA CPU, one pass over 10M weights):
a fused ``sum(bits < t)`` costs about 5x a chunked histogram pass and bisection needs 31 of them; seven
thresholds in one fused reduction cost ~19x and still need 11 passes; a whole-leaf scatter-add histogram
(or ``jnp.bincount``) costs 6-8x the same scatter done in cache-sized chunks. Hence: two chunked
scatter-add histogram passes (16 + 15 bits).

References:
    Radix select: e.g. Alabi et al., "Fast k-selection algorithms for graphics processing units", JEA 2012.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["magnitude_bits", "kth_smallest_magnitude", "exact_keep_masks", "round_half_even_count", "n_chunks", "CHUNK"]

_HI_BITS = 16  # the high digit: bits 15..30 of the pattern (bit 31, the sign, is 0 for magnitudes)
_LO_BITS = 15  # the low digit: bits 0..14
_N_HI = 1 << _HI_BITS
_N_LO = 1 << _LO_BITS
# Leaves above this many elements are read in chunks of it, so no temporary outgrows a chunk (the peak
# memory is the params plus the masks plus O(CHUNK)). 2**18 elements = 1 MiB of bit patterns, which stays
# in cache between the bit computation and the scatter: 2**16..2**20 ran alike, 2**22 three times slower.
CHUNK = 1 << 18


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


def kth_smallest_magnitude(leaves: Sequence[jax.Array], k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k``-th smallest (1-indexed) ``|x|`` across several float arrays, in two counting passes.

    Args:
        leaves: float arrays of any shapes (bf16/f16 are widened to float32).
        k: int32 scalar in ``[0, n]`` (may be traced). ``k == 0`` gives threshold 0 and no element below.

    Returns:
        ``(t, n_below, n_equal)``: the threshold as a float32 bit pattern ``t`` (uint32 scalar), the number
        of elements strictly below it (int32), and per-leaf counts of elements equal to it (int32 ``(L,)``).
    """
    k = jnp.asarray(k, jnp.int32)

    def hi_pass(acc, b, valid, i):
        del i
        idx = (b >> _LO_BITS).astype(jnp.int32)
        return _histogram(idx if valid is None else jnp.where(valid, idx, _N_HI), _N_HI, acc)

    zeros_hi = jnp.zeros((_N_HI + 1,), jnp.int32)
    hist_hi = sum(_fold_chunks(x, hi_pass, zeros_hi) for x in leaves)[:_N_HI]
    cum_hi = jnp.cumsum(hist_hi)
    d_hi = _first_bin_reaching(cum_hi, k)
    below_hi = cum_hi[d_hi] - hist_hi[d_hi]
    k_lo = k - below_hi
    d_hi_u = d_hi.astype(jnp.uint32)

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
    hist_lo = jnp.stack([_fold_chunks(x, lo_pass, zeros_lo)[:_N_LO] for x in leaves])  # per leaf: tie counts
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


def exact_keep_masks(leaves: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Boolean keep-masks (shaped like the leaves) that prune exactly the ``k`` smallest ``|x|`` overall.

    Ties at the threshold are pruned in leaf order, then row-major flat index (a stable-sort order).
    """
    k = jnp.asarray(k, jnp.int32)
    t, n_below, n_equal = kth_smallest_magnitude(leaves, k)
    ties = k - n_below  # how many of the tied elements must go
    offsets = jnp.cumsum(n_equal) - n_equal  # ties in earlier leaves
    masks = []
    for i, x in enumerate(leaves):
        r = jnp.clip(ties - offsets[i], 0, n_equal[i])
        masks.append(_leaf_mask(x, t, r, n_equal[i]))
    return masks


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
