"""LoRA on nnx models (lora_optax.flax.lora): nnx.Linear wrappers and qwix einsum LoRA."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("qwix")

from flax import nnx

import lora_optax
from lora_optax import flax as lf
from tests.flax_fixtures import Tiny, example_input, make_lora_model


def test_scale_conventions():
    assert lf.lora_scale(16, 16, "alpha/r") == 1.0
    assert lf.lora_scale(4, 8, "alpha/r") == 2.0
    assert lf.lora_scale(4, 8, "alpha/sqrt(r)") == 4.0
    assert lf.lora_scale(4, 8, "1") == 1.0
    assert lf.lora_scale(4, None, "alpha/r") == 1.0
    assert lf.lora_scale(4, 8, 0.25) == 0.25
    with pytest.raises(ValueError, match="convention"):
        lf.lora_scale(4, 8, "alpha")


def test_targets_presets_match_whole_components():
    import re

    rx = re.compile(lf.resolve_targets("qkvo"))
    assert rx.fullmatch("layers/0/attention/query")
    assert rx.fullmatch("encoder/block/1/o")
    assert not rx.fullmatch("layers/0/foo")  # ends in "o" but is not "o"
    assert re.fullmatch(lf.resolve_targets(["q", "v"]), "a/b/v")


def test_apply_lora_structure_and_identity_at_init():
    base = Tiny(rngs=nnx.Rngs(0))
    x = example_input()
    y0 = base(x)
    model = lf.apply_lora(base, targets=r"(?:.*/)?(?:q|kv|o)", rank=2, alpha=4.0, model_inputs=(x,))
    np.testing.assert_array_equal(model(x), y0)
    block = model.layers[0]
    assert isinstance(block.q, lf.ScaledLoRA) and isinstance(block.q, nnx.LoRA)
    assert block.q.lora_a[...].shape == (5, 2) and block.q.lora_b[...].shape == (2, 6)
    assert block.kv.kernel_lora_a[...].shape == (6, 2)  # qwix: contracting axis D
    assert block.kv.kernel_lora_b[...].shape == (2, 2, 3)  # (r, N, H)
    assert block.o.kernel_lora_a[...].shape == (2, 3, 2)
    assert type(block.mlp) is nnx.Linear and type(model.head) is nnx.Linear
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_lora == 2 * (5 * 2 + 2 * 6 + 6 * 2 + 2 * 6 + 6 * 2 + 2 * 5)
    # kv/o need qwix, so the LoRA model is a clone and the nnx.Linear q was wrapped on
    # it: the caller's model is left as it was, not half-adapted
    assert type(base.layers[0].q) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(base, nnx.LoRAParam))
    np.testing.assert_array_equal(base(x), y0)


@pytest.mark.parametrize(
    "convention,expected", [("alpha/r", 2.0), ("alpha/sqrt(r)", 4.0 / math.sqrt(2)), ("1", 1.0)]
)
def test_scale_is_a_real_multiplier(convention, expected):
    model = make_lora_model(rank=2, alpha=4.0, scale=convention, b_std=0.3)
    x = example_input()
    block = model.layers[0]
    # nnx.Linear wrapper: out = base(x) + s·(x A) B
    a, b = block.q.lora_a[...], block.q.lora_b[...]
    got = block.q(x) - block.q.base_module(x)
    np.testing.assert_allclose(got, expected * (x @ a @ b), rtol=1e-5, atol=1e-5)
    assert block.q.scale == pytest.approx(expected)
    pairs = lf.lora_pairs(model)
    assert len(pairs) == 6
    assert all(p.scale == pytest.approx(expected) for p in pairs)


class OneEinsum(nnx.Module):
    def __init__(self, rngs):
        self.kv = nnx.Einsum("btd,ndh->btnh", (2, 5, 3), rngs=rngs)

    def __call__(self, x):
        return self.kv(x)


@pytest.mark.parametrize("convention,expected", [("alpha/r", 2.0), ("alpha/sqrt(r)", 2.0**1.5)])
def test_qwix_scale_is_a_real_multiplier(convention, expected):
    x = example_input()
    model = lf.apply_lora(
        OneEinsum(nnx.Rngs(0)),
        targets="kv",
        rank=2,
        alpha=4.0,
        scale=convention,
        model_inputs=(x,),
        b_initializer=nnx.initializers.normal(0.3),
    )
    w, a, b = (model.kv.kernel[...], model.kv.kernel_lora_a[...], model.kv.kernel_lora_b[...])
    want = jnp.einsum("btd,ndh->btnh", x, w) + expected * jnp.einsum("btd,dr,rnh->btnh", x, a, b)
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    assert model.kv.kernel_lora_scale == pytest.approx(expected)
    assert lf.lora_pairs(model)[0].scale == pytest.approx(expected)


def test_lora_pairs_and_pair_spec_on_both_tree_forms():
    model = make_lora_model(rank=2, alpha=8.0)
    pairs = lf.lora_pairs(model)
    names = [p.name for p in pairs]
    assert "layers/0/q/lora_a" in names and "layers/1/kv/kernel_lora_a" in names
    kv = next(p for p in pairs if p.name == "layers/0/kv/kernel_lora_a")
    assert (kv.in_ndim, kv.out_ndim, kv.scale) == (1, 2, 4.0)
    spec = lf.pair_spec(model)
    wrapped = nnx.state(model, nnx.LoRAParam)  # what nnx.Optimizer inits on
    pure = nnx.as_pure(wrapped)  # what it updates with
    assert [p.scale for p in spec(wrapped)] == [4.0] * 6
    assert tuple(spec(pure)) == pairs
    # the optimizer sees these scales
    tx = lora_optax.solora_sgd(0.1, pairs=spec)
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    assert opt.opt_state is not None
    # overrides
    assert {p.scale for p in lf.lora_pairs(pure, scale=0.5)} == {0.5}
    assert {p.scale for p in lf.lora_pairs(pure)} == {1.0}


def test_errors():
    with pytest.raises(ValueError, match="no module path matches"):
        lf.apply_lora(Tiny(rngs=nnx.Rngs(0)), targets="nothing_here", rank=2)
    with pytest.raises(ValueError, match="model_inputs"):
        lf.apply_lora(Tiny(rngs=nnx.Rngs(0)), targets=r".*/kv", rank=2)


def test_linear_only_needs_no_inputs_and_keeps_dtype():
    model = Tiny(rngs=nnx.Rngs(0))
    model = lf.apply_lora(model, targets=["q", "mlp"], rank=3, alpha=3.0)
    assert isinstance(model.layers[1].mlp, lf.ScaledLoRA)
    assert model.layers[1].mlp.lora_a[...].dtype == jnp.float32
    pairs = lf.lora_pairs(model)
    assert len(pairs) == 4 and {p.scale for p in pairs} == {1.0}
