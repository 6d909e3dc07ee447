"""Optimizer overhead on Gemma-2B LoRA: update time, state bytes, compile time, train steps.

Two modes, each writing one markdown file.

**Update only** (default). The tree is what qwix-style LoRA on Gemma-2B's attention
einsums gives (rank r):

* 18 layers, each with LoRA on the q, k, v and output projections;
* d_model 2048, 8 query heads of dimension 256, and ONE key/value head (Gemma-2B uses
  multi-query attention: ``num_kv_heads = 1``; Gemma-7B has 16);
* q: ``A (2048, r)``, ``B (r, 8, 256)``; k, v: ``A (2048, r)``, ``B (r, 1, 256)``;
  o: ``A (8, 256, r)``, ``B (r, 2048)`` — the layer-per-module layout of gemma/flax
  (no stacked-layer axis), so 72 pairs.

For every optimizer the jitted step ``params, state -> apply_updates(params,
update(grads, state, params))`` is compiled with the params and state donated, then
all optimizers are run interleaved (round-robin, order rotated each round), so the
load of a shared machine falls on all of them alike; times are medians over the
rounds after warm-up. Compile time is the median of ``lower().compile()`` of fresh
functions. SoLoRA also reads the full-weight gradient ``G`` of every pair
(``full_grads=``): a random tree of the base weights' shapes is passed (not donated;
its size is reported separately, it is not optimizer state).

**Train step** (``--train-step``). A google-tunix Gemma (``ModelConfig.gemma_2b()``
widths: d_model 2048, 8 heads × 256, 1 KV head, MLP 16384) with fewer layers and a
smaller vocabulary, qwix LoRA on q / kv / o (tunix fuses k and v in one einsum, so
one pair per layer covers both), timed through :func:`lora_optax.flax.make_train_step`
(forward + backward + update, jitted, state donated; SoLoRA gets ``G`` from the same
backward pass). One model per optimizer sharing the frozen weights, run interleaved.
The update-only times of the same LoRA tree are measured in the same process.

Every optimizer of the registry (:data:`lora_optax.OPTIMIZERS`) is benchmarked, plus
the variants in ``VARIANTS``. Usage::

  python benchmarks/optimizer_overhead.py --ranks 4 16 64 --repeats 30 \\
      --out benchmarks/results/optimizer_overhead_cpu.md
  python benchmarks/optimizer_overhead.py --train-step --layers 2 --batch 2 --seq 128 \\
      --repeats 15 --out benchmarks/results/optimizer_train_step_cpu.md
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (QR, eigh, Cholesky) call scipy's OpenBLAS from the threads
# of XLA's pool; OpenBLAS's own threads on top oversubscribe the cores (on 2 cores a
# batched QR of 72 × 2048×16 took 200–650 ms with them, 30–40 ms without), so
# single-threaded unless the environment says otherwise. Must precede numpy / scipy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_optax as lox

LR = 1e-4
BASELINE = "adamw"

# Variants of registry optimizers benchmarked next to them: name -> (registry name,
# hyperparameters). Every other name is a key of lora_optax.OPTIMIZERS.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_rite_unstacked": ("lora_rite", {"stack_pairs": False}),
    "lora_rite_qr": ("lora_rite", {"basis": "qr"}),
}
NAMES = [*lox.OPTIMIZERS, *VARIANTS]


def _spec(name: str) -> lox.OptimizerSpec:
    return lox.OPTIMIZERS[VARIANTS[name][0] if name in VARIANTS else name]


def make_optimizer(name: str, pairs: Any) -> optax.GradientTransformation:
    """``name`` (registry or variant) with library defaults apart from the learning rate.

    ``pairs`` is None for the update-only tree (found by name) and the model's pair spec
    (with its LoRA scale) for the train step.
    """
    registry_name, hyper = VARIANTS.get(name, (name, {}))
    if _spec(name).lora:
        hyper = {**hyper, "pairs": pairs}
    return lox.get_optimizer(registry_name, LR, **hyper)


def needs_full_grads(name: str) -> bool:
    """The update reads ``full_grads=`` (the full-weight gradient G), per the registry."""
    return _spec(name).needs_full_grads


def own_base(name: str) -> str:
    """The baseline an optimizer is also compared with (column "× own base"): plain SGD
    for the SGD-type ones, AdamW otherwise."""
    return "sgd" if _spec(name).base == "sgd" else BASELINE


# lora_rite_qr only on request: with jaxlib 0.10.2 its update on the 18-layer tree never
# finishes on a 2-core CPU (each batched-QR custom call blocks a thread of XLA's intra-op
# pool while waiting for sub-tasks queued on that same pool; two at once deadlock).
DEFAULT_OPTIMIZERS = [n for n in NAMES if n != "lora_rite_qr"]

# Gemma-2B (gemma/flax config "gemma_2b"): attention geometry.
GEMMA_2B = dict(num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1, head_dim=256)
# --quick: the same layout at toy widths (smoke test).
QUICK_TREE = dict(num_layers=1, d_model=64, num_heads=2, num_kv_heads=1, head_dim=16)
GEMMA_2B_LAYERS, GEMMA_2B_VOCAB = 18, 256128


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


def random_full_grads(params, pairs=None, seed: int = 2):
    """A random ``full_grads=`` tree: one base-weight-sized ``G`` per pair's parent node.

    Random rather than consistent with the LoRA gradients (``g_A = s G Bᵀ``): SoLoRA's
    cost does not depend on the values.
    """
    key = jax.random.key(seed)
    zeros = lox.zero_probes(params, pairs)
    leaves, treedef = jax.tree.flatten(zeros)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [1e-3 * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, leaves)],
    )


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _make_step(tx, with_full_grads: bool):
    if with_full_grads:

        def step_full(params, state, grads, full_grads):
            updates, state = tx.update(grads, state, params, full_grads=full_grads)
            return optax.apply_updates(params, updates), state

        return step_full

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _temp_bytes(compiled) -> int | None:
    """XLA's scratch (temp) bytes of a compiled executable, None if not reported."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend / version implements it
        return None
    return None if stats is None else int(stats.temp_size_in_bytes)


class _Watchdog:
    """Exits the process with a message if a step or compile takes over ``seconds``.

    A deadlocked XLA executable cannot be interrupted from Python (see
    ``DEFAULT_OPTIMIZERS``), so the benchmark names the culprit and stops instead of
    hanging forever.
    """

    seconds: float = 900.0

    def __init__(self, label: str):
        self.label = label
        self.timer: threading.Timer | None = None

    def _fire(self) -> None:
        _progress(
            f"{self.label} did not finish within {self.seconds:g} s (--step-timeout); "
            "most likely a deadlock in XLA:CPU / jaxlib's LAPACK kernels. Aborting."
        )
        os._exit(3)

    def __enter__(self) -> _Watchdog:
        if self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rounds(names: list[str], warmup: int, repeats: int):
    """Yields ``(timed, order)`` per round; the order rotates so no one always runs first."""
    for i in range(warmup + repeats):
        if i == warmup or (i > warmup and (i - warmup) % 5 == 0):
            _progress(f"timed round {i - warmup + 1}/{repeats}")
        yield i >= warmup, names[i % len(names) :] + names[: i % len(names)]


def bench_update(
    params,
    names: list[str],
    repeats: int,
    warmup: int,
    compile_repeats: int,
    *,
    pairs=None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Interleaved update-only timing of ``names`` on ``params``.

    Returns the per-optimizer results and the bytes of the ``full_grads`` tree given to
    the optimizers that need it (0 if none ran).
    """
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-3, x.dtype), params)
    full = random_full_grads(params, pairs) if any(map(needs_full_grads, names)) else None
    runs = {}
    for name in names:
        tx = make_optimizer(name, pairs)
        state = tx.init(params)
        extra = (full,) if needs_full_grads(name) else ()
        compile_times = []
        for _ in range(compile_repeats):
            # A new function each time: no cache hit.
            fresh = jax.jit(_make_step(tx, needs_full_grads(name)), donate_argnums=(0, 1))
            t0 = time.perf_counter()
            with _Watchdog(f"compiling the update of {name}"):
                compiled = fresh.lower(params, state, grads, *extra).compile()
            compile_times.append(time.perf_counter() - t0)
        _progress(f"update {name}: compiled in {statistics.median(compile_times):.1f} s")
        runs[name] = {
            "step": compiled,
            "extra": extra,
            "params": _copy(params),
            "state": _copy(state),
            "state_bytes": _tree_bytes(state),
            "temp_bytes": _temp_bytes(compiled),
            "compile_s": statistics.median(compile_times),
            "times": [],
        }
        del state
    for timed, order in _rounds(names, warmup, repeats):
        for name in order:
            run = runs[name]
            with _Watchdog(f"an update step of {name}"):  # its thread start is not timed
                t0 = time.perf_counter()
                run["params"], run["state"] = run["step"](
                    run["params"], run["state"], grads, *run["extra"]
                )
                jax.block_until_ready((run["params"], run["state"]))
                dt = time.perf_counter() - t0
            if timed:
                run["times"].append(dt)
    results = {}
    for name, run in runs.items():
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run["params"]))
        results[name] = {
            "update_ms": 1e3 * statistics.median(run["times"]),
            "update_min_ms": 1e3 * min(run["times"]),
            "state_bytes": run["state_bytes"],
            "temp_bytes": run["temp_bytes"],
            "compile_s": run["compile_s"],
            "finite": finite,
        }
    return results, (_tree_bytes(full) if full is not None else 0)


def bench_rank(
    rank: int, names: list[str], repeats: int, warmup: int, compile_repeats: int, cfg=GEMMA_2B
):
    """Update-only benchmark on the Gemma-2B LoRA tree of rank ``rank``."""
    params = gemma_lora_tree(rank, cfg=cfg)
    results, full_bytes = bench_update(params, names, repeats, warmup, compile_repeats)
    return {
        "results": results,
        "param_bytes": _tree_bytes(params),
        "n_pairs": len(jax.tree.leaves(params)) // 2,
        "full_grads_bytes": full_bytes,
    }


# ---------------------------------------------------------------------------------
# Train step: tunix Gemma with qwix LoRA
# ---------------------------------------------------------------------------------


def opt_state_pure(opt) -> Any:
    """The arrays of an ``nnx.Optimizer``'s optax state (without nnx's step counter)."""
    from flax import nnx

    pure = nnx.as_pure(nnx.state(opt))
    return pure["opt_state"] if "opt_state" in pure else {}  # absent: no arrays (SGD)


def gemma_train_config(layers: int, vocab: int, quick: bool = False):
    """tunix ``ModelConfig.gemma_2b()`` with ``layers`` layers and a ``vocab`` vocabulary."""
    from tunix.models.gemma import model as gm

    from lora_optax.flax import gemma

    if quick:
        return gemma.tiny_config(num_layers=layers)
    return dataclasses.replace(
        gm.ModelConfig.gemma_2b(),
        num_layers=layers,
        num_embed=vocab,
        attention_types=(gm.AttentionType.GLOBAL,) * layers,
    )


def default_vocab(layers: int) -> int:
    """Vocabulary that keeps the embedding's share of Gemma-2B's parameters at ``layers``.

    Gemma-2B: 256128 × 2048 embedding (tied with the output projection) next to 18
    layers; scaling the vocabulary with the layer count keeps the ratio of LM-head to
    transformer-layer FLOPs (and memory) of the full model.
    """
    return round(GEMMA_2B_VOCAB * layers / GEMMA_2B_LAYERS)


def bench_train_step(args, names: list[str]) -> dict[str, Any]:
    from flax import nnx
    from tunix.models.gemma import model as gm

    from lora_optax import flax as lf
    from lora_optax.flax import gemma

    cfg = gemma_train_config(args.layers, args.vocab, args.quick)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.num_embed, size=(args.batch, args.seq)), jnp.int32)
    batch = {"tokens": tokens}
    t0 = time.perf_counter()
    base = gm.Gemma(cfg, rngs=nnx.Rngs(0))
    model = lf.apply_lora(
        base,
        targets="gemma",
        rank=args.rank,
        alpha=float(args.rank),  # LoRA-RITE paper: α = r = 16
        model_inputs=gemma.causal_inputs(tokens[:1]),
        # B ≠ 0: a mid-training state (B = 0 would zero some preconditioner terms).
        b_initializer=nnx.initializers.normal(1e-3),
    )
    del base
    build_s = time.perf_counter() - t0
    _progress(f"model built in {build_s:.1f} s")
    spec = lf.pair_spec(model)
    frozen_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    graphdef, frozen, rest = nnx.split(model, frozen_filter, ...)  # type: ignore[misc]
    lora_tree = nnx.as_pure(nnx.state(model, nnx.LoRAParam))

    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        # Own LoRA factors (donated by the step), shared frozen weights (never donated).
        m = nnx.merge(graphdef, frozen, _copy(rest))
        tx = make_optimizer(name, spec)
        opt = nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)
        step = lf.make_train_step(gemma.lm_loss, full_grads=needs_full_grads(name))
        t0 = time.perf_counter()
        with _Watchdog(f"the first train step of {name}"):
            loss, _ = step(m, opt, batch)  # trace + compile + one step
            jax.block_until_ready((loss, nnx.state(opt), nnx.state(m, nnx.LoRAParam)))
        first_s = time.perf_counter() - t0
        _progress(f"train step {name}: first call {first_s:.1f} s")
        # Memory analysis of the step's executable (same arguments: a cache hit).
        _, frz, mut = nnx.split((m, opt), frozen_filter, ...)  # type: ignore[misc]
        fn = step.cache["fn"]  # type: ignore[attr-defined]  # the step's jitted function
        temp = _temp_bytes(fn.lower(mut, frz, batch).compile())
        runs[name] = {
            "model": m,
            "opt": opt,
            "step": step,
            "first_s": first_s,
            "state_bytes": _tree_bytes(opt_state_pure(opt)),
            "temp_bytes": temp,
            "times": [],
        }
    for timed, order in _rounds(names, args.warmup, args.repeats):
        for name in order:
            run = runs[name]
            with _Watchdog(f"a train step of {name}"):
                t0 = time.perf_counter()
                loss, _ = run["step"](run["model"], run["opt"], batch)
                jax.block_until_ready((loss, nnx.state(run["opt"]), nnx.state(run["model"])))
                dt = time.perf_counter() - t0
            if timed:
                run["times"].append(dt)
            run["last_loss"] = float(loss)
    results = {}
    for name, run in runs.items():
        lora = nnx.as_pure(nnx.state(run["model"], nnx.LoRAParam))
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(lora))
        results[name] = {
            "step_ms": 1e3 * statistics.median(run["times"]),
            "step_min_ms": 1e3 * min(run["times"]),
            "first_s": run["first_s"],
            "state_bytes": run["state_bytes"],
            "temp_bytes": run["temp_bytes"],
            "finite": finite and np.isfinite(run["last_loss"]),
        }
    del runs
    update, full_bytes = bench_update(
        lora_tree, names, args.repeats, args.warmup, compile_repeats=1, pairs=spec
    )
    for name in names:
        results[name]["update_ms"] = update[name]["update_ms"]
        results[name]["update_temp_bytes"] = update[name]["temp_bytes"]
        results[name]["finite"] = results[name]["finite"] and update[name]["finite"]
    frozen_bytes = _tree_bytes(nnx.as_pure(frozen))
    return {
        "results": results,
        "config": cfg,
        "n_pairs": len(lf.lora_pairs(model)),
        "lora_bytes": _tree_bytes(lora_tree),
        "frozen_bytes": frozen_bytes,
        "full_grads_bytes": full_bytes,
        "build_s": build_s,
    }


# ---------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------


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


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.2f}"


def _ratio(value, base) -> str:
    return f"{value / base:.2f}" if base else "–"


def _header(title: str, load_before: str, load_after: str) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"# {title}",
        "",
        f"- Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"- Hardware: {_cpu_model()}, {cores} cores usable by the process "
        f"({os.cpu_count()} online); jax {jax.__version__} ({jax.default_backend()}), "
        f"optax {optax.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}. Peak RSS of the process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB. "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')} (jaxlib's "
        "CPU LAPACK calls go through scipy's OpenBLAS; see the top of the script).",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. "
        "Optimizers are run interleaved (round-robin, order rotated each round) and "
        "medians are reported, so load from other processes falls on all of them alike; "
        "absolute times and, to a lesser degree, ratios are still noisy when the load "
        "average exceeds the core count.",
    ]


_NOTES = ["## Notes", "", "_To be filled in: reading of the tables, targets met or missed._", ""]


def to_markdown(all_results, args, load_before, load_after) -> str:
    """Markdown of the update-only benchmark (one table per rank)."""
    cfg = QUICK_TREE if args.quick else GEMMA_2B
    lines = _header(
        "Optimizer overhead on the Gemma-2B LoRA tree: update only (CPU)", load_before, load_after
    )
    lines += [
        f"- Tree: {cfg['num_layers']} layers × LoRA on q (A {cfg['d_model']}×r, B "
        f"r×{cfg['num_heads']}×{cfg['head_dim']}), k and v (A {cfg['d_model']}×r, B "
        f"r×{cfg['num_kv_heads']}×{cfg['head_dim']}; Gemma-2B is multi-query, 1 KV head), "
        f"o (A {cfg['num_heads']}×{cfg['head_dim']}×r, B r×{cfg['d_model']}): "
        f"{4 * cfg['num_layers']} pairs, float32"
        + (" (--quick: toy widths, not Gemma-2B)" if args.quick else "")
        + ". Step = jitted `update` + `apply_updates`, params and state donated. "
        f"{args.warmup} warm-up rounds, {args.repeats} timed rounds; compile time = median "
        f"of {args.compile_repeats} `lower().compile()`. Learning rate {LR}, every other "
        "hyper-parameter at the library's (optax's) default.",
        "- Columns: *update* = wall time of one jitted step (median, min); *state* = exact "
        "bytes of the optimizer-state pytree; *XLA temp* = `compiled.memory_analysis()."
        "temp_size_in_bytes` of the update step (scratch buffers XLA allocates during the "
        "update, beyond arguments and outputs); *× own base* = update time vs `sgd` for "
        "SGD-type methods, vs `adamw` otherwise.",
        "- SoLoRA (`solora_sgd`, `solora_adamw`) also reads the full-weight gradient G of "
        "every pair (`full_grads=`, a random tree of the base weights' shapes here, not "
        "donated): that input is NOT counted in *state*; its size is given per rank. In "
        "training it comes from the backward pass (see the train-step benchmark).",
        "",
    ]
    for rank, entry in all_results.items():
        results = entry["results"]
        base = results.get(BASELINE)
        full = entry["full_grads_bytes"]
        lines += [
            f"## rank {rank} ({entry['n_pairs']} pairs, "
            f"{entry['param_bytes'] / 2**20:.1f} MiB of LoRA params"
            + (f"; full_grads input {full / 2**20:.1f} MiB" if full else "")
            + ")",
            "",
            "| optimizer | update (ms, median) | min (ms) | × adamw | × own base | state (MiB) "
            "| × adamw | XLA temp (MiB) | compile (s) | × adamw |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in results.items():
            own = own_base(name)
            own_r = results.get(own)
            flag = "" if r["finite"] else " (NON-FINITE)"
            lines.append(
                f"| {name}{flag} | {r['update_ms']:.2f} | {r['update_min_ms']:.2f} | "
                f"{_ratio(r['update_ms'], base and base['update_ms'])} | "
                f"{_ratio(r['update_ms'], own_r and own_r['update_ms'])} ({own}) | "
                f"{_mib(r['state_bytes'])} | "
                f"{_ratio(r['state_bytes'], base and base['state_bytes'])} | "
                f"{_mib(r['temp_bytes'])} | {r['compile_s']:.2f} | "
                f"{_ratio(r['compile_s'], base and base['compile_s'])} |"
            )
        lines.append("")
    return "\n".join(lines + _NOTES)


def train_step_markdown(entry, args, load_before, load_after) -> str:
    """Markdown of the train-step benchmark."""
    cfg = entry["config"]
    results = entry["results"]
    base = results.get(BASELINE)
    tokens = args.batch * args.seq
    lines = _header(
        "Optimizer overhead end to end: jitted train step of a Gemma-2B-width model (CPU)",
        load_before,
        load_after,
    )
    lines += [
        "- Model: google-tunix Gemma, "
        + ("`gemma.tiny_config()`" if args.quick else "`ModelConfig.gemma_2b()` widths")
        + f" (d_model "
        f"{cfg.embed_dim}, {cfg.num_heads} heads × {cfg.head_dim}, {cfg.num_kv_heads} KV "
        f"head, MLP {cfg.hidden_dim}) with **{cfg.num_layers} layer(s) (Gemma-2B: 18) and a "
        f"{cfg.num_embed}-token vocabulary (Gemma-2B: 256128)**"
        + (" (--quick: toy widths, not Gemma-2B)" if args.quick else "")
        + f"; float32; {entry['frozen_bytes'] / 2**20:.0f} MiB of frozen weights "
        f"(built in {entry['build_s']:.0f} s). The default vocabulary "
        "256128·layers/18 keeps the LM head's share of the parameters of Gemma-2B.",
        f"- LoRA: qwix, rank {args.rank}, α = {args.rank}, on q_einsum, kv_einsum (k and v "
        f"share one pair in tunix) and attn_vec_einsum: {entry['n_pairs']} pairs, "
        f"{entry['lora_bytes'] / 2**20:.2f} MiB; B initialised ≠ 0 (mid-training).",
        f"- Batch: **{args.batch} × {args.seq} tokens** ({tokens} per step), random "
        "tokens, next-token cross-entropy (`lora_optax.flax.gemma.lm_loss`). The LoRA-RITE "
        "paper (Table 4, TPUv5e, rank 16, batch 16 on OpenBookQA) measures many more tokens "
        "per step; the update's cost is fixed per step while forward/backward grow with the "
        "tokens, so a small batch makes the optimizer's share LARGER than in the paper.",
        "- Step = `lora_optax.flax.make_train_step(lm_loss, full_grads=…)` called as a user "
        "does (nnx split/merge in Python, jitted forward + backward + update, LoRA params "
        "and optimizer state donated); SoLoRA's step also differentiates the q/kv/o base "
        f"kernels for G (`full_grads=True`). {args.warmup} warm-up rounds, {args.repeats} "
        "timed rounds; *compile* = trace + compile of the step, estimated as the first call "
        "minus the median step.",
        "- Columns: *state* = exact bytes of the optimizer-state pytree; *XLA temp* = "
        "`compiled.memory_analysis().temp_size_in_bytes` of the whole train step "
        "(activations, gradients, G for SoLoRA, the update's scratch); *update only* = "
        "the jitted update of the same LoRA tree timed in the same process (SoLoRA given "
        f"a random G tree of {entry['full_grads_bytes'] / 2**20:.1f} MiB); *Δ* columns = "
        "difference from adamw in ms.",
        "",
        "| optimizer | step (ms, median) | min (ms) | steps/s | slowdown vs adamw | "
        "Δ step (ms) | update only (ms) | Δ update (ms) | update × adamw | state (MiB) | "
        "× adamw | XLA temp step (MiB) | XLA temp update (MiB) | compile (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        flag = "" if r["finite"] else " (NON-FINITE)"
        slow = f"{100 * (r['step_ms'] / base['step_ms'] - 1):+.1f}%" if base else "–"
        d_step = f"{r['step_ms'] - base['step_ms']:+.1f}" if base else "–"
        d_upd = f"{r['update_ms'] - base['update_ms']:+.2f}" if base else "–"
        lines.append(
            f"| {name}{flag} | {r['step_ms']:.1f} | {r['step_min_ms']:.1f} | "
            f"{1e3 / r['step_ms']:.3f} | {slow} | {d_step} | {r['update_ms']:.2f} | {d_upd} | "
            f"{_ratio(r['update_ms'], base and base['update_ms'])} | "
            f"{_mib(r['state_bytes'])} | "
            f"{_ratio(r['state_bytes'], base and base['state_bytes'])} | "
            f"{_mib(r['temp_bytes'])} | {_mib(r['update_temp_bytes'])} | "
            f"{r['first_s'] - r['step_ms'] / 1e3:.1f} |"
        )
    lines.append("")
    return "\n".join(lines + _NOTES)


def main(argv=None) -> dict[str, Any]:
    """Runs the benchmark; returns the raw results (train step: its entry; update only:
    ``{"ranks": {rank: entry}}``) after printing / writing the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        help=f"registry names and variants (default: all but lora_rite_qr): {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: toy widths (update only: 1 layer of width 64, first rank only; "
        "train step: tunix tiny config, 1 layer, rank 2, 2×8 tokens), 1 warm-up, 2 timed "
        "rounds, 1 compile",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=_Watchdog.seconds,
        help="abort (exit 3) when one compile or step takes longer (s; 0: never)",
    )
    parser.add_argument("--out", default=None, help="write the markdown here")
    train = parser.add_argument_group("train step (--train-step)")
    train.add_argument(
        "--train-step",
        action="store_true",
        help="time full jitted train steps of a Gemma-2B-width model instead (--ranks and "
        "--compile-repeats are then unused)",
    )
    train.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    train.add_argument(
        "--vocab", type=int, default=None, help="vocabulary (default 256128·layers/18)"
    )
    train.add_argument("--batch", type=int, default=2)
    train.add_argument("--seq", type=int, default=128)
    train.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    unknown = [n for n in args.optimizers if n not in NAMES]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {NAMES}")
    _Watchdog.seconds = args.step_timeout
    if args.quick:
        args.warmup, args.repeats, args.compile_repeats = 1, 2, 1
        args.ranks = args.ranks[:1]
        args.layers, args.batch, args.seq, args.rank = 1, 2, 8, 2
    if args.vocab is None:
        args.vocab = default_vocab(args.layers)
    names = list(dict.fromkeys(args.optimizers))
    # The baselines first: adamw always, sgd when an SGD-type method is compared with it.
    needed = [BASELINE] + sorted({own_base(n) for n in names} - {BASELINE})
    names = [n for n in needed if n not in names] + names
    load_before = _load()
    if args.train_step:
        entry = bench_train_step(args, names)
        text = train_step_markdown(entry, args, load_before, _load())
        raw = entry
    else:
        cfg = QUICK_TREE if args.quick else GEMMA_2B
        all_results = {}
        for rank in args.ranks:
            all_results[rank] = bench_rank(
                rank, names, args.repeats, args.warmup, args.compile_repeats, cfg=cfg
            )
            print(to_markdown({rank: all_results[rank]}, args, load_before, _load()), flush=True)
        text = to_markdown(all_results, args, load_before, _load())
        raw = {"ranks": all_results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return raw


if __name__ == "__main__":
    main()
