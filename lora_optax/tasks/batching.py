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
