"""Synthetic theory checks for the LoRA optimizers (pure JAX, float64, CPU-friendly).

(a) Condition number. Fit a rank-r target ``W* = U diag(σ) Vᵀ`` (σ geometric from 1 to
    1/κ) with a LoRA pair ``A B`` (A m×r, B r×n, standard LoRA initialisation: A
    Gaussian, B = 0), either by factorisation ``½‖AB − W*‖²_F`` or by matrix sensing
    ``(1/2p) Σ_i (⟨X_i, AB⟩ − y_i)²`` with Gaussian X_i. Count the iterations until the
    relative error ``‖AB − W*‖_F / ‖W*‖_F`` drops below ``--tol``, for κ ∈ {1, 10, 100,
    1000}. Zhang & Pilanci (ICML 2024, §5, citing Tong et al. 2021 and Jia et al. 2023)
    state that scaled GD converges at a rate independent of κ while plain GD slows
    down with κ. Each optimizer's constant step size is tuned ONCE, at κ = 1, on a
    log grid (the step size reaching the tolerance in the fewest iterations; if none
    reaches it, the one with the smallest final error) and then kept for every κ.

(b) Transformation invariance. Start from ``(A₀ T, T⁻¹ B₀)`` (same ``A₀ B₀``) for
    ``T = Q diag(d)`` with Q random orthogonal and cond(T) ∈ {1, 10, …, 1e4}; run
    every optimizer for a fixed number of steps with its step size from (a) and
    report the spread of the final error across T and the distance of the final
    product ``A B`` from the T = I run. LoRA-RITE (Yen et al., ICLR 2025, Def. 1) and
    scaled GD are transformation invariant; SGD and Adam-type methods are not.

Writes ``benchmarks/results/theory_checks.md`` and PNG plots. Run from the repo root:

    .venv/bin/python benchmarks/theory_checks.py            # full (a few minutes)
    .venv/bin/python benchmarks/theory_checks.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_optax as lox  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# --------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Opt:
    name: str
    make: Callable[[Any], optax.GradientTransformation]
    grid: tuple[float, ...]
    full_grads: bool = False


GRID_SGD = (0.01, 0.03, 0.1, 0.2, 0.5)
GRID_ADAPTIVE = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


# Hyperparameters set for every optimizer that has them: no weight decay (the target is
# exactly representable), δ = 1e-12 for the preconditioned methods (float64), LoRA+ ratio 16.
SETTINGS: dict[str, Any] = {"weight_decay": 0.0, "delta": 1e-12, "ratio": 16.0}
# Variants of registry optimizers: name -> (registry name, hyperparameters).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # LoRA-RITE without its two safeguards (joint clipping, RMS skip).
    "lora_rite_nosafe": ("lora_rite", {"clip_unmagnified_grad": 0.0, "skip_threshold": 0.0}),
}


def optimizers() -> tuple[list[Opt], list[str]]:
    """Every optimizer of the registry (:data:`lora_optax.OPTIMIZERS`) and the variants,
    and the names of the missing ones (none: the registry is the list).

    SGD-type optimizers (base optimizer SGD) tune their step size on ``GRID_SGD``, the
    others on ``GRID_ADAPTIVE``.
    """
    opts = []
    entries = [(n, n, {}) for n in lox.OPTIMIZERS] + [(n, *v) for n, v in VARIANTS.items()]
    for name, registry_name, extra in entries:
        spec = lox.OPTIMIZERS[registry_name]
        hyper = {k: v for k, v in SETTINGS.items() if k in spec.defaults} | extra
        grid = GRID_SGD if spec.base == "sgd" else GRID_ADAPTIVE
        make = functools.partial(lox.get_optimizer, registry_name, **hyper)
        opts.append(Opt(name, make, grid, spec.needs_full_grads))
    return opts, []


# --------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # "factorization" | "sensing"
    m: int
    n: int
    r: int
    num_measurements: int = 0


def make_target(prob: Problem, kappa: float, seed: int) -> np.ndarray:
    """Rank-r target with singular values geometric from 1 to 1/κ."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(prob.m, prob.r)))
    v, _ = np.linalg.qr(rng.normal(size=(prob.n, prob.r)))
    sig = np.geomspace(1.0, 1.0 / kappa, prob.r) if prob.r > 1 else np.ones(1)
    return (u * sig) @ v.T


def make_sensing(prob: Problem, seed: int) -> np.ndarray:
    """Gaussian sensing matrices X_i (p, m, n), entries N(0, 1) (E[⟨X, W⟩²] = ‖W‖²)."""
    rng = np.random.default_rng(seed + 1000)
    return rng.normal(size=(prob.num_measurements, prob.m, prob.n))


def lora_init(prob: Problem, seed: int, b_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A ~ N(0, 1/m) (Kaiming-like), B = b_scale · N(0, 1/r)."""
    rng = np.random.default_rng(seed + 2000)
    a = rng.normal(size=(prob.m, prob.r)) / np.sqrt(prob.m)
    b = b_scale * rng.normal(size=(prob.r, prob.n)) / np.sqrt(prob.r)
    return a, b


def make_runner(
    opt: Opt, prob: Problem, steps: int, xs: Any = None, *, track: bool = False
) -> Callable[..., Any]:
    """jit(vmap) runner: (lrs (L,), targets (K,m,n), a0 (K,m,r), b0 (K,r,n)) -> results.

    Returns ``(errors, products)``: errors (L, K, steps), the relative Frobenius error
    after each step; products (L, K, m, n) the final ``A B``, or (L, K, steps, m, n)
    every step's ``A B`` when ``track``.
    """
    xs_j = None if xs is None else jnp.asarray(xs)

    def loss_fn(params, probe, target):
        x = params["lora_a"] @ params["lora_b"] + probe
        if prob.kind == "factorization":
            return 0.5 * jnp.sum((x - target) ** 2)
        resid = jnp.einsum("pmn,mn->p", xs_j, x - target)
        return 0.5 * jnp.mean(resid**2)

    def one(lr, target, a0, b0):
        tx = opt.make(lr)
        params = {"lora_a": a0, "lora_b": b0}
        state = tx.init(params)
        probe = jnp.zeros_like(target)
        tnorm = jnp.linalg.norm(target)
        grad = jax.grad(loss_fn, argnums=(0, 1))

        def step(carry, _):
            p, s = carry
            g, full = grad(p, probe, target)
            extra = {"full_grads": full} if opt.full_grads else {}
            u, s = tx.update(g, s, p, **extra)
            p = optax.apply_updates(p, u)
            prod = p["lora_a"] @ p["lora_b"]
            err = jnp.linalg.norm(prod - target) / tnorm
            return (p, s), ((err, prod) if track else err)

        (p, _), out = jax.lax.scan(step, (params, state), None, length=steps)
        if track:
            return out
        return out, p["lora_a"] @ p["lora_b"]

    over_targets = jax.vmap(one, in_axes=(None, 0, 0, 0))
    return jax.jit(jax.vmap(over_targets, in_axes=(0, None, None, None)))


def iterations_to(errs: np.ndarray, tol: float) -> np.ndarray:
    """First step (1-based) with error < tol along the last axis; inf when never."""
    ok = np.nan_to_num(errs, nan=np.inf) < tol
    first = np.argmax(ok, axis=-1).astype(float) + 1
    return np.where(ok.any(axis=-1), first, np.inf)


def pick_lr(grid: tuple[float, ...], errs_k1: np.ndarray, tol: float) -> tuple[int, str]:
    """Index of the tuned lr from errs (L, steps) at κ = 1, and how it was chosen."""
    its = iterations_to(errs_k1, tol)
    if np.isfinite(its).any():
        return int(np.argmin(its)), "fewest iterations to tol"
    final = np.nan_to_num(errs_k1[:, -1], nan=np.inf)
    return int(np.argmin(final)), "tol not reached: smallest final error"


# --------------------------------------------------------------------------- reporting


def hardware() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"CPU: {cpu}; cores visible: {os.cpu_count()} (shared with other developers); "
        f"jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}, "
        f"Python {platform.python_version()}"
    )


def fmt_its(x: float, budget: int) -> str:
    return f"> {budget}" if not np.isfinite(x) else str(int(x))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- main


def run_kappa(args, prob: Problem, opts: list[Opt], out: dict) -> list[str]:
    kappas = args.kappas
    targets = np.stack([make_target(prob, k, args.seed) for k in kappas])
    a0, b0 = lora_init(prob, args.seed)
    a0s = np.broadcast_to(a0, (len(kappas),) + a0.shape)
    b0s = np.broadcast_to(b0, (len(kappas),) + b0.shape)
    xs = make_sensing(prob, args.seed) if prob.kind == "sensing" else None
    lines = []
    res = {}
    for opt in opts:
        t0 = time.perf_counter()
        runner = make_runner(opt, prob, args.steps, xs)
        lrs = np.asarray(opt.grid)
        # every grid step size at every κ; tuned at κ = 1 (the first target).
        errs_all, _ = runner(lrs, targets, a0s, b0s)
        errs_all = np.asarray(errs_all)  # (L, K, steps)
        li, how = pick_lr(opt.grid, errs_all[:, 0], args.tol)
        lr = float(lrs[li])
        errs = errs_all[li]
        its = iterations_to(errs, args.tol)
        res[opt.name] = dict(
            lr=lr,
            how=how,
            its=its,
            errs=errs,
            final=errs[:, -1],
            its_all=iterations_to(errs_all, args.tol),
            final_all=errs_all[:, :, -1],
        )
        print(
            f"[{prob.kind}] {opt.name:13s} lr={lr:g} ({how}) its={its} "
            f"({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    out[prob.kind] = res

    hdr = "| optimizer | tuned lr (κ=1) | " + " | ".join(f"κ={k:g}" for k in kappas) + " |"
    lines += [hdr, "|" + "---|" * (2 + len(kappas))]
    for name, r in res.items():
        cells = [
            fmt_its(i, args.steps) + ("" if np.isfinite(i) else f" ({f:.1e})")
            for i, f in zip(r["its"], r["final"])
        ]
        lines.append(f"| {name} | {r['lr']:g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Cells: iterations until ‖AB − W*‖_F/‖W*‖_F < {args.tol:g}; "
        f"'> {args.steps}' = not reached within the budget (final relative error in "
        "parentheses). Step size tuning at κ=1: "
        + "; ".join(f"{n}: {r['how']}" for n, r in res.items() if "not" in r["how"])
        + ("" if any("not" in r["how"] for r in res.values()) else "all reached tol")
        + "."
    )

    lines += [
        "",
        "Step-size sensitivity (same runs, every grid step size; * = the one tuned at κ=1):",
        "",
        "| optimizer | lr | " + " | ".join(f"κ={k:g}" for k in kappas) + " |",
        "|" + "---|" * (2 + len(kappas)),
    ]
    for name, r in res.items():
        grid = next(o.grid for o in opts if o.name == name)
        for i, g in enumerate(grid):
            cells = [
                fmt_its(x, args.steps) + ("" if np.isfinite(x) else f" ({f:.0e})")
                for x, f in zip(r["its_all"][i], r["final_all"][i])
            ]
            star = "*" if g == r["lr"] else ""
            lines.append(f"| {name} | {g:g}{star} | " + " | ".join(cells) + " |")

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in res.items():
        its = np.where(np.isfinite(r["its"]), r["its"], args.steps * 1.15)
        ax.loglog(kappas, its, "o-", label=name)
        bad = ~np.isfinite(r["its"])
        if bad.any():
            ax.loglog(np.asarray(kappas)[bad], its[bad], "x", color="k")
    ax.axhline(args.steps, color="gray", ls=":", lw=1)
    ax.set_xlabel("condition number κ of the target")
    ax.set_ylabel(f"iterations to rel. error < {args.tol:g}")
    ax.set_title(f"{prob.kind}: m={prob.m}, n={prob.n}, r={prob.r} (x = not reached)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out_dir / f"theory_kappa_{prob.kind}.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kappas), figsize=(3.6 * len(kappas), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for j, k in enumerate(kappas):
        for name, r in res.items():
            axes[j].semilogy(np.arange(1, args.steps + 1), r["errs"][j], label=name, lw=1.2)
        axes[j].axhline(args.tol, color="gray", ls=":", lw=1)
        axes[j].set_title(f"κ = {k:g}")
        axes[j].set_xlabel("iteration")
        axes[j].set_ylim(max(args.tol / 100, 1e-14), 10)
    axes[0].set_ylabel("‖AB − W*‖_F / ‖W*‖_F")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{prob.kind}: relative error, step size tuned at κ=1")
    fig.tight_layout()
    fig.savefig(args.out_dir / f"theory_curves_{prob.kind}.png", dpi=110)
    plt.close(fig)
    return lines


def run_invariance(args, prob: Problem, opts: list[Opt], tuned: dict) -> list[str]:
    conds = args.conds
    target = make_target(prob, args.inv_kappa, args.seed)
    a0, b0 = lora_init(prob, args.seed, b_scale=0.3)
    rng = np.random.default_rng(args.seed + 3000)
    q, _ = np.linalg.qr(rng.normal(size=(prob.r, prob.r)))
    a0s, b0s = [], []
    for c in conds:
        d = c ** (np.linspace(-0.5, 0.5, prob.r)) if prob.r > 1 else np.ones(1)
        t = q * d
        a0s.append(a0 @ t)
        b0s.append(np.linalg.solve(t, b0))
    a0s, b0s = np.stack(a0s), np.stack(b0s)
    targets = np.broadcast_to(target, (len(conds),) + target.shape)
    res = {}
    for opt in opts:
        runner = make_runner(opt, prob, args.inv_steps, track=True)
        lr_tuned = tuned[opt.name]["lr"]
        lr = lr_tuned * args.inv_lr_factor
        errs_all, prods_all = runner(np.asarray([lr, lr_tuned]), targets, a0s, b0s)
        errs, prods = np.asarray(errs_all)[0], np.asarray(prods_all)[0]  # (K,S), (K,S,m,n)
        final = errs[:, -1]
        # largest distance, over all steps, of the product from the T = I run's product
        dist = np.linalg.norm(prods - prods[:1], axis=(2, 3)) / np.linalg.norm(target)
        dev = np.where(np.isfinite(dist).all(axis=1), dist.max(axis=1), np.inf)
        # the same at the tuned step size: distance (max over T) after a few steps
        p2 = np.asarray(prods_all)[1]
        d2 = np.linalg.norm(p2 - p2[:1], axis=(2, 3)) / np.linalg.norm(target)
        marks = [s_ for s_ in (1, 5, 20, args.inv_steps) if s_ <= args.inv_steps]
        tuned_dev = {s_: float(np.max(d2[:, s_ - 1])) for s_ in marks}
        tuned_final = float(np.max(np.nan_to_num(np.asarray(errs_all)[1][:, -1], nan=np.inf)))
        res[opt.name] = dict(
            lr=lr,
            final=final,
            dev=dev,
            errs=errs,
            tuned_dev=tuned_dev,
            tuned_final=tuned_final,
            lr_tuned=lr_tuned,
        )
        print(f"[invariance] {opt.name:13s} final={final} dev={dev}", flush=True)

    lines = [
        "| optimizer | lr | "
        + " | ".join(f"cond(T)={c:g}" for c in conds)
        + " | max/min final | max_t ‖X_T(t) − X_I(t)‖/‖W*‖ |",
        "|" + "---|" * (4 + len(conds)),
    ]
    for name, r in res.items():
        f = np.nan_to_num(r["final"], nan=np.inf)
        ratio = np.max(f) / np.min(f) if np.isfinite(f).all() else np.inf
        lines.append(
            f"| {name} | {r['lr']:g} | "
            + " | ".join(f"{x:.2e}" for x in r["final"])
            + f" | {ratio:.3g} | {np.max(r['dev']):.1e} |"
        )
    lines.append("")
    lines.append(
        f"Cells: relative error ‖AB − W*‖_F/‖W*‖_F after {args.inv_steps} steps "
        f"({prob.kind}, κ={args.inv_kappa:g}) at {args.inv_lr_factor:g} × the step size "
        "tuned in (a), from (A₀T, T⁻¹B₀), with A₀, B₀ both non-zero "
        "Gaussian (B₀ = 0.3·N(0, 1/r)) and T = Q diag(d), Q random orthogonal, d geometric "
        "with cond(T) = d_max/d_min; nan = diverged. The last column is the largest "
        "distance, over all steps, between the product X = AB of the run from T and of "
        "the run from T = I (inf = diverged); an invariant optimizer gives float error."
    )

    marks = list(next(iter(res.values()))["tuned_dev"]) if res else []
    lines += [
        "",
        "At the step size tuned in (a) (×1) the same runs give (distance max over T of "
        "X_T(t) from X_I(t), relative to ‖W*‖, after t steps; last column: worst final "
        "error):",
        "",
        "| optimizer | tuned lr | "
        + " | ".join(f"t={m}" for m in marks)
        + " | worst final error |",
        "|" + "---|" * (3 + len(marks)),
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['lr_tuned']:g} | "
            + " | ".join(f"{r['tuned_dev'][m]:.1e}" for m in marks)
            + f" | {r['tuned_final']:.2g} |"
        )
    lines += [
        "",
        "An invariant optimizer starts at rounding level (1e-14 … 1e-10) at t = 1; where a "
        "run at the tuned step size is unstable from a non-zero B₀ (worst final error ≫ "
        "1), the rounding differences grow geometrically with t (chaotic dynamics), so the "
        "end-of-run distance says nothing about invariance — hence the smaller step size of "
        "the main table.",
    ]

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in res.items():
        axes[0].loglog(conds, np.clip(np.nan_to_num(r["final"], nan=1e3), 0, 1e3), "o-", label=name)
        axes[1].loglog(conds[1:], np.clip(r["dev"][1:], 1e-17, 1e3), "o-", label=name)
    axes[0].set_xlabel("cond(T)")
    axes[0].set_ylabel(f"rel. error after {args.inv_steps} steps")
    axes[1].set_xlabel("cond(T)")
    axes[1].set_ylabel("max_t ‖X_T(t) − X_I(t)‖_F / ‖W*‖_F")
    axes[1].legend(fontsize=8)
    fig.suptitle("Transformation invariance: start from (A₀T, T⁻¹B₀)")
    fig.tight_layout()
    fig.savefig(args.out_dir / "theory_invariance.png", dpi=110)
    plt.close(fig)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small budgets (about a minute)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    p.add_argument("--optimizers", default="", help="comma list (default: all available)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not write the markdown")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.kappas = [1.0, 10.0, 100.0, 1000.0]
    args.conds = [1.0, 10.0, 100.0, 1e3, 1e4]
    args.inv_kappa = 10.0
    # (b) runs at a tenth of the step size tuned in (a): at the tuned (edge-of-stability)
    # step sizes, runs from a non-zero B₀ are unstable for some optimizers, and float
    # rounding differences (1e-14) then grow chaotically to O(1) even for an exactly
    # invariant method, which would hide what (b) measures.
    args.inv_lr_factor = 0.1
    args.tol = 1e-4
    args.steps, args.inv_steps = 3000, 300
    problems = [Problem("factorization", 32, 24, 4), Problem("sensing", 16, 12, 3, 400)]
    if args.quick:
        args.steps, args.inv_steps = 800, 150
        problems = problems[:1]
    if args.smoke:
        args.steps, args.inv_steps = 120, 20
        args.kappas, args.conds = [1.0, 100.0], [1.0, 1e4]
        args.tol = 1e-2
        problems = [Problem("factorization", 8, 6, 2)]

    opts, missing = optimizers()
    if args.optimizers:
        wanted = args.optimizers.split(",")
        opts = [o for o in opts if o.name in wanted]
    t0 = time.perf_counter()
    out: dict = {}
    sections = []
    for prob in problems:
        sections.append((prob, run_kappa(args, prob, opts, out)))
    inv = run_invariance(args, problems[0], opts, out[problems[0].kind])
    wall = time.perf_counter() - t0
    print(f"wall time {wall:.1f}s", flush=True)
    if args.no_write:
        return 0

    cmd = "python " + " ".join([sys.argv[0].split("/work/main/")[-1]] + (argv or sys.argv[1:]))
    md = [
        "# Theory checks: condition number and transformation invariance",
        "",
        f"Command: `{cmd}` (from the repo root, `.venv/bin/python`).  ",
        f"Hardware: {hardware()}.  ",
        f"Wall time: {wall:.0f} s (CPU shared with other processes; float64).  ",
        f"Optimizers missing in this checkout: {', '.join(missing) or 'none'}.",
        "",
        "Set-up. One LoRA pair A (m×r), B (r×n), scale 1, standard LoRA init (A ~ N(0, 1/m),"
        " B = 0), rank-r target W* = U diag(σ) Vᵀ with σ geometric from 1 to 1/κ. Constant"
        " step size, no weight decay, float64, δ = 1e-12 for the scaled methods. Step size"
        " grid: SGD-type "
        + str(list(GRID_SGD))
        + ", adaptive "
        + str(list(GRID_ADAPTIVE))
        + ", tuned once at κ = 1 (fewest iterations to the tolerance; if no step size"
        " reaches it, the smallest final error) and reused for every κ. LoRA+ uses ratio 16;"
        " LoRA-RITE runs with its default safeguards (joint clipping of the unmagnified"
        " gradients at 1, RMS skip at 1) and without them (`lora_rite_nosafe`);"
        " SoLoRA gets the exact full gradient G = ∂L/∂W every step.",
        "",
    ]
    for prob, lines in sections:
        desc = (
            "½‖AB − W*‖²_F"
            if prob.kind == "factorization"
            else f"(1/2p)Σ(⟨X_i, AB − W*⟩)², p = {prob.num_measurements} Gaussian X_i"
        )
        md += [
            f"## (a) {prob.kind}: iterations vs κ (m={prob.m}, n={prob.n}, r={prob.r}, {desc})",
            "",
            *lines,
            "",
            f"![iterations vs kappa](theory_kappa_{prob.kind}.png)",
            f"![loss curves](theory_curves_{prob.kind}.png)",
            "",
        ]
    md += [
        "Paper claim beside ours: Zhang & Pilanci (ICML 2024, §5 and related work) — scaled"
        " GD on low-rank factorisation/sensing converges at a rate independent of the"
        " condition number (Tong et al. 2021, Jia et al. 2023), plain GD at a rate that"
        " degrades with κ.",
        "",
        "## (b) Transformation invariance",
        "",
        *inv,
        "",
        "![invariance](theory_invariance.png)",
        "",
        "Paper claim beside ours: LoRA-RITE (Yen et al., ICLR 2025, Def. 1, Thm. 1) is"
        " transformation invariant (identical ΔX for every T up to float error, with the"
        " safeguards on, since clipping acts on the invariant unmagnified gradient); scaled"
        " GD is invariant (exact with δ → 0); SGD, Adam, LoRA+ are not even scalar-scale"
        " invariant (Yen et al. §2.2). Scaled AdamW preconditions before Adam's elementwise"
        " second moment, so it is not invariant either.",
        "",
    ]
    (args.out_dir / "theory_checks.md").write_text("\n".join(md))
    print(f"wrote {args.out_dir / 'theory_checks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
