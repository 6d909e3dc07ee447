"""GGUF reading and load_gemma3 on small Gemma 3 files written with gguf.GGUFWriter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tunix.models.gemma3.model")

import gguf
import jax
import jax.numpy as jnp
from flax import nnx

from lora_optax.flax import gemma, make_mesh
from lora_optax.flax.gguf import GGUFError, GGUFFile, read_gguf
from tests.gguf_fixtures import (
    _llama_cpp_tensors,
    dequantized_reference,
    random_gemma3,
    tiny_gemma3_config,
    write_tiny_gemma3,
)


@pytest.fixture(scope="module")
def tiny():
    return random_gemma3(tiny_gemma3_config())


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return write_tiny_gemma3(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny)


def _tokens(tok, text="the sun is a star.\nwhich of these is a gas?"):
    return np.array([[tok.bos_id, *tok.encode(text)]], np.int32)


def _logits(model, ids):
    return np.asarray(model(*gemma.causal_inputs(ids))[0])


def test_header_matches_gguf_reader(tiny_file):
    """The fast header parser agrees with gguf.GGUFReader on every key and tensor."""
    ours = read_gguf(tiny_file)
    ref = gguf.GGUFReader(str(tiny_file))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours.metadata)
    for key in keys:
        expected = ref.fields[key].contents()
        got = ours.metadata[key]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(expected))
        elif isinstance(got, float):
            assert got == pytest.approx(expected, rel=1e-7)
        else:
            assert got == expected, key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.type_code == int(t.tensor_type)
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
        ref_values = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.array(t.name), ref_values)


@pytest.mark.parametrize("matrix_type", ["F32", "F16", "BF16", "Q8_0", "Q5_0"])
def test_load_round_trip(tiny, tmp_path, matrix_type):
    """Every tensor lands where llama.cpp's layout says (norms: stored 1 + w)."""
    path = write_tiny_gemma3(tmp_path / f"{matrix_type}.gguf", tiny, matrix_type=matrix_type)
    model, tok = gemma.load_gemma3(path)
    want = dequantized_reference(tiny, matrix_type)
    got = _llama_cpp_tensors(model)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
    if matrix_type == "F32":
        ids = _tokens(tok)
        np.testing.assert_allclose(_logits(model, ids), _logits(tiny, ids), rtol=1e-5, atol=1e-5)


def test_config_from_metadata(tiny, tmp_path):
    cfg = tiny_gemma3_config(num_layers=7, sliding_window_size=8, local_base_frequency=5_000)
    path = write_tiny_gemma3(tmp_path / "c.gguf", random_gemma3(cfg, seed=3))
    model, tok = gemma.load_gemma3(path)
    got = model.config
    for field in (
        "num_layers",
        "num_embed",
        "embed_dim",
        "hidden_dim",
        "num_heads",
        "head_dim",
        "num_kv_heads",
        "sliding_window_size",
        "local_base_frequency",
        "global_base_frequency",
    ):
        assert getattr(got, field) == getattr(cfg, field), field
    assert len(model.layers) == 7 and tok.vocab_size == cfg.num_embed
    assert model.layers[5].attn.rope_base_frequency == 1_000_000  # the global layer
    assert model.layers[6].attn.rope_base_frequency == 5_000


def test_bfloat16(tiny_file, tiny):
    model, tok = gemma.load_gemma3(tiny_file, dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    ids = _tokens(tok)
    ref = _logits(gemma.load_gemma3(tiny_file)[0], ids)
    got = _logits(model, ids).astype(np.float32)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_mesh_places_tunix_shardings(tiny_file):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    mesh = make_mesh({"fsdp": 2, "tp": 2})
    model, tok = gemma.load_gemma3(tiny_file, mesh=mesh)
    q = model.layers[0].attn.q_einsum.w[...]  # annotated ("tp", "fsdp", None)
    assert q.sharding.mesh == mesh and tuple(q.sharding.spec)[:2] == ("tp", "fsdp")
    kv = model.layers[0].attn.kv_einsum.w[...]  # (None, None, "fsdp", None)
    assert tuple(kv.sharding.spec)[2] == "fsdp"
    ids = _tokens(tok)
    ref = _logits(gemma.load_gemma3(tiny_file)[0], ids)
    np.testing.assert_allclose(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ bad input


def _never_dequantized(monkeypatch):
    calls = []
    original = GGUFFile.array

    def spy(self, name, *a, **k):
        calls.append(name)
        return original(self, name, *a, **k)

    monkeypatch.setattr(GGUFFile, "array", spy)
    return calls


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        gemma.load_gemma3(tmp_path / "nope.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(GGUFError, match=r"notes\.gguf is not a GGUF file.*b'hell'"):
        gemma.load_gemma3(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match=r"empty\.gguf is not a GGUF file"):
        gemma.load_gemma3(empty)


def test_truncated_and_bad_version(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"cut\.gguf: tensor .* past the end of the file"):
        gemma.load_gemma3(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1000])
    with pytest.raises(GGUFError, match=r"head\.gguf: truncated GGUF"):
        gemma.load_gemma3(head)
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFError, match="version 9 is not supported"):
        gemma.load_gemma3(v9)


def test_other_architecture(tiny, tmp_path, monkeypatch):
    path = write_tiny_gemma3(tmp_path / "llama.gguf", tiny, architecture="llama")
    calls = _never_dequantized(monkeypatch)
    with pytest.raises(ValueError, match=r"llama\.gguf: GGUF architecture is 'llama'.*'gemma3'"):
        gemma.load_gemma3(path)
    assert calls == []


def test_unsupported_block_type_is_caught_before_loading(tiny, tmp_path, monkeypatch):
    """A block type gguf knows the size of but cannot decode (Q8_1): the error names the
    file, tensor and type, and comes before any weight is dequantized."""
    qtype = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    name = "blk.3.ffn_up.weight"
    rows, cols = _llama_cpp_tensors(tiny)[name].shape  # (128, 64): two blocks per row
    raw = np.zeros((rows, cols // block * size), np.uint8)
    path = write_tiny_gemma3(
        tmp_path / "q81.gguf", tiny, drop=(name,), raw_tensors={name: (raw, qtype, raw.shape)}
    )
    assert read_gguf(path).tensors[name].shape == (rows, cols)
    calls = _never_dequantized(monkeypatch)
    with pytest.raises(
        GGUFError, match=r"q81\.gguf: tensor 'blk\.3\.ffn_up\.weight' uses block type Q8_1"
    ):
        gemma.load_gemma3(path)
    assert calls == []


def test_missing_tensor_and_unsupported_config(tiny, tmp_path, monkeypatch):
    path = write_tiny_gemma3(tmp_path / "drop.gguf", tiny, drop=("blk.2.attn_v.weight",))
    calls = _never_dequantized(monkeypatch)
    with pytest.raises(ValueError, match=r"drop\.gguf.*missing \['blk\.2\.attn_v\.weight'\]"):
        gemma.load_gemma3(path)
    yarn = write_tiny_gemma3(
        tmp_path / "yarn.gguf", tiny, metadata={"gemma3.rope.scaling.type": "yarn"}
    )
    with pytest.raises(ValueError, match=r"yarn\.gguf: rope scaling 'yarn'"):
        gemma.load_gemma3(yarn)
    cap = write_tiny_gemma3(
        tmp_path / "cap.gguf", tiny, metadata={"gemma3.final_logit_softcapping": 30.0}
    )
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        gemma.load_gemma3(cap)
    assert calls == []
    with pytest.raises(ValueError, match="dtype float16"):
        gemma.load_gemma3(path, dtype=jnp.float16)
