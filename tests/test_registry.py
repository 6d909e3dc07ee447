"""The optimizer registry, lora_optax.OPTIMIZERS: complete, consistent, and what it says."""

from __future__ import annotations

import inspect
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from tests.optimizer_cases import CASES, SETTINGS, find_state
from tests.problems import FactorizationProblem

# Public names that build a transformation but are not optimizers: optax's naming
# convention for building blocks (scale_by_*, scale_*, add_*), and deprecated aliases.
BUILDING_BLOCK_PREFIXES = ("scale_by_", "scale_", "add_")
DEPRECATED = {"lora_pro": "lora_pro_adamw"}
NOT_OPTIMIZERS = {"get_optimizer"}  # the registry's own accessor


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


def _returns_transformation(fn) -> bool:
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # an unresolvable annotation: judge by the text
        text = str(inspect.signature(fn).return_annotation)
        return text.endswith(("GradientTransformation", "GradientTransformationExtraArgs"))
    return inspect.isclass(ret) and issubclass(ret, optax.GradientTransformation)


def _public_optimizer_factories() -> list[str]:
    names = []
    for name in lox.__all__:
        obj = getattr(lox, name)
        if not inspect.isfunction(obj) or name.startswith(BUILDING_BLOCK_PREFIXES):
            continue
        if name not in DEPRECATED and name not in NOT_OPTIMIZERS and _returns_transformation(obj):
            names.append(name)
    return names


def test_every_public_optimizer_factory_is_registered():
    factories = _public_optimizer_factories()
    assert len(factories) >= 11, factories  # the enumeration itself works
    registered = {spec.factory for spec in lox.OPTIMIZERS.values()}
    missing = [n for n in factories if getattr(lox, n) not in registered]
    assert not missing, (
        f"public optimizer factories not in lora_optax.OPTIMIZERS: {missing}; add an "
        "OptimizerSpec to lora_optax/_src/registry.py (and a row to tests/optimizer_cases.py)."
    )


def test_registry_entries_are_consistent():
    for name, spec in lox.OPTIMIZERS.items():
        assert spec.name == name
        assert spec.label and spec.paper
        assert spec.base in ("adamw", "sgd", "lamb")
        assert spec.reference == "" or spec.reference.startswith("https://")
        assert "learning_rate" not in spec.defaults
        first = next(iter(inspect.signature(spec.factory).parameters))
        assert first == "learning_rate", name
        if spec.lora:
            assert spec.factory is getattr(lox, name)  # the library's own alias
            pairs = inspect.signature(spec.factory).parameters["pairs"]
            assert pairs.kind == inspect.Parameter.KEYWORD_ONLY
        else:
            assert spec.factory is getattr(optax, name)
    assert {"adamw", "lamb", "sgd"} <= set(lox.OPTIMIZERS)
    assert lox.OPTIMIZERS["lora_one"].initializer is lox.spectral_init_pairs
    with pytest.raises(TypeError):
        lox.OPTIMIZERS["adamw"] = lox.OPTIMIZERS["sgd"]  # type: ignore[index]


def test_common_table_covers_every_lora_optimizer():
    lora = [n for n, spec in lox.OPTIMIZERS.items() if spec.lora]
    assert sorted(SETTINGS) == sorted(lora), "tests/optimizer_cases.py SETTINGS"
    assert [c.name for c in CASES] == lora
    for case in CASES:
        assert case.needs_full_grads == lox.OPTIMIZERS[case.name].needs_full_grads


SHARED_WITH_ADAMW = ("b1", "b2", "eps", "eps_root", "mu_dtype", "weight_decay", "mask")


@pytest.mark.parametrize("name", [n for n, s in lox.OPTIMIZERS.items() if s.lora])
def test_signature_follows_optax(name):
    """learning_rate first, then the hyperparameters shared with optax.adamw that the
    method has (positional-or-keyword, in adamw's order), then keyword-only ones."""
    params = list(inspect.signature(lox.OPTIMIZERS[name].factory).parameters.values())
    assert params[0].name == "learning_rate"
    positional = [p.name for p in params[1:] if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == [n for n in SHARED_WITH_ADAMW if n in positional]
    keyword_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    assert not set(keyword_only) & set(SHARED_WITH_ADAMW)
    assert len(positional) + len(keyword_only) + 1 == len(params)


@pytest.mark.parametrize("name", list(lox.OPTIMIZERS))
def test_needs_full_grads_is_what_update_needs(name, problem):
    params = problem.random_params()
    grads, full = problem.grads(params)
    tx = lox.get_optimizer(name, 1e-2)
    state = tx.init(params)
    shapes = jax.eval_shape(lambda: tx.update(grads, state, params, full_grads=full))
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(grads)
    if lox.OPTIMIZERS[name].needs_full_grads:
        with pytest.raises(ValueError, match="full_grads"):
            jax.eval_shape(lambda: tx.update(grads, state, params))
    else:
        jax.eval_shape(lambda: tx.update(grads, state, params))


def _base_optimizer(spec: lox.OptimizerSpec, lr: float) -> optax.GradientTransformation:
    """The optax optimizer the registry says leaves outside pairs get (default settings)."""
    d = spec.defaults
    if spec.base == "sgd":
        return optax.sgd(lr)
    return optax.adamw(
        lr,
        b1=d.get("b1", d.get("momentum")),
        b2=d.get("b2", d.get("beta")),
        eps=d["eps"],
        eps_root=d.get("eps_root", 0.0),
        weight_decay=d["weight_decay"],
    )


@pytest.mark.parametrize("name", [n for n, s in lox.OPTIMIZERS.items() if s.lora])
def test_leaves_outside_pairs_get_the_base_optimizer(name, problem):
    """The one policy: every alias gives a leaf outside any pair its base optimizer."""
    spec = lox.OPTIMIZERS[name]
    lr = 1e-2
    # LoRA-One's base is AdamW without bias correction unless asked for it.
    extra = {"bias_correction": True} if "bias_correction" in spec.defaults else {}
    tx = lox.get_optimizer(name, lr, **extra)
    base = _base_optimizer(spec, lr)
    params = problem.random_params()
    state, base_state = tx.init(params), base.init(params["bias"])
    update = jax.jit(lambda g, s, p, f: tx.update(g, s, p, full_grads=f))
    for _ in range(3):
        grads, full = problem.grads(params)
        updates, state = update(grads, state, params, full)
        want, base_state = base.update(grads["bias"], base_state, params["bias"])
        np.testing.assert_allclose(updates["bias"], want, rtol=1e-6, atol=1e-8)
        params = optax.apply_updates(params, updates)
    # optax.partition's layout: the factors in "lora", every other leaf in "other".
    assert isinstance(state.inner_states["lora"], optax.MaskedState)
    other = state.inner_states["other"].inner_state
    if spec.base == "sgd":
        assert jax.tree.leaves(other) == []  # plain SGD keeps no state
    else:
        adam = find_state(other, optax.ScaleByAdamState)
        assert adam.mu["bias"].shape == params["bias"].shape
        assert isinstance(adam.mu["dense"]["lora_a"], optax.MaskedNode)


def test_get_optimizer_is_the_factory(problem):
    params = problem.random_params()
    grads, _ = problem.grads(params)
    a = lox.get_optimizer("lora_rite", 1e-2, weight_decay=0.1, skip_threshold=0.0)
    b = lox.lora_rite(1e-2, weight_decay=0.1, skip_threshold=0.0)
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    tx = lox.get_optimizer("adamw", 1e-3, b1=0.8)
    assert isinstance(tx, optax.GradientTransformation)


def test_lora_pro_is_a_deprecated_alias(problem):
    params = problem.random_params()
    grads, _ = problem.grads(params)
    with pytest.warns(DeprecationWarning, match="lora_pro_adamw"):
        old = lox.lora_pro(1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = lox.lora_pro_adamw(1e-2, weight_decay=0.1)
    u_old, _ = old.update(grads, old.init(params), params)
    u_new, _ = new.update(grads, new.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u_old, u_new)
    assert inspect.signature(lox.lora_pro) == inspect.signature(lox.lora_pro_adamw)


def test_spectral_init_returns_a_named_tuple():
    g = jnp.arange(12.0).reshape(4, 3) - 5.0
    plain = lox.spectral_init(g, 2)
    assert isinstance(plain, lox.SpectralInit) and plain.base_delta is None
    kept = lox.spectral_init(g, 2, preserve_output=True, scale=1.0)
    assert isinstance(kept, lox.SpectralInit) and kept.base_delta.shape == g.shape
    np.testing.assert_allclose(kept.base_delta + kept.a @ kept.b, 0.0, atol=1e-5)
