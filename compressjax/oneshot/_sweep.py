"""The optimal-brain-surgeon column sweep shared by GPTQ, SparseGPT and other one-shot quantizers.

A kernel ``W`` of shape ``(d_in, d_out)`` whose rows pair with the rows of the input Gram matrix
``H = sum x x^T`` (``(d_in, d_in)``) is compressed one input row at a time. After row ``j`` is replaced by
its compressed value ``q_j``, the error ``e_j = (w_j - q_j) / U_jj`` is spread over the rows not yet
processed through the upper Cholesky factor ``U`` of the damped inverse Hessian
(``W[k] -= U[j, k] e_j`` for ``k > j``), which is the optimal-brain-surgeon update restricted to the
remaining rows. Rows are processed in blocks: a ``lax.fori_loop`` over the rows of a block updates only
the block, and one matrix product per block carries the accumulated errors to every later row ("lazy
batch updates"). Blocks are a second ``lax.fori_loop``, so the compiled program is the same size for any
kernel width: compile time does not grow with ``d_in``.

Conventions taken from the reference implementations (IST-DASLab ``gptq`` and ``sparsegpt``):

* dead inputs (``H_jj == 0``: the input was always zero) get ``H_jj = 1`` and their weight row set to 0;
* ``damp * mean(diag(H))`` is added to the diagonal before the Cholesky factorisation;
* ``U`` is the upper Cholesky factor of ``(H + damp I)^-1``.

Rows are padded to a whole number of blocks with zero weights and an identity Hessian block, which is
decoupled from the real rows, so padding changes nothing.

References:
    Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).
    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    ICML 2023 (arXiv:2301.00774).
    Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon", NeurIPS 1992.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["error_feedback", "inverse_hessian_factor", "run_sweep", "padded_block", "check_hessian_matrix"]


def check_hessian_matrix(h: Any, d_in: int, path: str) -> None:
    """Raises ``ValueError`` naming ``path`` when ``h`` is not a finite ``(d_in, d_in)`` float matrix."""
    shape = tuple(getattr(h, "shape", ()))
    if shape != (d_in, d_in):
        raise ValueError(f"leaf {path!r}: Hessian has shape {shape}, expected ({d_in}, {d_in}) to pair with the kernel's {d_in} input rows")
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"leaf {path!r}: Hessian has dtype {h.dtype}, expected float32")
    if not isinstance(h, jax.core.Tracer):
        a = np.asarray(h)
        if not np.all(np.isfinite(a)):
            bad = a[~np.isfinite(a)].ravel()[0]
            raise ValueError(f"leaf {path!r}: Hessian holds non-finite values (e.g. {bad}); the calibration inputs had NaN or Inf")


def check_damp(damp: Any) -> float | jax.Array:
    if isinstance(damp, bool) or not isinstance(damp, Real | jax.Array | np.ndarray):
        raise TypeError(f"damp must be a non-negative float, got {damp!r}")
    if isinstance(damp, Real):
        if not (math.isfinite(float(damp)) and float(damp) >= 0.0):
            raise ValueError(f"damp must be a finite non-negative float, got {damp!r}")
        return float(damp)
    return damp


def check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(f"block_size must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def padded_block(d_in: int, block_size: int, multiple: int = 1) -> tuple[int, int]:
    """``(block, n_pad)``: a block size that is a multiple of ``multiple`` (group size, ``m`` of N:M) and at
    most needed for ``d_in`` rows, and the padded row count ``n_pad`` (a multiple of ``block``)."""
    block = max(1, block_size // multiple) * multiple
    block = min(block, -(-d_in // multiple) * multiple)
    return block, -(-d_in // block) * block


def inverse_hessian_factor(h: jax.Array, damp: float | jax.Array, n_pad: int) -> tuple[jax.Array, jax.Array]:
    """``(U, dead)``: the upper Cholesky factor of ``(H' + damp * mean(diag H') I)^-1`` padded to ``n_pad``
    rows with an identity block, where ``H'`` is ``H`` with dead inputs' diagonal set to 1; ``dead`` marks
    the inputs whose diagonal was 0 (length ``d_in``)."""
    h = jnp.asarray(h, jnp.float32)
    d_in = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag == 0
    eye = jnp.eye(d_in, dtype=jnp.float32)
    h = jnp.where(dead[:, None] & (eye > 0), 1.0, h)
    h = h + jnp.asarray(damp, jnp.float32) * jnp.mean(jnp.diagonal(h)) * eye
    if n_pad > d_in:
        h = jnp.block([[h, jnp.zeros((d_in, n_pad - d_in), h.dtype)], [jnp.zeros((n_pad - d_in, d_in), h.dtype), jnp.eye(n_pad - d_in, dtype=h.dtype)]])
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(n_pad, dtype=jnp.float32))
    hinv = 0.5 * (hinv + hinv.T)
    u = jnp.linalg.cholesky(hinv).T
    return u, dead


# A row step: (row, j, i, w_block, state) -> (q_row, store_row, state). `row` is the current row j of the
# kernel (global index j, index i within the block whose current values are `w_block`), `q_row` its
# compressed float value (the error is row - q_row), `store_row` what is written to the output buffer.
RowStep = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]
# A block hook: (b, w_block, state) -> state, called at the start of block b with its current rows.
BlockHook = Callable[[jax.Array, jax.Array, Any], Any]


def run_sweep(w: jax.Array, u: jax.Array, step: RowStep, state: Any, block: int, store_dtype, block_hook: BlockHook | None = None):
    """The blocked error-feedback sweep over the rows of ``w`` (``(n_pad, d_out)``, padded) with ``U``.

    Returns ``(stored_rows, state)`` with ``stored_rows`` of shape ``(n_pad, d_out)`` and ``store_dtype``
    (a dtype, or a tuple of dtypes when ``step`` stores a tuple of rows). Traceable; ``block`` must divide
    ``n_pad``.
    """
    n, d = w.shape
    nb = n // block
    out0 = jax.tree.map(lambda dt: jnp.zeros((n, d), dt), store_dtype)

    def block_body(b, carry):
        w, out, st = carry
        i1 = b * block
        w1 = lax.dynamic_slice(w, (i1, 0), (block, d))
        u_rows = lax.dynamic_slice(u, (i1, 0), (block, n))
        u1 = lax.dynamic_slice(u_rows, (0, i1), (block, block))
        if block_hook is not None:
            st = block_hook(b, w1, st)

        def col(i, c):
            w1, e1, o1, st = c
            row = w1[i]
            q, store, st = step(row, i1 + i, i, w1, st)
            err = (row - q) / u1[i, i]
            # U is upper triangular: u1[i, k] == 0 for k < i, so earlier rows are untouched.
            w1 = w1 - u1[i][:, None] * err[None, :]
            o1 = jax.tree.map(lambda o, r: o.at[i].set(r.astype(o.dtype)), o1, store)
            return w1, e1.at[i].set(err), o1, st

        e0 = jnp.zeros((block, d), jnp.float32)
        o0 = jax.tree.map(lambda dt: jnp.zeros((block, d), dt), store_dtype)
        _, e1, o1, st = lax.fori_loop(0, block, col, (w1, e0, o0, st))
        out = jax.tree.map(lambda o, o1: lax.dynamic_update_slice(o, o1, (i1, 0)), out, o1)
        # Carry the block's errors to every later row in one product. Rows before the block get zeros
        # (U is upper triangular); the block's own rows are done and never read again.
        w = w - jnp.matmul(u_rows.T, e1, precision=lax.Precision.HIGHEST)
        return w, out, st

    _, out, state = lax.fori_loop(0, nb, block_body, (w, out0, state))
    return out, state


@partial(jax.jit, static_argnames=("quantize_column", "block_size"))
def _error_feedback(w, h, damp, quantize_column, block_size):
    d_in, d_out = w.shape
    block, n_pad = padded_block(d_in, block_size)
    u, dead = inverse_hessian_factor(h, damp, n_pad)
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    w = jnp.pad(w, ((0, n_pad - d_in), (0, 0)))

    def step(row, j, i, w1, st):
        del i, w1
        q = jnp.asarray(quantize_column(row, jnp.minimum(j, d_in - 1)), jnp.float32)
        q = jnp.where(j < d_in, q, row)  # padding rows stay as they are (they are decoupled anyway)
        return q, q, st

    out, _ = run_sweep(w, u, step, None, block, jnp.float32)
    return out[:d_in]


def error_feedback(w: jax.Array, h: jax.Array, quantize_column: Callable[[jax.Array, jax.Array], jax.Array], *, block_size: int = 128, damp: float = 0.01) -> jax.Array:
    """Quantizes a kernel row by row with GPTQ's error feedback, for any quantizer.

    Each input row ``j`` of ``w`` (the weights of input ``j`` across all output channels) is replaced by
    ``quantize_column(row, j)``; the rounding error is then spread over the rows not yet quantized through
    the Cholesky factor of the damped inverse Hessian, with lazy block updates (see the module docstring).
    With a round-to-nearest quantizer this is GPTQ (Frantar et al., 2023); with "nearest centroid" it is
    GPTQ-style error feedback for codebooks.

    Args:
        w: float kernel of shape ``(d_in, d_out)`` whose rows pair with the rows of ``h``.
        h: the input Gram matrix ``sum x x^T`` (``(d_in, d_in)``), e.g. ``collect_hessians(...)[...].h``.
        quantize_column: ``(col, j) -> col_q``: maps the current row ``j`` (shape ``(d_out,)``, float32;
            ``j`` a traced int32 scalar) to its quantized values (same shape, float). It is traced once, inside
            ``jax.jit`` (pass the same function object to reuse the compiled sweep).
        block_size: rows per lazy-update block (128 as in the reference implementation).
        damp: relative dampening: ``damp * mean(diag(H))`` is added to the diagonal of ``H``.

    Returns:
        The quantized kernel, float32 ``(d_in, d_out)``, with the quantizer's values. Dead inputs
        (``H_jj == 0``) get the quantized value of a zero row (as in the reference: their weights are set
        to 0 before the sweep and their Hessian diagonal to 1).

    Raises:
        TypeError: ``w`` or ``h`` not floating point, a non-callable quantizer, a bad ``block_size`` type.
        ValueError: ``w`` not 2-D, ``h`` not ``(d_in, d_in)``, NaN/Inf in ``w`` or ``h``, a negative
            ``damp`` or ``block_size``, or a Hessian that is not positive definite even after damping
            (in eager calls; raise ``damp``).
    """
    if not callable(quantize_column):
        raise TypeError(f"quantize_column must be a callable (col, j) -> col_q, got {quantize_column!r}")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"w must be a 2-D (d_in, d_out) kernel, got shape {getattr(w, 'shape', type(w).__name__)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a floating-point array, got dtype {w.dtype}")
    if not isinstance(w, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(w))):
        raise ValueError("w holds NaN or Inf values")
    check_hessian_matrix(h, w.shape[0], "w")
    damp = check_damp(damp)
    block_size = check_block_size(block_size)
    out = _error_feedback(jnp.asarray(w), jnp.asarray(h, jnp.float32), damp, quantize_column, block_size)
    if not isinstance(out, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(out))):
        raise ValueError(f"error_feedback produced NaN/Inf: the Hessian is not positive definite even after damping (damp={damp}); raise damp")
    return out
