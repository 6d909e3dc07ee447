"""Tokenizers for the generative examples: a byte tokenizer for tiny smoke models and a
wrapper around a checkpoint's own subword tokenizer (``tokenizers`` JSON or
sentencepiece).

Both encode without special tokens; the caller adds ``bos``/``eos`` where its model
expects them, so the same prompt formatting serves decoder-only (Gemma) and
encoder-decoder (mT5) models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ByteTokenizer",
    "SubwordTokenizer",
    "Tokenizer",
    "decode_until_eos",
    "find_tokenizer",
]


class Tokenizer(Protocol):
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids (``0..num_special-1``).

    The defaults (``0`` pad, ``1`` eos, ``2`` bos) are Gemma's special ids and also
    T5's pad/eos (its ``2`` is unk), so a tiny model of either family can be trained
    and decoded with it.
    """

    def __init__(self, *, pad_id: int = 0, eos_id: int = 1, bos_id: int = 2, num_special: int = 3):
        specials = (pad_id, eos_id, bos_id)
        if any(not 0 <= i < num_special for i in specials):
            raise ValueError(f"special ids {specials} must lie in [0, num_special={num_special})")
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id
        self.num_special = num_special
        self.vocab_size = num_special + 256

    def encode(self, text: str) -> list[int]:
        return [self.num_special + b for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        raw = bytes(int(i) - self.num_special for i in ids if int(i) >= self.num_special)
        return raw.decode("utf-8", errors="ignore")


class SubwordTokenizer:
    """A checkpoint's tokenizer: ``tokenizer.json`` (``tokenizers``) or a sentencepiece
    model (``tokenizer.model`` / ``spiece.model``), encoding without special tokens.

    Special ids not given explicitly are read from the vocabulary (``<pad>``,
    ``<eos>`` or ``</s>``, ``<bos>``), falling back to ``0``/``1``/``2``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pad_id: int | None = None,
        eos_id: int | None = None,
        bos_id: int | None = None,
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self._tok: Any = None
        self._sp: Any = None
        if path.suffix == ".json":
            from tokenizers import Tokenizer as _HFTokenizer

            self._tok = _HFTokenizer.from_file(str(path))
            vocab = self._tok.token_to_id
            found_pad, found_bos = vocab("<pad>"), vocab("<bos>")
            found_eos = vocab("<eos>") if vocab("<eos>") is not None else vocab("</s>")
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            # sentencepiece reports -1 for an id the model does not define.
            found_pad, found_eos, found_bos = (
                i if i >= 0 else None
                for i in (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id())
            )
        self.pad_id = _first(pad_id, found_pad, 0)
        self.eos_id = _first(eos_id, found_eos, 1)
        self.bos_id = _first(bos_id, found_bos, 2)

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=True)


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def find_tokenizer(
    model_dir: str | Path,
    explicit: str | Path | None = None,
    *,
    names: Sequence[str] = ("tokenizer.json", "tokenizer.model", "spiece.model"),
    **special_ids: int | None,
) -> SubwordTokenizer:
    """``explicit`` if given, else the first of ``names`` found in ``model_dir``.

    ``special_ids`` (``pad_id``, ``eos_id``, ``bos_id``) override the vocabulary's.
    """
    if explicit:
        return SubwordTokenizer(explicit, **special_ids)
    for name in names:
        if (Path(model_dir) / name).is_file():
            return SubwordTokenizer(Path(model_dir) / name, **special_ids)
    raise FileNotFoundError(
        f"none of {', '.join(names)} in {model_dir}; pass the tokenizer file explicitly "
        "(--tokenizer)"
    )


def decode_until_eos(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of a generated row up to (excluding) its first ``eos``, pads dropped."""
    ids = [int(i) for i in ids]
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    return tok.decode([i for i in ids if i != tok.pad_id])
