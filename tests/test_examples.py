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


def write_llm_adapters_fixture(root, n_train=8, n_test=4):
    """A few records per task in the LLM-Adapters JSON layout (ARC, OBQA, BoolQ, GSM8K)."""

    def choice(i):
        body = " ".join(f"Answer{k + 1}: option {i} {k}" for k in range(4))
        gold = f"answer{i % 4 + 1}"
        return {
            "instruction": "Please choose the correct answer to the question: "
            f"which option is {i}?\n\n{body}\n\nAnswer format: answer1/answer2/answer3/answer4",
            "input": "",
            "output": f"the correct answer is {gold}",
            "answer": gold,
        }

    def boolq(i):
        gold = "true" if i % 2 else "false"
        return {
            "instruction": "Please answer the following question with true or false, "
            f"question: is {i} odd?\n\nAnswer format: true/false",
            "input": "",
            "output": f"the correct answer is {gold}",
            "answer": gold,
        }

    def gsm8k(i):
        return {
            "instruction": f"Tom has {i} apples and buys 2 more. How many apples has he?",
            "input": "",
            "output": f"{i} + 2 = {i + 2}. The answer is {i + 2}.",
            "answer": str(i + 2),
        }

    for folder, make in [
        ("ARC-Challenge", choice),
        ("openbookqa", choice),
        ("boolq", boolq),
        ("gsm8k", gsm8k),
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in [("train", n_train), ("test", n_test)]:
            records = [make(i) for i in range(n)]
            (root / folder / f"{split}.json").write_text(json.dumps(records))
    return root


# One-layer tiny models and a one-device mesh keep each test well under a minute on a
# loaded CPU (the mesh commits every array, so the train step compiles once).
SMALL = [
    "--model",
    "tiny",
    "--steps",
    "4",
    "--batch-size",
    "2",
    "--rank",
    "2",
    "--alpha",
    "4",
    "--lr",
    "1e-2",
    "--warmup",
    "1",
    "--eval-batches",
    "1",
    "--max-length",
    "48",
    "--mesh",
    "data=1",
    "--tiny-layers",
    "1",
    "--no-progress",
]


def _steps(out, kind):
    return [r["step"] for r in out["rows"] if r["kind"] == kind]


@pytest.mark.slow
def test_finetune_gemma_tiny_arc(tmp_path, capsys):
    pytest.importorskip("tunix.models.gemma.model")
    pytest.importorskip("qwix")
    data = write_llm_adapters_fixture(tmp_path / "data")
    metrics = tmp_path / "m.jsonl"
    out = load("finetune_gemma").main(
        [*SMALL, "--data", str(data), "--task", "arc_challenge", "--eval-every", "2"]
        + ["--metrics", str(metrics)]
    )
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 4 and all(r["loss"] == r["loss"] for r in train)
    assert _steps(out, "eval") == [0, 2, 4]  # zero-shot, then every 2 steps
    assert 0.0 <= out["final_eval"]["accuracy"] <= 1.0
    assert 0.0 <= out["final_eval"]["accuracy_norm"] <= 1.0
    assert out["final_eval"]["eval_examples"] == 4  # one batch of --eval-batch-size 16
    assert "summary" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_gemma_tiny_gsm8k_generation(tmp_path):
    pytest.importorskip("tunix.models.gemma.model")
    pytest.importorskip("qwix")
    data = write_llm_adapters_fixture(tmp_path / "data")
    out = load("finetune_gemma").main(
        [*SMALL, "--data", str(data), "--task", "gsm8k", "--optimizer", "adamw"]
        + ["--eval-every", "0", "--max-new-tokens", "4"]
    )
    assert _steps(out, "train") == [1, 2, 3, 4]
    assert 0.0 <= out["final_eval"]["gsm8k_accuracy"] <= 1.0


@pytest.mark.slow
def test_finetune_mt5_tiny_boolq_with_resume(tmp_path):
    data = write_llm_adapters_fixture(tmp_path / "data")
    args = [*SMALL, "--data", str(data), "--task", "boolq", "--optimizer", "adamw"]
    args += ["--max-target-length", "32"]
    args += ["--max-new-tokens", "4", "--ckpt-dir", str(tmp_path / "ckpt")]
    out = load("finetune_mt5").main([*args, "--eval-every", "2", "--ckpt-every", "2"])
    assert _steps(out, "eval") == [2, 4]
    final = out["final_eval"]
    assert 0.0 <= final["accuracy"] <= 1.0 and 0.0 <= final["exact_match"] <= 1.0
    # resume from the step-4 checkpoint: 6 steps in all trains steps 5 and 6 only
    args[args.index("--steps") + 1] = "6"
    out2 = load("finetune_mt5").main([*args, "--eval-every", "0", "--resume"])
    assert _steps(out2, "train") == [5, 6]


@pytest.mark.slow
def test_finetune_mt5_tiny_gsm8k_generation(tmp_path):
    pytest.importorskip("rouge_score")
    data = write_llm_adapters_fixture(tmp_path / "data")
    out = load("finetune_mt5").main(
        [*SMALL, "--data", str(data), "--task", "gsm8k", "--optimizer", "lora_plus"]
        + ["--eval-every", "0", "--max-target-length", "24", "--max-new-tokens", "4"]
    )
    final = out["final_eval"]
    assert 0.0 <= final["gsm8k_accuracy"] <= 1.0 and 0.0 <= final["rouge_l"] <= 1.0
