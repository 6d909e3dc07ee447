"""Full-weight gradients through zero probes (``value_and_full_grads``, ``zero_probes``).

A small pure-JAX model with a 2-D LoRA layer, a stacked (scanned-style) LoRA layer and a
qwix-style multi-axis einsum LoRA layer: the probe gradients must equal the analytic
``G = ∂L/∂W`` at the effective weight, and the LoRA gradients must satisfy
``g_A = s G Bᵀ``, ``g_B = s Aᵀ G``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from tests.problems import factor_matrices

SCALES = {"l1": 2.0, "stack": 0.5, "l2": 1.5}


def _model():
    rng = np.random.default_rng(0)

    def n(*shape, s=0.3):
        return jnp.asarray(rng.normal(size=shape) * s)

    base = {"l1": n(6, 5), "stack": n(2, 5, 5), "l2": n(5, 2, 3)}
    params = {
        "l1": {"lora_a": n(6, 2), "lora_b": n(2, 5)},
        "stack": {"lora_a": n(2, 5, 2), "lora_b": n(2, 2, 5)},
        "l2": {"w_lora_a": n(5, 2), "w_lora_b": n(2, 2, 3)},
    }
    x, y = n(7, 6, s=1.0), n(7, 2, 3, s=1.0)
    return base, params, x, y


def _forward_weights(weights, x):
    h = jnp.tanh(x @ weights["l1"])
    for layer in range(2):
        h = jnp.tanh(h @ weights["stack"][layer])
    return jnp.einsum("bd,dnh->bnh", h, weights["l2"])


def _effective(base, params, probes):
    p = params
    return {
        "l1": base["l1"] + probes["l1"] + SCALES["l1"] * p["l1"]["lora_a"] @ p["l1"]["lora_b"],
        "stack": base["stack"]
        + probes["stack"]
        + SCALES["stack"] * jnp.einsum("lir,lro->lio", p["stack"]["lora_a"], p["stack"]["lora_b"]),
        "l2": base["l2"]
        + probes["l2"]
        + SCALES["l2"] * jnp.einsum("dr,rnh->dnh", p["l2"]["w_lora_a"], p["l2"]["w_lora_b"]),
    }


def _loss_w(weights, x, y):
    return jnp.mean((_forward_weights(weights, x) - y) ** 2)


def _loss_fn(base, params, probes, x, y):
    return _loss_w(_effective(base, params, probes), x, y)


def test_probe_gradients_are_full_gradients(x64):
    base, params, x, y = _model()
    f = lox.value_and_full_grads(functools.partial(_loss_fn, base))
    loss, (grads, full) = jax.jit(f)(params, x, y)

    zero = jax.tree.map(jnp.zeros_like, base)
    np.testing.assert_allclose(loss, _loss_fn(base, params, zero, x, y), rtol=1e-14)
    # Analytic G: the gradient w.r.t. the weights at the effective weight.
    w_eff = _effective(base, params, zero)
    want = jax.grad(_loss_w)(w_eff, x, y)
    assert set(full) == {"l1", "stack", "l2"}
    for name in full:
        assert full[name].shape == base[name].shape
        np.testing.assert_allclose(full[name], want[name], rtol=1e-12, atol=1e-15)

    # g_A = s G Bᵀ and g_B = s Aᵀ G, per stacked slice, on the matrix views.
    for pair in lox.find_lora_pairs(params):
        name = pair.a_path[0]
        s, k = SCALES[name], pair.batch_ndim
        a, b = params[name][pair.a_path[1]], params[name][pair.b_path[1]]
        ga, gb = grads[name][pair.a_path[1]], grads[name][pair.b_path[1]]
        m = int(np.prod(a.shape[k:-1]))
        g_full = np.asarray(full[name]).reshape(a.shape[:k] + (m, -1))
        g_slices = list(g_full) if k else [g_full]
        for am, bm, gam, gbm, g in zip(
            factor_matrices(a, k, "a"),
            factor_matrices(b, k, "b"),
            factor_matrices(ga, k, "a"),
            factor_matrices(gb, k, "b"),
            g_slices,
        ):
            np.testing.assert_allclose(gam, s * g @ bm.T, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(gbm, s * am.T @ g, rtol=1e-12, atol=1e-15)


def test_has_aux_and_probe_dtype():
    base, params, x, y = _model()
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)

    def loss_fn(params, probes, x, y):
        p32 = jax.tree.map(lambda v: v.astype(jnp.float32), params)
        pr32 = jax.tree.map(lambda v: v.astype(jnp.float32), probes)
        loss = _loss_fn(jax.tree.map(lambda v: v.astype(jnp.float32), base), p32, pr32, x, y)
        return loss, {"loss": loss}

    f = lox.value_and_full_grads(loss_fn, has_aux=True, probe_dtype=jnp.float32)
    (loss, aux), (grads, full) = jax.jit(f)(params, x.astype(jnp.float32), y.astype(jnp.float32))
    assert aux["loss"] == loss
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(full))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_zero_probes_layout():
    base, params, _, _ = _model()
    probes = lox.zero_probes(params)
    assert jax.tree.map(jnp.shape, probes) == jax.tree.map(jnp.shape, base)
    assert all(np.all(np.asarray(p) == 0) for p in jax.tree.leaves(probes))
    # Nested parents and sequence indices become nested string-keyed dicts.
    nested = {"layers": [{"attn": params["l1"]}, {"attn": params["l1"]}]}
    probes = lox.zero_probes(nested)
    assert set(probes["layers"]) == {"0", "1"}
    assert probes["layers"]["1"]["attn"].shape == (6, 5)
    # A single pair at the root: the bare array.
    assert lox.zero_probes(params["l1"]).shape == (6, 5)
    # Works on abstract shapes.
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    assert jax.tree.map(jnp.shape, lox.zero_probes(abstract)) == jax.tree.map(jnp.shape, base)


def test_zero_probes_errors():
    a, b = jnp.zeros((4, 2)), jnp.zeros((2, 3))
    shared = {"blk": {"q_lora_a": a, "q_lora_b": b, "k_lora_a": a, "k_lora_b": b}}
    with pytest.raises(ValueError, match="share the parent node blk"):
        lox.zero_probes(shared)
    nested = {"blk": {"lora_a": a, "lora_b": b, "inner": {"lora_a": a, "lora_b": b}}}
    with pytest.raises(ValueError, match="below"):
        lox.zero_probes(nested)


def test_end_to_end_with_solora(x64):
    base, params, x, y = _model()
    pairs = functools.partial(lox.find_lora_pairs, scale=lambda p: SCALES[p[0]])
    f = lox.value_and_full_grads(functools.partial(_loss_fn, base), pairs=pairs)
    tx = lox.solora_adamw(3e-2, pairs=pairs)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, (grads, full) = f(params, x, y)
        updates, state = tx.update(grads, state, params, full_grads=full)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses
