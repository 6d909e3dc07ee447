"""Optimizer overhead on the LoRA tree of Gemma-2B: update time, state bytes, compile time.

The tree is what qwix-style LoRA on Gemma-2B's attention einsums gives (rank r):

* 18 layers, each with LoRA on the q, k, v and output projections;
* d_model 2048, 8 query heads of dimension 256, and ONE key/value head (Gemma-2B uses
  multi-query attention: ``num_kv_heads = 1``; Gemma-7B has 16);
* q: ``A (2048, r)``, ``B (r, 8, 256)``; k, v: ``A (2048, r)``, ``B (r, 1, 256)``;
  o: ``A (8, 256, r)``, ``B (r, 2048)`` — the layer-per-module layout of gemma/flax
  (no stacked-layer axis), so 72 pairs.

For every optimizer of the registry the jitted step ``params, state -> apply_updates(params,
update(grads, state, params))`` is compiled with the params and state donated, then
all optimizers are run interleaved (round-robin, order rotated each round), so the
load of a shared machine falls on all of them alike; times are medians over the
rounds after warm-up. Compile time is the median of ``lower().compile()`` of fresh
functions.

Adding an optimizer is one line in ``REGISTRY``. Usage::

  python benchmarks/optimizer_overhead.py --ranks 4 16 64 --repeats 30 \\
      --out benchmarks/results/optimizer_overhead_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_optax as lox

LR = 1e-4
BASELINE = "adamw"

# name -> factory of the transformation. One line per optimizer.
REGISTRY: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(LR),
    "lora_rite": lambda: lox.lora_rite(LR),
    "lora_rite_unstacked": lambda: lox.lora_rite(LR, stack_pairs=False),
    "lora_rite_qr": lambda: lox.lora_rite(LR, basis="qr"),
    "scaled_adamw": lambda: lox.scaled_adamw(LR),
    "lora_plus": lambda: lox.lora_plus(LR),
}
DEFAULT_OPTIMIZERS = ["adamw", "lora_rite", "scaled_adamw", "lora_plus"]

# Gemma-2B (gemma/flax config "gemma_2b"): attention geometry.
GEMMA_2B = dict(num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1, head_dim=256)


def gemma_lora_tree(rank: int, dtype=jnp.float32, seed: int = 0, cfg=GEMMA_2B) -> dict:
    """LoRA params of Gemma-2B's attention (qwix names and shapes), B ≠ 0 (mid-training)."""
    rng = np.random.default_rng(seed)
    d, h, k, hd = cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    shapes = {
        "q_einsum": ((d, rank), (rank, h, hd)),
        "k_einsum": ((d, rank), (rank, k, hd)),
        "v_einsum": ((d, rank), (rank, k, hd)),
        "attn_vec_einsum": ((h, hd, rank), (rank, d)),
    }
    tree = {}
    for layer in range(cfg["num_layers"]):
        attn = {}
        for name, (a_shape, b_shape) in shapes.items():
            m = int(np.prod(a_shape[:-1]))
            attn[name] = {
                "w_lora_a": jnp.asarray(rng.normal(size=a_shape) / np.sqrt(m), dtype),
                "w_lora_b": jnp.asarray(rng.normal(size=b_shape) * 1e-3, dtype),
            }
        tree[f"layer_{layer}"] = {"attn": attn}
    return tree


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def bench_rank(rank: int, names: list[str], repeats: int, warmup: int, compile_repeats: int):
    params = gemma_lora_tree(rank)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-3, x.dtype), params)
    runs = {}
    for name in names:
        tx = REGISTRY[name]()
        state = tx.init(params)
        compile_times = []
        for _ in range(compile_repeats):
            fresh = jax.jit(_make_step(tx), donate_argnums=(0, 1))  # new function: no cache hit
            t0 = time.perf_counter()
            compiled = fresh.lower(params, state, grads).compile()
            compile_times.append(time.perf_counter() - t0)
        runs[name] = {
            "step": compiled,
            "params": _copy(params),
            "state": _copy(state),
            "state_bytes": _tree_bytes(state),
            "compile_s": statistics.median(compile_times),
            "times": [],
        }
    for i in range(warmup + repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            run = runs[name]
            t0 = time.perf_counter()
            run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
            jax.block_until_ready((run["params"], run["state"]))
            if i >= warmup:
                run["times"].append(time.perf_counter() - t0)
    results = {}
    for name, run in runs.items():
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run["params"]))
        results[name] = {
            "update_ms": 1e3 * statistics.median(run["times"]),
            "update_min_ms": 1e3 * min(run["times"]),
            "state_bytes": run["state_bytes"],
            "compile_s": run["compile_s"],
            "finite": finite,
        }
    return results, _tree_bytes(params), len(jax.tree.leaves(params)) // 2


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def to_markdown(all_results, args, load_before, load_after) -> str:
    lines = [
        "# Optimizer overhead on the Gemma-2B LoRA tree (CPU)",
        "",
        f"- Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"- Hardware: {_cpu_model()}, {os.cpu_count()} cores visible to the process; "
        f"jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}.",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. The machine "
        "is SHARED with other developers' test runs: optimizers are run interleaved "
        "(round-robin, order rotated each round) and medians are reported, but absolute "
        "times and, to a lesser degree, ratios are noisy.",
        "- Tree: 18 layers × LoRA on q (A 2048×r, B r×8×256), k and v (A 2048×r, "
        "B r×1×256; Gemma-2B is multi-query, 1 KV head), o (A 8×256×r, B r×2048): "
        "72 pairs, float32. Step = jitted `update` + `apply_updates`, params and state "
        f"donated. {args.warmup} warm-up rounds, {args.repeats} timed rounds; compile time "
        f"= median of {args.compile_repeats} `lower().compile()`.",
        "",
    ]
    for rank, (results, param_bytes, n_pairs) in all_results.items():
        base = results.get(BASELINE)
        lines += [
            f"## rank {rank} ({n_pairs} pairs, {param_bytes / 2**20:.1f} MiB of LoRA params)",
            "",
            "| optimizer | update (ms, median) | min (ms) | × adamw | state (MiB) | × adamw "
            "| compile (s) | × adamw |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in results.items():

            def ratio(key, r=r, base=base):
                return f"{r[key] / base[key]:.2f}" if base else "–"

            flag = "" if r["finite"] else " (NON-FINITE)"
            lines.append(
                f"| {name}{flag} | {r['update_ms']:.2f} | {r['update_min_ms']:.2f} | "
                f"{ratio('update_ms')} | {r['state_bytes'] / 2**20:.2f} | "
                f"{ratio('state_bytes')} | {r['compile_s']:.2f} | {ratio('compile_s')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        help=f"names from the registry: {', '.join(REGISTRY)}",
    )
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    unknown = [n for n in args.optimizers if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {list(REGISTRY)}")
    names = list(args.optimizers)
    if BASELINE not in names:
        names = [BASELINE] + names
    load_before = _load()
    all_results = {}
    for rank in args.ranks:
        all_results[rank] = bench_rank(rank, names, args.repeats, args.warmup, args.compile_repeats)
        print(to_markdown({rank: all_results[rank]}, args, load_before, _load()), flush=True)
    text = to_markdown(all_results, args, load_before, _load())
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
