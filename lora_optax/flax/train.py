"""Jitted LoRA train steps for ``nnx`` models, with optional full-weight gradients.

The optimizer is an ordinary ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``: only
the LoRA factors are differentiated and updated. Methods that need ``G = ∂L/∂W`` of
the frozen base weights (SoLoRA every step, LoRA-One at initialisation, LoRA-Pro)
get it from the SAME backward pass: the step differentiates with respect to the
LoRA factors and the base kernels of the LoRA-wrapped layers (only those), which,
since the layer computes ``x W₀ + s·(x A) B``, is exactly ``G`` at the effective
weight ``W₀ + s·A B`` (the pure-JAX equivalent is
:func:`lora_optax.value_and_full_grads` with zero probes). ``G`` is reordered to the
pair's layout ``(*batch, *in, *out)`` (qwix einsum weights such as gemma's
``w (N, D, H)`` are transposed) and placed at the pair's parent node — the
``full_grads=`` tree every optimizer of the library reads.

Sharding: build an ``Auto``-axis mesh with :func:`make_mesh` (``{"data": 4,
"model": 2}``), place the weights with :func:`shard_model` (regex rules for the base
weights; LoRA factors follow their base weight: ``A`` takes the weight's input-axis
sharding, ``B`` its output-axis sharding) BEFORE creating the optimizer (its state
follows the params), and the step shards each batch over the ``data`` axis.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_optax._src.pairs import LeafIndex, LoRAPair, Path, pair_parent, path_str
from lora_optax.flax.lora import (
    base_kernel_path,
    flat_paths,
    inverse_permutation,
    lora_pairs,
    module_at,
    qwix_permutation,
    strip_wrapper,
)

__all__ = [
    "FullGradPlan",
    "average_full_grads",
    "lora_one_init",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "shard_batch",
    "shard_model",
]

_FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


# ---------------------------------------------------------------------------------
# Full-weight gradients
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PairKernel:
    pair: LoRAPair
    kernel_path: Path  # in the model's pure state
    parent: Path  # pair's parent node (where G goes in full_grads)
    perm: tuple[int, ...] | None  # kernel axes -> pair layout (None: identity)
    target: tuple[int, ...]  # (*batch, *in, *out)


@dataclasses.dataclass(frozen=True)
class FullGradPlan:
    """Where each LoRA pair's base weight is and how its gradient maps to ``G``."""

    entries: tuple[_PairKernel, ...]

    @classmethod
    def from_model(cls, model: nnx.Module, pairs: Sequence[LoRAPair] | None = None) -> FullGradPlan:
        pairs = tuple(pairs) if pairs is not None else lora_pairs(model)
        params = flat_paths(nnx.state(model, nnx.Param))
        entries = []
        for pair in pairs:
            kpath = base_kernel_path(pair, params)
            kernel = params[kpath]
            a, b = params[strip_wrapper(pair.a_path)], params[strip_wrapper(pair.b_path)]
            module = module_at(model, kpath[:-1])
            stem = kpath[-1] if strip_wrapper(pair.a_path)[-1].endswith("_lora_a") else None
            qp = qwix_permutation(module, stem, kernel.ndim)
            perm = tuple(qp) if qp is not None and list(qp) != list(range(kernel.ndim)) else None
            target = tuple(a.shape[:-1]) + tuple(b.shape[pair.batch_ndim + 1 :])
            if math.prod(kernel.shape) != math.prod(target):
                raise ValueError(
                    f"LoRA pair {pair.name}: base weight {path_str(kpath)} has shape "
                    f"{tuple(kernel.shape)}, which does not fit A {a.shape} / B {b.shape}."
                )
            entries.append(_PairKernel(pair, kpath, pair_parent(pair), perm, target))
        return cls(tuple(entries))

    @property
    def kernel_paths(self) -> frozenset[Path]:
        return frozenset(e.kernel_path for e in self.entries)

    def to_pair_layout(self, entry: _PairKernel, g: jax.Array) -> jax.Array:
        if entry.perm is not None:
            g = jnp.transpose(g, entry.perm)
        return g.reshape(entry.target)

    def from_pair_layout(self, entry: _PairKernel, g: jax.Array, kernel_shape) -> jax.Array:
        """Inverse of :meth:`to_pair_layout` (pair layout -> the kernel's own layout)."""
        if entry.perm is None:
            return g.reshape(kernel_shape)
        permuted_shape = tuple(kernel_shape[i] for i in entry.perm)
        return jnp.transpose(g.reshape(permuted_shape), inverse_permutation(entry.perm))

    def full_grads(self, kernel_grads: Mapping[Path, jax.Array]) -> dict[str, Any]:
        """The ``full_grads`` tree: ``G`` of each pair at its parent node."""
        tree: dict[str, Any] = {}
        for e in self.entries:
            g = self.to_pair_layout(e, kernel_grads[e.kernel_path])
            node = tree
            for key in e.parent[:-1]:
                node = node.setdefault(key, {})
            node[e.parent[-1]] = g
        return tree

    def filter(self) -> Callable[[Any, Any], bool]:
        paths = self.kernel_paths

        def is_kernel(path, _value) -> bool:
            return tuple(str(p) for p in path) in paths

        return is_kernel


def _loss_and_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    if has_aux:
        return out
    return out, None


def _grads(model, loss_fn, batch, *, has_aux, plan: FullGradPlan | None):
    wrt: Any = nnx.LoRAParam
    if plan is not None:
        wrt = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, plan.filter()))

    def f(m):
        return _loss_and_aux(loss_fn(m, batch), has_aux)

    (loss, aux), grads = nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    full = None
    if plan is not None:
        flat = flat_paths(grads)
        full = plan.full_grads({p: flat[p] for p in plan.kernel_paths})
    return loss, aux, grads, full


# ---------------------------------------------------------------------------------
# Meshes and shardings
# ---------------------------------------------------------------------------------


def make_mesh(shape: Mapping[str, int] | Sequence[tuple[str, int]] | None = None) -> Any:
    """An ``Auto``-axis device mesh, e.g. ``make_mesh({"data": 4, "model": 2})``.

    ``None`` puts every device on one ``data`` axis. ``-1`` for one axis takes the
    remaining devices.
    """
    n = jax.device_count()
    items = list((shape or {"data": n}).items() if isinstance(shape, Mapping) else shape or [])
    known = int(np.prod([s for _, s in items if s != -1]))
    items = [(k, n // known if s == -1 else s) for k, s in items]
    names = tuple(k for k, _ in items)
    sizes = tuple(int(s) for _, s in items)
    if int(np.prod(sizes)) > n:
        raise ValueError(f"make_mesh: mesh {dict(items)} needs {np.prod(sizes)} devices, have {n}.")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(sizes, names, axis_types=(auto,) * len(names))


def shard_batch(batch: Any, mesh: Any, data_axis: str | None = "data") -> Any:
    """Places a batch on ``mesh``, leading axis split over ``data_axis``."""
    if mesh is None:
        return batch

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if data_axis is None or x.ndim == 0 or x.shape[0] % mesh.shape[data_axis]:
            spec = jax.P()
        else:
            spec = jax.P(data_axis)
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def shard_model(
    model: nnx.Module,
    mesh: Any,
    rules: Sequence[tuple[str, Any]] = (),
    *,
    lora_follows_base: bool = True,
) -> nnx.Module:
    """Places every array of ``model`` on ``mesh`` (in place).

    Args:
      model: the model (with or without LoRA factors).
      mesh: the device mesh.
      rules: ``(regex over "/"-joined state paths, PartitionSpec)``, first full match
        wins, e.g. ``[(r".*/(query|key|value)/base_module/kernel", P(None, "model"))]``.
        Unmatched arrays are replicated.
      lora_follows_base: give each LoRA factor its base weight's sharding (``A``:
        the weight's input axes, ``B``: its output axes, rank axis replicated)
        unless a rule names the factor itself.

    Returns:
      The model (updated in place).
    """
    compiled = [(re.compile(r), spec) for r, spec in rules]

    def spec_for(path: Path) -> Any:
        name = "/".join(path)
        for regex, spec in compiled:
            if regex.fullmatch(name):
                return spec
        return None

    state = nnx.state(model)
    flat = flat_paths(state)
    specs: dict[Path, Any] = {p: spec_for(p) for p in flat}
    if lora_follows_base and nnx.state(model, nnx.LoRAParam):
        plan = FullGradPlan.from_model(model)
        for e in plan.entries:
            kspec = specs.get(e.kernel_path)
            if kspec is None:
                continue
            kspec = tuple(kspec) + (None,) * (flat[e.kernel_path].ndim - len(kspec))
            if e.perm is not None:
                kspec = tuple(kspec[i] for i in e.perm)
            pair = e.pair
            a_path, b_path = strip_wrapper(pair.a_path), strip_wrapper(pair.b_path)
            a_shape, b_shape = flat[a_path].shape, flat[b_path].shape
            k, m_axes = pair.batch_ndim, pair.in_ndim
            if len(kspec) != k + m_axes + pair.out_ndim:
                continue  # flattened qwix dot_general factors: leave replicated
            if specs.get(a_path) is None and len(a_shape) == k + m_axes + 1:
                specs[a_path] = jax.P(*kspec[: k + m_axes], None)
            if specs.get(b_path) is None and len(b_shape) == k + 1 + pair.out_ndim:
                specs[b_path] = jax.P(*kspec[:k], None, *kspec[k + m_axes :])

    def place(kp, x):
        if not hasattr(x, "shape"):
            return x
        path = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)
        spec = specs.get(path) or jax.P()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    pure = nnx.as_pure(state)
    placed = jax.tree_util.tree_map_with_path(place, pure)
    nnx.update(model, placed)
    return model


# ---------------------------------------------------------------------------------
# Train / eval steps
# ---------------------------------------------------------------------------------


def _find_mesh(tree: Any) -> Any:
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def replicate_onto_mesh(node: Any, mesh: Any) -> None:
    """Puts every array of ``node`` that is not on ``mesh`` onto it, replicated, in place.

    ``mesh=None``: the mesh of the node's sharded arrays (nothing happens if none is).

    (Optimizer counters and scalars are created on one device; jit needs one mesh.)
    """
    state = nnx.state(node)
    mesh = mesh if mesh is not None else _find_mesh(state)
    if mesh is None:
        return
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def put(x):
        if not isinstance(x, jax.Array):
            return x
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    nnx.update(node, jax.tree.map(put, nnx.as_pure(state)))


def commit_arrays(graph: Any) -> None:
    """Commits every array of an nnx graph (module, optimizer, tuple of them) in place.

    jit keys its cache on whether arguments are committed: a step's outputs are as
    soon as one input is, so a model or optimizer state left uncommitted (created on
    the default device) beside committed arrays would compile a second time at the
    second step.
    """
    state = nnx.state(graph)
    nnx.update(
        graph,
        jax.tree.map(
            lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x, state
        ),
    )


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


# Compiled gradient functions shared by every step built with share_grads=True:
# (model graphdef, loss_fn, has_aux, full-grad kernels) -> jitted (lora, frozen, batch) fn;
# the least recently built are dropped beyond _SHARED_GRADS_MAX.
_SHARED_GRADS: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_SHARED_GRADS_MAX = 8


def _shared_grad_fn(graphdef: Any, loss_fn: Callable, has_aux: bool, plan: Any) -> Any:
    # repr: graphdefs holding unhashable static attributes (tunix configs) have no hash.
    key = (repr(graphdef), loss_fn, has_aux, None if plan is None else plan.kernel_paths)
    fn = _SHARED_GRADS.get(key)
    if fn is not None:
        _SHARED_GRADS.move_to_end(key)
    else:

        def grads(lora, frozen, batch):
            m = nnx.merge(graphdef, frozen, lora)
            return _grads(m, loss_fn, batch, has_aux=has_aux, plan=plan)

        fn = _SHARED_GRADS[key] = jax.jit(grads)
        while len(_SHARED_GRADS) > _SHARED_GRADS_MAX:
            _SHARED_GRADS.popitem(last=False)
    return fn


def make_train_step(
    loss_fn: Callable[[nnx.Module, Any], Any],
    *,
    has_aux: bool = False,
    full_grads: bool = False,
    pairs: Sequence[LoRAPair] | None = None,
    mesh: Any = None,
    data_axis: str | None = "data",
    jit: bool = True,
    donate: bool = True,
    share_grads: bool = False,
) -> Callable[[nnx.Module, nnx.Optimizer, Any], tuple[Any, Any]]:
    """Builds ``step(model, optimizer, batch) -> (loss, aux)`` for LoRA training.

    ``optimizer`` must be ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``; the step
    differentiates the LoRA factors only (plus, with ``full_grads=True``, the base
    kernels of the LoRA layers, whose gradients become the ``full_grads=`` tree
    passed to ``tx.update``), applies the update and mutates ``model`` and
    ``optimizer`` in place. Under ``jit`` it compiles once per batch shape; the
    mutable state (LoRA params, optimizer state, counters) is donated and keeps its
    sharding, the frozen weights are passed separately and never copied.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), calling ``model(...)`` (qwix LoRA intercepts the root call).
      has_aux: whether ``loss_fn`` returns auxiliary outputs.
      full_grads: compute the full-weight gradients (SoLoRA, LoRA-Pro).
      pairs: the pairs (default: :func:`lora_optax.flax.lora_pairs` of the model).
      mesh: a device mesh; each batch is then sharded over ``data_axis``.
      data_axis: the mesh axis of the batch.
      jit: compile the step (default).
      donate: donate the mutable state's buffers to the step.
      share_grads: compile the forward + backward pass separately from the update,
        once per (model structure, ``loss_fn``, batch shape) for all the steps built
        in this process: comparing optimizers on one model then compiles the model
        once, and each optimizer only its update. (Default: one fused program.)

    Returns:
      The step function; ``loss`` is a scalar array, ``aux`` whatever ``loss_fn``
      returned (or ``None``).
    """
    cache: dict[str, Any] = {}

    def build(model, optimizer):
        replicate_onto_mesh((model, optimizer), mesh)
        commit_arrays((model, optimizer))
        plan = FullGradPlan.from_model(model, pairs) if full_grads else None
        graphdef, _, mutable = nnx.split((model, optimizer), _FROZEN, ...)  # type: ignore[misc]

        def pure_step(mutable, frozen, batch):
            m, opt = nnx.merge(graphdef, frozen, mutable)
            loss, aux, grads, full = _grads(m, loss_fn, batch, has_aux=has_aux, plan=plan)
            extra = {} if full is None else {"full_grads": full}
            opt.update(m, grads, **extra)
            _, _, new_mutable = nnx.split((m, opt), _FROZEN, ...)  # type: ignore[misc]
            return new_mutable, loss, aux

        if share_grads and jit:
            return graphdef, _split_step(graphdef, model, plan, donate, mutable)
        if jit:
            fn = jax.jit(
                pure_step,
                donate_argnums=(0,) if donate else (),
                out_shardings=(_shardings(mutable), None, None),
            )
        else:
            fn = pure_step
        return graphdef, fn

    def _split_step(graphdef, model, plan, donate, mutable):
        # The model's own structure keys the shared gradient function; the (model,
        # optimizer) states are indexed 0 (model) and 1 (optimizer).
        model_def, _, _ = nnx.split(model, _FROZEN, ...)  # type: ignore[misc]
        grad_fn = _shared_grad_fn(model_def, loss_fn, has_aux, plan)

        def pure_update(mutable, frozen, grads, full):
            m, opt = nnx.merge(graphdef, frozen, mutable)
            opt.update(m, grads, **({} if full is None else {"full_grads": full}))
            _, _, new_mutable = nnx.split((m, opt), _FROZEN, ...)  # type: ignore[misc]
            return new_mutable

        update = jax.jit(
            pure_update,
            donate_argnums=(0,) if donate else (),
            out_shardings=_shardings(mutable),
        )

        def fn(mutable, frozen, batch):
            loss, aux, grads, full = grad_fn(mutable[0], frozen[0], batch)
            return update(mutable, frozen, grads, full), loss, aux

        return fn

    def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> tuple[Any, Any]:
        if "fn" not in cache:
            cache["graphdef"], cache["fn"] = build(model, optimizer)
        _, frozen, mutable = nnx.split((model, optimizer), _FROZEN, ...)  # type: ignore[misc]
        batch = shard_batch(batch, mesh, data_axis)
        new_mutable, loss, aux = cache["fn"](mutable, frozen, batch)
        nnx.update((model, optimizer), new_mutable)
        return loss, aux

    step.cache = cache  # type: ignore[attr-defined]
    return step


def make_eval_step(
    fn: Callable[[nnx.Module, Any], Any],
    *,
    mesh: Any = None,
    data_axis: str | None = "data",
    jit: bool = True,
) -> Callable[[nnx.Module, Any], Any]:
    """Builds ``eval_step(model, batch) -> fn(model, batch)``, jitted, no mutation."""
    cache: dict[str, Any] = {}

    def step(model: nnx.Module, batch: Any) -> Any:
        graphdef, state = nnx.split(model)
        if "fn" not in cache or cache["graphdef"] != graphdef:

            def pure(state, batch):
                return fn(nnx.merge(graphdef, state), batch)

            cache["graphdef"], cache["fn"] = graphdef, jax.jit(pure) if jit else pure
        return cache["fn"](state, shard_batch(batch, mesh, data_axis))

    return step


# ---------------------------------------------------------------------------------
# LoRA-One initialisation
# ---------------------------------------------------------------------------------


def average_full_grads(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], Any],
    batches: Iterable[Any],
    *,
    has_aux: bool = False,
    pairs: Sequence[LoRAPair] | None = None,
    mesh: Any = None,
    data_axis: str | None = "data",
) -> dict[str, Any]:
    """The ``full_grads`` tree averaged over ``batches`` (LoRA-One uses a few)."""
    plan = FullGradPlan.from_model(model, pairs)
    graphdef, state = nnx.split(model)

    @jax.jit
    def one(state, batch):
        m = nnx.merge(graphdef, state)
        _, _, _, full = _grads(m, loss_fn, batch, has_aux=has_aux, plan=plan)
        return full

    total, n = None, 0
    for batch in batches:
        g = one(state, shard_batch(batch, mesh, data_axis))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if total is None:
        raise ValueError("average_full_grads: no batch given.")
    return jax.tree.map(lambda x: x / n, total)


def lora_one_init(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], Any],
    batches: Iterable[Any],
    *,
    has_aux: bool = False,
    mesh: Any = None,
    data_axis: str | None = "data",
    **spectral_kwargs: Any,
) -> nnx.Module:
    """LoRA-One's spectral initialisation of every pair, in place.

    Averages the full-weight gradients over ``batches`` (:func:`average_full_grads`)
    and replaces each pair's ``(A, B)`` by :func:`lora_optax.spectral_init_pairs`
    (``gamma``, ``preserve_output``, ``method`` … go through ``spectral_kwargs``,
    and the model's recorded LoRA scale is used). With ``preserve_output=True`` the
    returned ``ΔW₀ = −s A₀ B₀`` are added to the base weights so that the model's
    output is unchanged. Call it before creating the optimizer.
    """
    import lora_optax

    pairs = lora_pairs(model)
    full = average_full_grads(
        model, loss_fn, batches, has_aux=has_aux, pairs=pairs, mesh=mesh, data_axis=data_axis
    )
    lora_state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
    out = lora_optax.spectral_init_pairs(lora_state, full, pairs=pairs, **spectral_kwargs)
    if spectral_kwargs.get("preserve_output"):
        new_lora, deltas = out
        plan = FullGradPlan.from_model(model, pairs)
        flat_params = flat_paths(nnx.state(model, nnx.Param))
        didx = LeafIndex(deltas)
        updates = {}
        for e in plan.entries:
            kernel = flat_params[e.kernel_path]
            dw = didx[e.parent]
            updates[e.kernel_path] = kernel + plan.from_pair_layout(e, dw, kernel.shape).astype(
                kernel.dtype
            )
        _update_paths(model, updates)
    else:
        new_lora = out
    new_lora = jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new,
        new_lora,
        lora_state,
    )
    nnx.update(model, new_lora)
    return model


def _update_paths(model: nnx.Module, values: Mapping[Path, jax.Array]) -> None:
    """Sets the arrays at the given pure-state paths of ``model``."""
    for path, value in values.items():
        owner = module_at(model, path[:-1])
        var = getattr(owner, path[-1])
        old = var[...]
        if isinstance(old, jax.Array):
            value = jax.device_put(value, old.sharding)
        var[...] = value
