"""Distill, prune and quantize in one compiled step, data-parallel over a mesh of 8 (simulated) devices.

A teacher MLP is trained first; then a student is trained by one jit-compiled step
(:func:`compressjax.make_distill_step`) that, every step:

* runs the teacher forward (no gradient) and the student on its 4-bit fake-quantized weights
  (``student_transform=fake_quant_params``, straight-through gradients);
* ramps the student's sparsity from 0 to 90% with Zhu & Gupta's schedule (:func:`compressjax.gradual_pruning`
  chained after Adam in ``tx``, so pruned weights are exactly zero after every update);
* splits the batch over the mesh's ``data`` axis with params replicated; XLA inserts the gradient all-reduce.

On a CPU the 8 devices are simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which
must be set before JAX starts: this script sets it itself. On a machine with 8 GPUs or a TPU slice the same
code runs unchanged on the real devices (drop the flag). At the end the first step is replayed on one
device to show that the sharded step computes the same thing.

Run ``python examples/distill_mesh.py`` (a minute or two on a laptop CPU) or ``--quick`` (seconds).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from compressjax import (  # noqa: E402
    DistillState,
    QuantSpec,
    apply_masks,
    dequantize_params,
    distillation_loss,
    fake_quant_params,
    gradual_pruning,
    make_distill_step,
    masks_from_state,
    polynomial_sparsity,
    quantize_params,
    softmax_cross_entropy_with_integer_labels,
    sparsity_summary,
)


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense_{i}": {"kernel": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def mlp_apply(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def make_data(key, n, dim=64, classes=10):
    """Synthetic classes: the argmax of a fixed random two-layer network of the inputs."""
    w1 = jax.random.normal(jax.random.key(42), (dim, 64))
    w2 = jax.random.normal(jax.random.key(43), (64, classes))
    x = jax.random.normal(key, (n, dim))
    return x, jnp.argmax(jnp.tanh(x @ w1 / np.sqrt(dim)) @ w2, axis=-1)


def train_teacher(params, x, y, steps, batch):
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, xb, yb):
        grads = jax.grad(lambda p: softmax_cross_entropy_with_integer_labels(mlp_apply(p, xb), yb).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], batch)
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    if args.quick:
        n_train, teacher_steps, steps, batch, t_width, s_width = 2048, 100, 30, 128, 256, 128
    else:
        n_train, teacher_steps, steps, batch, t_width, s_width = 32768, 2000, 1500, 256, 512, 256

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    print(
        f"mesh: {len(devices)} {devices[0].platform} devices, axis 'data'; batch {batch} "
        f"= {batch // len(devices)} per device"
    )

    k_data, k_test, k_t, k_s = jax.random.split(jax.random.key(0), 4)
    x, y = make_data(k_data, n_train)
    x_test, y_test = make_data(k_test, 4096)
    teacher = train_teacher(mlp_init(k_t, [64, t_width, t_width, 10]), x, y, teacher_steps, batch)
    student = mlp_init(k_s, [64, s_width, s_width, 10])
    # Replicate the teacher on the mesh once, so that the step does not copy it to every device each call.
    teacher_on_mesh = jax.device_put(teacher, NamedSharding(mesh, PartitionSpec()))

    spec = QuantSpec(bits=args.bits)
    end = int(0.7 * steps)
    schedule = polynomial_sparsity(args.sparsity, begin_step=0, end_step=end)
    tx = optax.chain(optax.adam(2e-3), gradual_pruning(schedule, update_every=max(1, end // 10)))
    loss_fn = functools.partial(distillation_loss, temperature=4.0, alpha=0.7)

    def student_transform(params, step):
        del step  # the same 4-bit rounding at every step; a schedule could switch it on late
        return fake_quant_params(params, spec)

    step = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=loss_fn, student_transform=student_transform, mesh=mesh)
    state = DistillState.create(student, tx)
    first_state = DistillState.create(student, tx)

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n_train, batch) for _ in range(steps)]
    start = time.perf_counter()
    for i, idx in enumerate(batches):
        state, metrics = step(state, teacher_on_mesh, (x[idx], y[idx]))
        if i == 0:
            first_metrics = metrics
        if i % max(1, steps // 6) == 0 or i == steps - 1:
            print(f"step {i:5d}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items())))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start

    # Deploy: real 4-bit weights (QArray), masked; dequantize only to evaluate here.
    masks = masks_from_state(state.opt_state)
    deployed = dequantize_params(quantize_params(apply_masks(state.params, masks), spec))
    summary = sparsity_summary(state.params)
    t_acc, s_acc = accuracy(teacher, x_test, y_test), accuracy(deployed, x_test, y_test)
    print(f"student kernels: {summary.fraction:.1%} zeros, {args.bits}-bit weights")
    print(f"test accuracy: teacher {t_acc:.3f}, deployed student {s_acc:.3f}")
    print(
        f"{steps} sharded steps in {elapsed:.2f} s; params on {len(jax.tree.leaves(state.params)[0].devices())} "
        "devices (replicated)"
    )

    # The same first step on one device gives the same numbers.
    single = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=loss_fn, student_transform=student_transform)
    _, m_single = single(first_state, teacher, (x[batches[0]], y[batches[0]]))
    diff = max(abs(float(first_metrics[k]) - float(m_single[k])) for k in m_single)
    print(f"first step, mesh vs one device: max metric difference {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the sharded step disagrees with the single-device step")
    if not summary.fraction > args.sparsity - 0.01:
        raise SystemExit(f"sparsity {summary.fraction:.3f} did not reach {args.sparsity}")
    return {"teacher_accuracy": t_acc, "student_accuracy": s_acc, "sparsity": summary.fraction, "diff": diff}


if __name__ == "__main__":
    main()
