"""Gemma through google-tunix's maintained nnx implementation (``pip install 'lora_optax[gemma]'``).

LoRA goes on the attention einsums via qwix (:func:`lora_optax.flax.apply_lora`
with ``targets="gemma"``: ``attn/q_einsum`` ``w (N, D, H)`` → ``A (D, r)``, ``B (r, N,
H)``; ``attn/kv_einsum`` ``w (2, K, D, H)`` → ``A (D, r)``, ``B (r, 2, K, H)`` (k and v
share one pair, as in tunix); ``attn/attn_vec_einsum`` ``w (N, H, D)`` → ``A (N, H,
r)``, ``B (r, D)``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

__all__ = ["causal_inputs", "lm_loss", "load_gemma", "tiny_config"]


def _model_lib():
    from tunix.models.gemma import model as gemma_model

    return gemma_model


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
    """Next-token cross-entropy over ``batch["loss_mask"]`` (default: non-pad targets)."""
    tokens = batch["tokens"]
    logits, _ = model(*causal_inputs(tokens))
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    mask = batch["loss_mask"] if "loss_mask" in batch else tokens != 0
    weights = jnp.asarray(mask)[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * weights).sum() / jnp.maximum(weights.sum(), 1.0)
