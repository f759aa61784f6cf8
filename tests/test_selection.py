"""Tests for compressjax.selection: exact k-th value selection and exact half-even counts."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax import selection
from compressjax.selection import exact_keep_masks, kth_smallest_magnitude, magnitude_bits, round_half_even_count


def exact_round(fraction: np.float32, n: int) -> int:
    """round_half_even of the exact real product (Fraction arithmetic)."""
    x = Fraction(float(fraction)) * n
    q, r = divmod(x.numerator, x.denominator)
    twice = 2 * r
    if twice > x.denominator or (twice == x.denominator and q % 2 == 1):
        q += 1
    return q


_count = jax.jit(round_half_even_count, static_argnums=1)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 1000, 2**24 + 1, 50_331_648, 2**31 - 1])
def test_round_half_even_count_is_exact(n):
    rng = np.random.default_rng(n % 1000)
    fr = [0.0, 1.0, 0.5, 0.25, 0.3, 0.7, 1e-10, 1e-30, 1e-45, np.nextafter(np.float32(1), np.float32(0))]
    fr += list(rng.random(40))
    if n:
        fr += [(j + 0.5) / n for j in range(min(n, 20))]  # half-way cases
    for f in np.asarray(fr, np.float32):
        assert int(_count(jnp.float32(f), n)) == exact_round(f, n), (f, n)


def test_round_half_even_ties_go_to_even():
    assert int(_count(jnp.float32(0.5), 1)) == 0
    assert int(_count(jnp.float32(0.5), 3)) == 2  # 1.5 -> 2
    assert int(_count(jnp.float32(0.25), 10)) == 2  # 2.5 -> 2
    assert int(_count(jnp.float32(0.125), 28)) == 4  # 3.5 -> 4


def test_round_half_even_count_rejects_bad_n():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        round_half_even_count(jnp.float32(0.5), 2**31)


def test_magnitude_bits_order_like_magnitudes():
    x = jnp.asarray([-3.0, 0.0, -0.0, 1e-40, 2.5, -1e-40, 7.0, -np.inf], jnp.float32)
    b = np.asarray(magnitude_bits(x))
    a = np.abs(np.asarray(x))
    assert b.dtype == np.uint32
    assert (np.argsort(b, kind="stable") == np.argsort(a, kind="stable")).all()
    assert np.asarray(magnitude_bits(jnp.asarray([[1.5, -2.0]], jnp.bfloat16))).tolist() == [
        np.float32(1.5).view(np.uint32),
        np.float32(2.0).view(np.uint32),
    ]


def _stable_ref(arrays, k):
    a = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in arrays])
    keep = np.ones(a.size, bool)
    keep[np.argsort(a, kind="stable")[:k]] = False
    return keep


_masks = jax.jit(exact_keep_masks)
_kth = jax.jit(kth_smallest_magnitude)


def test_kth_smallest_matches_sort():
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.integers(-3, 4, size=s).astype(np.float32)) for s in (37, 50, 5)]
    a = np.sort(np.abs(np.concatenate([np.asarray(x) for x in xs])))
    for k in range(1, a.size + 1, 7):
        t, below, equal = _kth(xs, k)
        tv = np.asarray(t).view(np.float32)
        assert tv == a[k - 1]
        assert int(below) == int(np.sum(a < tv))
        assert [int(e) for e in equal] == [int(np.sum(np.abs(np.asarray(x)) == tv)) for x in xs]
    t, below, _ = _kth(xs, 0)
    assert int(t) == 0 and int(below) == 0


def test_values_spanning_both_digits():
    # Values that share the high 16 bits and differ only in the low 15 (and vice versa).
    base = np.float32(1.0).view(np.uint32)
    bits = np.asarray([base + d for d in (5, 1, 3, 0, 2, 4)] + [base + (1 << 15) + 1, base - (1 << 15)], np.uint32)
    xs = [jnp.asarray(bits.view(np.float32))]
    for k in range(0, bits.size + 1):
        got = np.asarray(_masks(xs, k)[0])
        assert (got == _stable_ref(xs, k)).all()


# A few fixed shapes (values and k vary freely): each new shape would cost a compilation.
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.sampled_from([(23, 40, 7), (64,), (1, 31)]),
    kind=st.sampled_from(["normal", "ints", "zeros", "tiny"]),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_exact_keep_masks_equal_stable_sort(sizes, kind, frac, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        xs = [rng.standard_normal(s) for s in sizes]
    elif kind == "ints":
        xs = [rng.integers(-2, 3, s) for s in sizes]
    elif kind == "zeros":
        xs = [np.zeros(s) for s in sizes]
    else:
        xs = [rng.standard_normal(s) * 1e-39 for s in sizes]  # subnormals
    xs = [jnp.asarray(x, jnp.float32) for x in xs]
    n = sum(sizes)
    k = round(frac * n)
    got = np.concatenate([np.asarray(m).ravel() for m in _masks(xs, k)])
    assert int(np.sum(~got)) == k
    assert (got == _stable_ref(xs, k)).all()


@pytest.mark.parametrize("kind", ["ints", "normal"])
def test_chunked_passes_match_stable_sort(monkeypatch, kind):
    # Leaves larger than CHUNK are read chunk by chunk (last chunk clamped and overlapping); shrink CHUNK so
    # the chunked histogram passes and the chunked tie split run on small arrays.
    monkeypatch.setattr(selection, "CHUNK", 16)
    rng = np.random.default_rng(3)
    sizes = [(5, 10), (16,), (7,), (33,)]
    make = (lambda s: rng.integers(-3, 4, s)) if kind == "ints" else (lambda s: rng.standard_normal(s))
    xs = [jnp.asarray(make(s), jnp.float32) for s in sizes]
    f = jax.jit(lambda xs, k: exact_keep_masks(xs, k))  # a fresh function: traced with CHUNK = 16
    n = sum(int(x.size) for x in xs)
    for k in [0, 1, 9, 40, 53, 77, 100, n - 1, n]:
        got = np.concatenate([np.asarray(m).ravel() for m in f(xs, k)])
        np.testing.assert_array_equal(got, _stable_ref(xs, k), err_msg=f"k={k}")
