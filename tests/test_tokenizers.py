"""Tokenizers shared by the generative examples (``lora_optax.tasks.tokenizers``)."""

from __future__ import annotations

import pytest

from lora_optax.tasks.tokenizers import (
    ByteTokenizer,
    SubwordTokenizer,
    decode_until_eos,
    find_tokenizer,
)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert min(ids) >= 3 and len(ids) == len("héllo".encode())
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "héllo"
    assert tok.vocab_size == 259
    with pytest.raises(ValueError, match="special ids"):
        ByteTokenizer(bos_id=3)


def test_decode_until_eos_drops_pads_and_tail():
    tok = ByteTokenizer()
    row = [*tok.encode("ab"), tok.pad_id, *tok.encode("c"), tok.eos_id, *tok.encode("zz")]
    assert decode_until_eos(tok, row) == "abc"
    assert decode_until_eos(tok, tok.encode("no eos")) == "no eos"


def _word_level_json(tmp_path, vocab):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_subword_tokenizer_reads_special_ids_from_vocabulary(tmp_path):
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "<bos>": 3, "hello": 4, "world": 5}
    path = _word_level_json(tmp_path, vocab)
    tok = find_tokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (2, 1, 3)
    assert tok.encode("hello world") == [4, 5]  # no special tokens added
    assert tok.decode([3, 4, 5, 1]) == "hello world"
    # explicit ids win over the vocabulary (mT5 takes them from its config)
    tok = SubwordTokenizer(path, pad_id=0, eos_id=5)
    assert (tok.pad_id, tok.eos_id) == (0, 5)


def test_subword_tokenizer_t5_style_eos(tmp_path):
    path = _word_level_json(tmp_path, {"<pad>": 0, "</s>": 1, "<unk>": 2, "x": 3})
    tok = SubwordTokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)  # no <bos>: fallback 2


def test_find_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*--tokenizer"):
        find_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        find_tokenizer(tmp_path, tmp_path / "missing.json")
