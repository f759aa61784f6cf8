"""Quantization benchmarks: QAT step overhead, quantize throughput, round-trip error (vs Qwix if installed).

Run: ``python -m benchmarks.quantization`` (``--quick`` for tiny sizes, ``--json PATH`` to save the ratios).

1. QAT overhead: one jitted training step (forward, backward, Adam) of a Flax MLP and a small CNN with
   ``fake_quant_params`` at 8 and 4 bits, divided by the same float step. Target <= 1.3.
2. Throughput: jitted ``quantize`` of ~50M float32 weights, per-channel int8, vs a jitted ``x * 2.0`` over the
   same array. Target: throughput ratio >= 0.5.
   ``fake_quant`` (quantize-dequantize, the QAT forward) of the same array against the same ``x * 2.0``.
3. Error: mean absolute round-trip error on N(0,1) weights (1024 x 1024, channels along the last axis),
   int8/int4, per channel and per group (128 along the contraction axis), absmax vs mse, with Qwix's absmax
   at the same bits and granularity when ``qwix`` is importable (column skipped otherwise).
4. Matmuls at transformer shapes (4096 tokens x 4096 x 4096, and MiniLM's 384 <-> 1536 at 32 x 128
   tokens): ``quantized_dot_general(mode="int")`` (int8 activations per tensor x int8 weights per output
   channel -> int32, both quantized in the call) and the bare int8 x int8 -> int32 ``lax.dot_general`` on
   given codes, against float32 (default precision: TF32 on recent GPUs; and ``"highest"``) and bfloat16
   matmuls. Ratios are baseline time / int time (above 1: the int path is faster). The compiled HLO of the
   int path is searched for an integer dot (s8 x s8 -> s32, as a ``dot`` or a GEMM custom call) and for a
   float dot (which would mean the operands were converted first): ``int_dot_in_hlo``.

Timings: warm-up (compile) first, ``block_until_ready``, the two sides interleaved, median of the repeats.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import compressjax as cj
from benchmarks._common import finish, interleaved, interleaved_medians, medians, parser


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def qat_overhead(model, x, y, reps):
    params = model.init(jax.random.key(0), x[:1])
    tx = optax.adam(1e-3)

    def make_step(rules):
        def loss_fn(p):
            p = p if rules is None else cj.fake_quant_params(p, rules)
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        @jax.jit
        def step(p, o):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        return step

    opt = tx.init(params)
    steps = [make_step(None), make_step(cj.QuantSpec(8)), make_step(cj.QuantSpec(4))]
    # The minimum is also kept: the better estimate of the intrinsic cost on a shared, loaded machine.
    times = interleaved([lambda s=s: s(params, opt) for s in steps], reps)
    (t_float, t8, t4), (m_float, m8, m4) = medians(times), [min(t) for t in times]
    return {
        "float_ms": 1e3 * t_float, "int8_ms": 1e3 * t8, "int4_ms": 1e3 * t4, "int8_ratio": t8 / t_float, "int4_ratio": t4 / t_float,
        "min_float_ms": 1e3 * m_float, "min_int8_ratio": m8 / m_float, "min_int4_ratio": m4 / m_float,
    }


def throughput(shape, reps):
    x = jax.random.normal(jax.random.key(0), shape)
    spec = cj.QuantSpec(8)
    quant = jax.jit(lambda v: cj.quantize(v, spec))
    fake = jax.jit(lambda v: cj.fake_quant(v, spec))
    mul = jax.jit(lambda v: v * 2.0)
    t_q, t_m, t_f = interleaved_medians([lambda: quant(x), lambda: mul(x), lambda: fake(x)], reps)
    n = x.size
    return {
        "n": n, "quantize_ms": 1e3 * t_q, "mul_ms": 1e3 * t_m, "quantize_Gelem_s": n / t_q / 1e9, "mul_Gelem_s": n / t_m / 1e9,
        "throughput_ratio": t_m / t_q, "fake_quant_ms": 1e3 * t_f, "fake_quant_Gelem_s": n / t_f / 1e9,
        "fake_quant_throughput_ratio": t_m / t_f,
    }


# (name, tokens, d_in, d_out): a 4096-wide transformer layer at 4096 tokens; MiniLM's FFN at batch 32 x 128.
MATMUL_SHAPES = [("4096x4096x4096", 4096, 4096, 4096), ("minilm_up_4096x384x1536", 4096, 384, 1536),
                 ("minilm_down_4096x1536x384", 4096, 1536, 384)]
QUICK_MATMUL_SHAPES = [("256x256x256", 256, 256, 256), ("minilm_up_256x384x1536", 256, 384, 1536)]
_DIMS = (((1,), (0,)), ((), ()))
_INTS = ("s8", "u8")
_FLOATS = ("f16", "bf16", "f32", "f64", "f8e4m3fn", "f8e5m2")


def hlo_dots(text: str) -> list[dict]:
    """Every matrix multiply in an optimized HLO module's text: ``dot`` instructions (also inside fusions,
    e.g. Triton GEMMs) and GEMM custom calls (cuBLAS), each as ``{"op", "result", "operands"}`` element types.

    Operand types are read inline when printed (``dot(s8[..] %a, ...)``), else looked up by name among the
    instructions and parameters of the same computation.
    """
    dots, types = [], {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("{") and "->" in line:  # a new computation: its parameters' types
            types = {name: t for name, t in re.findall(r"([\w.\-]+): \(?([a-z]+\d*[a-z0-9]*)\[", line)}
            continue
        m = re.match(r"(?:ROOT )?%?([\w.\-]+) = \(?([a-z]+\d*[a-z0-9]*)\[", line)
        if not m:
            continue
        types[m.group(1)] = m.group(2)
        call = re.search(r" (dot|custom-call)\(([^)]*)\)", line)
        if not call:
            continue
        op = call.group(1)
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if not target or not re.search(r"gemm|matmul", target.group(1), re.I):
                continue
            op = target.group(1)
        operands = []
        for arg in filter(None, (a.strip() for a in re.split(r",(?![^\[{]*[\]}])", call.group(2)))):
            inline = re.match(r"([a-z]+\d*[a-z0-9]*)\[", arg)
            name = re.search(r"%?([\w.\-]+)$", arg)
            operands.append(inline.group(1) if inline else types.get(name.group(1) if name else "", "?"))
        dots.append({"op": op, "result": m.group(2), "operands": operands[:2]})
    return dots


def int_dot_check(fn, *args) -> dict:
    """Compiles ``fn(*args)`` and reports whether its matmuls multiply integers (``int_dot_in_hlo``: an s8 x
    s8 dot or GEMM) or floats (``float_dot_in_hlo``: e.g. int8 codes converted to float before the dot)."""
    dots = hlo_dots(jax.jit(fn).lower(*args).compile().as_text())
    return {
        "int_dot_in_hlo": any(len(d["operands"]) == 2 and all(t in _INTS for t in d["operands"]) for d in dots),
        "float_dot_in_hlo": any(any(t in _FLOATS for t in d["operands"]) for d in dots),
        "dots": dots,
    }


def matmuls(shapes, reps):
    """int8 paths vs float32 and bfloat16 matmuls at each shape (see the module docstring, item 4)."""
    wspec, aspec = cj.QuantSpec(8), cj.QuantSpec(8, channel_axes=())
    qdot = cj.quantized_dot_general(wspec, aspec, mode="int")
    int_path = jax.jit(lambda x, w: qdot(x, w, _DIMS))
    raw_int = jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS, preferred_element_type=jnp.int32))
    f32 = jax.jit(lambda a, b: a @ b)
    f32_highest = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
    bf16 = jax.jit(lambda a, b: a @ b)
    cpu = jax.devices()[0].platform == "cpu"
    rows = []
    for name, m, k, n in shapes:
        keys = jax.random.split(jax.random.key(3), 2)
        x = jax.random.normal(keys[0], (m, k), jnp.float32)
        w = jax.random.normal(keys[1], (k, n), jnp.float32) / k**0.5
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        qx = jax.random.randint(keys[0], (m, k), -127, 128, jnp.int8)
        qw = jax.random.randint(keys[1], (k, n), -127, 128, jnp.int8)
        flop = 2 * m * k * n
        r = reps if not cpu or flop < 2**34 else min(reps, 3)  # a 4096^3 float32 matmul takes seconds on 2 cores
        calls = {
            "f32": (f32, x, w), "f32_highest": (f32_highest, x, w), "bf16": (bf16, xb, wb),
            "int8_dot": (raw_int, qx, qw), "quantized_dot_general_int": (int_path, x, w),
        }
        fns = [lambda c=c: c[0](*c[1:]) for c in calls.values()]
        ms = dict(zip(calls, (1e3 * t for t in interleaved_medians(fns, r)), strict=True))
        hlo = int_dot_check(lambda x, w: qdot(x, w, _DIMS), x, w)
        rows.append({
            "name": name, "m": m, "k": k, "n": n, "reps": r, "ms": ms,
            "tflops": {key: flop / (v * 1e-3) / 1e12 for key, v in ms.items()},
            "ratios": {
                "f32_over_int8_dot": ms["f32"] / ms["int8_dot"], "bf16_over_int8_dot": ms["bf16"] / ms["int8_dot"],
                "f32_over_qdot_int": ms["f32"] / ms["quantized_dot_general_int"],
                "bf16_over_qdot_int": ms["bf16"] / ms["quantized_dot_general_int"],
            },
            "int_dot_in_hlo": hlo["int_dot_in_hlo"], "float_dot_in_hlo": hlo["float_dot_in_hlo"], "hlo_dots": hlo["dots"],
        })
    return rows


def errors(shape, group):
    try:
        import qwix
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "skip the column"
        qwix = None
    x = jax.random.normal(jax.random.key(1), shape)
    rows = []
    for bits in (8, 4):
        for gran in ("channel", "group"):
            gs = group if gran == "group" else None
            row = {"bits": bits, "granularity": gran}
            for cal in ("absmax", "mse"):
                y = cj.dequantize(cj.quantize(x, cj.QuantSpec(bits, group_size=gs, calibration=cal)))
                row[cal] = float(jnp.mean(jnp.abs(y - x)))
            if qwix is not None:
                kw = {"channelwise_axes": [1]} | ({"tiled_axes": {0: group}} if gs else {})
                qt = jnp.int8 if bits == 8 else jnp.int4
                row["qwix_absmax"] = float(jnp.mean(jnp.abs(qwix.dequantize(qwix.quantize(x, qt, **kw)) - x)))
                row["absmax_vs_qwix"] = row["absmax"] / row["qwix_absmax"]
            row["mse_reduction_pct"] = 100 * (1 - row["mse"] / row["absmax"])
            rows.append(row)
    return rows


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 15; 3 with --quick)")
    ap.add_argument("--only", default=None, help="comma-separated parts: qat, throughput, error, matmul (default: all)")
    args = ap.parse_args(argv)
    quick = args.quick
    reps = args.reps or (3 if quick else 15)
    parts = {"qat", "throughput", "error", "matmul"} if args.only is None else set(args.only.split(","))
    if not parts <= {"qat", "throughput", "error", "matmul"}:
        ap.error(f"--only: unknown part(s) {sorted(parts - {'qat', 'throughput', 'error', 'matmul'})}")
    out = {"benchmark": "quantization", "quick": quick}
    ratios = {}

    if "qat" in parts:
        b = 32 if quick else 256
        k = jax.random.split(jax.random.key(2), 3)
        xm = jax.random.normal(k[0], (b, 784))
        y = jax.random.randint(k[1], (b,), 0, 10)
        xc = jax.random.normal(k[2], (b // 2 if quick else 64, 28, 28, 1))
        out["qat_mlp"] = qat_overhead(MLP(64 if quick else 512), xm, y, reps)
        out["qat_cnn"] = qat_overhead(CNN(8 if quick else 32), xc, y[: xc.shape[0]], reps)
        for name in ("qat_mlp", "qat_cnn"):
            r = out[name]
            print(
                f"{name}: float {r['float_ms']:.2f} ms | int8 {r['int8_ms']:.2f} ms ({r['int8_ratio']:.2f}x) | int4 {r['int4_ms']:.2f} ms "
                f"({r['int4_ratio']:.2f}x)  [target <= 1.3x]; ratios of the fastest runs: {r['min_int8_ratio']:.2f}x, {r['min_int4_ratio']:.2f}x"
            )
        ratios |= {
            "qat_mlp_int8": out["qat_mlp"]["int8_ratio"], "qat_mlp_int4": out["qat_mlp"]["int4_ratio"],
            "qat_cnn_int8": out["qat_cnn"]["int8_ratio"], "qat_cnn_int4": out["qat_cnn"]["int4_ratio"],
        }

    if "throughput" in parts:
        out["throughput"] = t = throughput((1024, 1024) if quick else (8192, 6144), reps)
        print(f"quantize {t['n'] / 1e6:.1f}M per-channel int8: {t['quantize_ms']:.1f} ms ({t['quantize_Gelem_s']:.2f} Gelem/s) vs x*2.0 {t['mul_ms']:.1f} ms ({t['mul_Gelem_s']:.2f} Gelem/s): ratio {t['throughput_ratio']:.2f}  [target >= 0.5]")
        print(f"fake_quant, same array: {t['fake_quant_ms']:.1f} ms ({t['fake_quant_Gelem_s']:.2f} Gelem/s): ratio {t['fake_quant_throughput_ratio']:.2f}  [target >= 0.5]")
        ratios |= {"quantize_throughput": t["throughput_ratio"], "fake_quant_throughput": t["fake_quant_throughput_ratio"]}

    if "error" in parts:
        out["error"] = errors((256, 128) if quick else (1024, 1024), 32 if quick else 128)
        print(f"{'bits':>4} {'granularity':>11} {'absmax':>9} {'mse':>9} {'mse gain':>8} {'qwix absmax':>11} {'ours/qwix':>9}")
        for r in out["error"]:
            qw = f"{r['qwix_absmax']:11.5f} {r['absmax_vs_qwix']:9.4f}" if "qwix_absmax" in r else f"{'n/a':>11} {'n/a':>9}"
            print(f"{r['bits']:>4} {r['granularity']:>11} {r['absmax']:9.5f} {r['mse']:9.5f} {r['mse_reduction_pct']:7.1f}% {qw}")
        for r in out["error"]:
            key = f"int{r['bits']}_{r['granularity']}"
            ratios[f"{key}_mse_over_absmax"] = r["mse"] / r["absmax"]
            if "absmax_vs_qwix" in r:
                ratios[f"{key}_absmax_over_qwix"] = r["absmax_vs_qwix"]

    if "matmul" in parts:
        out["matmul"] = matmuls(QUICK_MATMUL_SHAPES if quick else MATMUL_SHAPES, reps)
        print("matmul (ms; TFLOP/s)        f32            f32 highest    bf16           int8 dot       qdot int       int dot in HLO")
        for r in out["matmul"]:
            cells = " ".join(f"{r['ms'][key]:7.3f} ({r['tflops'][key]:5.1f})" for key in r["ms"])
            print(f"  {r['name']:26s} {cells}  {r['int_dot_in_hlo']} (float dot: {r['float_dot_in_hlo']})")
            ratios |= {f"{r['name']}_{key}": v for key, v in r["ratios"].items()}
        out["int_dot_in_hlo"] = all(r["int_dot_in_hlo"] for r in out["matmul"])

    out["ratios"] = ratios
    return finish(out, args.json)


if __name__ == "__main__":
    main()
