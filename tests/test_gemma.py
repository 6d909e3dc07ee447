"""Tiny random Gemma (google-tunix) with qwix LoRA: forward and a few train steps."""

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("tunix.models.gemma.model")
pytest.importorskip("qwix")

from flax import nnx

import lora_optax
from lora_optax import flax as lf
from lora_optax.flax import gemma


def batch(seed=0, b=4, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 128, size=(b, length)).astype(np.int32)
    tokens[:, 1::2] = (tokens[:, 0::2] + 7) % 127 + 1  # learnable: every 2nd token
    return {"tokens": tokens}


@pytest.fixture(scope="module")
def base():
    return gemma.tiny_model(0)


def lora_model(base):
    model = lf.apply_lora(
        base,
        targets="gemma",
        rank=2,
        alpha=4.0,
        model_inputs=gemma.causal_inputs(batch()["tokens"]),
    )
    return model


def test_forward_and_pairs(base):
    inputs = gemma.causal_inputs(batch()["tokens"])
    y0, _ = base(*inputs)
    model = lora_model(base)
    y, _ = model(*inputs)
    np.testing.assert_array_equal(y, y0)
    pairs = lf.lora_pairs(model)
    names = {p.name.split("/")[-2] for p in pairs}
    assert names == {"q_einsum", "kv_einsum", "attn_vec_einsum"}
    q = next(p for p in pairs if "q_einsum" in p.name)
    assert (q.in_ndim, q.out_ndim, q.scale) == (1, 2, 2.0)
    plan = lf.FullGradPlan.from_model(model)
    assert any(e.perm is not None for e in plan.entries)  # q_einsum (N, D, H) -> (D, N, H)


@pytest.mark.parametrize("name", ["lora_rite", "adamw"])
def test_train_steps(base, name):
    model = lora_model(base)
    spec = lf.pair_spec(model)
    tx = lora_optax.lora_rite(1e-2, pairs=spec) if name == "lora_rite" else optax.adamw(1e-2)
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    step = lf.make_train_step(gemma.lm_loss)
    losses = [float(step(model, opt, batch(0))[0]) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(jax.numpy.abs(model.layers[0].attn.q_einsum.w_lora_b[...]).max()) > 0
