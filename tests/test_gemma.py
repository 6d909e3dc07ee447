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


# ------------------------------------------------- answer-position loss and scoring


def _gemma3_tiny():
    pytest.importorskip("tunix.models.gemma3.model")
    from tests.gguf_fixtures import random_gemma3, tiny_gemma3_config

    return random_gemma3(tiny_gemma3_config(num_layers=2, vocab=128))


def _answer_batch(seed=0, b=3, length=14):
    from lora_optax import tasks

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 128, size=(b, length)).astype(np.int32)
    mask = np.zeros((b, length), bool)
    mask[0, 9:12], mask[1, 5:14], mask[2, 13] = True, True, True
    tokens[0, 12:] = 0  # padded row
    return {"tokens": tokens, "loss_mask": mask, **tasks.answer_targets(mask, 9)}


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_answer_loss_equals_lm_loss_with_grads(family):
    """The head applied at the answer positions only: same loss and LoRA gradients."""
    base = gemma.tiny_model(0) if family == "gemma" else _gemma3_tiny()
    batch = _answer_batch()
    model = lf.apply_lora(
        base,
        targets="gemma",
        rank=2,
        model_inputs=gemma.causal_inputs(batch["tokens"][:1]),
        b_initializer=nnx.initializers.normal(0.1),
    )
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def value_and_grad(loss):
        f = lambda lora: loss(nnx.merge(graphdef, lora, rest), batch)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(lora)

    (full, g_full), (fast, g_fast) = (
        value_and_grad(gemma.lm_loss),
        value_and_grad(gemma.answer_loss),
    )
    np.testing.assert_allclose(fast, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_packed_choices_score_like_separate_rows():
    """tasks.pack_choices (prompt once, each choice masked to see only the prompt and
    itself) gives each choice the log-likelihood of scoring it after the prompt alone."""
    from lora_optax import tasks

    model = _gemma3_tiny()
    rng = np.random.default_rng(1)
    questions = []
    for n_prompt, lens in [(6, [2, 3, 1, 4]), (9, [3, 1, 2]), (4, [5, 2, 2, 2])]:
        prompt = [2, *rng.integers(5, 128, n_prompt - 1)]
        questions.append((prompt, [list(rng.integers(5, 128, n)) for n in lens]))
    packed = [tasks.pack_choices(p, c, 32, 16, num_choices=4) for p, c in questions]
    batch = {k: np.stack([r[k] for r in packed]) for k in packed[0]}
    scores, counts = jax.jit(gemma.choice_log_likelihoods)(model, batch)
    for q, (prompt, choices) in enumerate(questions):
        for k, choice in enumerate(choices):
            row = tasks.pack_prompt_target(prompt, choice, 32)
            single = {
                "tokens": row["input_ids"][None],
                **tasks.answer_targets(row["target_mask"][None], 8),
            }
            s, n = gemma.choice_log_likelihoods(model, single)
            np.testing.assert_allclose(scores[q, k], s[0, 0], rtol=1e-5, atol=1e-5)
            assert counts[q, k] == n[0, 0] == len(choice)
        assert np.all(np.asarray(counts[q, len(choices) :]) == 0)  # missing choice


def test_full_grad_peft_trainer_matches_make_train_step(base):
    """SoLoRA needs full_grads=: FullGradPeftTrainer (tunix's loop) follows the same
    trajectory as make_train_step(full_grads=True)."""
    pytest.importorskip("tunix.sft.peft_trainer")
    from tunix.sft import peft_trainer

    from lora_optax.flax.peft_trainer import FullGradPeftTrainer

    data = batch()

    def run_step():
        model = lora_model(base)
        opt = nnx.Optimizer(
            model, lora_optax.solora_adamw(1e-2, pairs=lf.pair_spec(model)), wrt=nnx.LoRAParam
        )
        step = lf.make_train_step(gemma.lm_loss, full_grads=True)
        for _ in range(3):
            step(model, opt, data)
        return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    def run_trainer():
        model = lora_model(base)
        tx = lora_optax.solora_adamw(1e-2, pairs=lf.pair_spec(model))
        config = peft_trainer.TrainingConfig(
            eval_every_n_steps=10**6, max_steps=3, pbar_description=None
        )
        trainer = FullGradPeftTrainer(model, tx, config).with_loss_fn(
            lambda model, tokens: gemma.lm_loss(model, {"tokens": tokens})
        )
        trainer.train([data] * 3)
        return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    a, b = run_step(), run_trainer()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(a)) > 0
