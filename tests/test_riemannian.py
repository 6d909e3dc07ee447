"""Exact-formula tests of the Riemannian preconditioner, scaled SGD/AdamW and LoRA+.

The expected trajectories come from ``tests/reference.py`` (float64 NumPy, written from
SPEC §2.1 / §2.6 independently of the library), applied per stacked-layer slice to the
2-D matrix view of each pair.
"""

from __future__ import annotations

import functools

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
    stack_matrices,
)

SCALE = 2.5
STEPS = 6


def _library_run(tx, problem, params, steps, lr_sched=None):
    state = tx.init(params)
    step = jax.jit(
        lambda p, s: (
            lambda g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p))
        )(problem.grads(p)[0])
    )
    history = [params]
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history


def _reference_run(pair_step, init_state, problem, params, steps):
    """Runs the reference per pair and per stacked slice; bias follows plain AdamW/SGD."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    states = {}
    history = [params]
    for t in range(steps):
        grads, _ = problem.grads(jax.tree.map(jnp.asarray, params))
        grads = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        new = {}
        for name in LAYOUT:
            k = pair_batch(name)
            a, b = params[name][A_KEY[name]], params[name][B_KEY[name]]
            ga, gb = grads[name][A_KEY[name]], grads[name][B_KEY[name]]
            mats = zip(
                factor_matrices(a, k, "a"),
                factor_matrices(b, k, "b"),
                factor_matrices(ga, k, "a"),
                factor_matrices(gb, k, "b"),
            )
            new_a, new_b = [], []
            for i, (am, bm, gam, gbm) in enumerate(mats):
                key = (name, i)
                if key not in states:
                    states[key] = init_state(am, bm)
                na, nb, states[key] = pair_step(am, bm, gam, gbm, states[key], t)
                new_a.append(na)
                new_b.append(nb)
            new[name] = {
                A_KEY[name]: stack_matrices(new_a, a.shape),
                B_KEY[name]: stack_matrices(new_b, b.shape),
            }
        new["bias"] = params["bias"]  # compared separately
        params = new
        history.append(params)
    return history


def _compare(lib_hist, ref_hist, rtol=1e-9, atol=1e-11):
    for lib, want in zip(lib_hist, ref_hist):
        for name in LAYOUT:
            for key in (A_KEY[name], B_KEY[name]):
                np.testing.assert_allclose(
                    np.asarray(lib[name][key]), want[name][key], rtol=rtol, atol=atol
                )


@pytest.fixture
def problem(x64):
    return FactorizationProblem.create(seed=3, scale=SCALE)


@pytest.mark.parametrize("start", ["init", "random"])
def test_scaled_sgd_matches_reference(problem, start):
    params = problem.init_params() if start == "init" else problem.random_params()
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    lr, delta = 0.05, 1e-3
    lib = _library_run(lox.scaled_sgd(lr, delta=delta), problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        na, nb = ref.scaled_sgd_step(a, b, ga, gb, lr, delta)
        return na, nb, state

    want = _reference_run(step, lambda a, b: None, problem, params, STEPS)
    _compare(lib, want)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_scaled_adamw_matches_reference(problem, wd):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), problem.random_params())

    def sched(count):  # linear decay, computed in float64 under x64 (unlike optax's)
        return 0.02 - 0.015 * count / STEPS

    tx = lox.scaled_adamw(sched, b1=0.8, b2=0.95, eps=1e-7, weight_decay=wd, delta=1e-4)
    lib = _library_run(tx, problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return ref.scaled_adamw_step(
            a,
            b,
            ga,
            gb,
            state,
            float(sched(t)),
            b1=0.8,
            b2=0.95,
            eps=1e-7,
            weight_decay=wd,
            delta=1e-4,
        )

    want = _reference_run(step, ref.pair_adamw_init, problem, params, STEPS)
    _compare(lib, want)


def test_lora_plus_matches_reference(problem):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), problem.random_params())
    lr, ratio = 0.01, 8.0
    tx = lox.lora_plus(lr, ratio=ratio, weight_decay=0.05)
    lib = _library_run(tx, problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return ref.lora_plus_step(a, b, ga, gb, state, lr, ratio=ratio, weight_decay=0.05)

    want = _reference_run(step, ref.pair_adamw_init, problem, params, STEPS)
    _compare(lib, want)


def test_non_pair_leaves_get_plain_base_optimizer(problem):
    """The bias is in no pair: scaled AdamW treats it exactly as optax.adamw."""
    params = jax.tree.map(lambda x: x.astype(jnp.float64), problem.random_params())
    lib = _library_run(lox.scaled_adamw(0.01), problem, params, 3)
    plain = _library_run(optax.adamw(0.01), problem, params, 3)
    np.testing.assert_allclose(lib[-1]["bias"], plain[-1]["bias"], rtol=1e-12)
    sgd = _library_run(lox.scaled_sgd(0.1), problem, params, 3)
    plain_sgd = _library_run(optax.sgd(0.1), problem, params, 3)
    np.testing.assert_allclose(sgd[-1]["bias"], plain_sgd[-1]["bias"], rtol=1e-12)


def test_preconditioner_is_identity_on_non_pairs_and_needs_params():
    params = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5)), "w": jnp.ones(3)}
    tx = lox.scale_by_riemannian_preconditioner()
    state = tx.init(params)
    grads = jax.tree.map(lambda x: 2.0 * x, params)
    out, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(out["w"], grads["w"])
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, state, None)


def test_b_zero_is_finite_and_a_update_vanishes(x64):
    """Standard init (B = 0): g_A = s G Bᵀ = 0, so A does not move; B moves, finitely."""
    problem = FactorizationProblem.create(seed=0, scale=SCALE)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), problem.init_params())
    for tx in (lox.scaled_sgd(0.1), lox.scaled_adamw(0.01, weight_decay=0.0)):
        state = tx.init(params)
        grads, _ = problem.grads(params)
        updates, _ = tx.update(grads, state, params)
        for name in LAYOUT:
            np.testing.assert_array_equal(updates[name][A_KEY[name]], 0.0)
            assert np.all(np.isfinite(updates[name][B_KEY[name]]))
            assert np.any(updates[name][B_KEY[name]] != 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_factors_use_float32_gram(dtype):
    """Rank-deficient bf16/f16 factors: finite, and equal to the f32 computation."""
    a = jnp.concatenate([jnp.ones((32, 1)), jnp.ones((32, 1)), jnp.zeros((32, 2))], 1)
    params = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros((4, 16), dtype)}
    grads = {"lora_a": jnp.ones((32, 4), dtype), "lora_b": jnp.ones((4, 16), dtype)}
    tx = lox.scale_by_riemannian_preconditioner(delta=1e-3)
    out, _ = tx.update(grads, tx.init(params), params)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (grads, params))
    want, _ = tx.update(f32[0], tx.init(f32[1]), f32[1])
    for k in out:
        assert out[k].dtype == dtype
        assert np.all(np.isfinite(np.asarray(out[k], np.float32)))
        np.testing.assert_allclose(
            np.asarray(out[k], np.float32), np.asarray(want[k]).astype(dtype).astype(np.float32)
        )


def test_scale_invariance_of_scaled_gd(x64):
    """Scaled GD is invariant to (A c, B / c): the product trajectory is the same."""
    problem = FactorizationProblem.create(seed=1, scale=1.0)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), problem.random_params())
    c = 7.0
    scaled = jax.tree.map(lambda x: x, params)
    for name in LAYOUT:
        scaled[name] = {
            A_KEY[name]: params[name][A_KEY[name]] * c,
            B_KEY[name]: params[name][B_KEY[name]] / c,
        }
    tx = lox.scaled_sgd(0.05, delta=0.0)
    h1 = _library_run(tx, problem, params, 5)
    h2 = _library_run(tx, problem, scaled, 5)
    np.testing.assert_allclose(problem.loss(h1[-1]), problem.loss(h2[-1]), rtol=1e-9)


@pytest.mark.parametrize("make", [lox.scaled_sgd, functools.partial(lox.scaled_adamw)])
def test_learning_rate_validation(make):
    with pytest.raises(ValueError, match="learning_rate"):
        make(-1.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_random_low_precision_factors_match_float32_bitwise(dtype):
    """Random bf16/f16 factors (not exact in low precision, unlike 0s and 1s): the Gram
    matrices must be accumulated in float32, so the update equals the float32
    computation rounded to the factor dtype, bit for bit."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 4)) / 6).astype(np.float32)
    b = (0.3 * rng.standard_normal((4, 16))).astype(np.float32)
    g = {"lora_a": rng.standard_normal((32, 4)), "lora_b": rng.standard_normal((4, 16))}
    params = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
    grads = {k: jnp.asarray(v, dtype) for k, v in g.items()}
    tx = lox.scale_by_riemannian_preconditioner(delta=1e-3)
    out, _ = tx.update(grads, tx.init(params), params)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (grads, params))
    want, _ = tx.update(f32[0], tx.init(f32[1]), f32[1])
    for k in out:
        assert out[k].dtype == dtype
        mismatches = int(np.sum(np.asarray(out[k]) != np.asarray(want[k].astype(dtype))))
        assert mismatches == 0, f"{k}: {mismatches} entries differ from float32 rounded"


def test_damping_floor_dominates_in_float32():
    """Pins the relative damping floor ``r·ε·tr(K)``: with one row of B scaled by 1e4
    (tr(BBᵀ) ≈ 1.6e9, r = 4) the floor is far above δ, and the float32 result must equal
    ``g_A (BBᵀ + (δ + r·ε·tr BBᵀ) I)⁻¹`` computed in float64."""
    rng = np.random.default_rng(3)
    r, delta = 4, 1e-6
    a = rng.standard_normal((24, r)).astype(np.float32)
    b = rng.standard_normal((r, 40)).astype(np.float32)
    b[1] *= 1e4
    g_a = rng.standard_normal((24, r)).astype(np.float32)
    g_b = rng.standard_normal((r, 40)).astype(np.float32)
    params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
    grads = {"lora_a": jnp.asarray(g_a), "lora_b": jnp.asarray(g_b)}
    tx = lox.scale_by_riemannian_preconditioner(delta=delta)
    out, _ = tx.update(grads, tx.init(params), params)
    eps32 = float(np.finfo(np.float32).eps)
    k_b = b.astype(np.float64) @ b.T.astype(np.float64)
    damp = delta + r * eps32 * np.trace(k_b)
    assert damp > 1e3 * delta  # the floor, not δ, sets the damping here
    want = g_a.astype(np.float64) @ np.linalg.inv(k_b + damp * np.eye(r))
    err = np.linalg.norm(np.asarray(out["lora_a"], np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-4, err


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: lox.scale_by_riemannian_preconditioner(**kw),
        lambda **kw: lox.scaled_sgd(0.1, **kw),
        lambda **kw: lox.scaled_adamw(0.1, **kw),
    ],
    ids=["scale_by", "scaled_sgd", "scaled_adamw"],
)
def test_default_damping_is_1e_6(make):
    """The documented default δ = 1e-6, checked on factors small enough (‖B‖ ~ 1e-3,
    BBᵀ ~ 1e-6) for δ to change the step."""
    rng = np.random.default_rng(0)
    params = {"lora_a": jnp.asarray(rng.normal(size=(8, 2))), "lora_b": 1e-3 * jnp.ones((2, 6))}
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)

    def update(**kw):
        tx = make(**kw)
        return tx.update(grads, tx.init(params), params)[0]

    default, explicit, other = update(), update(delta=1e-6), update(delta=1e-3)
    jax.tree.map(np.testing.assert_array_equal, default, explicit)
    assert not np.allclose(default["lora_a"], other["lora_a"], rtol=1e-3)
