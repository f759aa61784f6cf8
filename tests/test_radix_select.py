"""Tests for compressjax.radix_select: exact k-th value selection and exact half-even counts."""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax import radix_select
from compressjax.radix_select import exact_keep_masks, kth_smallest_magnitude, magnitude_bits, round_half_even_count


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
_masks_by_strategy = {s: jax.jit(functools.partial(exact_keep_masks, strategy=s)) for s in radix_select.STRATEGIES}


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
    strategy=st.sampled_from(radix_select.STRATEGIES),
)
@pytest.mark.slow
def test_exact_keep_masks_equal_stable_sort(sizes, kind, frac, seed, strategy):
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
    got = np.concatenate([np.asarray(m).ravel() for m in _masks_by_strategy[strategy](xs, k)])
    assert int(np.sum(~got)) == k
    assert (got == _stable_ref(xs, k)).all()


# ------------------------------------------------------------------ layouts: chunked (CPU), whole, fused (GPU/TPU)
STRATEGIES = list(radix_select.STRATEGIES)


def _leaves(kind: str, rng: np.random.Generator, sizes) -> list[jax.Array]:
    if kind == "ints":  # many duplicates: the run of ties is cut inside a leaf for most k
        return [jnp.asarray(rng.integers(-3, 4, s), jnp.float32) for s in sizes]
    if kind == "normal":
        return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in sizes]
    if kind == "equal":  # every magnitude the same: one run of ties across all leaves
        return [jnp.asarray(rng.choice([-1.5, 1.5], s), jnp.float32) for s in sizes]
    if kind == "zeros":  # a pruned model: most weights exactly 0 (both signs), the rest spread
        return [jnp.asarray(np.where(rng.random(s) < 0.7, rng.choice([0.0, -0.0], s), rng.standard_normal(s)), jnp.float32) for s in sizes]
    if kind == "bf16":  # bf16 leaves (widened to float32) next to a float32 one; bf16 has few distinct values
        xs = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in sizes[:-1]]
        return [*xs, jnp.asarray(rng.integers(-2, 3, sizes[-1]), jnp.float32)]
    raise AssertionError(kind)


def _small_chunks_and_banks(monkeypatch):
    # Leaves larger than CHUNK take the chunk loop and the chunked tie split; several histogram copies
    # (banks) are used by the vectorised layouts even for these tiny leaves (normally only from 2**16 up).
    monkeypatch.setattr(radix_select, "CHUNK", 16)
    monkeypatch.setattr(radix_select, "_n_banks", lambda n, bins, cap=radix_select.BANKS: max(1, min(cap, 3)))


@pytest.mark.parametrize("kind", ["ints", "normal", "equal", "zeros", "bf16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_stable_sort(monkeypatch, strategy, kind):
    _small_chunks_and_banks(monkeypatch)
    rng = np.random.default_rng(len(kind))
    xs = _leaves(kind, rng, [(5, 10), (16,), (7,), (33,), (1,)])
    f = jax.jit(lambda xs, k: exact_keep_masks(xs, k, strategy=strategy))  # fresh: traced with the patches
    n = sum(int(x.size) for x in xs)
    for k in range(n + 1):  # one trace: k is an argument
        got = np.concatenate([np.asarray(m).ravel() for m in f(xs, k)])
        np.testing.assert_array_equal(got, _stable_ref(xs, k), err_msg=f"{strategy} {kind} k={k}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_same_threshold_and_counts(monkeypatch, strategy):
    _small_chunks_and_banks(monkeypatch)
    xs = _leaves("ints", np.random.default_rng(7), [(3, 11), (40,), (2, 2)])
    kth = jax.jit(lambda xs, k: kth_smallest_magnitude(xs, k, strategy=strategy))
    ref = jax.jit(lambda xs, k: kth_smallest_magnitude(xs, k, strategy="chunked"))
    for k in range(0, 78, 5):
        for a, b in zip(kth(xs, k), ref(xs, k), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{strategy} k={k}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_with_traced_sparsity(monkeypatch, strategy):
    from compressjax import magnitude_masks

    monkeypatch.setenv(radix_select.STRATEGY_ENV, strategy)
    monkeypatch.setattr(radix_select, "CHUNK", 64)
    rng = np.random.default_rng(11)
    params = {"a": {"kernel": jnp.asarray(rng.integers(-4, 5, (10, 20)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.standard_normal((3, 30)), jnp.bfloat16), "bias": jnp.ones(30)}}
    leaves = [params["a"]["kernel"], params["b"]["kernel"]]
    f = jax.jit(lambda p, s: magnitude_masks(p, s, scope="global"))
    for s in [0.0, 0.1, 0.33, 0.5, 0.7, 0.999, 1.0]:
        m = f(params, jnp.float32(s))
        assert m["b"]["bias"] is None
        got = np.concatenate([np.asarray(m["a"]["kernel"]).ravel(), np.asarray(m["b"]["kernel"]).ravel()])
        k = exact_round(np.float32(s), got.size)
        np.testing.assert_array_equal(got, _stable_ref(leaves, k), err_msg=f"{strategy} s={s}")


def test_vectorised_layouts_have_no_chunk_loop_and_one_conditional(monkeypatch):
    import re

    monkeypatch.setattr(radix_select, "CHUNK", 16)
    xs = [jnp.ones((8, 9)), jnp.ones((40,)), jnp.ones((3,))]  # two leaves above CHUNK, one below

    def count(strategy):
        text = str(jax.make_jaxpr(lambda xs, k: exact_keep_masks(xs, k, strategy=strategy))(xs, 5))
        return {op: len(re.findall(rf"\b{op}\[", text)) for op in ("cond", "scan", "while", "scatter-add")}

    # chunked: a loop per pass and per tie split in each leaf above CHUNK, a cond per leaf
    assert count("chunked") == {"cond": 3, "scan": 6, "while": 0, "scatter-add": 6}
    # whole: a scatter per leaf and pass; fused: one per pass; both one lax.switch for the cut, no loop
    assert count("whole") == {"cond": 1, "scan": 0, "while": 0, "scatter-add": 6}
    assert count("fused") == {"cond": 1, "scan": 0, "while": 0, "scatter-add": 2}


def test_auto_is_chunked_on_cpu_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv(radix_select.STRATEGY_ENV, raising=False)
    x = jnp.ones((4, 4))
    assert jax.default_backend() == "cpu"
    assert radix_select.resolve_strategy("auto", [x]) == "chunked"
    assert radix_select.resolve_strategy("auto", [np.ones(3)]) == "chunked"  # no device: the default backend
    seen = []
    jax.jit(lambda x: seen.append(radix_select.resolve_strategy("auto", [x])) or x)(x)  # tracer: default backend
    assert seen == ["chunked"]
    for s in STRATEGIES:
        assert radix_select.resolve_strategy(s, [x]) == s
        monkeypatch.setenv(radix_select.STRATEGY_ENV, s)
        assert radix_select.resolve_strategy("auto", [x]) == s
        assert radix_select.resolve_strategy("chunked", [x]) == "chunked"  # an explicit argument wins
    monkeypatch.setenv(radix_select.STRATEGY_ENV, "auto")
    assert radix_select.resolve_strategy("auto", [x]) == "chunked"


def test_auto_follows_the_backend_of_the_leaves(monkeypatch):
    monkeypatch.delenv(radix_select.STRATEGY_ENV, raising=False)
    monkeypatch.setattr(radix_select, "_platform", lambda leaves: "gpu")
    assert radix_select.resolve_strategy("auto", [jnp.ones(2)]) == radix_select.ACCELERATOR_STRATEGY
    monkeypatch.setattr(radix_select, "_platform", lambda leaves: "tpu")
    assert radix_select.resolve_strategy("auto", [jnp.ones(2)]) == radix_select.ACCELERATOR_STRATEGY


def test_unknown_strategy_is_rejected_by_name(monkeypatch):
    from compressjax import magnitude_masks

    xs = [jnp.ones((2, 2))]
    for fn in (exact_keep_masks, kth_smallest_magnitude):
        with pytest.raises(ValueError, match="'sorted'"):
            fn(xs, 1, strategy="sorted")
    monkeypatch.setenv(radix_select.STRATEGY_ENV, "bogus")
    with pytest.raises(ValueError, match=f"{radix_select.STRATEGY_ENV}.*'bogus'"):
        magnitude_masks({"w": jnp.ones((2, 2))}, 0.5)
    with pytest.raises(ValueError, match="at least one leaf"):
        kth_smallest_magnitude([], 0, strategy="chunked")
