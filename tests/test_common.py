"""The common test table: every optimizer of the library must pass every test here
(and the variants of ``tests/optimizer_cases.py``'s ``VARIANTS``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding

from tests.optimizer_cases import CASES, VARIANT_CASES, OptimizerCase, case_ids, extra_args
from tests.problems import LAYOUT, FactorizationProblem, shard_params

TABLE = CASES + VARIANT_CASES
PARAMETRIZE = pytest.mark.parametrize("case", TABLE, ids=case_ids(TABLE))


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


def _step_fn(case: OptimizerCase, tx: optax.GradientTransformation, problem):
    def step(params, state):
        grads, full = problem.grads(params)
        updates, state = tx.update(grads, state, params, **extra_args(case, full))
        return optax.apply_updates(params, updates), state, updates

    return step


def _run(case, tx, problem, params, steps, *, jit=True):
    step = _step_fn(case, tx, problem)
    step = jax.jit(step) if jit else step
    state = tx.init(params)
    history = []
    for _ in range(steps):
        params, state, updates = step(params, state)
        history.append(updates)
    return params, state, history


def _assert_trees_close(x, y, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
        ),
        x,
        y,
    )


def _assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), leaf


def _assert_dtypes_and_state_kept(params, new_params, history, state0, state):
    """Updates and parameters keep the parameters' dtypes; the state keeps its
    structure, dtypes and shapes; everything is finite."""
    for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(history[-1])):
        assert u.dtype == p.dtype
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        assert q.dtype == p.dtype
    assert jax.tree.structure(state0) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state)):
        assert jnp.asarray(a).dtype == jnp.asarray(b).dtype
        assert jnp.shape(a) == jnp.shape(b)
    _assert_finite(history)
    _assert_finite(state)


@PARAMETRIZE
def test_jit_matches_eager_without_recompiling(case, problem):
    """Three jitted steps equal three eager ones, trace and compile once, and keep the
    float32 dtypes and the state layout (bf16: test_bf16_dtypes_preserved)."""
    params = problem.random_params()
    tx = case.make(learning_rate=case.learning_rate)
    traces = []

    def step(params, state):
        traces.append(1)
        return _step_fn(case, tx, problem)(params, state)

    step_jit = jax.jit(step)
    state0 = state = tx.init(params)
    p_jit, h_jit = params, []
    for _ in range(3):
        p_jit, state, updates = step_jit(p_jit, state)
        h_jit.append(updates)
    assert len(traces) == 1
    assert step_jit._cache_size() == 1
    p_eager, _s_eager, h_eager = _run(case, tx, problem, params, 3, jit=False)
    _assert_trees_close(h_jit, h_eager)
    _assert_trees_close(p_jit, p_eager)
    _assert_dtypes_and_state_kept(params, p_jit, h_jit, state0, state)


@PARAMETRIZE
def test_schedule(case, problem):
    params = problem.random_params()
    lr = case.learning_rate
    constant = case.make(learning_rate=optax.constant_schedule(lr))
    p_const, _, _ = _run(case, constant, problem, params, 3)
    p_float, _, _ = _run(case, case.make(learning_rate=lr), problem, params, 3)
    _assert_trees_close(p_const, p_float)
    # A schedule that is 0 at the first step leaves the parameters unchanged.
    warmup = case.make(learning_rate=optax.linear_schedule(0.0, lr, 10))
    _, _, history = _run(case, warmup, problem, params, 2)
    for leaf in jax.tree.leaves(history[0]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(history[1]))


@PARAMETRIZE
def test_inject_hyperparams(case, problem):
    params = problem.random_params()
    lr = case.learning_rate
    injected = optax.inject_hyperparams(case.make)(learning_rate=lr)
    state = injected.init(params)
    assert "learning_rate" in state.hyperparams
    np.testing.assert_allclose(state.hyperparams["learning_rate"], lr, rtol=1e-6)
    p_inj, s_inj, _ = _run(case, injected, problem, params, 3)
    p_ref, _, _ = _run(case, case.make(learning_rate=lr), problem, params, 3)
    _assert_trees_close(p_inj, p_ref)
    # Changing the injected learning rate changes the next step.
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
    grads, full = problem.grads(p_inj)
    updates, _ = jax.jit(injected.update)(grads, s_inj, p_inj, **extra_args(case, full))
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@PARAMETRIZE
def test_bf16_dtypes_preserved(case, problem):
    params = problem.random_params(dtype=jnp.bfloat16)
    tx = case.make(learning_rate=case.learning_rate)
    state0 = tx.init(params)
    new_params, state, history = _run(case, tx, problem, params, 3)
    _assert_dtypes_and_state_kept(params, new_params, history, state0, state)


@PARAMETRIZE
def test_multi_steps(case, problem):
    """Two MultiSteps micro-steps on the same gradient equal one plain step."""
    params = problem.random_params()
    tx = case.make(learning_rate=case.learning_rate)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    grads, full = problem.grads(params)
    kwargs = extra_args(case, full)
    m_state = multi.init(params)
    upd1, m_state = jax.jit(multi.update)(grads, m_state, params, **kwargs)
    for leaf in jax.tree.leaves(upd1):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    upd2, m_state = jax.jit(multi.update)(grads, m_state, params, **kwargs)
    ref, _ = jax.jit(tx.update)(grads, tx.init(params), params, **kwargs)
    _assert_trees_close(upd2, ref)


@PARAMETRIZE
def test_state_stable_under_cond(case, problem):
    params = problem.random_params()
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)

    @jax.jit
    def maybe_step(pred, params, state):
        grads, full = problem.grads(params)

        def do(state):
            return tx.update(grads, state, params, **extra_args(case, full))

        def skip(state):
            return jax.tree.map(jnp.zeros_like, grads), state

        return jax.lax.cond(pred, do, skip, state)

    _, s1 = maybe_step(True, params, state)
    _, s2 = maybe_step(False, params, s1)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s1)):
        assert jax.typeof(jnp.asarray(a)).dtype == jax.typeof(b).dtype
        assert jnp.shape(a) == jnp.shape(b)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)


@PARAMETRIZE
def test_converges_on_lora_factorization(case, problem):
    params = problem.init_params()
    tx = case.make(learning_rate=case.learning_rate)
    initial = float(problem.loss(params))
    final_params, state, _ = _run(case, tx, problem, params, 300)
    final = float(problem.loss(final_params))
    assert np.isfinite(final)
    assert final < 0.1 * initial, (initial, final)
    _assert_finite(state)


def _tail_matches(state_path, param_paths):
    for p in param_paths:
        if len(state_path) >= len(p) and tuple(state_path[-len(p) :]) == p:
            return p
    return None


def _rr(param_path):
    """The r×r shape of the pair that owns a parameter (an m×n state of a square pair
    is not r×r)."""
    rank = LAYOUT[param_path[0]][0][-1] if param_path[0] in LAYOUT else None
    return (rank, rank)


def _key_path(kp):
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@PARAMETRIZE
# Explicit axes are jax's default; Auto meshes are covered by tests/test_sharding.py.
@pytest.mark.parametrize("axis_type", [AxisType.Explicit], ids=["explicit"])
def test_sharding_stable(case, problem, axis_type):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        _check_sharding_stable(case, problem, mesh)


# jit vs eager under the mesh for one optimizer of each state kind: r×r Gram statistics
# (scaled AdamW), LoRA-RITE's basis and escaped mass, SoLoRA's m×n statistics from
# full gradients, LoRA-Pro's base-weight-sized moments, and the sequential order.
EAGER_SHARDED = (
    "scaled_adamw",
    "lora_rite",
    "solora_adamw",
    "lora_pro_adamw",
    "lora_one+sequential",
)


def _check_sharding_stable(case, problem, mesh):
    params = shard_params(problem.random_params(), mesh)
    param_leaves = {
        _key_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    tx = case.make(learning_rate=case.learning_rate)
    state = tx.init(params)

    def check_layout(state):
        for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            path = _key_path(kp)
            assert isinstance(leaf, jax.Array), (path, type(leaf))
            if leaf.ndim == 0:
                continue
            assert not isinstance(leaf.sharding, SingleDeviceSharding), path
            assert isinstance(leaf.sharding, NamedSharding), (path, leaf.sharding)
            owner = _tail_matches(path, list(param_leaves))
            if owner is not None and leaf.shape == param_leaves[owner].shape:
                assert leaf.sharding.is_equivalent_to(param_leaves[owner].sharding, leaf.ndim), (
                    path,
                    leaf.sharding,
                    param_leaves[owner].sharding,
                )
            elif owner is not None and leaf.ndim >= 2 and leaf.shape[-2:] == _rr(owner):
                # r×r statistics: replicated over the non-batch axes.
                spec = tuple(leaf.sharding.spec) + (None,) * leaf.ndim
                assert spec[leaf.ndim - 2 : leaf.ndim] == (None, None), (path, leaf.sharding)

    check_layout(state)
    grads, full = problem.grads(params)
    kwargs = extra_args(case, full)
    update = jax.jit(tx.update)
    _, s_jit = update(grads, state, params, **kwargs)
    check_layout(s_jit)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s_jit)):
        assert jax.typeof(a) == jax.typeof(b), (jax.typeof(a), jax.typeof(b))
        if a.ndim:
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    if mesh.axis_types[0] == AxisType.Explicit and case.name in EAGER_SHARDED:
        # Eager dispatch on 8 devices is slow (an op-by-op compile of every primitive for
        # the sharded layout): one mesh type, and one optimizer per kind of state
        _, s_eager = tx.update(grads, state, params, **kwargs)
        for b, c in zip(jax.tree.leaves(s_jit), jax.tree.leaves(s_eager)):
            assert jax.typeof(b) == jax.typeof(c), (jax.typeof(b), jax.typeof(c))
            if b.ndim:
                assert b.sharding.is_equivalent_to(c.sharding, b.ndim), (b.sharding, c.sharding)
    # The sharded result equals the single-device one (jitted: eager dispatch of every op
    # is slow and is already compared with jit above and in
    # test_jit_matches_eager_without_recompiling).
    _, s_single = jax.jit(tx.update)(
        *jax.device_get((grads, tx.init(jax.device_get(params)), jax.device_get(params))),
        **jax.device_get(kwargs),
    )
    _assert_trees_close(s_jit, s_single, rtol=1e-4, atol=1e-5)


def test_eager_sharded_cases_are_in_the_table():
    assert set(EAGER_SHARDED) <= {c.name for c in TABLE}
