"""Merging LoRA into base weights and PEFT-layout export (lora_optax.flax.export)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("safetensors")

from flax import nnx

from lora_optax.flax import export
from tests.flax_fixtures import Tiny, example_input, make_lora_model


def test_merge_matches_lora_model_and_restores_base_structure():
    model = make_lora_model(rank=2, alpha=6.0, b_std=0.3)
    x = example_input()
    y = model(x)
    merged = export.merge_lora(model)
    assert type(merged) is Tiny
    assert not jax_leaves(nnx.state(merged, nnx.LoRAParam))
    assert type(merged.layers[0].q) is nnx.Linear
    assert type(merged.layers[0].kv) is nnx.Einsum
    assert not hasattr(merged.layers[0].kv, "kernel_lora_a")
    np.testing.assert_allclose(merged(x), y, rtol=1e-4, atol=1e-5)
    # the einsum weight (N, D, H) got s·A B transposed back from (D, N, H)
    kv = model.layers[1].kv
    want = kv.kernel[...] + 3.0 * jnp.einsum(
        "dr,rnh->ndh", kv.kernel_lora_a[...], kv.kernel_lora_b[...]
    )
    np.testing.assert_allclose(merged.layers[1].kv.kernel[...], want, rtol=1e-5, atol=1e-6)
    # the LoRA model is untouched
    np.testing.assert_allclose(model(x), y)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_peft_layout_and_round_trip(tmp_path):
    model = make_lora_model(rank=2, alpha=6.0, b_std=0.3)
    weights, config_path = export.save_peft_adapter(
        model, str(tmp_path), base_model_name_or_path="tiny"
    )
    from safetensors.numpy import load_file

    tensors = load_file(weights)
    q = model.layers[0].q
    a_key = "base_model.model.layers.0.q.lora_A.weight"
    b_key = "base_model.model.layers.0.q.lora_B.weight"
    np.testing.assert_array_equal(tensors[a_key], np.asarray(q.lora_a[...]).T)  # (r, in)
    np.testing.assert_array_equal(tensors[b_key], np.asarray(q.lora_b[...]).T)  # (out, r)
    assert tensors["base_model.model.layers.1.kv.lora_A.weight"].shape == (2, 6)
    assert tensors["base_model.model.layers.1.kv.lora_B.weight"].shape == (6, 2)  # N*H = 6
    assert len(tensors) == 12
    config = json.load(open(config_path))
    assert config["r"] == 2 and config["lora_alpha"] == 6.0 and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["kv", "o", "q"]
    assert config["base_model_name_or_path"] == "tiny"
    # PEFT semantics (PyTorch y = x Wᵀ): W_torch + (alpha / r) B_peft A_peft = (W0 + s A B)ᵀ
    w0 = np.asarray(q.base_module.kernel[...])
    merged_torch = w0.T + config["lora_alpha"] / config["r"] * tensors[b_key] @ tensors[a_key]
    merged = export.merge_lora(model)
    np.testing.assert_allclose(
        merged_torch, np.asarray(merged.layers[0].q.kernel[...]).T, rtol=1e-5, atol=1e-6
    )
    # round trip into a fresh LoRA model (B = 0)
    fresh = make_lora_model(rank=2, alpha=6.0, seed=0)
    x = example_input()
    assert not np.allclose(fresh(x), model(x))
    export.load_peft_adapter(fresh, str(tmp_path))
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-5, atol=1e-6)
