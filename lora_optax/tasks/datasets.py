"""Benchmark task data: the :class:`Example` record, loaders and prompt formatting.

Three task kinds share one record type (:class:`Example`):

* ``"multiple_choice"`` — ARC, OpenBookQA, HellaSwag: a question (or a context to
  complete), a tuple of choice texts and the gold index ``label``.
* ``"classification"`` — BoolQ: a 2-choice problem with ``choices == ("no", "yes")``
  (``label == 1`` means *true*) and the passage, when known, in ``context``.
* ``"generation"`` — GSM8K and Super-Natural Instructions: a prompt (``question``), the
  reference output ``target`` (all accepted outputs in ``references``) and, for GSM8K,
  the gold final number ``answer`` as a canonical string (``"18"``, ``"-3"``, ``"2.5"``).

Sources:

* the LLM-Adapters JSON files (``instruction``/``input``/``output``/``answer``), see
  :func:`load_llm_adapters`;
* the original distribution formats (ARC / OpenBookQA / HellaSwag / GSM8K / BoolQ
  ``.jsonl`` and Super-Natural Instructions task ``.json``), see ``load_*_jsonl``;
* the Hugging Face hub through ``datasets.load_dataset`` (:func:`load_hf`); hub records
  go through the same ``parse_*_record`` functions as the original-format files.

The benchmark tunes the learning rate on a validation split carved from train with
:func:`train_validation_split` (LoRA-RITE, appendix A).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

MULTIPLE_CHOICE = "multiple_choice"
CLASSIFICATION = "classification"
GENERATION = "generation"
_KINDS = (MULTIPLE_CHOICE, CLASSIFICATION, GENERATION)

#: Choice texts of the yes/no classification tasks (BoolQ); ``label == 1`` is *yes*.
BOOL_CHOICES: tuple[str, str] = ("no", "yes")

#: Environment variable naming the directory that holds the LLM-Adapters task folders.
DATA_ENV = "LORA_OPTAX_DATA"


class ParseError(ValueError):
    """A record does not have the structure its format requires."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example (multiple choice, classification or generation).

    Attributes:
      kind: ``"multiple_choice"``, ``"classification"`` or ``"generation"``.
      task: canonical task name (``"arc_challenge"``, ``"boolq"``, ``"gsm8k"``, ...).
      question: the question, the context to complete (HellaSwag) or the generation input.
      choices: choice texts (empty for generation).
      label: index of the gold choice in ``choices``; ``-1`` when unknown (unlabelled test
        sets) or for generation.
      target: reference output text for generation (the first of ``references``).
      references: every accepted reference output (generation); ``(target,)`` normally.
      answer: GSM8K-style gold final answer as a canonical number string, else ``None``.
      context: supporting text shown before the question (BoolQ passage, OpenBookQA fact).
      instruction: task definition (Super-Natural Instructions); empty otherwise.
      uid: identifier from the source when it has one, else ``"<split>-<index>"``.
      meta: extra source-specific fields (not compared by ``==``).
    """

    kind: str
    task: str
    question: str
    choices: tuple[str, ...] = ()
    label: int = -1
    target: str = ""
    references: tuple[str, ...] = ()
    answer: str | None = None
    context: str = ""
    instruction: str = ""
    uid: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == GENERATION:
            if self.choices:
                raise ValueError("generation examples have no choices")
        elif len(self.choices) < 2:
            raise ValueError(f"{self.kind} examples need at least 2 choices")
        if not -1 <= self.label < max(len(self.choices), 1):
            raise ValueError(f"label {self.label} out of range for {len(self.choices)} choices")
        if self.kind == GENERATION and self.target and not self.references:
            object.__setattr__(self, "references", (self.target,))

    @property
    def num_choices(self) -> int:
        """Number of choices (0 for generation)."""
        return len(self.choices)

    @property
    def gold(self) -> str:
        """The gold output text: the gold choice, or ``target`` for generation."""
        if self.kind == GENERATION:
            return self.target
        return self.choices[self.label] if self.label >= 0 else ""


# --------------------------------------------------------------------------- names


_TASK_ALIASES: dict[str, str] = {
    "arc_challenge": "arc_challenge",
    "arc_c": "arc_challenge",
    "arcc": "arc_challenge",
    "arcchallenge": "arc_challenge",
    "arc_easy": "arc_easy",
    "arc_e": "arc_easy",
    "arceasy": "arc_easy",
    "openbookqa": "openbookqa",
    "openbook_qa": "openbookqa",
    "obqa": "openbookqa",
    "hellaswag": "hellaswag",
    "hella_swag": "hellaswag",
    "gsm8k": "gsm8k",
    "gsm_8k": "gsm8k",
    "boolq": "boolq",
    "bool_q": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "social_i_qa": "social_i_qa",
    "social_iqa": "social_i_qa",
    "winogrande": "winogrande",
    "natural_instructions": "natural_instructions",
    "super_natural_instructions": "natural_instructions",
    "sni": "natural_instructions",
}

#: Folder names of the tasks in the LLM-Adapters data layout.
_LLM_ADAPTERS_DIRS: dict[str, str] = {
    "arc_challenge": "ARC-Challenge",
    "arc_easy": "ARC-Easy",
    "openbookqa": "openbookqa",
    "hellaswag": "hellaswag",
    "gsm8k": "gsm8k",
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_i_qa",
    "winogrande": "winogrande",
}


def canonical_task(name: str) -> str:
    """Canonical task name: ``"ARC-Challenge"``, ``"arc-c"`` → ``"arc_challenge"``, etc.

    Unknown names are lower-cased with ``-``/spaces replaced by ``_``.
    """
    key = re.sub(r"[\s\-/]+", "_", name.strip().lower())
    return _TASK_ALIASES.get(key, key)


def packaged_data_dir() -> Path:
    """The task data shipped inside the package, in the LLM-Adapters layout.

    Holds ``openbookqa/`` only: the first 1000 train and 200 test questions of
    OpenBookQA (Apache-2.0; attribution and licences in ``openbookqa/NOTICE.md``), for
    the README's first run and the tests::

        tasks.load_llm_adapters(tasks.packaged_data_dir(), "openbookqa", "test")
    """
    return Path(__file__).resolve().parent / "data"


def default_data_dir() -> Path | None:
    """The LLM-Adapters data directory named by ``$LORA_OPTAX_DATA``, if it exists."""
    value = os.environ.get(DATA_ENV)
    if value and Path(value).is_dir():
        return Path(value)
    return None


# --------------------------------------------------------------------------- numbers


def canonical_number(value: Any) -> str | None:
    """Canonical decimal string of a number: ``"1,234.50"`` → ``"1234.5"``, ``18.0`` → ``"18"``.

    Accepts ints, floats and strings (with optional ``$``, thousands commas, sign, ``%``).
    Returns ``None`` when ``value`` is not a finite number.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip().replace(",", "").replace("$", "").replace("−", "-")
    text = text.rstrip("%").rstrip(".").strip()
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    if number == 0:
        return "0"
    out = format(number.normalize(), "f")
    return out


# --------------------------------------------------------------------------- files


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a ``.json`` list (or ``{"data": [...]}``) or a ``.jsonl`` file of records."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or not stripped.startswith(("[", "{")):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # A .json file that is really JSON lines.
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        for key in ("data", "examples", "Instances"):
            if isinstance(data.get(key), list):
                return list(data[key])
        return [data]
    if not isinstance(data, list):
        raise ParseError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _parse_all(
    records: Iterable[Mapping[str, Any]],
    parse: Callable[[Mapping[str, Any], int], Example],
    *,
    errors: str,
    source: str,
) -> list[Example]:
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    out: list[Example] = []
    failures: list[str] = []
    for i, record in enumerate(records):
        try:
            out.append(parse(record, i))
        except (ParseError, KeyError, TypeError, ValueError) as e:
            if errors == "raise":
                raise ParseError(f"{source}: record {i}: {e}") from e
            failures.append(f"{i}: {e}")
    if failures:
        warnings.warn(
            f"{source}: skipped {len(failures)} unparsable record(s), e.g. {failures[:3]}",
            stacklevel=3,
        )
    return out


# --------------------------------------------------------------------------- LLM-Adapters

_FORMAT_RE = re.compile(r"\n\s*Answer format:\s*(?P<labels>[^\n]*?)\s*$", re.IGNORECASE)
_PREAMBLE_RE = re.compile(r"^\s*(?P<pre>Please [^:\n]*:)[ \t]*")
_CHOICE_LABEL_RE = re.compile(r"^(?P<prefix>[a-z_]+?)(?P<num>\d+)$")
_OUTPUT_ANSWER_RE = re.compile(r"answer is\s*:?\s*(?P<ans>[A-Za-z_]*\d+|true|false)", re.I)
_BOOL_WORDS = {"true": 1, "false": 0, "yes": 1, "no": 0}


def _locate_markers(body: str, prefix: str, n: int) -> list[tuple[int, int]] | None:
    """Spans of ``Prefix1:`` … ``PrefixN:`` in order; prefers the last ``Prefix1:`` that works."""
    patterns = [
        re.compile(rf"\b{re.escape(prefix)}{i}\s*:", re.IGNORECASE) for i in range(1, n + 1)
    ]
    starts = list(patterns[0].finditer(body))
    for first in reversed(starts):
        spans = [first.span()]
        pos = first.end()
        for pat in patterns[1:]:
            m = pat.search(body, pos)
            if m is None:
                break
            spans.append(m.span())
            pos = m.end()
        if len(spans) == n:
            return spans
    return None


def _answer_index(record: Mapping[str, Any], labels: Sequence[str]) -> int:
    answer = str(record.get("answer", "")).strip().lower()
    if answer in labels:
        return labels.index(answer)
    m = _OUTPUT_ANSWER_RE.search(str(record.get("output", "")))
    if m and m["ans"].lower() in labels:
        return labels.index(m["ans"].lower())
    raise ParseError(f"answer {record.get('answer')!r} not among {list(labels)}")


def parse_llm_adapters_record(
    record: Mapping[str, Any], task: str = "", index: int = 0, split: str = ""
) -> Example:
    """Parses one LLM-Adapters record (``instruction``, ``input``, ``output``, ``answer``).

    Multiple-choice instructions embed the choices as ``Answer1: … Answer2: …`` (or
    ``Ending1:``/``Option1:``/``Solution1:``) followed by ``Answer format: answer1/…``;
    the gold is ``answer == "answer<k>"``. BoolQ uses ``Answer format: true/false`` and
    becomes a 2-choice classification over :data:`BOOL_CHOICES`. Records without an
    ``Answer format`` line (GSM8K and the other math sets) are generation examples whose
    ``answer`` is the gold final number. The ``gsm8k.json`` layout (``sQuestion``,
    ``lSolutions``) is accepted too.

    Note: in the redistributed ``gsm8k/test.json`` the ``output`` field is a model-written
    rationale, not a gold one; score with ``answer``. It is kept as ``target`` (or
    ``"The answer is N."`` when empty) and in ``meta["output"]``.

    Raises:
      ParseError: the record does not match any of these layouts.
    """
    task = canonical_task(task) if task else ""
    uid = f"{split or 'record'}-{index}"
    if "sQuestion" in record:
        sol = record.get("lSolutions")
        if isinstance(sol, (list, tuple)):
            sol = sol[0] if sol else None
        answer = canonical_number(sol)
        if answer is None:
            raise ParseError(f"lSolutions {record.get('lSolutions')!r} is not a number")
        return Example(
            kind=GENERATION,
            task=task or "gsm8k",
            question=str(record["sQuestion"]).strip(),
            target=f"The answer is {answer}.",
            answer=answer,
            uid=str(record.get("iIndex", uid)),
        )
    for key in ("instruction", "answer"):
        if key not in record:
            raise ParseError(f"missing field {key!r}")
    instruction = str(record["instruction"])
    extra = str(record.get("input") or "").strip()
    m = _FORMAT_RE.search(instruction)
    if m is None:
        # Generation (math word problems).
        raw_answer = record.get("answer")
        answer = canonical_number(raw_answer)
        if answer is None:
            answer = str(raw_answer).strip() or None
        if answer is None:
            raise ParseError("generation record without an answer")
        output = str(record.get("output") or "")
        return Example(
            kind=GENERATION,
            task=task,
            question=instruction.strip(),
            target=output.strip() or f"The answer is {answer}.",
            answer=answer,
            context=extra,
            uid=uid,
            meta={"output": output},
        )
    labels = [part.strip().lower() for part in m["labels"].split("/") if part.strip()]
    body = instruction[: m.start()]
    pm = _PREAMBLE_RE.match(body)
    preamble = pm["pre"] if pm else ""
    body = body[pm.end() :] if pm else body
    if len(labels) == 2 and set(labels) <= set(_BOOL_WORDS):
        answer = str(record["answer"]).strip().lower()
        if answer not in _BOOL_WORDS:
            ma = _OUTPUT_ANSWER_RE.search(str(record.get("output", "")))
            answer = ma["ans"].lower() if ma else answer
        if answer not in _BOOL_WORDS:
            raise ParseError(f"boolean answer expected, got {record['answer']!r}")
        question = body.strip()
        if not question:
            raise ParseError("empty question")
        return Example(
            kind=CLASSIFICATION,
            task=task or "boolq",
            question=question,
            choices=BOOL_CHOICES,
            label=_BOOL_WORDS[answer],
            context=extra,
            uid=uid,
            meta={"preamble": preamble, "answer_labels": tuple(labels)},
        )
    parsed = [_CHOICE_LABEL_RE.match(label) for label in labels]
    if len(labels) < 2 or any(p is None for p in parsed):
        raise ParseError(f"unrecognised answer format {m['labels']!r}")
    prefixes = {p["prefix"] for p in parsed if p is not None}
    numbers = [int(p["num"]) for p in parsed if p is not None]
    if len(prefixes) != 1 or numbers != list(range(1, len(labels) + 1)):
        raise ParseError(f"answer labels must be prefix1..prefixN, got {labels}")
    prefix = prefixes.pop()
    spans = _locate_markers(body, prefix, len(labels))
    if spans is None:
        raise ParseError(f"could not find {prefix}1..{prefix}{len(labels)} in the instruction")
    question = body[: spans[0][0]].strip()
    ends = [s[0] for s in spans[1:]] + [len(body)]
    choices = tuple(body[s[1] : e].strip() for s, e in zip(spans, ends))
    if not question:
        raise ParseError("empty question")
    if any(not c for c in choices):
        raise ParseError("empty choice text")
    return Example(
        kind=MULTIPLE_CHOICE,
        task=task,
        question=question,
        choices=choices,
        label=_answer_index(record, labels),
        context=extra,
        uid=uid,
        meta={"preamble": preamble, "choice_prefix": prefix},
    )


def _llm_adapters_file(path: Path, task: str, split: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    names = [f"{split}.json", f"{split}.jsonl"]
    if task == "gsm8k" and split == "test":
        names.append("gsm8k.json")
    folders = [path]
    wanted = {_LLM_ADAPTERS_DIRS.get(task, task).lower(), task.lower()}
    folders += sorted(p for p in path.iterdir() if p.is_dir() and p.name.lower() in wanted)
    for folder in folders[1:] + folders[:1]:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no {split!r} file for task {task!r} under {path}")


def load_llm_adapters(
    path_or_dir: str | os.PathLike[str],
    task: str,
    split: str = "train",
    *,
    errors: str = "raise",
) -> list[Example]:
    """Loads a task in the LLM-Adapters JSON format.

    Args:
      path_or_dir: a ``.json`` file, a task folder (holding ``train.json``/``test.json``)
        or the root folder holding the task folders (``ARC-Challenge/``, ``openbookqa/``,
        ``boolq/``, ``gsm8k/``, ...). For GSM8K ``test`` the loader falls back to
        ``gsm8k.json`` when ``test.json`` is absent.
      task: task name (aliases accepted, see :func:`canonical_task`).
      split: ``"train"`` or ``"test"`` (the file name without ``.json``).
      errors: ``"raise"`` (default) to fail on the first unparsable record, or ``"skip"``
        to drop such records with a warning.

    Returns:
      The parsed examples, in file order.
    """
    task = canonical_task(task)
    file = _llm_adapters_file(Path(path_or_dir), task, split)
    records = read_records(file)
    return _parse_all(
        records,
        lambda r, i: parse_llm_adapters_record(r, task, i, split),
        errors=errors,
        source=str(file),
    )


# --------------------------------------------------------------------------- original formats


def _choices_from(record: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(labels, texts) from ``[{label, text}]`` (original) or ``{label: [], text: []}`` (HF)."""
    choices = record["choices"] if "choices" in record else record["question"]["choices"]
    if isinstance(choices, Mapping):
        texts = [str(t) for t in choices["text"]]
        labels = [str(lab) for lab in choices.get("label", range(len(texts)))]
    else:
        texts = [str(c["text"]) for c in choices]
        labels = [str(c.get("label", i)) for i, c in enumerate(choices)]
    if len(texts) != len(labels):
        raise ParseError("choice labels and texts differ in length")
    return labels, [t.strip() for t in texts]


def _gold_index(key: Any, labels: Sequence[str]) -> int:
    if key is None or str(key).strip() == "":
        return -1
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    upper = [lab.upper() for lab in labels]
    if key.upper() in upper:
        return upper.index(key.upper())
    raise ParseError(f"answerKey {key!r} not among {list(labels)}")


def parse_arc_record(
    record: Mapping[str, Any], task: str = "arc_challenge", index: int = 0
) -> Example:
    """Parses an ARC record, original (``question.stem``) or Hugging Face (``question`` str).

    Original: ``{"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}``.
    HF ``allenai/ai2_arc``: ``{"id", "question", "choices": {"text": [], "label": []},
    "answerKey"}``. Labels may be letters or digits.
    """
    q = record["question"]
    stem = q["stem"] if isinstance(q, Mapping) else q
    labels, texts = _choices_from(record)
    return Example(
        kind=MULTIPLE_CHOICE,
        task=canonical_task(task),
        question=str(stem).strip(),
        choices=tuple(texts),
        label=_gold_index(record.get("answerKey"), labels),
        uid=str(record.get("id", index)),
        meta={"choice_labels": tuple(labels)},
    )


def parse_openbookqa_record(
    record: Mapping[str, Any], index: int = 0, *, with_fact: bool = False
) -> Example:
    """Parses an OpenBookQA record, original or Hugging Face (``allenai/openbookqa``).

    Original: same schema as ARC plus an optional ``fact1`` (``Additional`` release).
    HF: ``{"id", "question_stem", "choices": {"text", "label"}, "answerKey"}`` and, in the
    ``additional`` config, ``fact1``. With ``with_fact`` the fact becomes ``context``.
    """
    if "question_stem" in record:
        stem = record["question_stem"]
    else:
        q = record["question"]
        stem = q["stem"] if isinstance(q, Mapping) else q
    labels, texts = _choices_from(record)
    fact = str(record.get("fact1") or "").strip()
    return Example(
        kind=MULTIPLE_CHOICE,
        task="openbookqa",
        question=str(stem).strip(),
        choices=tuple(texts),
        label=_gold_index(record.get("answerKey"), labels),
        context=fact if with_fact else "",
        uid=str(record.get("id", index)),
        meta={"choice_labels": tuple(labels), "fact1": fact},
    )


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def parse_hellaswag_record(record: Mapping[str, Any], index: int = 0) -> Example:
    """Parses a HellaSwag record (original jsonl or ``Rowan/hellaswag``; same fields).

    The context is ``ctx_a + " " + ctx_b.capitalize()`` (or ``ctx``), prefixed by the
    activity label and cleaned of WikiHow markup such as ``[title]``; the label is an int
    or a digit string (empty / missing on the unlabelled test split → ``-1``).
    """
    if "ctx_a" in record:
        ctx_b = str(record.get("ctx_b") or "")
        ctx = str(record["ctx_a"]).strip() + (" " + ctx_b.capitalize() if ctx_b else "")
    else:
        ctx = str(record["ctx"])
    activity = str(record.get("activity_label") or "").strip()
    question = _clean_hellaswag(ctx)
    if activity:
        question = f"{activity}: {question}"
    endings = tuple(_clean_hellaswag(str(e)) for e in record["endings"])
    raw = record.get("label")
    label = -1 if raw is None or str(raw).strip() == "" else int(raw)
    return Example(
        kind=MULTIPLE_CHOICE,
        task="hellaswag",
        question=question,
        choices=endings,
        label=label,
        uid=str(record.get("ind", index)),
        meta={"source_id": record.get("source_id"), "split_type": record.get("split_type")},
    )


_CALC_RE = re.compile(r"<<[^>]*>>")
_GSM8K_FINAL_RE = re.compile(r"####\s*(?P<ans>[^\n]*)\s*$")


def parse_gsm8k_record(
    record: Mapping[str, Any], index: int = 0, *, strip_calculator: bool = True
) -> Example:
    """Parses a GSM8K record ``{"question", "answer": "<rationale>\\n#### N"}`` (original/HF).

    ``target`` is the rationale (calculator annotations ``<<…>>`` removed by default)
    ending in ``#### N``; ``answer`` is the canonical ``N``.
    """
    solution = str(record["answer"])
    m = _GSM8K_FINAL_RE.search(solution)
    if m is None:
        raise ParseError("GSM8K answer lacks the '#### N' line")
    answer = canonical_number(m["ans"])
    if answer is None:
        raise ParseError(f"GSM8K final answer {m['ans']!r} is not a number")
    target = _CALC_RE.sub("", solution) if strip_calculator else solution
    return Example(
        kind=GENERATION,
        task="gsm8k",
        question=str(record["question"]).strip(),
        target=target.strip(),
        answer=answer,
        uid=str(record.get("id", index)),
    )


def parse_boolq_record(record: Mapping[str, Any], index: int = 0) -> Example:
    """Parses a BoolQ record ``{"question", "passage", "answer": bool}`` (original/HF).

    Becomes a 2-choice classification over :data:`BOOL_CHOICES` with the passage as
    ``context``; original-format questions lack a ``?``, which is added.
    """
    raw = record["answer"]
    if isinstance(raw, str):
        if raw.strip().lower() not in _BOOL_WORDS:
            raise ParseError(f"BoolQ answer {raw!r} is not boolean")
        label = _BOOL_WORDS[raw.strip().lower()]
    else:
        label = int(bool(raw))
    question = str(record["question"]).strip()
    if question and not question.endswith("?"):
        question += "?"
    return Example(
        kind=CLASSIFICATION,
        task="boolq",
        question=question,
        choices=BOOL_CHOICES,
        label=label,
        context=str(record.get("passage") or "").strip(),
        uid=str(record.get("idx", index)),
        meta={"title": record.get("title")},
    )


def _load_jsonl(
    path: str | os.PathLike[str], parse: Callable[[Mapping[str, Any], int], Example], errors: str
) -> list[Example]:
    return _parse_all(read_records(path), parse, errors=errors, source=str(path))


def load_arc_jsonl(
    path: str | os.PathLike[str], task: str = "arc_challenge", *, errors: str = "raise"
) -> list[Example]:
    """Loads an original ARC ``.jsonl`` file (e.g. ``ARC-Challenge-Train.jsonl``)."""
    return _load_jsonl(path, lambda r, i: parse_arc_record(r, task, i), errors)


def load_openbookqa_jsonl(
    path: str | os.PathLike[str], *, with_fact: bool = False, errors: str = "raise"
) -> list[Example]:
    """Loads an original OpenBookQA ``.jsonl`` file (``Main`` or ``Additional`` release)."""
    return _load_jsonl(
        path, lambda r, i: parse_openbookqa_record(r, i, with_fact=with_fact), errors
    )


def load_hellaswag_jsonl(path: str | os.PathLike[str], *, errors: str = "raise") -> list[Example]:
    """Loads an original HellaSwag ``.jsonl`` file (``hellaswag_{train,val,test}.jsonl``)."""
    return _load_jsonl(path, parse_hellaswag_record, errors)


def load_gsm8k_jsonl(
    path: str | os.PathLike[str], *, strip_calculator: bool = True, errors: str = "raise"
) -> list[Example]:
    """Loads an original GSM8K ``.jsonl`` file (``train.jsonl`` / ``test.jsonl``)."""
    return _load_jsonl(
        path, lambda r, i: parse_gsm8k_record(r, i, strip_calculator=strip_calculator), errors
    )


def load_boolq_jsonl(path: str | os.PathLike[str], *, errors: str = "raise") -> list[Example]:
    """Loads an original BoolQ ``.jsonl`` file (``train.jsonl`` / ``dev.jsonl``)."""
    return _load_jsonl(path, parse_boolq_record, errors)


def parse_natural_instructions_task(
    task_data: Mapping[str, Any],
    *,
    name: str = "",
    max_instances: int | None = None,
    num_demonstrations: int = 0,
) -> list[Example]:
    """Converts one Super-Natural Instructions task (already-decoded JSON) to examples.

    Args:
      task_data: the task JSON: ``Definition`` (list of str or str), ``Positive Examples``
        (``[{input, output, explanation}]``) and ``Instances`` (``[{id, input, output: [..]}]``).
      name: task name stored in ``meta["sni_task"]`` (e.g. ``"task1385_anli_r1_entailment"``).
      max_instances: keep only the first this-many instances.
      num_demonstrations: how many positive examples each example carries in
        ``meta["demonstrations"]`` (used by :func:`format_instruction`).

    Returns:
      Generation examples; ``references`` holds every accepted output.
    """
    definition = task_data.get("Definition", "")
    if isinstance(definition, (list, tuple)):
        definition = "\n".join(str(d) for d in definition)
    demos = tuple(
        (str(d["input"]).strip(), str(d["output"]).strip())
        for d in list(task_data.get("Positive Examples") or [])[:num_demonstrations]
    )
    instances = task_data["Instances"]
    if max_instances is not None:
        instances = instances[:max_instances]
    out = []
    for i, inst in enumerate(instances):
        outputs = inst["output"]
        refs = (outputs,) if isinstance(outputs, str) else tuple(str(o) for o in outputs)
        refs = tuple(r.strip() for r in refs)
        if not refs:
            raise ParseError(f"instance {i} has no output")
        out.append(
            Example(
                kind=GENERATION,
                task="natural_instructions",
                question=str(inst["input"]).strip(),
                target=refs[0],
                references=refs,
                instruction=str(definition).strip(),
                uid=str(inst.get("id", f"{name}-{i}")),
                meta={"sni_task": name, "demonstrations": demos},
            )
        )
    return out


def load_natural_instructions_task(
    path: str | os.PathLike[str],
    *,
    max_instances: int | None = None,
    num_demonstrations: int = 0,
) -> list[Example]:
    """Loads one Super-Natural Instructions task file (``tasks/taskNNN_*.json``).

    See :func:`parse_natural_instructions_task` for the arguments.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    return parse_natural_instructions_task(
        data, name=path.stem, max_instances=max_instances, num_demonstrations=num_demonstrations
    )


# --------------------------------------------------------------------------- Hugging Face

#: Hugging Face hub (dataset name, config, record parser) per task.
HF_DATASETS: dict[str, tuple[str, str | None, Callable[[Mapping[str, Any], int], Example]]] = {
    "arc_challenge": (
        "allenai/ai2_arc",
        "ARC-Challenge",
        lambda r, i: parse_arc_record(r, "arc_challenge", i),
    ),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", lambda r, i: parse_arc_record(r, "arc_easy", i)),
    "openbookqa": ("allenai/openbookqa", "main", parse_openbookqa_record),
    "hellaswag": ("Rowan/hellaswag", None, parse_hellaswag_record),
    "gsm8k": ("openai/gsm8k", "main", parse_gsm8k_record),
    "boolq": ("google/boolq", None, parse_boolq_record),
}


def load_hf(
    task: str,
    split: str,
    *,
    errors: str = "raise",
    load_dataset_fn: Callable[..., Iterable[Mapping[str, Any]]] | None = None,
    **kwargs: Any,
) -> list[Example]:
    """Loads a task from the Hugging Face hub with ``datasets.load_dataset``.

    Tasks: ``arc_challenge`` (``allenai/ai2_arc``/``ARC-Challenge``), ``arc_easy``,
    ``openbookqa`` (``allenai/openbookqa``/``main``), ``hellaswag`` (``Rowan/hellaswag``),
    ``gsm8k`` (``openai/gsm8k``/``main``), ``boolq`` (``google/boolq``). Records go through
    the same ``parse_*_record`` functions as the original-format files.

    Args:
      task: task name.
      split: hub split name (``"train"``, ``"validation"``, ``"test"``).
      errors: ``"raise"`` or ``"skip"``.
      load_dataset_fn: replacement for ``datasets.load_dataset`` (testing / mirrors).
      **kwargs: passed on to ``load_dataset`` (e.g. ``cache_dir``, ``revision``).
    """
    task = canonical_task(task)
    if task not in HF_DATASETS:
        raise ValueError(f"no Hugging Face mapping for task {task!r}; known: {list(HF_DATASETS)}")
    name, config, parse = HF_DATASETS[task]
    if load_dataset_fn is None:
        try:
            from datasets import load_dataset
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "loading from the Hugging Face hub needs the `datasets` package "
                "(pip install datasets)"
            ) from e
        load_dataset_fn = load_dataset
    args = (name, config) if config is not None else (name,)
    records = load_dataset_fn(*args, split=split, **kwargs)
    return _parse_all(records, parse, errors=errors, source=f"{name}:{split}")


# --------------------------------------------------------------------------- splits


def train_validation_split(
    examples: Sequence[Example], validation: int | float, *, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministically carves a validation split out of ``examples`` (the train split).

    Args:
      examples: the training examples.
      validation: number of validation examples, or a fraction in ``(0, 1)``.
      seed: permutation seed; the same seed always gives the same split.

    Returns:
      ``(train, validation)``, both in the original order; together they partition
      ``examples``.
    """
    n = len(examples)
    if isinstance(validation, float) and 0 < validation < 1:
        n_val = round(n * validation)
    elif isinstance(validation, (int, np.integer)) and not isinstance(validation, bool):
        n_val = int(validation)
    else:
        raise ValueError(f"validation must be an int count or a fraction in (0, 1): {validation}")
    if not 0 <= n_val <= n:
        raise ValueError(f"validation size {n_val} out of range for {n} examples")
    perm = np.random.default_rng(np.random.SeedSequence([seed, n])).permutation(n)
    val_mask = np.zeros(n, dtype=bool)
    val_mask[perm[:n_val]] = True
    train = [ex for ex, v in zip(examples, val_mask) if not v]
    val = [ex for ex, v in zip(examples, val_mask) if v]
    return train, val


def load_task(
    task: str,
    split: str,
    *,
    source: str = "llm_adapters",
    path: str | os.PathLike[str] | None = None,
    validation: int | float | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> list[Example]:
    """One entry point for the benchmark scripts.

    Args:
      task: task name.
      split: ``"train"``, ``"validation"`` or ``"test"``.
      source: ``"llm_adapters"`` (``path`` = data root, default ``$LORA_OPTAX_DATA``) or
        ``"hf"`` (the hub).
      path: data root / file for ``"llm_adapters"``.
      validation: when given, ``"validation"`` is this many (or this fraction of) train
        examples carved with :func:`train_validation_split` and ``"train"`` is the rest;
        when ``None``, ``"validation"`` is read from the source as is.
      seed: seed of the validation carve.
      **kwargs: passed to the loader.
    """
    task = canonical_task(task)
    if source not in ("llm_adapters", "hf"):
        raise ValueError(f"source must be 'llm_adapters' or 'hf', got {source!r}")

    def load(s: str) -> list[Example]:
        if source == "hf":
            return load_hf(task, s, **kwargs)
        root = path if path is not None else default_data_dir()
        if root is None:
            raise ValueError(f"no data path given and ${DATA_ENV} is not set")
        return load_llm_adapters(root, task, s, **kwargs)

    if validation is not None and split in ("train", "validation"):
        train, val = train_validation_split(load("train"), validation, seed=seed)
        return train if split == "train" else val
    return load(split)


# --------------------------------------------------------------------------- formatting


_COMPLETION_TASKS = frozenset({"hellaswag"})

#: The Alpaca-style instruction template used by LLM-Adapters.
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: The same template for records with a non-empty ``input``.
INSTRUCTION_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_DEFAULT_PREAMBLES = {
    "hellaswag": "Please choose the correct ending to complete the given sentence:",
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given sentence:"
    ),
    "piqa": "Please choose the correct solution to the question:",
}
_DEFAULT_PREFIXES = {"hellaswag": "ending", "winogrande": "option", "piqa": "solution"}


def to_llm_adapters(ex: Example) -> tuple[str, str]:
    """Renders an example as an LLM-Adapters ``(instruction, output)`` pair.

    Multiple choice: ``"Please choose the correct answer to the question: {q}\\n\\n
    Answer1: … Answer2: …\\n\\nAnswer format: answer1/answer2/…"`` → ``"the correct answer
    is answer<k>"``; classification: ``"Please answer the following question with true or
    false, question: {q}\\n\\nAnswer format: true/false"`` → ``"the correct answer is
    true"``; generation: ``(question, target)``. Examples parsed from LLM-Adapters files
    reproduce their original instruction text.
    """
    if ex.kind == GENERATION:
        return ex.question, ex.target
    if ex.kind == CLASSIFICATION:
        preamble = ex.meta.get(
            "preamble", "Please answer the following question with true or false, question:"
        )
        words = tuple(ex.meta.get("answer_labels", ("true", "false")))
        by_label = {_BOOL_WORDS[w]: w for w in words}
        instruction = f"{preamble} {ex.question}\n\nAnswer format: {'/'.join(words)}"
        output = f"the correct answer is {by_label[ex.label]}" if ex.label >= 0 else ""
        return instruction, output
    preamble = ex.meta.get(
        "preamble",
        _DEFAULT_PREAMBLES.get(ex.task, "Please choose the correct answer to the question:"),
    )
    prefix = ex.meta.get("choice_prefix", _DEFAULT_PREFIXES.get(ex.task, "answer"))
    marker = prefix[:1].upper() + prefix[1:]
    choices = " ".join(f"{marker}{i}: {c}" for i, c in enumerate(ex.choices, 1))
    labels = "/".join(f"{prefix}{i}" for i in range(1, ex.num_choices + 1))
    instruction = f"{preamble} {ex.question}\n\n{choices}\n\nAnswer format: {labels}"
    output = f"the correct answer is {prefix}{ex.label + 1}" if ex.label >= 0 else ""
    return instruction, output


def format_instruction(ex: Example, *, with_target: bool = False) -> tuple[str, str]:
    """Instruction-tuning ``(prompt, target)`` in the LLM-Adapters (Alpaca) template.

    Super-Natural Instructions examples use their task definition as the instruction,
    optionally preceded by ``meta["demonstrations"]``, and the instance as the input.
    With ``with_target`` the prompt already ends with the target (for training on the full
    sequence); the target is returned either way.
    """
    if ex.task == "natural_instructions" or ex.instruction:
        parts = [ex.instruction] if ex.instruction else []
        for i, (d_in, d_out) in enumerate(ex.meta.get("demonstrations", ()), 1):
            parts.append(f"Example {i}:\nInput: {d_in}\nOutput: {d_out}")
        prompt = INSTRUCTION_INPUT_TEMPLATE.format(
            instruction="\n\n".join(parts), input=ex.question
        )
        target = ex.target
    else:
        instruction, target = to_llm_adapters(ex)
        if ex.context:
            prompt = INSTRUCTION_INPUT_TEMPLATE.format(instruction=instruction, input=ex.context)
        else:
            prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction)
    return (prompt + target if with_target else prompt), target


def format_encoder_multiple_choice(ex: Example) -> tuple[str, list[str]]:
    """``(text, choice_texts)`` for an encoder multiple-choice head.

    The text is the context (if any) and the question separated by a newline; each
    choice is paired with it by the model's tokenizer (``text`` / ``choice`` segments).
    """
    if ex.kind == GENERATION:
        raise ValueError("generation examples have no choices")
    text = f"{ex.context}\n{ex.question}" if ex.context else ex.question
    return text, list(ex.choices)


def format_lm_multiple_choice(ex: Example) -> tuple[str, list[str]]:
    """``(prompt, continuations)`` for scoring each choice with a decoder LM.

    Completion tasks (HellaSwag) score ``" " + ending`` after the context; the others use
    ``"[context\\n]Question: {q}\\nAnswer:"`` and ``" " + choice``. Score each choice by the
    log-likelihood of its continuation tokens (see :func:`lora_optax.tasks.pack_prompt_target`).
    """
    if ex.kind == GENERATION:
        raise ValueError("generation examples have no choices")
    if ex.task in _COMPLETION_TASKS:
        prompt = ex.question
    else:
        prompt = f"Question: {ex.question}\nAnswer:"
        if ex.context:
            prompt = f"{ex.context}\n{prompt}"
    return prompt, [" " + c for c in ex.choices]


def format_generation(ex: Example) -> tuple[str, str]:
    """``(prompt, target)`` for plain question → answer generation (e.g. GSM8K).

    The prompt is ``"[context\\n]Question: {q}\\nAnswer:"`` and the target starts with a
    space; for instruction-style prompts use :func:`format_instruction`.
    """
    prompt = f"Question: {ex.question}\nAnswer:"
    if ex.context:
        prompt = f"{ex.context}\n{prompt}"
    return prompt, " " + ex.gold
