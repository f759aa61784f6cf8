"""Calibration statistics for any JAX model: the input Gram matrix of every matmul weight.

:func:`collect_hessians` traces ``apply_fn(params, batch)`` to a jaxpr and finds each ``dot_general`` and
``conv_general_dilated`` whose weight operand derives from a selected params leaf through shape-only
operations (``reshape``, ``transpose``, ``broadcast_in_dim``, ``squeeze``, ``slice``, ``rev`` and dtype
casts). It then evaluates the jaxpr with a small interpreter that, besides computing every equation, adds
``X^T X`` of the other operand (the layer input; for a convolution, its patches) to that leaf's Gram
matrix. The interpreter recurses into ``jit``/``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call`` and
``custom_vjp_call`` sub-jaxprs. No model code changes: Flax linen, Flax NNX (``nnx.split`` state with an
``nnx.merge`` closure), equinox modules and plain functions of a dict all work alike.

Control flow: a kernel is followed into ``scan`` (its slice per iteration: the index array of iteration 0
plus a run-time step times the iteration), ``while`` (``fori_loop``) bodies that ``dynamic_slice`` a stacked
leaf by the loop counter (the clamped start read at run time), ``cond``/``switch`` branches, batched
``dot_general`` (the batch axes of the weight are layer axes: MoE experts), grouped convolutions and
``shard_map`` bodies. Loops and branches holding a kernel are evaluated as ``lax.scan`` /
``lax.while_loop`` / ``lax.switch`` / ``shard_map`` with the accumulators in the carry, never unrolled, so
compile time does not grow with the number of layers. What cannot be followed is tracked too: a value
computed from a selected leaf (and not from the batch) by anything but a shape-only operation, that reaches
a matmul or convolution, is an error naming the leaf and the primitive, with any ``where``; values that
depend on the batch (an embedding lookup, a norm scale times activations) are data.

Layout: a kernel's *input axes* are the axes it contracts with the layer input. ``H`` is indexed by the
kernel's input positions flattened in the kernel's own axis order (``(in, out)`` Flax kernel:
``(in, in)``; conv kernel ``(kh, kw, c_in, c_out)``: ``(kh*kw*c_in, kh*kw*c_in)`` in the order of
``kernel.reshape(-1, c_out)``; equinox ``(out, in)``: ``(in, in)``), so a solver pairs row ``j`` of ``H``
with row ``j`` of the kernel moved to ``(inputs..., outputs...)``. :class:`Hessian` records those axes.

References:
    Frantar et al., "GPTQ", ICLR 2023 (the layer-wise objective ``||XW - XW_q||^2`` whose Hessian is
    ``2 X^T X``); Frantar & Alistarh, "SparseGPT", ICML 2023.
"""

from compressjax.hessians._api import auto_mesh, collect_hessians
from compressjax.hessians._hessian import Hessian

__all__ = ["Hessian", "collect_hessians", "auto_mesh"]
