"""LoRA fine-tuning of Gemma (decoder-only LM): OpenBookQA, ARC-Challenge, BoolQ, GSM8K.

Default: the packaged pretrained Gemma 3 270M (Q4_K_M GGUF, Gemma terms of use) on the
OpenBookQA slice shipped in the package (1000 train / 200 test questions), LoRA-RITE,
rank 16 on q/kv/o of all 18 layers; prints the zero-shot accuracy, a progress bar with
loss and throughput, and the accuracy after training::

    python examples/finetune_gemma.py                      # add --compare adamw for AdamW

Other models: ``--model path/to/gemma3.gguf`` (any Gemma 3 text GGUF), a Hugging Face
Gemma 3 folder, ``--model tiny`` (random 2-layer Gemma with a byte tokenizer, seconds),
or a Gemma v1/v2 safetensors folder with ``--gemma-config gemma_2b``. Other tasks:
``--data <LLM-Adapters folder> --task arc_challenge|boolq|gsm8k``.

Training: next-token cross-entropy on the answer tokens of ``prompt + answer``, with the
LM head applied at those positions only (``gemma.answer_loss``). ``--prompt-style qa``
(Gemma 3 default) uses ``Question: …\\nAnswer:`` and the choice text itself;
``instruction`` the LLM-Adapters (Alpaca) template and its answers (``"the correct answer
is answer3"``; GSM8K: the solution text). Evaluation: multiple choice by the summed
log-likelihood of each candidate (``accuracy``; ``accuracy_norm`` divides by its token
count), one row per question holding all its candidates (``tasks.pack_choices``: the
prompt is computed once); GSM8K by greedy generation and the final number.

Faults: ``--ckpt-dir DIR --ckpt-every N`` writes orbax checkpoints (LoRA factors,
optimizer state, data cursor); after a crash, the same command with ``--resume``
continues from the last complete checkpoint with the same losses as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_optax import tasks
from lora_optax.flax import apply_lora, gemma
from lora_optax.flax.cli import OPTIMIZERS, add_common_args, parse_mesh, train_loop
from lora_optax.flax.train import make_eval_step
from lora_optax.tasks.tokenizers import ByteTokenizer, decode_until_eos, find_tokenizer

PACKAGED = "gemma3-270m"

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


def _round_up(n: int, multiple: int = 8) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def make_train_collate(tok, max_length: int, num_targets: int, style: str):
    """Rows ``prompt + answer + EOS`` (prompt cut on the left when too long) and the
    positions that predict the answer (``tasks.answer_targets``)."""

    def collate(items: list[tasks.Example]) -> dict[str, np.ndarray]:
        rows = []
        for ex in items:
            prompt, target = prompt_and_target(ex, style)
            rows.append(
                tasks.pack_prompt_target(
                    [tok.bos_id, *tok.encode(prompt)],
                    tok.encode(target)[: num_targets - 1],
                    max_length,
                    pad_id=tok.pad_id,
                    eos_id=tok.eos_id,
                )
            )
        mask = np.stack([r["target_mask"] for r in rows])
        return {
            "tokens": np.stack([r["input_ids"] for r in rows]),
            **tasks.answer_targets(mask, num_targets),
        }

    return collate


def encode_choices(tok, examples, style: str):
    """Per question: prompt ids (with BOS) and the ids of each candidate."""
    out = []
    for ex in examples:
        prompt, cands = prompt_and_candidates(ex, style)
        out.append(([tok.bos_id, *tok.encode(prompt)], [tok.encode(c) for c in cands]))
    return out


def choice_batch(encoded, max_length: int, num_targets: int, num_choices: int, pad_id: int):
    """One packed row per question (``tasks.pack_choices``), stacked."""
    rows = [
        tasks.pack_choices(p, c, max_length, num_targets, num_choices=num_choices, pad_id=pad_id)
        for p, c in encoded
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def prompt_batch(tok, items, max_length: int, style: str) -> np.ndarray:
    """Left-padded prompts ``(B, max_length)`` (generation continues at the right end)."""
    out = np.full((len(items), max_length), tok.pad_id, np.int32)
    for i, ex in enumerate(items):
        ids = [tok.bos_id, *tok.encode(prompt_and_target(ex, style)[0])][-max_length:]
        out[i, max_length - len(ids) :] = ids
    return out


# ---------------------------------------------------------------------------- model


def is_gemma3(model: str) -> bool:
    if model == PACKAGED or model.endswith(".gguf"):
        return True
    config = Path(model) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        return c.get("text_config", c).get("model_type") in ("gemma3", "gemma3_text")
    return False


def build_model(args, mesh):
    if args.model == "tiny":
        model = gemma.tiny_model(
            args.seed, num_embed=ByteTokenizer().vocab_size, num_layers=args.tiny_layers
        )
        return model, ByteTokenizer()
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    if is_gemma3(args.model):
        path = None if args.model == PACKAGED else args.model
        return gemma.load_gemma3(path, dtype=dtype or jnp.float32, mesh=mesh)
    from tunix.models.gemma import model as gm

    config = getattr(gm.ModelConfig, args.gemma_config)()
    model = gemma.load_gemma(args.model, config, mesh=mesh, dtype=dtype)
    return model, find_tokenizer(args.model, args.tokenizer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, targets="auto")
    p.set_defaults(
        model=PACKAGED,
        lr=1e-3,
        warmup=10,
        steps=125,
        batch_size=8,
        max_length=48,
        eval_every=0,
        alpha=16.0,
    )
    p.add_argument(
        "--task", default="openbookqa", help="openbookqa | arc_challenge | boolq | gsm8k"
    )
    p.add_argument(
        "--prompt-style",
        default="auto",
        choices=["auto", "qa", "instruction"],
        help="auto: qa for Gemma 3, instruction otherwise",
    )
    p.add_argument("--gemma-config", default="gemma_2b", help="Gemma v1/v2: tunix ModelConfig")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or sentencepiece model")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length")
    p.add_argument("--test-split", default="test")
    p.add_argument("--tiny-layers", type=int, default=2, help="layers of --model tiny")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument(
        "--compare",
        default=None,
        choices=sorted(OPTIMIZERS),
        help="also train this optimizer (e.g. adamw) from the same start and compare",
    )
    return p


def make_evaluate(args, tok, test, style, mesh, model_config=None):
    chunks = list(tasks.eval_batches(len(test), args.eval_batch_size))[: args.eval_batches or None]
    if test[0].kind == tasks.GENERATION:
        greedy = make_eval_step(
            gemma.make_greedy(args.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id),
            mesh=mesh,
        )

        def evaluate_generation(model) -> dict[str, float]:
            gens, golds = [], []
            for idx, valid in chunks:
                items = [test[int(i)] for i in idx]
                prompt = prompt_batch(tok, items, args.max_length, style)
                out = np.asarray(greedy(model, {"prompt": prompt}))
                for ex, row, ok in zip(items, out, valid):
                    if ok:
                        gens.append(decode_until_eos(tok, row))
                        golds.append(ex.answer)
            return {"gsm8k_accuracy": tasks.gsm8k_accuracy(gens, golds), "eval_examples": len(gens)}

        return evaluate_generation

    used = sorted({int(i) for idx, _ in chunks for i in idx})
    encoded = dict(zip(used, encode_choices(tok, [test[i] for i in used], style)))
    num_choices = max(ex.num_choices for ex in test)
    # Questions sorted by packed length, each batch padded to its own longest row
    # (rounded up to 32 positions / 16 scored tokens): a few compilations, and
    # about a third of the work of padding every row to the longest of the test set.
    size = {i: (len(p) + sum(map(len, c)), sum(map(len, c))) for i, (p, c) in encoded.items()}
    order = sorted(used, key=lambda i: size[i])
    batches = [
        order[k : k + args.eval_batch_size] for k in range(0, len(order), args.eval_batch_size)
    ]
    window = getattr(model_config, "sliding_window_size", None)
    longest = max(n for n, _ in size.values())
    if window is not None and longest > window:
        raise SystemExit(
            f"evaluation rows of {longest} tokens exceed the model's sliding attention window "
            f"({window}): the packed choices would see different context."
        )
    score = make_eval_step(gemma.choice_log_likelihoods, mesh=mesh)

    def evaluate(model) -> dict[str, float]:
        scores, lengths, labels = [], [], []
        for ids in batches:
            length = _round_up(max(size[i][0] for i in ids), 32)
            targets = _round_up(max(size[i][1] for i in ids), 16)
            rows = [encoded[i] for i in ids]
            rows += [rows[0]] * (args.eval_batch_size - len(rows))  # fixed batch size
            batch = choice_batch(rows, length, targets, num_choices, tok.pad_id)
            s, n = (np.asarray(x)[: len(ids)] for x in score(model, batch))
            scores += list(np.where(n > 0, s, -np.inf))
            lengths += list(n)
            labels += [test[i].label for i in ids]
        return {
            "accuracy": tasks.multiple_choice_accuracy(scores, labels),
            "accuracy_norm": tasks.multiple_choice_accuracy(scores, labels, lengths),
            "eval_examples": len(labels),
        }

    return evaluate


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    task = tasks.canonical_task(args.task)
    data_dir = args.data or tasks.packaged_data_dir()
    if args.data is None and task != "openbookqa":
        raise SystemExit(
            f"--data is required for {task!r} (only OpenBookQA ships with the package)"
        )
    train = tasks.load_llm_adapters(data_dir, task, "train")
    test = tasks.load_llm_adapters(data_dir, task, args.test_split)
    if args.max_examples:
        train = train[: args.max_examples]
    mesh = parse_mesh(args.mesh)
    base, tok = build_model(args, mesh)
    gemma3 = args.model != "tiny" and is_gemma3(args.model)
    style = (
        args.prompt_style if args.prompt_style != "auto" else ("qa" if gemma3 else "instruction")
    )
    targets = args.targets if args.targets != "auto" else ("gemma3" if gemma3 else "gemma")
    answer_tokens = max(len(tok.encode(prompt_and_target(ex, style)[1])) for ex in train[:2000])
    num_targets = _round_up(min(answer_tokens + 1, args.max_length - 1))
    collate = make_train_collate(tok, args.max_length, num_targets, style)
    sample = collate(train[:1])

    def lora_model():
        return apply_lora(
            base,
            targets=targets,
            rank=args.rank,
            alpha=args.alpha,
            scale=args.scale,
            rngs=nnx.Rngs(args.seed + 1),
            model_inputs=gemma.causal_inputs(sample["tokens"], tok.pad_id),
        )

    evaluate = make_evaluate(args, tok, test, style, mesh, getattr(base, "config", None))
    rules = []
    if mesh is not None and "model" in mesh.shape:
        rules = [
            (r".*/attn/(q_einsum|attn_vec_einsum)/w", jax.P("model", None, None)),
            (r".*/mlp/(gate_proj|up_proj)/kernel", jax.P(None, "model")),
            (r".*/mlp/down_proj/kernel", jax.P("model", None)),
        ]
    header = {
        "task": f"{task} ({test[0].kind}, {style} prompts)",
        "model": args.model,
        "LoRA targets": targets,
        "train / test": f"{len(train)} / {len(test)}",
    }

    def run(optimizer: str, *, eval_at_start: bool, ckpt: bool) -> dict:
        run_args = argparse.Namespace(**vars(args))
        run_args.optimizer = optimizer
        if not ckpt:
            run_args.ckpt_dir, run_args.resume = None, False
        data = tasks.DataIterator(train, args.batch_size, seed=args.seed, collate=collate)
        return train_loop(
            run_args,
            model=lora_model(),
            loss_fn=gemma.answer_loss,
            data=data,
            evaluate=evaluate,
            mesh=mesh,
            shard_rules=rules,
            header=header,
            eval_at_start=eval_at_start,
            pad_id=tok.pad_id,
        )

    out = run(args.optimizer, eval_at_start=True, ckpt=True)
    if args.compare:
        zero_shot = [r for r in out["rows"] if r["kind"] == "eval" and r["step"] == 0]
        other = run(args.compare, eval_at_start=False, ckpt=False)
        out["compare"] = other
        print_comparison(args, zero_shot, out, other)
    return out


def print_comparison(args, zero_shot, main_run, other) -> None:
    def last_loss(run):
        train = [r for r in run["rows"] if r["kind"] == "train"]
        return train[-1]["loss"] if train else float("nan")

    lines = [
        "",
        f"{'optimizer':<14}{'final loss':>12}"
        + "".join(f"{k:>16}" for k in main_run["final_eval"] if "accuracy" in k),
    ]
    if zero_shot:
        z = zero_shot[0]
        lines.append(
            f"{'zero-shot':<14}{'':>12}"
            + "".join(f"{z[k]:>16.4f}" for k in main_run["final_eval"] if "accuracy" in k)
        )
    for name, run in ((args.optimizer, main_run), (args.compare, other)):
        lines.append(
            f"{name:<14}{last_loss(run):>12.4f}"
            + "".join(f"{v:>16.4f}" for k, v in run["final_eval"].items() if "accuracy" in k)
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
