"""Jitted LoRA train steps (lora_optax.flax.train): full-weight grads, sharding, LoRA-One."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("qwix")

from flax import nnx

import lora_optax
from lora_optax import flax as lf
from lora_optax._src import linalg
from lora_optax.flax import train
from tests.flax_fixtures import (
    Tiny,
    copy_model,
    make_lora_model,
    regression_batch,
    regression_loss,
)


def test_full_grads_are_dl_dw_in_pair_layout():
    model = make_lora_model(b_std=0.5)
    pairs = lf.lora_pairs(model)
    plan = train.FullGradPlan.from_model(model)
    kv = next(e for e in plan.entries if e.pair.name == "layers/0/kv/kernel_lora_a")
    assert kv.perm == (1, 0, 2) and kv.kernel_path == ("layers", "0", "kv", "kernel")
    graphdef, state = nnx.split(model)

    @jax.jit
    def grads_fn(state, batch):
        m = nnx.merge(graphdef, state)
        _, _, grads, full = train._grads(m, regression_loss, batch, has_aux=False, plan=plan)
        return grads, full

    grads, full = grads_fn(state, regression_batch())
    g = lora_optax.LeafIndex(nnx.as_pure(grads.filter(nnx.LoRAParam)))
    p = lora_optax.LeafIndex(nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
    for pair in pairs:
        G = linalg.full_grad_matrix(pair, lora_optax.full_grad_for_pair(pair, full, p))
        A, B = linalg.a_matrix(pair, p[pair.a_path]), linalg.b_matrix(pair, p[pair.b_path])
        gA, gB = linalg.a_matrix(pair, g[pair.a_path]), linalg.b_matrix(pair, g[pair.b_path])
        np.testing.assert_allclose(pair.scale * G @ B.T, gA, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pair.scale * A.T @ G, gB, rtol=1e-4, atol=1e-5)
    # the tree layout is the library's: G at the pair's parent node
    assert full["layers"]["0"]["kv"].shape == (6, 2, 3)
    assert full["layers"]["1"]["q"].shape == (5, 6)


def _run(model, tx, steps, *, full_grads=False, jit=True, mesh=None, seed=0):
    traces = []

    def loss_fn(model, batch):
        traces.append(1)
        return regression_loss(model, batch)

    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    step = train.make_train_step(loss_fn, full_grads=full_grads, jit=jit, mesh=mesh)
    losses = [float(step(model, opt, regression_batch(seed + i))[0]) for i in range(steps)]
    step.traces = len(traces)
    return losses, step, opt


def test_adamw_step_trains_only_lora_and_compiles_once():
    model = make_lora_model()
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, train._FROZEN))
    losses, step, opt = _run(model, optax.adamw(3e-2), 6)
    assert losses[-1] < losses[0]
    assert int(opt.step[...]) == 6
    assert step.traces == 1
    assert step.cache["fn"]._cache_size() == 1  # compiled once, not once per commit state
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, train._FROZEN))
    jax.tree.map(np.testing.assert_array_equal, frozen_before, frozen_after)


def test_jit_matches_eager_with_full_grads():
    # nnx.Linear LoRA only, one plain-SGD step: eager dispatch is slow
    base = lf.apply_lora(Tiny(rngs=nnx.Rngs(0)), targets=["q"], rank=2, alpha=4.0)
    m1, m2 = copy_model(base), copy_model(base)
    l1, _, _ = _run(m1, optax.sgd(1e-1), 1, full_grads=True)
    l2, _, _ = _run(m2, optax.sgd(1e-1), 1, full_grads=True, jit=False)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(m1.layers[0].q.lora_a[...], m2.layers[0].q.lora_a[...], atol=1e-6)


def test_solora_trains_with_full_grads():
    model = make_lora_model(b_std=0.1)
    losses, step, _ = _run(
        model, lora_optax.solora_adamw(1e-2, pairs=lf.pair_spec(model)), 4, full_grads=True
    )
    assert losses[-1] < losses[0] and step.traces == 1


def test_sharded_data_and_model_parallel_matches_single_device():
    base = make_lora_model(b_std=0.1)
    ref = copy_model(base)
    l_ref, _, _ = _run(ref, lora_optax.scaled_adamw(1e-2, pairs=lf.pair_spec(ref)), 3)
    mesh = train.make_mesh({"data": 4, "model": 2})
    model = copy_model(base)
    train.shard_model(
        model,
        mesh,
        [
            (r".*/q/base_module/kernel", jax.P(None, "model")),
            (r".*/kv/kernel", jax.P("model", None, None)),
        ],
    )
    q_b = model.layers[0].q.lora_b[...]
    assert q_b.sharding.spec == jax.P(None, "model")
    assert model.layers[0].kv.kernel_lora_b[...].sharding.spec == jax.P(None, "model", None)
    losses, step, _ = _run(
        model, lora_optax.scaled_adamw(1e-2, pairs=lf.pair_spec(model)), 3, mesh=mesh
    )
    np.testing.assert_allclose(losses, l_ref, rtol=1e-4)
    assert model.layers[0].q.lora_b[...].sharding.spec == jax.P(None, "model")
    assert step.traces == 1
    np.testing.assert_allclose(
        model.layers[1].o.kernel_lora_a[...], ref.layers[1].o.kernel_lora_a[...], atol=1e-5
    )


def test_lora_one_init_preserving_output():
    model = make_lora_model()
    x, _ = regression_batch()
    y0 = model(x)
    batches = [regression_batch(i) for i in range(2)]
    full = train.average_full_grads(model, regression_loss, batches)
    train.lora_one_init(model, regression_loss, batches, gamma=16.0, preserve_output=True)
    np.testing.assert_allclose(model(x), y0, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(model.layers[0].kv.kernel_lora_b[...]).max()) > 0
    assert float(jnp.abs(model.layers[0].q.lora_b[...]).max()) > 0
    # the spectral init aligns B with the top right-singular space of -G
    G = full["layers"]["0"]["q"]
    _, _, vt = np.linalg.svd(np.asarray(G))
    b = np.asarray(model.layers[0].q.lora_b[...])
    proj = b @ vt[:2].T @ vt[:2]
    np.testing.assert_allclose(proj, b, atol=1e-4)
