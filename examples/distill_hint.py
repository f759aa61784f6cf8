"""Distillation with a FitNets hint: a thin student learns the teacher's logits *and* its hidden features.

A Flax linen teacher (two wide hidden layers) is trained on a synthetic 10-class problem, then a thin
student is distilled from it with one compiled step (:func:`compressjax.make_distill_step`). The loss mixes
Hinton's soft targets (:func:`compressjax.kd_loss`, temperature 4, weight 0.9) and the hard labels with a hint loss
(:func:`compressjax.hint_loss`, Romero et al. 2015) between the student's first hidden layer, mapped by
a learned projection, and the teacher's. The teacher exposes its hidden features with ``sow``; the
student's come from ``capture_intermediates``; neither model changes its code for distillation.

Run ``python examples/distill_hint.py`` (about a minute on a laptop CPU) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import DistillState, hint_loss, kd_loss, make_distill_step, softmax_cross_entropy_with_integer_labels


class MLP(nn.Module):
    """An MLP that ``sow``s its first hidden layer's activations as ``"hint"``."""

    hidden: tuple[int, ...]
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
            if i == 0:
                self.sow("intermediates", "hint", x)
        return nn.Dense(self.classes, name="out")(x)


def make_data(key, n, dim=32, classes=10):
    """A synthetic task: the classes are the argmax of a fixed random two-layer tanh network."""
    w1 = jax.random.normal(jax.random.key(42), (dim, 64))
    w2 = jax.random.normal(jax.random.key(43), (64, classes))
    x = jax.random.normal(key, (n, dim))
    return x, jnp.argmax(jnp.tanh(x @ w1 / np.sqrt(dim)) @ w2, axis=-1)


def train_teacher(model, params, x, y, steps, batch):
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss(p):
            return softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, x.shape[0], batch)
        params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params


def accuracy(logits, y):
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds), for smoke tests")
    parser.add_argument("--hint-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    n_train, teacher_steps, student_steps, batch = (2048, 150, 100, 128) if args.quick else (16384, 2000, 1500, 256)

    k_data, k_test, k_t, k_s = jax.random.split(jax.random.key(0), 4)
    x, y = make_data(k_data, n_train)
    x_test, y_test = make_data(k_test, 4096)
    teacher, student = MLP((256, 256)), MLP((32,))
    t_params = train_teacher(teacher, teacher.init(k_t, x[:1]), x, y, teacher_steps, batch)

    def teacher_apply(variables, inputs):
        logits, state = teacher.apply(variables, inputs, mutable=["intermediates"])
        return {"logits": logits, "features": state["intermediates"]["hint"][0]}

    def student_apply(params, inputs):
        logits, state = student.apply(
            {"params": params["model"]}, inputs, capture_intermediates=True, mutable=["intermediates"]
        )
        features = nn.relu(state["intermediates"]["hidden_0"]["__call__"][0])
        return {"logits": logits, "features": features, "projection": params["projection"]}

    def loss_fn(s, t, labels):
        # The same mix as distillation_loss(..., temperature=4.0, alpha=0.9), with its terms reported.
        kd = kd_loss(s["logits"], t["logits"], temperature=4.0)
        ce = softmax_cross_entropy_with_integer_labels(s["logits"], labels)
        hint = hint_loss(s["features"], t["features"], s["projection"])
        return 0.9 * kd + 0.1 * ce + args.hint_weight * hint, {"kd": kd, "ce": ce, "hint": hint}

    s_vars = student.init(k_s, x[:1])
    params = {"model": s_vars["params"], "projection": jnp.zeros((32, 256))}  # the FitNets regressor
    tx = optax.adam(3e-3)
    step = make_distill_step(student_apply, teacher_apply, tx, loss_fn=loss_fn)
    state = DistillState.create(params, tx)

    rng = np.random.default_rng(1)
    start = time.perf_counter()
    first = None
    for i in range(student_steps):
        idx = rng.integers(0, n_train, batch)
        state, metrics = step(state, t_params, (x[idx], y[idx]))
        if first is None:
            first = {k: float(v) for k, v in metrics.items()}
        if i % max(1, student_steps // 5) == 0 or i == student_steps - 1:
            print(f"step {i:5d}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items())))
    elapsed = time.perf_counter() - start

    t_acc = accuracy(teacher.apply(t_params, x_test), y_test)
    s_acc = accuracy(student.apply({"params": state.params["model"]}, x_test), y_test)
    last = {k: float(v) for k, v in metrics.items()}
    n_t = sum(p.size for p in jax.tree.leaves(t_params))
    n_s = sum(p.size for p in jax.tree.leaves(state.params["model"]))
    print(f"teacher: {n_t:,} params, test accuracy {t_acc:.3f}")
    print(f"student: {n_s:,} params ({n_t / n_s:.1f}x fewer), test accuracy {s_acc:.3f}")
    print(f"hint loss {first['hint']:.4f} -> {last['hint']:.4f}; total loss {first['loss']:.4f} -> {last['loss']:.4f}")
    print(f"{student_steps} distillation steps in {elapsed:.2f} s")
    if not last["hint"] < first["hint"] or not last["loss"] < first["loss"]:
        raise SystemExit("distillation did not reduce the losses")
    return {"teacher_accuracy": t_acc, "student_accuracy": s_acc, "first": first, "last": last}


if __name__ == "__main__":
    main()
