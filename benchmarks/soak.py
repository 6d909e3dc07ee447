"""Soak test: 10 000 steps of a small LoRA model per optimizer, with injected faults.

The model is a two-layer residual MLP ``h = x + tanh(x (W₀ + P + s A₁B₁))``,
``y = h (V₀ + Q + s A₂B₂)`` with frozen base weights ``W₀, V₀``, zero probes ``P, Q``
(so that one backward pass also gives the full-weight gradients that SoLoRA needs,
:func:`lora_optax.value_and_full_grads`), trainable LoRA pairs and a trainable output
bias. The teacher is the same network with a random low-rank change of its weights;
every step draws a fresh batch. Faults are injected into the gradients:

* every ``--spike-every``-th step the gradients (and full gradients) are multiplied by
  1e6 (a finite spike, e.g. a bad batch or a loss-scale glitch);
* every ``--nan-every``-th step the batch contains a NaN, so the loss and every
  gradient are NaN.

Safeguards (the training loop's, not the optimizers'): the LoRA gradients are clipped
to a global norm of ``--clip`` (the full gradients are scaled by the same factor, so
SoLoRA sees a consistent ``G``), and the optimizer is wrapped in
``optax.apply_if_finite`` (NaN/inf steps are skipped: zero update, state untouched).
The steps run jitted in ``lax.scan`` chunks. The report lists, per optimizer, the
initial and final loss on a fixed clean evaluation batch, the skipped steps (must equal
the NaN batches), the steps at which any optimizer-state entry was non-finite (must
be 0) and the wall time.

Run from the repo root (writes ``benchmarks/results/soak.md``)::

    .venv/bin/python benchmarks/soak.py                       # all optimizers
    .venv/bin/python benchmarks/soak.py --steps 2000 --optimizers scaled_adamw,lora_rite
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_optax as lox  # noqa: E402
from tests.optimizer_cases import CASES, extra_args  # noqa: E402

D, RANK, BATCH, SCALE = 32, 4, 64, 1.0


def make_model(seed: int = 0):
    """(frozen base, teacher weights, initial LoRA params)."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(D, D)) / np.sqrt(D)
    v0 = rng.normal(size=(D, D)) / np.sqrt(D)
    base = {"w": jnp.asarray(w0, jnp.float32), "v": jnp.asarray(v0, jnp.float32)}

    def lowrank():
        u = rng.normal(size=(D, RANK - 1))
        v = rng.normal(size=(RANK - 1, D))
        return 0.5 * u @ v / np.sqrt(D * (RANK - 1))

    teacher = {
        "w": jnp.asarray(w0 + lowrank(), jnp.float32),
        "v": jnp.asarray(v0 + lowrank(), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=D), jnp.float32),
    }
    params = {
        "layer1": {
            "lora_a": jnp.asarray(rng.normal(size=(D, RANK)) / np.sqrt(D), jnp.float32),
            "lora_b": jnp.zeros((RANK, D), jnp.float32),
        },
        "layer2": {
            "lora_a": jnp.asarray(rng.normal(size=(D, RANK)) / np.sqrt(D), jnp.float32),
            "lora_b": jnp.zeros((RANK, D), jnp.float32),
        },
        "bias": jnp.zeros((D,), jnp.float32),
    }
    return base, teacher, params


def forward(w1, w2, bias, x):
    h = x + jnp.tanh(x @ w1)
    return h @ w2 + bias


def loss_fn(params, probes, base, batch):
    x, y = batch
    w1 = (
        base["w"]
        + probes["layer1"]
        + SCALE * params["layer1"]["lora_a"] @ params["layer1"]["lora_b"]
    )
    w2 = (
        base["v"]
        + probes["layer2"]
        + SCALE * params["layer2"]["lora_a"] @ params["layer2"]["lora_b"]
    )
    return 0.5 * jnp.mean(jnp.sum((forward(w1, w2, params["bias"], x) - y) ** 2, axis=-1))


def make_batch(teacher, key):
    x = jax.random.normal(key, (BATCH, D))
    return x, forward(teacher["w"], teacher["v"], teacher["bias"], x)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def soak(case, steps: int, chunk: int, spike_every: int, nan_every: int, clip: float, seed: int):
    base, teacher, params = make_model(seed)
    tx = optax.apply_if_finite(
        case.make(learning_rate=case.learning_rate), max_consecutive_errors=10
    )
    state = tx.init(params)
    value_and_grads = lox.value_and_full_grads(loss_fn)
    eval_batch = make_batch(teacher, jax.random.key(10_000 + seed))
    probes0 = lox.zero_probes(params)

    def eval_loss(params):
        return loss_fn(params, probes0, base, eval_batch)

    def step(carry, i):
        params, state = carry
        x, y = make_batch(teacher, jax.random.fold_in(jax.random.key(seed), i))
        x = jnp.where((i % nan_every == nan_every - 1) & (jnp.arange(D) == 0), jnp.nan, x)
        loss, (grads, full) = value_and_grads(params, base, (x, y))
        spike = jnp.where(i % spike_every == spike_every - 1, 1e6, 1.0)
        grads = jax.tree.map(lambda g: g * spike, grads)
        full = jax.tree.map(lambda g: g * spike, full)
        # Clip the LoRA gradients; scale the full gradients by the same factor.
        norm = optax.global_norm(grads)
        factor = jnp.where(norm > clip, clip / norm, 1.0)
        grads = jax.tree.map(lambda g: g * factor, grads)
        full = jax.tree.map(lambda g: g * factor, full)
        updates, state = tx.update(grads, state, params, **extra_args(case, full))
        params = optax.apply_updates(params, updates)
        record = {
            "loss": loss,
            "skipped": jnp.logical_not(state.last_finite),
            "state_nonfinite": jnp.logical_not(_all_finite(state.inner_state)),
            "params_nonfinite": jnp.logical_not(_all_finite(params)),
        }
        return (params, state), record

    @jax.jit
    def run_chunk(params, state, start):
        return jax.lax.scan(step, (params, state), start + jnp.arange(chunk))

    initial = float(eval_loss(params))
    records = []
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        (params, state), rec = run_chunk(params, state, jnp.asarray(done))
        records.append(jax.device_get(rec))
        done += chunk
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    rec = {k: np.concatenate([r[k] for r in records])[:steps] for k in records[0]}
    final = float(eval_loss(params))
    return {
        "optimizer": case.name,
        "learning_rate": case.learning_rate,
        "initial_loss": initial,
        "final_loss": final,
        "nan_batches": int(sum(1 for i in range(steps) if i % nan_every == nan_every - 1)),
        "spikes": int(sum(1 for i in range(steps) if i % spike_every == spike_every - 1)),
        "skipped": int(rec["skipped"].sum()),
        "state_nonfinite_steps": int(rec["state_nonfinite"].sum()),
        "params_nonfinite_steps": int(rec["params_nonfinite"].sum()),
        "final_state_finite": bool(_all_finite(state)),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=500, help="steps per jitted lax.scan")
    parser.add_argument(
        "--optimizers",
        default="all",
        help="comma-separated names from tests/optimizer_cases.py CASES, or 'all'",
    )
    parser.add_argument("--spike-every", type=int, default=97)
    parser.add_argument("--nan-every", type=int, default=251)
    parser.add_argument("--clip", type=float, default=1.0, help="global-norm clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.md"))
    args = parser.parse_args()

    by_name = {c.name: c for c in CASES}
    names = list(by_name) if args.optimizers == "all" else args.optimizers.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {sorted(by_name)}")
    steps = args.steps
    chunk = min(args.chunk, steps)
    steps = -(-steps // chunk) * chunk  # whole chunks

    results = []
    for name in names:
        r = soak(
            by_name[name], steps, chunk, args.spike_every, args.nan_every, args.clip, args.seed
        )
        results.append(r)
        print(
            f"{name:14s} loss {r['initial_loss']:.4f} -> {r['final_loss']:.4g}  "
            f"skipped {r['skipped']}/{r['nan_batches']}  state non-finite "
            f"{r['state_nonfinite_steps']}  {r['wall_s']:.1f}s",
            flush=True,
        )

    ok = all(
        r["state_nonfinite_steps"] == 0
        and r["params_nonfinite_steps"] == 0
        and r["final_state_finite"]
        and r["skipped"] == r["nan_batches"]
        and np.isfinite(r["final_loss"])
        for r in results
    )
    cmd = "python benchmarks/soak.py " + " ".join(sys.argv[1:])
    lines = [
        "# Soak test",
        "",
        f"Command: `{cmd.strip()}` (from the repo root).",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)), optax {optax.__version__}.",
        "",
        f"{steps} steps per optimizer of a 2-layer residual MLP (d = {D}, LoRA rank "
        f"{RANK} on both weights, batch {BATCH}, fresh batch every step); gradients "
        f"(and full gradients) ×1e6 every {args.spike_every}th step, a NaN in the batch "
        f"every {args.nan_every}th step. Safeguards: global-norm clipping to {args.clip} "
        "in the training loop (full gradients scaled by the same factor) and "
        "`optax.apply_if_finite(tx, max_consecutive_errors=10)`; learning rates are the "
        "common test table's. Losses on a fixed clean evaluation batch.",
        "",
        "| optimizer | lr | initial loss | final loss | NaN batches | skipped | spikes | "
        "non-finite state (steps) | non-finite params (steps) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['optimizer']}` | {r['learning_rate']:g} | {r['initial_loss']:.4f} | "
            f"{r['final_loss']:.4g} | {r['nan_batches']} | {r['skipped']} | {r['spikes']} | "
            f"{r['state_nonfinite_steps']} | {r['params_nonfinite_steps']} | {r['wall_s']:.1f} |"
        )
    lines += [
        "",
        "All optimizers: every NaN batch skipped, no non-finite state or parameter at any step."
        if ok
        else "**FAILURES above** (non-finite state/params or unskipped NaN).",
        "",
    ]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
