"""Quantization-aware training (QAT) of a Flax NNX MLP, then true integer inference.

1. Train a float MLP on a synthetic classification task (labels from a random teacher network).
2. Post-training quantization baseline: the same weights with 4-bit weights / 8-bit activations, int path.
3. QAT: fine-tune with ``quantized_dot_general(mode="fake")`` (straight-through gradients).
4. Swap in ``mode="int"`` (int8 x int8 -> int32 matmuls) and check it agrees with the fake path.
5. Store the weights as packed QArrays and report the size.

Run: ``python examples/qat_nnx.py`` (``--quick`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import compressjax as cj


class MLP(nnx.Module):
    def __init__(self, sizes, dot_general, rngs):
        kw = {} if dot_general is None else {"dot_general": dot_general}
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs, **kw) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def make_data(n, din, classes, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n, din))
    w1 = jax.random.normal(k2, (din, 64)) / np.sqrt(din)
    w2 = jax.random.normal(k3, (64, classes)) / 8.0
    return x, jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)


def train(model, x, y, steps, lr, batch):
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    losses = []
    for i in range(steps):
        j = (i * batch) % (x.shape[0] - batch + 1)
        losses.append(float(step(model, opt, x[j : j + batch], y[j : j + batch])))
    return losses


def accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(nnx.jit(lambda m, v: m(v))(model, x), -1) == y))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (seconds)")
    ap.add_argument("--bits", type=int, default=4, help="weight bits (activations use 8)")
    args = ap.parse_args()
    # GPUs default to TF32 float32 matmuls; full precision lets the fake path match the exact int path.
    jax.config.update("jax_default_matmul_precision", "highest")
    n, steps, qat_steps, hidden = (1024, 150, 60, 64) if args.quick else (8192, 1500, 500, 256)
    sizes = (32, hidden, hidden, 10)
    x, y = make_data(n + 2048, sizes[0], sizes[-1])
    xt, yt, xv, yv = x[:n], y[:n], x[n:], y[n:]
    wspec = cj.QuantSpec(args.bits)  # per output channel, absmax
    aspec = cj.QuantSpec(8, channel_axes=())  # per tensor, calibrated per batch
    fake = cj.quantized_dot_general(wspec, aspec, mode="fake")
    intq = cj.quantized_dot_general(wspec, aspec, mode="int")

    model = MLP(sizes, None, nnx.Rngs(0))
    losses = train(model, xt, yt, steps, 3e-3, 128)
    acc_float = accuracy(model, xv, yv)

    ptq = MLP(sizes, intq, nnx.Rngs(0))
    nnx.update(ptq, nnx.state(model, nnx.Param))
    acc_ptq = accuracy(ptq, xv, yv)

    qat = MLP(sizes, fake, nnx.Rngs(0))
    nnx.update(qat, nnx.state(model, nnx.Param))
    qat_losses = train(qat, xt, yt, qat_steps, 1e-3, 128)
    acc_qat = accuracy(qat, xv, yv)

    deployed = MLP(sizes, intq, nnx.Rngs(0))
    nnx.update(deployed, nnx.state(qat, nnx.Param))
    acc_int = accuracy(deployed, xv, yv)
    logits_fake = qat(xv[:256])
    logits_int = deployed(xv[:256])
    max_diff = float(jnp.max(jnp.abs(logits_fake - logits_int)))

    state = nnx.state(qat, nnx.Param)
    qstate = cj.quantize_params(state, {"kernel": wspec})
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    q_bytes = sum(a.nbytes for a in jax.tree.leaves(qstate, is_leaf=lambda v: isinstance(v, cj.QArray)))

    print(f"float training loss {losses[0]:.3f} -> {losses[-1]:.3f}; QAT loss {qat_losses[0]:.3f} -> {qat_losses[-1]:.3f}")
    print(f"accuracy: float {acc_float:.3f} | PTQ int{args.bits}/int8 {acc_ptq:.3f} | QAT fake {acc_qat:.3f} | QAT int path {acc_int:.3f}")
    print(f"int path vs fake path max |logit diff| = {max_diff:.2e}")
    print(f"parameter bytes: float {float_bytes} -> quantized {q_bytes} ({float_bytes / q_bytes:.1f}x smaller)")
    assert losses[-1] < losses[0] and max_diff < 1e-3 * max(1.0, float(jnp.max(jnp.abs(logits_fake))))
    assert acc_qat >= acc_float - 0.1, "QAT lost too much accuracy"
    print("OK")


if __name__ == "__main__":
    main()
