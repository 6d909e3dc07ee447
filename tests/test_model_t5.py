"""T5 v1.1 / mT5 in nnx: HF-layout loading vs an independent NumPy float64 forward, loss,
greedy generation, and (if transformers + torch are installed) HF ``MT5ForConditionalGeneration``.
"""

from __future__ import annotations

import json
import math
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

from lora_optax.models.t5 import (
    T5Config,
    T5ForConditionalGeneration,
    generate_greedy,
    load_t5_safetensors,
    relative_position_bucket,
    shift_right,
    t5_loss,
)

# ------------------------------------------------------------------ HF-layout checkpoint


def hf_config(cfg: T5Config) -> dict:
    return {
        "model_type": "mt5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.n_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dropout_rate": 0.1,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    } | (
        {}
        if cfg.scale_decoder_outputs is None
        else {"scale_decoder_outputs": cfg.scale_decoder_outputs}
    )


def random_hf_weights(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors named and shaped as in a Hugging Face T5 checkpoint."""
    rng = np.random.default_rng(seed)
    d, f, inner = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
    gated = cfg.feed_forward_proj.startswith("gated")

    def w(*shape: int, std: float | None = None) -> np.ndarray:
        s = std if std is not None else shape[-1] ** -0.5
        return rng.normal(0.0, s, shape).astype(np.float32)

    def ln() -> np.ndarray:
        return (1.0 + 0.1 * rng.normal(size=d)).astype(np.float32)

    out = {"shared.weight": w(cfg.vocab_size, d, std=1.0)}
    out["encoder.embed_tokens.weight"] = out["shared.weight"].copy()
    out["decoder.embed_tokens.weight"] = out["shared.weight"].copy()
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.n_decoder_layers)):
        for i in range(n):
            p = f"{stack}.block.{i}.layer"
            attns = ["0.SelfAttention"] + (["1.EncDecAttention"] if stack == "decoder" else [])
            for a in attns:
                out[f"{p}.{a}.q.weight"] = w(inner, d, std=(d * cfg.d_kv) ** -0.5)
                out[f"{p}.{a}.k.weight"] = w(inner, d)
                out[f"{p}.{a}.v.weight"] = w(inner, d)
                out[f"{p}.{a}.o.weight"] = w(d, inner)
                out[f"{p}.{a[0]}.layer_norm.weight"] = ln()
            if i == 0:
                out[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = w(
                    cfg.relative_attention_num_buckets, cfg.num_heads, std=1.0
                )
            ff = 1 if stack == "encoder" else 2
            if gated:
                out[f"{p}.{ff}.DenseReluDense.wi_0.weight"] = w(f, d)
                out[f"{p}.{ff}.DenseReluDense.wi_1.weight"] = w(f, d)
            else:
                out[f"{p}.{ff}.DenseReluDense.wi.weight"] = w(f, d)
            out[f"{p}.{ff}.DenseReluDense.wo.weight"] = w(d, f)
            out[f"{p}.{ff}.layer_norm.weight"] = ln()
        out[f"{stack}.final_layer_norm.weight"] = ln()
    out["lm_head.weight"] = w(cfg.vocab_size, d)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["shared.weight"].copy()
    return out


def save_checkpoint(tmp: Path, cfg: T5Config, weights: dict[str, np.ndarray]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg)))
    return tmp


# ------------------------------------------------------------- NumPy float64 reference


def ref_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Scalar T5 relative-position bucket (Mesh TensorFlow definition)."""
    ret = 0
    n = num_buckets
    if bidirectional:
        n //= 2
        if rel > 0:
            ret += n
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    max_exact = n // 2
    if dist < max_exact:
        return ret + dist
    val = max_exact + int(
        math.log(dist / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    )
    return ret + min(val, n - 1)


def ref_forward(
    w: dict[str, np.ndarray],
    cfg: dict,
    enc_ids: np.ndarray,
    dec_ids: np.ndarray,
    enc_mask: np.ndarray,
    dec_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Plain float64 T5 forward straight from the HF-named weights (HF (out, in) layout)."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    H, dk, eps = cfg["num_heads"], cfg["d_kv"], cfg["layer_norm_epsilon"]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rel_bias(table, q_len, k_len, bidirectional):
        b = np.array(
            [
                [
                    ref_bucket(
                        j - i,
                        bidirectional,
                        cfg["relative_attention_num_buckets"],
                        cfg["relative_attention_max_distance"],
                    )
                    for j in range(k_len)
                ]
                for i in range(q_len)
            ]
        )
        return table[b].transpose(2, 0, 1)[None]  # (1, H, q, k)

    def attn(x, kv, p, bias, allowed):
        B, Lq, _ = x.shape
        Lk = kv.shape[1]
        q = (x @ W[p + ".q.weight"].T).reshape(B, Lq, H, dk).transpose(0, 2, 1, 3)
        k = (kv @ W[p + ".k.weight"].T).reshape(B, Lk, H, dk).transpose(0, 2, 1, 3)
        v = (kv @ W[p + ".v.weight"].T).reshape(B, Lk, H, dk).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) + bias  # no 1/sqrt(d_kv)
        s = np.where(allowed, s, -1e300)
        s = s - s.max(-1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(-1, keepdims=True)
        o = (pr @ v).transpose(0, 2, 1, 3).reshape(B, Lq, H * dk)
        return o @ W[p + ".o.weight"].T

    def ffn(x, p):
        if cfg["feed_forward_proj"] == "gated-gelu":
            a = x @ W[p + ".wi_0.weight"].T
            gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
            h = gelu * (x @ W[p + ".wi_1.weight"].T)
        else:
            h = np.maximum(x @ W[p + ".wi.weight"].T, 0)
        return h @ W[p + ".wo.weight"].T

    E = W["shared.weight"]
    enc_allowed = enc_mask[:, None, None, :].astype(bool)
    h = E[enc_ids]
    L = enc_ids.shape[1]
    bias = rel_bias(
        W["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], L, L, True
    )
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer"
        h = h + attn(
            rms(h, W[p + ".0.layer_norm.weight"]),
            rms(h, W[p + ".0.layer_norm.weight"]),
            p + ".0.SelfAttention",
            bias,
            enc_allowed,
        )
        h = h + ffn(rms(h, W[p + ".1.layer_norm.weight"]), p + ".1.DenseReluDense")
    enc = rms(h, W["encoder.final_layer_norm.weight"])

    T = dec_ids.shape[1]
    allowed = np.tril(np.ones((T, T), bool))[None, None]
    if dec_mask is not None:
        allowed = allowed & dec_mask[:, None, None, :].astype(bool)
    bias = rel_bias(
        W["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], T, T, False
    )
    h = E[dec_ids]
    for i in range(cfg["num_decoder_layers"]):
        p = f"decoder.block.{i}.layer"
        n = rms(h, W[p + ".0.layer_norm.weight"])
        h = h + attn(n, n, p + ".0.SelfAttention", bias, allowed)
        n = rms(h, W[p + ".1.layer_norm.weight"])
        h = h + attn(n, enc, p + ".1.EncDecAttention", 0.0, enc_allowed)
        h = h + ffn(rms(h, W[p + ".2.layer_norm.weight"]), p + ".2.DenseReluDense")
    h = rms(h, W["decoder.final_layer_norm.weight"])
    if cfg.get("scale_decoder_outputs", cfg["tie_word_embeddings"]):
        h = h * cfg["d_model"] ** -0.5
    return h @ (E if cfg["tie_word_embeddings"] else W["lm_head.weight"]).T


# --------------------------------------------------------------------------------- tests


def call(model, *args):
    """Eager forward: op-by-op compilations are cached across the tiny configs below, which
    costs less CPU than one whole-model jit per config."""
    return model(*args)


def test_relative_position_bucket_matches_scalar_reference():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 16), (16, 64)):
            got = relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md
            )
            want = [ref_bucket(int(r), bidirectional, nb, md) for r in rel]
            np.testing.assert_array_equal(got, want)
    # Spot values of mT5's encoder table (32 buckets, max distance 128).
    got = relative_position_bucket(
        np.array([0, 1, -1, 7, 8, 16, -16, 127, 500]),
        bidirectional=True,
        num_buckets=32,
        max_distance=128,
    )
    np.testing.assert_array_equal(got, [0, 17, 1, 23, 24, 26, 10, 31, 31])


def _batch(cfg: T5Config, seed: int = 1):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, cfg.vocab_size, (2, 9))
    enc_mask = np.ones_like(enc)
    enc_mask[1, 6:] = 0  # padded second example
    enc[1, 6:] = 0
    dec = rng.integers(2, cfg.vocab_size, (2, 7))
    dec[:, 0] = 0
    return enc, enc_mask, dec


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"feed_forward_proj": "relu", "tie_word_embeddings": True},
        {"tie_word_embeddings": True, "scale_decoder_outputs": False},
        {"num_decoder_layers": 3},
    ],
    ids=["v1.1-gated-gelu", "v1.0-relu-tied", "tied-unscaled", "3-decoder-layers"],
)
def test_load_and_logits_match_numpy_reference(tmp_path, overrides):
    cfg = T5Config.tiny(**overrides)
    weights = random_hf_weights(cfg)
    save_checkpoint(tmp_path, cfg, weights)
    model = load_t5_safetensors(tmp_path)  # config from config.json
    assert model.config == cfg  # read back from config.json (dropout is not read)
    enc, enc_mask, dec = _batch(cfg)
    dec_mask = np.ones_like(dec)
    dec_mask[0, 5:] = 0
    got = np.asarray(
        call(
            model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask), jnp.asarray(dec_mask)
        )
    )
    want = ref_forward(weights, hf_config(cfg), enc, dec, enc_mask, dec_mask)
    assert got.shape == (2, 7, cfg.vocab_size)
    scale = np.abs(want).max()
    assert 1.0 < scale < 100.0  # a meaningful comparison
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, scale / 10), rtol=0)
    # Padded encoder positions do not change the first example's logits.
    got_short = np.asarray(call(model, jnp.asarray(enc[1:, :6]), jnp.asarray(dec[1:])))
    want_short = ref_forward(weights, hf_config(cfg), enc[1:, :6], dec[1:], enc_mask[1:, :6])
    np.testing.assert_allclose(got_short, want_short, atol=1e-4 * max(1.0, scale / 10), rtol=0)


def test_loader_rejects_bad_checkpoints(tmp_path):
    cfg = T5Config.tiny()
    w = random_hf_weights(cfg)
    missing = dict(w)
    del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_checkpoint(tmp_path / "a", cfg, missing)
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.wo\.kernel"):
        load_t5_safetensors(tmp_path / "a")
    extra = dict(w)
    extra["encoder.block.0.layer.0.SelfAttention.qq.weight"] = w["shared.weight"]
    save_checkpoint(tmp_path / "b", cfg, extra)
    with pytest.raises(ValueError, match="unexpected T5 tensor"):
        load_t5_safetensors(tmp_path / "b")
    save_checkpoint(tmp_path / "c", cfg, w)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_t5_safetensors(tmp_path / "c", T5Config.tiny(d_ff=40))


def test_sharded_checkpoint(tmp_path):
    """``model.safetensors.index.json`` + shards load the same params as one file."""
    cfg = T5Config.tiny()
    w = random_hf_weights(cfg)
    names = sorted(w)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, keys in shards.items():
        save_file({k: w[k] for k in keys}, str(tmp_path / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    sharded = load_t5_safetensors(tmp_path)
    single = load_t5_safetensors(save_checkpoint(tmp_path / "single", cfg, w))
    a, b = nnx.state(sharded, nnx.Param), nnx.state(single, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(
        sharded.encoder.layers[1].self_attention.q.kernel[...],
        w["encoder.block.1.layer.0.SelfAttention.q.weight"].T,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny v1.1 model loaded from a random HF-layout checkpoint (no random-init cost)."""
    cfg = T5Config.tiny()
    weights = random_hf_weights(cfg, seed=3)
    path = save_checkpoint(tmp_path_factory.mktemp("t5"), cfg, weights)
    return cfg, weights, load_t5_safetensors(path)


def test_module_paths_for_lora_targeting():
    model = nnx.eval_shape(lambda: T5ForConditionalGeneration(T5Config.tiny(), rngs=nnx.Rngs(0)))
    paths = {
        ".".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)
    }
    targets = [p for p in paths if re.search(r"attention\.(q|k|v|o)$", p)]
    # 2 encoder layers x 4 + 2 decoder layers x 8
    assert len(targets) == 24
    assert "encoder.layers.0.self_attention.q" in targets
    assert "decoder.layers.1.cross_attention.o" in targets
    assert all(paths[p].bias is None for p in targets)
    assert "lm_head" in paths and "decoder.layers.0.mlp.wi_0" in paths


def test_shift_right_and_ignored_labels(tiny):
    labels = jnp.array([[5, 6, 1, -100, -100], [7, 8, 9, 10, 1]])
    np.testing.assert_array_equal(shift_right(labels), [[0, 5, 6, 1, 0], [0, 7, 8, 9, 10]])
    cfg, _, model = tiny
    enc, enc_mask, dec = _batch(cfg)
    labels = np.asarray(dec)  # any ids; the last three of example 0 are ignored
    labels[0, 4:] = -100
    loss = t5_loss(model, jnp.asarray(enc), jnp.asarray(labels), jnp.asarray(enc_mask))
    dec_in = np.concatenate([np.zeros((2, 1), int), np.maximum(labels[:, :-1], 0)], 1)
    logits = call(model, jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(enc_mask))
    ce = np.asarray(
        optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(np.maximum(labels, 0)))
    )
    np.testing.assert_allclose(loss, ce[labels != -100].mean(), rtol=1e-5)


def test_greedy_generation_matches_reference_loop(tiny):
    cfg, weights, model = tiny
    enc, enc_mask, _ = _batch(cfg)
    n = 6
    got = np.asarray(generate_greedy(model, enc, jnp.asarray(enc_mask), max_new_tokens=n))
    assert got.shape == (2, n) and got.dtype == np.int32
    dec = np.zeros((2, 1), np.int64)
    done = np.zeros(2, bool)
    for _ in range(n):
        logits = ref_forward(weights, hf_config(cfg), enc, dec, enc_mask)[:, -1]
        tok = np.where(done, 0, logits.argmax(-1))
        done |= tok == cfg.eos_token_id
        dec = np.concatenate([dec, tok[:, None]], 1)
    np.testing.assert_array_equal(got, dec[:, 1:])


def test_adam_learns_copy_task(tiny):
    cfg, _, model = tiny
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = rng.integers(2, cfg.vocab_size, (16, 6))
    labels = jnp.asarray(np.concatenate([x, np.ones((16, 1), int)], 1))  # copy + EOS
    x = jnp.asarray(x)
    tx = optax.adam(1e-2)
    opt_state = tx.init(state)

    @jax.jit
    def step(state, opt_state):
        loss, grads = jax.value_and_grad(lambda s: t5_loss(nnx.merge(graphdef, s), x, labels))(
            state
        )
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    losses = []
    for _ in range(40):
        state, opt_state, loss = step(state, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_random_init_forward_and_jit():
    cfg = T5Config.tiny()
    model = T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    enc, enc_mask, dec = _batch(cfg)
    args = (jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask))
    logits = nnx.jit(lambda m, *a: m(*a))(model, *args)
    assert logits.shape == (2, 7, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    # Scale of the Mesh-TF initialisation: logits of order one, not exploding.
    assert 0.1 < float(jnp.std(logits)) < 10.0


@pytest.mark.parametrize("arch", ["mt5", "t5-v1.0"])
def test_hf_parity(tmp_path, arch):
    """Logits of Hugging Face ``MT5ForConditionalGeneration`` (v1.1 layout) and
    ``T5ForConditionalGeneration`` (v1.0: relu, tied, scaled) with tiny random weights, loaded
    from their own ``save_pretrained`` safetensors + config.json."""
    torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
    transformers = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)
    tiny = T5Config.tiny()
    kw = {**hf_config(tiny), "dropout_rate": 0.0}
    if arch == "mt5":
        hf_cls, cfg_cls = transformers.MT5ForConditionalGeneration, transformers.MT5Config
    else:
        hf_cls, cfg_cls = transformers.T5ForConditionalGeneration, transformers.T5Config
        kw.update(model_type="t5", feed_forward_proj="relu", tie_word_embeddings=True)
    del kw["model_type"]
    torch.manual_seed(0)
    hf = hf_cls(cfg_cls(**kw)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_t5_safetensors(tmp_path)
    enc, enc_mask, dec = _batch(tiny)
    with torch.no_grad():
        want = hf(
            input_ids=torch.as_tensor(enc),
            attention_mask=torch.as_tensor(enc_mask),
            decoder_input_ids=torch.as_tensor(dec),
        ).logits.numpy()
    got = np.asarray(call(model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask)))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max() / 10), rtol=0)
