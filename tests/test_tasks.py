"""Tests for lora_optax.tasks: loaders, formatting, metrics and resumable batching.

All fixtures are small hand-written records shaped like each format; the real LLM-Adapters
files are only read (never copied) by ``test_real_llm_adapters_data`` when present.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_optax import tasks
from lora_optax.tasks import datasets as tds

# --------------------------------------------------------------------------- fixtures

ARC_LA = {
    "instruction": (
        "Please choose the correct answer to the question: Which tool measures mass?"
        "\n\nAnswer1: a ruler Answer2: a balance Answer3: a thermometer Answer4: a  clock"
        "\n\nAnswer format: answer1/answer2/answer3/answer4"
    ),
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}
ARC_LA_3 = {
    "instruction": (
        "Please choose the correct answer to the question: Pick one: which is a gas?"
        "\n\nAnswer1: ice Answer2: steam Answer3: rock"
        "\n\nAnswer format: answer1/answer2/answer3"
    ),
    "input": "",
    "output": "the correct answer is answer3",
    "answer": "answer3",
}
ARC_LA_5 = {
    "instruction": (
        "Please choose the correct answer to the question: Count to five.\n\nAnswer1: one "
        "Answer2: two Answer3: three Answer4: four Answer5: five"
        "\n\nAnswer format: answer1/answer2/answer3/answer4/answer5"
    ),
    "input": "",
    "output": "the correct answer is answer5",
    "answer": "answer5",
}
BOOLQ_LA = {
    "instruction": (
        "Please answer the following question with true or false, question: "
        "is the sky blue?\n\nAnswer format: true/false"
    ),
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}
BOOLQ_LA_FALSE = dict(BOOLQ_LA, output="the correct answer is false", answer="false")
GSM_LA = {
    "instruction": "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "input": "",
    "output": "\nA: 3 + 4 = 7. The answer is 7.",
    "answer": "7.0",
}
GSM_LA_EMPTY = {"instruction": "What is 2 - 5?", "input": "", "output": "", "answer": "-3.0"}
GSM_JSON = {"sQuestion": "What is 1.5 + 1?", "lSolutions": 2.5}
HELLA_LA = {
    "instruction": (
        "Please choose the correct ending to complete the given sentence: Baking: "
        "She mixes the flour. she\n\nEnding1: bakes the cake. Ending2: flies away. "
        "Ending3: sings loudly. Ending4: sleeps.\n\nAnswer format: ending1/ending2/ending3/ending4"
    ),
    "input": "",
    "output": "the correct answer is ending1",
    "answer": "ending1",
}

ARC_ORIG = {
    "id": "Fixture_1",
    "question": {
        "stem": "Which tool measures mass?",
        "choices": [
            {"text": "a ruler", "label": "A"},
            {"text": "a balance", "label": "B"},
            {"text": "a thermometer", "label": "C"},
        ],
    },
    "answerKey": "B",
}
ARC_ORIG_DIGITS = {
    "id": "Fixture_2",
    "question": {
        "stem": "Which is warm?",
        "choices": [{"text": "ice", "label": "1"}, {"text": "sun", "label": "2"}],
    },
    "answerKey": "2",
}
ARC_HF = {
    "id": "Fixture_1",
    "question": "Which tool measures mass?",
    "choices": {"text": ["a ruler", "a balance", "a thermometer"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
OBQA_ORIG = {
    "id": "1-234",
    "question": {
        "stem": "Rain clouds are made of",
        "choices": [
            {"text": "tiny bits of cotton", "label": "A"},
            {"text": "water droplets", "label": "B"},
        ],
    },
    "fact1": "clouds contain water",
    "answerKey": "B",
}
OBQA_HF = {
    "id": "1-234",
    "question_stem": "Rain clouds are made of",
    "choices": {"text": ["tiny bits of cotton", "water droplets"], "label": ["A", "B"]},
    "answerKey": "B",
}
HELLA_ORIG = {
    "ind": 24,
    "activity_label": "Painting a fence",
    "ctx_a": "A girl opens a paint can.",
    "ctx_b": "she",
    "ctx": "A girl opens a paint can. she",
    "split": "val",
    "split_type": "indomain",
    "label": 3,
    "endings": [
        "eats the brush.",
        "paints the moon.",
        "throws the can away.",
        "dips a brush and paints the fence.",
    ],
    "source_id": "fixture~paint",
}
HELLA_HF = dict(HELLA_ORIG, label="3")
HELLA_HF_TEST = dict(HELLA_ORIG, label="")
HELLA_WIKIHOW = {
    "ind": 4,
    "activity_label": "Health",
    "ctx_a": "[header] How to rest. [title] Lie down.",
    "ctx_b": "",
    "endings": ["[step] Close your eyes.", "Run."],
    "label": 0,
}
GSM_ORIG = {
    "question": "Ben baked 48 rolls and then half as many buns. How many in total?",
    "answer": "He baked 48/2 = <<48/2=24>>24 buns.\n48+24 = <<48+24=72>>72.\n#### 72",
}
GSM_ORIG_BIG = {"question": "Big?", "answer": "Lots.\n#### 1,200"}
BOOLQ_ORIG = {
    "question": "are penguins birds",
    "title": "Penguin",
    "answer": True,
    "passage": "Penguins are flightless birds that swim.",
}
BOOLQ_HF = {
    "question": "is the sky green",
    "answer": False,
    "passage": "The sky is blue.",
}
SNI_TASK = {
    "Contributors": ["someone"],
    "Source": ["x"],
    "Categories": ["Title Generation"],
    "Definition": ["Generate a title for the given text."],
    "Positive Examples": [
        {"input": "Cats purr when happy.", "output": "Happy cats", "explanation": "ok"},
        {"input": "Dogs bark.", "output": "Barking dogs", "explanation": "ok"},
    ],
    "Negative Examples": [],
    "Instances": [
        {
            "id": "task1-1",
            "input": "The stock market rose.",
            "output": ["Markets up", "Stocks rise"],
        },
        {"id": "task1-2", "input": "It rained all day.", "output": ["Rainy day"]},
    ],
}


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- LLM-Adapters


def test_llm_adapters_multiple_choice():
    ex = tasks.parse_llm_adapters_record(ARC_LA, "ARC-Challenge")
    assert ex.kind == tasks.MULTIPLE_CHOICE and ex.task == "arc_challenge"
    assert ex.question == "Which tool measures mass?"
    assert ex.choices == ("a ruler", "a balance", "a thermometer", "a  clock")
    assert ex.label == 1 and ex.gold == "a balance"
    assert tasks.parse_llm_adapters_record(ARC_LA_3, "arc_c").choices == ("ice", "steam", "rock")
    five = tasks.parse_llm_adapters_record(ARC_LA_5, "arc_challenge")
    assert five.num_choices == 5 and five.label == 4 and five.choices[-1] == "five"


def test_llm_adapters_boolq_gsm8k_hellaswag():
    b = tasks.parse_llm_adapters_record(BOOLQ_LA, "boolq")
    assert b.kind == tasks.CLASSIFICATION and b.choices == ("no", "yes") and b.label == 1
    assert b.question == "is the sky blue?"
    assert tasks.parse_llm_adapters_record(BOOLQ_LA_FALSE, "boolq").label == 0
    g = tasks.parse_llm_adapters_record(GSM_LA, "gsm8k")
    assert g.kind == tasks.GENERATION and g.answer == "7" and g.references == (g.target,)
    assert g.question.startswith("Tom has")
    empty = tasks.parse_llm_adapters_record(GSM_LA_EMPTY, "gsm8k")
    assert empty.answer == "-3" and empty.target == "The answer is -3."
    j = tasks.parse_llm_adapters_record(GSM_JSON, "gsm8k")
    assert j.answer == "2.5" and j.question == "What is 1.5 + 1?"
    h = tasks.parse_llm_adapters_record(HELLA_LA, "hellaswag")
    assert h.choices[0] == "bakes the cake." and h.label == 0
    assert h.question == "Baking: She mixes the flour. she"


def test_llm_adapters_round_trip():
    for rec, task in [
        (ARC_LA, "arc_challenge"),
        (ARC_LA_5, "arc_challenge"),
        (BOOLQ_LA, "boolq"),
        (BOOLQ_LA_FALSE, "boolq"),
        (HELLA_LA, "hellaswag"),
    ]:
        ex = tasks.parse_llm_adapters_record(rec, task)
        assert tasks.to_llm_adapters(ex) == (rec["instruction"], rec["output"])
    # Examples from other sources render in the same layout.
    ins, out = tasks.to_llm_adapters(tasks.parse_arc_record(ARC_ORIG))
    assert ins.endswith("Answer format: answer1/answer2/answer3") and out.endswith("answer2")


def test_llm_adapters_marker_inside_question():
    rec = dict(ARC_LA_3)
    rec["instruction"] = rec["instruction"].replace("Pick one:", "Answer1: is a trap?")
    ex = tasks.parse_llm_adapters_record(rec, "arc_challenge")
    assert ex.question == "Answer1: is a trap? which is a gas?"
    assert ex.choices == ("ice", "steam", "rock")


def test_llm_adapters_answer_from_output_and_errors():
    rec = dict(ARC_LA, answer="")
    assert tasks.parse_llm_adapters_record(rec, "arc_challenge").label == 1
    with pytest.raises(tasks.ParseError):
        tasks.parse_llm_adapters_record(dict(ARC_LA, answer="answer9", output="?"), "arc")
    with pytest.raises(tasks.ParseError):
        bad = ARC_LA["instruction"].replace("Answer3:", "Answer:")
        tasks.parse_llm_adapters_record(dict(ARC_LA, instruction=bad), "arc")
    with pytest.raises(tasks.ParseError):
        tasks.parse_llm_adapters_record({"instruction": "x"}, "arc")


def test_load_llm_adapters_layouts(tmp_path):
    _write_json(tmp_path / "ARC-Challenge" / "train.json", [ARC_LA, ARC_LA_3])
    _write_json(tmp_path / "boolq" / "test.json", [BOOLQ_LA, BOOLQ_LA_FALSE])
    _write_json(tmp_path / "gsm8k" / "gsm8k.json", [GSM_JSON])
    assert len(tasks.load_llm_adapters(tmp_path, "arc-c", "train")) == 2
    assert len(tasks.load_llm_adapters(tmp_path / "ARC-Challenge", "arc_challenge")) == 2
    assert [e.label for e in tasks.load_llm_adapters(tmp_path, "boolq", "test")] == [1, 0]
    assert tasks.load_llm_adapters(tmp_path, "gsm8k", "test")[0].answer == "2.5"
    with pytest.raises(FileNotFoundError):
        tasks.load_llm_adapters(tmp_path, "openbookqa", "train")
    bad = _write_json(tmp_path / "bad.json", [ARC_LA, {"instruction": "oops"}])
    with pytest.raises(tasks.ParseError, match="record 1"):
        tasks.load_llm_adapters(bad, "arc_challenge")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(tasks.load_llm_adapters(bad, "arc_challenge", errors="skip")) == 1


# --------------------------------------------------------------------------- original + HF


def test_arc_original_and_hf():
    a, h = tasks.parse_arc_record(ARC_ORIG), tasks.parse_arc_record(ARC_HF)
    assert a == h
    assert a.choices == ("a ruler", "a balance", "a thermometer") and a.label == 1
    assert a.uid == "Fixture_1"
    d = tasks.parse_arc_record(ARC_ORIG_DIGITS)
    assert d.label == 1 and d.gold == "sun"
    with pytest.raises(tasks.ParseError):
        tasks.parse_arc_record(dict(ARC_HF, answerKey="Z"))


def test_openbookqa_original_and_hf():
    o, h = tasks.parse_openbookqa_record(OBQA_ORIG), tasks.parse_openbookqa_record(OBQA_HF)
    assert o == h and o.label == 1 and o.context == ""
    f = tasks.parse_openbookqa_record(OBQA_ORIG, with_fact=True)
    assert f.context.startswith("clouds contain")
    assert tasks.format_encoder_multiple_choice(f)[0].startswith("clouds contain water")


def test_hellaswag_original_and_hf():
    o, h = tasks.parse_hellaswag_record(HELLA_ORIG), tasks.parse_hellaswag_record(HELLA_HF)
    assert o == h and o.label == 3
    assert o.question == "Painting a fence: A girl opens a paint can. She"
    assert tasks.parse_hellaswag_record(HELLA_HF_TEST).label == -1
    w = tasks.parse_hellaswag_record(HELLA_WIKIHOW)
    assert "[" not in w.question and w.choices[0] == "Close your eyes."
    prompt, conts = tasks.format_lm_multiple_choice(o)
    assert prompt == o.question and conts[3] == " dips a brush and paints the fence."


def test_gsm8k_and_boolq_records():
    g = tasks.parse_gsm8k_record(GSM_ORIG)
    assert g.answer == "72" and "<<" not in g.target and g.target.endswith("#### 72")
    assert "<<48/2=24>>" in tasks.parse_gsm8k_record(GSM_ORIG, strip_calculator=False).target
    assert tasks.parse_gsm8k_record(GSM_ORIG_BIG).answer == "1200"
    with pytest.raises(tasks.ParseError):
        tasks.parse_gsm8k_record({"question": "q", "answer": "no marker"})
    b = tasks.parse_boolq_record(BOOLQ_ORIG)
    assert b.label == 1 and b.question.endswith("?") and b.context.startswith("Penguins")
    assert tasks.parse_boolq_record(BOOLQ_HF).label == 0


def test_original_jsonl_loaders(tmp_path):
    arc = _write_jsonl(tmp_path / "ARC-Challenge-Dev.jsonl", [ARC_ORIG, ARC_ORIG_DIGITS])
    assert [e.label for e in tasks.load_arc_jsonl(arc)] == [1, 1]
    obqa = _write_jsonl(tmp_path / "obqa.jsonl", [OBQA_ORIG])
    assert tasks.load_openbookqa_jsonl(obqa, with_fact=True)[0].context
    hs = _write_jsonl(tmp_path / "hellaswag_val.jsonl", [HELLA_ORIG, HELLA_WIKIHOW])
    assert [e.label for e in tasks.load_hellaswag_jsonl(hs)] == [3, 0]
    gsm = _write_jsonl(tmp_path / "test.jsonl", [GSM_ORIG, GSM_ORIG_BIG])
    assert [e.answer for e in tasks.load_gsm8k_jsonl(gsm)] == ["72", "1200"]
    bq = _write_jsonl(tmp_path / "dev.jsonl", [BOOLQ_ORIG, BOOLQ_HF])
    assert [e.label for e in tasks.load_boolq_jsonl(bq)] == [1, 0]


def test_natural_instructions(tmp_path):
    path = _write_json(tmp_path / "task1_title_generation.json", SNI_TASK)
    exs = tasks.load_natural_instructions_task(path, num_demonstrations=1)
    assert len(exs) == 2 and exs[0].references == ("Markets up", "Stocks rise")
    assert exs[0].target == "Markets up" and exs[0].uid == "task1-1"
    assert exs[0].meta["sni_task"] == "task1_title_generation"
    prompt, target = tasks.format_instruction(exs[0])
    assert "Generate a title" in prompt and "Cats purr" in prompt and "Dogs bark" not in prompt
    assert prompt.endswith("The stock market rose.\n\n### Response:\n") and target == "Markets up"
    assert len(tasks.parse_natural_instructions_task(SNI_TASK, max_instances=1)) == 1


def test_load_hf_uses_shared_parsers():
    calls = []
    fakes = {
        "allenai/ai2_arc": [ARC_HF],
        "allenai/openbookqa": [OBQA_HF],
        "Rowan/hellaswag": [HELLA_HF, HELLA_HF_TEST],
        "openai/gsm8k": [GSM_ORIG],
        "google/boolq": [BOOLQ_HF],
    }

    def fake_load_dataset(*args, split, **kwargs):
        calls.append((args, split, kwargs))
        return fakes[args[0]]

    got = {
        t: tasks.load_hf(t, "validation", load_dataset_fn=fake_load_dataset, cache_dir="c")
        for t in ["arc_challenge", "openbookqa", "hellaswag", "gsm8k", "boolq"]
    }
    assert calls[0] == (("allenai/ai2_arc", "ARC-Challenge"), "validation", {"cache_dir": "c"})
    assert calls[1][0] == ("allenai/openbookqa", "main")
    assert calls[2][0] == ("Rowan/hellaswag",) and calls[3][0] == ("openai/gsm8k", "main")
    assert got["arc_challenge"][0] == tasks.parse_arc_record(ARC_ORIG)
    assert got["openbookqa"][0] == tasks.parse_openbookqa_record(OBQA_ORIG)
    assert [e.label for e in got["hellaswag"]] == [3, -1]
    assert got["gsm8k"][0].answer == "72" and got["boolq"][0].label == 0
    with pytest.raises(ValueError, match="no Hugging Face mapping"):
        tasks.load_hf("piqa", "train", load_dataset_fn=fake_load_dataset)


def test_example_validation():
    with pytest.raises(ValueError):
        tasks.Example(kind="bogus", task="t", question="q")
    with pytest.raises(ValueError):
        tasks.Example(kind=tasks.MULTIPLE_CHOICE, task="t", question="q", choices=("a",))
    with pytest.raises(ValueError):
        tasks.Example(
            kind=tasks.MULTIPLE_CHOICE, task="t", question="q", choices=("a", "b"), label=2
        )
    assert tasks.canonical_task("ARC-Challenge") == "arc_challenge"
    assert tasks.canonical_task("OBQA") == "openbookqa"
    assert tasks.canonical_number("1,234.50") == "1234.5"
    assert tasks.canonical_number(18.0) == "18" and tasks.canonical_number("1e3") == "1000"
    assert tasks.canonical_number("abc") is None and tasks.canonical_number(True) is None


# --------------------------------------------------------------------------- splits / formats


def test_train_validation_split_deterministic():
    exs = [tasks.parse_gsm8k_record(dict(GSM_ORIG, question=f"q{i}")) for i in range(50)]
    tr, va = tasks.train_validation_split(exs, 10, seed=3)
    tr2, va2 = tasks.train_validation_split(exs, 10, seed=3)
    assert tr == tr2 and va == va2 and len(va) == 10 and len(tr) == 40
    assert sorted(e.question for e in tr + va) == sorted(e.question for e in exs)
    assert [exs.index(e) for e in va] == sorted(exs.index(e) for e in va)  # original order
    assert tasks.train_validation_split(exs, 10, seed=4)[1] != va
    assert len(tasks.train_validation_split(exs, 0.2, seed=0)[1]) == 10
    with pytest.raises(ValueError):
        tasks.train_validation_split(exs, 60)


def test_load_task_carves_validation(tmp_path, monkeypatch):
    recs = [
        dict(BOOLQ_LA, instruction=BOOLQ_LA["instruction"].replace("blue", f"b{i}"))
        for i in range(20)
    ]
    _write_json(tmp_path / "boolq" / "train.json", recs)
    monkeypatch.setenv("LORA_OPTAX_DATA", str(tmp_path))
    assert tasks.default_data_dir() == tmp_path
    tr = tasks.load_task("boolq", "train", validation=5, seed=1)
    va = tasks.load_task("boolq", "validation", validation=5, seed=1)
    assert len(tr) == 15 and len(va) == 5
    assert not {e.question for e in tr} & {e.question for e in va}
    assert len(tasks.load_task("boolq", "train", path=tmp_path)) == 20


def test_prompt_formatting():
    arc = tasks.parse_arc_record(ARC_HF)
    text, choices = tasks.format_encoder_multiple_choice(arc)
    assert text == arc.question and choices == list(arc.choices)
    prompt, conts = tasks.format_lm_multiple_choice(arc)
    assert prompt == "Question: Which tool measures mass?\nAnswer:" and conts[1] == " a balance"
    bq = tasks.parse_boolq_record(BOOLQ_ORIG)
    prompt, conts = tasks.format_lm_multiple_choice(bq)
    assert prompt.startswith("Penguins are") and conts == [" no", " yes"]
    p, t = tasks.format_instruction(tasks.parse_llm_adapters_record(ARC_LA, "arc"))
    assert p.startswith("Below is an instruction") and "### Instruction:\n" in p
    assert p.endswith("### Response:\n") and t == "the correct answer is answer2"
    p2, _ = tasks.format_instruction(bq, with_target=True)
    assert "### Input:\nPenguins" in p2 and p2.endswith("the correct answer is true")
    g = tasks.parse_gsm8k_record(GSM_ORIG)
    gp, gt = tasks.format_generation(g)
    assert gp.endswith("Answer:") and gt.startswith(" He baked")
    with pytest.raises(ValueError):
        tasks.format_lm_multiple_choice(g)


# --------------------------------------------------------------------------- metrics


def test_exact_match():
    assert tasks.normalize_answer("  The  Cat, sat! ") == "cat sat"
    assert tasks.exact_match("the Answer.", "answer")
    assert not tasks.exact_match("the Answer.", "answer", normalize=False)
    assert tasks.exact_match("b", ["a", "B"])
    acc = tasks.exact_match_accuracy(["a", "x", "c"], ["A", "b", ["c", "d"]])
    assert acc == pytest.approx(2 / 3)
    assert tasks.exact_match_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        tasks.exact_match_accuracy(["a"], [])


def test_multiple_choice_accuracy():
    scores = [[-1.0, -2.0, -0.5], [-3.0, -1.0], [-2.0, -2.0]]
    np.testing.assert_array_equal(tasks.multiple_choice_predictions(scores), [2, 1, 0])
    assert tasks.multiple_choice_accuracy(scores, [2, 0, 0]) == pytest.approx(2 / 3)
    padded = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.0, np.nan], [-2.0, -2.0, -np.inf]])
    assert tasks.multiple_choice_accuracy(padded, [2, 1, 0]) == 1.0
    # Length normalisation flips a long-but-likely choice.
    s, lens = [[-4.0, -6.0]], [[2, 6]]
    assert tasks.multiple_choice_predictions(s)[0] == 0
    assert tasks.multiple_choice_predictions(s, lens)[0] == 1
    assert tasks.multiple_choice_accuracy(s, [1], lens) == 1.0
    with pytest.raises(ValueError):
        tasks.multiple_choice_accuracy(s, [-1])
    with pytest.raises(ValueError):
        tasks.multiple_choice_predictions(s, [[1, 2, 3]])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is 18.", "18"),
        ("Step 1: 3 + 4 = 7\n#### 1,234", "1234"),
        ("#### 72\nThe answer is 5", "72"),
        ("She pays $1,234.50 in total.", "1234.5"),
        ("She lost -$5 today", "-5"),
        ("balance: $-7", "-7"),
        ("the temperature is -2.50 degrees", "-2.5"),
        ("from 3-5 people", "5"),
        ("10 - 5 = 5", "5"),
        ("answer: 10 - 4", "4"),
        ("numbers 1, 2, 3", "3"),
        ("1,000,000 dollars", "1000000"),
        ("we get 12.5%", "12.5"),
        ("The answer is 0.", "0"),
        ("The answer is 3.0", "3"),
        ("(-3)", "-3"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_final_number(text, expected):
    assert tasks.extract_final_number(text) == expected


def test_gsm8k_accuracy():
    gens = ["... The answer is 18.", "#### 1,200", "I think 7", "nothing"]
    assert tasks.gsm8k_accuracy(gens, ["18", 1200.0, "8", "0"]) == 0.5
    assert tasks.numbers_match("3.0", 3) and not tasks.numbers_match(None, 3)
    assert tasks.gsm8k_accuracy([], []) == 0.0


def test_rouge_l():
    pytest.importorskip("rouge_score")
    assert tasks.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert tasks.rouge_l(["dog"], ["cat"]) == 0.0
    assert tasks.rouge_l(["cats sitting"], [["a dog", "cat sits"]]) == pytest.approx(1.0)  # stems
    assert 0.0 < tasks.rouge_l(["the cat sat on the mat"], ["the cat sat"]) < 1.0


def test_rouge_l_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=r"lora_optax\[examples\]"):
        tasks.rouge_l(["a"], ["a"])


# --------------------------------------------------------------------------- batching


def test_sampler_epochs_and_determinism():
    s = tasks.BatchSampler(10, 3, seed=7)
    assert s.batches_per_epoch == 3
    epoch0 = np.concatenate([s.batch(k) for k in range(3)])
    assert len(set(epoch0.tolist())) == 9  # drop_remainder: 9 distinct of 10
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    s2 = tasks.BatchSampler(10, 3, seed=7)
    for k in [5, 0, 8, 3]:  # random access is order independent
        np.testing.assert_array_equal(s.batch(k), s2.batch(k))
    full = tasks.BatchSampler(10, 3, shuffle=False, drop_remainder=False)
    assert full.batches_per_epoch == 4 and full.batch(3).tolist() == [9]
    assert full.batch(4).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        tasks.BatchSampler(2, 3)


@pytest.mark.parametrize("k", [0, 1, 4, 7, 13])
def test_resume_from_cursor_matches_uninterrupted(k):
    data = [f"ex{i}" for i in range(11)]
    it = tasks.DataIterator(data, 4, seed=123)
    uninterrupted = [next(it) for _ in range(20)]
    first = tasks.DataIterator(data, 4, seed=123)
    for _ in range(k):
        next(first)
    saved = first.state()
    assert saved == {"cursor": k}
    resumed = tasks.DataIterator(data, 4, seed=123, cursor=saved["cursor"])
    assert [next(resumed) for _ in range(20 - k)] == uninterrupted[k:]
    other = tasks.DataIterator(data, 4, seed=0)
    other.restore(saved)
    assert other.cursor == k


def test_data_iterator_collate_and_epochs():
    data = list(range(7))
    it = tasks.DataIterator(
        data, 3, shuffle=False, drop_remainder=False, num_epochs=2, collate=_pad_ids
    )
    batches = list(it)
    assert len(batches) == 6 and it.total_batches == 6 and it.epoch == 2
    assert batches[2]["x"].shape == (3,) and batches[2]["valid"].tolist() == [True, False, False]
    assert batches[3]["x"].tolist() == [0, 1, 2]


def _pad_ids(xs: list[int]) -> dict[str, np.ndarray]:
    return tasks.pad_batch_size({"x": np.asarray(xs)}, 3)


def test_eval_batches_and_padding():
    got = list(tasks.eval_batches(5, 2))
    assert len(got) == 3
    assert got[-1][0].tolist() == [4, 0] and got[-1][1].tolist() == [True, False]
    assert sum(v.sum() for _, v in got) == 5
    ids, mask = tasks.pad_sequences([[1, 2, 3], [4]], pad_multiple=4, pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]] and mask.sum() == 4
    assert ids.dtype == np.int32
    ids, _ = tasks.pad_sequences([[1, 2, 3, 4]], 2, truncate="left")
    assert ids.tolist() == [[3, 4]]
    padded = tasks.pad_batch_size({"a": np.ones((2, 3)), "b": np.ones(2)}, 4)
    assert padded["a"].shape == (4, 3) and padded["valid"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        tasks.pad_batch_size({"a": np.ones(2), "b": np.ones(3)}, 4)


def test_pack_prompt_target():
    row = tasks.pack_prompt_target([1, 2, 3], [4, 5], 8, eos_id=6)
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 6, 0, 0]
    assert row["target_mask"].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert row["attention_mask"].sum() == 6
    short = tasks.pack_prompt_target([1, 2, 3, 4], [5, 6], 4)  # prompt cut on the left
    assert short["input_ids"].tolist() == [3, 4, 5, 6]
    tiny = tasks.pack_prompt_target([1, 2], [3, 4, 5, 6], 3)  # one prompt token kept
    assert tiny["input_ids"].tolist() == [2, 3, 4] and tiny["target_mask"].tolist() == [0, 1, 1]


# --------------------------------------------------------------------------- real data


def _real_data_dir() -> Path | None:
    candidates = [
        os.environ.get("LORA_OPTAX_DATA"),
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llm_adapters",
        "/work/shared/data/llm_adapters",
    ]
    for c in candidates:
        if c and (Path(c) / "ARC-Challenge").is_dir():
            return Path(c)
    return None


REAL_COUNTS = {
    ("arc_challenge", "train"): 1119,
    ("arc_challenge", "test"): 1172,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "test"): 500,
    ("boolq", "train"): 9427,
    ("boolq", "test"): 3270,
    ("gsm8k", "test"): 1319,
}


@pytest.mark.skipif(_real_data_dir() is None, reason="LLM-Adapters data not available")
def test_real_llm_adapters_data():
    root = _real_data_dir()
    assert root is not None
    for (task, split), count in REAL_COUNTS.items():
        file = tds._llm_adapters_file(root, task, split)
        records = tds.read_records(file)
        failures = 0
        for i, rec in enumerate(records):
            try:
                ex = tasks.parse_llm_adapters_record(rec, task, i, split)
            except tasks.ParseError:
                failures += 1
                continue
            if ex.kind != tasks.GENERATION:
                assert ex.label >= 0
                assert tasks.to_llm_adapters(ex) == (rec["instruction"], rec["output"])
            else:
                assert ex.answer is not None
        assert failures == 0, (task, split)
        assert len(records) == count, (task, split)
    gsm_json = tasks.load_llm_adapters(root / "gsm8k" / "gsm8k.json", "gsm8k")
    assert len(gsm_json) == 1319 and all(e.answer is not None for e in gsm_json)


def test_lm_prompt_styles_and_length_sorted_batches():
    """compact = the LLM-Adapters instruction prompt without the template's generic first
    sentence, same answers; packed scoring batches cover every question once, sorted by
    length, padded to multiples of 32 positions / 16 scored tokens."""
    from lora_optax.tasks import lm
    from lora_optax.tasks.tokenizers import ByteTokenizer

    exs = tasks.load_llm_adapters(tasks.packaged_data_dir(), "openbookqa", "test")[:5]
    ex = exs[0]
    full, target = lm.prompt_and_target(ex, "instruction")
    compact, target2 = lm.prompt_and_target(ex, "compact")
    assert full.startswith("Below is an instruction") and full.endswith(compact)
    assert compact.startswith("### Instruction:\n") and target == target2
    assert lm.prompt_and_candidates(ex, "compact")[1][ex.label] == target
    with pytest.raises(ValueError, match="prompt style"):
        lm.prompt_and_target(ex, "chat")
    tok = ByteTokenizer()
    encoded = lm.encode_choices(tok, exs, "compact")
    batches = lm.length_sorted_batches(encoded, 2, 4, tok.pad_id)
    order = [i for ids, _ in batches for i in ids]
    assert sorted(order) == list(range(5))
    sizes = [len(encoded[i][0]) + sum(map(len, encoded[i][1])) for i in order]
    assert sizes == sorted(sizes)
    for _, batch in batches:
        assert batch["tokens"].shape[0] == 2 and batch["tokens"].shape[1] % 32 == 0
        assert batch["target_index"].shape[1] % 16 == 0
