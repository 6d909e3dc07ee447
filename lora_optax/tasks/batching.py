"""Deterministic, resumable batching and fixed-shape padding (for ``jax.jit``).

The data position is one integer, the *cursor*: the number of batches drawn so far.
Batch ``k`` depends only on ``(seed, k)``: epoch ``k // batches_per_epoch`` uses the
permutation seeded by ``(seed, epoch)``. Storing the cursor in a checkpoint and
rebuilding the iterator with ``cursor=`` resumes exactly where training stopped::

    it = DataIterator(train, batch_size=16, seed=0, collate=encode)
    for step in range(start, 2000):
        batch = next(it)
        ...
        save(step, params, opt_state, data_cursor=it.cursor)
    # later
    it = DataIterator(train, batch_size=16, seed=0, collate=encode, cursor=saved_cursor)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class BatchSampler:
    """Index batches over ``num_examples`` items, reshuffled every epoch.

    Args:
      num_examples: dataset size.
      batch_size: examples per batch.
      seed: shuffling seed.
      shuffle: permute each epoch (otherwise sequential order).
      drop_remainder: drop each epoch's last partial batch (fixed shapes); otherwise it
        is yielded short (pad it with :func:`pad_batch_size`).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if drop_remainder and num_examples < batch_size:
            raise ValueError(
                f"drop_remainder with {num_examples} examples < batch_size {batch_size} "
                "gives no batches"
            )
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            perm = rng.permutation(self.num_examples)
        else:
            perm = np.arange(self.num_examples)
        self._cache = (epoch, perm)
        return perm

    def batch(self, cursor: int) -> np.ndarray:
        """Indices of the ``cursor``-th batch (0-based, counted across epochs)."""
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        epoch, k = divmod(int(cursor), self.batches_per_epoch)
        start = k * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]

    def epoch_of(self, cursor: int) -> int:
        """Epoch that batch ``cursor`` belongs to."""
        return int(cursor) // self.batches_per_epoch

    def iterate(self, cursor: int = 0, num_batches: int | None = None) -> Iterator[np.ndarray]:
        """Yields the index batches ``cursor, cursor + 1, …`` (forever when ``num_batches``
        is ``None``)."""
        stop = None if num_batches is None else cursor + num_batches
        while stop is None or cursor < stop:
            yield self.batch(cursor)
            cursor += 1


class DataIterator(Generic[T]):
    """Resumable iterator of (collated) example batches.

    Args:
      examples: the dataset (any sequence).
      batch_size: examples per batch.
      collate: maps the list of a batch's examples to what is yielded (e.g. padded
        arrays); by default the list itself.
      seed: shuffling seed.
      shuffle: reshuffle every epoch.
      drop_remainder: see :class:`BatchSampler`.
      cursor: batches already consumed (restore it from a checkpoint).
      num_epochs: stop after this many epochs; ``None`` repeats forever.
    """

    def __init__(
        self,
        examples: Sequence[T],
        batch_size: int,
        *,
        collate: Callable[[list[T]], Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        cursor: int = 0,
        num_epochs: int | None = None,
    ) -> None:
        self.examples = examples
        self.sampler = BatchSampler(
            len(examples), batch_size, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder
        )
        self.collate = collate
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        self.cursor = int(cursor)
        self.num_epochs = num_epochs

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.sampler.epoch_of(self.cursor)

    @property
    def total_batches(self) -> int | None:
        """Number of batches before :class:`StopIteration` (``None`` when unbounded)."""
        if self.num_epochs is None:
            return None
        return self.num_epochs * self.sampler.batches_per_epoch

    def state(self) -> dict[str, int]:
        """Checkpointable position: ``{"cursor": int}``."""
        return {"cursor": self.cursor}

    def restore(self, state: int | Mapping[str, int]) -> None:
        """Continues from a saved cursor (an int or the dict from :meth:`state`)."""
        cursor = int(state["cursor"] if isinstance(state, Mapping) else state)
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        self.cursor = cursor

    def __iter__(self) -> DataIterator[T]:
        return self

    def __next__(self) -> Any:
        total = self.total_batches
        if total is not None and self.cursor >= total:
            raise StopIteration
        idx = self.sampler.batch(self.cursor)
        self.cursor += 1
        items = [self.examples[int(i)] for i in idx]
        return self.collate(items) if self.collate is not None else items


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential fixed-size index batches covering every example once.

    Yields:
      ``(indices, valid)``: ``indices`` has length ``batch_size`` (the last batch is padded
      with index 0) and ``valid`` marks the real entries — weight the metric with it.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, num_examples, batch_size):
        idx = np.arange(start, min(start + batch_size, num_examples))
        valid = np.zeros(batch_size, dtype=bool)
        valid[: idx.size] = True
        yield np.pad(idx, (0, batch_size - idx.size)), valid


def pad_batch_size(
    batch: Mapping[str, np.ndarray], batch_size: int, *, mask_key: str = "valid"
) -> dict[str, np.ndarray]:
    """Pads every array of a (short) batch along axis 0 to ``batch_size`` with zeros.

    Adds a boolean ``mask_key`` array marking the real rows (keeps an existing one,
    padded with ``False``), so a short final batch keeps the jitted shapes.
    """
    sizes = {np.shape(v)[0] for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"arrays disagree on the batch dimension: {sizes}")
    n = sizes.pop()
    if n > batch_size:
        raise ValueError(f"batch of {n} exceeds batch_size {batch_size}")
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        pad = [(0, batch_size - n)] + [(0, 0)] * (arr.ndim - 1)
        out[key] = np.pad(arr, pad)
    if mask_key not in out:
        valid = np.zeros(batch_size, dtype=bool)
        valid[:n] = True
        out[mask_key] = valid
    return out


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    length: int | None = None,
    *,
    pad_id: int = 0,
    truncate: str = "right",
    pad_multiple: int = 1,
    dtype: Any = np.int32,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token sequences to one length.

    Args:
      sequences: token id lists.
      length: target length; ``None`` → the longest sequence rounded up to
        ``pad_multiple`` (fewer distinct shapes → fewer recompiles).
      pad_id: padding id.
      truncate: drop overflow at the ``"right"`` (end) or ``"left"`` (start).
      pad_multiple: see ``length``.
      dtype: ids dtype.

    Returns:
      ``(ids, mask)``: ``[batch, length]`` ids and a boolean mask of real tokens.
    """
    if truncate not in ("right", "left"):
        raise ValueError(f"truncate must be 'right' or 'left', got {truncate!r}")
    if length is None:
        longest = max((len(s) for s in sequences), default=0)
        length = max(pad_multiple, math.ceil(longest / pad_multiple) * pad_multiple)
    ids = np.full((len(sequences), length), pad_id, dtype=dtype)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for i, seq in enumerate(sequences):
        seq = list(seq)
        if len(seq) > length:
            seq = seq[:length] if truncate == "right" else seq[len(seq) - length :]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
    return ids, mask


def pack_prompt_target(
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    max_length: int,
    *,
    pad_id: int = 0,
    eos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Concatenates prompt and target tokens into one fixed-length decoder row.

    Over-long rows lose prompt tokens from the left first (one prompt token is kept so the
    first target token is predicted from something), then target tokens from the right.

    Args:
      prompt_ids: prompt tokens (context, question).
      target_ids: target / continuation tokens (the answer, or one choice).
      max_length: row length.
      pad_id: padding id.
      eos_id: appended to the target when given.

    Returns:
      ``input_ids`` ``[max_length]`` int32, ``attention_mask`` (real tokens) and
      ``target_mask`` (the target tokens: train on / score the logits that predict them,
      i.e. at positions ``t - 1``).
    """
    prompt = list(prompt_ids)
    target = list(target_ids) + ([eos_id] if eos_id is not None else [])
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    keep_target = min(len(target), max_length - (1 if prompt else 0))
    target = target[:keep_target]
    keep_prompt = min(len(prompt), max_length - keep_target)
    prompt = prompt[len(prompt) - keep_prompt :]
    tokens = prompt + target
    input_ids = np.full(max_length, pad_id, dtype=np.int32)
    input_ids[: len(tokens)] = tokens
    attention_mask = np.zeros(max_length, dtype=bool)
    attention_mask[: len(tokens)] = True
    target_mask = np.zeros(max_length, dtype=bool)
    target_mask[len(prompt) : len(tokens)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def answer_targets(target_mask: np.ndarray, num_targets: int) -> dict[str, np.ndarray]:
    """The positions that predict the marked tokens, padded to ``num_targets`` per row.

    ``target_mask`` ``(B, L)`` marks answer tokens (``target_mask`` of
    :func:`pack_prompt_target`); token ``t`` is predicted at position ``t - 1``. For a
    loss or score that applies the LM head at those positions only.

    Returns:
      ``target_index`` ``(B, num_targets)`` int32 (the positions, padded with 0) and
      ``target_weight`` ``(B, num_targets)`` float32 (1 real, 0 padding).

    Raises:
      ValueError: when a row marks more than ``num_targets`` tokens (rows are never
        cut silently: raise ``num_targets``), or marks position 0.
    """
    mask = np.asarray(target_mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"answer_targets: target_mask must be (batch, length), got {mask.shape}")
    if mask[:, 0].any():
        raise ValueError("answer_targets: target_mask marks position 0, which nothing predicts.")
    counts = mask.sum(-1)
    if counts.max(initial=0) > num_targets:
        row = int(counts.argmax())
        raise ValueError(
            f"answer_targets: row {row} marks {int(counts[row])} tokens, more than "
            f"num_targets={num_targets}; raise num_targets."
        )
    index = np.zeros((mask.shape[0], num_targets), np.int32)
    weight = np.zeros((mask.shape[0], num_targets), np.float32)
    for b, row in enumerate(mask):
        pos = np.flatnonzero(row) - 1
        index[b, : len(pos)] = pos
        weight[b, : len(pos)] = 1.0
    return {"target_index": index, "target_weight": weight}


def pack_choices(
    prompt_ids: Sequence[int],
    choices: Sequence[Sequence[int]],
    max_length: int,
    num_targets: int,
    *,
    num_choices: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """One decoder row holding a prompt and all its candidate continuations.

    The row is ``prompt, choice_0, choice_1, …``; the attention mask lets each choice
    token see the prompt and the earlier tokens of its own choice only, and each
    choice's positions continue from the end of the prompt, so every choice is scored
    exactly as if it followed the prompt alone — with the prompt computed once instead
    of once per choice. (Valid while the row is shorter than a sliding attention
    window, which Gemma 3 applies by row index.)

    Args:
      prompt_ids: the prompt tokens (with BOS).
      choices: the token ids of each candidate.
      max_length: row length ``L``.
      num_targets: ``K``, the number of scored tokens per row (all choices together).
      num_choices: ``C`` (default ``len(choices)``); missing choices score 0 weight.
      pad_id: padding id.

    Returns:
      ``tokens`` ``(L,)``, ``positions`` ``(L,)``, ``attention_mask`` ``(L, L)``,
      ``target_index`` / ``target_ids`` / ``target_weight`` ``(K,)`` and
      ``target_choice`` ``(K, C)`` (one-hot: which choice each scored token belongs to).

    Raises:
      ValueError: when the row or the scored tokens do not fit.
    """
    c = len(choices) if num_choices is None else int(num_choices)
    if len(choices) > c or not prompt_ids:
        raise ValueError(f"pack_choices: {len(choices)} choices for num_choices={c}, or no prompt.")
    n_prompt = len(prompt_ids)
    total = n_prompt + sum(len(x) for x in choices)
    scored = sum(len(x) for x in choices)
    if total > max_length or scored > num_targets:
        raise ValueError(
            f"pack_choices: the prompt ({n_prompt} tokens) and {len(choices)} choices need "
            f"{total} positions and {scored} scored tokens; max_length={max_length}, "
            f"num_targets={num_targets}."
        )
    tokens = np.full(max_length, pad_id, np.int32)
    positions = np.zeros(max_length, np.int32)
    segment = np.full(max_length, -2, np.int32)  # -1 prompt, k choice k, -2 padding
    tokens[:n_prompt] = prompt_ids
    positions[:n_prompt] = np.arange(n_prompt)
    segment[:n_prompt] = -1
    index = np.zeros(num_targets, np.int32)
    ids = np.zeros(num_targets, np.int32)
    weight = np.zeros(num_targets, np.float32)
    which = np.zeros((num_targets, c), np.float32)
    start, t = n_prompt, 0
    for k, choice in enumerate(choices):
        n = len(choice)
        tokens[start : start + n] = choice
        positions[start : start + n] = n_prompt + np.arange(n)
        segment[start : start + n] = k
        # token j of the choice is predicted at the prompt's last position (j = 0) or
        # at the position of token j - 1 of the same choice
        index[t : t + n] = [n_prompt - 1, *range(start, start + n - 1)]
        ids[t : t + n] = choice
        weight[t : t + n] = 1.0
        which[t : t + n, k] = 1.0
        start, t = start + n, t + n
    row, col = segment[:, None], segment[None, :]
    causal = np.tril(np.ones((max_length, max_length), bool))
    mask = causal & (col != -2) & (row != -2) & ((col == -1) | (col == row))
    return {
        "tokens": tokens,
        "positions": positions,
        "attention_mask": mask,
        "target_index": index,
        "target_ids": ids,
        "target_weight": weight,
        "target_choice": which,
    }
