"""A compact T5 v1.1 / mT5 encoder-decoder in flax nnx, with a Hugging Face safetensors loader.

Architecture facts (as in Hugging Face ``T5ForConditionalGeneration`` / ``MT5...``):

- Pre-norm residual blocks. The norm is T5's RMS LayerNorm: ``x * rsqrt(mean(x^2) + eps) *
  scale``, no mean subtraction, no bias (``nnx.RMSNorm``), ``eps = layer_norm_epsilon``.
- Attention has no ``1/sqrt(d_kv)`` scaling (folded into the initialisation) and bias-free
  ``q``/``k``/``v``/``o`` projections (``d_model -> num_heads * d_kv -> d_model``).
- Relative position bias: an ``Embed(num_buckets, num_heads)`` in the FIRST self-attention
  layer of each stack only, and the ``(1, heads, q, k)`` bias it gives is added to the scores of
  every self-attention layer of that stack. Buckets are bidirectional in the encoder (half of
  them for keys after the query), unidirectional (past only) in the decoder: exact for distances
  below ``num_buckets/2`` (``/4`` bidirectional), log-spaced up to ``max_distance``, then
  clamped. Cross-attention has no position bias.
- FFN: ``wo(gelu_new(wi_0(x)) * wi_1(x))`` for ``feed_forward_proj="gated-gelu"`` (v1.1 /
  mT5; ``gelu_new`` is the tanh approximation); ``wo(relu(wi(x)))`` for ``"relu"`` (v1.0).
- The token embedding ``shared`` is used by both stacks. v1.1/mT5 have an untied ``lm_head``;
  with ``tie_word_embeddings`` (v1.0) the decoder output is multiplied by ``shared``'s matrix
  instead. The decoder output is scaled by ``d_model**-0.5`` before the head iff
  ``scale_decoder_outputs`` (default: ``tie_word_embeddings``, the original rule). transformers
  5 always ties the head and writes ``tie_word_embeddings: true``; its T5 configs then carry an
  explicit ``scale_decoder_outputs`` and its mT5 never scales: :meth:`T5Config.from_hf_config`
  reads both cases.
- Decoder inputs are the labels shifted right, starting with ``decoder_start_token_id = 0``
  (the pad token); ``-100`` labels are ignored by the loss.

Module paths (LoRA targets by regex, e.g. ``r"attention\\.(q|k|v|o)$"``; every projection is a
bias-free ``nnx.Linear`` with ``kernel (in, out)``)::

    shared                                          nnx.Embed (vocab, d_model)
    encoder.layers.{i}.self_attention.{q,k,v,o}     nnx.Linear
    encoder.layers.0.self_attention.relative_attention_bias    nnx.Embed (buckets, heads)
    encoder.layers.{i}.self_attention_norm          nnx.RMSNorm
    encoder.layers.{i}.mlp.{wi_0,wi_1,wo}           nnx.Linear (``wi`` for "relu")
    encoder.layers.{i}.mlp_norm                     nnx.RMSNorm
    encoder.final_norm                              nnx.RMSNorm
    decoder.layers.{i}.self_attention.{q,k,v,o}     (+ relative_attention_bias in layer 0)
    decoder.layers.{i}.cross_attention.{q,k,v,o}    nnx.Linear
    decoder.layers.{i}.{self_attention,cross_attention,mlp}_norm, decoder.layers.{i}.mlp.*
    decoder.final_norm
    lm_head                                         nnx.Linear (d_model, vocab), untied only

Hugging Face layout -> nnx path (torch ``Linear.weight (out, in)`` transposed to ``kernel (in,
out)``; ``X`` is ``encoder`` or ``decoder``)::

    shared.weight                                           shared.embedding
    X.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight      X.layers.{i}.self_attention.*.kernel
    X.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                    X.layers.0.self_attention.relative_attention_bias.embedding
    X.block.{i}.layer.0.layer_norm.weight                   X.layers.{i}.self_attention_norm.scale
    decoder.block.{i}.layer.1.EncDecAttention.*.weight      decoder.layers.{i}.cross_attention.*
    decoder.block.{i}.layer.1.layer_norm.weight             decoder.layers.{i}.cross_attention_norm
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}.weight   (decoder: layer.2)
                                                            X.layers.{i}.mlp.*.kernel
    encoder.block.{i}.layer.1.layer_norm.weight             X.layers.{i}.mlp_norm.scale
                                                            (decoder: layer.2)
    X.final_layer_norm.weight                               X.final_norm.scale
    lm_head.weight                                          lm_head.kernel

``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight`` (copies of ``shared``) are
ignored, and so is ``lm_head.weight`` of a tied model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lora_optax.models._io import fill_params, read_config, read_safetensors, resolve_checkpoint

__all__ = [
    "T5Attention",
    "T5Block",
    "T5Config",
    "T5ForConditionalGeneration",
    "T5MLP",
    "T5Stack",
    "generate_greedy",
    "load_t5_safetensors",
    "relative_position_bucket",
    "shift_right",
    "t5_loss",
]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of :class:`T5ForConditionalGeneration` (Hugging Face field names).

    Defaults are ``google/mt5-small``'s except the vocabulary. Dropout defaults to 0 and is not
    read by :meth:`from_hf_config` (pass ``dropout_rate=`` to fine-tune with it; call
    ``model.eval()`` before generating then).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool | None = None
    dropout_rate: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _ff_kind(self.feed_forward_proj)  # validates

    @property
    def scales_decoder_outputs(self) -> bool:
        """Whether the decoder output is multiplied by ``d_model**-0.5`` before the head."""
        if self.scale_decoder_outputs is None:
            return self.tie_word_embeddings
        return self.scale_decoder_outputs

    @property
    def n_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @classmethod
    def tiny(cls, **overrides: Any) -> T5Config:
        """2 + 2 layers, d_model 32, 4 heads, 8 buckets: for tests."""
        kw: dict[str, Any] = dict(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides: Any) -> T5Config:
        """Builds a config from a Hugging Face T5/mT5 ``config.json`` dict."""
        names = {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers"}
        names |= {"num_heads", "relative_attention_num_buckets"}
        names |= {"relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj"}
        names |= {"tie_word_embeddings", "pad_token_id", "eos_token_id"}
        names |= {"decoder_start_token_id", "scale_decoder_outputs"}
        kw = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        major = re.match(r"\d+", str(cfg.get("transformers_version", "0")))
        saved_by_v5 = major is not None and int(major.group()) >= 5
        if "scale_decoder_outputs" not in kw and cfg.get("model_type") == "mt5" and saved_by_v5:
            kw["scale_decoder_outputs"] = False  # transformers 5 mT5: tied head, never scaled
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw.update(overrides)
        return cls(**kw)


def _ff_kind(feed_forward_proj: str) -> tuple[bool, str]:
    """``"gated-gelu"`` -> (gated, "gelu_new"), ``"relu"`` -> (False, "relu"), as HF parses."""
    parts = feed_forward_proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if not (gated or len(parts) == 1) or parts[-1] not in ("relu", "gelu", "silu"):
        raise ValueError(f"unsupported feed_forward_proj {feed_forward_proj!r}")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return gated, act


_ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def relative_position_bucket(
    relative_position: np.ndarray,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> np.ndarray:
    """T5's bucket of each ``key_pos - query_pos`` (NumPy: shapes are static under ``jit``).

    Bidirectional: half the buckets for positive offsets. Within a half, offsets below
    ``max_exact = n/2`` get their own bucket; larger ones ``max_exact + floor(log(d/max_exact) /
    log(max_distance/max_exact) * (n - max_exact))``, clamped to ``n - 1``. Unidirectional
    (decoder): only non-positive offsets (the past) are distinguished, future ones map to 0.
    Computed in float64 so that ties at powers of two land exactly (as float32 torch does).
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets += (rel > 0).astype(np.int64) * n
        dist = np.abs(rel)
    else:
        dist = -np.minimum(rel, 0)
    max_exact = n // 2
    safe = np.maximum(dist, 1).astype(np.float64)
    large = max_exact + (
        np.log(safe / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, n - 1)
    return buckets + np.where(dist < max_exact, dist, large)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _linear(n_in: int, n_out: int, cfg: T5Config, rngs: nnx.Rngs, std: float) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


def _norm(cfg: T5Config, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model,
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


class T5Attention(nnx.Module):
    """Unscaled multi-head attention with bias-free ``q``, ``k``, ``v``, ``o`` projections.

    With ``has_relative_attention_bias`` it owns ``relative_attention_bias`` (an
    ``nnx.Embed(num_buckets, num_heads)``) and :meth:`compute_bias` gives the stack's position
    bias.
    """

    def __init__(
        self,
        config: T5Config,
        *,
        has_relative_attention_bias: bool = False,
        bidirectional: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        inner = config.num_heads * config.d_kv
        d = config.d_model
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        # Mesh-TF T5 initialisation (the 1/sqrt(d_kv) scaling lives in q's init).
        self.q = _linear(d, inner, config, rngs, (d * config.d_kv) ** -0.5)
        self.k = _linear(d, inner, config, rngs, d**-0.5)
        self.v = _linear(d, inner, config, rngs, d**-0.5)
        self.o = _linear(inner, d, config, rngs, inner**-0.5)
        self.relative_attention_bias = (
            nnx.Embed(
                self.num_buckets,
                self.num_heads,
                dtype=config.dtype,
                param_dtype=config.param_dtype,
                embedding_init=nnx.initializers.normal(d**-0.5),
                rngs=rngs,
            )
            if has_relative_attention_bias
            else None
        )
        self.dropout = _dropout(config.dropout_rate, rngs)

    def compute_bias(self, q_len: int, k_len: int) -> jax.Array:
        """Position bias ``(1, num_heads, q_len, k_len)`` (float32)."""
        if self.relative_attention_bias is None:
            raise ValueError("this attention layer has no relative_attention_bias")
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        buckets = relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        values = self.relative_attention_bias(jnp.asarray(buckets, jnp.int32))  # (q, k, h)
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        position_bias: jax.Array | None = None,
    ) -> jax.Array:
        """``x (B, Q, d)`` attends to ``kv (B, K, d)`` (default ``x``).

        ``mask`` is boolean, broadcastable to ``(B, heads, Q, K)`` (True = attend);
        ``position_bias`` is added to the raw (unscaled) scores.
        """
        kv = x if kv is None else kv
        b, q_len, _ = x.shape
        k_len = kv.shape[1]
        q = self.q(x).reshape(b, q_len, self.num_heads, self.d_kv)
        k = self.k(kv).reshape(b, k_len, self.num_heads, self.d_kv)
        v = self.v(kv).reshape(b, k_len, self.num_heads, self.d_kv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if position_bias is not None:
            scores = scores + position_bias
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, q_len, -1)
        return self.o(ctx)


class T5MLP(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs) -> None:
        self.gated, self.act = _ff_kind(config.feed_forward_proj)
        d, f = config.d_model, config.d_ff
        if self.gated:
            self.wi_0 = _linear(d, f, config, rngs, d**-0.5)
            self.wi_1 = _linear(d, f, config, rngs, d**-0.5)
        else:
            self.wi = _linear(d, f, config, rngs, d**-0.5)
        self.wo = _linear(f, d, config, rngs, f**-0.5)
        self.dropout = _dropout(config.dropout_rate, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACT[self.act]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(self.dropout(h))


class T5Block(nnx.Module):
    """Pre-norm block: self-attention, (decoder) cross-attention, MLP, each residual."""

    def __init__(
        self,
        config: T5Config,
        *,
        is_decoder: bool,
        has_relative_attention_bias: bool,
        rngs: nnx.Rngs,
    ) -> None:
        self.is_decoder = is_decoder
        self.self_attention = T5Attention(
            config,
            has_relative_attention_bias=has_relative_attention_bias,
            bidirectional=not is_decoder,
            rngs=rngs,
        )
        self.self_attention_norm = _norm(config, rngs)
        if is_decoder:
            self.cross_attention = T5Attention(config, rngs=rngs)
            self.cross_attention_norm = _norm(config, rngs)
        self.mlp = T5MLP(config, rngs=rngs)
        self.mlp_norm = _norm(config, rngs)
        self.dropout = _dropout(config.dropout_rate, rngs)

    def __call__(
        self,
        h: jax.Array,
        mask: jax.Array | None,
        position_bias: jax.Array,
        encoder_hidden: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
    ) -> jax.Array:
        a = self.self_attention(self.self_attention_norm(h), None, mask, position_bias)
        h = h + self.dropout(a)
        if self.is_decoder:
            c = self.cross_attention(self.cross_attention_norm(h), encoder_hidden, encoder_mask)
            h = h + self.dropout(c)
        return h + self.dropout(self.mlp(self.mlp_norm(h)))


class T5Stack(nnx.Module):
    """``layers`` (``nnx.List`` of :class:`T5Block`) + ``final_norm``; the first layer's
    relative position bias is computed once and shared by all layers."""

    def __init__(self, config: T5Config, *, is_decoder: bool, rngs: nnx.Rngs) -> None:
        n = config.n_decoder_layers if is_decoder else config.num_layers
        self.is_decoder = is_decoder
        self.layers = nnx.List(
            [
                T5Block(
                    config, is_decoder=is_decoder, has_relative_attention_bias=i == 0, rngs=rngs
                )
                for i in range(n)
            ]
        )
        self.final_norm = _norm(config, rngs)
        self.dropout = _dropout(config.dropout_rate, rngs)

    def __call__(
        self,
        h: jax.Array,
        attention_mask: jax.Array | None = None,
        encoder_hidden: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``h (B, L, d)`` embedded inputs; masks ``(B, L)`` / ``(B, L_enc)``, 1 = token."""
        length = h.shape[1]
        position_bias = self.layers[0].self_attention.compute_bias(length, length)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        if self.is_decoder:
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            mask = causal if mask is None else mask & causal
        enc_mask = (
            None
            if encoder_attention_mask is None
            else encoder_attention_mask[:, None, None, :].astype(bool)
        )
        h = self.dropout(h)
        for layer in self.layers:
            h = layer(h, mask, position_bias, encoder_hidden, enc_mask)
        return self.dropout(self.final_norm(h))


class T5ForConditionalGeneration(nnx.Module):
    """T5 v1.1 / mT5 encoder-decoder with an LM head (see the module docstring)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.shared = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.encoder = T5Stack(config, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, is_decoder=True, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config.d_model, config.vocab_size, config, rngs, config.d_model**-0.5)
        )

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Encoder hidden states ``(B, L_enc, d_model)``."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden: jax.Array,
        attention_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``(B, L_dec, vocab)`` (float32) given the encoder output."""
        h = self.decoder(
            self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden, attention_mask
        )
        if self.config.scales_decoder_outputs:
            h = h * self.config.d_model**-0.5
        logits = self.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        decoder_input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``input_ids (B, L_enc)``, ``decoder_input_ids (B, L_dec)`` -> logits ``(B, L_dec,
        vocab)``. Masks are 1 for tokens, 0 for padding (the decoder is causal regardless)."""
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)


def shift_right(
    labels: jax.Array, decoder_start_token_id: int = 0, pad_token_id: int = 0
) -> jax.Array:
    """Teacher-forcing decoder inputs: ``[start, labels[:-1]]`` with ``-100`` replaced by pad."""
    start = jnp.full((*labels.shape[:-1], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def t5_loss(
    model: T5ForConditionalGeneration,
    input_ids: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Mean token cross-entropy of ``labels (B, L_dec)`` under teacher forcing.

    Decoder inputs are ``shift_right(labels)`` (start token ``config.decoder_start_token_id``,
    pad ``config.pad_token_id``); positions with label ``-100`` are ignored (pad labels with
    -100, not 0, to leave them out).
    """
    cfg = model.config
    dec_in = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = model(input_ids, dec_in, attention_mask)
    valid = labels != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


@nnx.jit(static_argnames=("max_new_tokens",))
def _generate(
    model: T5ForConditionalGeneration,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    max_new_tokens: int,
) -> jax.Array:
    cfg = model.config
    b = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)
    buf = jnp.full((b, max_new_tokens + 1), cfg.pad_token_id, jnp.int32)
    buf = buf.at[:, 0].set(cfg.decoder_start_token_id)

    def step(t: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        buf, done = carry
        # The decoder is causal: the not-yet-written tail of buf does not affect position t.
        logits = model.decode(buf[:, :max_new_tokens], enc, attention_mask)
        tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, False), -1).astype(jnp.int32)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        buf = jax.lax.dynamic_update_index_in_dim(buf, tok, t + 1, 1)
        return buf, done | (tok == cfg.eos_token_id)

    buf, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, jnp.zeros((b,), bool)))
    return buf[:, 1:]


def generate_greedy(
    model: T5ForConditionalGeneration,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int = 32,
) -> jax.Array:
    """Greedy decoding, ``(B, max_new_tokens)`` int32 (after the start token; the EOS is kept,
    positions after it are ``pad``).

    Jitted (one compilation per input shape and ``max_new_tokens``); no KV cache: each of the
    ``max_new_tokens`` steps reruns the decoder over a fixed-length buffer, ``O(T^2)`` per
    sequence, fine for short targets. With dropout configured, call ``model.eval()`` first.
    """
    return _generate(model, jnp.asarray(input_ids), attention_mask, max_new_tokens)


# ----------------------------------------------------------------------------- loading

_BLOCK_RE = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight$")


def _hf_t5_to_nnx(name: str, arr: np.ndarray) -> tuple[tuple[str | int, ...], np.ndarray] | None:
    """Maps one HF T5 tensor to (nnx path, flax-layout array); None for ignored tensors."""
    if name == "shared.weight":
        return ("shared", "embedding"), arr
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), arr.T
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return None
    m = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name)
    if m:
        return (m.group(1), "final_norm", "scale"), arr
    m = _BLOCK_RE.fullmatch(name)
    if not m:
        raise ValueError(f"unexpected T5 tensor {name!r}")
    stack, i, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    prefix: tuple[str | int, ...] = (stack, "layers", i)
    if stack == "encoder":
        kind = {0: "self", 1: "mlp"}.get(sub)
    else:
        kind = {0: "self", 1: "cross", 2: "mlp"}.get(sub)
    attn_name = {"self": "SelfAttention", "cross": "EncDecAttention"}
    module = {"self": "self_attention", "cross": "cross_attention", "mlp": "mlp"}
    if kind is None:
        raise ValueError(f"unexpected T5 tensor {name!r}")
    if rest == "layer_norm":
        return (*prefix, f"{module[kind]}_norm", "scale"), arr
    if kind == "mlp":
        proj = rest.removeprefix("DenseReluDense.")
        if proj == rest or proj not in ("wi", "wi_0", "wi_1", "wo"):
            raise ValueError(f"unexpected T5 tensor {name!r}")
        return (*prefix, "mlp", proj, "kernel"), arr.T
    head, _, proj = rest.partition(".")
    if head != attn_name[kind]:
        raise ValueError(f"unexpected T5 tensor {name!r}")
    if proj == "relative_attention_bias":
        return (*prefix, module[kind], "relative_attention_bias", "embedding"), arr
    if proj not in ("q", "k", "v", "o"):
        raise ValueError(f"unexpected T5 tensor {name!r}")
    return (*prefix, module[kind], proj, "kernel"), arr.T


def load_t5_safetensors(
    path_or_dir: str | os.PathLike[str], config: T5Config | None = None
) -> T5ForConditionalGeneration:
    """Loads a Hugging Face T5 v1.1 / mT5 checkpoint (``model.safetensors`` or a sharded
    index, with ``config.json``) into :class:`T5ForConditionalGeneration`.

    ``config`` defaults to the ``config.json`` beside the weights. The model is built
    abstractly (no random init) and every param must be filled once with the right shape. See
    the module docstring for the name mapping.
    """
    files, config_path = resolve_checkpoint(path_or_dir)
    if config is None:
        if config_path is None:
            raise FileNotFoundError(f"no config.json beside {files[0]}; pass config=")
        config = T5Config.from_hf_config(read_config(config_path))
    tensors = read_safetensors(files)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    arrays = {}
    for k, v in tensors.items():
        mapped = _hf_t5_to_nnx(k, v)
        if mapped is not None:
            arrays[mapped[0]] = mapped[1]
    cfg = config
    model = nnx.eval_shape(lambda: T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    fill_params(model, arrays)
    return model
