"""The pair-transformation kit (lora_optax._src.pairwise) every method is built on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from lora_optax._src import linalg, pairwise


def _tree(seed: int = 0, dtype=jnp.float32) -> dict:
    """Three same-shape pairs (one group), a stacked pair, a multi-axis pair, a bias."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    tree = {f"l{i}": {"lora_a": arr(12, 3), "lora_b": arr(3, 10)} for i in range(3)}
    tree["stacked"] = {"lora_a": arr(2, 8, 3), "lora_b": arr(2, 3, 6)}
    tree["einsum"] = {"w_lora_a": arr(2, 4, 3), "w_lora_b": arr(3, 9)}
    tree["bias"] = arr(5)
    return tree


def test_group_pairs_groups_same_shape_pairs_in_order():
    tree = _tree()
    pairs = lox.find_lora_pairs(tree)
    groups = pairwise.group_pairs(pairs, tree)
    assert [[p.name for p in g] for g in groups] == [
        ["einsum/w_lora_a"],
        ["l0/lora_a", "l1/lora_a", "l2/lora_a"],
        ["stacked/lora_a"],
    ]
    assert [len(g) for g in pairwise.group_pairs(pairs, tree, stack=False)] == [1] * 5
    stacked, unstack = groups[1].stack(lox.LeafIndex(tree), "b")
    assert stacked.shape == (3, 3, 10)
    for part, pair in zip(unstack(stacked), groups[1]):
        np.testing.assert_array_equal(part, tree[pair.a_path[0]]["lora_b"])


def test_map_pairs_stacked_equals_per_pair():
    """Per-pair math run once per stacked group gives the per-pair results."""
    params, grads = _tree(0), _tree(1)
    inputs = pairwise.resolve_update(None, grads, params, "test")

    def fn(pair, m):
        return linalg.riemannian_precondition(m, 1e-6)

    per_pair = pairwise.map_pairs(fn, inputs)
    stacked = pairwise.map_pairs(fn, inputs, stack=True)
    assert per_pair.keys() == stacked.keys() == pairwise.factor_paths(inputs.pairs)
    for path, x in per_pair.items():
        assert x.shape == stacked[path].shape and x.dtype == stacked[path].dtype
        np.testing.assert_allclose(x, stacked[path], rtol=1e-5, atol=1e-6)


def test_resolve_update_names_the_offending_path():
    params, grads = _tree(0), _tree(1)
    with pytest.raises(ValueError, match="params"):
        pairwise.resolve_update(None, grads, None, "test")
    grads["bias"] = jnp.zeros(4)
    with pytest.raises(ValueError, match="bias"):
        pairwise.resolve_update(None, grads, params, "test")
    inputs = pairwise.resolve_update(None, _tree(1), None, "test", needs_params=False)
    assert inputs.params is None and len(inputs.pairs) == 5


def test_pair_state_tree_masks_every_other_node():
    tree = _tree()
    values = {("l0", "lora_a"): jnp.zeros(12), ("l0", "lora_b"): jnp.zeros(10)}
    state = pairwise.pair_state_tree(tree, values)
    assert state["l0"]["lora_a"].shape == (12,)
    assert isinstance(state["bias"], optax.MaskedNode)
    assert isinstance(state["l1"]["lora_b"], optax.MaskedNode)
    assert len(jax.tree.leaves(state)) == 2


def test_lora_optimizer_partitions_pairs_and_other_leaves():
    params, grads = _tree(0), _tree(1)
    tx = pairwise.lora_optimizer(optax.sgd(1.0), optax.sgd(0.5), pairs=None, what="test")
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["l2"]["lora_b"], -grads["l2"]["lora_b"])
    np.testing.assert_allclose(updates["bias"], -0.5 * grads["bias"])
    assert set(state.inner_states) == {"lora", "other"}
    with pytest.raises(ValueError, match="LoRA"):
        tx.init({"kernel": jnp.ones((4, 4))})


nnx = pytest.importorskip("flax.nnx")


@pytest.mark.parametrize("name", [n for n, s in lox.OPTIMIZERS.items() if s.lora])
def test_nnx_state_matches_its_partition_spec_tree(name):
    """What a tunix PeftTrainer restore does: ``nnx.get_named_sharding`` of the
    optimizer state must have the state's structure (no variable wrapping a MaskedNode,
    no variable metadata on an array of another shape)."""
    from tests.flax_fixtures import make_lora_model

    model = make_lora_model()
    opt = nnx.Optimizer(model, lox.get_optimizer(name, 1e-3), wrt=nnx.LoRAParam)
    state = nnx.state(opt, nnx.optimizer.OptState)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    shardings = nnx.get_named_sharding(state, mesh)
    jax.tree.map(lambda x, s: None, state, shardings)  # raises on a structure mismatch
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert len(s.spec) <= np.ndim(x)
