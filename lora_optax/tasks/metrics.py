"""Evaluation metrics: exact match, multiple-choice accuracy, GSM8K accuracy and ROUGE-L.

All accuracies are fractions in ``[0, 1]`` (multiply by 100 for the paper's tables).
ROUGE-L needs the optional ``rouge-score`` package (``pip install lora_optax[examples]``).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_optax.tasks.datasets import canonical_number

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-cases, drops punctuation and the articles a/an/the, collapses whitespace."""
    text = str(text).lower().translate(_PUNCT_TABLE)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _as_refs(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def exact_match(prediction: str, reference: str | Sequence[str], *, normalize: bool = True) -> bool:
    """Whether ``prediction`` equals the reference (or any of several references).

    With ``normalize`` both sides go through :func:`normalize_answer`; otherwise only
    surrounding whitespace is stripped.
    """
    norm = normalize_answer if normalize else str.strip
    pred = norm(prediction)
    return any(pred == norm(ref) for ref in _as_refs(reference))


def exact_match_accuracy(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    normalize: bool = True,
) -> float:
    """Mean :func:`exact_match` over examples (each reference may be a list of strings)."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = [exact_match(p, r, normalize=normalize) for p, r in zip(predictions, references)]
    return float(np.mean(hits))


def _check_lengths(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions vs {len(b)} references")


def multiple_choice_predictions(
    scores: Sequence[Sequence[float]] | np.ndarray,
    lengths: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """Predicted choice per example: argmax of per-choice log-likelihoods.

    Args:
      scores: per-example sequences of per-choice summed log-likelihoods; ragged lists
        are allowed, as is a 2-D array padded with ``-inf`` or ``nan``.
      lengths: optional per-choice lengths (tokens, characters or bytes), same shape as
        ``scores``: the prediction then uses ``score / length`` (length-normalised
        accuracy, ``acc_norm``).

    Returns:
      int array of predicted indices (ties → the first maximal choice).
    """
    preds = []
    for i, row in enumerate(scores):
        s = np.asarray(row, dtype=np.float64)
        if lengths is not None:
            lens = np.asarray(lengths[i], dtype=np.float64)
            if lens.shape != s.shape:
                raise ValueError(f"example {i}: lengths shape {lens.shape} != scores {s.shape}")
            s = np.where(lens > 0, s / np.where(lens > 0, lens, 1.0), -np.inf)
        s = np.where(np.isnan(s), -np.inf, s)
        if s.size == 0:
            raise ValueError(f"example {i} has no choices")
        preds.append(int(np.argmax(s)))
    return np.asarray(preds, dtype=np.int64)


def multiple_choice_accuracy(
    scores: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    lengths: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> float:
    """Accuracy of :func:`multiple_choice_predictions` against the gold ``labels``.

    Examples with label ``-1`` (unlabelled) are not allowed.
    """
    preds = multiple_choice_predictions(scores, lengths)
    gold = np.asarray(labels, dtype=np.int64)
    _check_lengths(preds, gold)
    if np.any(gold < 0):
        raise ValueError("labels contain -1 (unlabelled examples)")
    if gold.size == 0:
        return 0.0
    return float(np.mean(preds == gold))


# Number with optional sign, '$' and thousands commas; not part of a larger number/word.
# A minus right after a word / bracket, or after "<digit> " (``10 - 5``), is not a sign.
_NUMBER_RE = re.compile(
    r"(?P<neg>(?<![\w\)\]])(?<![\d\)\]]\s)[-−])?"
    r"\$?\s?"
    r"(?<![\d.])(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])"
)
_HASHES_RE = re.compile(r"####\s*(?P<rest>[^\n]*)")
_DOLLAR_NEG_RE = re.compile(r"\$\s?-\s?$")


def extract_final_number(text: str) -> str | None:
    """Final numeric answer of a generated solution, as a canonical string.

    Uses the number after the last ``#### `` marker when there is one, else the last
    number in the text. Handles thousands commas (``1,234``), ``$`` signs (``$5``,
    ``-$5``, ``$-5``), negatives, decimals and a trailing period (``"is 18."``).

    Returns:
      e.g. ``"1234"``, ``"-5"``, ``"2.5"``; ``None`` when there is no number.
    """
    text = str(text)
    hashes = list(_HASHES_RE.finditer(text))
    for m in reversed(hashes):
        found = _last_number(m["rest"])
        if found is not None:
            return found
    return _last_number(text)


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    negative = bool(m["neg"]) or bool(_DOLLAR_NEG_RE.search(text[: m.start("num")]))
    value = canonical_number(m["num"])
    if value is None:  # pragma: no cover - the regex only matches numbers
        return None
    if negative and value != "0":
        value = "-" + value
    return value


def numbers_match(
    prediction: Any, gold: Any, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> bool:
    """Numeric equality of two answers (numbers or number strings); ``None`` never matches."""
    a, b = canonical_number(prediction), canonical_number(gold)
    if a is None or b is None:
        return False
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


def gsm8k_accuracy(generations: Sequence[str], gold_answers: Sequence[Any]) -> float:
    """Fraction of generations whose :func:`extract_final_number` equals the gold number."""
    _check_lengths(generations, gold_answers)
    if not generations:
        return 0.0
    hits = [numbers_match(extract_final_number(g), a) for g, a in zip(generations, gold_answers)]
    return float(np.mean(hits))


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    use_stemmer: bool = True,
) -> float:
    """Mean ROUGE-L F-measure (max over each example's references), in ``[0, 1]``.

    Uses the ``rouge-score`` package (Google's reference implementation), as in the
    Super-Natural Instructions evaluation.

    Raises:
      ImportError: ``rouge-score`` is not installed (``pip install lora_optax[examples]``).
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(
            "rouge_l needs the `rouge-score` package; install it with "
            "`pip install lora_optax[examples]` (or `pip install rouge-score`)"
        ) from e
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    values = []
    for pred, ref in zip(predictions, references):
        refs = _as_refs(ref)
        if not refs:
            raise ValueError("an example has no reference")
        values.append(max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs))
    return float(np.mean(values))
