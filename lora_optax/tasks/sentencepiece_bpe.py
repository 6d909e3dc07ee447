"""A SentencePiece-BPE tokenizer from a vocabulary (pieces, scores, piece types), in Python.

Gemma's tokenizer is a SentencePiece BPE model; a GGUF file carries it as three
arrays (``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``) plus the special ids,
so :meth:`SentencePieceBPE.from_gguf_metadata` rebuilds it without the
``sentencepiece`` package or a ``tokenizer.model`` file.

Encoding follows SentencePiece's BPE model with the identity normalizer:

1. spaces become ``▁`` (U+2581); nothing else is normalized, no whitespace is
   removed, and no ``▁`` is prepended (``add_dummy_prefix=False``, Gemma's setting);
2. the text is split into characters, except that user-defined pieces (Gemma: runs
   of ``\\n`` or ``\\t``, some HTML tags) are matched longest-first and never merged;
3. adjacent symbols are merged greedily: always the pair whose concatenation is a
   vocabulary piece with the highest score, the leftmost on ties;
4. symbols that are not pieces are spelled as UTF-8 bytes (``<0xE2>`` …, byte
   fallback), so every string encodes and ``decode(encode(x)) == x``.

Control pieces (``<bos>``, ``<start_of_turn>`` …) are never produced from text.
The tests compare the ids with the ``sentencepiece`` library running a model proto
built from the same vocabulary.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["PieceType", "SentencePieceBPE"]

SPACE = "\u2581"


class PieceType:
    """SentencePiece piece types (llama.cpp's GGUF ``token_type`` uses the same codes)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_MERGEABLE = (PieceType.NORMAL, PieceType.USER_DEFINED, PieceType.UNUSED)


class SentencePieceBPE:
    """SentencePiece BPE encoding and decoding over a given vocabulary.

    Args:
      pieces: the piece strings, indexed by id.
      scores: the merge priority of each piece (higher merges first).
      types: the :class:`PieceType` of each piece.
      bos_id, eos_id, pad_id, unk_id: special ids.
      add_dummy_prefix: prepend ``▁`` before encoding (and strip one leading space
        when decoding), SentencePiece's default; Gemma uses ``False``.
      byte_fallback: spell out-of-vocabulary characters as ``<0xXX>`` byte pieces
        (otherwise they become ``unk_id``).

    Raises:
      ValueError: when the arrays disagree in length, an id is out of range, or
        byte fallback is asked for but some of the 256 byte pieces are missing.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        types: Sequence[int],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        unk_id: int,
        add_dummy_prefix: bool = False,
        byte_fallback: bool = True,
    ):
        n = len(pieces)
        if len(scores) != n or len(types) != n:
            raise ValueError(
                f"SentencePieceBPE: {n} pieces but {len(scores)} scores and {len(types)} types."
            )
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if not 0 <= int(value) < n:
                raise ValueError(f"SentencePieceBPE: {name}_id {value} outside [0, {n}).")
        self.pieces = list(pieces)
        self.types = [int(t) for t in types]
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.pad_id, self.unk_id = int(pad_id), int(unk_id)
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self.byte_fallback = bool(byte_fallback)
        self.vocab_size = n
        # Mergeable pieces (SentencePiece's pieces_) and the others (reserved ids).
        self._scores: dict[str, float] = {}
        self._ids: dict[str, int] = {}
        reserved: dict[str, int] = {}
        for i, (piece, kind) in enumerate(zip(self.pieces, self.types)):
            if kind in _MERGEABLE:
                self._scores.setdefault(piece, float(scores[i]))
                self._ids.setdefault(piece, i)
            else:
                reserved.setdefault(piece, i)
        self._reserved = reserved
        self._unused = {p for p, t in zip(self.pieces, self.types) if t == PieceType.UNUSED}
        user = [p for p, t in zip(self.pieces, self.types) if t == PieceType.USER_DEFINED and p]
        self._user = set(user)
        self._user_lengths = sorted({len(p) for p in user}, reverse=True)
        self._user_first = {p[0] for p in user}
        self._byte_ids: list[int] = []
        if self.byte_fallback:
            byte_ids = {
                p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t == PieceType.BYTE
            }
            missing = [b for b in range(256) if f"<0x{b:02X}>" not in byte_ids]
            if missing:
                raise ValueError(
                    f"SentencePieceBPE: byte_fallback needs the 256 byte pieces <0x00>..<0xFF>; "
                    f"{len(missing)} are missing (first: <0x{missing[0]:02X}>)."
                )
            self._byte_ids = [byte_ids[f"<0x{b:02X}>"] for b in range(256)]
        self._byte_of = {i: b for b, i in enumerate(self._byte_ids)}

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], source: str = "GGUF"
    ) -> SentencePieceBPE:
        """The tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        Raises:
          ValueError: when the metadata lacks the vocabulary, or describes a tokenizer
            other than SentencePiece (``tokenizer.ggml.model`` other than ``"llama"``).
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(
                f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece "
                "vocabularies ('llama', as Gemma's) are supported."
            )
        missing = [
            f"tokenizer.ggml.{k}"
            for k in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id")
            if f"tokenizer.ggml.{k}" not in metadata
        ]
        if missing:
            raise ValueError(f"{source}: tokenizer metadata missing: {', '.join(missing)}.")
        pieces = list(metadata["tokenizer.ggml.tokens"])
        types = [int(t) for t in metadata["tokenizer.ggml.token_type"]]
        bos = int(metadata["tokenizer.ggml.bos_token_id"])
        eos = int(metadata["tokenizer.ggml.eos_token_id"])
        pad = int(metadata.get("tokenizer.ggml.padding_token_id", 0))
        unk = metadata.get("tokenizer.ggml.unknown_token_id")
        if unk is None:
            unk = next((i for i, t in enumerate(types) if t == PieceType.UNKNOWN), pad)
        return cls(
            pieces,
            [float(s) for s in metadata["tokenizer.ggml.scores"]],
            types,
            bos_id=bos,
            eos_id=eos,
            pad_id=pad,
            unk_id=int(unk),
            add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
            byte_fallback=PieceType.BYTE in types,
        )

    # ------------------------------------------------------------------ encode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        if not text:
            return []
        normalized = text.replace(" ", SPACE)
        if self.add_dummy_prefix:
            normalized = SPACE + normalized
        out: list[int] = []
        for piece in self._segment(normalized):
            out.extend(self._piece_ids(piece))
        return out

    def _initial_symbols(self, text: str) -> tuple[list[str], list[bool]]:
        symbols: list[str] = []
        frozen: list[bool] = []
        i, n = 0, len(text)
        while i < n:
            match = 0
            if text[i] in self._user_first:
                for length in self._user_lengths:
                    if i + length <= n and text[i : i + length] in self._user:
                        match = length
                        break
            if match:
                symbols.append(text[i : i + match])
                frozen.append(True)
                i += match
            else:
                symbols.append(text[i])
                frozen.append(False)
                i += 1
        return symbols, frozen

    def _segment(self, text: str) -> list[str]:
        symbols, frozen = self._initial_symbols(text)
        n = len(symbols)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        live: list[str | None] = list(symbols)
        heap: list[tuple[float, int, int, str]] = []
        scores = self._scores

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            piece = live[left] + live[right]  # type: ignore[operator]
            score = scores.get(piece)
            if score is not None:
                heapq.heappush(heap, (-score, left, right, piece))

        for i in range(n - 1):
            push(i, i + 1)
        merged_from: dict[str, tuple[str, str]] = {}
        while heap:
            _, left, right, piece = heapq.heappop(heap)
            a, b = live[left], live[right]
            if a is None or b is None or a + b != piece:
                continue  # stale: one side changed since the pair was queued
            if piece in self._unused:
                merged_from[piece] = (a, b)
            live[left], live[right] = piece, None
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out: list[str] = []
        i = 0
        while i >= 0:
            self._resegment(live[i], merged_from, out)  # type: ignore[arg-type]
            i = nxt[i]
        return out

    def _resegment(self, piece: str, merged_from: dict[str, tuple[str, str]], out: list[str]):
        # An UNUSED piece is not emitted: it is split back into the two symbols it came from.
        parts = merged_from.get(piece)
        if parts is None:
            out.append(piece)
            return
        self._resegment(parts[0], merged_from, out)
        self._resegment(parts[1], merged_from, out)

    def _piece_ids(self, piece: str) -> list[int]:
        i = self._reserved.get(piece)
        if i is None:
            i = self._ids.get(piece)
        if i is not None and i != self.unk_id:
            return [i]
        if self.byte_fallback:
            return [self._byte_ids[b] for b in piece.encode("utf-8")]
        return [self.unk_id]

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: control pieces dropped, byte pieces joined as UTF-8."""
        parts: list[str] = []
        pending = bytearray()
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: id {i} outside the vocabulary [0, {self.vocab_size}).")
            byte = self._byte_of.get(i)
            if byte is not None:
                pending.append(byte)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            kind = self.types[i]
            if i == self.unk_id or kind == PieceType.UNKNOWN:
                parts.append(" \u2047 ")
            elif kind != PieceType.CONTROL:
                parts.append(self.pieces[i].replace(SPACE, " "))
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        text = "".join(parts)
        if self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_piece(self, i: int) -> str:
        return self.pieces[int(i)]

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (any type), or ``unk_id``."""
        i = self._reserved.get(piece)
        return i if i is not None else self._ids.get(piece, self.unk_id)
