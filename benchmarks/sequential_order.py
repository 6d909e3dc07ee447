"""The two update orders of the Riemannian family on a real fine-tune.

``sequential=False`` (simultaneous: both gradients preconditioned with the pre-step
factors, the library's default) against ``sequential=True`` (the order of the authors'
own loops: ``B`` preconditioned with the already-updated ``A``), for scaled AdamW and
LoRA-One (with its spectral initialisation), on the pretrained all-MiniLM-L6-v2 encoder
with LoRA on q/k/v/o, OpenBookQA (the harness of ``benchmarks/reproduce_lora_rite.py``:
same data, model, schedule and compiled steps). Every (optimizer, seed) runs both orders
from the same initialisation and batch order; reported: the final training loss (mean
of the last 20 steps), test accuracy, and how far apart the two orders' trained factors
end, ``‖θ_seq − θ_sim‖ / ‖θ_sim − θ₀‖`` over the LoRA factors and the head.

    python benchmarks/sequential_order.py --data ../shared/data/llm_adapters \\
        --steps 300 --out benchmarks/results/sequential_order.md
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce_lora_rite as rr

import lora_optax as lox

# name -> (factory, peak learning rate: the one reproduce_lora_rite.py picked on OBQA r16)
OPTIMIZERS = {
    "scaled_adamw": (lox.scaled_adamw, 8e-3, False),
    "lora_one": (lox.lora_one, 2e-3, True),
}


def _rel_gap(seq, sim, init) -> float:
    diff = sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(seq), jax.tree.leaves(sim))
    )
    move = sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(sim), jax.tree.leaves(init))
    )
    return float(np.sqrt(diff / move))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=rr.DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-layers", type=int, default=2)
    p.add_argument("--seeds", default="0")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cfg = rr.Config(
        combos=(("openbookqa", args.rank),),
        seeds=seeds,
        steps=args.steps,
        lora_layers=args.lora_layers,
        weight_decay=args.weight_decay,
    )
    t_start = time.perf_counter()
    data = rr.load_task_data(args.data, "openbookqa", cfg, rr.load_tokenizer())
    bundle = rr.build_model(args.rank, cfg.alpha, seeds[0], cfg.lora_layers)
    runner = rr.Runner(cfg)
    runner._inits[(args.rank, seeds[0])] = bundle.trainable
    if cfg.lora_layers < rr.NUM_LAYERS:
        rr.cache_bottom_layers(bundle, data, cfg.eval_batch_size)
    rows, loads = [], []
    for name, (factory, lr, spectral) in OPTIMIZERS.items():
        for seed in seeds:
            out = {}
            for seq in (False, True):
                opt = rr.OptSpec(
                    f"{name}{'_sequential' if seq else ''}",
                    name,
                    functools.partial(factory, weight_decay=args.weight_decay, sequential=seq),
                    spectral_init=spectral,
                )
                result, trained = rr.train_and_eval(
                    runner,
                    bundle,
                    opt,
                    data,
                    rank=args.rank,
                    lr=lr,
                    seed=seed,
                    eval_val=False,
                    eval_test=True,
                )
                loads.append(os.getloadavg()[0])
                out[seq] = (result, trained)
                print(
                    f"{opt.name} seed {seed}: final loss {np.mean(result.losses[-20:]):.4f} "
                    f"test {result.test_acc:.1f}% ({result.train_s:.0f}s)",
                    flush=True,
                )
            init = runner.init_trainable(args.rank, seed)
            if spectral:  # both orders start from the same spectral initialisation
                init = None
            rows.append((name, lr, seed, out, init))
    wall = time.perf_counter() - t_start
    lines = [
        "# Simultaneous vs sequential update order on a real fine-tune",
        "",
        f"Command: `python benchmarks/sequential_order.py {' '.join(sys.argv[1:])}`  ",
        f"Hardware: {rr.hardware()}.  ",
        f"Wall time {wall / 60:.1f} min; 1-min load average after each run "
        f"{min(loads):.1f}–{max(loads):.1f} on 2 shared cores.  ",
        f"Task: OpenBookQA, all-MiniLM-L6-v2, LoRA rank {args.rank} on q/k/v/o of the top "
        f"{args.lora_layers} layers + a trained linear head; {args.steps} steps, batch "
        f"{cfg.batch_size}, linear warm-up ({cfg.warmup_for('openbookqa')} steps) and decay, "
        f"weight decay {args.weight_decay}; test subset of {cfg.test_subset}.",
        "",
        "| optimizer | peak lr | seed | final train loss, simultaneous | sequential | "
        "test acc (%), simultaneous | sequential | ‖θ_seq − θ_sim‖ / ‖θ_sim − θ₀‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, lr, seed, out, init in rows:
        (r0, t0), (r1, t1) = out[False], out[True]
        gap = "–" if init is None else f"{_rel_gap(t1, t0, init):.3f}"
        lines.append(
            f"| {name} | {lr:g} | {seed} | {np.mean(r0.losses[-20:]):.4f} | "
            f"{np.mean(r1.losses[-20:]):.4f} | {r0.test_acc:.1f} | {r1.test_acc:.1f} | {gap} |"
        )
    lines += [
        "",
        "Final train loss: mean over the last 20 steps. LoRA-One starts from its spectral "
        "initialisation (the same for both orders); its parameter gap is not reported "
        "(the initial point is not kept).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
