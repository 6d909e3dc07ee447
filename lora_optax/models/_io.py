"""Shared checkpoint I/O for the reference models: safetensors reading and parameter filling.

A Hugging Face checkpoint directory holds either one ``model.safetensors`` or several shards
listed in ``model.safetensors.index.json`` (``{"weight_map": {name: shard_file}}``), plus a
``config.json``. The loaders here build the nnx model abstractly (``nnx.eval_shape``, so no
random initialisation is paid for), then fill every ``nnx.Param`` from a dict keyed by the
param's nnx path. Every param must be filled exactly once, with the right shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "fill_params",
    "param_paths",
    "read_config",
    "read_safetensors",
    "resolve_checkpoint",
]

Path_ = tuple[Any, ...]


def resolve_checkpoint(path_or_dir: str | os.PathLike[str]) -> tuple[list[Path], Path | None]:
    """Returns the safetensors file(s) and the ``config.json`` (if any) of a checkpoint.

    ``path_or_dir`` is a ``.safetensors`` file (its ``config.json`` is looked for beside it),
    a ``model.safetensors.index.json`` of a sharded checkpoint, or a directory holding one of
    those.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        single = p / "model.safetensors"
        index = p / "model.safetensors.index.json"
        if single.is_file():
            p = single
        elif index.is_file():
            p = index
        else:
            raise FileNotFoundError(f"no model.safetensors(.index.json) in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.name.endswith(".index.json"):
        weight_map = json.loads(p.read_text())["weight_map"]
        files = [p.parent / f for f in sorted(set(weight_map.values()))]
    else:
        files = [p]
    config = p.parent / "config.json"
    return files, (config if config.is_file() else None)


def read_config(path: Path | None) -> dict[str, Any]:
    """Reads a ``config.json`` (empty dict when ``path`` is None)."""
    if path is None:
        return {}
    return dict(json.loads(Path(path).read_text()))


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Loads all tensors of the given safetensors files into NumPy arrays (bf16 via ml_dtypes)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in out:
                raise ValueError(f"tensor {k!r} appears in two shards")
            out[k] = v
    return out


def param_paths(module: nnx.Module) -> dict[Path_, nnx.Param]:
    """All ``nnx.Param`` variables of ``module`` keyed by their nnx path."""
    return {tuple(path): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


def _fmt(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def fill_params(module: nnx.Module, arrays: Mapping[Path_, Any]) -> None:
    """Sets every ``nnx.Param`` of ``module`` from ``arrays`` (nnx path -> array).

    Values are cast to each param's dtype. Raises ``ValueError`` naming the paths when a param
    is missing, an array has no param, or a shape disagrees.
    """
    params = param_paths(module)
    missing = sorted(_fmt(p) for p in params if p not in arrays)
    extra = sorted(_fmt(p) for p in arrays if p not in params)
    if missing or extra:
        raise ValueError(f"checkpoint/model mismatch: missing={missing} unexpected={extra}")
    for path, var in params.items():
        arr = arrays[path]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(
                f"shape mismatch at {_fmt(path)}: checkpoint {tuple(arr.shape)}, "
                f"model {tuple(var.shape)}"
            )
        var.set_value(jnp.asarray(arr, dtype=var.dtype))
    abstract = [
        _fmt(tuple(p))
        for p, v in nnx.iter_graph(module)
        if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"variables left unset after loading: {abstract}")
