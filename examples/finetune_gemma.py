"""LoRA fine-tuning of Gemma (decoder-only LM): ARC-Challenge, OpenBookQA, BoolQ, GSM8K.

Tiny random Gemma with a byte-level tokenizer and the LLM-Adapters data (seconds on CPU)::

    python examples/finetune_gemma.py --model tiny --data ../shared/data/llm_adapters \\
        --task arc_challenge --steps 20 --batch-size 4 --rank 4 --alpha 4 --max-length 64 \\
        --eval-batches 2

Gemma-2B (Hugging Face safetensors folder with ``tokenizer.model`` or ``tokenizer.json``),
LoRA-RITE paper settings (A.1: rank 16, alpha 16, q/k/v/o, batch 16, 2000 steps, linear
decay with 100 warm-up steps, betas 0.9/0.999)::

    python examples/finetune_gemma.py --model /path/to/gemma-2b --gemma-config gemma_2b \\
        --dtype bfloat16 --data ../shared/data/llm_adapters --task openbookqa \\
        --optimizer lora_rite --lr 2e-4 --steps 2000 --batch-size 16 --max-length 512 \\
        --mesh data=4,model=2 --ckpt-dir /tmp/gemma_obqa --ckpt-every 500 --resume

Training: next-token cross-entropy on the answer tokens of ``prompt + answer`` (the prompt
tokens are context only). ``--prompt-style instruction`` (default) uses the LLM-Adapters
(Alpaca) template and its answers (``"the correct answer is answer3"``; GSM8K: the
record's solution text); ``--prompt-style qa`` uses ``Question: …\\nAnswer:`` and the
choice text itself. Evaluation: multiple choice and BoolQ by the summed log-likelihood of
each candidate answer (``accuracy``; ``accuracy_norm`` divides by its token count);
GSM8K by greedy generation (no KV cache: each new token reruns the model over a
fixed-length buffer) and the final number of the generated text (``gsm8k_accuracy``).

LoRA goes on the attention einsums (``--targets gemma``: ``q_einsum``, ``kv_einsum``
(k and v share one pair, as in tunix), ``attn_vec_einsum``) through qwix.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_optax import tasks
from lora_optax.flax import apply_lora, gemma
from lora_optax.flax.cli import add_common_args, parse_mesh, train_loop
from lora_optax.flax.train import make_eval_step
from lora_optax.tasks.tokenizers import ByteTokenizer, decode_until_eos, find_tokenizer

# ---------------------------------------------------------------------------- prompts


def prompt_and_target(ex: tasks.Example, style: str) -> tuple[str, str]:
    """The training pair: prompt and gold answer text."""
    if style == "instruction":
        return tasks.format_instruction(ex)
    if ex.kind == tasks.GENERATION:
        return tasks.format_generation(ex)
    prompt, choices = tasks.format_lm_multiple_choice(ex)
    return prompt, choices[ex.label]


def prompt_and_candidates(ex: tasks.Example, style: str) -> tuple[str, list[str]]:
    """The scoring prompt and one answer text per choice (same format as training)."""
    if style == "instruction":
        prompt = tasks.format_instruction(ex)[0]
        cands = [
            tasks.format_instruction(dataclasses.replace(ex, label=k))[1]
            for k in range(ex.num_choices)
        ]
        return prompt, cands
    return tasks.format_lm_multiple_choice(ex)


# ---------------------------------------------------------------------------- batches


def make_train_collate(tok, max_length: int, style: str):
    def collate(items: list[tasks.Example]) -> dict[str, np.ndarray]:
        rows = []
        for ex in items:
            prompt, target = prompt_and_target(ex, style)
            rows.append(
                tasks.pack_prompt_target(
                    [tok.bos_id, *tok.encode(prompt)],
                    tok.encode(target),
                    max_length,
                    pad_id=tok.pad_id,
                    eos_id=tok.eos_id,
                )
            )
        return {
            "tokens": np.stack([r["input_ids"] for r in rows]),
            "loss_mask": np.stack([r["target_mask"] for r in rows]),
        }

    return collate


def choice_batch(tok, items, max_length: int, num_choices: int, style: str):
    """``tokens``/``target_mask`` ``(B * C, L)``, ``choice_mask`` ``(B, C)``, ``labels``."""
    tokens, tmask, cmask, labels = [], [], [], []
    for ex in items:
        prompt, cands = prompt_and_candidates(ex, style)
        p_ids = [tok.bos_id, *tok.encode(prompt)]
        rows = [
            tasks.pack_prompt_target(p_ids, tok.encode(c), max_length, pad_id=tok.pad_id)
            for c in cands[:num_choices]
        ]
        cmask.append([True] * len(rows) + [False] * (num_choices - len(rows)))
        rows += [rows[0]] * (num_choices - len(rows))
        tokens += [r["input_ids"] for r in rows]
        tmask += [r["target_mask"] for r in rows]
        labels.append(max(ex.label, 0))
    return {
        "tokens": np.stack(tokens),
        "target_mask": np.stack(tmask),
        "choice_mask": np.asarray(cmask, bool),
        "labels": np.asarray(labels, np.int64),
    }


def prompt_batch(tok, items, max_length: int, style: str) -> np.ndarray:
    """Left-padded prompts ``(B, max_length)`` (generation continues at the right end)."""
    out = np.full((len(items), max_length), tok.pad_id, np.int32)
    for i, ex in enumerate(items):
        ids = [tok.bos_id, *tok.encode(prompt_and_target(ex, style)[0])][-max_length:]
        out[i, max_length - len(ids) :] = ids
    return out


# ---------------------------------------------------------------------------- model fns


def choice_scores(model, batch):
    """Summed log-likelihood and token count of each row's target tokens."""
    tokens = batch["tokens"]
    logits, _ = model(*gemma.causal_inputs(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    tok_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    w = batch["target_mask"][:, 1:].astype(jnp.float32)
    return (tok_logp * w).sum(-1), w.sum(-1)


def make_greedy(max_new_tokens: int, eos_id: int, pad_id: int):
    def greedy(model, batch):
        prompt = batch["prompt"]
        b, p = prompt.shape
        buf = jnp.concatenate([prompt, jnp.full((b, max_new_tokens), pad_id, prompt.dtype)], 1)
        graphdef, state = nnx.split(model)  # re-merged inside the loop (qwix sets attributes)

        def step(t, carry):
            buf, done = carry
            logits, _ = nnx.merge(graphdef, state)(*gemma.causal_inputs(buf, pad_id))
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + t - 1, 1, False), -1)
            nxt = jnp.where(done, pad_id, nxt).astype(buf.dtype)
            buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + t, 1)
            return buf, done | (nxt == eos_id)

        buf, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, jnp.zeros((b,), bool)))
        return buf[:, p:]

    return greedy


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, targets="gemma")
    p.add_argument(
        "--task", default="arc_challenge", help="arc_challenge | openbookqa | boolq | gsm8k"
    )
    p.add_argument("--prompt-style", default="instruction", choices=["instruction", "qa"])
    p.add_argument("--gemma-config", default="gemma_2b", help="tunix ModelConfig constructor")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or sentencepiece model")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (real checkpoints)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length")
    p.add_argument("--test-split", default="test")
    p.add_argument("--tiny-layers", type=int, default=2, help="layers of --model tiny")
    return p


def build_model(args, mesh):
    if args.model == "tiny":
        model = gemma.tiny_model(
            args.seed, num_embed=ByteTokenizer().vocab_size, num_layers=args.tiny_layers
        )
        return model, ByteTokenizer()
    from tunix.models.gemma import model as gm

    config = getattr(gm.ModelConfig, args.gemma_config)()
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    model = gemma.load_gemma(args.model, config, mesh=mesh, dtype=dtype)
    return model, find_tokenizer(args.model, args.tokenizer)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    task = tasks.canonical_task(args.task)
    if not args.data:
        raise SystemExit("--data is required (LLM-Adapters folder or a task folder)")
    train = tasks.load_llm_adapters(args.data, task, "train")
    test = tasks.load_llm_adapters(args.data, task, args.test_split)
    if args.max_examples:
        train = train[: args.max_examples]
    generation = test[0].kind == tasks.GENERATION
    mesh = parse_mesh(args.mesh)
    base, tok = build_model(args, mesh)
    collate = make_train_collate(tok, args.max_length, args.prompt_style)
    sample = collate(train[: args.batch_size])
    model = apply_lora(
        base,
        targets=args.targets,
        rank=args.rank,
        alpha=args.alpha,
        scale=args.scale,
        rngs=nnx.Rngs(args.seed + 1),
        model_inputs=gemma.causal_inputs(sample["tokens"][:1], tok.pad_id),
    )
    data = tasks.DataIterator(train, args.batch_size, seed=args.seed, collate=collate)
    limit = args.eval_batches or None
    chunks = list(tasks.eval_batches(len(test), args.batch_size))[:limit]

    if generation:
        greedy = make_eval_step(make_greedy(args.max_new_tokens, tok.eos_id, tok.pad_id), mesh=mesh)

        def evaluate(model) -> dict[str, float]:
            gens, golds = [], []
            for idx, valid in chunks:
                items = [test[int(i)] for i in idx]
                prompt = prompt_batch(tok, items, args.max_length, args.prompt_style)
                out = np.asarray(greedy(model, {"prompt": prompt}))
                for ex, row, ok in zip(items, out, valid):
                    if ok:
                        gens.append(decode_until_eos(tok, row))
                        golds.append(ex.answer)
            acc = tasks.gsm8k_accuracy(gens, golds)
            return {"gsm8k_accuracy": acc, "eval_examples": len(gens)}

    else:
        num_choices = max(ex.num_choices for ex in test)
        score = make_eval_step(choice_scores, mesh=mesh)

        def evaluate(model) -> dict[str, float]:
            scores, lengths, labels = [], [], []
            for idx, valid in chunks:
                batch = choice_batch(
                    tok,
                    [test[int(i)] for i in idx],
                    args.max_length,
                    num_choices,
                    args.prompt_style,
                )
                s, n = (np.asarray(x) for x in score(model, batch))
                s = np.where(batch["choice_mask"], s.reshape(-1, num_choices), -np.inf)
                n = np.where(batch["choice_mask"], n.reshape(-1, num_choices), 0.0)
                scores += list(s[valid])
                lengths += list(n[valid])
                labels += list(batch["labels"][valid])
            return {
                "accuracy": tasks.multiple_choice_accuracy(scores, labels),
                "accuracy_norm": tasks.multiple_choice_accuracy(scores, labels, lengths),
                "eval_examples": len(labels),
            }

    rules = []
    if mesh is not None and "model" in mesh.shape:
        rules = [
            (r".*/attn/(q_einsum|attn_vec_einsum)/w", jax.P("model", None, None)),
            (r".*/mlp/(gate_proj|up_proj)/kernel", jax.P(None, "model")),
            (r".*/mlp/down_proj/kernel", jax.P("model", None)),
        ]
    return train_loop(
        args,
        model=model,
        loss_fn=gemma.lm_loss,
        data=data,
        evaluate=evaluate,
        mesh=mesh,
        shard_rules=rules,
        header={
            "task": f"{task} ({test[0].kind}, {args.prompt_style} prompts)",
            "model": args.model,
            "train / test": f"{len(train)} / {len(test)}",
        },
    )


if __name__ == "__main__":
    main()
