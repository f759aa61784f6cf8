"""The one bit packer: JAX and NumPy agree with each other and with the documented layout, 1 to 8 bits."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from compressjax.bitpack import pack, pack_np, packed_nbytes, unpack, unpack_np

_pack = jax.jit(pack, static_argnums=1)
_unpack = jax.jit(unpack, static_argnums=(1, 2))


def reference(u: np.ndarray, bits: int) -> np.ndarray:
    """The layout, spelled out: code i at bits [bits*i, bits*i + bits) of a little-endian stream."""
    stream = [(int(c) >> b) & 1 for c in u for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return np.array([sum(stream[8 * i + b] << b for b in range(8)) for i in range(len(stream) // 8)], np.uint8)


@settings(max_examples=32, deadline=None)
@given(bits=st.integers(1, 8), n=st.sampled_from([1, 7, 8, 9, 37]), seed=st.integers(0, 2**31 - 1))
def test_jax_and_numpy_pack_the_documented_layout_and_round_trip(bits, n, seed):
    u = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    want = reference(u, bits)
    assert want.shape == (packed_nbytes(n, bits),)
    np.testing.assert_array_equal(np.asarray(_pack(jnp.asarray(u), bits)), want)
    np.testing.assert_array_equal(pack_np(u, bits), want)
    np.testing.assert_array_equal(np.asarray(_unpack(jnp.asarray(want), bits, n)), u)
    np.testing.assert_array_equal(unpack_np(want, bits, n), u)


def test_empty_and_multidimensional_inputs():
    for bits in (1, 3, 4, 5, 8):
        assert pack(jnp.zeros((0,), jnp.uint8), bits).shape == (0,)
        assert unpack(jnp.zeros((0,), jnp.uint8), bits, 0).shape == (0,)
    u = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 8
    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(u), 3)), pack_np(u.ravel(), 3))
