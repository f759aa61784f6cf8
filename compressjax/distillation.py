"""Knowledge distillation: a jit-compiled teacher/student training step, on one device or a mesh.

``make_distill_step`` pairs any teacher and student given as ``apply(params, inputs)`` functions (a Flax
linen ``model.apply``, an NNX ``nnx.merge(graphdef, state)(x)`` closure, an equinox call, plain JAX) with
an optax optimizer and returns one compiled ``step(state, teacher_params, batch) -> (state, metrics)``:

* the teacher runs forward only, under ``stop_gradient`` and outside the differentiated function, so no
  gradient is ever formed for its params;
* ``student_transform(params, step)`` rewrites the student's params before its forward pass. This is where
  pruning (``apply_masks``) and quantization-aware training (``fake_quant_params``) plug in, so one step
  distills, prunes and quantizes at once; the gradient flows back through the transform (the
  straight-through estimator for fake quantization, the mask for pruning);
* with ``mesh=`` the batch is split over the mesh's data axis and params are replicated; XLA's SPMD
  partitioner inserts the gradient all-reduce. This is JAX's own distributed runtime, nothing home-made,
  and the same code runs on many GPUs or a TPU pod.

The losses live in :mod:`compressjax.losses`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from compressjax import losses
from compressjax.losses import softmax_cross_entropy_with_integer_labels
from compressjax.tree import PyTree, leaves_with_paths, pytree_node

__all__ = ["DistillState", "make_distill_step"]

ApplyFn = Callable[[PyTree, Any], Any]
LossFn = Callable[[Any, Any, Any], "jax.Array | tuple[jax.Array, Mapping[str, Any]]"]


@pytree_node(children=("params", "opt_state", "step"))
@dataclasses.dataclass(frozen=True)
class DistillState:
    """Training state of the student: its params, the optimizer state and the step counter.

    A frozen dataclass and a pytree, so it passes through ``jax.jit`` and can be donated, saved with any
    checkpointer, or replaced field by field with ``state.replace(params=...)``.

    Attributes:
        params: the student's (uncompressed, trainable) params.
        opt_state: the optax state of ``tx``.
        step: number of steps taken, an int32 scalar array (an array so that it never causes retracing).
    """

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array

    def replace(self, **changes: Any) -> DistillState:
        """A copy with the given fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(cls, student_params: PyTree, tx: optax.GradientTransformation) -> DistillState:
        """Initial state: a copy of ``student_params``, ``tx.init`` of it and ``step = 0``.

        Every array of the state gets its own buffer: the step donates the state (``donate=True``), which
        must neither invalidate the caller's ``student_params`` nor donate one buffer twice (as when an
        optimizer state holds the params themselves, like ``optax.lookahead``).
        """
        _check_tx(tx)
        params = jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, student_params)
        state = cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
        return _distinct_buffers(state)


def _distinct_buffers(tree: PyTree) -> PyTree:
    """Copies array leaves that share a buffer with an earlier leaf, so that the tree can be donated."""
    seen: set[int] = set()

    def visit(x):
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.array(x, copy=True)
            seen.add(id(x))
        return x

    return jax.tree.map(visit, tree)


def _check_tx(tx: Any) -> None:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be an optax.GradientTransformation (with init and update), got {tx!r}")


BATCH_CONVENTION = (
    "a batch is (inputs, labels): a 2-tuple or 2-list whose second element holds integer class labels of "
    "shape (batch,) or None; anything else (an array, a dict, a tuple of another length) is inputs alone. "
    "To pass several inputs, wrap them: ((x1, x2), labels) or ((x1, x2), None)"
)


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` from a batch (see :data:`BATCH_CONVENTION`); a list is read like a tuple."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _check_labels(labels: Any) -> None:
    """For the built-in loss: labels are None or an integer array (static facts, checked before tracing)."""
    if labels is None:
        return
    dtype = getattr(labels, "dtype", None)
    if dtype is None:
        try:
            dtype = jnp.asarray(labels).dtype
        except TypeError:
            raise TypeError(f"the batch's labels are a {type(labels).__name__}; {BATCH_CONVENTION}") from None
    if not jnp.issubdtype(dtype, jnp.integer):
        shape = tuple(getattr(labels, "shape", ()))
        raise TypeError(
            f"the batch's second element has dtype {jnp.dtype(dtype)} and shape {shape}, but the distillation loss "
            f"reads it as labels; {BATCH_CONVENTION}"
        )


def _with_terms(loss_fn: LossFn | None) -> tuple[LossFn, bool]:
    """The loss the step evaluates, and whether it reads the labels as integer classes.

    A loss that reports its terms does so through the ``_cj_with_terms`` attribute (a function
    ``(student_out, teacher_out, labels, **keywords) -> (total, metrics)``); ``distillation_loss`` has one,
    and a keyword-only ``functools.partial`` of such a loss keeps it. Any other callable is used as is.
    """
    if loss_fn is None:
        loss_fn = losses.distillation_loss
    func, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        func, keywords = loss_fn.func, dict(loss_fn.keywords)
    terms = getattr(func, "_cj_with_terms", None)
    if terms is None:
        return loss_fn, False
    return functools.partial(terms, **keywords), True


def _mean(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.mean(x) if x.ndim else x


def _evaluate_loss(loss_fn: LossFn, student_out: Any, teacher_out: Any, labels: Any) -> tuple[jax.Array, dict]:
    out = loss_fn(student_out, teacher_out, labels)
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(
                "loss_fn must return per-example losses or a (loss, metrics: dict) pair, got a "
                f"tuple of length {len(out)}"
            )
        loss, extra = out
    else:
        loss, extra = out, {}
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return floating-point losses, got dtype {loss.dtype}")
    metrics = {k: _mean(v) for k, v in extra.items()}
    return _mean(loss), metrics


def _label_metrics(student_out: Any, labels: Any) -> dict[str, jax.Array]:
    """Cross-entropy and accuracy of the student against integer labels, when its output holds logits.

    The logits are the output itself, its ``"logits"`` entry (a dict output) or its first element (a
    tuple output), when their shape is ``labels.shape + (num_classes,)``.
    """
    if isinstance(student_out, Mapping):
        student_out = student_out.get("logits")
    elif isinstance(student_out, tuple | list) and student_out:
        student_out = student_out[0]
    if labels is None or not isinstance(student_out, jax.Array):
        return {}
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or student_out.shape[:-1] != labels.shape:
        return {}
    logits = jax.lax.stop_gradient(student_out)
    return {
        "ce": jnp.mean(softmax_cross_entropy_with_integer_labels(logits, labels)),
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
    }


def make_distill_step(
    student_apply: ApplyFn,
    teacher_apply: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn | None = None,
    student_transform: Callable[[PyTree, jax.Array], PyTree] | None = None,
    donate: bool = True,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Callable[[DistillState, PyTree, Any], tuple[DistillState, dict[str, jax.Array]]]:
    """Builds a jit-compiled distillation step ``step(state, teacher_params, batch) -> (state, metrics)``.

    Each step runs the teacher forward (no gradient), the student forward on
    ``student_transform(state.params, state.step)``, the loss, its gradient with respect to the student's
    params, and ``tx`` (``tx.update(grads, opt_state, params)`` then ``optax.apply_updates``). Chain
    ``keep_masked`` / ``gradual_pruning`` into ``tx`` to keep pruned weights at zero.

    Args:
        student_apply: ``student_apply(params, inputs)`` -> the student's outputs (logits by default).
        teacher_apply: ``teacher_apply(teacher_params, inputs)`` -> the teacher's outputs.
        tx: the student's optimizer.
        loss_fn: ``loss_fn(student_out, teacher_out, labels)`` -> per-example losses (averaged by the step)
            or a ``(loss, metrics)`` pair whose entries (averaged when per-example) join ``metrics``;
            ``labels`` is None for label-free batches. Default: :func:`distillation_loss` with its
            defaults (``temperature=1``, ``alpha=0.5``); close over other hyperparameters with
            ``functools.partial(distillation_loss, temperature=4.0, alpha=0.9)``. ``metrics`` reports the
            soft and hard terms separately for any loss that offers them through a ``_cj_with_terms``
            attribute (``distillation_loss`` does) and for keyword partials of such a loss.
        student_transform: ``(params, step) -> params`` applied before the student's forward pass, e.g.
            ``lambda p, s: fake_quant_params(apply_masks(p, masks), QuantSpec(bits=4))``.
        donate: donate the input ``state``'s buffers to the output, so the new params and optimizer
            state reuse the old ones' memory. The teacher's params and the batch are never donated; do not reuse a state
            after passing it to ``step``, and do not pass the state's own params as the teacher (a
            ``ValueError`` says so; self-distill from ``jax.tree.map(jnp.copy, state.params)``).
        mesh: optional ``jax.sharding.Mesh``; the batch's leading axis is split over ``data_axis`` and the
            state and teacher params are replicated on every device. Arrays laid out otherwise are moved
            on each call (free when already in place): put the teacher's params on the mesh once with
            ``jax.device_put(teacher_params, NamedSharding(mesh, PartitionSpec()))`` so that they are not
            copied at every step; the state is in place after the first step.
        data_axis: the name of the mesh's data-parallel axis.

    Returns:
        ``step(state, teacher_params, batch)``; ``batch`` is ``(inputs, labels)`` (a 2-tuple or 2-list; labels
        may be None) or inputs alone (an array, dict or any pytree that is not a 2-tuple/2-list); several
        inputs are wrapped: ``((x1, x2), labels)``. ``metrics`` holds scalars:
        ``loss`` (the total), ``kd`` (the soft term), ``ce`` (the hard term; 0 without labels) and, when
        integer labels match the student's logits (the output, its ``"logits"`` entry or its first
        element), ``accuracy``. With a custom ``loss_fn`` that does not report them, ``kd`` is the loss
        and ``ce`` / ``accuracy`` are computed from the student's logits as monitors (they do not enter
        the gradient). The jitted function is ``step.jitted``.

    Raises:
        TypeError: if an apply function or ``tx`` is malformed, or (at call time) ``state`` is not a
            :class:`DistillState`.
        ValueError: if ``data_axis`` is not an axis of ``mesh``, or (at call time) the batch size is not a
            multiple of the data axis size.
        TypeError: (at call time, built-in loss) a batch whose second element is not integer labels or None,
            e.g. a 2-tuple of two inputs; the message states the batch convention.

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
        https://arxiv.org/abs/1503.02531
    """
    _check_step_args(student_apply, teacher_apply, tx, student_transform, mesh, data_axis)
    loss_fn, integer_labels = _with_terms(loss_fn)
    step_fn = _build_step_fn(student_apply, teacher_apply, tx, loss_fn, student_transform)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        jitted, place = jax.jit(step_fn, donate_argnums=donate_argnums), None
    else:
        jitted, place = _mesh_jit(step_fn, mesh, data_axis, donate_argnums)

    @functools.wraps(step_fn)
    def step(state, teacher_params, batch):
        _check_state(state)
        if integer_labels:
            _check_labels(_split_batch(batch)[1])
        if donate:
            _check_not_aliased(state, teacher_params)
        if place is not None:
            state, teacher_params, batch = place(state, teacher_params, batch)
        return jitted(state, teacher_params, batch)

    step.jitted = jitted
    return step


def _check_step_args(student_apply, teacher_apply, tx, student_transform, mesh, data_axis) -> None:
    for name, fn in (("student_apply", student_apply), ("teacher_apply", teacher_apply)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable (params, inputs) -> outputs, got {fn!r}")
    if student_transform is not None and not callable(student_transform):
        raise TypeError(f"student_transform must be a callable (params, step) -> params, got {student_transform!r}")
    _check_tx(tx)
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh (axes {mesh.axis_names})")


def _build_step_fn(student_apply, teacher_apply, tx, loss_fn, student_transform):
    """The pure step ``(state, teacher_params, batch) -> (state, metrics)`` that gets compiled."""

    def step_fn(state: DistillState, teacher_params: PyTree, batch: Any):
        inputs, labels = _split_batch(batch)
        # Forward only: outside value_and_grad, and stop_gradient so that even an outer jax.grad of the
        # whole step sees the teacher as a constant.
        teacher_out = jax.lax.stop_gradient(teacher_apply(teacher_params, inputs))

        def objective(params):
            if student_transform is not None:
                params = student_transform(params, state.step)
            student_out = student_apply(params, inputs)
            loss, metrics = _evaluate_loss(loss_fn, student_out, teacher_out, labels)
            return loss, (metrics, student_out)

        (loss, (metrics, student_out)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, _step_metrics(loss, metrics, student_out, labels)

    return step_fn


def _step_metrics(loss: jax.Array, metrics: dict, student_out: Any, labels: Any) -> dict[str, jax.Array]:
    """The loss's own metrics, then label monitors it did not report, then ``loss``/``kd``/``ce`` defaults."""
    out = {k: v for k, v in _label_metrics(student_out, labels).items() if k not in metrics}
    out.update(metrics)
    out["loss"] = loss
    out.setdefault("kd", loss)
    out.setdefault("ce", jnp.zeros((), loss.dtype))
    return out


def _mesh_jit(step_fn, mesh: Mesh, data_axis: str, donate_argnums):
    """The step compiled for ``mesh`` (batch split over ``data_axis``, the rest replicated) and a function
    that places each call's arguments there (a no-op for arrays already in place, every step after the first;
    a transfer, not an error, for arrays committed elsewhere, e.g. a state made on one device)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(data_axis))
    n_data = mesh.shape[data_axis]
    jitted = jax.jit(
        step_fn,
        in_shardings=(replicated, replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=donate_argnums,
    )

    def place(state, teacher_params, batch):
        _check_divisible(batch, n_data, data_axis)
        state, teacher_params = jax.device_put((state, teacher_params), replicated)
        return state, teacher_params, jax.device_put(batch, sharded)

    return jitted, place


def _check_not_aliased(state: DistillState, teacher_params: PyTree) -> None:
    """The state is donated: a teacher leaf that is also a state buffer would be read after being freed."""
    ids = {id(x) for x in jax.tree.leaves(state)}
    shared = [p for p, x in leaves_with_paths(teacher_params) if id(x) in ids]
    if shared:
        raise ValueError(
            f"teacher_params shares {len(shared)} array(s) with the donated student state (first at "
            f"{shared[0]!r}); pass a copy as the teacher, e.g. "
            "jax.tree.map(jnp.copy, params), or build the step with donate=False"
        )


def _check_state(state: Any) -> None:
    if not isinstance(state, DistillState):
        raise TypeError(
            f"state must be a DistillState (make one with DistillState.create(student_params, tx)), "
            f"got {type(state).__name__}"
        )


def _check_divisible(batch: Any, n: int, axis_name: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = getattr(leaf, "shape", ())
        where = jax.tree_util.keystr(path) or "batch"
        if len(shape) == 0:
            raise ValueError(f"batch leaf {where} is a scalar; with a mesh every batch leaf needs a leading batch axis")
        if shape[0] % n:
            raise ValueError(
                f"batch size {shape[0]} (leaf {where}, shape {shape}) is not divisible by the mesh's "
                f"{axis_name!r} axis of size {n}; use a batch size that is a multiple of {n}"
            )
