"""The r×r numerics of ``lora_optax._src.linalg`` against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_optax as lox
from lora_optax._src import linalg


def _lower(rng, batch, n, cond_scale=1.0):
    l = np.tril(rng.normal(size=(*batch, n, n)))
    diag = np.abs(np.diagonal(l, axis1=-2, axis2=-1)) + cond_scale
    idx = np.arange(n)
    l[..., idx, idx] = diag
    return l


@pytest.mark.parametrize("n", [1, 5, 16, 17, 32, 33, 64, 100])
def test_tril_inverse_matches_numpy(n, x64):
    """Both routes (substitution up to 16, recursive 2×2 blocks above, with padding to
    a power-of-two multiple of 16) give ``L⁻¹`` to float64 precision, batched."""
    rng = np.random.default_rng(n)
    l = _lower(rng, (3, 2), n, cond_scale=float(np.sqrt(n)))
    got = np.asarray(linalg.tril_inverse(jnp.asarray(l)))
    want = np.linalg.inv(l)
    assert got.shape == l.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert np.all(np.triu(got, 1) == 0)  # exactly lower triangular


@pytest.mark.parametrize("n", [16, 48, 64])
def test_tril_inverse_float32_accuracy_and_upper_part_ignored(n):
    rng = np.random.default_rng(0)
    l = _lower(rng, (4,), n, cond_scale=float(np.sqrt(n)))
    noisy = l + np.triu(rng.normal(size=l.shape), 1)  # entries above the diagonal are not read
    got = np.asarray(linalg.tril_inverse(jnp.asarray(noisy, jnp.float32)), np.float64)
    want = np.linalg.inv(l)
    residual = np.abs(got @ l - np.eye(n)).max()
    assert residual < 1e-5, residual
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_solve_right_spd_matches_numpy(x64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 40, 24))
    m = np.swapaxes(x, -1, -2) @ x
    g = rng.normal(size=(2, 7, 24))
    got = np.asarray(linalg.solve_right_spd(jnp.asarray(g), jnp.asarray(m), 0.5))
    want = g @ np.linalg.inv(m + 0.5 * np.eye(24))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_gram_factor_pinv_drops_a_near_null_direction():
    """The Cholesky route is taken only when every pivot exceeds ``r·ε·tr K``: a Gram
    matrix with an eigenvalue of 2.5·ε (below r·ε·tr K = 3·ε·(2 + 2.5ε)) must take the
    pseudo-inverse route, which drops that direction (‖R⁺‖₂ = 1), instead of inverting
    it (‖R⁺‖₂ = 1/√(2.5ε) ≈ 1.8e3)."""
    eps = float(np.finfo(np.float32).eps)
    k = jnp.diag(jnp.asarray([1.0, 1.0, 2.5 * eps], jnp.float32))
    rinv = np.asarray(linalg.gram_factor_pinv(k), np.float64)
    assert np.linalg.norm(rinv, 2) <= 1.0 + 1e-6
    # the pseudo-inverse's cut is relative to the largest eigenvalue: the same at any scale
    scaled = np.asarray(linalg.gram_factor_pinv(1e4 * k), np.float64)
    assert np.linalg.norm(scaled, 2) <= 1e-2 + 1e-8
    # the threshold's r is the matrix size, also with several batch axes
    batched = np.asarray(linalg.gram_factor_pinv(jnp.broadcast_to(k, (2, 1, 3, 3))), np.float64)
    assert np.linalg.norm(batched, 2, axis=(-2, -1)).max() <= 1.0 + 1e-6
    # A well-conditioned K keeps every direction: R⁺ is a true inverse factor.
    k_ok = jnp.diag(jnp.asarray([1.0, 1.0, 0.25], jnp.float32))
    rinv_ok = np.asarray(linalg.gram_factor_pinv(k_ok), np.float64)
    np.testing.assert_allclose(
        rinv_ok.T @ np.diag([1.0, 1.0, 0.25]) @ rinv_ok, np.eye(3), atol=1e-6
    )


def test_gram_factor_pinv_routes_give_their_own_factor(x64):
    """A well-conditioned batch takes the Cholesky route, ``R⁺ = L⁻ᵀ`` (upper
    triangular); a batch with one rank-deficient matrix takes the pseudo-inverse route
    for every matrix, ``R⁺ = (K^½)⁺`` (symmetric). Both satisfy ``R⁺ᵀ K R⁺ = I`` on the
    range, so only the factor itself tells the routes apart."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 4))
    k = np.einsum("bmi,bmj->bij", x, x)
    chol = np.linalg.cholesky(k)
    got = np.asarray(linalg.gram_factor_pinv(jnp.asarray(k)))
    np.testing.assert_allclose(got, np.linalg.inv(np.swapaxes(chol, -1, -2)), rtol=1e-9, atol=1e-12)

    singular = k.copy()
    singular[1] = np.outer(x[1, 0], x[1, 0])  # rank 1
    got = np.asarray(linalg.gram_factor_pinv(jnp.asarray(singular)))
    lam, u = np.linalg.eigh(k[0])
    np.testing.assert_allclose(got[0], (u / np.sqrt(lam)) @ u.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got[1], got[1].T, atol=1e-10)


def test_matrix_views_keep_the_rank_axis_sharding_when_merging_gathers():
    """Under an explicit mesh, merging B's out axes (4, 2, 6) -> (4, 12) with the minor
    one sharded must gather the merged axis but keep the rank axis' sharding (and A's
    in-axes merge keeps the batch axes); only the merged axes become replicated."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    pair = lox.LoRAPair(("w", "a"), ("w", "b"), rank=4)
    with jax.set_mesh(mesh):
        b = jax.device_put(jnp.ones((4, 2, 6)), NamedSharding(mesh, P("data", None, "model")))
        b_m = linalg.b_matrix(pair, b)
        assert b_m.shape == (4, 12) and tuple(b_m.sharding.spec)[:1] == ("data",)
        stacked = lox.LoRAPair(("w", "a"), ("w", "b"), rank=4, batch_ndim=1)
        a = jax.device_put(jnp.ones((4, 3, 2, 4)), NamedSharding(mesh, P("data", None, "model")))
        a_m = linalg.a_matrix(stacked, a)
        assert a_m.shape == (4, 6, 4) and tuple(a_m.sharding.spec)[:1] == ("data",)
        np.testing.assert_array_equal(np.asarray(b_m), 1.0)


def test_full_grad_matrix_takes_kernel_and_matrix_forms():
    """A multi-axis pair (A (2, 3, r), B (r, 5, 4)): kernel form (2, 3, 5, 4) and matrix
    form (6, 20) give the same (6, 20) view; stacked (batch 1) likewise."""
    rng = np.random.default_rng(0)
    pair = lox.make_pair(("w", "a"), ("w", "b"), (2, 3, 4), (4, 5, 4))
    kernel = jnp.asarray(rng.normal(size=(2, 3, 5, 4)))
    matrix = kernel.reshape(6, 20)
    np.testing.assert_array_equal(linalg.full_grad_matrix(pair, kernel), matrix)
    np.testing.assert_array_equal(linalg.full_grad_matrix(pair, matrix), matrix)
    stacked = lox.make_pair(("w", "a"), ("w", "b"), (7, 2, 3, 4), (7, 4, 5, 4), batch_ndim=1)
    kernel = jnp.asarray(rng.normal(size=(7, 2, 3, 5, 4)))
    matrix = kernel.reshape(7, 6, 20)
    np.testing.assert_array_equal(linalg.full_grad_matrix(stacked, kernel), matrix)
    np.testing.assert_array_equal(linalg.full_grad_matrix(stacked, matrix), matrix)
