"""iLoRA / πLoRA (SPEC §2.3): exact formulas against ``tests/reference.py`` and properties."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from tests import reference as ref
from tests.problems import (
    A_KEY,
    B_KEY,
    LAYOUT,
    FactorizationProblem,
    factor_matrices,
    pair_batch,
)
from tests.ref_runner import compare_histories, library_run, reference_run

SCALE = 2.5
STEPS = 5


@pytest.fixture
def problem(x64):
    return FactorizationProblem.create(seed=5, scale=SCALE)


def _f64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


def _big_params(problem):
    """Random factors scaled up so that the imbalance term is of order one."""
    params = _f64(problem.random_params())
    for name in LAYOUT:
        params[name][A_KEY[name]] = 3.0 * params[name][A_KEY[name]]
        params[name][B_KEY[name]] = 2.0 * params[name][B_KEY[name]]
    return params


def _sched(count):  # linear decay, evaluated in float64 under x64
    return 0.02 - 0.015 * count / STEPS


def _imbalance(params):
    """Σ over pairs and slices of ‖AᵀA − ρBBᵀ‖² (reference objective)."""
    total = 0.0
    for name in LAYOUT:
        k = pair_batch(name)
        a = factor_matrices(params[name][A_KEY[name]], k, "a")
        b = factor_matrices(params[name][B_KEY[name]], k, "b")
        total += sum(ref.imbalance_objective(am, bm) for am, bm in zip(a, b))
    return total


@pytest.mark.parametrize("strength", [0.0, 0.7])
def test_ilora_matches_reference(problem, strength):
    params = _big_params(problem)
    kw = dict(b1=0.8, b2=0.95, eps=1e-7, weight_decay=0.05)
    lib = library_run(lox.ilora(_sched, strength=strength, **kw), problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return ref.ilora_step(a, b, ga, gb, state, float(_sched(t)), strength=strength, **kw)

    want = reference_run(step, ref.pair_adamw_init, problem, params, STEPS)
    compare_histories(lib, want)
    if strength:  # the regularisation visibly changes the trajectory
        plain = library_run(optax.adamw(_sched, **kw), problem, params, STEPS)
        diff = np.abs(np.asarray(plain[-1]["dense"]["lora_a"] - lib[-1]["dense"]["lora_a"]))
        assert diff.max() > 1e-3


def test_pilora_matches_reference(problem):
    params = _big_params(problem)
    kw = dict(b1=0.7, b2=0.8, eps=1e-7, weight_decay=0.01, delta=1e-4)
    lib = library_run(lox.pilora(_sched, strength=0.4, **kw), problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return ref.pilora_step(a, b, ga, gb, state, float(_sched(t)), strength=0.4, **kw)

    want = reference_run(step, ref.pair_adamw_init, problem, params, STEPS)
    compare_histories(lib, want)


def test_regularization_after_any_base_step_matches_reference(problem):
    """chain(sgd, add_imbalance_regularization): A* = A − η g, then the decoupled step."""
    params = _big_params(problem)
    lr, lam = 0.03, 0.5
    tx = optax.chain(optax.sgd(lr), lox.add_imbalance_regularization(lam, lr))
    lib = library_run(tx, problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        na, nb = ref.imbalance_regularization(a - lr * ga, b - lr * gb, lr, lam)
        return na, nb, state

    want = reference_run(step, lambda a, b: None, problem, params, STEPS)
    compare_histories(lib, want)
    np.testing.assert_array_equal(
        np.asarray(lib[-1]["bias"]),
        np.asarray(library_run(optax.sgd(lr), problem, params, STEPS)[-1]["bias"]),
    )


def test_regularization_alone_decreases_imbalance(x64):
    """Zero gradients, SGD base with lr > 0: only the regularisation acts, and it is a
    descent step on ‖AᵀA − ρBBᵀ‖² for a small enough η λ."""
    problem = FactorizationProblem.create(seed=1)
    params = _big_params(problem)
    lr = 0.01
    tx = optax.chain(optax.sgd(lr), lox.add_imbalance_regularization(1.0, lr))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    values = [_imbalance(params)]
    for _ in range(6):
        updates, state = tx.update(zeros, state, params)
        np.testing.assert_array_equal(updates["bias"], 0.0)
        params = optax.apply_updates(params, updates)
        values.append(_imbalance(params))
    assert all(b < a for a, b in itertools.pairwise(values)), values
    assert values[-1] < 0.9 * values[0]


def test_step_is_quarter_of_exact_gradient(x64):
    """Δ = −η λ/4 · ∇ λ‖AᵀA − ρBBᵀ‖² / λ, with the gradient from autodiff."""
    rng = np.random.default_rng(0)
    params = {
        "x": {
            "lora_a": jnp.asarray(rng.normal(size=(7, 3))),
            "lora_b": jnp.asarray(rng.normal(size=(3, 5))),
        },
        "y": {
            "w_lora_a": jnp.asarray(rng.normal(size=(2, 4, 2))),
            "w_lora_b": jnp.asarray(rng.normal(size=(2, 2, 3, 3))),
        },
    }
    pairs = lox.find_lora_pairs(params, batch_ndim=lambda p: 1 if p[0] == "y" else 0)
    lr, lam = 0.1, 0.3

    def objective(p):
        total = 0.0
        for pair in pairs:
            a, b = p[pair.a_path[0]][pair.a_path[1]], p[pair.b_path[0]][pair.b_path[1]]
            k = pair.batch_ndim
            a_m = a.reshape(a.shape[:k] + (-1, a.shape[-1]))
            b_m = b.reshape(b.shape[: k + 1] + (-1,))
            rho = pair.rank / b_m.shape[-1]
            d = jnp.swapaxes(a_m, -1, -2) @ a_m - rho * b_m @ jnp.swapaxes(b_m, -1, -2)
            total = total + lam * jnp.sum(d * d)
        return total

    grad = jax.grad(objective)(params)
    tx = lox.add_imbalance_regularization(lam, lr, pairs=pairs)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    jax.tree.map(
        lambda u, g: np.testing.assert_allclose(u, -lr * g / 4.0, rtol=1e-12, atol=1e-14),
        updates,
        grad,
    )


def test_schedule_value_at_tracked_count(x64):
    """The regularisation uses schedule(count) with its own count, starting at 0."""
    params = {"lora_a": jnp.ones((4, 2), jnp.float64), "lora_b": jnp.ones((2, 4), jnp.float64)}

    def sched(count):
        return jnp.where(count == 1, 0.01, 0.0)

    tx = lox.add_imbalance_regularization(1.0, sched)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u0, state = tx.update(zeros, state, params)
    u1, state = tx.update(zeros, state, params)
    u2, state = tx.update(zeros, state, params)
    assert int(state.count) == 3
    np.testing.assert_array_equal(u0["lora_a"], 0.0)
    np.testing.assert_array_equal(u2["lora_a"], 0.0)
    # ρ = 2/4, D = 4·11ᵀ − 0.5·4·11ᵀ = 2·11ᵀ, −η A D = −0.01·4 = −0.04.
    np.testing.assert_allclose(u1["lora_a"], -0.04, rtol=1e-12)
    np.testing.assert_allclose(u1["lora_b"], 0.01 * 0.5 * 2.0 * 2.0, rtol=1e-12)


def test_bf16_and_b_zero_finite():
    params = {"lora_a": jnp.ones((16, 4), jnp.bfloat16), "lora_b": jnp.zeros((4, 8), jnp.bfloat16)}
    grads = jax.tree.map(jnp.ones_like, params)
    for tx in (lox.ilora(1e-2, strength=10.0), lox.pilora(1e-2, strength=10.0)):
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        for leaf in jax.tree.leaves(updates):
            assert leaf.dtype == jnp.bfloat16
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_non_pair_leaves_get_plain_adamw(problem):
    params = _big_params(problem)
    lib = library_run(lox.ilora(0.01, strength=5.0), problem, params, 3)
    plain = library_run(optax.adamw(0.01), problem, params, 3)
    np.testing.assert_allclose(lib[-1]["bias"], plain[-1]["bias"], rtol=1e-12)
    lib = library_run(lox.pilora(0.01, strength=5.0), problem, params, 3)
    np.testing.assert_allclose(lib[-1]["bias"], plain[-1]["bias"], rtol=1e-12)


def test_defaults_and_errors():
    import inspect

    assert inspect.signature(lox.ilora).parameters["strength"].default == 0.1
    assert inspect.signature(lox.pilora).parameters["strength"].default == 1.0
    with pytest.raises(ValueError, match="strength"):
        lox.add_imbalance_regularization(-1.0, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        lox.ilora(-0.1)
    with pytest.raises(ValueError, match="b1"):
        lox.pilora(0.1, b1=1.5)
    params = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}
    tx = lox.ilora(0.1)
    with pytest.raises(ValueError, match="param"):
        tx.update(params, tx.init(params), None)
    with pytest.raises(ValueError, match="no LoRA"):
        lox.add_imbalance_regularization(0.1, 0.1).init({"w": jnp.ones((3, 3))})
