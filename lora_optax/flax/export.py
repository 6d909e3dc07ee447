"""Merging LoRA into the base weights, and exporting adapters in the PEFT layout.

Merging: every pair's base weight becomes ``W₀ + s·A B``, computed in the pair's
matrix view (``A`` ``(*batch, m, r)``, ``B`` ``(*batch, r, n)``) and written back in
the weight's own axis order (qwix einsum weights such as gemma's ``q_einsum``
``w (N, D, H)`` with ``A (D, r)``, ``B (r, N, H)`` are transposed back). The merged
model has the base model's structure: :class:`~lora_optax.flax.ScaledLoRA`
wrappers are replaced by their ``base_module`` and qwix's factors and interception
are removed.

PEFT layout (Hugging Face ``peft``, PyTorch orientation ``y = x Wᵀ``): for a pair
whose parent module path is ``layers/0/attn/q`` the file ``adapter_model.safetensors``
holds

* ``base_model.model.layers.0.attn.q.lora_A.weight`` of shape ``(r, in)`` = ``Aᵀ``,
* ``base_model.model.layers.0.attn.q.lora_B.weight`` of shape ``(out, r)`` = ``Bᵀ``,

with multi-axis factors flattened to their matrix view first (``in = m``, ``out =
n``) and stacked pairs (``batch_ndim > 0``) exported per slice, the slice index
appended to the module path. ``adapter_config.json`` holds ``r``, ``lora_alpha =
s·r`` (PEFT scales by ``lora_alpha / r``, so the scale is exact whatever convention
trained it; pairs with another scale go to ``alpha_pattern``), ``target_modules``
(the last path components) and ``peft_type = "LORA"``. Module paths follow the nnx
model's attribute names: a PyTorch model with other names needs ``key_fn``.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_optax._src import linalg
from lora_optax._src.pairs import LoRAPair, Path
from lora_optax.flax.lora import (
    ScaledLoRA,
    flat_paths,
    get_child,
    lora_pairs,
    module_at,
    set_child,
    strip_wrapper,
)
from lora_optax.flax.train import FullGradPlan

__all__ = [
    "delta_weights",
    "load_peft_adapter",
    "merge_lora",
    "peft_state_dict",
    "save_peft_adapter",
]


def _delta(pair: LoRAPair, a: jax.Array, b: jax.Array) -> jax.Array:
    """``s·A B`` in pair layout ``(*batch, *in, *out)``."""
    am, bm = linalg.a_matrix(pair, a), linalg.b_matrix(pair, b)
    dtype = linalg.compute_dtype(jnp.result_type(am.dtype, bm.dtype))
    d = jnp.matmul(am.astype(dtype), bm.astype(dtype)) * pair.scale
    k = pair.batch_ndim
    return d.reshape(tuple(a.shape[:-1]) + tuple(b.shape[k + 1 :]))


def delta_weights(model: nnx.Module) -> dict[Path, jax.Array]:
    """``{base weight path: s·A B}`` in each base weight's own shape and dtype."""
    pairs = lora_pairs(model)
    plan = FullGradPlan.from_model(model, pairs)
    flat = flat_paths(nnx.state(model, nnx.Param))
    out = {}
    for e in plan.entries:
        kernel = flat[e.kernel_path]
        d = _delta(e.pair, flat[strip_wrapper(e.pair.a_path)], flat[strip_wrapper(e.pair.b_path)])
        out[e.kernel_path] = plan.from_pair_layout(e, d, kernel.shape).astype(kernel.dtype)
    return out


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with ``W₀ + s·A B`` merged into each base weight, no LoRA.

    The result has the structure of the model before :func:`apply_lora` (plain
    ``nnx.Linear`` / einsum modules, no ``nnx.LoRAParam``), so it can be saved with
    the base model's checkpoint layout. ``model`` itself is left unchanged.
    """
    deltas = delta_weights(model)
    merged = nnx.clone(model)
    flat = flat_paths(nnx.state(merged, nnx.Param))
    for path, d in deltas.items():
        var = getattr(module_at(merged, path[:-1]), path[-1])
        var[...] = flat[path] + d
    # qwix: drop the factors, their records and the interception
    for _, module in list(nnx.iter_modules(merged)):
        for name in list(vars(module)):
            if name.endswith(("_lora_a", "_lora_b", "_lora_scale", "_lora_einsum_str")):
                delattr(module, name)
        for name in ("qwix_path", "qwix_rngs", "disable_quant_stats_update"):
            if name in vars(module):
                delattr(module, name)
    if hasattr(type(merged), "_unquantized_type"):
        merged.__class__ = type(merged)._unquantized_type  # type: ignore[attr-defined]
    # nnx.Linear wrappers: put the base layer back
    wrapped = [(p, m) for p, m in nnx.iter_modules(merged) if isinstance(m, ScaledLoRA)]
    for mpath, module in wrapped:
        parent: Any = merged
        for key in mpath[:-1]:
            parent = get_child(parent, key)
        set_child(parent, mpath[-1], module.base_module)
    return merged


def _module_key(pair: LoRAPair, prefix: str, key_fn: Callable[[str], str] | None) -> str:
    a_path = strip_wrapper(pair.a_path)
    parent = a_path[:-1]
    name = a_path[-1]
    if name.endswith("_lora_a") and name not in ("lora_a",):
        stem = name[: -len("_lora_a")]
        if stem not in ("w", "kernel"):
            parent = (*parent, stem)
    dotted = ".".join(parent)
    if key_fn is not None:
        dotted = key_fn(dotted)
    return f"{prefix}{dotted}" if prefix else dotted


def peft_state_dict(
    model: nnx.Module,
    *,
    prefix: str = "base_model.model.",
    key_fn: Callable[[str], str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The adapter tensors in PEFT layout and the adapter config (see module doc).

    Returns:
      ``(tensors, config)``: ``{"<prefix><module>.lora_A.weight": (r, in),
      "<prefix><module>.lora_B.weight": (out, r)}`` as NumPy arrays (the factors'
      dtype), and the ``adapter_config.json`` dictionary.
    """
    pairs = lora_pairs(model)
    flat = flat_paths(nnx.state(model, nnx.LoRAParam))
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for pair in pairs:
        a = linalg.a_matrix(pair, flat[strip_wrapper(pair.a_path)])  # (*batch, m, r)
        b = linalg.b_matrix(pair, flat[strip_wrapper(pair.b_path)])  # (*batch, r, n)
        key = _module_key(pair, prefix, key_fn)
        batch_shape = a.shape[:-2]
        for idx in np.ndindex(*batch_shape) if batch_shape else [()]:
            k = key + "".join(f".{i}" for i in idx)
            tensors[f"{k}.lora_A.weight"] = np.asarray(jnp.swapaxes(a[idx], -1, -2))
            tensors[f"{k}.lora_B.weight"] = np.asarray(jnp.swapaxes(b[idx], -1, -2))
            module = k[len(prefix) :] if prefix else k
            ranks[module] = pair.rank
            alphas[module] = pair.scale * pair.rank
    if not pairs:
        raise ValueError("peft_state_dict: the model has no LoRA pair.")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    targets = sorted({m.split(".")[-1] for m in ranks})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    return tensors, config


def save_peft_adapter(
    model: nnx.Module,
    directory: str,
    *,
    base_model_name_or_path: str | None = None,
    prefix: str = "base_model.model.",
    key_fn: Callable[[str], str] | None = None,
) -> tuple[str, str]:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` to ``directory``.

    Returns:
      The two file paths.
    """
    from safetensors.numpy import save_file

    tensors, config = peft_state_dict(model, prefix=prefix, key_fn=key_fn)
    config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, "adapter_model.safetensors")
    # bf16 factors: safetensors.numpy has no bfloat16; store float32 then.
    save_file(
        {k: v if v.dtype != jnp.bfloat16 else v.astype(np.float32) for k, v in tensors.items()},
        weights,
        metadata={"format": "pt"},
    )
    config_path = os.path.join(directory, "adapter_config.json")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return weights, config_path


def load_peft_adapter(
    model: nnx.Module,
    directory: str,
    *,
    prefix: str = "base_model.model.",
    key_fn: Callable[[str], str] | None = None,
) -> nnx.Module:
    """Loads a PEFT-layout adapter saved by :func:`save_peft_adapter` into ``model``.

    ``model`` must already carry LoRA factors of the same targets and ranks (the
    scale is the model's; compare with ``adapter_config.json``). In place.
    """
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    pairs = lora_pairs(model)
    flat = flat_paths(nnx.state(model, nnx.LoRAParam))
    updates: dict[Path, Any] = {}
    for pair in pairs:
        a_old, b_old = flat[strip_wrapper(pair.a_path)], flat[strip_wrapper(pair.b_path)]
        key = _module_key(pair, prefix, key_fn)
        am, bm = linalg.a_matrix(pair, a_old), linalg.b_matrix(pair, b_old)
        batch_shape = am.shape[:-2]
        a_new, b_new = np.array(am), np.array(bm)
        for idx in np.ndindex(*batch_shape) if batch_shape else [()]:
            k = key + "".join(f".{i}" for i in idx)
            try:
                a_new[idx] = tensors[f"{k}.lora_A.weight"].T
                b_new[idx] = tensors[f"{k}.lora_B.weight"].T
            except KeyError as e:
                raise ValueError(f"load_peft_adapter: no tensor {e} in {directory}.") from e
        updates[strip_wrapper(pair.a_path)] = linalg.from_matrix(
            jnp.asarray(a_new), a_old.shape, pair
        )
        updates[strip_wrapper(pair.b_path)] = linalg.from_matrix(
            jnp.asarray(b_new), b_old.shape, pair
        )
    for path, value in updates.items():
        var = getattr(module_at(model, path[:-1]), path[-1])
        old = var[...]
        value = value.astype(old.dtype)
        if isinstance(old, jax.Array):
            value = jax.device_put(value, old.sharding)
        var[...] = value
    return model
