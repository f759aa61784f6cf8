"""Post-training quantization (PTQ) of a Flax linen MLP with calibrated activation ranges.

1. Train a float MLP whose layers record their inputs with ``self.sow("intermediates", ...)``.
2. ``calibrate`` collects those activations over a few batches and computes static per-tensor int8 ranges
   (absmax, percentile and mse calibrations side by side).
3. The calibrated scales go into ``quantized_dot_general(..., mode="int", activation_scale=...)``: every
   Dense runs int8 x int8 -> int32 with int8 (or int4, mse-calibrated) weights.
4. The weights are stored as packed QArrays with ``quantize_params``.

Run: ``python examples/ptq_calibrate.py`` (``--quick`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressjax as cj


class MLP(nn.Module):
    widths: tuple = (128, 128, 10)
    dot_generals: tuple | None = None

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            self.sow("intermediates", f"dense_{i}_in", x)
            kw = {} if self.dot_generals is None else {"dot_general": self.dot_generals[i]}
            x = nn.Dense(w, name=f"dense_{i}", **kw)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def make_data(n, din=32, classes=10, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n, din)) * jnp.linspace(0.2, 3.0, din)  # features of different scales
    w1 = jax.random.normal(k2, (din, 64)) / np.sqrt(din)
    w2 = jax.random.normal(k3, (64, classes)) / 8.0
    return x, jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (seconds)")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs: compare like with like
    n, steps, widths = (1024, 150, (64, 64, 10)) if args.quick else (8192, 2000, (256, 256, 10))
    x, y = make_data(n + 2048)
    xt, yt, xv, yv = x[:n], y[:n], x[n:], y[n:]
    model = MLP(widths)
    params = {"params": model.init(jax.random.key(0), xt[:1])["params"]}
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, xb, yb):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    for i in range(steps):
        j = (i * 128) % (n - 127)
        params, opt, _ = step(params, opt, xt[j : j + 128], yt[j : j + 128])

    def acc(m):
        return float(jnp.mean(jnp.argmax(jax.jit(m.apply)(params, xv), -1) == yv))

    def collect(p, b):
        return model.apply(p, b, mutable="intermediates")[1]["intermediates"]

    batches = [xt[i : i + 128] for i in range(0, min(n, 512), 128)]
    results = {"float": acc(model)}
    wspec8 = cj.QuantSpec(8)
    for calibration in ("absmax", "mse") if args.quick else ("absmax", "percentile", "mse"):
        aspec = cj.QuantSpec(8, channel_axes=(), calibration=calibration, percentile=99.9)
        ranges = cj.calibrate(collect, params, batches, aspec)
        for wname, wspec in (("w8", wspec8), ("w4-mse", cj.QuantSpec(4, calibration="mse"))):
            dgs = tuple(
                cj.quantized_dot_general(wspec, aspec, mode="int", activation_scale=ranges[f"dense_{i}_in"][0].scale)
                for i in range(len(widths))
            )
            results[f"{wname}/a8-{calibration}"] = acc(MLP(widths, dgs))
    qparams = cj.quantize_params(params, {"kernel": wspec8})
    q_bytes = sum(a.nbytes for a in jax.tree.leaves(qparams, is_leaf=lambda v: isinstance(v, cj.QArray)))
    f_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    for k, v in results.items():
        print(f"accuracy {k:>22}: {v:.3f}")
    print(f"parameter bytes: float {f_bytes} -> int8 weights {q_bytes}")
    assert results["w8/a8-absmax"] >= results["float"] - 0.05, "int8 PTQ lost too much accuracy"
    print("OK")


if __name__ == "__main__":
    main()
