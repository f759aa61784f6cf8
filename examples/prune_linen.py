"""Gradual magnitude pruning of a Flax linen MLP during training (Zhu & Gupta 2017).

A teacher-free regression task: fit a random two-layer network, while ``gradual_pruning`` raises the
global sparsity of the kernels from 0 to 90% along the polynomial schedule. Pruned weights are exactly
zero at every step; the masks are read back from the optimizer state.

    python examples/prune_linen.py           # 2000 steps
    python examples/prune_linen.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import compressjax as cj


class MLP(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, 60 steps")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args(argv)
    steps = 60 if args.quick else 2000
    hidden = 32 if args.quick else 256

    kx, kt, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (512, 16))
    teacher = MLP(hidden=64)
    y = teacher.apply(teacher.init(kt, x), x)

    model = MLP(hidden=hidden)
    params = model.init(kp, x)
    # Ramp the sparsity over the middle 60% of training, recompute masks every `update_every` steps.
    schedule = cj.polynomial_sparsity(args.sparsity, begin_step=steps // 10, end_step=7 * steps // 10)
    tx = optax.chain(
        optax.adamw(3e-3, weight_decay=1e-4),
        # Chained AFTER the optimizer. Only the hidden kernels are pruned (one global threshold across
        # them): the small output layer would otherwise be among the first to go.
        cj.gradual_pruning(schedule, update_every=max(steps // 20, 1), where=r"Dense_[01]/kernel"),
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)  # params are required
        return optax.apply_updates(params, updates), opt_state, loss

    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            masks = cj.masks_from_state(opt_state)
            print(
                f"step {step:5d}  loss {float(loss):.4f}  schedule {float(schedule(step)):.3f}  "
                f"mask sparsity {cj.sparsity_summary(masks).fraction:.3f}"
            )

    masks = cj.masks_from_state(opt_state)
    pruned = cj.apply_masks(params, masks)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), pruned, params))  # already zero
    summary = cj.sparsity_summary(params, where=r"Dense_[01]/kernel")
    print(summary)
    print(f"final sparsity {summary.fraction:.4f} (target {args.sparsity})")


if __name__ == "__main__":
    main()
