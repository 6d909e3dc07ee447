"""Update time and state bytes of every optimizer at several git revisions, one process.

Refactors must keep the optimizers' cost where it was. This benchmark checks that: it
extracts ``lora_optax`` at each revision (``git archive``) into a scratch folder under
its own import name (``lora_optax_rev0``, ``lora_optax_rev1``, ...), builds the same
Gemma-2B attention LoRA tree as ``optimizer_overhead.py`` (72 pairs), and times the
jitted ``update + apply_updates`` step of every optimizer of every revision interleaved
(round-robin, order rotated every round), so machine load falls on all alike. Medians
over the timed rounds; the ratio column is against the first revision.

An optimizer is looked up by its current registry name; a revision that spells it
differently is mapped through ``OLD_NAMES`` (``lora_pro`` before ``lora_pro_adamw``).
Every optimizer is built with library defaults and ``learning_rate=1e-4``.

Usage::

  python benchmarks/compare_revisions.py 0c79d09^1 b17b6d8^1 HEAD --rank 16 \\
      --repeats 20 --out benchmarks/results/update_time_revisions.md
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see optimizer_overhead.py

import argparse
import importlib
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from optimizer_overhead import (
    _copy,
    _make_step,
    _rounds,
    _tree_bytes,
    gemma_lora_tree,
    needs_full_grads,
    random_full_grads,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
LR = 1e-4
# current registry name -> the name an older revision exported it under
OLD_NAMES = {"lora_pro_adamw": "lora_pro"}
BASELINES = ("adamw", "sgd", "lamb")


def extract(rev: str, alias: str, into: pathlib.Path) -> tuple[str, Any]:
    """``lora_optax`` at ``rev`` importable as ``alias``; returns (commit, module)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "lora_optax"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    scratch = into / alias
    scratch.mkdir()
    tar_path = scratch / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(scratch, filter="data")
    package = scratch / "lora_optax"
    word = re.compile(r"\blora_optax\b")
    for source in package.rglob("*.py"):
        source.write_text(word.sub(alias, source.read_text()))
    package.rename(into / alias / alias)
    sys.path.insert(0, str(into / alias))
    return commit, importlib.import_module(alias)


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def factory(module: Any, name: str):
    if name in BASELINES:
        return getattr(optax, name)  # the same code at every revision: a noise control
    for spelled in (name, OLD_NAMES.get(name)):
        if spelled and hasattr(module, spelled):
            return getattr(module, spelled)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revisions", nargs="+", help="git revisions; the first is the base")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizers", nargs="*", help="registry names (default: all)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    load_before = os.getloadavg()
    params = gemma_lora_tree(args.rank)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 1e-3).astype(x.dtype), params)
    full = random_full_grads(params)

    with tempfile.TemporaryDirectory() as tmp:
        revs = [
            extract(r, f"lora_optax_rev{i}", pathlib.Path(tmp))
            for i, r in enumerate(args.revisions)
        ]
        names = args.optimizers or list(revs[-1][1].OPTIMIZERS)
        runs: dict[tuple[str, int], dict[str, Any]] = {}
        for name in names:
            for i, (commit, module) in enumerate(revs):
                make = factory(module, name)
                if make is None:
                    print(f"{commit}: no {name}", file=sys.stderr)
                    continue
                tx = make(LR)
                with_full = needs_full_grads(name)  # per the current registry
                state = tx.init(params)
                step = jax.jit(_make_step(tx, with_full), donate_argnums=(0, 1))
                extra = (full,) if with_full else ()
                compiled = step.lower(params, state, grads, *extra).compile()
                runs[(name, i)] = {
                    "step": compiled,
                    "extra": extra,
                    "params": _copy(params),
                    "state": state,
                    "state_bytes": _tree_bytes(state),
                    "times": [],
                }
            print(f"[{time.strftime('%H:%M:%S')}] compiled {name}", file=sys.stderr, flush=True)
        for timed, order in _rounds(list(runs), args.warmup, args.repeats):
            for key in order:
                run = runs[key]
                t0 = time.perf_counter()
                run["params"], run["state"] = run["step"](
                    run["params"], run["state"], grads, *run["extra"]
                )
                jax.block_until_ready(run["params"])
                if timed:
                    run["times"].append(time.perf_counter() - t0)
        load_after = os.getloadavg()

        labels = [f"{i}: {commit}" for i, (commit, _) in enumerate(revs)]
        header = (
            ["optimizer"]
            + [f"{label} ms" for label in labels]
            + [f"{label} / 0" for label in labels[1:]]
            + ["state bytes (per revision)"]
        )
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            cols = [runs.get((name, i)) for i in range(len(revs))]
            ms = [1e3 * statistics.median(r["times"]) if r else None for r in cols]
            cells = [name] + [f"{m:.1f}" if m else "—" for m in ms]
            cells += [f"{m / ms[0]:.2f}" if m and ms[0] else "—" for m in ms[1:]]
            cells.append(" / ".join(str(r["state_bytes"]) if r else "—" for r in cols))
            lines.append("| " + " | ".join(cells) + " |")
    report = "\n".join(
        [
            f"# Update time across revisions (rank {args.rank}, 72 Gemma-2B attention pairs)",
            "",
            "`python benchmarks/compare_revisions.py "
            f"{' '.join(args.revisions)} --rank {args.rank} --repeats {args.repeats}`",
            "",
            f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, "
            f"jax {jax.__version__}, {jax.devices()[0].platform}; load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Median of {args.repeats} "
            "interleaved rounds after warm-up; float32.",
            "",
            *lines,
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
