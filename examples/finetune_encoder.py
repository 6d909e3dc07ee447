"""LoRA fine-tuning of a BERT/MiniLM encoder: multiple choice (ARC, OpenBookQA) or BoolQ.

Tiny random encoder and synthetic data (seconds on CPU)::

    python examples/finetune_encoder.py --steps 20 --batch-size 8 --rank 4 --alpha 4

A real MiniLM checkpoint (folder with model.safetensors, config.json, tokenizer.json)
on the LLM-Adapters data::

    python examples/finetune_encoder.py --model /path/to/all-MiniLM-L6-v2 \\
        --data ../shared/data/llm_adapters --task arc_challenge --optimizer lora_rite \\
        --lr 1e-3 --steps 2000 --batch-size 16 --mesh data=8 --ckpt-dir /tmp/run --resume

LoRA goes on the attention projections ``query/key/value/output`` (paper: q/k/v/o);
the classification head stays frozen too unless ``--train-head`` (then it is trained
with the same optimizer as a non-LoRA leaf).
"""

from __future__ import annotations

import argparse
import hashlib
import random
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
from lora_optax.models import bert


class HashTokenizer:
    """Word-hash tokenizer for the tiny random model (no vocabulary file needed)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def ids(self, text: str) -> list[int]:
        out = []
        for w in text.lower().split():
            h = int(hashlib.md5(w.encode()).hexdigest()[:8], 16)
            out.append(3 + h % (self.vocab_size - 3))
        return out


def encode(tok, max_length: int, text: str, pair: str | None = None):
    """(ids, mask, type_ids) padded to ``max_length``."""
    if isinstance(tok, HashTokenizer):
        a = [1, *tok.ids(text), 2]
        b = [*tok.ids(pair), 2] if pair is not None else []
        ids = (a + b)[:max_length]
        types = ([0] * len(a) + [1] * len(b))[:max_length]
    else:
        enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
        ids, types = enc.ids[:max_length], enc.type_ids[:max_length]
    n = len(ids)
    pad = max_length - n
    return ids + [0] * pad, [1] * n + [0] * pad, types + [0] * pad


def synthetic_examples(n: int, seed: int, kind: str) -> list[tasks.Example]:
    """A learnable toy task: the right choice repeats a word of the question."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    out = []
    for i in range(n):
        q = rng.sample(words, 4)
        if kind == tasks.CLASSIFICATION:
            label = rng.randrange(2)
            passage = " ".join(q[:2] if label else rng.sample(words, 2))
            out.append(
                tasks.Example(
                    kind=kind,
                    task="boolq",
                    question=" ".join(q[:2]),
                    choices=("false", "true"),
                    label=label,
                    context=passage,
                    uid=f"syn-{i}",
                )
            )
        else:
            label = rng.randrange(4)
            choices = [" ".join(rng.sample(words, 2)) for _ in range(4)]
            choices[label] = f"{q[0]} {rng.choice(words)}"
            out.append(
                tasks.Example(
                    kind=kind,
                    task="arc_challenge",
                    question=" ".join(q),
                    choices=tuple(choices),
                    label=label,
                    uid=f"syn-{i}",
                )
            )
    return out


def make_collate(tok, max_length: int, kind: str, num_choices: int):
    def collate(items: list[tasks.Example]) -> dict[str, np.ndarray]:
        ids, mask, types, labels, cmask = [], [], [], [], []
        for ex in items:
            if kind == tasks.CLASSIFICATION:
                text = f"{ex.context}\n{ex.question}" if ex.context else ex.question
                i, m, t = encode(tok, max_length, text)
                ids.append(i), mask.append(m), types.append(t)
            else:
                text, choices = tasks.format_encoder_multiple_choice(ex)
                row = [encode(tok, max_length, text, c) for c in choices[:num_choices]]
                valid = [1] * len(row) + [0] * (num_choices - len(row))
                row += [row[0]] * (num_choices - len(row))
                ids.append([r[0] for r in row])
                mask.append([r[1] for r in row])
                types.append([r[2] for r in row])
                cmask.append(valid)
            labels.append(max(ex.label, 0))
        batch = {
            "input_ids": np.asarray(ids, np.int32),
            "attention_mask": np.asarray(mask, np.int32),
            "token_type_ids": np.asarray(types, np.int32),
            "labels": np.asarray(labels, np.int32),
        }
        if cmask:
            batch["choice_mask"] = np.asarray(cmask, bool)
        return batch

    return collate


def logits_of(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if "choice_mask" in batch:
        logits = jnp.where(batch["choice_mask"], logits, jnp.finfo(logits.dtype).min)
    return logits


def loss_fn(model, batch):
    logits = logits_of(model, batch).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, targets="bert")
    p.add_argument(
        "--task",
        default="arc_challenge",
        help="arc_challenge | openbookqa | boolq (LLM-Adapters names)",
    )
    p.add_argument("--num-choices", type=int, default=4)
    p.add_argument("--train-head", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    task = tasks.canonical_task(args.task)
    kind = tasks.CLASSIFICATION if task == "boolq" else tasks.MULTIPLE_CHOICE
    # model + tokenizer
    rngs = nnx.Rngs(args.seed)
    if args.model == "tiny":
        cfg = bert.BertConfig.tiny(max_position_embeddings=max(64, args.max_length))
        encoder = bert.BertEncoder(cfg, rngs=rngs)
        tok: object = HashTokenizer(cfg.vocab_size)
    else:
        encoder = bert.load_bert_safetensors(args.model)
        cfg = encoder.config if hasattr(encoder, "config") else None
        tok = bert.load_bert_tokenizer(Path(args.model) / "tokenizer.json", args.max_length)
        tok.no_padding()
    config = cfg if cfg is not None else bert.BertConfig()
    if kind == tasks.CLASSIFICATION:
        model = bert.BertForSequenceClassification(config, 2, rngs=rngs, encoder=encoder)
    else:
        model = bert.BertForMultipleChoice(config, rngs=rngs, encoder=encoder)
    model = apply_lora(
        model,
        targets=args.targets,
        rank=args.rank,
        alpha=args.alpha,
        scale=args.scale,
        rngs=nnx.Rngs(args.seed + 1),
    )
    if args.train_head:  # make the head trainable alongside the LoRA factors
        model.classifier.kernel = nnx.LoRAParam(model.classifier.kernel[...])
    # data
    if args.data:
        train = tasks.load_llm_adapters(args.data, task, "train")
        test = tasks.load_llm_adapters(args.data, task, "test")
    else:
        train = synthetic_examples(512, args.seed, kind)
        test = synthetic_examples(64, args.seed + 1, kind)
    if args.max_examples:
        train = train[: args.max_examples]
    collate = make_collate(tok, args.max_length, kind, args.num_choices)
    data = tasks.DataIterator(train, args.batch_size, seed=args.seed, collate=collate)
    mesh = parse_mesh(args.mesh)
    from lora_optax.flax.train import make_eval_step

    predict = make_eval_step(lambda m, b: jnp.argmax(logits_of(m, b), -1), mesh=mesh)

    def evaluate(model) -> dict[str, float]:
        correct = total = 0
        for n, (idx, valid) in enumerate(tasks.eval_batches(len(test), args.batch_size)):
            if args.eval_batches and n >= args.eval_batches:
                break
            batch = collate([test[int(i)] for i in idx])
            pred = np.asarray(predict(model, batch))
            correct += int(((pred == batch["labels"]) & valid).sum())
            total += int(valid.sum())
        return {"accuracy": correct / max(total, 1), "eval_examples": total}

    rules = [
        (r".*/(query|key|value)/base_module/kernel", jax.P(None, "model")),
        (r".*/output/base_module/kernel", jax.P("model", None)),
    ]
    if mesh is None or "model" not in mesh.shape:
        rules = []
    return train_loop(
        args,
        model=model,
        loss_fn=loss_fn,
        data=data,
        evaluate=evaluate,
        mesh=mesh,
        shard_rules=rules,
        header={
            "task": f"{task} ({kind})",
            "model": args.model,
            "train / test": f"{len(train)} / {len(test)}",
        },
    )


if __name__ == "__main__":
    main()
