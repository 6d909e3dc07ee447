"""Exact-formula and behaviour tests of SoLoRA (SPEC §2.5).

Expected trajectories come from ``tests/reference.py`` (float64 NumPy, written from
SPEC §2.5 independently of the library), applied per stacked-layer slice to the 2-D
matrix views of each pair of ``FactorizationProblem`` (a 2-D pair, a stacked pair, a
qwix-style multi-axis pair and a square pair whose row and column statistics differ,
LoRA scale ``s = 2.5``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from lora_optax._src import solora as solora_lib
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
STEPS = 5
PAIRS = functools.partial(lox.find_lora_pairs, scale=SCALE)
solora_direction = jax.jit(solora_lib.solora_direction, static_argnames=("use_metric", "balanced"))


@pytest.fixture
def problem(x64):
    return FactorizationProblem.create(seed=3, scale=SCALE)


def _f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _tiny(seed=0):
    """(params, grads, full_grads) of one 2-D pair and a bias, float64 (cheap to compile)."""
    rng = np.random.default_rng(seed)
    params = {
        "q": {"lora_a": rng.normal(size=(6, 2)), "lora_b": rng.normal(size=(2, 5))},
        "bias": rng.normal(size=(5,)),
    }
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    full = {"q": rng.normal(size=(6, 5))}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, grads, full))


def _update(tx, *args, **kwargs):
    """``tx.update`` under jit (eager dispatch of many small ops is slow)."""
    return jax.jit(tx.update)(*args, **kwargs)


def _library_run(tx, problem, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g, full = problem.grads(p)
        u, s = tx.update(g, s, p, full_grads=full)
        return optax.apply_updates(p, u), s

    history = [params]
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history, state


def _full_matrices(g: np.ndarray, a_shape, k: int) -> list[np.ndarray]:
    """Per stacked slice, the m×n matrix of a full gradient in kernel form."""
    m = int(np.prod(a_shape[k:-1]))
    g = np.asarray(g, np.float64)
    return list(g.reshape((-1, m, g[(0,) * k].size // m))) if k else [g.reshape(m, -1)]


def _reference_run(pair_step, init_state, bias_step, problem, params, steps):
    """The reference per pair and per stacked slice; the bias follows ``bias_step``."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    states: dict = {}
    history = [params]
    for t in range(steps):
        grads, full = problem.grads(jax.tree.map(jnp.asarray, params))
        new = {}
        for name in LAYOUT:
            k = pair_batch(name)
            a, b = params[name][A_KEY[name]], params[name][B_KEY[name]]
            mats = zip(
                factor_matrices(a, k, "a"),
                factor_matrices(b, k, "b"),
                _full_matrices(full[name], a.shape, k),
            )
            new_a, new_b = [], []
            for i, (am, bm, gm) in enumerate(mats):
                key = (name, i)
                if key not in states:
                    states[key] = init_state(am, bm)
                na, nb, states[key] = pair_step(am, bm, gm, states[key], t)
                new_a.append(na)
                new_b.append(nb)
            new[name] = {
                A_KEY[name]: stack_matrices(new_a, a.shape),
                B_KEY[name]: stack_matrices(new_b, b.shape),
            }
        if "bias" not in states:
            states["bias"] = ref.adamw_init(params["bias"])
        new["bias"], states["bias"] = bias_step(
            params["bias"], np.asarray(grads["bias"], np.float64), states["bias"], t
        )
        params = new
        history.append(params)
    return history


def _compare(lib_hist, ref_hist, rtol=1e-8, atol=1e-10):
    for t, (lib, want) in enumerate(zip(lib_hist, ref_hist)):
        for name in LAYOUT:
            for key in (A_KEY[name], B_KEY[name]):
                np.testing.assert_allclose(
                    np.asarray(lib[name][key]),
                    want[name][key],
                    rtol=rtol,
                    atol=atol,
                    err_msg=f"step {t}, {name}/{key}",
                )
        np.testing.assert_allclose(np.asarray(lib["bias"]), want["bias"], rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# Exact formulas against the reference
# ---------------------------------------------------------------------------------------


# B = 0 (start "init") needs damping: undamped, the library's Cholesky has nothing to
# factor (the reference would switch to a pseudo-inverse).
@pytest.mark.parametrize(("start", "delta"), [("init", 1e-6), ("random", 1e-6), ("random", 0.0)])
def test_solora_sgd_matches_reference(problem, start, delta):
    params = _f64(problem.init_params() if start == "init" else problem.random_params())
    lr, beta = 0.02, 0.9
    lib, _ = _library_run(
        lox.solora_sgd(lr, beta=beta, delta=delta, pairs=PAIRS), problem, params, STEPS
    )

    def step(a, b, g, state, t):
        return ref.solora_sgd_step(a, b, g, state, lr, beta, SCALE, delta=delta)

    def bias_step(p, g, state, t):  # plain SGD outside pairs
        return p - lr * g, state

    want = _reference_run(step, ref.solora_sgd_init, bias_step, problem, params, STEPS)
    _compare(lib, want)


@pytest.mark.parametrize(("start", "wd"), [("init", 0.05), ("random", 0.0)])
def test_solora_adamw_matches_reference(problem, start, wd):
    params = _f64(problem.init_params() if start == "init" else problem.random_params())
    beta, momentum, eps, delta = 0.95, 0.8, 1e-8, 1e-6

    def sched(count):  # linear decay
        return 0.02 - 0.003 * count

    tx = lox.solora_adamw(
        sched, beta=beta, momentum=momentum, eps=eps, weight_decay=wd, delta=delta, pairs=PAIRS
    )
    lib, state = _library_run(tx, problem, params, STEPS)

    def step(a, b, g, state, t):
        return ref.solora_adamw_step(
            a, b, g, state, sched(t), beta, momentum, wd, SCALE, delta=delta
        )

    def bias_step(p, g, state, t):  # AdamW with b1 = momentum, b2 = beta
        return ref.adamw_step(p, g, state, sched(t), momentum, beta, eps, wd)

    want = _reference_run(step, ref.solora_adamw_init, bias_step, problem, params, STEPS)
    _compare(lib, want)
    assert int(find_state(state, lox.ScaleBySoLoRAState).count) == STEPS


def test_solora_state_matches_reference(problem):
    """The statistics and the full momentum equal the reference's after a few steps."""
    params = _f64(problem.random_params())
    beta, momentum = 0.9, 0.7
    tx = lox.scale_by_solora(beta=beta, momentum=momentum, pairs=PAIRS)
    state = tx.init(params)
    ref_states = {}
    for _ in range(3):
        grads, full = problem.grads(params)
        _, state = _update(tx, grads, state, params, full_grads=full)
        for name in LAYOUT:
            k = pair_batch(name)
            a, b = params[name][A_KEY[name]], params[name][B_KEY[name]]
            for i, (am, bm, gm) in enumerate(
                zip(
                    factor_matrices(a, k, "a"),
                    factor_matrices(b, k, "b"),
                    _full_matrices(full[name], a.shape, k),
                )
            ):
                s = ref_states.get((name, i)) or ref.solora_adamw_init(am, bm)
                _, _, ref_states[(name, i)] = ref.solora_adamw_step(
                    am, bm, gm, s, 0.0, beta, momentum, 0.0, SCALE
                )
    for name in LAYOUT:
        k = pair_batch(name)
        n_slices = sum(1 for key in ref_states if key[0] == name)
        r_in = np.asarray(state.stats[name][A_KEY[name]]).reshape(n_slices, -1)
        l_out = np.asarray(state.stats[name][B_KEY[name]]).reshape(n_slices, -1)
        mom = np.asarray(state.momentum[name][A_KEY[name]]).reshape(n_slices, -1)
        for i in range(n_slices):
            want = ref_states[(name, i)]
            np.testing.assert_allclose(r_in[i], want.r_in, rtol=1e-12)
            np.testing.assert_allclose(l_out[i], want.l_out, rtol=1e-12)
            np.testing.assert_allclose(mom[i], want.mom.reshape(-1), rtol=1e-12, atol=1e-15)
        # Layout: statistics over the factors' non-rank axes, M of the base kernel's shape.
        a_shape, b_shape = LAYOUT[name][0], LAYOUT[name][1]
        assert state.stats[name][A_KEY[name]].shape == a_shape[:-1]
        assert state.stats[name][B_KEY[name]].shape == b_shape[:k] + b_shape[k + 1 :]
        assert state.momentum[name][A_KEY[name]].shape == a_shape[:-1] + b_shape[k + 1 :]
        assert isinstance(state.momentum[name][B_KEY[name]], optax.MaskedNode)


# ---------------------------------------------------------------------------------------
# The direction itself
# ---------------------------------------------------------------------------------------


def _random_direction_inputs(rng, batch=(), m=9, n=7, r=3):
    a = rng.normal(size=batch + (m, r))
    b = rng.normal(size=batch + (r, n))
    g = rng.normal(size=batch + (m, n))
    r_in = rng.uniform(0.1, 2.0, size=batch + (m,))
    l_out = rng.uniform(0.1, 2.0, size=batch + (n,))
    return a, b, g, r_in, l_out


@pytest.mark.parametrize("use_metric", [True, False])
@pytest.mark.parametrize("balanced", [True, False])
def test_direction_matches_reference(x64, use_metric, balanced):
    rng = np.random.default_rng(0)
    a, b, g, r_in, l_out = _random_direction_inputs(rng, batch=(2,))
    g_a, g_b = SCALE * g @ np.swapaxes(b, -1, -2), SCALE * np.swapaxes(a, -1, -2) @ g
    d_a, d_b = solora_direction(
        *map(jnp.asarray, (a, b, g_a, g_b, r_in, l_out)),
        1e-4,
        use_metric=use_metric,
        balanced=balanced,
    )
    for i in range(2):
        want_a, want_b = ref.solora_direction(
            a[i], b[i], g_a[i], g_b[i], r_in[i], l_out[i],
            use_metric=use_metric, balanced=balanced, delta=1e-4,
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(d_a[i]), want_a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(d_b[i]), want_b, rtol=1e-10, atol=1e-12)


def test_direction_reduces_to_projected_gradient(x64):
    """With L = R = I and without the ½-terms: (g_A (BBᵀ)⁻¹, (AᵀA)⁻¹ g_B)."""
    rng = np.random.default_rng(1)
    a, b, g, r_in, l_out = _random_direction_inputs(rng)
    g_a, g_b = g @ b.T, a.T @ g
    d_a, d_b = solora_direction(
        *map(jnp.asarray, (a, b, g_a, g_b, r_in, l_out)), 0.0, use_metric=False, balanced=False
    )
    np.testing.assert_allclose(np.asarray(d_a), g_a @ np.linalg.inv(b @ b.T), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(d_b), np.linalg.inv(a.T @ a) @ g_b, rtol=1e-10)
    want_a, want_b = ref.riemannian_precondition(g_a, g_b, a, b, 0.0)
    np.testing.assert_allclose(np.asarray(d_a), want_a, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(d_b), want_b, rtol=1e-10)


def test_direction_is_weighted_tangent_projection(x64):
    """``Δ_A B + A Δ_B = s·P̃_T(R^-½ G L^-½)`` (paper eq. (10), our orientation)."""
    rng = np.random.default_rng(2)
    a, b, g, r_in, l_out = _random_direction_inputs(rng)
    g_a, g_b = SCALE * g @ b.T, SCALE * a.T @ g
    d_a, d_b = solora_direction(*map(jnp.asarray, (a, b, g_a, g_b, r_in, l_out)), 0.0)
    r_half = np.sqrt(ref.solora_metric(r_in))
    l_half = np.sqrt(ref.solora_metric(l_out))
    p_col = a @ np.linalg.inv(a.T @ (r_half[:, None] * a)) @ a.T * r_half[None, :]
    p_row = l_half[:, None] * b.T @ np.linalg.inv((b * l_half) @ b.T) @ b
    x = g / r_half[:, None] / l_half[None, :]
    want = SCALE * (p_col @ x + x @ p_row - p_col @ x @ p_row)
    np.testing.assert_allclose(np.asarray(d_a) @ b + a @ np.asarray(d_b), want, rtol=1e-9)


def test_direction_finite_for_degenerate_inputs():
    """B = 0, zero statistics (all or some entries), rank-deficient A: finite."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 3)).astype(np.float32)
    a[:, 2] = a[:, 1]  # rank-deficient A
    b = np.zeros((3, 5), np.float32)
    g_a, g_b = np.zeros((6, 3), np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    r_in = np.array([0.0, 1.0, 0.0, 2.0, 1e-30, 3.0], np.float32)
    l_out = np.zeros((5,), np.float32)
    d_a, d_b = solora_direction(*map(jnp.asarray, (a, b, g_a, g_b, r_in, l_out)), 1e-6)
    assert np.all(np.isfinite(d_a)) and np.all(np.isfinite(d_b))
    np.testing.assert_array_equal(np.asarray(d_a), 0.0)  # g_A = s G Bᵀ = 0 at B = 0


def test_b_zero_first_step_updates_only_b(problem):
    """At a standard initialisation (B = 0) the direction of A is 0, that of B is not."""
    params = _f64(problem.init_params())
    grads, full = problem.grads(params)
    lr, wd = 0.1, 0.01
    for tx, decay in ((lox.solora_sgd(lr, pairs=PAIRS), 0.0),
                      (lox.solora_adamw(lr, weight_decay=wd, pairs=PAIRS), wd)):  # fmt: skip
        updates, state = _update(tx, grads, tx.init(params), params, full_grads=full)
        for name in LAYOUT:
            a = np.asarray(params[name][A_KEY[name]])
            np.testing.assert_allclose(
                np.asarray(updates[name][A_KEY[name]]), -lr * decay * a, atol=1e-15
            )
            assert np.any(np.asarray(updates[name][B_KEY[name]]) != 0)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))


def test_zero_full_gradient_gives_zero_step(problem):
    params = _f64(problem.random_params())
    grads, full = problem.grads(params)
    zeros = jax.tree.map(jnp.zeros_like, full)
    tx = lox.solora_sgd(0.1, pairs=PAIRS)
    updates, _ = _update(tx, grads, tx.init(params), params, full_grads=zeros)
    for name in LAYOUT:
        for key in (A_KEY[name], B_KEY[name]):
            u = np.asarray(updates[name][key])
            assert np.all(np.isfinite(u))
            np.testing.assert_array_equal(u, 0.0)  # R^-½ = L^-½ = 0 (pseudo-inverse)


# ---------------------------------------------------------------------------------------
# full_grads: layout, errors, composition
# ---------------------------------------------------------------------------------------


def test_matrix_form_full_grads_accepted(problem):
    params = _f64(problem.random_params())
    grads, full = problem.grads(params)
    matrix = {}
    for name, g in full.items():
        k = pair_batch(name)
        m = int(np.prod(LAYOUT[name][0][k:-1]))
        matrix[name] = g.reshape(g.shape[:k] + (m, -1))
    tx = lox.scale_by_solora(momentum=0.9, pairs=PAIRS)
    u1, s1 = _update(tx, grads, tx.init(params), params, full_grads=full)
    u2, s2 = _update(tx, grads, tx.init(params), params, full_grads=matrix)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12), (u1, s1), (u2, s2))


@pytest.mark.parametrize("make", [lox.solora_sgd, lox.solora_adamw], ids=["sgd", "adamw"])
def test_missing_full_grads_raises(problem, make):
    params = problem.random_params()
    grads, full = problem.grads(params)
    tx = make(0.1)
    state = tx.init(params)
    with pytest.raises(ValueError, match="full_grads"):
        _update(tx, grads, state, params)
    partial = {k: v for k, v in full.items() if k != "einsum"}
    with pytest.raises(ValueError, match=r"einsum/w_lora_a.*\(12, 2, 5\)"):
        _update(tx, grads, state, params, full_grads=partial)


def test_misshaped_full_grads_raises(problem):
    params = problem.random_params()
    grads, full = problem.grads(params)
    tx = lox.solora_sgd(0.1)
    state = tx.init(params)
    bad = dict(full, dense=full["dense"].T)
    with pytest.raises(ValueError, match=r"dense.*\(12, 16\).*\(16, 12\)"):
        _update(tx, grads, state, params, full_grads=bad)
    bad = dict(full, stacked=full["stacked"][0])
    with pytest.raises(ValueError, match="stacked"):
        _update(tx, grads, state, params, full_grads=bad)


def test_full_grad_for_pair_lookup():
    a, b = jnp.zeros((6, 2)), jnp.zeros((2, 3, 4))
    params = {"blk": {"attn": {"w_lora_a": a, "w_lora_b": b}}}
    (pair,) = lox.find_lora_pairs(params)
    assert lox.pair_parent(pair) == ("blk", "attn")
    g = jnp.ones((6, 3, 4))
    for tree in (
        {"blk": {"attn": g}},  # at the parent node
        {"blk": {"attn": {"w": g}}},  # qwix: at the base weight's own position
        {"blk/attn": g},  # flat mapping
        {"blk": {"attn": jnp.ones((6, 12))}},  # matrix form
    ):
        got = lox.full_grad_for_pair(pair, tree, params)
        assert got.shape in ((6, 3, 4), (6, 12))
    with pytest.raises(ValueError, match="needs the full-weight gradients"):
        lox.full_grad_for_pair(pair, None, params)


def test_full_grads_flow_through_wrappers(x64):
    """chain, inject_hyperparams, partition and masked all forward ``full_grads``."""
    params, grads, full = _tiny()
    plain = lox.solora_adamw(1e-2)
    want, _ = _update(plain, grads, plain.init(params), params, full_grads=full)

    injected = optax.inject_hyperparams(lox.solora_adamw)(learning_rate=1e-2)
    got, _ = _update(injected, grads, injected.init(params), params, full_grads=full)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10), got, want)

    labels = jax.tree.map(lambda lab: "lora" if lab != "other" else lab, lox.label_tree(params))
    part = optax.partition(
        {
            "lora": lox.solora_adamw(1e-2),
            "other": optax.adamw(1e-2, b1=0.9, b2=0.98, weight_decay=0.01),
        },
        labels,
    )
    got, _ = _update(part, grads, part.init(params), params, full_grads=full)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10), got, want)

    mask = jax.tree.map(lambda lab: lab != "other", labels)
    masked = optax.masked(lox.solora_sgd(1.0), mask)
    got, _ = _update(masked, grads, masked.init(params), params, full_grads=full)
    sgd = lox.solora_sgd(1.0)
    want_sgd, _ = _update(sgd, grads, sgd.init(params), params, full_grads=full)
    np.testing.assert_allclose(got["q"]["lora_a"], want_sgd["q"]["lora_a"], rtol=1e-12)
    np.testing.assert_array_equal(got["bias"], grads["bias"])  # masked out: untouched


def test_multi_steps_uses_last_full_grads(x64):
    """MultiSteps averages ``updates`` but forwards the ``full_grads`` of the last call."""
    params, grads, full = _tiny()
    tx = lox.solora_sgd(0.1)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    state = multi.init(params)
    zeros = jax.tree.map(jnp.zeros_like, full)
    _, state = _update(multi, grads, state, params, full_grads=zeros)
    got, _ = _update(multi, grads, state, params, full_grads=full)
    want, _ = _update(tx, grads, tx.init(params), params, full_grads=full)
    # MultiSteps accumulates in float32.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), got, want)


def test_init_abstract_and_memory_layout(problem):
    params = problem.random_params(dtype=jnp.bfloat16)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for tx in (lox.solora_sgd(0.1), lox.solora_adamw(0.1)):
        shapes = jax.eval_shape(tx.init, params)
        direct = tx.init(abstract)
        assert jax.tree.structure(shapes) == jax.tree.structure(direct)
        for x, y in zip(jax.tree.leaves(shapes), jax.tree.leaves(direct)):
            assert x.shape == y.shape and x.dtype == y.dtype
    state = find_state(lox.solora_adamw(0.1).init(params), lox.ScaleBySoLoRAState)
    for name in LAYOUT:
        k = pair_batch(name)
        a_shape, b_shape = LAYOUT[name][0], LAYOUT[name][1]
        m = state.momentum[name][A_KEY[name]]
        assert m.shape == a_shape[:-1] + b_shape[k + 1 :] and m.dtype == jnp.float32
        assert state.stats[name][A_KEY[name]].dtype == jnp.float32


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta"):
        lox.solora_sgd(0.1, beta=1.0)
    with pytest.raises(ValueError, match="momentum"):
        lox.solora_adamw(0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="delta"):
        lox.solora_sgd(0.1, delta=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        lox.solora_adamw(-1.0)


def test_large_steps_stay_finite(problem):
    """Large steps make the factors ill-conditioned; the damping floor keeps it finite."""
    params = problem.init_params()
    tx = lox.solora_sgd(0.3)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g, full = problem.grads(p)
        u, s = tx.update(g, s, p, full_grads=full)
        return optax.apply_updates(p, u), s

    for _ in range(40):
        params, state = step(params, state)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("momentum", [None, 0.7])
def test_square_pair_keeps_row_and_column_statistics_apart(x64, momentum):
    """A square pair (m = n) alone: a swap of the input (row) and output (column)
    statistics cannot fail on shapes here, so the values must pin it down. G has rows
    and columns of very different scales, so the two statistics differ."""
    rng = np.random.default_rng(7)
    m = n = 12
    g_full = rng.normal(size=(m, n)) * np.logspace(0, 2, m)[:, None] * np.linspace(1, 3, n)
    a, b = rng.normal(size=(m, 3)) / np.sqrt(m), rng.normal(size=(3, n)) * 0.3
    params = _f64({"sq": {"lora_a": a, "lora_b": b}})
    beta, lr, delta = 0.9, 1e-3, 1e-6
    if momentum is None:
        tx = lox.solora_sgd(lr, beta=beta, delta=delta, pairs=PAIRS)
        ref_state = ref.solora_sgd_init(a, b)
    else:
        tx = lox.solora_adamw(
            lr, beta=beta, momentum=momentum, weight_decay=0.0, delta=delta, pairs=PAIRS
        )
        ref_state = ref.solora_adamw_init(a, b)
    state = tx.init(params)
    for _ in range(3):
        pa, pb = np.asarray(params["sq"]["lora_a"]), np.asarray(params["sq"]["lora_b"])
        grads = _f64({"sq": {"lora_a": SCALE * g_full @ pb.T, "lora_b": SCALE * pa.T @ g_full}})
        updates, state = _update(tx, grads, state, params, full_grads=_f64({"sq": g_full}))
        params = optax.apply_updates(params, updates)
        if momentum is None:
            ra, rb, ref_state = ref.solora_sgd_step(
                pa, pb, g_full, ref_state, lr, beta, SCALE, delta=delta
            )
        else:
            ra, rb, ref_state = ref.solora_adamw_step(
                pa, pb, g_full, ref_state, lr, beta, momentum, 0.0, SCALE, delta=delta
            )
        np.testing.assert_allclose(params["sq"]["lora_a"], ra, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(params["sq"]["lora_b"], rb, rtol=1e-9, atol=1e-12)
    stats = find_state(state, lox.ScaleBySoLoRAState).stats["sq"]
    np.testing.assert_allclose(stats["lora_a"], ref_state.r_in, rtol=1e-12)
    np.testing.assert_allclose(stats["lora_b"], ref_state.l_out, rtol=1e-12)
    assert not np.allclose(ref_state.r_in, ref_state.l_out, rtol=0.1)
