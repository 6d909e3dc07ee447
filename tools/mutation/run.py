"""Mutation testing of the numerics core with cosmic-ray (not part of ``.ci/run``).

Each target module gets its own cosmic-ray session in its own copy of the repository
(cosmic-ray edits the module on disk while the tests run, so parallel sessions must not
share a tree). Operators that only produce type errors on float code (``a + b`` →
``a | b``, ``a << b``, …) are filtered out; the remaining mutants are sampled with a fixed
seed, and each sampled mutant runs the module's test selection (``MODULES`` below) with
``pytest -x``. A persistent JAX compilation cache shared by all sessions lets the
functions a mutant does not touch compile once.

Usage (from the repository root, with the ``mutation`` extra installed)::

    python tools/mutation/run.py                 # all modules, default sample
    python tools/mutation/run.py --resume        # continue an interrupted run
    python tools/mutation/run.py --report-only   # rebuild the table from the sessions

The table goes to ``benchmarks/results/mutation.md``. Survivors that were judged
equivalent are listed, with the reason, in ``tools/mutation/equivalent.toml``.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.toml")

# module -> test files run for its mutants, fastest first (pytest -x stops at the first
# failure, so a killed mutant usually costs one import and a few tests).
MODULES: dict[str, list[str]] = {
    "lora_optax/_src/pairs.py": ["tests/test_pairs.py", "tests/test_bad_input.py"],
    "lora_optax/_src/linalg.py": [
        "tests/test_linalg.py",
        "tests/test_riemannian.py",
        "tests/test_lora_rite.py",
        "tests/test_bad_input.py",
        "tests/test_sharding.py",  # the r×r algebra's sharding rules
    ],
    "lora_optax/_src/riemannian.py": [
        "tests/test_riemannian.py",
        "tests/test_sequential.py",
        "tests/test_lora_one.py",
        "tests/test_bad_input.py",
    ],
    "lora_optax/_src/lora_rite.py": ["tests/test_lora_rite.py", "tests/test_bad_input.py"],
    "lora_optax/_src/pairwise.py": [
        "tests/test_pairwise.py",
        "tests/test_riemannian.py",
        "tests/test_sequential.py",
        "tests/test_bad_input.py",
        # variable-wrapped (nnx) trees and the sharded state layouts
        "tests/test_pairs.py",
        "tests/test_sharding.py",
        "tests/test_checkpoint_state.py",
    ],
}

# Replacing an arithmetic operator by a bitwise, shift, floor-division or modulo one
# raises a TypeError on floats (or is a float modulo nobody would write): such mutants
# are killed by any test that runs the line and say nothing about the tests' strength.
_ARITH = ("Add", "Sub", "Mul", "Div", "Pow")
_NOISE = ("FloorDiv", "Mod", "LShift", "RShift", "BitOr", "BitAnd", "BitXor")
EXCLUDED_OPERATORS = tuple(f"core/ReplaceBinaryOperator_{a}_{b}" for a in _ARITH for b in _NOISE)


ANNOTATION = "in a type annotation, never evaluated (from __future__ import annotations)"


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of every annotation in ``source``, if the
    module defers annotations; a mutant inside one cannot change behaviour."""
    tree = ast.parse(source)
    deferred = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    if not deferred:
        return []
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return [
        ((a.lineno, a.col_offset), (a.end_lineno or a.lineno, a.end_col_offset or 0)) for a in found
    ]


def _in_annotation(spans, item) -> bool:
    pos = tuple(item.mutations[0].start_pos)
    return any(start <= pos < end for start, end in spans)


def _session_dir(workdir: Path, module: str) -> Path:
    return workdir / Path(module).stem


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        if rel.startswith("benchmarks/results/") or rel.endswith(".png"):
            continue
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _config(module: str, tests: list[str], timeout: float) -> str:
    cmd = " ".join(["python -m pytest -x -q -p no:cacheprovider -p no:randomly", *tests])
    return (
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{cmd}"\n\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )


def _env(tree: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(tree),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        OPENBLAS_NUM_THREADS="1",
        HYPOTHESIS_PROFILE=env.get("HYPOTHESIS_PROFILE", "ci"),
    )
    return env


def _prepare(module: str, workdir: Path, args: argparse.Namespace) -> Path:
    """Copies the tree, creates the session, filters operators and samples mutants."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    sdir = _session_dir(workdir, module)
    tree, db = sdir / "tree", sdir / "session.sqlite"
    if args.resume and db.exists():
        return sdir
    if sdir.exists():
        shutil.rmtree(sdir)
    tree.mkdir(parents=True)
    _copy_tree(tree)
    (sdir / "config.toml").write_text(_config(module, MODULES[module], args.timeout))
    subprocess.run(["cosmic-ray", "init", str(sdir / "config.toml"), str(db)], cwd=tree, check=True)
    rng = random.Random(f"{args.seed}:{module}")
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        pending = list(work_db.pending_work_items)
        spans = _annotation_spans((tree / module).read_text())
        kept = []
        for item in pending:
            op = item.mutations[0].operator_name
            reason = None
            if op in EXCLUDED_OPERATORS:
                reason = "excluded operator (type error on floats)"
            elif _in_annotation(spans, item):
                reason = ANNOTATION
            if reason:
                work_db.set_result(
                    item.job_id,
                    WorkResult(output=reason, worker_outcome=WorkerOutcome.SKIPPED),
                )
            else:
                kept.append(item)
        # cosmic-ray lists pending items in random order: sort them so the seed decides
        kept.sort(
            key=lambda i: (
                tuple(i.mutations[0].start_pos),
                i.mutations[0].operator_name,
                i.mutations[0].occurrence,
            )
        )
        sample = set(i.job_id for i in rng.sample(kept, min(args.sample, len(kept))))
        for item in kept:
            if item.job_id not in sample:
                work_db.set_result(
                    item.job_id,
                    WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED),
                )
        print(
            f"{module}: {len(pending)} mutants, {len(kept)} after filtering, {len(sample)} sampled",
            flush=True,
        )
    return sdir


def _rerun_survivors(module: str, workdir: Path, args: argparse.Namespace) -> Path:
    """Refreshes a finished session's tree (new tests) and queues its survivors again.

    The mutants' positions are those of the module when the session was made, so the
    module itself must not have changed since.
    """
    sdir = _session_dir(workdir, module)
    tree, db = sdir / "tree", sdir / "session.sqlite"
    if not db.exists():
        sys.exit(f"{module}: no session under {sdir} to rerun; run without --rerun-survivors")
    if (tree / module).read_text() != (ROOT / module).read_text():
        sys.exit(
            f"{module} changed since its session was made ({sdir}); its mutants are stale: "
            "start it afresh (python tools/mutation/run.py --modules ...)"
        )
    _copy_tree(tree)
    (sdir / "config.toml").write_text(_config(module, MODULES[module], args.timeout))
    with sqlite3.connect(db) as con:
        n = con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
    print(f"{module}: {n} survivors queued again", flush=True)
    return sdir


def _execute(sdir: Path, cache: Path) -> float:
    start = time.time()
    with open(sdir / "exec.log", "a") as log:
        subprocess.run(
            ["cosmic-ray", "exec", str(sdir / "config.toml"), str(sdir / "session.sqlite")],
            cwd=sdir / "tree",
            env=_env(sdir / "tree", cache),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return time.time() - start


def _equivalents() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text())
    return {entry["id"]: entry["reason"] for entry in data.get("mutant", [])}


def mutant_id(module: str, diff: str) -> str:
    """A stable id of a mutant: its module and the changed lines (not line numbers)."""
    changed = [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    text = module + "\n" + "\n".join(s.strip() for s in changed)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def report(workdir: Path, out: Path, wall: dict[str, float]) -> str:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    equivalent = _equivalents()
    rows, survivors = [], []
    totals = dict(killed=0, survived=0, equivalent=0, incompetent=0, pending=0)
    for module in MODULES:
        db = _session_dir(workdir, module) / "session.sqlite"
        if not db.exists():
            continue
        counts = dict(killed=0, survived=0, equivalent=0, incompetent=0, pending=0)
        spans = _annotation_spans((_session_dir(workdir, module) / "tree" / module).read_text())
        with use_db(str(db), WorkDB.Mode.open) as work_db:
            results = dict(work_db.results)
            for item in work_db.work_items:
                res = results.get(item.job_id)
                if res is None:
                    counts["pending"] += 1
                    continue
                if res.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                if res.worker_outcome != WorkerOutcome.NORMAL:
                    counts["incompetent"] += 1
                elif res.test_outcome == TestOutcome.KILLED:
                    counts["killed"] += 1
                elif res.test_outcome == TestOutcome.SURVIVED:
                    mid = mutant_id(module, res.diff or "")
                    why = equivalent.get(mid) or (
                        ANNOTATION if _in_annotation(spans, item) else None
                    )
                    counts["equivalent" if why else "survived"] += 1
                    survivors.append((module, mid, item, res.diff or "", why))
                else:
                    counts["incompetent"] += 1
        for k in totals:
            totals[k] += counts[k]
        rows.append((module, counts))

    def score(c: dict[str, int]) -> str:
        n = c["killed"] + c["survived"]
        return f"{100.0 * c['killed'] / n:.1f}%" if n else "n/a"

    lines = [
        "# Mutation testing of the numerics core",
        "",
        f"Tool: cosmic-ray; command: `python tools/mutation/run.py` (seed {ARGS.seed}, "
        f"{ARGS.sample} sampled mutants per module after filtering; see the module "
        "docstring of tools/mutation/run.py for the filtering and the test selection).",
        "",
        "| module | killed | survived | equivalent | incompetent | pending | score | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module, c in rows:
        w = f"{wall[module] / 60:.1f} min" if module in wall else ""
        lines.append(
            f"| `{module}` | {c['killed']} | {c['survived']} | {c['equivalent']} | "
            f"{c['incompetent']} | {c['pending']} | {score(c)} | {w} |"
        )
    lines.append(
        f"| **all** | {totals['killed']} | {totals['survived']} | {totals['equivalent']} | "
        f"{totals['incompetent']} | {totals['pending']} | **{score(totals)}** | |"
    )
    lines += [
        "",
        "Score = killed / (killed + survived), over the non-equivalent mutants; "
        "incompetent mutants (the module no longer imports, or the test run errored "
        "before any test) count neither way.",
        "",
        "## Survivors",
        "",
    ]
    for module, mid, item, diff, why in survivors:
        m = item.mutations[0]
        head = f"- `{mid}` {module} line {m.start_pos[0]} `{m.operator_name}`"
        lines.append(head + (f" — equivalent: {why}" if why else " — **not killed**"))
        body = [s for s in diff.splitlines() if s[:1] in "+-" and not s.startswith(("+++", "---"))]
        lines += ["", "  ```diff", *[f"  {s}" for s in body], "  ```", ""]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=list(MODULES))
    parser.add_argument("--sample", type=int, default=30, help="mutants per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="sessions run in parallel")
    parser.add_argument("--timeout", type=float, default=300.0, help="per mutant, seconds")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora_optax_mutation"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mutation.md")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="run the survivors of finished sessions again against the current tests",
    )
    parser.add_argument("--report-only", action="store_true")
    global ARGS
    ARGS = args = parser.parse_args()
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        sys.exit(f"unknown modules {sorted(unknown)}; choose from {list(MODULES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    if not args.report_only:
        cache = args.workdir / "jax_cache"
        setup = _rerun_survivors if args.rerun_survivors else _prepare
        sessions = {m: setup(m, args.workdir, args) for m in args.modules}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(_execute, s, cache): m for m, s in sessions.items()}
            for fut in concurrent.futures.as_completed(futures):
                wall[futures[fut]] = fut.result()
                print(f"{futures[fut]}: done in {wall[futures[fut]] / 60:.1f} min", flush=True)
    print(report(args.workdir, args.out, wall))


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
