"""Bit packing: unsigned codes of 1-8 bits to and from a little-endian ``uint8`` bit stream, in JAX and NumPy.

The one layout of every packed array in compressjax (``QArray`` codes, ``Codebook`` indices, the file
format): code ``i`` (C order) takes bits ``[bits*i, bits*i + bits)`` of the stream, least significant bit
first, and the stream has ``ceil(n * bits / 8)`` bytes. 8-bit codes are stored as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["packed_nbytes", "pack", "unpack", "pack_np", "unpack_np"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` packed codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return -(-n * bits // 8)


def pack(u: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned codes ``u`` (values in ``[0, 2^bits)``, any shape) into a flat ``uint8`` stream."""
    n = u.size
    if bits == 8:
        return jnp.ravel(u).astype(jnp.uint8)
    if bits <= 4:
        # 8 codes of <= 4 bits fill one 32-bit word exactly, which splits into `bits` bytes (one pass).
        w = jnp.pad(jnp.ravel(u).astype(jnp.uint32), (0, (-n) % 8)).reshape(-1, 8)
        word = jnp.sum(w << (bits * jnp.arange(8, dtype=jnp.uint32)), axis=1, dtype=jnp.uint32)
        by = (word[:, None] >> (8 * jnp.arange(bits, dtype=jnp.uint32))) & 0xFF
        return by.astype(jnp.uint8).reshape(-1)[: packed_nbytes(n, bits)]
    planes = (jnp.ravel(u).astype(jnp.uint8)[:, None] >> jnp.arange(bits, dtype=jnp.uint8)) & 1
    flat = planes.reshape(-1)
    flat = jnp.pad(flat, (0, (-flat.size) % 8)).reshape(-1, 8)
    return jnp.sum(flat << jnp.arange(8, dtype=jnp.uint8), axis=1, dtype=jnp.uint8)[: packed_nbytes(n, bits)]


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: the first ``n`` codes as a flat ``uint8`` array."""
    packed = jnp.asarray(packed)
    if bits == 8:
        return packed.astype(jnp.uint8)[:n]
    if bits <= 4:
        by = packed.astype(jnp.uint32)
        by = jnp.pad(by, (0, (-by.size) % bits)).reshape(-1, bits)
        word = jnp.sum(by << (8 * jnp.arange(bits, dtype=jnp.uint32)), axis=1, dtype=jnp.uint32)
        u = (word[:, None] >> (bits * jnp.arange(8, dtype=jnp.uint32))) & ((1 << bits) - 1)
        return u.astype(jnp.uint8).reshape(-1)[:n]
    planes = (packed.astype(jnp.uint8)[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    planes = planes.reshape(-1)[: n * bits].reshape(n, bits)
    return jnp.sum(planes << jnp.arange(bits, dtype=jnp.uint8), axis=1, dtype=jnp.uint8)


def pack_np(u: np.ndarray, bits: int) -> np.ndarray:
    """NumPy twin of :func:`pack` (eager JAX packing of a large leaf costs about 10x more)."""
    u = np.ascontiguousarray(u, np.uint8).reshape(-1)
    if bits == 8:
        return u
    if bits == 4:
        u = np.concatenate([u, np.zeros(u.size % 2, np.uint8)])
        return u[0::2] | (u[1::2] << 4)
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_np(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy twin of :func:`unpack`."""
    if bits == 8:
        return np.asarray(packed[:n], np.uint8)
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=n * bits, bitorder="little").reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
