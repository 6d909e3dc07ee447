"""Checkpoint / resume of optimizer state with orbax, for every optimizer in ``CASES``.

* save -> restore round-trips the state exactly (unsharded f32, sharded bf16 params
  for every optimizer; the other two combinations for one);
* training resumed from a checkpoint gives bit-identical updates for 20 steps;
* a state saved from a (4, 2) mesh restores into a (2, 4) mesh, with restore targets
  from :func:`lora_optax.state_shardings`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding

import lora_optax as lox
from tests.optimizer_cases import CASES, OptimizerCase, case_ids, extra_args
from tests.problems import FactorizationProblem, shard_params
from tests.test_sharding import place

ocp = pytest.importorskip("orbax.checkpoint")

PARAMETRIZE = pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


def _mesh(shape) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def save(path, tree) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    ckptr.close()


def restore(path, target) -> Any:
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, target)
    finally:
        ckptr.close()


def abstract_like(tree, shardings=None) -> Any:
    """ShapeDtypeStructs of ``tree`` (with ``shardings`` or the arrays' own)."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def assert_bitwise_equal(x, y) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
        assert a.dtype == b.dtype, jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(a)).view(np.uint8),
            np.atleast_1d(np.asarray(b)).view(np.uint8),
            jax.tree_util.keystr(kp),
        )


def assert_same_shardings(x, y) -> None:
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(y)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
            jax.tree_util.keystr(kp),
            a.sharding,
            b.sharding,
        )


def _step_fn(case: OptimizerCase, tx, problem):
    def step(params, state):
        grads, full = problem.grads(params)
        updates, state = tx.update(grads, state, params, **extra_args(case, full))
        return optax.apply_updates(params, updates), state, updates

    return jax.jit(step)


def _trained_state(case, tx, problem, params, steps=3):
    step = _step_fn(case, tx, problem)
    state = tx.init(params)
    for _ in range(steps):
        params, state, _ = step(params, state)
    return params, state


def _perturbed_state(tx, params, seed=0):
    """``tx.init(params)`` with every entry changed (random, same dtype and sharding):
    a non-trivial state without compiling an update."""
    state = tx.init(params)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    out = []
    for key, x in zip(keys, leaves):
        if jnp.issubdtype(x.dtype, jnp.floating):
            noise = jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
        else:
            noise = jnp.full(x.shape, 3, x.dtype)
        out.append(jax.device_put(x + noise, x.sharding))
    return jax.tree.unflatten(treedef, out)


ROUND_TRIPS = [
    pytest.param(case, sharded, dtype, id=f"{case.name}-{'sharded' if sharded else 'single'}-{n}")
    for case in CASES
    for sharded, dtype, n in ((False, jnp.float32, "f32"), (True, jnp.bfloat16, "bf16"))
] + [
    pytest.param(CASES[0], sharded, dtype, id=f"{CASES[0].name}-{s}-{n}")
    for sharded, dtype, s, n in (
        (False, jnp.bfloat16, "single", "bf16"),
        (True, jnp.float32, "sharded", "f32"),
    )
]


@pytest.mark.parametrize("case,sharded,dtype", ROUND_TRIPS)
def test_round_trip_exact(case, sharded, dtype, problem, tmp_path):
    if sharded and jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    tx = case.make(learning_rate=case.learning_rate)
    params = problem.random_params(dtype=dtype)
    mesh = _mesh((4, 2)) if sharded else None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if mesh is not None:
            params = shard_params(params, mesh)
        state = _perturbed_state(tx, params)
        save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        target = abstract_like({"params": params, "opt_state": state})
        restored = restore(tmp_path / "ckpt", target)
    assert_bitwise_equal({"params": params, "opt_state": state}, restored)
    assert_same_shardings({"params": params, "opt_state": state}, restored)
    if sharded:
        for x in jax.tree.leaves(restored):
            assert not isinstance(x.sharding, SingleDeviceSharding)


@PARAMETRIZE
def test_resume_bit_identical(case, problem, tmp_path):
    """10 steps, checkpoint, 20 more steps == restore, then the same 20 steps."""
    tx = case.make(learning_rate=case.learning_rate)
    step = _step_fn(case, tx, problem)
    params, state = _trained_state(case, tx, problem, problem.init_params(), steps=10)
    save(tmp_path / "ckpt", {"params": params, "opt_state": state})

    def continue_training(params, state):
        history = []
        for _ in range(20):
            params, state, updates = step(params, state)
            history.append(updates)
        return params, state, history

    ref = continue_training(params, state)
    restored = restore(tmp_path / "ckpt", abstract_like({"params": params, "opt_state": state}))
    resumed = continue_training(restored["params"], restored["opt_state"])
    assert_bitwise_equal(ref, resumed)


@needs_8
@PARAMETRIZE
def test_restore_into_other_mesh(case, problem, tmp_path):
    """Saved from a (4, 2) mesh, restored into (2, 4) with state_shardings targets."""
    tx = case.make(learning_rate=case.learning_rate)
    host = problem.random_params()
    old_mesh, new_mesh = _mesh((4, 2)), _mesh((2, 4))
    with jax.set_mesh(old_mesh):
        state = _perturbed_state(tx, place(host, old_mesh, "fsdp"))
        save(tmp_path / "ckpt", state)
    with jax.set_mesh(new_mesh):
        new_params = place(host, new_mesh, "layers")
        shardings = lox.state_shardings(tx, new_params)
        restored = restore(tmp_path / "ckpt", abstract_like(state, shardings))
        expected_layout = tx.init(new_params)
        assert_bitwise_equal(state, restored)
        assert_same_shardings(expected_layout, restored)
        for x in jax.tree.leaves(restored):
            assert isinstance(x.sharding, NamedSharding)
            assert x.sharding.mesh.shape == new_mesh.shape
        # Training continues on the new mesh with the restored state's layout (the
        # random state is not a reachable one, so its numbers are not checked).
        _, new_state, _ = _step_fn(case, tx, problem)(new_params, restored)
        assert_same_shardings(expected_layout, new_state)
