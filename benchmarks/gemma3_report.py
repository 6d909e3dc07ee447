"""Markdown, statistics and plots of ``benchmarks/reproduce_gemma3.py`` (its run records).

Paired comparisons against AdamW: a seed gives every optimizer the same LoRA ``A``
initialisation and batch order, and every test run scores the same questions, so
differences are paired by seed (paired t-test, sign count) and, with more power, by
question (exact McNemar test on the questions one optimizer gets right and the other
wrong, pooled over the seeds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import reproduce_lora_rite as base

LABELS = {"zero_shot": "zero-shot (no training)"}


def label(name: str) -> str:
    import lora_optax

    spec = lora_optax.OPTIMIZERS.get(name)
    return LABELS.get(name, spec.label if spec is not None else name)


def combo_label(task: str, rank: int) -> str:
    return f"{base.TASK_LABEL.get(task, task)} r{rank}"


def _get(r: Any, k: str) -> Any:
    return r[k] if isinstance(r, dict) else getattr(r, k)


def picked_lr(records, task, rank, name, seed0) -> float | None:
    grid = [
        r
        for r in records
        if (_get(r, "task"), _get(r, "rank"), _get(r, "optimizer"), _get(r, "stage"))
        == (task, rank, name, "grid")
        and _get(r, "seed") == seed0
        and _get(r, "accuracy") is not None
    ]
    if not grid:
        return None
    best = max(
        grid,
        key=lambda r: (
            _get(r, "accuracy"),
            -float(np.mean(_get(r, "losses")[-10:])),
            -_get(r, "lr"),
        ),
    )
    return float(_get(best, "lr"))


def finals(records, task, rank, name, lr) -> dict[int, Any]:
    """Test runs at ``lr`` by seed."""
    return {
        _get(r, "seed"): r
        for r in records
        if (_get(r, "task"), _get(r, "rank"), _get(r, "optimizer"), _get(r, "stage"))
        == (task, rank, name, "final")
        and _get(r, "lr") == lr
        and _get(r, "accuracy") is not None
    }


def paired_stats(a: dict[int, Any], b: dict[int, Any]) -> dict[str, Any] | None:
    """``a`` minus ``b`` over their common seeds: mean, std, paired t-test p, sign count,
    and the exact McNemar test on per-question correctness pooled over the seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.asarray([_get(a[s], "accuracy") - _get(b[s], "accuracy") for s in seeds], float)
    out: dict[str, Any] = {
        "n": len(seeds),
        "mean": float(d.mean()),
        "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "t_p": None,
        "mcnemar_p": None,
    }
    from scipy import stats

    if d.size > 1 and out["std"] > 0:
        out["t_p"] = float(stats.ttest_rel(d, np.zeros_like(d)).pvalue)
    only_a = only_b = 0
    for s in seeds:
        ca, cb = np.asarray(_get(a[s], "correct")), np.asarray(_get(b[s], "correct"))
        if ca.size and ca.size == cb.size:
            only_a += int(((ca == 1) & (cb == 0)).sum())
            only_b += int(((ca == 0) & (cb == 1)).sum())
    out["only_a"], out["only_b"] = only_a, only_b
    if only_a + only_b:
        out["mcnemar_p"] = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return out


def _fmt_p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f}"


def _main_table(records, cfg, task_info) -> list[str]:
    combos = list(cfg.combos)
    seed0 = cfg.seeds[0]
    lines = [
        "## Test accuracy (%): mean ± std over seeds (n) @ picked peak learning rate",
        "",
        "| optimizer | "
        + " | ".join(f"ours {combo_label(t, r)}" for t, r in combos)
        + " | paper OBQA r16 | paper ARC-C r16 | paper OBQA r4 |",
        "|---|" + "---|" * (len(combos) + 3),
    ]
    zs = []
    for t, r in combos:
        z = [
            x
            for x in records
            if (_get(x, "task"), _get(x, "rank"), _get(x, "stage")) == (t, r, "zero_shot_test")
        ]
        zs.append(f"{_get(z[0], 'accuracy'):.1f}" if z else "—")
    lines.append(f"| *{label('zero_shot')}* | " + " | ".join(zs) + " | | | |")
    for name in cfg.optimizers:
        cells = []
        for t, r in combos:
            lr = picked_lr(records, t, r, name, seed0)
            fin = finals(records, t, r, name, lr)
            if not fin:
                cells.append("—")
                continue
            accs = [_get(x, "accuracy") for x in fin.values()]
            sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
            cells.append(f"{np.mean(accs):.1f} ± {sd:.1f} ({len(accs)}) @ {lr:g}")
        p2 = base.PAPER_TABLE2_GEMMA2B.get(name, {})
        p3 = base.PAPER_TABLE3_OBQA.get(name)
        paper = [p2.get("openbookqa", "—"), p2.get("arc_challenge", "—"), p3[0] if p3 else "—"]
        lines.append(
            f"| {label(name)} | " + " | ".join(cells) + " | " + " | ".join(map(str, paper)) + " |"
        )
    chance = [f"{task_info[t]['chance_pct']:.1f}" if t in task_info else "—" for t, _ in combos]
    lines += ["| *chance* | " + " | ".join(chance) + " | 25 | ≈25 | 25 |", ""]
    lines += [
        "Paper columns: LoRA-RITE paper, Table 2 (Gemma-2B, rank 16, 2000 steps, batch 16; "
        "OBQA on its 500-question dev split, ARC-C on its 1172-question test split) and "
        "Table 3 (OpenBookQA, Gemma-2B rank 4). The paper does not report iLoRA, πLoRA, "
        "LoRA-One or SoLoRA; Shampoo is not part of this library.",
        "",
    ]
    return lines


def _paired_table(records, cfg) -> list[str]:
    if "adamw" not in cfg.optimizers:
        return []
    seed0 = cfg.seeds[0]
    lines = [
        "## Difference from AdamW (test accuracy points), paired by seed and by question",
        "",
        "| task | optimizer | mean ± std (n seeds) | seeds better / worse | paired t-test p "
        "| questions only it / only AdamW gets right (pooled over seeds) | McNemar exact p |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in cfg.combos:
        ref = finals(records, t, r, "adamw", picked_lr(records, t, r, "adamw", seed0))
        for name in cfg.optimizers:
            if name == "adamw":
                continue
            fin = finals(records, t, r, name, picked_lr(records, t, r, name, seed0))
            s = paired_stats(fin, ref)
            if s is None:
                continue
            lines.append(
                f"| {combo_label(t, r)} | {label(name)} | {s['mean']:+.1f} ± {s['std']:.1f} "
                f"({s['n']}) | {s['wins']} / {s['losses']} | {_fmt_p(s['t_p'])} | "
                f"{s['only_a']} / {s['only_b']} | {_fmt_p(s['mcnemar_p'])} |"
            )
    lines += [
        "",
        "Significance: with 2–3 seeds the paired t-test has 1–2 degrees of freedom and "
        "cannot detect differences of a few points (a sign count of 2/2 has p = 0.5); the "
        "per-question McNemar test pools the seeds, treating each (seed, question) as "
        "independent, which overstates the evidence when the same questions flip in every "
        "seed. Read p < 0.05 from McNemar as 'differs on these questions under this "
        "protocol', not as a replication of the paper's ranking.",
        "",
    ]
    return lines


def _grid_table(records, cfg) -> list[str]:
    lrs = sorted({_get(r, "lr") for r in records if _get(r, "stage") == "grid"})
    if not lrs:
        return []
    lines = [
        f"## Validation accuracy of every grid point (seed {cfg.seeds[0]}, {cfg.grid_steps} steps)",
        "",
        "| task | optimizer | " + " | ".join(f"{g:g}" for g in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for t, r in cfg.combos:
        for name in cfg.optimizers:
            cells = []
            for g in lrs:
                rr = [
                    x
                    for x in records
                    if (_get(x, "task"), _get(x, "rank"), _get(x, "optimizer")) == (t, r, name)
                    and _get(x, "stage") == "grid"
                    and _get(x, "lr") == g
                ]
                if not rr:
                    cells.append("—")
                elif _get(rr[0], "diverged"):
                    cells.append("div.")
                else:
                    cells.append(f"{_get(rr[0], 'accuracy'):.1f}")
            lines.append(f"| {combo_label(t, r)} | {label(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _timing_table(records, cfg) -> list[str]:
    lines = [
        "## Timing (shared CPU: indicative only)",
        "",
        "| task | optimizer | median s/step (after the first) | first step s (max; "
        "compilation) | eval s per question (mean) |",
        "|---|---|---|---|---|",
    ]
    for t, r in cfg.combos:
        for name in cfg.optimizers:
            rs = [
                x
                for x in records
                if (_get(x, "task"), _get(x, "rank"), _get(x, "optimizer")) == (t, r, name)
            ]
            if not rs:
                continue
            step_s = []
            for x in rs:
                n = len(_get(x, "losses")) - _get(x, "resumed_from_step") - 1
                if n > 0:
                    step_s.append((_get(x, "train_s") - _get(x, "first_step_s")) / n)
            per_q = [_get(x, "eval_s") / _get(x, "questions") for x in rs if _get(x, "questions")]
            lines.append(
                f"| {combo_label(t, r)} | {label(name)} | "
                f"{np.median(step_s) if step_s else float('nan'):.2f} | "
                f"{max(_get(x, 'first_step_s') for x in rs):.1f} | "
                f"{np.mean(per_q) if per_q else float('nan'):.3f} |"
            )
    lines.append("")
    return lines


def _protocol(cfg, task_info, meta) -> list[str]:
    sizes = "; ".join(
        f"{base.TASK_LABEL.get(t, t)}: rows of {i['seq_len']} tokens "
        f"({i['truncated_rows_pct']:.1f}% of train rows cut on the left), train/val/test "
        f"{i['sizes']['train']}/{i['sizes']['val']}/{i['sizes']['test']}"
        for t, i in task_info.items()
    )
    model = "Gemma 3 270M (packaged Q4_K_M GGUF, dequantised to float32)"
    if cfg.model == "tiny":
        model = "a random 2-layer tiny Gemma (dry run: numbers mean nothing)"
    return [
        "## Protocol (ours vs the paper's A.1)",
        "",
        "| | paper | this run |",
        "|---|---|---|",
        f"| model | Gemma-2B / 7B | {model} |",
        f"| LoRA | rank 16, α 16, q/k/v/o | ranks {sorted({r for _, r in cfg.combos})}, "
        f"α {cfg.alpha:g} (s = α/r), q / kv / o einsums of all layers (tunix's k and v "
        "share one einsum, hence one pair) |",
        f"| prompts / loss | LLM-Adapters | LLM-Adapters instruction prompts "
        f"({cfg.prompt_style}), cross-entropy on the answer tokens + EOS |",
        "| scoring | log-likelihood of each choice | summed log-likelihood of each candidate "
        "answer (“the correct answer is answerK”), LM head |",
        f"| steps / batch | 2000 / 16 | grid {cfg.grid_steps}, final {cfg.steps} / "
        f"{cfg.batch_size} |",
        f"| schedule | linear decay, 100 warm-up | linear decay to 0, {cfg.warmup_frac:.0%} "
        "warm-up |",
        f"| lr search | 2e-6 … 2e-2 | {', '.join(f'{g:g}' for g in cfg.grid)} (+ up to "
        f"{cfg.extend_grid} beyond a winning edge) on {cfg.val_size} validation questions "
        "carved from train |",
        f"| seeds | — | {', '.join(map(str, cfg.seeds))} at the picked rate (seed: LoRA A "
        "init + batch order) |",
        f"| weight decay / LoRA+ ratio | 0 / 4 | {cfg.weight_decay:g} / {cfg.lora_plus_ratio:g} |",
        f"| data | full | {sizes} |",
        "",
    ]


def write(records: Sequence[Any], cfg: Any, task_info: dict, meta: dict, out_dir: Path, name):
    """``<name>.md`` and the two PNGs."""
    loads = [_get(r, "load1") for r in records if _get(r, "load1")]
    steps = sum(len(_get(r, "losses")) for r in records)
    est = meta.get("budget_estimate") or {}
    wall = meta.get("wall_s")
    lines = [
        "# LoRA-RITE's decoder-LM protocol on Gemma 3 270M",
        "",
        f"Command: `{meta.get('command', '')}` (from the repo root).  ",
        f"Hardware: {meta.get('hardware', '')}.  ",
        (f"Wall time: {wall / 60:.1f} min" if wall else "**PARTIAL: interrupted or running**")
        + f" for {len(records)} records ({steps} optimizer steps).  ",
        f"Budget estimate printed at the start: ~{est.get('estimated_min', float('nan')):.0f} "
        f"min ({est.get('steps', '?')} steps × {est.get('step_s', float('nan')):.2f} s, load "
        f"`{est.get('load', '')}`).  ",
        *(
            [
                f"**Smoke run: {cfg.grid_steps}/{cfg.steps} steps on {cfg.val_size}/"
                f"{cfg.test_size} questions. It shows that the machinery works; its "
                "accuracies are not a result.**  "
            ]
            if cfg.steps < 100
            else []
        ),
        "Load average (1 min) after each run: "
        + (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—")
        + " on 2 cores shared with other jobs.",
        "",
    ]
    lines += _protocol(cfg, task_info, meta)
    lines += _main_table(records, cfg, task_info)
    lines += _paired_table(records, cfg)
    stem = name.replace("reproduce_", "")
    lines += [
        "## Learning-rate sensitivity and training loss",
        "",
        f"![lr sensitivity]({stem}_lr.png)",
        "",
        f"![training loss]({stem}_loss.png)",
        "",
    ]
    lines += _grid_table(records, cfg)
    lines += _timing_table(records, cfg)
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    plot(records, cfg, out_dir, stem)


def plot(records, cfg, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(cfg.combos)
    colors = plt.get_cmap("tab10")
    for kind in ("lr", "loss"):
        fig, axes = plt.subplots(1, len(combos), figsize=(6 * len(combos), 4), squeeze=False)
        for ax, (t, r) in zip(axes.flat, combos):
            for i, name in enumerate(cfg.optimizers):
                style = dict(color=colors(i % 10), label=label(name))
                if kind == "lr":
                    rs = sorted(
                        (
                            x
                            for x in records
                            if (_get(x, "task"), _get(x, "rank"), _get(x, "optimizer"))
                            == (t, r, name)
                            and _get(x, "stage") == "grid"
                        ),
                        key=lambda x: _get(x, "lr"),
                    )
                    if rs:
                        ys = [
                            np.nan if _get(x, "accuracy") is None else _get(x, "accuracy")
                            for x in rs
                        ]
                        ax.semilogx([_get(x, "lr") for x in rs], ys, marker="o", **style)
                else:
                    lr = picked_lr(records, t, r, name, cfg.seeds[0])
                    curves = [_get(x, "losses") for x in finals(records, t, r, name, lr).values()]
                    if curves:
                        n = min(len(c) for c in curves)
                        y = np.mean([c[:n] for c in curves], axis=0)
                        k = max(1, min(10, n // 4))
                        sm = np.convolve(y, np.ones(k) / k, mode="valid")
                        style["label"] = f"{label(name)} ({lr:g})"
                        ax.plot(np.arange(k, n + 1), sm, **style)
            if kind == "lr":
                ax.set_xlabel("peak learning rate")
                ax.set_ylabel("validation accuracy (%)")
                ax.set_title(f"{combo_label(t, r)}: learning-rate sensitivity")
            else:
                ax.set_xlabel("step")
                ax.set_ylabel("training loss (answer tokens)")
                ax.set_title(f"{combo_label(t, r)}: loss at the picked rate (seed mean)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_{kind}.png", dpi=90)
        plt.close(fig)


def from_json(path: Path, out_dir: Path, name: str) -> int:
    """Rewrites the markdown and plots of a saved run."""
    import reproduce_gemma3 as rg

    meta = json.loads(path.read_text())
    cfg = rg.Config.from_dict(meta["config"])
    write(meta["runs"], cfg, meta.get("task_info", {}), meta, out_dir, name)
    print(f"rewrote {out_dir / name}.md from {path}")
    return 0
