"""The :class:`Hessian` pytree: one kernel's input Gram matrix (stacked per layer and group)."""

from __future__ import annotations

from compressjax.tree import pytree_node


@pytree_node(children=("h", "count"), static=("in_axes", "layer_axes", "groups"))
class Hessian:
    """The input Gram matrix of one kernel: ``h = sum x x^T`` over ``count`` input rows.

    A stacked kernel (layers scanned over, MoE experts in a batched matmul, a grouped convolution) has one
    Gram matrix per slice (and group); see ``layer_axes`` and ``groups``.

    Attributes:
        h: float32 ``(*layer_shape, [groups,] d_in, d_in)``, indexed by the kernel's input positions (see the
            module docstring); the ``groups`` axis is there only when ``groups > 1``.
        count: float32 ``(*layer_shape, [groups])``: the number of input rows summed per matrix (over every
            use of the kernel).
        in_axes: the kernel axes that are contracted with the input (static), in kernel order.
        layer_axes: the kernel axes that index independent kernels (static), in kernel order: the scan axis of
            a stacked kernel (``(0,)`` for ``(L, in, out)``, ``(1,)`` for MaxText's ``(in, L, out)``), the
            expert axis of a batched matmul; ``()`` for a plain kernel.
        groups: ``feature_group_count`` of a grouped or depthwise convolution (static): the single output
            axis splits into ``groups`` contiguous blocks, block ``g`` sees only its group's input channels.
    """

    def __init__(self, h, count, in_axes: tuple[int, ...], layer_axes: tuple[int, ...] = (), groups: int = 1):
        self.h = h
        self.count = count
        self.in_axes = tuple(int(a) for a in in_axes)
        self.layer_axes = tuple(int(a) for a in layer_axes)
        self.groups = int(groups)

    @property
    def d_in(self) -> int:
        return int(self.h.shape[-1])

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of the leading axes of ``h`` that index layers (not groups)."""
        return tuple(int(d) for d in self.h.shape[: len(self.layer_axes)])

    def __repr__(self) -> str:
        extra = ""
        if self.layer_axes:
            extra += f", layer_axes={self.layer_axes}, layer_shape={self.layer_shape}"
        if self.groups > 1:
            extra += f", groups={self.groups}"
        return f"Hessian(d_in={self.d_in}, in_axes={self.in_axes}{extra}, count={self.count})"
