"""load_gemma3 on a Hugging Face Gemma 3 folder (tunix's safetensors loader) matches
transformers on the same folder: a small random Gemma 3 saved by transformers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tunix.models.gemma3.model")
pytest.importorskip("sentencepiece")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
import transformers

from lora_optax.flax import gemma
from tests.gguf_fixtures import tiny_vocab
from tests.test_sentencepiece_bpe import sentencepiece_reference


def test_hf_folder_matches_transformers(tmp_path):
    pieces, scores, types = tiny_vocab()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(pieces),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=512,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms too (they init to 0)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    sp = sentencepiece_reference(pieces, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    (tmp_path / "tokenizer.model").write_bytes(sp.serialized_model_proto())

    model, tok = gemma.load_gemma3(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    ids = np.array([[tok.bos_id, *tok.encode("the sun is a star.\nwhich of these is a gas?")]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits[0].numpy()
    got = np.asarray(model(*gemma.causal_inputs(ids.astype(np.int32)))[0])[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    assert (
        model.layers[5].attn.rope_base_frequency
        == config.rope_parameters["full_attention"]["rope_theta"]
    )


def test_hf_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        gemma.load_gemma3(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'llama', not a Gemma 3 model"):
        gemma.load_gemma3(tmp_path)
