"""Decoder-LM rows for fine-tuning and multiple-choice scoring (prompt styles, collation).

Three prompt styles:

* ``"qa"``: ``Question: …\\nAnswer:`` and the choice text itself
  (:func:`lora_optax.tasks.format_lm_multiple_choice`);
* ``"instruction"``: the LLM-Adapters (Alpaca) template and its answers (``"the correct
  answer is answer3"``; GSM8K: the solution text), :func:`lora_optax.tasks.format_instruction`;
* ``"compact"``: the same instruction and answers without the template's generic first
  sentence ("Below is an instruction that describes a task. …"), which carries no
  information and costs about 20 tokens of every row.

Tokenizers are duck-typed: ``encode(text)`` (no BOS), ``bos_id``, ``eos_id``, ``pad_id``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lora_optax.tasks.batching import answer_targets, pack_choices, pack_prompt_target
from lora_optax.tasks.datasets import (
    GENERATION,
    INSTRUCTION_TEMPLATE,
    Example,
    format_generation,
    format_instruction,
    format_lm_multiple_choice,
)

__all__ = [
    "PROMPT_STYLES",
    "choice_batch",
    "encode_choices",
    "length_sorted_batches",
    "make_train_collate",
    "prompt_and_candidates",
    "prompt_and_target",
    "round_up",
]

PROMPT_STYLES = ("qa", "instruction", "compact")
_HEADER = INSTRUCTION_TEMPLATE.split("### Instruction:")[0]


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: choose from {PROMPT_STYLES}.")


def _compact(prompt: str) -> str:
    return prompt[len(_HEADER) :] if prompt.startswith(_HEADER) else prompt


def prompt_and_target(ex: Example, style: str) -> tuple[str, str]:
    """The training pair of ``ex``: prompt and gold answer text in ``style``."""
    _check_style(style)
    if style in ("instruction", "compact"):
        prompt, target = format_instruction(ex)
        return (_compact(prompt) if style == "compact" else prompt), target
    if ex.kind == GENERATION:
        return format_generation(ex)
    prompt, choices = format_lm_multiple_choice(ex)
    return prompt, choices[ex.label]


def prompt_and_candidates(ex: Example, style: str) -> tuple[str, list[str]]:
    """The scoring prompt and one answer text per choice (the training format)."""
    _check_style(style)
    if style in ("instruction", "compact"):
        prompt = prompt_and_target(ex, style)[0]
        cands = [
            format_instruction(dataclasses.replace(ex, label=k))[1] for k in range(ex.num_choices)
        ]
        return prompt, cands
    return format_lm_multiple_choice(ex)


def round_up(n: int, multiple: int = 8) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least ``multiple``)."""
    return max(multiple, math.ceil(n / multiple) * multiple)


def make_train_collate(
    tok: Any, max_length: int, num_targets: int, style: str
) -> Callable[[list[Example]], dict[str, np.ndarray]]:
    """``collate(examples)``: rows ``BOS prompt answer EOS`` of ``max_length`` tokens (the
    prompt cut on the left when too long, :func:`~lora_optax.tasks.pack_prompt_target`)
    and the positions that predict the answer (:func:`~lora_optax.tasks.answer_targets`),
    the batch :func:`lora_optax.flax.gemma.answer_loss` reads."""
    _check_style(style)

    def collate(items: list[Example]) -> dict[str, np.ndarray]:
        rows = []
        for ex in items:
            prompt, target = prompt_and_target(ex, style)
            rows.append(
                pack_prompt_target(
                    [tok.bos_id, *tok.encode(prompt)],
                    tok.encode(target)[: num_targets - 1],
                    max_length,
                    pad_id=tok.pad_id,
                    eos_id=tok.eos_id,
                )
            )
        mask = np.stack([r["target_mask"] for r in rows])
        return {
            "tokens": np.stack([r["input_ids"] for r in rows]),
            **answer_targets(mask, num_targets),
        }

    return collate


def encode_choices(
    tok: Any, examples: Sequence[Example], style: str
) -> list[tuple[list[int], list[list[int]]]]:
    """Per question: the prompt ids (with BOS) and the ids of each candidate."""
    out = []
    for ex in examples:
        prompt, cands = prompt_and_candidates(ex, style)
        out.append(([tok.bos_id, *tok.encode(prompt)], [tok.encode(c) for c in cands]))
    return out


def choice_batch(
    encoded: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    max_length: int,
    num_targets: int,
    num_choices: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """One packed row per question (:func:`~lora_optax.tasks.pack_choices`), stacked."""
    rows = [
        pack_choices(p, c, max_length, num_targets, num_choices=num_choices, pad_id=pad_id)
        for p, c in encoded
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def length_sorted_batches(
    encoded: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    batch_size: int,
    num_choices: int,
    pad_id: int,
    *,
    length_multiple: int = 32,
    target_multiple: int = 16,
) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """Packed scoring batches of questions sorted by length.

    Each batch is padded to its own longest row (rounded up to ``length_multiple``
    positions and ``target_multiple`` scored tokens: a few shapes, so a few
    compilations) and to ``batch_size`` rows (repeating its first row); about a third
    of the work of padding every row to the longest of the set.

    Returns:
      ``[(question indices, batch)]``; only the first ``len(indices)`` rows are real.
    """
    size = [(len(p) + sum(map(len, c)), sum(map(len, c))) for p, c in encoded]
    order = sorted(range(len(encoded)), key=lambda i: size[i])
    out = []
    for k in range(0, len(order), batch_size):
        ids = order[k : k + batch_size]
        length = round_up(max(size[i][0] for i in ids), length_multiple)
        targets = round_up(max(size[i][1] for i in ids), target_multiple)
        rows = [encoded[i] for i in ids]
        rows += [rows[0]] * (batch_size - len(rows))
        out.append((ids, choice_batch(rows, length, targets, num_choices, pad_id)))
    return out
