"""Pair discovery, pair specs, composition with optax wrappers, and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_optax as lox
from lora_optax._src.pairs import infer_geometry


def _z(*shape):
    return jnp.zeros(shape)


def test_flax_style_names():
    tree = {"layer": {"kernel": _z(8, 6), "lora_a": _z(8, 2), "lora_b": _z(2, 6)}}
    (pair,) = lox.find_lora_pairs(tree)
    assert pair.a_path == ("layer", "lora_a") and pair.b_path == ("layer", "lora_b")
    assert (pair.rank, pair.batch_ndim, pair.in_ndim, pair.out_ndim) == (2, 0, 1, 1)


def test_qwix_multi_axis_names():
    tree = {
        "attn": {
            "q_einsum": {"w": _z(16, 4, 8), "w_lora_a": _z(16, 3), "w_lora_b": _z(3, 4, 8)},
            "o_einsum": {"w": _z(4, 8, 16), "w_lora_a": _z(4, 8, 3), "w_lora_b": _z(3, 16)},
        }
    }
    pairs = {p.a_path[-2]: p for p in lox.find_lora_pairs(tree)}
    assert (pairs["q_einsum"].in_ndim, pairs["q_einsum"].out_ndim) == (1, 2)
    assert (pairs["o_einsum"].in_ndim, pairs["o_einsum"].out_ndim) == (2, 1)
    assert pairs["q_einsum"].b_path == ("attn", "q_einsum", "w_lora_b")


def test_gemma_peft_names():
    tree = {"block": {"attn": {"lora": {"a": _z(32, 4), "b": _z(4, 2, 16)}, "w": _z(32, 2, 16)}}}
    (pair,) = lox.find_lora_pairs(tree)
    assert pair.a_path == ("block", "attn", "lora", "a")
    assert (pair.rank, pair.out_ndim) == (4, 2)


def test_stacked_layers_and_rank_equal_to_layer_count():
    # L == r == 4: the shared leading axis is read as the batch (stacked layers) axis.
    tree = {"layers": {"lora_a": _z(4, 16, 4), "lora_b": _z(4, 4, 12)}}
    (pair,) = lox.find_lora_pairs(tree)
    assert (pair.batch_ndim, pair.rank, pair.in_ndim) == (1, 4, 1)
    # The explicit override reads the same shapes as one unstacked multi-axis pair.
    (flat,) = lox.find_lora_pairs(tree, batch_ndim=0)
    assert (flat.batch_ndim, flat.in_ndim, flat.out_ndim) == (0, 2, 2)
    (by_path,) = lox.find_lora_pairs(tree, batch_ndim={"layers/lora_a": 0})
    assert by_path.batch_ndim == 0


def test_lists_and_scale_option():
    tree = {"layers": [{"lora_a": _z(8, 2), "lora_b": _z(2, 8)} for _ in range(2)]}
    pairs = lox.find_lora_pairs(tree, scale={"layers/1/.*": 0.5})
    assert [p.a_path for p in pairs] == [("layers", "0", "lora_a"), ("layers", "1", "lora_a")]
    assert [p.scale for p in pairs] == [1.0, 0.5]
    assert [p.scale for p in lox.find_lora_pairs(tree, scale=lambda p: 2.0)] == [2.0, 2.0]


def test_shape_dtype_struct_leaves_and_eval_shape():
    tree = {
        "l": {
            "lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32),
            "lora_b": jax.ShapeDtypeStruct((2, 4), jnp.float32),
        }
    }
    assert len(lox.find_lora_pairs(tree)) == 1
    for tx in (lox.scaled_adamw(1e-3), lox.scaled_sgd(1e-3), lox.lora_plus(1e-3)):
        abstract = jax.eval_shape(tx.init, tree)
        concrete = tx.init(tree)
        assert jax.tree.structure(abstract) == jax.tree.structure(concrete)


def test_flax_nnx_state_and_variables():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.q = nnx.LoRALinear(8, 6, lora_rank=2, rngs=rngs)
            self.adapter = nnx.LoRA(8, 3, 6, rngs=rngs)

    model = Model(nnx.Rngs(0))
    state = nnx.state(model, nnx.LoRAParam)
    pairs = lox.find_lora_pairs(state)
    assert [p.rank for p in pairs] == [3, 2]
    assert len(lox.find_lora_pairs(nnx.pure(state))) == 2
    # The whole model state (with the frozen kernels) finds the same pairs.
    assert len(lox.find_lora_pairs(nnx.state(model))) == 2

    optimizer = nnx.Optimizer(model, lox.scaled_adamw(1e-2), wrt=nnx.LoRAParam)

    def loss(m):
        x = jnp.ones((2, 8))
        return jnp.sum(m.q(x) ** 2) + jnp.sum(m.adapter(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    before = loss(model)
    optimizer.update(model, grads)
    assert loss(model) < before


def test_user_spec_list_callable_and_label_tree():
    tree = {"x": {"down": _z(8, 2), "up": _z(2, 6)}, "bias": _z(6)}
    labels = {"x": {"down": "a", "up": "b"}, "bias": None}
    explicit = [lox.LoRAPair(("x", "down"), ("x", "up"), rank=2)]
    grads = jax.tree.map(jnp.ones_like, tree)
    params = jax.tree.map(lambda x: x + 1.0, tree)
    outs = []
    for spec in (explicit, lambda t: explicit, labels):
        tx = lox.scale_by_riemannian_preconditioner(pairs=spec)
        out, _ = tx.update(grads, tx.init(params), params)
        outs.append(out)
    for out in outs[1:]:
        jax.tree.map(np.testing.assert_array_equal, out, outs[0])
    assert not np.allclose(outs[0]["x"]["down"], 1.0)  # preconditioned
    with pytest.raises(ValueError, match="no LoRA"):
        lox.scale_by_riemannian_preconditioner().init(tree)


def test_pair_spec_path_strings():
    pair = lox.LoRAPair("x/down", "x/up", rank=2)
    assert pair.a_path == ("x", "down")
    with pytest.raises(ValueError, match="not in the tree"):
        lox.resolve_pairs([lox.LoRAPair("x/nope", "x/up", rank=2)], {"x": {"up": _z(2, 6)}})


def test_masked_and_partition():
    tree = {
        "lora": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 6))},
        "head": {"kernel": jnp.ones((6, 3))},
    }
    grads = jax.tree.map(jnp.ones_like, tree)
    labels = lox.label_tree(tree)
    assert labels["lora"] == {"lora_a": "lora_a", "lora_b": "lora_b"}
    assert labels["head"]["kernel"] == "other"
    lora_tx = lox.scaled_adamw(1e-2)
    tx = optax.partition(
        {"lora": lora_tx, "other": optax.sgd(1.0)},
        jax.tree.map(lambda lbl: "lora" if lbl.startswith("lora") else lbl, labels),
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0)
    ref, _ = lora_tx.update(
        {"lora": grads["lora"]}, lora_tx.init({"lora": tree["lora"]}), {"lora": tree["lora"]}
    )
    np.testing.assert_allclose(updates["lora"]["lora_a"], ref["lora"]["lora_a"])

    mask = {"lora": {"lora_a": True, "lora_b": True}, "head": {"kernel": False}}
    masked = optax.masked(lox.scaled_sgd(0.1), mask)
    upd, _ = masked.update(grads, masked.init(tree), tree)
    np.testing.assert_array_equal(upd["head"]["kernel"], 1.0)  # passed through

    # Splitting a pair across partitions is a clear error, not a silent wrong answer.
    bad = optax.masked(
        lox.scaled_sgd(0.1), {"lora": {"lora_a": True, "lora_b": False}, "head": {"kernel": False}}
    )
    with pytest.raises(ValueError, match="has no B partner"):
        bad.init(tree)


# --------------------------------------------------------------------------- errors


def test_unpaired_leaf_error_names_path_and_shape():
    tree = {"blk": {"lora_a": _z(8, 2)}, "other": {"lora_b": _z(2, 8)}}
    with pytest.raises(ValueError, match=r"blk/lora_a \(shape \(8, 2\)\) has no B partner"):
        lox.find_lora_pairs(tree)


def test_rank_mismatch_error():
    with pytest.raises(ValueError, match=r"ranks disagree for pair blk/lora_a"):
        lox.find_lora_pairs({"blk": {"lora_a": _z(8, 4), "lora_b": _z(2, 8)}})


def test_transposed_orientation_error():
    # PEFT/PyTorch layout: lora_A (r, in), lora_B (out, r).
    with pytest.raises(ValueError, match="look transposed"):
        lox.find_lora_pairs({"blk": {"lora_A": _z(2, 8), "lora_B": _z(8, 2)}})


def test_no_pairs_error_for_lora_only_transformations():
    tree = {"kernel": jnp.ones((4, 4))}
    for make in (lox.scaled_sgd, lox.scaled_adamw, lox.lora_plus):
        with pytest.raises(ValueError, match="found no LoRA"):
            make(0.1).init(tree)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="b1"):
        lox.scaled_adamw(1e-3, b1=1.0)
    with pytest.raises(ValueError, match="b2"):
        lox.lora_plus(1e-3, b2=-0.1)
    with pytest.raises(ValueError, match="delta"):
        lox.scaled_sgd(1e-3, delta=-1.0)
    with pytest.raises(ValueError, match="ratio"):
        lox.lora_plus(1e-3, ratio=0.0)
    with pytest.raises(TypeError, match="learning_rate"):
        lox.scaled_sgd("fast")  # type: ignore[arg-type]


def test_invalid_pair_fields():
    with pytest.raises(ValueError, match="rank"):
        lox.LoRAPair(("a",), ("b",), rank=0)


# ---------------------------------------------------------------------- properties


@st.composite
def pair_shapes(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    rank = draw(st.integers(1, 6))
    in_axes = tuple(draw(st.lists(st.integers(rank + 1, 9), min_size=1, max_size=3)))
    out_axes = tuple(draw(st.lists(st.integers(rank + 1, 9), min_size=1, max_size=3)))
    return batch, rank, in_axes, out_axes


@given(pair_shapes())
def test_discovery_recovers_geometry(shapes):
    batch, rank, in_axes, out_axes = shapes
    a_shape = batch + in_axes + (rank,)
    b_shape = batch + (rank,) + out_axes
    tree = {
        "m": {
            "w_lora_a": jax.ShapeDtypeStruct(a_shape, jnp.float32),
            "w_lora_b": jax.ShapeDtypeStruct(b_shape, jnp.float32),
        }
    }
    (pair,) = lox.find_lora_pairs(tree, batch_ndim=len(batch))
    assert (pair.rank, pair.batch_ndim, pair.in_ndim, pair.out_ndim) == (
        rank,
        len(batch),
        len(in_axes),
        len(out_axes),
    )
    # Without the override, the reading is always a valid one that fits the shapes.
    (auto,) = lox.find_lora_pairs(tree)
    assert auto.a_shape_ok(a_shape) and auto.b_shape_ok(b_shape)
    assert auto.batch_ndim >= len(batch)


@given(pair_shapes(), st.sampled_from(["sgd", "adamw", "plus"]))
def test_updates_have_param_shapes(shapes, which):
    batch, rank, in_axes, out_axes = shapes
    rng = np.random.default_rng(0)
    params = {
        "lora_a": jnp.asarray(rng.normal(size=batch + in_axes + (rank,)), jnp.float32),
        "lora_b": jnp.asarray(rng.normal(size=batch + (rank,) + out_axes), jnp.float32),
    }
    make = {"sgd": lox.scaled_sgd, "adamw": lox.scaled_adamw, "plus": lox.lora_plus}[which]
    pairs = functools.partial(lox.find_lora_pairs, batch_ndim=len(batch))
    tx = make(0.1, pairs=pairs)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    for k in params:
        assert updates[k].shape == params[k].shape
        assert np.all(np.isfinite(updates[k]))


@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 8))
def test_geometry_rejects_rank_above_dims(rank, m, n):
    a_shape, b_shape = (m, rank), (rank, n)
    if rank <= m and rank <= n:
        assert infer_geometry(a_shape, b_shape)[0] == rank
    else:
        with pytest.raises(ValueError, match="orientation"):
            infer_geometry(a_shape, b_shape)


def test_explicit_pairs_address_variable_wrapped_and_pure_trees():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    pairs = [lox.LoRAPair(("lora", "lora_a"), ("lora", "lora_b"), rank=2, scale=0.5)]
    optimizer = nnx.Optimizer(model, lox.scaled_adamw(1e-2, pairs=pairs), wrt=nnx.LoRAParam)
    grads = nnx.grad(
        lambda m: jnp.sum(m(jnp.ones((2, 8))) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(model)
    optimizer.update(model, grads)
    wrapped = lox.resolve_pairs(pairs, nnx.state(model, nnx.LoRAParam))
    assert wrapped[0].a_path == ("lora", "lora_a", "value") and wrapped[0].scale == 0.5


def test_pair_parent_is_the_longest_common_prefix():
    from lora_optax._src.pairs import pair_parent

    def parent(a, b):
        return pair_parent(lox.LoRAPair(a, b, rank=2))

    assert parent(("m", "attn", "a"), ("m", "attn", "b")) == ("m", "attn")
    # the prefix ends at the first differing key, whatever their order or what follows
    assert parent(("m", "z", "q", "a"), ("m", "b", "q", "b")) == ("m",)
    assert parent(("x", "y", "z", "a", "k"), ("x", "w", "z", "b", "k")) == ("x",)
    assert parent(("a",), ("b",)) == ()


def test_batch_axes_must_agree_both_ways():
    """Leading axes are batch axes only if they are equal in A and B (either larger)."""
    for a, b in (((3, 8, 4), (2, 4, 10)), ((2, 8, 4), (3, 4, 10))):
        with pytest.raises(ValueError):
            infer_geometry(a, b, batch_ndim=1)
    assert infer_geometry((3, 8, 4), (3, 4, 10), batch_ndim=1) == (4, 1, 1, 1)


def test_label_tree_needs_both_factors_of_a_node():
    tree = {"x": {"down": _z(8, 2), "up": _z(2, 6)}, "y": {"down": _z(8, 2), "up": _z(2, 6)}}
    for labels in (
        {"x": {"down": "a", "up": "b"}, "y": {"down": "a", "up": None}},  # no 'b'
        {"x": {"down": "a", "up": "b"}, "y": {"down": None, "up": "b"}},  # no 'a'
        {"x": {"down": "a", "up": "a"}, "y": {"down": "a", "up": "b"}},  # two 'a'
    ):
        with pytest.raises(ValueError, match=r"exactly one 'a' and one 'b'"):
            lox.resolve_pairs(labels, tree)


def test_tree_mismatch_errors_name_each_side():
    from lora_optax._src.pairs import check_tree_match

    params = {"w": _z(4, 3)}
    with pytest.raises(ValueError, match=r"grads at w has shape \(4, 2\) but weights has shape"):
        check_tree_match({"w": _z(4, 2)}, params, names=("grads", "weights"))
    with pytest.raises(ValueError, match=r"grads has a leaf at v that weights lacks"):
        check_tree_match({"w": _z(4, 3), "v": _z(2)}, params, names=("grads", "weights"))
    with pytest.raises(ValueError, match=r"weights has a leaf at w that grads lacks"):
        check_tree_match({}, params, names=("grads", "weights"))


def test_no_public_parameter_is_positional_only():
    """Every argument of the public functions can be passed by name (a ``/`` where a
    ``*`` belongs would also make the keyword-only options positional)."""
    import inspect

    for name in lox.__all__:
        obj = getattr(lox, name)
        if not inspect.isfunction(obj):
            continue
        kinds = {p.name: p.kind for p in inspect.signature(obj).parameters.values()}
        assert inspect.Parameter.POSITIONAL_ONLY not in kinds.values(), (name, kinds)
    what = inspect.signature(lox.full_grad_for_pair).parameters["what"]
    assert what.kind is inspect.Parameter.KEYWORD_ONLY


def test_pair_parent_of_factors_differing_at_the_root():
    from lora_optax._src.pairs import pair_parent

    pair = lox.LoRAPair(("p", "q", "a"), ("r", "q", "b"), rank=2)
    assert pair_parent(pair) == ()  # the common "q" after a difference is no prefix


def test_per_pair_options_match_exact_paths_before_patterns():
    """A mapping key is an exact path (a tuple or a path string, regex metacharacters
    and all) or else a regular expression over the path string."""
    tree = {
        "q+k": {"lora_a": _z(8, 2), "lora_b": _z(2, 8)},
        "v": {"lora_a": _z(8, 2), "lora_b": _z(2, 8)},
        "o": {"lora_a": _z(8, 2), "lora_b": _z(2, 8)},
    }
    scale = {"q+k/lora_a": 2.0, ("v", "lora_a"): 3.0, "o/.*": 4.0}
    got = {p.name: p.scale for p in lox.find_lora_pairs(tree, scale=scale)}
    assert got == {"q+k/lora_a": 2.0, "v/lora_a": 3.0, "o/lora_a": 4.0}


def test_one_dimensional_factor_errors():
    # A's last axis is its rank; a B without an axis of that size is a rank mismatch
    with pytest.raises(ValueError, match="ranks disagree"):
        lox.make_pair(("blk", "lora_a"), ("blk", "lora_b"), (3,), (4, 5))
    # a 1-D A is no transposed PEFT pair: no hint about the PEFT layout
    with pytest.raises(ValueError, match="Cannot decide the orientation") as err:
        lox.make_pair(("blk", "lora_a"), ("blk", "lora_b"), (4,), (2, 4))
    assert "transposed" not in str(err.value)


def test_tree_mismatch_error_counts_the_other_missing_leaves():
    from lora_optax._src.pairs import check_tree_match

    params = {"w": _z(4, 3)}
    extra = {"w": _z(4, 3), "u": _z(2), "v": _z(2), "x": _z(2)}
    with pytest.raises(ValueError, match=r"leaf at u \(and 2 more\) that weights lacks"):
        check_tree_match(extra, params, names=("grads", "weights"))
