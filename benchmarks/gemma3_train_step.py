"""Gemma 3 270M (packaged GGUF): load cost, and train-step throughput with the LM head on
every position (``lm_loss``) against the head on the answer positions only (``answer_loss``).

    python benchmarks/gemma3_train_step.py            # writes benchmarks/results/gemma3_cpu.md

* Load: ``load_gemma3()`` in a fresh subprocess (float32 and bfloat16), wall time and peak
  RSS (``resource.getrusage``, the whole process: Python, jax, the model).
* Step: forward + backward + LoRA-RITE update (``make_train_step``), LoRA rank 16 on
  q/kv/o of all 18 layers, a batch of 8 × 64 real tokens (OpenBookQA instruction prompts
  cut on the left so that every position is a real token, the answer "the correct answer
  is answerK" + EOS at the end: 8 target tokens per row). The two losses run interleaved,
  in one process, after a warm-up each, so the ratio is taken under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD_SNIPPET = """
import json, resource, sys, time
t0 = time.perf_counter()
import jax.numpy as jnp
from lora_optax.flax import gemma
t1 = time.perf_counter()
model, tok = gemma.load_gemma3(dtype=jnp.dtype(sys.argv[1]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_load(dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET, dtype],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def real_batch(tok, batch_size: int, length: int):
    from lora_optax import tasks

    train = tasks.load_llm_adapters(tasks.packaged_data_dir(), "openbookqa", "train")
    rows = []
    for ex in train[:batch_size]:
        prompt, target = tasks.format_instruction(ex)
        rows.append(
            tasks.pack_prompt_target(
                [tok.bos_id, *tok.encode(prompt)],
                tok.encode(" " + target),
                length,
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
            )
        )
    tokens = np.stack([r["input_ids"] for r in rows])
    mask = np.stack([r["target_mask"] for r in rows])
    if (tokens == tok.pad_id).any():
        raise SystemExit("a prompt is shorter than the row: the batch must be all real tokens")
    return {
        "tokens": tokens,
        "loss_mask": mask,
        **tasks.answer_targets(mask, int(mask.sum(-1).max())),
    }


def measure_steps(rounds: int, batch_size: int, length: int, rank: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lora_optax
    from lora_optax.flax import apply_lora, gemma, make_train_step, pair_spec

    model, tok = gemma.load_gemma3()
    batch = real_batch(tok, batch_size, length)
    model = apply_lora(
        model,
        targets="gemma3",
        rank=rank,
        alpha=rank,
        model_inputs=gemma.causal_inputs(batch["tokens"][:1]),
    )
    init = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    runs = {}
    for name, loss in (
        ("full logits (lm_loss)", gemma.lm_loss),
        ("answer positions (answer_loss)", gemma.answer_loss),
    ):
        opt = nnx.Optimizer(
            model, lora_optax.lora_rite(1e-4, pairs=pair_spec(model)), wrt=nnx.LoRAParam
        )
        step = make_train_step(loss, donate=False)
        t = time.perf_counter()
        first = float(step(model, opt, batch)[0])
        runs[name] = {
            "step": step,
            "opt": opt,
            "first_call_s": time.perf_counter() - t,
            "times": [],
            "first_loss": first,
        }
    state = nnx.state(model, nnx.LoRAParam)
    for _ in range(rounds):
        for run in runs.values():
            state.replace_by_pure_dict(jax.tree.map(jnp.copy, init))
            nnx.update(model, state)
            t = time.perf_counter()
            jax.block_until_ready(run["step"](model, run["opt"], batch)[0])
            run["times"].append(time.perf_counter() - t)
    tokens = batch_size * length
    out = {}
    for name, run in runs.items():
        med = float(np.median(run["times"]))
        out[name] = {
            "median_s": med,
            "min_s": float(np.min(run["times"])),
            "tokens_per_s": tokens / med,
            "first_call_s": run["first_call_s"],
            "loss": run["first_loss"],
        }
    names = list(out)
    out["ratio"] = out[names[1]]["tokens_per_s"] / out[names[0]]["tokens_per_s"]
    out["targets_per_row"] = float(batch["target_weight"].sum(-1).mean())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemma3_cpu.md"))
    args = p.parse_args(argv)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:16]
    load_before = open("/proc/loadavg").read().strip()
    loads = {} if args.skip_load else {d: measure_load(d) for d in ("float32", "bfloat16")}
    steps = measure_steps(args.rounds, args.batch_size, args.length, args.rank)
    load_after = open("/proc/loadavg").read().strip()
    lines = [
        "# Gemma 3 270M on CPU: load, and train-step throughput",
        "",
        f"Command: `python benchmarks/gemma3_train_step.py --rounds {args.rounds}` "
        f"(Python {platform.python_version()}).",
        "",
        "Hardware (`lscpu | head -16`):",
        "",
        "```",
        *lscpu,
        "```",
        "",
        f"Load average (`/proc/loadavg`) before: `{load_before}`, after: `{load_after}` "
        "(absolute times vary with the load; the two losses "
        "run interleaved in one process, so their ratio is taken under the same load).",
        "",
    ]
    if loads:
        lines += [
            "## load_gemma3() (packaged Q4_K_M GGUF, fresh process)",
            "",
            "| dtype | load s | peak RSS MB (whole process) |",
            "|---|---|---|",
        ]
        for d, r in loads.items():
            lines.append(f"| {d} | {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    lines += [
        f"## Train step: batch {args.batch_size} × {args.length} real tokens, LoRA rank "
        f"{args.rank} on q/kv/o (18 layers), LoRA-RITE, forward + backward + update",
        "",
        f"{steps['targets_per_row']:.0f} answer tokens per row.",
        "",
        "| loss | median step s | min s | tokens/s | first call s (trace + compile + run) |",
        "|---|---|---|---|---|",
    ]
    for name, r in steps.items():
        if isinstance(r, dict):
            lines.append(
                f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['tokens_per_s']:.0f} "
                f"| {r['first_call_s']:.1f} |"
            )
    lines += [
        "",
        f"Throughput ratio (answer positions / full logits): **{steps['ratio']:.2f}×**.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
