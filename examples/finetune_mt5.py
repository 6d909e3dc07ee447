"""LoRA fine-tuning of mT5 / T5 v1.1 (encoder-decoder): ARC-Challenge, OpenBookQA, BoolQ, GSM8K.

Tiny random mT5 with a byte-level tokenizer and the LLM-Adapters data (seconds on CPU)::

    python examples/finetune_mt5.py --model tiny --data ../shared/data/llm_adapters \\
        --task openbookqa --steps 20 --batch-size 4 --rank 4 --alpha 4 --max-length 64 \\
        --eval-batches 2

mT5-XXL (Hugging Face folder with ``model.safetensors`` or a sharded index,
``config.json`` and ``spiece.model`` or ``tokenizer.json``), LoRA-RITE paper settings::

    python examples/finetune_mt5.py --model /path/to/mt5-xxl --data ../shared/data/llm_adapters \\
        --task openbookqa --optimizer lora_rite --lr 2e-4 --steps 2000 --batch-size 16 \\
        --max-length 512 --max-target-length 16 --mesh data=2,model=4 \\
        --ckpt-dir /tmp/mt5_obqa --ckpt-every 500 --resume

Input: the instruction prompt (``--prompt-style instruction``, the LLM-Adapters / Alpaca
template, default; ``qa``: ``Question: …\\nAnswer:``); target: the answer text
(``"the correct answer is answer3"``, the choice text with ``qa``, GSM8K: the solution
text). Loss: token cross-entropy of the target (teacher forcing). Evaluation: multiple
choice and BoolQ by the log-likelihood of each candidate target (``accuracy``) and by
exact match of the greedy output with the gold target (``exact_match``); GSM8K by the
final number of the greedy output (``gsm8k_accuracy``) and ROUGE-L against the
reference solution (``rouge_l``, needs ``rouge-score``).

LoRA goes on every attention projection (``--targets t5``: self- and cross-attention
``q``/``k``/``v``/``o`` of encoder and decoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_optax import tasks
from lora_optax.flax import apply_lora
from lora_optax.flax.cli import add_common_args, parse_mesh, train_loop
from lora_optax.flax.train import make_eval_step
from lora_optax.models import t5
from lora_optax.tasks.tokenizers import (
    ByteTokenizer,
    Tokenizer,
    decode_until_eos,
    find_tokenizer,
)

# ---------------------------------------------------------------------------- prompts


def prompt_and_target(ex: tasks.Example, style: str) -> tuple[str, str]:
    if style == "instruction":
        return tasks.format_instruction(ex)
    if ex.kind == tasks.GENERATION:
        prompt, target = tasks.format_generation(ex)
        return prompt, target.strip()
    prompt, choices = tasks.format_lm_multiple_choice(ex)
    return prompt, choices[ex.label].strip()


def candidates(ex: tasks.Example, style: str) -> list[str]:
    """One target text per choice, formatted like the training targets."""
    return [
        prompt_and_target(dataclasses.replace(ex, label=k), style)[1] for k in range(ex.num_choices)
    ]


# ---------------------------------------------------------------------------- batches


def encode_inputs(tok, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ids (+ EOS; over-long prompts lose their start) and mask."""
    seqs = [[*tok.encode(p)][-(max_length - 1) :] + [tok.eos_id] for p in prompts]
    ids, mask = tasks.pad_sequences(seqs, max_length, pad_id=tok.pad_id)
    return ids, mask.astype(np.int32)


def encode_labels(tok, targets: list[str], max_length: int) -> np.ndarray:
    """Decoder labels (+ EOS), padded with ``-100`` (ignored by the loss)."""
    seqs = [[*tok.encode(t)][: max_length - 1] + [tok.eos_id] for t in targets]
    ids, mask = tasks.pad_sequences(seqs, max_length, pad_id=tok.pad_id)
    return np.where(mask, ids, -100).astype(np.int32)


def make_train_collate(tok, args):
    def collate(items: list[tasks.Example]) -> dict[str, np.ndarray]:
        pairs = [prompt_and_target(ex, args.prompt_style) for ex in items]
        ids, mask = encode_inputs(tok, [p for p, _ in pairs], args.max_length)
        labels = encode_labels(tok, [t for _, t in pairs], args.max_target_length)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def loss_fn(model, batch):
    return t5.t5_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])


def target_scores(model, batch):
    """Summed log-likelihood of each row's labels (``-100`` positions ignored)."""
    cfg = model.config
    labels = batch["labels"]
    dec_in = t5.shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = model(batch["input_ids"], dec_in, batch["attention_mask"])
    valid = labels != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return -(ce * valid).sum(-1)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, targets="t5")
    p.add_argument(
        "--task", default="openbookqa", help="arc_challenge | openbookqa | boolq | gsm8k"
    )
    p.add_argument("--prompt-style", default="instruction", choices=["instruction", "qa"])
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or spiece.model")
    p.add_argument("--max-target-length", type=int, default=32, help="decoder length")
    p.add_argument(
        "--max-new-tokens", type=int, default=0, help="greedy length (0: --max-target-length)"
    )
    p.add_argument("--test-split", default="test")
    p.add_argument("--tiny-layers", type=int, default=2, help="encoder/decoder layers of tiny")
    return p


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
    # model + tokenizer
    tok: Tokenizer
    if args.model == "tiny":
        tok = ByteTokenizer()
        model = t5.T5ForConditionalGeneration(
            t5.T5Config.tiny(
                vocab_size=tok.vocab_size,
                num_layers=args.tiny_layers,
                num_decoder_layers=args.tiny_layers,
            ),
            rngs=nnx.Rngs(args.seed),
        )
    else:
        model = t5.load_t5_safetensors(args.model)
        tok = find_tokenizer(
            args.model,
            args.tokenizer,
            names=("tokenizer.json", "spiece.model", "tokenizer.model"),
            pad_id=model.config.pad_token_id,
            eos_id=model.config.eos_token_id,
        )
    model = apply_lora(
        model,
        targets=args.targets,
        rank=args.rank,
        alpha=args.alpha,
        scale=args.scale,
        rngs=nnx.Rngs(args.seed + 1),
    )
    collate = make_train_collate(tok, args)
    data = tasks.DataIterator(train, args.batch_size, seed=args.seed, collate=collate)
    mesh = parse_mesh(args.mesh)
    new_tokens = args.max_new_tokens or args.max_target_length
    limit = args.eval_batches or None
    chunks = list(tasks.eval_batches(len(test), args.batch_size))[:limit]
    greedy = make_eval_step(
        lambda m, b: t5.generate_greedy(
            m, b["input_ids"], b["attention_mask"], max_new_tokens=new_tokens
        ),
        mesh=mesh,
    )
    score = make_eval_step(target_scores, mesh=mesh)
    num_choices = 0 if generation else max(ex.num_choices for ex in test)

    def evaluate(model) -> dict[str, float]:
        gens, golds, scores, labels = [], [], [], []
        for idx, valid in chunks:
            items = [test[int(i)] for i in idx]
            pairs = [prompt_and_target(ex, args.prompt_style) for ex in items]
            ids, mask = encode_inputs(tok, [p for p, _ in pairs], args.max_length)
            out = np.asarray(greedy(model, {"input_ids": ids, "attention_mask": mask}))
            gens += [decode_until_eos(tok, r) for r, ok in zip(out, valid) if ok]
            golds += [ex for ex, ok in zip(items, valid) if ok]
            if generation:
                continue
            cands, cmask = [], []
            for ex in items:
                c = candidates(ex, args.prompt_style)[:num_choices]
                cmask.append([True] * len(c) + [False] * (num_choices - len(c)))
                cands += c + [c[0]] * (num_choices - len(c))
            batch = {
                "input_ids": np.repeat(ids, num_choices, 0),
                "attention_mask": np.repeat(mask, num_choices, 0),
                "labels": encode_labels(tok, cands, args.max_target_length),
            }
            s = np.asarray(score(model, batch)).reshape(-1, num_choices)
            s = np.where(np.asarray(cmask), s, -np.inf)
            scores += list(s[valid])
            labels += [max(ex.label, 0) for ex, ok in zip(items, valid) if ok]
        style = args.prompt_style
        if generation:
            refs = [prompt_and_target(ex, style)[1] for ex in golds]
            out = {
                "gsm8k_accuracy": tasks.gsm8k_accuracy(gens, [ex.answer for ex in golds]),
                "rouge_l": tasks.rouge_l(gens, refs),
            }
        else:
            refs = [prompt_and_target(ex, style)[1] for ex in golds]
            out = {
                "accuracy": tasks.multiple_choice_accuracy(scores, labels),
                "exact_match": tasks.exact_match_accuracy(gens, refs),
            }
        return {**out, "eval_examples": len(gens)}

    rules = []
    if mesh is not None and "model" in mesh.shape:
        rules = [
            (r".*/(q|k|v)/base_module/kernel", jax.P(None, "model")),
            (r".*/o/base_module/kernel", jax.P("model", None)),
            (r".*/mlp/(wi|wi_0|wi_1)/kernel", jax.P(None, "model")),
            (r".*/mlp/wo/kernel", jax.P("model", None)),
        ]
    return train_loop(
        args,
        model=model,
        loss_fn=loss_fn,
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
