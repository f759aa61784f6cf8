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

from compressjax.checks import check_positive_int
from compressjax.hessians import Hessian

__all__ = ["error_feedback", "inverse_hessian_factor", "run_sweep", "padded_block", "sub_block_size", "check_hessian_matrix"]


def check_hessian_matrix(h: Any, d_in: int, path: str, batch: tuple[int, ...] = ()) -> None:
    """Raises ``ValueError`` naming ``path`` when ``h`` is not a finite ``(*batch, d_in, d_in)`` float array
    (``batch``: the layer (and group) axes of a stacked Hessian)."""
    shape = tuple(getattr(h, "shape", ()))
    want = tuple(batch) + (d_in, d_in)
    if shape != want:
        raise ValueError(f"leaf {path!r}: Hessian has shape {shape}, expected {want} to pair with the kernel's {d_in} input rows")
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"leaf {path!r}: Hessian has dtype {h.dtype}, expected float32")
    if not isinstance(h, jax.core.Tracer):
        a = np.asarray(h)
        if not np.all(np.isfinite(a)):
            bad = a[~np.isfinite(a)].ravel()[0]
            raise ValueError(f"leaf {path!r}: Hessian holds non-finite values (e.g. {bad}); the calibration inputs had NaN or Inf")


def check_damp(damp: Any) -> float | jax.Array:
    """Validates the relative dampening: a finite float ``>= 0``, or a 0-d float/int array.

    Concrete arrays (NumPy, or JAX outside a trace) are checked like floats and returned as a float. A traced
    value cannot be checked: it is returned as is, and a negative or NaN traced ``damp`` shows up as a failed
    factorisation (eager solvers raise ``ValueError``; under ``jit`` the result is NaN).
    """
    if isinstance(damp, bool) or not isinstance(damp, Real | jax.Array | np.ndarray | np.generic):
        raise TypeError(f"damp must be a non-negative float, got {damp!r}")
    if isinstance(damp, jax.Array | np.ndarray | np.generic):
        if np.ndim(damp) != 0:
            raise ValueError(f"damp must be a scalar (0-d), got an array of shape {np.shape(damp)}")
        if not (jnp.issubdtype(damp.dtype, jnp.floating) or jnp.issubdtype(damp.dtype, jnp.integer)) or damp.dtype == np.bool_:
            raise TypeError(f"damp must be a non-negative float, got an array of dtype {damp.dtype}")
        if isinstance(damp, jax.core.Tracer):
            return damp
        value = float(np.asarray(damp))
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"damp must be a finite non-negative float, got {damp!r}")
        return value
    if not (math.isfinite(float(damp)) and float(damp) >= 0.0):
        raise ValueError(f"damp must be a finite non-negative float, got {damp!r}")
    return float(damp)


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


# A row step: (row, j, i, view, state) -> (q_row, store_row, state). `row` is the current row j of the
# kernel (global index j, index i within its block; `view(i, size)` gives the current rows i..i+size of
# the block), `q_row` its compressed float value (the error is row - q_row), `store_row` what is written
# to the output buffer.
RowStep = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]
# A block hook: (b, w_block, state) -> state, called at the start of block b with its current rows.
BlockHook = Callable[[jax.Array, jax.Array, Any], Any]


def sub_block_size(block: int, sizes: tuple[int, ...] = ()) -> int:
    """Rows per inner sub-block: the largest of 32, 16, ..., 1 that divides ``block`` and, for every slab
    size in ``sizes`` (group size, ``m``), divides it or is divisible by it (so slabs never straddle)."""
    for s in (32, 16, 8, 4, 2, 1):
        if block % s == 0 and all(z % s == 0 or s % z == 0 for z in sizes):
            return s
    return 1


# Long (about 70 lines) on purpose: three nested fori_loops (blocks, sub-blocks, rows) whose bodies close over
# the same factor, views and stores; the row step itself is the caller's.
def run_sweep(w: jax.Array, u: jax.Array, step: RowStep, state: Any, block: int, store_dtype, block_hook: BlockHook | None = None,
              sub: int = 1):
    """The blocked error-feedback sweep over the rows of ``w`` (``(n_pad, d_out)``, padded) with ``U``.

    Three levels, all ``lax.fori_loop`` with static shapes: blocks of ``block`` rows; inside a block,
    sub-blocks of ``sub`` rows whose rank-1 updates touch only the sub-block (the rest of the block gets the
    sub-block's errors in one matrix product); after a block, one ``(block x block) @ (block x d_out)``
    product per later block (triangular work, as in the reference). ``step`` gets ``view(i, size)``, the
    current values of rows ``i .. i+size`` of the block, for slabs that start at row ``i`` (``size`` must
    divide ``sub`` or be a multiple of it, aligned to itself).

    Returns ``(stored_rows, state)`` with ``stored_rows`` of shape ``(n_pad, d_out)`` and ``store_dtype``
    (a dtype, or a tuple of dtypes when ``step`` stores a tuple of rows). Traceable; ``block`` must divide
    ``n_pad`` and ``sub`` must divide ``block``.
    """
    n, d = w.shape
    nb = n // block
    ns = block // sub
    out0 = jax.tree.map(lambda dt: jnp.zeros((n, d), dt), store_dtype)
    hp = lax.Precision.HIGHEST

    def block_body(b, carry):
        w, out, st = carry
        i1 = b * block
        w1 = lax.dynamic_slice(w, (i1, 0), (block, d))
        u_rows = lax.dynamic_slice(u, (i1, 0), (block, n))
        u1 = lax.dynamic_slice(u_rows, (0, i1), (block, block))
        if block_hook is not None:
            st = block_hook(b, w1, st)

        def sub_body(si, c):
            w1, e1, o1, st = c
            s0 = si * sub
            ws = lax.dynamic_slice(w1, (s0, 0), (sub, d))
            us = lax.dynamic_slice(u1, (s0, s0), (sub, sub))
            w1_now = w1  # rows >= s0 are current at the start of the sub-block

            def col(k, c2):
                ws, es, os, st = c2

                def view(i, size):
                    if size <= sub:
                        return lax.dynamic_slice(ws, (i - s0, 0), (size, d))
                    return lax.dynamic_slice(w1_now, (i, 0), (size, d))

                row = ws[k]
                q, store, st = step(row, i1 + s0 + k, s0 + k, view, st)
                err = (row - q) / us[k, k]
                # U is upper triangular: us[k, r] == 0 for r < k, so earlier rows are untouched.
                ws = ws - us[k][:, None] * err[None, :]
                os = jax.tree.map(lambda o, r: o.at[k].set(r.astype(o.dtype)), os, store)
                return ws, es.at[k].set(err), os, st

            es0 = jnp.zeros((sub, d), jnp.float32)
            os0 = jax.tree.map(lambda dt: jnp.zeros((sub, d), dt), store_dtype)
            _, es, os, st = lax.fori_loop(0, sub, col, (ws, es0, os0, st))
            # The rest of the block gets the sub-block's errors at once (rows before it get zeros; its own
            # rows are done and never read again).
            u_sb = lax.dynamic_slice(u1, (s0, 0), (sub, block))
            w1 = w1 - jnp.matmul(u_sb.T, es, precision=hp)
            e1 = lax.dynamic_update_slice(e1, es, (s0, 0))
            o1 = jax.tree.map(lambda o, x: lax.dynamic_update_slice(o, x, (s0, 0)), o1, os)
            return w1, e1, o1, st

        e0 = jnp.zeros((block, d), jnp.float32)
        o0 = jax.tree.map(lambda dt: jnp.zeros((block, d), dt), store_dtype)
        _, e1, o1, st = lax.fori_loop(0, ns, sub_body, (w1, e0, o0, st))
        out = jax.tree.map(lambda o, o1: lax.dynamic_update_slice(o, o1, (i1, 0)), out, o1)

        # Carry the block's errors to every later block: one (block x block) @ (block x d_out) product per
        # later block, so the work is triangular (as in the reference) while every shape stays static.
        def later(c, w):
            r = c * block
            u_c = lax.dynamic_slice(u_rows, (0, r), (block, block))
            w_c = lax.dynamic_slice(w, (r, 0), (block, d))
            return lax.dynamic_update_slice(w, w_c - jnp.matmul(u_c.T, e1, precision=hp), (r, 0))

        w = lax.fori_loop(b + 1, nb, later, w)
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

    def step(row, j, i, view, st):
        del i, view
        q = jnp.asarray(quantize_column(row, jnp.minimum(j, d_in - 1)))
        if q.shape != row.shape:
            raise ValueError(
                f"quantize_column must return the quantized row with the shape of its input {row.shape} (one value per "
                f"output channel), got shape {q.shape}"
            )
        if not (jnp.issubdtype(q.dtype, jnp.floating) or jnp.issubdtype(q.dtype, jnp.integer)):
            raise TypeError(f"quantize_column must return a float row, got dtype {q.dtype}")
        q = q.astype(jnp.float32)
        q = jnp.where(j < d_in, q, row)  # padding rows stay as they are (they are decoupled anyway)
        return q, q, st

    out, _ = run_sweep(w, u, step, None, block, jnp.float32, sub=sub_block_size(block))
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
        h: the input Gram matrix ``sum x x^T`` (``(d_in, d_in)``), e.g. ``collect_hessians(...)[...].h``, or
            that :class:`~compressjax.hessians.Hessian` itself: then ``count == 0`` is a ``ValueError`` and
            ``in_axes == (1,)`` reads ``w`` as ``(d_out, d_in)`` (the result has ``w``'s layout).
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
            ``damp`` (a float or a concrete 0-d array; a traced one is not checked) or ``block_size``, a
            ``quantize_column`` that returns another shape than its row (naming both shapes), or a Hessian that
            is not positive definite even after damping (in eager calls; raise ``damp``).

    Zero-size kernels (``(0, d_out)``, ``(d_in, 0)``) come back as zeros of the same shape. ``h`` is a plain
    matrix here (no row count): a Hessian from :func:`collect_hessians` should be checked for ``count > 0``
    by the caller (``gptq`` and friends do).
    """
    if not callable(quantize_column):
        raise TypeError(f"quantize_column must be a callable (col, j) -> col_q, got {quantize_column!r}")
    transpose = False
    if isinstance(h, Hessian):
        h, transpose = _plain_hessian(h, w)
        if transpose:
            w = w.T
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"w must be a 2-D (d_in, d_out) kernel, got shape {getattr(w, 'shape', type(w).__name__)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a floating-point array, got dtype {w.dtype}")
    if not isinstance(w, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(w))):
        raise ValueError("w holds NaN or Inf values")
    check_hessian_matrix(h, w.shape[0], "w")
    damp = check_damp(damp)
    block_size = check_positive_int("block_size", block_size)
    if w.size == 0:  # nothing to quantize (a (0, d_out) or (d_in, 0) kernel passes through, as in quantize)
        return jnp.zeros(w.shape, jnp.float32)
    out = _error_feedback(jnp.asarray(w), jnp.asarray(h, jnp.float32), damp, quantize_column, block_size)
    if not isinstance(out, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(out))):
        raise ValueError(f"error_feedback produced NaN/Inf: the Hessian is not positive definite even after damping (damp={damp}); raise damp")
    return out.T if transpose else out


def _plain_hessian(hess: Hessian, w: Any) -> tuple[Any, bool]:
    """The matrix of a :class:`Hessian` for a 2-D kernel ``w``, and whether ``w`` is ``(d_out, d_in)`` (``in_axes
    == (1,)``); raises for a Hessian built from zero rows or a stacked one (use ``gptq`` for stacked kernels)."""
    if getattr(hess, "layer_axes", ()) or getattr(hess, "groups", 1) != 1:
        raise ValueError(f"h is a stacked Hessian (layer axes {getattr(hess, 'layer_axes', ())}, groups {getattr(hess, 'groups', 1)}); "
                         "error_feedback solves one 2-D kernel: pass one slice's matrix")
    if tuple(hess.in_axes) not in ((0,), (1,)):
        raise ValueError(f"h has input axes {hess.in_axes}; error_feedback takes a 2-D kernel with input axis 0 or 1")
    c = hess.count
    if c is not None and not isinstance(c, jax.core.Tracer) and getattr(w, "size", 1) and np.any(np.asarray(c) == 0):
        raise ValueError("h: the Hessian was built from zero input rows (count == 0); the sweep would wipe the kernel")
    return hess.h, tuple(hess.in_axes) == (1,)
