"""Shared command line and training loop of the ``examples/finetune_*.py`` scripts.

Every example builds a model and a loss, then calls :func:`train_loop`, which gives
them the same flags (:func:`add_common_args`), optimizers (:func:`make_optimizer`:
the registry :data:`lora_optax.OPTIMIZERS`), learning-rate schedule (linear
warm-up then linear decay, as in LoRA-RITE A.1), device mesh, orbax checkpoints with
resume (data cursor included), periodic evaluation, a tqdm progress bar with loss
and throughput, JSON-lines metrics and a final summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

import lora_optax
from lora_optax.flax.lora import pair_spec
from lora_optax.flax.train import make_mesh, make_train_step, shard_model

__all__ = [
    "FULL_GRAD_OPTIMIZERS",
    "add_common_args",
    "make_optimizer",
    "make_schedule",
    "parse_mesh",
    "train_loop",
]


# The registry of lora_optax (every optimizer of the library plus AdamW, Lamb and SGD).
OPTIMIZERS = lora_optax.OPTIMIZERS
FULL_GRAD_OPTIMIZERS = frozenset(n for n, spec in OPTIMIZERS.items() if spec.needs_full_grads)
# Flags that set a hyperparameter of every optimizer that has it: kwarg -> flag attribute.
_HYPERPARAMETER_FLAGS = {
    "b1": "b1",
    "b2": "b2",
    "weight_decay": "weight_decay",
    "ratio": "lora_plus_ratio",
}


def make_schedule(
    lr: float, steps: int, warmup: int = 0, kind: str = "linear"
) -> optax.Schedule | float:
    """Warm-up from 0 to ``lr`` over ``warmup`` steps, then ``kind`` decay to 0."""
    if kind == "constant":
        decay: Any = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(steps - warmup, 1))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(steps - warmup, 1))
    else:
        raise ValueError(f"Unknown schedule {kind!r} (linear, cosine, constant).")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(
    name: str, learning_rate: Any, pairs: Any, args: argparse.Namespace
) -> optax.GradientTransformation:
    """The optimizer ``name`` of the registry (:data:`lora_optax.OPTIMIZERS`) with
    gradient clipping.

    ``--b1``, ``--b2``, ``--weight-decay`` and ``--lora-plus-ratio`` set the
    hyperparameters of that name for every optimizer that has them (the registry's
    ``defaults``); the LoRA methods get the model's ``pairs``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}.")
    spec = OPTIMIZERS[name]
    kwargs = {
        k: getattr(args, flag) for k, flag in _HYPERPARAMETER_FLAGS.items() if k in spec.defaults
    }
    if spec.lora:
        kwargs["pairs"] = pairs
    tx = lora_optax.get_optimizer(name, learning_rate, **kwargs)
    if args.clip_norm and args.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.clip_norm), tx)
    return tx


def parse_mesh(text: str | None) -> Any:
    """``"data=4,model=2"`` -> an Auto mesh (``None``: no mesh)."""
    if not text:
        return None
    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        shape[name.strip()] = int(size)
    return make_mesh(shape)


def parse_scale(text: str) -> float | str:
    """``--scale``: a number, or a convention name understood by ``apply_lora``."""
    try:
        return float(text)
    except ValueError:
        return text


def add_common_args(p: argparse.ArgumentParser, *, targets: str = "qkvo") -> None:
    """The flags every example shares (paper defaults from LoRA-RITE A.1)."""
    p.add_argument("--model", default="tiny", help="'tiny' (random) or a checkpoint path")
    p.add_argument("--data", default=None, help="data folder (e.g. shared/data/llm_adapters)")
    p.add_argument("--optimizer", default="lora_rite", choices=sorted(OPTIMIZERS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--scale",
        type=parse_scale,
        default="alpha/r",
        help="alpha/r | alpha/sqrt(r) | 1 | <number>",
    )
    p.add_argument("--targets", default=targets, help="preset name or regex over module paths")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=0.0)
    p.add_argument("--lora-plus-ratio", type=float, default=4.0)
    p.add_argument("--lora-one-init", action="store_true", help="LoRA-One spectral init")
    p.add_argument("--mesh", default=None, help="e.g. data=4,model=2 (default: no mesh)")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=0, help="0: the whole eval set")
    p.add_argument("--metrics", default=None, help="JSON-lines metrics file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-examples", type=int, default=0, help="cap on train examples")
    p.add_argument("--no-progress", action="store_true")


class _Metrics:
    def __init__(self, path: str | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, row: dict[str, Any]) -> None:
        row = {
            k: (float(v) if isinstance(v, (np.generic, jax.Array)) else v) for k, v in row.items()
        }
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _summary(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    lines = ["", "=" * 60, "summary"]
    for k, v in header.items():
        lines.append(f"  {k:<22} {v}")
    if train:
        lines.append(
            f"  {'first / last loss':<22} {train[0]['loss']:.4f} / {train[-1]['loss']:.4f}"
        )
        sps = [r["steps_per_s"] for r in train if r.get("steps_per_s")]
        if sps:
            lines.append(f"  {'steps/s (median)':<22} {np.median(sps):.3f}")
    if evals:
        keys = [k for k in evals[-1] if k not in ("kind", "step", "time")]
        lines.append(f"  {'eval step':<10}" + "".join(f"{k:>14}" for k in keys))
        for r in evals:
            lines.append(
                f"  {r['step']:<10}"
                + "".join(
                    f"{r[k]:>14.4f}" if isinstance(r.get(k), float) else f"{r.get(k)!s:>14}"
                    for k in keys
                )
            )
    lines.append("=" * 60)
    return "\n".join(lines)


def _real_tokens(batch: Any, pad_id: int | None) -> int | None:
    if pad_id is None or not isinstance(batch, dict) or "tokens" not in batch:
        return None
    return int((np.asarray(batch["tokens"]) != pad_id).sum())


def train_loop(
    args: argparse.Namespace,
    *,
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], Any],
    data: Any,
    evaluate: Callable[[nnx.Module], dict[str, float]] | None = None,
    mesh: Any = None,
    shard_rules: Any = (),
    has_aux: bool = False,
    header: dict[str, Any] | None = None,
    eval_at_start: bool = False,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """Trains the LoRA factors of ``model`` for ``args.steps`` steps.

    Args:
      args: parsed :func:`add_common_args` flags.
      model: the model with LoRA applied.
      loss_fn: ``loss_fn(model, batch) -> loss`` (calls ``model(...)``).
      data: a ``lora_optax.tasks.DataIterator`` (anything with ``__next__``,
        ``state()`` and ``restore()``) of training batches.
      evaluate: ``evaluate(model) -> {metric: value}``, run every
        ``args.eval_every`` steps and at the end.
      mesh: device mesh (base weights placed with ``shard_rules``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      header: extra lines for the summary table.
      eval_at_start: evaluate before the first step too (zero-shot), unless resuming.
      pad_id: with ``batch["tokens"]``, the padding id: the progress bar and metrics
        then report real tokens per second (``tok_s``).

    Returns:
      ``{"rows": all metric rows, "final_eval": last eval dict, "model": model}``.
    """
    if mesh is not None:
        shard_model(model, mesh, shard_rules)
    schedule = make_schedule(args.lr, args.steps, args.warmup, args.schedule)
    if args.lora_one_init or (args.optimizer == "lora_one" and args.lora_one_init):
        from lora_optax.flax.train import lora_one_init

        probe = [next(data) for _ in range(4)]
        lora_one_init(model, loss_fn, probe, has_aux=has_aux, mesh=mesh)
        data.restore(0)
    tx = make_optimizer(args.optimizer, schedule, pair_spec(model), args)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    full = args.optimizer in FULL_GRAD_OPTIMIZERS
    # share_grads: a second run in the same process (another optimizer, e.g. the
    # examples' --compare) reuses the compiled forward + backward pass.
    step_fn = make_train_step(
        loss_fn, has_aux=has_aux, full_grads=full, mesh=mesh, share_grads=True
    )
    metrics = _Metrics(args.metrics)
    ckpt = None
    start = 0
    if args.ckpt_dir:
        from lora_optax.flax.checkpoint import LoRACheckpointer

        ckpt = LoRACheckpointer(args.ckpt_dir)
        if args.resume and ckpt.latest_step() is not None:
            meta = ckpt.restore(model, optimizer)
            start = int(meta["step"])
            data.restore(meta["data"])
            print(f"resumed from step {start} (data cursor {meta['data']})", file=sys.stderr)
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    head = {
        "optimizer": args.optimizer,
        "rank / alpha / scale": f"{args.rank} / {args.alpha} / {args.scale}",
        "lr / schedule": f"{args.lr} / {args.schedule} (warmup {args.warmup})",
        "steps x batch": f"{args.steps} x {args.batch_size}",
        "LoRA params": n_lora,
        "devices": len(jax.devices()) if mesh is None else dict(mesh.shape),
        **(header or {}),
    }
    bar: Any = range(start, args.steps)
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, initial=start, total=args.steps, dynamic_ncols=True, file=sys.stderr)
    final_eval: dict[str, Any] = {}

    def run_eval(step: int) -> None:
        nonlocal final_eval
        if evaluate is None:
            return
        t = time.perf_counter()
        final_eval = {k: float(v) for k, v in evaluate(model).items()}
        metrics.log(
            {"kind": "eval", "step": step, **final_eval, "time": round(time.perf_counter() - t, 3)}
        )
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items() if "accuracy" in k)
        if shown:
            when = "zero-shot (before training)" if step == 0 else f"after step {step}"
            print(f"{args.optimizer} {when}: {shown}", file=sys.stderr, flush=True)

    if eval_at_start and start == 0:
        run_eval(0)

    last = time.perf_counter()
    step = start
    examples_per_step = args.batch_size
    for step in bar:
        batch = next(data)
        loss, _ = step_fn(model, optimizer, batch)
        done = step + 1
        loss_v = float(loss)
        now = time.perf_counter()
        dt, last = now - last, now
        lr = float(schedule(step)) if callable(schedule) else float(schedule)
        tokens = _real_tokens(batch, pad_id)
        row = {
            "kind": "train",
            "step": done,
            "loss": loss_v,
            "lr": lr,
            "steps_per_s": 1.0 / dt if dt > 0 else None,
            "examples_per_s": examples_per_step / dt if dt > 0 else None,
        }
        if tokens is not None:
            row["tokens_per_s"] = tokens / dt if dt > 0 else None
        metrics.log(row)
        if not args.no_progress:
            speed = {"tok_s": f"{tokens / dt:.0f}"} if tokens is not None else {}
            bar.set_postfix(
                loss=f"{loss_v:.4f}",
                lr=f"{lr:.2e}",
                ex_s=f"{examples_per_step / dt:.1f}",
                **speed,
            )
        if not math.isfinite(loss_v):
            print(f"non-finite loss at step {done}; stopping", file=sys.stderr)
            break
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            run_eval(done)
        if ckpt and args.ckpt_every and done % args.ckpt_every == 0:
            ckpt.save(done, model, optimizer, data=data.state())
    else:
        step = args.steps - 1
    if ckpt:
        final = min(step + 1, args.steps)
        if ckpt.latest_step() != final:
            ckpt.save(final, model, optimizer, data=data.state())
        ckpt.close()
    run_eval(min(step + 1, args.steps))
    print(_summary(metrics.rows, head))
    return {"rows": metrics.rows, "final_eval": final_eval, "model": model}
