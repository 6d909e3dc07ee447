"""Small Gemma 3 GGUF files written with ``gguf.GGUFWriter`` (llama.cpp's own writer).

:func:`write_tiny_gemma3` stores a random tunix ``Gemma3`` in llama.cpp's layout —
``[in, out]`` matrices, q/k/v separate, norms as ``1 + w`` — with a small
SentencePiece-BPE vocabulary (specials, 256 byte pieces, user-defined newline/tab
pieces, merges learnt from a short text). The layout conversion here is written from
llama.cpp's conventions independently of the loader; the real-file parity test against
transformers checks both against a third implementation.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

SPACE = "\u2581"
CORPUS = (
    "the sun is a star. the moon goes around the earth. plants need water and light to "
    "grow. which of these is a gas? steam is water as a gas. a magnet attracts iron.\n"
    "Tom has 3 apples and buys 2 more.\tHow many apples does he have?"
)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "\t", "<div>", "</div>"]


def tiny_vocab(num_merges: int = 120) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and SentencePiece types: specials, bytes, user-defined, characters
    of :data:`CORPUS`, then merges in order of pair frequency (score = -rank)."""
    pieces = list(SPECIALS)
    types = [3] * len(SPECIALS)
    types[3] = 2  # <unk>: UNKNOWN
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces += USER_DEFINED
    types += [4] * len(USER_DEFINED)
    scores = [0.0] * len(pieces)
    text = CORPUS.replace(" ", SPACE)
    words = [list(w) for w in text.replace("\n", " ").replace("\t", " ").split(" ") if w]
    chars = sorted({c for w in words for c in w})
    rank = 0
    for c in chars:
        pieces.append(c)
        types.append(1)
        scores.append(-float(rank))
        rank += 1
    for _ in range(num_merges):
        pairs = collections.Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        pieces.append(merged)
        types.append(1)
        scores.append(-float(rank))
        rank += 1
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [merged]
                i += 1
    return pieces, scores, types


def tiny_gemma3_config(num_layers: int = 6, vocab: int | None = None, **overrides: Any) -> Any:
    import jax.numpy as jnp
    from tunix.models.gemma3 import model as gm

    kw: dict[str, Any] = dict(
        num_layers=num_layers,
        num_embed=vocab or len(tiny_vocab()[0]),
        embed_dim=64,
        hidden_dim=128,
        num_heads=2,
        head_dim=32,
        num_kv_heads=1,
        sliding_window_size=512,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )
    kw.update(overrides)
    return gm.ModelConfig(**kw)


def random_gemma3(cfg: Any, seed: int = 0) -> Any:
    """A tunix Gemma3 with random weights, norms included (tunix inits them to 0)."""
    import jax
    from flax import nnx
    from tunix.models.gemma3 import model as gm

    model = gm.Gemma3(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def _llama_cpp_tensors(model: Any) -> dict[str, np.ndarray]:
    """llama.cpp names and NumPy-order (``(out, in)``) arrays of a tunix Gemma3."""
    cfg = model.config
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    out = {
        "token_embd.weight": np.asarray(model.embedder.input_embedding[...]),
        "output_norm.weight": np.asarray(model.final_norm.scale[...]) + 1.0,
    }
    for i, layer in enumerate(model.layers):
        a, b = layer.attn, f"blk.{i}"
        q = np.asarray(a.q_einsum.w[...])  # (N, D, H)
        out[f"{b}.attn_q.weight"] = q.transpose(0, 2, 1).reshape(n * h, d)
        kv = np.asarray(a.kv_einsum.w[...])  # (2, K, D, H)
        out[f"{b}.attn_k.weight"] = kv[0].transpose(0, 2, 1).reshape(k * h, d)
        out[f"{b}.attn_v.weight"] = kv[1].transpose(0, 2, 1).reshape(k * h, d)
        o = np.asarray(a.attn_vec_einsum.w[...])  # (N, H, D)
        out[f"{b}.attn_output.weight"] = o.reshape(n * h, d).T
        out[f"{b}.ffn_gate.weight"] = np.asarray(layer.mlp.gate_proj.kernel[...]).T
        out[f"{b}.ffn_up.weight"] = np.asarray(layer.mlp.up_proj.kernel[...]).T
        out[f"{b}.ffn_down.weight"] = np.asarray(layer.mlp.down_proj.kernel[...]).T
        for name, norm in [
            ("attn_norm", layer.pre_attention_norm),
            ("post_attention_norm", layer.post_attention_norm),
            ("ffn_norm", layer.pre_ffw_norm),
            ("post_ffw_norm", layer.post_ffw_norm),
            ("attn_q_norm", a._query_norm),
            ("attn_k_norm", a._key_norm),
        ]:
            out[f"{b}.{name}.weight"] = np.asarray(norm.scale[...]) + 1.0
    return out


def write_tiny_gemma3(
    path: str | Path,
    model: Any,
    *,
    matrix_type: str = "Q8_0",
    architecture: str = "gemma3",
    metadata: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    raw_tensors: dict[str, tuple[np.ndarray, Any, tuple[int, ...]]] | None = None,
) -> Path:
    """Writes ``model`` (tunix Gemma3) as a GGUF file with :func:`tiny_vocab`.

    ``matrix_type``: block type of the 2-D weights (``F32``, ``F16``, ``BF16``, ``Q8_0``,
    ``Q5_0``); norms stay F32. ``metadata`` overrides/extends the ``gemma3.*`` keys;
    ``drop`` omits tensors; ``raw_tensors`` adds pre-encoded ``(bytes, type, shape)``.
    """
    import gguf

    cfg = model.config
    pieces, scores, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), architecture)
    arch = architecture
    w.add_uint32(f"{arch}.block_count", cfg.num_layers)
    w.add_uint32(f"{arch}.context_length", 1024)
    w.add_uint32(f"{arch}.embedding_length", cfg.embed_dim)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.hidden_dim)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window_size)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.global_base_frequency))
    w.add_float32(f"{arch}.rope.freq_base_swa", float(cfg.local_base_frequency))
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
    for name, arr in _llama_cpp_tensors(model).items():
        if name in drop:
            continue
        arr = np.ascontiguousarray(arr, np.float32)
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, (raw, rtype, shape) in (raw_tensors or {}).items():
        w.add_tensor(name, raw, raw_shape=shape, raw_dtype=rtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def dequantized_reference(model: Any, matrix_type: str) -> dict[str, np.ndarray]:
    """What a loader must reproduce: the llama.cpp tensors after a quantize/dequantize
    round trip of ``matrix_type`` (the identity for F32)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
    out = {}
    for name, arr in _llama_cpp_tensors(model).items():
        arr = np.ascontiguousarray(arr, np.float32)
        if arr.ndim == 1 or matrix_type == "F32":
            out[name] = arr
        elif matrix_type == "F16":
            out[name] = arr.astype(np.float16).astype(np.float32)
        else:
            out[name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
    return out
