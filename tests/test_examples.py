"""The fine-tuning examples run end-to-end at tiny scale (by importing main())."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--rank",
    "2",
    "--alpha",
    "4",
    "--lr",
    "1e-2",
    "--warmup",
    "1",
    "--eval-every",
    "3",
    "--eval-batches",
    "1",
    "--max-length",
    "16",
    "--no-progress",
]


@pytest.mark.slow
def test_finetune_encoder_tiny_with_resume(tmp_path, capsys):
    optimizer, task = "lora_rite", "arc_challenge"
    metrics = tmp_path / "m.jsonl"
    out = load("finetune_encoder").main(
        [
            *TINY,
            "--optimizer",
            optimizer,
            "--task",
            task,
            "--metrics",
            str(metrics),
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--ckpt-every",
            "3",
        ]
    )
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 6 and all(r["loss"] == r["loss"] for r in train)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    assert 0.0 <= out["final_eval"]["accuracy"] <= 1.0
    assert "summary" in capsys.readouterr().out
    # resume: the checkpoint at step 6 exists; asking for 8 steps trains 2 more
    out2 = load("finetune_encoder").main(
        [
            *TINY[:1],
            "8",
            *TINY[2:],
            "--optimizer",
            optimizer,
            "--task",
            task,
            "--resume",
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
        ]
    )
    assert [r["step"] for r in out2["rows"] if r["kind"] == "train"] == [7, 8]


@pytest.mark.slow
def test_finetune_encoder_full_grad_optimizer_boolq():
    out = load("finetune_encoder").main(
        [*TINY, "--optimizer", "solora_adamw", "--task", "boolq", "--eval-every", "0"]
    )
    assert [r["step"] for r in out["rows"] if r["kind"] == "eval"] == [6]
