"""Exact-formula and behaviour tests of LoRA-Pro (SPEC §2.6).

The adjusted gradients come from ``tests/reference.py`` (``lora_pro_step``: explicit
inverses and a dense Kronecker Sylvester solve, float64), applied per stacked-layer
slice to the matrix views of the pairs of ``FactorizationProblem`` (2-D, stacked and
multi-axis pairs, LoRA scale ``s = 2.5``). The AdamW variant (full-size Adam on the
equivalent gradient, authors' code) is checked against a NumPy composition of the
reference pieces written below.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import lora_optax as lox
from lora_optax._src import linalg
from lora_optax._src import lora_pro as lora_pro_lib
from tests import reference as ref
from tests.optimizer_cases import find_state
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
STEPS = 4
PAIRS = functools.partial(lox.find_lora_pairs, scale=SCALE)
adjust = jax.jit(lora_pro_lib.lora_pro_adjust, static_argnums=(4,))


@pytest.fixture
def problem(x64):
    return FactorizationProblem.create(seed=5, scale=SCALE)


def _f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _slices(params, grads, name):
    k = pair_batch(name)
    return zip(
        factor_matrices(params[name][A_KEY[name]], k, "a"),
        factor_matrices(params[name][B_KEY[name]], k, "b"),
        factor_matrices(grads[name][A_KEY[name]], k, "a"),
        factor_matrices(grads[name][B_KEY[name]], k, "b"),
    )


def _library_run(tx, problem, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(problem.grads(p)[0], s, p)
        return optax.apply_updates(p, u), s

    history = [params]
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history


def _reference_run(pair_step, bias_step, problem, params, steps):
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    states: dict = {}
    history = [params]
    for t in range(steps):
        grads, _ = problem.grads(jax.tree.map(jnp.asarray, params))
        grads = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        new = {}
        for name in LAYOUT:
            new_a, new_b = [], []
            for i, (a, b, ga, gb) in enumerate(_slices(params, grads, name)):
                na, nb, states[(name, i)] = pair_step(a, b, ga, gb, states.get((name, i)), t)
                new_a.append(na)
                new_b.append(nb)
            new[name] = {
                A_KEY[name]: stack_matrices(new_a, params[name][A_KEY[name]].shape),
                B_KEY[name]: stack_matrices(new_b, params[name][B_KEY[name]].shape),
            }
        new["bias"], states["bias"] = bias_step(
            params["bias"], grads["bias"], states.get("bias") or ref.adamw_init(grads["bias"]), t
        )
        params = new
        history.append(params)
    return history


def _compare(lib_hist, ref_hist, rtol=1e-8, atol=1e-10):
    for t, (lib, want) in enumerate(zip(lib_hist, ref_hist)):
        for name in LAYOUT:
            for key in (A_KEY[name], B_KEY[name]):
                np.testing.assert_allclose(
                    np.asarray(lib[name][key]), want[name][key], rtol=rtol, atol=atol,
                    err_msg=f"step {t}, {name}/{key}",
                )  # fmt: skip
        np.testing.assert_allclose(np.asarray(lib["bias"]), want["bias"], rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# Adjusted gradients (SGD variant)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, 1e-6])
def test_adjusted_gradients_match_reference(problem, delta):
    params = _f64(problem.random_params())
    grads, _ = problem.grads(params)
    tx = lox.scale_by_lora_pro(delta=delta, pairs=PAIRS)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for name in LAYOUT:
        k = pair_batch(name)
        got_a = factor_matrices(out[name][A_KEY[name]], k, "a")
        got_b = factor_matrices(out[name][B_KEY[name]], k, "b")
        for i, (a, b, ga, gb) in enumerate(_slices(params, grads, name)):
            want_a, want_b = ref.lora_pro_step(a, b, ga, gb, SCALE, delta=delta)
            np.testing.assert_allclose(got_a[i], want_a, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got_b[i], want_b, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(out["bias"], grads["bias"])  # outside pairs: unchanged


@pytest.mark.parametrize("start", ["init", "random"])
def test_lora_pro_sgd_matches_reference(problem, start):
    params = _f64(problem.init_params() if start == "init" else problem.random_params())
    delta = 1e-6

    def sched(count):
        return 0.05 - 0.005 * count

    lib = _library_run(lox.lora_pro_sgd(sched, delta=delta, pairs=PAIRS), problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        na, nb = ref.lora_pro_step(a, b, ga, gb, SCALE, delta=delta)
        return a - sched(t) * na, b - sched(t) * nb, None

    def bias_step(p, g, state, t):
        return p - sched(t) * g, state

    _compare(lib, _reference_run(step, bias_step, problem, params, STEPS))


def _random_pair(rng, batch=(), m=8, n=6, r=3):
    a = rng.normal(size=batch + (m, r))
    b = rng.normal(size=batch + (r, n))
    g = rng.normal(size=batch + (m, n))
    return a, b, g


def test_equivalent_gradient_is_tangent_projection(x64):
    """``s(g̃_A B + A g̃_B) = P_col G + G P_row − P_col G P_row`` (the Y terms cancel)."""
    rng = np.random.default_rng(0)
    a, b, g = _random_pair(rng, batch=(2,))
    g_a = SCALE * g @ np.swapaxes(b, -1, -2)
    g_b = SCALE * np.swapaxes(a, -1, -2) @ g
    na, nb = adjust(*map(jnp.asarray, (a, b, g_a, g_b)), SCALE, 0.0)
    for i in range(2):
        equiv = SCALE * (np.asarray(na[i]) @ b[i] + a[i] @ np.asarray(nb[i]))
        want = ref.lora_pro_equivalent_gradient(a[i], b[i], g[i])
        np.testing.assert_allclose(equiv, want, rtol=1e-9, atol=1e-12)
        p_col, p_row = ref.tangent_projectors(a[i], b[i])
        np.testing.assert_allclose(
            want, p_col @ g[i] + g[i] @ p_row - p_col @ g[i] @ p_row, rtol=1e-12
        )


def test_balancing_is_optimal(x64):
    """Y minimises ‖g̃_A − g_A‖² + ‖g̃_B − g_B‖² over ``(g̃_A + A Z, g̃_B − Z B)``:
    the stationarity condition ``Aᵀ(g̃_A − g_A) = (g̃_B − g_B) Bᵀ`` holds."""
    rng = np.random.default_rng(1)
    a, b, g = _random_pair(rng)
    g_a, g_b = SCALE * g @ b.T, SCALE * a.T @ g
    na, nb = (np.asarray(x) for x in adjust(*map(jnp.asarray, (a, b, g_a, g_b)), SCALE, 0.0))
    np.testing.assert_allclose(a.T @ (na - g_a), (nb - g_b) @ b.T, rtol=1e-9, atol=1e-12)


def test_b_zero_gives_authors_first_step(x64):
    rng = np.random.default_rng(2)
    a, _, g = _random_pair(rng)
    b = np.zeros((3, 6))
    g_a, g_b = np.zeros((8, 3)), SCALE * a.T @ g
    na, nb = adjust(*map(jnp.asarray, (a, b, g_a, g_b)), SCALE, 1e-6)
    np.testing.assert_array_equal(np.asarray(na), 0.0)
    want = np.linalg.solve(a.T @ a + 1e-6 * np.eye(3), g_b) / SCALE**2
    np.testing.assert_allclose(np.asarray(nb), want, rtol=1e-9)


def test_degenerate_inputs_finite():
    """float32, rank-deficient A, B = 0, zero gradients: finite everywhere."""
    a = np.ones((5, 3), np.float32)  # rank 1
    for b in (np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32)):
        for g_a, g_b in ((np.zeros((5, 3)), np.zeros((3, 4))), (np.ones((5, 3)), np.ones((3, 4)))):
            out = adjust(*map(jnp.asarray, (a, b, g_a.astype(np.float32), g_b.astype(np.float32))),
                         1.0, 1e-6)  # fmt: skip
            assert all(np.all(np.isfinite(np.asarray(x))) for x in out)


# ---------------------------------------------------------------------------------------
# Sylvester solver
# ---------------------------------------------------------------------------------------


@settings(max_examples=12)
@given(
    k=st.integers(1, 6),
    l_=st.integers(1, 6),
    batch=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**16),
    singular_q=st.booleans(),
)
def test_solve_sylvester_sym_matches_kronecker(k, l_, batch, seed, singular_q):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=batch + (k, k + 2))
    p = x @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(k)  # symmetric PD
    y = rng.normal(size=batch + (l_, 1 if singular_q else l_ + 1))
    q = y @ np.swapaxes(y, -1, -2)  # symmetric PSD, singular when l_ > 1 and singular_q
    c = rng.normal(size=batch + (k, l_))
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(linalg.solve_sylvester_sym)(*map(jnp.asarray, (p, q, c))))
    flat = [(p, q, c, got)] if not batch else zip(p, q, c, got)
    for pi, qi, ci, gi in flat:
        want = ref.sylvester_solve_direct(pi, qi, ci)
        np.testing.assert_allclose(gi, want, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(pi @ gi + gi @ qi, ci, rtol=1e-8, atol=1e-10)


def test_solve_sylvester_sym_undetermined_directions_are_zero(x64):
    """P = Q = 0 leaves X undetermined; the minimum-norm choice 0 is returned."""
    c = jnp.ones((3, 2))
    got = linalg.solve_sylvester_sym(jnp.zeros((3, 3)), jnp.zeros((2, 2)), c)
    np.testing.assert_array_equal(np.asarray(got), 0.0)


# ---------------------------------------------------------------------------------------
# AdamW variant (full-size Adam on the equivalent gradient)
# ---------------------------------------------------------------------------------------


def _lora_pro_adam_step(a, b, ga, gb, state, lr, *, b1, b2, eps, wd, delta):
    """Authors' LoRA-Pro AdamW for one 2-D pair, from the reference pieces (float64)."""
    t = 1 if state is None else state["t"] + 1
    mu = np.zeros((a.shape[0], b.shape[1])) if state is None else state["mu"]
    nu = np.zeros_like(mu) if state is None else state["nu"]
    adj_a, adj_b = ref.lora_pro_step(a, b, ga, gb, SCALE, delta=delta)
    equiv = SCALE * (adj_a @ b + a @ adj_b)
    mu = b1 * mu + (1 - b1) * equiv
    nu = b2 * nu + (1 - b2) * equiv * equiv
    u = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    na, nb = ref.lora_pro_step(a, b, SCALE * u @ b.T, SCALE * a.T @ u, SCALE, delta=delta)
    new_state = {"t": t, "mu": mu, "nu": nu}
    return a - lr * (na + wd * a), b - lr * (nb + wd * b), new_state


@pytest.mark.parametrize(("start", "wd"), [("init", 0.0), ("random", 0.05)])
def test_lora_pro_adamw_matches_reference(problem, start, wd):
    params = _f64(problem.init_params() if start == "init" else problem.random_params())
    b1, b2, eps, delta = 0.8, 0.95, 1e-8, 1e-6

    def sched(count):
        return 0.01 - 0.001 * count

    tx = lox.lora_pro_adamw(sched, b1, b2, eps, weight_decay=wd, delta=delta, pairs=PAIRS)
    lib = _library_run(tx, problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return _lora_pro_adam_step(
            a, b, ga, gb, state, sched(t), b1=b1, b2=b2, eps=eps, wd=wd, delta=delta
        )

    def bias_step(p, g, state, t):
        return ref.adamw_step(p, g, state, sched(t), b1, b2, eps, wd)

    # Adam's first steps are ~sign(g̃): rounding of tiny entries is amplified a little.
    _compare(lib, _reference_run(step, bias_step, problem, params, STEPS), rtol=1e-7, atol=1e-9)


def test_lora_pro_state_layout(problem):
    params = problem.random_params()
    tx = lox.lora_pro_adamw(1e-2)
    state = tx.init(params)
    core = find_state(state, lox.ScaleByLoRAProAdamState)
    for name in LAYOUT:
        k = pair_batch(name)
        a_shape, b_shape = LAYOUT[name][0], LAYOUT[name][1]
        assert core.mu[name][A_KEY[name]].shape == a_shape[:-1] + b_shape[k + 1 :]
        assert core.nu[name][A_KEY[name]].shape == a_shape[:-1] + b_shape[k + 1 :]
        assert isinstance(core.mu[name][B_KEY[name]], optax.MaskedNode)
    shapes = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)


def test_full_grads_not_needed_but_accepted():
    rng = np.random.default_rng(0)
    params = {"lora_a": jnp.asarray(rng.normal(size=(6, 2))), "lora_b": jnp.zeros((2, 4))}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = lox.lora_pro_adamw(1e-2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, _ = update(grads, state, params)
    u2, _ = update(grads, state, params, full_grads=jnp.ones((6, 4)))  # ignored
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="b1"):
        lox.lora_pro_adamw(0.1, b1=1.5)
    with pytest.raises(ValueError, match="delta"):
        lox.lora_pro_sgd(0.1, delta=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        lox.lora_pro_adamw(0.1, weight_decay=-1.0)
