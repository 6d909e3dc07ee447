"""Putting LoRA on a flax ``nnx`` model, and describing its pairs to the optimizers.

:func:`apply_lora` adds LoRA factors to the modules whose path matches a regex:

* ``nnx.Linear`` layers are wrapped in :class:`ScaledLoRA`, a thin subclass of
  flax's ``nnx.LoRA`` (``base_module=`` the original layer) that multiplies the
  low-rank branch by a real scale ``s``: ``y = x W₀ + b + s · (x A) B``. flax's own
  ``nnx.LoRA`` / ``nnx.LoRALinear`` have no scale (``s = 1``) and ``LoRALinear`` has
  no hook to swap in another LoRA class, so the wrapper is the one place where the
  scale lives. Parameters: ``<path>/lora_a`` ``(in, r)``, ``<path>/lora_b`` ``(r,
  out)`` (``nnx.LoRAParam``), base kernel ``<path>/base_module/kernel``.
* every other matched module that owns an ``nnx.Param`` (``nnx.Einsum``,
  ``nnx.LinearGeneral``, gemma's ``Einsum`` …) gets qwix's LoRA
  (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``, as tunix does), which
  intercepts the module's ``einsum`` / ``dot_general`` and adds
  ``<w>_lora_a`` / ``<w>_lora_b`` next to the weight ``<w>``, multi-axis shaped
  (gemma ``q_einsum``: ``w (N, D, H)``, ``A (D, r)``, ``B (r, N, H)``). qwix scales
  by ``alpha / rank``; other conventions are expressed by passing qwix the alpha
  ``s · r``. qwix runs the model once on ``model_inputs`` to create the factors and
  only intercepts the root module's ``__call__``: loss functions must call
  ``model(...)``.

Scale conventions (``scale=``): ``"alpha/r"`` (qwix, PEFT), ``"alpha/sqrt(r)"``
(rsLoRA) and ``"1"`` (raw ``nnx.LoRA``), or a number. The scale of each layer is
recorded on the model (``ScaledLoRA.scale``; ``<w>_lora_scale`` next to qwix
factors) so that :func:`lora_pairs` can hand the optimizers
:class:`lora_optax.LoRAPair` s with the right ``scale`` — methods that use
full-weight gradients (LoRA-One, SoLoRA, LoRA-Pro) need it.

Note on trees: ``nnx.Optimizer`` initialises the optax state on ``nnx.state`` (leaves
wrapped in variables, paths ending in ``value``) but updates it with pure arrays
(no ``value``), so explicit ``LoRAPair`` paths cannot fit both; use
:func:`pair_spec` (a callable that re-discovers the pairs of whichever tree it is
given, with the recorded scales) as the optimizers' ``pairs=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_optax._src.pairs import (
    WRAPPER_KEYS,
    LoRAPair,
    Path,
    find_lora_pairs,
    pair_parent,
    path_str,
)

__all__ = [
    "SCALE_CONVENTIONS",
    "TARGET_PRESETS",
    "ScaledLoRA",
    "apply_lora",
    "base_kernel_path",
    "base_kernel_to_pair_layout",
    "lora_pairs",
    "lora_scale",
    "lora_scales",
    "module_path_str",
    "pair_spec",
    "resolve_targets",
]

SCALE_CONVENTIONS = ("alpha/r", "alpha/sqrt(r)", "1")

# Regexes over "/"-joined module paths (re.fullmatch, as qwix does).
TARGET_PRESETS: dict[str, str] = {
    # The paper's q/k/v/o targets under the usual names (BERT query/key/value/output,
    # T5 q/k/v/o); each name must be a whole path component.
    "qkvo": r"(?:.*/)?(?:query|key|value|q|k|v|o|output)",
    "bert": r"(?:.*/)?(?:query|key|value|output)",
    "t5": r"(?:.*/)?(?:q|k|v|o)",
    # tunix / gemma attention einsums (kv_einsum holds k and v in one weight).
    "gemma": r"(?:.*/)?attn/(?:q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)",
    "gemma_all": (
        r"(?:.*/)?(?:attn/(?:q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)"
        r"|mlp/(?:gate_proj|up_proj|down_proj))"
    ),
    # tunix Gemma3 (layers/<i>/attn/...): q/kv/o einsums (qkv_einsum when heads == kv
    # heads); "gemma3_all" adds the MLP's nnx.Linear gate/up/down projections.
    "gemma3": r"layers/\d+/attn/(?:q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)",
    "gemma3_all": (
        r"layers/\d+/(?:attn/(?:q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)"
        r"|mlp/(?:gate_proj|up_proj|down_proj))"
    ),
}


def lora_scale(rank: int, alpha: float | None, convention: str | float = "alpha/r") -> float:
    """The LoRA scale ``s`` for a rank, alpha and convention.

    Args:
      rank: the LoRA rank ``r``.
      alpha: the LoRA alpha (``None``: ``r``, i.e. ``s = 1`` under ``"alpha/r"``).
      convention: ``"alpha/r"`` (qwix, PEFT), ``"alpha/sqrt(r)"`` (rsLoRA), ``"1"``
        (raw ``nnx.LoRA``: alpha ignored), or a number used as ``s`` directly.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    if not isinstance(convention, str):
        return float(convention)
    alpha = float(rank if alpha is None else alpha)
    if convention == "alpha/r":
        return alpha / rank
    if convention == "alpha/sqrt(r)":
        return alpha / math.sqrt(rank)
    if convention == "1":
        return 1.0
    raise ValueError(
        f"Unknown LoRA scale convention {convention!r}; expected one of "
        f"{SCALE_CONVENTIONS} or a number."
    )


def resolve_targets(targets: str | Sequence[str]) -> str:
    """A regex over module paths from a preset name, a regex, or a list of names.

    A sequence of plain names (``["q", "v"]``) matches modules whose last path
    component is one of them.
    """
    if isinstance(targets, str):
        return TARGET_PRESETS.get(targets, targets)
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*/)?(?:{names})"


def module_path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


class ScaledLoRA(nnx.LoRA):
    """flax ``nnx.LoRA`` with a real scale: ``y = base(x) + s · (x A) B``.

    Same parameters (``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)``, type
    ``nnx.LoRAParam``) and the same ``base_module`` substitution as ``nnx.LoRA``;
    only the multiplication by ``scale`` is added. The base module sees the
    original input (so with ``B = 0`` the output is bit-identical to the base).
    """

    def __init__(self, in_features: int, lora_rank: int, out_features: int, **kwargs: Any):
        scale = float(kwargs.pop("scale", 1.0))
        super().__init__(in_features, lora_rank, out_features, **kwargs)
        self.scale = scale

    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        xp, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        out = (xp @ a) @ b
        if self.scale != 1.0:
            out = out * jnp.asarray(self.scale, out.dtype)
        if self.base_module is not None:
            out = self.base_module(x, **kwargs) + out
        return out


# get_child / set_child / strip_wrapper / qwix_permutation are shared with the other
# modules of lora_optax.flax (train, export); they are not part of the public API.


def get_child(node: Any, key: Any) -> Any:
    """``node``'s child ``key`` (a sequence index, an attribute or a mapping key)."""
    if isinstance(key, int):
        return node[key]
    if hasattr(node, str(key)):
        return getattr(node, str(key))
    return node[key]


def set_child(node: Any, key: Any, value: Any) -> None:
    """Sets ``node``'s child ``key`` (as :func:`get_child` reads it) to ``value``."""
    if isinstance(key, int):
        node[key] = value
    elif isinstance(node, nnx.Module) or hasattr(node, str(key)):
        setattr(node, str(key), value)
    else:
        node[key] = value


def _own_params(module: nnx.Module) -> list[str]:
    """Names of the (non-LoRA) ``nnx.Param`` attributes a module holds directly."""
    out = []
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam):
            out.append(name)
    return out


def _is_lora_module(module: Any) -> bool:
    if isinstance(module, (nnx.LoRA, nnx.LoRALinear)):
        return True
    return any(n.endswith("_lora_a") for n in vars(module))


def _spec_of(x: Any) -> tuple[Any, ...] | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (x.ndim - len(spec))
    return None


def _place_like(x: jax.Array, ref: jax.Array, spec: tuple[Any, ...]) -> jax.Array:
    sharding = ref.sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)
    return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, jax.P(*spec)))


def apply_lora(
    model: nnx.Module,
    *,
    targets: str | Sequence[str] = "qkvo",
    rank: int,
    alpha: float | None = None,
    scale: str | float = "alpha/r",
    rngs: nnx.Rngs | int = 0,
    model_inputs: Sequence[Any] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    lora_param_dtype: Any = None,
    a_initializer: Callable[..., jax.Array] | None = None,
    b_initializer: Callable[..., jax.Array] | None = None,
) -> nnx.Module:
    """Adds LoRA factors to the modules of ``model`` whose path matches ``targets``.

    Args:
      model: an ``nnx.Module``. When every target is an ``nnx.Linear`` they are
        wrapped in place; when any target needs qwix (einsum-style modules) the
        LoRA model is a clone (sharing the frozen arrays) and ``model`` is left
        unchanged. Always use the returned model.
      targets: a key of :data:`TARGET_PRESETS`, a regex fully matched against
        ``"/"``-joined module paths (``"layers/0/attn/q"``), or a list of names.
      rank: the LoRA rank ``r``.
      alpha: the LoRA alpha (default ``r``).
      scale: the scale convention (see :func:`lora_scale`) or a number.
      rngs: ``nnx.Rngs`` or a seed for the ``A`` initialiser.
      model_inputs, model_kwargs: example inputs for one forward pass, required
        when a target is not an ``nnx.Linear`` (qwix creates its factors while
        running the model).
      lora_param_dtype: dtype of the factors (default: the base weight's dtype).
      a_initializer, b_initializer: initialisers (default: He-uniform ``A``, zero
        ``B``, as flax and qwix).

    Returns:
      The model with LoRA factors (``nnx.LoRAParam``); the base weights are
      unchanged and, with ``B = 0``, so is the model's output.

    Raises:
      ValueError: when nothing matches, or a qwix target did not get factors.
    """
    pattern = re.compile(resolve_targets(targets))
    s = lora_scale(rank, alpha, scale)
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(rngs)
    a_init = a_initializer or nnx.initializers.he_uniform()
    b_init = b_initializer or nnx.initializers.zeros
    linear: list[tuple[tuple[Any, ...], nnx.Linear]] = []
    einsum: list[tuple[tuple[Any, ...], nnx.Module]] = []
    all_paths = []
    for path, module in nnx.iter_modules(model):
        if not path:
            continue
        name = module_path_str(path)
        all_paths.append(name)
        if not pattern.fullmatch(name) or _is_lora_module(module):
            continue
        if type(module) is nnx.Linear:
            linear.append((path, module))
        elif _own_params(module):
            einsum.append((path, module))
    if not linear and not einsum:
        raise ValueError(
            f"apply_lora: no module path matches {pattern.pattern!r}. Module paths: "
            f"{', '.join(all_paths[:12])}{', ...' if len(all_paths) > 12 else ''}."
        )
    if einsum and linear:
        # qwix clones the model; wrapping the linear targets on a clone of our own
        # first (new variables, the same arrays) never leaves the caller's model
        # half-adapted.
        model = nnx.clone(model)
        found: dict[tuple[Any, ...], Any] = dict(nnx.iter_modules(model))
        linear = [(path, found[path]) for path, _ in linear]
    for path, lin in linear:
        kernel = lin.kernel[...]
        dtype = lora_param_dtype or kernel.dtype
        wrapper = ScaledLoRA(
            lin.in_features,
            rank,
            lin.out_features,
            base_module=lin,
            scale=s,
            param_dtype=dtype,
            a_initializer=a_init,
            b_initializer=b_init,
            rngs=rngs,
        )
        spec = _spec_of(kernel)
        if spec is not None:
            wrapper.lora_a[...] = _place_like(wrapper.lora_a[...], kernel, (spec[0], None))
            wrapper.lora_b[...] = _place_like(wrapper.lora_b[...], kernel, (None, spec[1]))
        parent = model
        for key in path[:-1]:
            parent = get_child(parent, key)
        set_child(parent, path[-1], wrapper)
    if einsum:
        model = _apply_qwix(
            model,
            [module_path_str(p) for p, _ in einsum],
            rank=rank,
            scale=s,
            rngs=rngs,
            model_inputs=model_inputs,
            model_kwargs=dict(model_kwargs or {}),
            a_init=a_init,
            b_init=b_init,
            dtype=lora_param_dtype,
        )
    return model


def _apply_qwix(
    model: nnx.Module,
    paths: list[str],
    *,
    rank: int,
    scale: float,
    rngs: nnx.Rngs,
    model_inputs: Sequence[Any],
    model_kwargs: dict[str, Any],
    a_init: Any,
    b_init: Any,
    dtype: Any,
) -> nnx.Module:
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"apply_lora: modules {paths[:3]} are not nnx.Linear and need qwix "
            "(pip install 'lora_optax[flax]')."
        ) from e
    if not model_inputs and not model_kwargs:
        raise ValueError(
            f"apply_lora: the targets {paths[:3]}{' ...' if len(paths) > 3 else ''} are "
            "not nnx.Linear layers; qwix adds their LoRA factors while running the "
            "model, so pass example inputs as model_inputs=(...) / model_kwargs={...}."
        )
    if dtype is not None:
        a_init0, b_init0 = a_init, b_init

        def a_init(key, shape, _dtype=None):
            return a_init0(key, shape, dtype)

        def b_init(key, shape, _dtype=None):
            return b_init0(key, shape, dtype)

    # qwix multiplies by alpha / rank: alpha = s·r gives any scale s.
    provider = qwix.LoraProvider(
        module_path="|".join(re.escape(p) for p in paths),
        rank=rank,
        alpha=scale * rank,
        lora_a_initializer=a_init,
        lora_b_initializer=b_init,
    )
    new = qwix.apply_lora_to_model(model, provider, *model_inputs, rngs=rngs, **model_kwargs)
    missing = []
    for path, module in nnx.iter_modules(new):
        name = module_path_str(path)
        if name not in paths:
            continue
        stems = [n[: -len("_lora_a")] for n in vars(module) if n.endswith("_lora_a")]
        if not stems:
            missing.append(name)
        for stem in stems:
            setattr(module, f"{stem}_lora_scale", float(scale))
    if missing:
        raise ValueError(
            f"apply_lora: modules {missing[:5]} match the targets but qwix added no LoRA "
            "factors to them (their forward pass does not contract an own weight with "
            "einsum/dot_general, or it did not run under the root __call__)."
        )
    return new


def strip_wrapper(path: Path) -> Path:
    """``path`` without a trailing variable wrapper key (``.../lora_a/value``)."""
    if path and path[-1] in WRAPPER_KEYS:
        return path[:-1]
    return path


def lora_scales(model: nnx.Module) -> dict[Path, float | None]:
    """The recorded scale of every LoRA ``A`` factor, keyed by its state path.

    ``ScaledLoRA`` → its ``scale``; flax ``nnx.LoRA`` / ``nnx.LoRALinear`` → 1;
    qwix factors → ``<w>_lora_scale`` when :func:`apply_lora` made them, else
    ``None`` (unknown: qwix applied elsewhere; pass ``scale=`` to :func:`lora_pairs`).
    """
    out: dict[Path, float | None] = {}
    for path, module in nnx.iter_modules(model):
        base = tuple(str(p) for p in path)
        if isinstance(module, ScaledLoRA):
            out[(*base, "lora_a")] = module.scale
        elif isinstance(module, nnx.LoRA):
            out[(*base, "lora_a")] = 1.0
        for name in vars(module):
            if name.endswith("_lora_a") and isinstance(getattr(module, name), nnx.Variable):
                stem = name[: -len("_lora_a")]
                value = getattr(module, f"{stem}_lora_scale", None)
                out[(*base, name)] = None if value is None else float(value)
    return out


def _scale_lookup(scales: Mapping[Path, float | None], override: Any) -> Callable[[Path], float]:
    def lookup(path: Path) -> float:
        key = strip_wrapper(tuple(path))
        if override is not None:
            if isinstance(override, (int, float)):
                return float(override)
            if callable(override):
                return float(override(key))
            value = override.get(path_str(key), override.get(key))
            if value is not None:
                return float(value)
        value = scales.get(key)
        if value is None:
            if key in scales:
                raise ValueError(
                    f"lora_pairs: the scale of LoRA pair {path_str(key)} is unknown (qwix "
                    "factors not made by lora_optax.flax.apply_lora); pass scale=."
                )
            return 1.0
        return float(value)

    return lookup


def lora_pairs(
    model_or_state: Any, *, scale: float | Mapping[str, float] | Callable | None = None
) -> tuple[LoRAPair, ...]:
    """The LoRA pairs of a model (or of a LoRA-param state / pure tree), with scales.

    Args:
      model_or_state: an ``nnx.Module`` (scales read from the model), or an
        ``nnx.State`` / pytree of the LoRA params (then ``scale`` gives the scales,
        default 1).
      scale: overrides: a number for all pairs, a mapping from A path (``"a/b/lora_a"``)
        to scale, or a callable of the A path.

    Returns:
      The pairs with paths into the PURE tree (``nnx.as_pure(nnx.state(model,
      nnx.LoRAParam))``, what ``nnx.Optimizer.update`` hands the optimizer), sorted
      by A path.
    """
    if isinstance(model_or_state, nnx.Module):
        scales = lora_scales(model_or_state)
        tree = nnx.as_pure(nnx.state(model_or_state, nnx.LoRAParam))
    else:
        scales = {}
        tree = nnx.as_pure(model_or_state)
    return find_lora_pairs(tree, scale=_scale_lookup(scales, scale))


def pair_spec(
    model: nnx.Module, *, scale: float | Mapping[str, float] | Callable | None = None
) -> Callable[[Any], tuple[LoRAPair, ...]]:
    """A ``pairs=`` spec for the optimizers, with the model's recorded scales.

    Re-discovers the pairs of whichever tree the optimizer is given (``nnx.Optimizer``
    inits on variable-wrapped state and updates on pure arrays), attaching the scale
    recorded in ``model`` for each pair.
    """
    lookup = _scale_lookup(lora_scales(model), scale)
    lora_pairs(model, scale=scale)  # fail early on unknown scales

    def spec(tree: Any) -> tuple[LoRAPair, ...]:
        return find_lora_pairs(tree, scale=lookup)

    return spec


# ---------------------------------------------------------------------------------
# Base kernels of LoRA pairs (full-weight gradients, merging, export).
# ---------------------------------------------------------------------------------


def base_kernel_path(pair: LoRAPair, state: Any) -> Path:
    """Path (pure-state, string keys) of the frozen base weight a pair adapts.

    ``ScaledLoRA`` / ``nnx.LoRA(base_module=)`` → ``<parent>/base_module/kernel``;
    ``nnx.LoRALinear`` → ``<layer>/kernel``; qwix ``<w>_lora_a`` → ``<parent>/<w>``.

    Args:
      pair: the pair (paths into the pure LoRA tree).
      state: a mapping of the candidate paths (e.g. ``{path: array}`` of the model's
        ``nnx.Param`` state, flattened by :func:`flat_paths`), or a set of paths.
    """
    parent = pair_parent(pair)
    a_name = strip_wrapper(pair.a_path)[-1]
    candidates: list[Path] = []
    if a_name.endswith("_lora_a") and a_name != "_lora_a":
        candidates.append((*parent, a_name[: -len("_lora_a")]))
    candidates.append((*parent, "base_module", "kernel"))
    if parent and parent[-1] == "lora":
        candidates.append((*parent[:-1], "kernel"))
    for c in candidates:
        if c in state:
            return c
    raise ValueError(
        f"No base weight found for LoRA pair {pair.name}; looked for "
        f"{', '.join(path_str(c) for c in candidates)}."
    )


def _einsum_rhs(einsum_str: str) -> str | None:
    try:
        lhs_rhs = einsum_str.replace(" ", "").split("->")[0]
        parts = lhs_rhs.split(",")
        return parts[1] if len(parts) == 2 else None
    except (AttributeError, IndexError):
        return None


def base_kernel_to_pair_layout(
    pair: LoRAPair,
    kernel: jax.Array,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    module: Any = None,
    stem: str | None = None,
) -> jax.Array:
    """Reorders a base weight (or its gradient) to the pair's layout ``(*batch, *in, *out)``.

    nnx kernels ``(in, out)`` are already in that layout. qwix einsum factors take
    the weight's contracting axes for ``A`` and the others for ``B`` in their order
    of appearance, which for gemma's ``q_einsum`` (``w (N, D, H)``, ``A (D, r)``,
    ``B (r, N, H)``) means a transpose to ``(D, N, H)``; the einsum string is read
    from the module (``einsum_str`` attribute, or qwix's ``<w>_lora_einsum_str``).

    Returns:
      The array in layout ``A.shape[:-1] + B.shape[k+1:]``.

    Raises:
      ValueError: when the layout cannot be determined.
    """
    k = pair.batch_ndim
    target = tuple(a_shape[:-1]) + tuple(b_shape[k + 1 :])
    perm = qwix_permutation(module, stem, kernel.ndim)
    out = kernel if perm is None else jnp.transpose(kernel, perm)
    if tuple(out.shape) == target:
        return out
    if math.prod(out.shape) == math.prod(target):
        # qwix dot_general: A (*batch, prod(contract), r), B (*batch, r, prod(remain)),
        # with the weight laid out (batch, contract, remain).
        return out.reshape(target)
    raise ValueError(
        f"Cannot map the base weight {tuple(kernel.shape)} of LoRA pair {pair.name} "
        f"to its factors' layout {target}."
    )


def qwix_permutation(module: Any, stem: str | None, ndim: int) -> list[int] | None:
    """Axis order (contracting+batch axes of the weight, then the others)."""
    if module is None or stem is None:
        return None
    einsum_str = getattr(module, "einsum_str", None)
    rhs = _einsum_rhs(einsum_str) if isinstance(einsum_str, str) else None
    lora_str = getattr(module, f"{stem}_lora_einsum_str", None)
    if rhs is None or not isinstance(lora_str, str):
        return None
    if "..." in rhs or len(rhs) != ndim:
        return None
    lhs = lora_str.split("->")[0].split(",")[0]
    a_axes = [i for i, c in enumerate(rhs) if c in lhs]
    b_axes = [i for i, c in enumerate(rhs) if c not in lhs]
    return a_axes + b_axes


def inverse_permutation(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def flat_paths(state: Any) -> dict[Path, Any]:
    """``{path: leaf}`` of a (pure or variable) state, paths as string tuples."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))[0]:
        out[tuple(_key(k) for k in kp)] = leaf
    return out


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def module_at(model: nnx.Module, path: Path) -> Any:
    """The module at a string path (``("layers", "0", "attn")``)."""
    node: Any = model
    for key in path:
        if isinstance(node, (list, tuple, nnx.List)) or (key.isdigit() and not hasattr(node, key)):
            node = node[int(key)]
        else:
            node = get_child(node, key)
    return node
