"""LoRA-One (SPEC §2.4): spectral initialisation and preconditioned AdamW."""

from __future__ import annotations

import functools
import math

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
    return FactorizationProblem.create(seed=7, scale=SCALE)


def _f64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


def _low_rank_plus_noise(rng, shape, rank, noise):
    m, n = shape
    u, v = rng.normal(size=(m, rank)), rng.normal(size=(rank, n))
    sv = np.geomspace(10.0, 2.0, rank)
    return (u * sv) @ v / math.sqrt(m * n) * 10 + noise * rng.normal(size=(m, n))


def _g_rank(g, r):
    u, s, vt = np.linalg.svd(g)
    return (u[:, :r] * s[:r]) @ vt[:r], s[0]


# ---------------------------------------------------------------------------------------
# spectral_init
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [128.0, 16.0])
def test_spectral_init_2d_matches_reference(x64, gamma):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(12, 9))
    r, s = 3, 1.7
    a0, b0, _ = lox.spectral_init(jnp.asarray(g), r, gamma=gamma, scale=s)
    ra, rb = ref.spectral_init(g, r, gamma=gamma, scale=s)
    np.testing.assert_allclose(a0, ra, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b0, rb, rtol=1e-10, atol=1e-12)
    g_r, sigma1 = _g_rank(g, r)
    np.testing.assert_allclose(s * np.asarray(a0 @ b0), -(s / (sigma1 * gamma)) * g_r, atol=1e-12)
    assert a0.dtype == jnp.float64


def test_spectral_init_multi_axis_and_stacked(x64):
    rng = np.random.default_rng(1)
    r = 2
    # qwix einsum kernel G (D, N, H) with in_ndim=1 -> A (D, r), B (r, N, H).
    g = rng.normal(size=(10, 3, 4))
    a0, b0, _ = lox.spectral_init(jnp.asarray(g), r, in_ndim=1)
    assert a0.shape == (10, r) and b0.shape == (r, 3, 4)
    ra, rb = ref.spectral_init(g.reshape(10, 12), r)
    np.testing.assert_allclose(a0, ra, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(b0).reshape(r, 12), rb, rtol=1e-10, atol=1e-12)
    # (N, H) input axes: G (N, H, D), in_ndim=2 -> A (N, H, r), B (r, D).
    g2 = rng.normal(size=(3, 4, 10))
    a2, b2, _ = lox.spectral_init(jnp.asarray(g2), r, in_ndim=2)
    assert a2.shape == (3, 4, r) and b2.shape == (r, 10)
    ra2, rb2 = ref.spectral_init(g2.reshape(12, 10), r)
    np.testing.assert_allclose(np.asarray(a2).reshape(12, r), ra2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b2, rb2, rtol=1e-10, atol=1e-12)
    # Stacked layers: every slice has its own SVD and its own σ₁.
    gs = rng.normal(size=(3, 8, 6)) * np.array([1.0, 5.0, 0.1])[:, None, None]
    as_, bs, _ = lox.spectral_init(jnp.asarray(gs), r, batch_ndim=1, gamma=32.0)
    assert as_.shape == (3, 8, r) and bs.shape == (3, r, 6)
    for i in range(3):
        ra, rb = ref.spectral_init(gs[i], r, gamma=32.0)
        np.testing.assert_allclose(as_[i], ra, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bs[i], rb, rtol=1e-10, atol=1e-12)


def test_preserve_output_keeps_effective_weight(x64):
    rng = np.random.default_rng(2)
    g = rng.normal(size=(4, 2, 5))  # in_ndim=2: m = 8, n = 5
    r, s, gamma = 3, 0.75, 64.0
    w = rng.normal(size=g.shape)
    a0, b0, dw = lox.spectral_init(
        jnp.asarray(g), r, gamma=gamma, scale=s, preserve_output=True, in_ndim=2
    )
    assert dw.shape == g.shape and a0.shape == (4, 2, r) and b0.shape == (r, 5)
    a_m = np.asarray(a0).reshape(8, r)
    effective = w + np.asarray(dw) + s * (a_m @ np.asarray(b0)).reshape(g.shape)
    np.testing.assert_allclose(effective, w, atol=1e-12)
    np.testing.assert_allclose(a_m.T @ a_m, gamma * np.eye(r), atol=1e-10)  # √γ U_r
    ra, rb, rdw = ref.spectral_init(g.reshape(8, 5), r, gamma=gamma, scale=s, preserve_output=True)
    np.testing.assert_allclose(a_m, ra, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b0, rb, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dw).reshape(8, 5), rdw, rtol=1e-10, atol=1e-12)
    # Default scale: the reference code's rsLoRA scale 16/√r.
    _, _, dw_default = lox.spectral_init(
        jnp.asarray(g), r, gamma=gamma, preserve_output=True, in_ndim=2
    )
    np.testing.assert_allclose(dw_default, dw * (16.0 / math.sqrt(r)) / s, rtol=1e-12)


def test_randomized_svd_close_to_full(x64):
    rng = np.random.default_rng(3)
    g = _low_rank_plus_noise(rng, (60, 40), 4, 1e-3)
    r = 4
    key = jax.random.key(0)
    a_f, b_f, _ = lox.spectral_init(jnp.asarray(g), r)
    a_r, b_r, _ = lox.spectral_init(jnp.asarray(g), r, method="randomized", key=key)
    np.testing.assert_allclose(a_r @ b_r, a_f @ b_f, rtol=0, atol=1e-6 * np.abs(a_f @ b_f).max())
    np.testing.assert_allclose(a_r, a_f, atol=1e-5 * np.abs(a_f).max())  # canonical signs
    # Stacked and preserve_output variants too; deterministic for a fixed key.
    gs = np.stack([g, 2.0 * g[::-1]])
    out1 = lox.spectral_init(jnp.asarray(gs), r, batch_ndim=1, method="randomized", key=key)
    out2 = lox.spectral_init(jnp.asarray(gs), r, batch_ndim=1, method="randomized", key=key)
    full = lox.spectral_init(jnp.asarray(gs), r, batch_ndim=1)
    for x, y, z in zip(out1[:2], out2[:2], full[:2]):  # (a, b); base_delta is None
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, z, atol=1e-5 * np.abs(z).max())
    _, _, dw_r = lox.spectral_init(
        jnp.asarray(g), r, method="randomized", key=key, preserve_output=True, scale=1.0
    )
    _, _, dw_f = lox.spectral_init(jnp.asarray(g), r, preserve_output=True, scale=1.0)
    np.testing.assert_allclose(dw_r, dw_f, atol=1e-5 * np.abs(dw_f).max())


def test_spectral_init_float32_and_jit():
    rng = np.random.default_rng(4)
    g = jnp.asarray(rng.normal(size=(16, 12)), jnp.bfloat16)
    a0, b0, _ = jax.jit(functools.partial(lox.spectral_init, rank=4))(g)
    assert a0.dtype == jnp.bfloat16 and b0.dtype == jnp.bfloat16
    want_a, want_b = ref.spectral_init(np.asarray(g, np.float64), 4)
    np.testing.assert_allclose(
        np.asarray(a0, np.float32) @ np.asarray(b0, np.float32),
        want_a @ want_b,
        atol=2e-2 * np.abs(want_a @ want_b).max(),
    )
    # Traced zero gradient: no error possible, result finite (zeros).
    a0, b0, _ = jax.jit(functools.partial(lox.spectral_init, rank=2))(jnp.zeros((5, 4)))
    assert np.all(np.asarray(a0) == 0) and np.all(np.asarray(b0) == 0)


def test_spectral_init_errors():
    g = jnp.ones((6, 4)) + jnp.eye(6, 4)
    with pytest.raises(ValueError, match="rank 5"):
        lox.spectral_init(g, 5)
    with pytest.raises(ValueError, match="rank 0"):
        lox.spectral_init(g, 0)
    with pytest.raises(ValueError, match="gamma"):
        lox.spectral_init(g, 2, gamma=0.0)
    with pytest.raises(ValueError, match="method"):
        lox.spectral_init(g, 2, method="lanczos")
    with pytest.raises(ValueError, match="key"):
        lox.spectral_init(g, 2, method="randomized")
    with pytest.raises(ValueError, match="in_ndim"):
        lox.spectral_init(g, 2, in_ndim=2)
    with pytest.raises(ValueError, match="in_ndim"):
        lox.spectral_init(jnp.ones((6,)), 1)
    with pytest.raises(ValueError, match="zero"):
        lox.spectral_init(jnp.zeros((6, 4)), 2)
    with pytest.raises(ValueError, match="slice"):
        lox.spectral_init(jnp.stack([g, 0 * g]), 2, batch_ndim=1)
    with pytest.raises(ValueError, match="non-finite"):
        lox.spectral_init(g.at[0, 0].set(jnp.nan), 2)


# ---------------------------------------------------------------------------------------
# spectral_init_pairs
# ---------------------------------------------------------------------------------------


def _check_pair_inits(params, new, full, *, gamma, preserve=False, scale=1.0, deltas=None):
    for name in LAYOUT:
        k = pair_batch(name)
        a_shape = params[name][A_KEY[name]].shape
        g = np.asarray(full[name], np.float64)
        g_slices = g.reshape((-1,) + g.shape[k:]) if k else g[None]
        a_new = factor_matrices(new[name][A_KEY[name]], k, "a")
        b_new = factor_matrices(new[name][B_KEY[name]], k, "b")
        m = int(np.prod(a_shape[k:-1]))
        for i, gi in enumerate(g_slices):
            out = ref.spectral_init(
                gi.reshape(m, -1), a_shape[-1], gamma=gamma, scale=scale, preserve_output=preserve
            )
            np.testing.assert_allclose(a_new[i], out[0], rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(b_new[i], out[1], rtol=1e-9, atol=1e-11)
            if preserve:
                dwi = np.asarray(deltas[name], np.float64)
                dwi = (dwi.reshape((-1,) + dwi.shape[k:]) if k else dwi[None])[i]
                np.testing.assert_allclose(dwi.reshape(m, -1), out[2], rtol=1e-9, atol=1e-11)


def _full_grads(problem):
    """Full gradients of generic rank (≥ r): taken at random factors (B ≠ 0)."""
    return problem.grads(_f64(problem.random_params()))[1]


def test_spectral_init_pairs_matches_reference(problem):
    params = _f64(problem.init_params())
    full = _full_grads(problem)
    new = lox.spectral_init_pairs(params, full, gamma=64.0)
    _check_pair_inits(params, new, full, gamma=64.0)
    np.testing.assert_array_equal(new["bias"], params["bias"])
    # Jittable, same result.
    jitted = jax.jit(functools.partial(lox.spectral_init_pairs, gamma=64.0))(params, full)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14), new, jitted)


def test_spectral_init_lowers_loss_from_standard_init(problem):
    """At B = 0, s·A₀B₀ = −(s/(σ₁γ)) G_r is a normalised gradient step: the loss drops."""
    params = _f64(problem.init_params())
    _, full = problem.grads(params)
    new = lox.spectral_init_pairs(params, full, gamma=2.0)
    assert float(problem.loss(new)) < float(problem.loss(params))


def test_spectral_init_pairs_preserve_output(problem):
    params = _f64(problem.init_params())  # B = 0: the model output is that of W alone
    full = _full_grads(problem)
    pairs = functools.partial(lox.find_lora_pairs, scale=SCALE)
    new, deltas = lox.spectral_init_pairs(
        params, full, pairs=pairs, gamma=8.0, preserve_output=True
    )
    assert jax.tree.structure(deltas) == jax.tree.structure(full)
    _check_pair_inits(params, new, full, gamma=8.0, preserve=True, scale=SCALE, deltas=deltas)
    # The model with the corrected base weights computes the same function: the
    # problem's loss with the deltas as additive "probes" equals the original loss.
    np.testing.assert_allclose(
        float(problem.loss_with_probes(new, deltas)), float(problem.loss(params)), rtol=1e-12
    )
    # Explicit scale overrides the pairs' scale.
    _, deltas1 = lox.spectral_init_pairs(params, full, gamma=8.0, preserve_output=True, scale=1.0)
    np.testing.assert_allclose(deltas1["dense"], deltas["dense"] / SCALE, rtol=1e-12)


def test_spectral_init_pairs_matrix_form_and_randomized(problem):
    params = _f64(problem.init_params())
    full = _full_grads(problem)
    # Matrix form (*batch, m, n) of the multi-axis pair's gradient is accepted too.
    full_m = dict(full, einsum=full["einsum"].reshape(12, 10))
    new = lox.spectral_init_pairs(params, full_m)
    _check_pair_inits(params, new, full, gamma=128.0)
    rnd = lox.spectral_init_pairs(params, full, method="randomized", key=jax.random.key(1))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), rnd, new)


def test_spectral_init_pairs_errors(problem):
    params = _f64(problem.init_params())
    _, full = problem.grads(params)
    missing = {k: v for k, v in full.items() if k != "stacked"}
    with pytest.raises(ValueError, match="stacked"):
        lox.spectral_init_pairs(params, missing)
    bad = dict(full, dense=jnp.zeros((12, 16)))
    with pytest.raises(ValueError, match=r"\(16, 12\)"):
        lox.spectral_init_pairs(params, bad)
    with pytest.raises(ValueError, match="full-weight gradients"):
        lox.spectral_init_pairs(params, None)
    with pytest.raises(ValueError, match="key"):
        lox.spectral_init_pairs(params, full, method="randomized")
    with pytest.raises(ValueError, match="zero"):
        lox.spectral_init_pairs(params, dict(full, dense=jnp.zeros((16, 12))))


# ---------------------------------------------------------------------------------------
# lora_one (training optimizer)
# ---------------------------------------------------------------------------------------


def _sched(count):
    return 0.01 - 0.006 * count / STEPS


@pytest.mark.parametrize("bias_correction", [False, True])
def test_lora_one_matches_reference(problem, bias_correction):
    params = lox.spectral_init_pairs(_f64(problem.init_params()), _full_grads(problem), gamma=16.0)
    kw = dict(b1=0.85, b2=0.99, eps=1e-7, weight_decay=0.02, delta=1e-5)
    tx = lox.lora_one(_sched, bias_correction=bias_correction, **kw)
    lib = library_run(tx, problem, params, STEPS)

    def step(a, b, ga, gb, state, t):
        return ref.lora_one_step(
            a, b, ga, gb, state, float(_sched(t)), no_bias_correction=not bias_correction, **kw
        )

    want = reference_run(step, ref.pair_adamw_init, problem, params, STEPS)
    compare_histories(lib, want)
    # The bias (in no pair) gets the same Adam, without preconditioning.
    adam = (
        optax.scale_by_adam(0.85, 0.99, 1e-7)
        if bias_correction
        else lox.scale_by_adam_uncorrected(0.85, 0.99, 1e-7)
    )
    plain = optax.chain(adam, optax.add_decayed_weights(0.02), optax.scale_by_learning_rate(_sched))
    np.testing.assert_allclose(
        lib[-1]["bias"], library_run(plain, problem, params, STEPS)[-1]["bias"], rtol=1e-12
    )


def test_lora_one_bias_correction_equals_scaled_adamw(problem):
    params = _f64(problem.random_params())
    a = library_run(lox.lora_one(0.01, bias_correction=True), problem, params, 3)
    b = library_run(lox.scaled_adamw(0.01, weight_decay=0.0), problem, params, 3)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12), a[-1], b[-1])


def test_uncorrected_adam_first_step():
    """No bias correction: step 1 is (1−b1) g / (√(1−b2)|g| + ε)."""
    tx = lox.scale_by_adam_uncorrected(0.9, 0.999, 0.0)
    params = {"w": jnp.array([2.0, -3.0])}
    u, state = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(u["w"], 0.1 / math.sqrt(0.001) * np.sign([2.0, -3.0]), rtol=1e-5)
    assert isinstance(state, optax.ScaleByAdamState) and int(state.count) == 1


def test_lora_one_defaults_and_errors():
    import inspect

    sig = inspect.signature(lox.lora_one).parameters
    assert sig["bias_correction"].default is False
    assert sig["delta"].default == 1e-6 and sig["eps"].default == 1e-8
    assert sig["weight_decay"].default == 0.0
    with pytest.raises(ValueError, match="b2"):
        lox.lora_one(0.1, b2=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        lox.lora_one(-1.0)
