"""Sharded multi-device training: every optimizer of ``CASES`` on 8 (fake) devices.

Meshes ``(data, model)`` = (8, 1), (4, 2), (2, 4) with Explicit axes (the default of
``jax.make_mesh``) and one Auto mesh. ``A`` and ``B`` are sharded over their non-rank
axes (FSDP-style: ``A``'s input axis over ``data``, ``B``'s output axis over
``model``); in the ``layers`` layout the stacked pair's layer axis is sharded too.

For every optimizer (on the (2, 4) mesh, the one that shards the most factor axes) and
for a subset on the other meshes:

* the jitted sharded update gives the numbers of the single-device run;
* state shardings are stable across ``init`` (eager and jitted), jitted and eager
  ``update`` and ``lax.cond``; no state leaf is on a single device; state of a
  factor's shape is sharded like the factor; r×r (and smaller) state is replicated
  over its non-batch axes; :func:`lora_optax.state_shardings` predicts them all;
* the compiled update has no all-gather whose result is a whole ``A`` or ``B``
  (checked in the HLO text of ``jax.jit(tx.update).lower(...).compile()``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec, SingleDeviceSharding

import lora_optax as lox
from tests.optimizer_cases import CASES, OptimizerCase, extra_args
from tests.problems import A_KEY, B_KEY, BIAS_SHAPE, LAYOUT, FactorizationProblem

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

MAIN = ((2, 4), AxisType.Explicit, "fsdp")
# The other meshes each run a few optimizers (one per family: preconditioned SGD /
# Adam, full-gradient, Sylvester, eigh-based); tests/test_common.py runs every
# optimizer on the (4, 2) Explicit and Auto meshes as well.
OTHER_MESHES = {
    ((8, 1), AxisType.Explicit, "fsdp"): ("scaled_adamw", "solora_sgd", "lora_plus"),
    ((4, 2), AxisType.Explicit, "layers"): ("lora_pro_adamw", "lora_rite", "pilora"),
    ((2, 4), AxisType.Auto, "layers"): ("scaled_sgd", "lora_one", "solora_adamw"),
}


def _mesh_id(shape, axis_type, layout) -> str:
    kind = "explicit" if axis_type == AxisType.Explicit else "auto"
    return f"{shape[0]}x{shape[1]}-{kind}-{layout}"


# Known gaps, reported to the module owners; strict xfails (a fix makes them fail
# until the entry is removed): test id -> reason.
KNOWN_GAPS: dict[str, str] = {}


def _param(case, mesh_shape, axis_type, layout):
    test_id = f"{case.name}-{_mesh_id(mesh_shape, axis_type, layout)}"
    reason = KNOWN_GAPS.get(test_id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, mesh_shape, axis_type, layout, id=test_id, marks=marks)


PARAMS = [_param(case, *MAIN) for case in CASES] + [
    _param(case, *m) for m, names in OTHER_MESHES.items() for case in CASES if case.name in names
]


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


# --------------------------------------------------------------------------- layouts


def _fit(spec: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """``spec`` with the mesh axes that do not divide their array axis dropped."""
    out = []
    for name, dim in zip(spec, shape):
        size = 1 if name is None else mesh.shape[name]
        out.append(name if name is not None and size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_specs(mesh: jax.sharding.Mesh, layout: str) -> dict[str, Any]:
    """PartitionSpecs of the problem's params: FSDP-style, and optionally layer axes."""
    specs: dict[str, Any] = {}
    for name, (a_shape, b_shape, a_spec, b_spec) in LAYOUT.items():
        if layout == "layers" and name == "stacked":
            # Layer axis over a mesh axis that divides it, A's input axis over the
            # other one, B's output replicated.
            layer, other = ("data", "model")
            if a_shape[0] % mesh.shape[layer]:
                layer, other = other, layer
            a_spec, b_spec = (layer, other, None), (layer, None, None)
        specs[name] = {
            A_KEY[name]: _fit(a_spec, a_shape, mesh),
            B_KEY[name]: _fit(b_spec, b_shape, mesh),
        }
    specs["bias"] = _fit(("model",), BIAS_SHAPE, mesh)
    return specs


def place(params: dict[str, Any], mesh: jax.sharding.Mesh, layout: str) -> dict[str, Any]:
    specs = param_specs(mesh, layout)
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
        params,
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _make_mesh(shape, axis_type) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)


# --------------------------------------------------------------------------- checks


def _path(kp) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)


def _owner(state_path, param_paths):
    for p in param_paths:
        if len(state_path) >= len(p) and tuple(state_path[-len(p) :]) == p:
            return p
    return None


def _full_spec(sharding: NamedSharding, ndim: int) -> tuple:
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def check_layout(state, params, max_rank: int) -> None:
    """No state leaf on one device; factor-shaped state like its factor; small state
    (every axis at most the largest rank) replicated over its non-batch axes (its
    leading stacked-layer axes may be sharded like the factor's)."""
    param_leaves = {_path(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    batch_ndim = {}
    for pair in lox.find_lora_pairs(params):
        batch_ndim[pair.a_path] = batch_ndim[pair.b_path] = pair.batch_ndim
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = "/".join(_path(kp))
        assert isinstance(leaf, jax.Array), (path, type(leaf))
        assert not isinstance(leaf.sharding, SingleDeviceSharding), path
        assert isinstance(leaf.sharding, NamedSharding), (path, leaf.sharding)
        if leaf.ndim == 0:
            continue
        owner = _owner(_path(kp), list(param_leaves))
        spec = _full_spec(leaf.sharding, leaf.ndim)
        if owner is not None and leaf.shape == param_leaves[owner].shape:
            assert leaf.sharding.is_equivalent_to(param_leaves[owner].sharding, leaf.ndim), (
                path,
                leaf.sharding,
                param_leaves[owner].sharding,
            )
        elif max(leaf.shape) <= max_rank:
            k = batch_ndim.get(owner, 0) if owner is not None else 0
            k = min(k, leaf.ndim)
            param_spec = (
                _full_spec(param_leaves[owner].sharding, param_leaves[owner].ndim)
                if owner is not None
                else ()
            )
            assert all(s is None or s == param_spec[i] for i, s in enumerate(spec[:k])), (
                path,
                leaf.sharding,
            )
            assert all(s is None for s in spec[k:]), (path, leaf.shape, leaf.sharding)


def _is_sharding(x) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def assert_same_shardings(x, y, what: str) -> None:
    """Same structure and equivalent shardings (leaves: arrays or shardings)."""
    fx = jax.tree_util.tree_flatten_with_path(x, is_leaf=_is_sharding)
    fy = jax.tree_util.tree_flatten_with_path(y, is_leaf=_is_sharding)
    assert fx[1] == fy[1], (what, fx[1], fy[1])
    for (kp, a), (_, b) in zip(fx[0], fy[0]):
        path = "/".join(_path(kp))
        arrays = [v for v in (a, b) if not _is_sharding(v)]
        if len(arrays) == 2:
            assert jax.typeof(a).shape == jax.typeof(b).shape, (what, path)
            assert jax.typeof(a).dtype == jax.typeof(b).dtype, (what, path)
        ndim = len(arrays[0].shape) if arrays else len(a.spec)
        sa = a if _is_sharding(a) else a.sharding
        sb = b if _is_sharding(b) else b.sharding
        assert sa.is_equivalent_to(sb, ndim), (what, path, sa, sb)


def assert_trees_close(x, y, rtol=1e-4, atol=1e-5) -> None:
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg="/".join(_path(kp)),
        )


_HLO_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")
_ALL_GATHER = re.compile(r"=\s*(.+?)\s+all-gather(?:-start)?\(")


def all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in an HLO module's text."""
    shapes = []
    for line in hlo.splitlines():
        m = _ALL_GATHER.search(line)
        if m:
            for dims in _HLO_SHAPE.findall(m.group(1)):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def full_factor_shapes(params, mesh_params) -> dict[tuple[int, ...], str]:
    """Shapes (as stored and as matrix views) of the factors that are sharded."""
    out: dict[tuple[int, ...], str] = {}
    for pair in lox.find_lora_pairs(params):
        index = lox.LeafIndex(mesh_params)
        for role, path in (("A", pair.a_path), ("B", pair.b_path)):
            x = index[path]
            if all(s is None for s in _full_spec(x.sharding, x.ndim)):
                continue  # replicated anyway: nothing to gather
            k = pair.batch_ndim
            shape = tuple(x.shape)
            if role == "A":
                view = shape[:k] + (math.prod(shape[k:-1]), shape[-1])
            else:
                view = shape[: k + 1] + (math.prod(shape[k + 1 :]),)
            out[shape] = out[view] = f"{role} {'/'.join(path)}"
    return out


# --------------------------------------------------------------------------- the test


def _update_fn(case: OptimizerCase, tx: optax.GradientTransformation):
    def update(grads, state, params, full):
        return tx.update(grads, state, params, **extra_args(case, full))

    return update


_REFERENCE: dict[str, Any] = {}


def _reference(case: OptimizerCase, problem, host_params):
    """Single-device (update, state) of the first step, computed once per optimizer."""
    if case.name not in _REFERENCE:
        tx = case.make(learning_rate=case.learning_rate)
        grads, full = problem.grads(host_params)
        _REFERENCE[case.name] = jax.jit(_update_fn(case, tx))(
            grads, tx.init(host_params), host_params, full
        )
    return _REFERENCE[case.name]


@pytest.mark.parametrize("case,mesh_shape,axis_type,layout", PARAMS)
def test_sharded_update(case, mesh_shape, axis_type, layout, problem):
    mesh = _make_mesh(mesh_shape, axis_type)
    host_params = problem.random_params()
    tx = case.make(learning_rate=case.learning_rate)
    max_rank = max(p.rank for p in lox.find_lora_pairs(host_params))
    update = _update_fn(case, tx)
    ref_upd, ref_state = _reference(case, problem, host_params)

    with jax.set_mesh(mesh):
        params = place(host_params, mesh, layout)
        state = tx.init(params)
        check_layout(state, params, max_rank)

        # The public helper predicts the layout from abstract leaves.
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
        )
        predicted = lox.state_shardings(tx, abstract)
        assert_same_shardings(state, predicted, "state_shardings")
        # Jitted init: same layout as eager init. On Auto meshes XLA is free to lay
        # out zeros that do not depend on the params (optax's own states too), so
        # there the layout is pinned with out_shardings=state_shardings(...).
        out_shardings = None if axis_type == AxisType.Explicit else predicted
        init_jit = jax.jit(tx.init, out_shardings=out_shardings)
        assert_same_shardings(state, init_jit(params), "jit(init)")

        grads, full = jax.jit(problem.grads)(params)
        # One compiled executable: it rejects inputs whose shardings differ from the
        # first call's, so the second step below checks the state layout is stable.
        compiled = jax.jit(update).lower(grads, state, params, full).compile()
        upd, new_state = compiled(grads, state, params, full)
        check_layout(new_state, params, max_rank)
        assert_same_shardings(state, new_state, "jit(update)")
        assert_same_shardings(params, upd, "updates")
        assert_trees_close(upd, ref_upd)
        assert_trees_close(new_state, ref_state)
        _, state2 = compiled(grads, new_state, params, full)
        assert_same_shardings(state, state2, "second step")

        # No all-gather of a whole A or B in the compiled update.
        full_shapes = full_factor_shapes(host_params, params)
        gathered = [
            full_shapes[s] for s in all_gather_shapes(compiled.as_text()) if s in full_shapes
        ]
        assert not gathered, f"{case.name} all-gathers whole factors: {sorted(set(gathered))}"

        if mesh_shape == MAIN[0] and axis_type == MAIN[1]:
            # lax.cond between an update and a skip keeps the layout.
            @jax.jit
            def maybe(pred, state):
                return jax.lax.cond(
                    pred, lambda s: update(grads, s, params, full)[1], lambda s: s, state
                )

            assert_same_shardings(state, maybe(True, state), "lax.cond taken")
            assert_same_shardings(state, maybe(False, state), "lax.cond skipped")

        if case.name == "lora_plus":  # eager dispatch on 8 devices is slow: one case
            _, eager_state = update(grads, state, params, full)
            assert_same_shardings(state, eager_state, "eager update")


def test_all_gather_parser():
    hlo = (
        "  %all-gather.3 = f32[16,4]{1,0} all-gather(f32[4,4]{1,0} %p), channel_id=1\n"
        "  %ags = (bf16[2,3]{1,0}, bf16[8,3]{1,0}) all-gather-start(bf16[2,3] %q)\n"
        "  %x = f32[16,4]{1,0} add(%a, %b)\n"
    )
    assert all_gather_shapes(hlo) == [(16, 4), (2, 3), (8, 3)]


# --------------------------------------------------------------------------- helper


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_state_shardings_from_specs(axis_type, problem):
    """``param_shardings`` given as PartitionSpecs over the context mesh, or as
    NamedShardings, override the leaves' own layouts; nothing is materialised."""
    mesh = _make_mesh((4, 2), axis_type)
    host = problem.random_params()
    specs = param_specs(mesh, "fsdp")
    tx = lox.scaled_adamw(1e-3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    with jax.set_mesh(mesh):
        from_specs = lox.state_shardings(tx, abstract, specs)
        named = jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        from_named = lox.state_shardings(tx, host, named)
        actual = tx.init(place(host, mesh, "fsdp"))
    assert_same_shardings(actual, from_specs, "specs")
    assert_same_shardings(actual, from_named, "named")
    # Without a context mesh, the mesh comes from the NamedShardings.
    assert_same_shardings(actual, lox.state_shardings(tx, host, named), "no context")
    for s in jax.tree.leaves(from_specs, is_leaf=lambda x: isinstance(x, NamedSharding)):
        assert s.mesh.axis_types == (axis_type,) * 2


def test_state_shardings_unsharded(problem):
    params = problem.random_params()
    tx = lox.scaled_sgd(0.1)
    shardings = lox.state_shardings(optax.chain(tx, optax.adam(1e-3)), params)
    state = optax.chain(tx, optax.adam(1e-3)).init(params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, SingleDeviceSharding)):
        assert isinstance(s, SingleDeviceSharding)


def test_state_shardings_jit_init_and_multihost_style_arrays(problem):
    """The docstring recipe: arrays built shard by shard with make_array_from_callback,
    then ``jax.jit(tx.init, out_shardings=state_shardings(...))``."""
    mesh = _make_mesh((2, 4), AxisType.Explicit)
    host = jax.device_get(problem.random_params())
    specs = param_specs(mesh, "layers")
    with jax.set_mesh(mesh):
        params = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(
                x.shape, NamedSharding(mesh, s), lambda idx, x=x: np.asarray(x)[idx]
            ),
            host,
            specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        tx = lox.scaled_adamw(1e-3)
        shardings = lox.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        assert_same_shardings(tx.init(params), state, "jit(init, out_shardings)")


def test_state_shardings_nnx_metadata():
    """flax nnx: Variables carrying ``out_sharding`` / ``optimizer_sharding`` metadata."""
    nnx = pytest.importorskip("flax.nnx")
    mesh = _make_mesh((4, 2), AxisType.Explicit)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lora_a = nnx.Param(
                jax.random.normal(rngs.params(), (16, 4)), out_sharding=("data", None)
            )
            self.lora_b = nnx.Param(
                jnp.zeros((4, 12)),
                out_sharding=(None, "model"),
                optimizer_sharding=(None, None),  # state of B replicated on purpose
            )
            self.bias = nnx.Param(jnp.zeros((12,)), out_sharding=("model",))

    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
        state = nnx.state(model, nnx.Param)
        tx = optax.chain(lox.scaled_adamw(1e-3))
        shardings = lox.state_shardings(tx, state)
        flat = {
            "/".join(_path(kp)): s
            for kp, s in jax.tree_util.tree_flatten_with_path(
                shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
            )[0]
        }
        mu = {k: v for k, v in flat.items() if "/mu/" in f"/{k}/"}
        specs = {k.split("/mu/")[-1]: tuple(v.spec) for k, v in mu.items()}
        assert specs["lora_a/value"][:1] == ("data",), specs
        assert all(s is None for s in specs["lora_b/value"]), specs
        assert specs["bias/value"] == ("model",), specs
        # nnx.get_partition_spec trees are accepted as param_shardings as well.
        pspecs = nnx.get_partition_spec(state)
        again = lox.state_shardings(tx, state, pspecs)
        assert jax.tree.structure(again) == jax.tree.structure(shardings)
