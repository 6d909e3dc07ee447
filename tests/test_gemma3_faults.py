"""The Gemma 3 fine-tune survives SIGKILL mid-run and mid-save; --resume is bit-exact.

A small Gemma 3 GGUF (2 layers, written with gguf.GGUFWriter) on the shipped OBQA
slice keeps this fast. The training runs that get killed are subprocesses of
``examples/finetune_gemma.py`` whose fault is injected from outside the library: a
wrapper around the train step sends SIGKILL to its own process at a given step
(mid-run), or a wrapper around orbax's commit callback does it after a checkpoint's
data is written but before the checkpoint is committed (mid-save). SIGKILL runs no
cleanup, as when the machine kills the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tunix.models.gemma3.model")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tqdm")

from tests.gguf_fixtures import random_gemma3, tiny_gemma3_config, write_tiny_gemma3
from tests.test_examples import load

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import asyncio, os, signal, sys
root = sys.argv[1]
sys.path.insert(0, root)
import importlib.util
path = os.path.join(root, "examples", "finetune_gemma.py")
spec = importlib.util.spec_from_file_location("finetune_gemma", path)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
kill_at_step = int(os.environ.get("KILL_AT_STEP", "0"))
kill_saving = int(os.environ.get("KILL_SAVING_STEP", "0"))
if kill_at_step:
    from lora_optax.flax import cli
    real = cli.make_train_step
    def make_train_step(*a, **k):
        step = real(*a, **k)
        calls = [0]
        def killing(model, opt, batch):
            calls[0] += 1
            out = step(model, opt, batch)
            if calls[0] == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return killing
    cli.make_train_step = make_train_step
if kill_saving:
    from orbax.checkpoint._src.path import atomicity
    real_commit = atomicity.on_commit_callback
    async def on_commit_callback(tmp_dir, *a, **k):
        if os.path.basename(str(tmp_dir.get_final())) == str(kill_saving):
            os.kill(os.getpid(), signal.SIGKILL)  # data written, not committed
        return await real_commit(tmp_dir, *a, **k)
    atomicity.on_commit_callback = on_commit_callback
example.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = random_gemma3(tiny_gemma3_config(num_layers=2), seed=5)
    return write_tiny_gemma3(tmp_path_factory.mktemp("faults") / "tiny.gguf", model)


def _args(gguf, ckpt, metrics):
    return [
        "--model", str(gguf), "--steps", "12", "--batch-size", "2", "--rank", "2",
        "--alpha", "4", "--lr", "1e-2", "--warmup", "1", "--max-length", "32",
        "--max-examples", "40", "--eval-every", "0", "--eval-batches", "1",
        "--eval-batch-size", "2", "--no-progress", "--ckpt-dir", str(ckpt),
        "--ckpt-every", "4", "--metrics", str(metrics),
    ]  # fmt: skip


def _losses(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _killed_run(args, **env):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **{k: str(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def test_sigkill_mid_run_and_mid_save_then_bit_exact_resume(tiny_gguf, tmp_path, capsys):
    from lora_optax.flax.checkpoint import LoRACheckpointer

    example = load("finetune_gemma")
    reference = _losses_of(example, _args(tiny_gguf, tmp_path / "ref_ckpt", tmp_path / "ref.jsonl"))
    assert sorted(reference) == list(range(1, 13))

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "run.jsonl"
    args = _args(tiny_gguf, ckpt, metrics)
    # 1. killed at step 6, after the step-4 checkpoint
    _killed_run(args, KILL_AT_STEP=6)
    assert max(_losses(metrics)) == 5  # killed inside step 6, before it was logged
    assert LoRACheckpointer(str(ckpt)).all_steps() == [4]
    # 2. resumed, killed while committing the step-8 checkpoint
    _killed_run([*args, "--resume"], KILL_SAVING_STEP=8)
    assert LoRACheckpointer(str(ckpt)).latest_step() == 4  # the partial one is not used
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith("8")]
    assert leftovers, "the step-8 save should have left its uncommitted data"
    # 3. resumed again: continues from step 4 with exactly the uninterrupted losses
    metrics.unlink()
    capsys.readouterr()
    example.main([*args, "--resume"])
    assert "resumed from step 4" in capsys.readouterr().err
    resumed = _losses(metrics)
    assert sorted(resumed) == list(range(5, 13))
    assert resumed == {s: reference[s] for s in range(5, 13)}  # bit for bit
    assert LoRACheckpointer(str(ckpt)).latest_step() == 12


def _losses_of(example, args):
    example.main(args)
    return _losses(Path(args[args.index("--metrics") + 1]))
