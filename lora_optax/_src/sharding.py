"""Optimizer-state shardings derived from parameter shardings, without materialising."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from lora_optax._src.pairs import LeafIndex, path_str
from lora_optax._src.pairwise import is_variable as _is_variable


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (Sharding, PartitionSpec)) or _is_variable(x)


def _variable_spec(var: Any) -> PartitionSpec | None:
    """The spec an nnx Variable asks for its optimizer state.

    ``optimizer_sharding`` metadata (flax's name for the layout of a parameter's
    optimizer state) wins over ``out_sharding`` / ``sharding_names``; logical axis
    names are resolved with flax's rules when flax is installed.
    """
    meta = dict(var.get_metadata())
    names = meta.get("optimizer_sharding")
    if names is None:
        names = meta.get("out_sharding", meta.get("sharding_names"))
    if names is None:
        return None
    if isinstance(names, PartitionSpec):
        return names
    if isinstance(names, NamedSharding):
        return names.spec
    try:  # logical axis rules (flax.nnx.spmd.get_var_pspec semantics)
        from flax.core import spmd as core_spmd

        rules = core_spmd.composite_rules(
            core_spmd.get_logical_axis_rules(), meta.get("sharding_rules", ())
        )
        if rules:
            return PartitionSpec(*core_spmd.from_sharding_rules(tuple(names), rules))
    except ImportError:  # pragma: no cover - flax is optional
        pass
    return PartitionSpec(*names)


def _context_mesh() -> Mesh | None:
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


def _as_explicit(mesh: Mesh) -> Mesh:
    explicit = (AxisType.Explicit,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=explicit)


def state_shardings(
    tx: optax.GradientTransformation,
    params_or_abstract: Any,
    param_shardings: Any = None,
    *,
    mesh: Mesh | None = None,
) -> Any:
    """The shardings of ``tx.init(params)`` for parameters laid out as given.

    Nothing is materialised: the state's shapes come from ``jax.eval_shape(tx.init,
    ...)`` on abstract parameters. Layout rules (those of every ``lora_optax``
    optimizer, and of optax's own ``zeros_like`` states): state of a factor's shape
    follows that factor's sharding; factor-derived state (a vector over ``A``'s input
    axes, a full ``m × n`` moment) takes the matching axes of ``A`` and ``B``; r×r
    state keeps only the stacked-layer (batch) axes' sharding and is replicated
    otherwise; scalars (step counts) are replicated. The shardings are obtained by
    running ``tx.init`` abstractly on a mesh with ``Explicit`` axes over the same
    devices, so they are exactly those the optimizer's sharding-aware ``init``
    produces, for ``Auto`` meshes as well.

    Args:
      tx: the optimizer.
      params_or_abstract: the parameters: arrays, ``jax.ShapeDtypeStruct`` leaves (with
        ``.sharding`` when ``param_shardings`` is not given), or a flax ``nnx.State``
        of ``nnx.Variable`` s whose ``optimizer_sharding`` / ``out_sharding`` metadata
        (as read by ``nnx.get_partition_spec``) gives the layout.
      param_shardings: optional tree of the same structure with a ``NamedSharding``,
        a ``PartitionSpec`` (on ``mesh`` or the mesh set with ``jax.set_mesh``) or
        ``None`` (replicated) per parameter; ``nnx.get_partition_spec(state)`` and
        ``nnx.get_named_sharding(state, mesh)`` trees work. Overrides the leaves'
        own shardings.
      mesh: the mesh for ``PartitionSpec`` leaves / metadata (default: the mesh set
        with ``jax.set_mesh``, or that of the parameters' ``NamedSharding`` s).

    Returns:
      A tree with the structure of ``tx.init(params)`` holding a ``NamedSharding``
      per state array (over the parameters' mesh). Without any mesh (unsharded
      parameters) every leaf is the default device's ``SingleDeviceSharding``.

    Raises:
      TypeError: if ``tx`` is not an optax transformation.
      ValueError: if ``param_shardings`` does not match the params' structure
        (naming the path), a spec has more axes than its parameter, or the
        parameters live on different meshes.

    Example (multi-host: every process runs the same code; nothing is gathered)::

      mesh = jax.make_mesh((jax.process_count(), jax.local_device_count()),
                           ("data", "model"))
      specs = {"dense": {"lora_a": P("data", None), "lora_b": P(None, "model")}}
      shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                               is_leaf=lambda x: isinstance(x, P))
      # Each process builds only its own shards of the parameters.
      params = jax.tree.map(
          lambda host, s: jax.make_array_from_callback(host.shape, s,
                                                       lambda idx: host[idx]),
          host_params, shardings)
      tx = lora_optax.scaled_adamw(1e-3)
      opt_shardings = lora_optax.state_shardings(tx, params)
      opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
      # Abstract targets for restoring a checkpoint (e.g. orbax) onto this mesh:
      abstract_state = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          jax.eval_shape(tx.init, params), opt_shardings)

    A doctested single-process example:

      >>> import jax, jax.numpy as jnp, lora_optax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
      >>> params = {"lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32,
      ...                                          sharding=NamedSharding(mesh, P("data"))),
      ...           "lora_b": jax.ShapeDtypeStruct((2, 8), jnp.float32,
      ...                                          sharding=NamedSharding(mesh, P()))}
      >>> s = lora_optax.state_shardings(lora_optax.scaled_adamw(1e-3), params)
      >>> adam = s.inner_states["lora"].inner_state[1][0]  # LoRA factors' AdamW moments
      >>> adam.mu["lora_a"].spec
      P('data', None)
    """
    what = "state_shardings"
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"{what}: tx must be an optax.GradientTransformation, got {type(tx).__name__}."
        )
    flat, treedef = jax.tree_util.tree_flatten(params_or_abstract, is_leaf=_is_variable)
    paths = LeafIndex(
        jax.tree_util.tree_unflatten(treedef, [object()] * len(flat))
    ).paths  # one normalised path per (possibly Variable) leaf
    if param_shardings is not None:
        s_flat, s_treedef = jax.tree_util.tree_flatten(param_shardings, is_leaf=_is_sharding_leaf)
        s_paths = LeafIndex(jax.tree_util.tree_unflatten(s_treedef, [object()] * len(s_flat))).paths
        if s_paths != paths:
            missing = [p for p in paths if p not in set(s_paths)]
            extra = [p for p in s_paths if p not in set(paths)]
            where = (
                f"has no entry for {path_str(missing[0])}"
                if missing
                else f"has an entry {path_str(extra[0])} that the params lack"
                if extra
                else "orders its leaves differently"
            )
            raise ValueError(
                f"{what}: param_shardings must have the structure of the params; it {where}."
            )
    else:
        s_flat = [None] * len(flat)
    mesh = mesh if mesh is not None else _context_mesh()

    shardings: list[Any] = []
    for path, leaf, given in zip(paths, flat, s_flat):
        if _is_variable(given):
            given = given.get_value()
        if given is None and param_shardings is None:
            if _is_variable(leaf):
                given = _variable_spec(leaf)
            else:
                given = getattr(leaf, "sharding", None)
        value = leaf.get_value() if _is_variable(leaf) else leaf
        if not hasattr(value, "shape"):
            shardings.append(None)
            continue
        if isinstance(given, NamedSharding):
            spec = given.spec
            given_mesh = given.mesh
            if not isinstance(given_mesh, Mesh):  # an AbstractMesh names no devices
                if mesh is None:
                    raise ValueError(
                        f"{what}: the sharding of {path_str(path)} is over an abstract "
                        "mesh; pass mesh= (or call under jax.set_mesh)."
                    )
            elif mesh is None:
                mesh = given_mesh
            elif (given_mesh.axis_names, given_mesh.device_ids.tolist()) != (
                mesh.axis_names,
                mesh.device_ids.tolist(),
            ):
                raise ValueError(
                    f"{what}: parameter {path_str(path)} lives on mesh {given.mesh.shape} but "
                    f"another one on {mesh.shape}; all parameters must share one mesh."
                )
        elif isinstance(given, PartitionSpec):
            spec = given
        elif given is None or isinstance(given, Sharding):  # replicated / single device
            spec = PartitionSpec()
        else:
            raise TypeError(
                f"{what}: the sharding of {path_str(path)} is {given!r}; expected a "
                "NamedSharding, a PartitionSpec or None."
            )
        if len(spec) > len(value.shape):
            raise ValueError(
                f"{what}: the spec {spec} of {path_str(path)} has more entries than its "
                f"shape {tuple(value.shape)} has axes."
            )
        shardings.append(spec)

    if mesh is None:  # nothing is sharded
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_state = jax.eval_shape(tx.init, params_or_abstract)
        return jax.tree.map(lambda _: device, abstract_state)

    explicit = _as_explicit(mesh)

    def abstract(leaf: Any, spec: Any) -> Any:
        value = leaf.get_value() if _is_variable(leaf) else leaf
        if spec is None:
            return leaf
        sds = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(explicit, spec))
        return leaf.replace(sds) if _is_variable(leaf) else sds

    abstract_params = jax.tree_util.tree_unflatten(
        treedef, [abstract(x, s) for x, s in zip(flat, shardings)]
    )
    with jax.set_mesh(explicit):
        abstract_state = jax.eval_shape(tx.init, abstract_params)

    def to_sharding(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(to_sharding, abstract_state)
