"""Bad input: every public function of ``lora_optax`` validates its arguments eagerly.

The tests enumerate ``lora_optax.__all__``: every public name must be

* an optimizer factory (anything that builds an ``optax.GradientTransformation`` from
  the arguments in ``REQUIRED_ARGS``), which then goes through the generic checks
  below (hyperparameters, pair shapes, missing ``params`` / extra arguments, updates
  that do not match the params), or
* a helper with its own case in ``HELPER_CASES``, or
* a state container (a NamedTuple class) or a name in ``ALLOW`` (no arguments to
  validate).

A new public function that fits none of these fails ``test_every_public_name_is_covered``.
Errors must be raised when the function is called (not at the first ``jit`` trace or
deep inside XLA) and must name the offending argument or tree path.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from tests.problems import FactorizationProblem

# Values for the required arguments of optimizer factories (by parameter name).
REQUIRED_ARGS: dict[str, Any] = {"learning_rate": 1e-2, "ratio": 2.0, "strength": 0.1}

# Invalid values per hyperparameter name; the error must name the parameter.
_BETA_BAD = (-0.1, 1.0, 1.5)
BAD_VALUES: dict[str, tuple[Any, ...]] = {
    "learning_rate": (-1e-3, math.nan, math.inf),
    "b1": _BETA_BAD,
    "b2": _BETA_BAD,
    "b3": _BETA_BAD,
    "beta": _BETA_BAD,
    "beta1": _BETA_BAD,
    "beta2": _BETA_BAD,
    "beta3": _BETA_BAD,
    "momentum": _BETA_BAD,
    "decay": _BETA_BAD,
    "eps": (-1.0,),
    "delta": (-1.0,),
    "weight_decay": (-1.0,),
    "ratio": (0.0, -1.0),
    "strength": (-1.0,),
    "gamma": (0.0, -1.0),
    "safeguard": (0.0, -1.0, math.inf),
}

# Public names with no argument to validate.
ALLOW: dict[str, str] = {
    "LeafIndex": "path-addressed view of any pytree; accepts every tree",
    "pair_parent": "pure path arithmetic on an already validated LoRAPair",
    "lora_rite_groups": "groups already validated pairs by shape; no argument of its own",
    "lora_rite_factor_state": "read-only view of an existing state; pairs are validated by "
    "resolve_pairs like every optimizer's",
    "OPTIMIZERS": "a read-only mapping (the registry); get_optimizer validates names",
    "OptimizerSpec": "a frozen record of the registry; nothing to validate",
}

# Known gaps, reported to the owners: (public name, check) -> reason. They run as
# strict xfails, so a fix makes them XPASS and fail until the entry is removed.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _is_state_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _build(fn: Callable[..., Any], **overrides: Any) -> Any:
    kwargs = {}
    for name, p in _signature(fn).parameters.items():
        if name in overrides:
            kwargs[name] = overrides[name]
        elif p.default is inspect.Parameter.empty and p.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            if name not in REQUIRED_ARGS:
                raise LookupError(name)
            kwargs[name] = REQUIRED_ARGS[name]
    return fn(**kwargs)


def _factory(name: str) -> Callable[..., Any] | None:
    """The public function if it is an optimizer factory, else None."""
    fn = getattr(lox, name)
    if inspect.isclass(fn) or not callable(fn) or name in HELPER_CASES or name in ALLOW:
        return None
    try:
        tx = _build(fn)
    except LookupError:
        return None
    return fn if isinstance(tx, optax.GradientTransformation) else None


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


def _raises(fn: Callable[[], Any], *needles: str, exc=(ValueError, TypeError)) -> str:
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"error message does not name {needle!r}: {msg}"
    return msg


def _gap(request, name: str, check: str) -> None:
    reason = KNOWN_GAPS.get((name, check))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# --------------------------------------------------------------------------- helpers


def _case_lora_pair():
    _raises(lambda: lox.LoRAPair(("l", "lora_a"), ("l", "lora_b"), rank=0), "rank", "l/lora_a")
    _raises(lambda: lox.LoRAPair(("l", "lora_a"), ("l", "lora_b"), rank=2, in_ndim=0), "in_ndim")


def _case_find_lora_pairs():
    _raises(
        lambda: lox.find_lora_pairs({"blk": {"lora_a": jnp.ones((8, 2))}}),
        "blk/lora_a",
        "(8, 2)",
    )
    _raises(
        lambda: lox.find_lora_pairs(
            {"blk": {"lora_a": jnp.ones((8, 4)), "lora_b": jnp.ones((2, 8))}}
        ),
        "blk/lora_a",
    )
    tree = {"blk": {"lora_a": jnp.ones((2, 8, 4)), "lora_b": jnp.ones((2, 4, 8))}}
    _raises(lambda: lox.find_lora_pairs(tree, batch_ndim=2), "blk/lora_a", "batch_ndim=2")


def _case_make_pair():
    _raises(lambda: lox.make_pair(("a",), ("b",), (8, 4), (3, 6)), "a", "(8, 4)", "(3, 6)")


def _case_resolve_pairs():
    tree = {"l": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))}}
    _raises(lambda: lox.resolve_pairs({"l": {"lora_a": "x", "lora_b": "b"}}, tree), "l/lora_a")
    ghost = lox.LoRAPair(("l", "lora_a"), ("m", "lora_b"), rank=2)
    _raises(lambda: lox.resolve_pairs([ghost], tree), "m/lora_b")
    wrong_rank = lox.LoRAPair(("l", "lora_a"), ("l", "lora_b"), rank=3)
    _raises(lambda: lox.resolve_pairs([wrong_rank], tree), "l/lora_a", "(8, 2)")
    _raises(lambda: lox.resolve_pairs(None, {"w": jnp.ones((4, 4))}), "w", "(4, 4)")


def _case_label_tree():
    _raises(lambda: lox.label_tree({"blk": {"lora_b": jnp.ones((2, 8))}}), "blk/lora_b")


def _case_full_grad_for_pair():
    params = {"l": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 6))}}
    (pair,) = lox.find_lora_pairs(params)
    _raises(lambda: lox.full_grad_for_pair(pair, None, params), "full_grads")
    _raises(lambda: lox.full_grad_for_pair(pair, {"l": jnp.ones((8, 5))}, params), "l", "(8, 5)")
    _raises(lambda: lox.full_grad_for_pair(pair, {"m": jnp.ones((8, 6))}, params), "l/lora_a")


def _case_zero_probes():
    _raises(lambda: lox.zero_probes({"w": jnp.ones((4, 4))}), "LoRA")
    _raises(lambda: lox.zero_probes({"l": {"lora_a": jnp.ones((8, 2))}}), "l/lora_a")


def _case_value_and_full_grads():
    _raises(lambda: lox.value_and_full_grads("not a function"), "loss_fn")


def _case_spectral_init():
    g = jnp.ones((8, 6))
    _raises(lambda: lox.spectral_init(g, 0), "rank")
    _raises(lambda: lox.spectral_init(g, 7), "rank 7", "(8, 6)")
    _raises(lambda: lox.spectral_init(g, 2, method="bogus"), "method")
    _raises(lambda: lox.spectral_init(g, 2, method="randomized"), "key")
    _raises(lambda: lox.spectral_init(g, 2, gamma=-1.0), "gamma")
    _raises(lambda: lox.spectral_init(g.at[0, 0].set(jnp.nan), 2), "non-finite")
    _raises(lambda: lox.spectral_init(jnp.zeros((8, 6)), 2), "zero")


def _case_spectral_init_pairs():
    params = {"l": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 6))}}
    _raises(lambda: lox.spectral_init_pairs(params, None), "full")
    _raises(lambda: lox.spectral_init_pairs(params, {"m": jnp.ones((8, 6))}), "l/lora_a")
    _raises(lambda: lox.spectral_init_pairs(params, {"l": jnp.ones((8, 5))}), "l", "(8, 5)")
    _raises(lambda: lox.spectral_init_pairs(params, {"l": jnp.ones((8, 6))}, gamma=0.0), "gamma")


def _case_get_optimizer():
    _raises(lambda: lox.get_optimizer("adam_w", 1e-3), "adam_w", "adamw")
    _raises(lambda: lox.get_optimizer("lora_rite", 1e-3, ratio=2.0), "ratio", "skip_threshold")
    _raises(lambda: lox.get_optimizer("lora_rite", -1e-3), "learning_rate")


def _case_state_shardings():
    params = {"l": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 6))}}
    _raises(lambda: lox.state_shardings("sgd", params), "tx")
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _raises(
        lambda: lox.state_shardings(optax.sgd(0.1), params, {"l": {"lora_a": one}}),
        "param_shardings",
        "l/lora_b",
    )


HELPER_CASES: dict[str, Callable[[], None]] = {
    "LoRAPair": _case_lora_pair,
    "find_lora_pairs": _case_find_lora_pairs,
    "make_pair": _case_make_pair,
    "resolve_pairs": _case_resolve_pairs,
    "label_tree": _case_label_tree,
    "full_grad_for_pair": _case_full_grad_for_pair,
    "zero_probes": _case_zero_probes,
    "value_and_full_grads": _case_value_and_full_grads,
    "state_shardings": _case_state_shardings,
    "get_optimizer": _case_get_optimizer,
    "spectral_init": _case_spectral_init,
    "spectral_init_pairs": _case_spectral_init_pairs,
}


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("name", sorted(lox.__all__))
def test_every_public_name_is_covered(name):
    obj = getattr(lox, name)
    if name in ALLOW or name in HELPER_CASES or _is_state_class(obj):
        return
    assert _factory(name) is not None, (
        f"lora_optax.{name} is public but has no bad-input case: if it is an optimizer "
        "factory, give its required arguments in REQUIRED_ARGS; otherwise add a case to "
        "HELPER_CASES (or, with a reason, to ALLOW) in tests/test_bad_input.py."
    )


FACTORIES = sorted(n for n in lox.__all__ if _factory(n) is not None)


def _pair_agnostic(name: str) -> bool:
    """A building block that is not LoRA-specific (works on a tree without pairs)."""
    tx = _build(getattr(lox, name))
    try:
        tx.init({"kernel": jnp.ones((4, 4))})
    except ValueError:
        return False
    return True


LORA_FACTORIES = [n for n in FACTORIES if not _pair_agnostic(n)]


# --------------------------------------------------------------------------- factories


@pytest.mark.parametrize("name", LORA_FACTORIES)
def test_factory_takes_pairs_keyword(name):
    params = _signature(getattr(lox, name)).parameters
    assert "pairs" in params and params["pairs"].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", FACTORIES)
def test_hyperparameters_validated_eagerly(name, request):
    _gap(request, name, "hyperparameters")
    fn = getattr(lox, name)
    checked = []
    for pname, p in _signature(fn).parameters.items():
        bad: tuple[Any, ...] = BAD_VALUES.get(pname, ())
        if isinstance(p.default, float):
            bad = bad + (math.nan,)  # no float hyperparameter may be NaN
        for value in dict.fromkeys(bad):  # dedupe, keep order
            checked.append((pname, value))
            _raises(lambda pname=pname, value=value: _build(fn, **{pname: value}), pname)
    if "learning_rate" in _signature(fn).parameters:
        _raises(lambda: _build(fn, learning_rate="0.1"), "learning_rate")
    assert checked or not any(
        isinstance(p.default, float) for p in _signature(fn).parameters.values()
    )


@pytest.mark.parametrize("name", LORA_FACTORIES)
def test_init_rejects_bad_pairs(name, request):
    _gap(request, name, "init")
    fn = getattr(lox, name)
    tx = _build(fn)
    mismatch = {"l": {"lora_a": jnp.ones((8, 4)), "lora_b": jnp.ones((3, 6))}}
    _raises(lambda: tx.init(mismatch), "l/lora_a", "(8, 4)", "(3, 6)", exc=ValueError)
    unpaired = {"l": {"lora_a": jnp.ones((8, 4))}, "bias": jnp.ones(3)}
    _raises(lambda: tx.init(unpaired), "l/lora_a", exc=ValueError)
    transposed = {"l": {"lora_a": jnp.ones((2, 8)), "lora_b": jnp.ones((8, 2))}}
    _raises(lambda: tx.init(transposed), "transposed", exc=ValueError)
    _raises(lambda: tx.init({"kernel": jnp.ones((4, 4))}), "LoRA", exc=ValueError)
    ghost = lox.LoRAPair(("x", "lora_a"), ("x", "lora_b"), rank=4)
    tx_ghost = _build(fn, pairs=[ghost])
    params = {"l": {"lora_a": jnp.ones((8, 4)), "lora_b": jnp.ones((4, 6))}}
    _raises(lambda: tx_ghost.init(params), "x/lora_a", exc=ValueError)


def _traced(tx):
    """``tx.update`` traced only (``jax.eval_shape``): the argument checks run at trace
    time exactly as eagerly, without the cost of executing the update."""

    def update(updates, state, params=None, **kwargs):
        return jax.eval_shape(functools.partial(tx.update, **kwargs), updates, state, params)

    return update


def _needs_full_grads(tx, grads, state, params) -> bool:
    """True when ``update`` without ``full_grads`` raises an error naming it."""
    try:
        _traced(tx)(grads, state, params)
    except ValueError as e:
        if "full_grads" in str(e):
            return True
        raise
    return False


@pytest.mark.parametrize("name", FACTORIES)
def test_update_rejects_bad_arguments(name, problem, request):
    _gap(request, name, "update")
    tx = _build(getattr(lox, name))
    paths = () if name not in LORA_FACTORIES else ("dense/lora_b",)  # optax-like blocks
    params = problem.random_params()
    grads, full = problem.grads(params)
    state = tx.init(params)
    update = _traced(tx)
    kwargs = {"full_grads": full} if _needs_full_grads(tx, grads, state, params) else {}
    if kwargs:
        # A full-gradient tree of the wrong shape, and one missing a pair.
        bad = dict(full, dense=jnp.zeros((16, 13)))
        _raises(
            lambda: update(grads, state, params, full_grads=bad),
            "dense",
            "(16, 13)",
            exc=ValueError,
        )
        missing = {k: v for k, v in full.items() if k != "stacked"}
        _raises(lambda: update(grads, state, params, full_grads=missing), "stacked")
    # Without params: it works, or it says that params are needed.
    try:
        update(grads, state, None, **kwargs)
    except ValueError as e:
        assert "params" in str(e), str(e)
    # Updates and params of different structure / shapes.
    no_bias = {k: v for k, v in grads.items() if k != "bias"}
    _raises(lambda: update(no_bias, state, params, **kwargs), "bias")
    if paths:  # pair-agnostic blocks (like optax.scale_by_adam) may ignore params
        p_no_bias = {k: v for k, v in params.items() if k != "bias"}
        _raises(lambda: update(grads, state, p_no_bias, **kwargs), "bias")
    wrong = dict(grads, dense=dict(grads["dense"], lora_b=jnp.zeros((4, 13))))
    _raises(lambda: update(wrong, state, params, **kwargs), *paths)
    # Eagerly too (the checks are Python-level, before any computation).
    _raises(lambda: tx.update(wrong, state, params, **kwargs), *paths)


@pytest.mark.parametrize("name", sorted(n for n in HELPER_CASES if n in lox.__all__))
def test_helper_bad_input(name, request):
    _gap(request, name, "helper")
    HELPER_CASES[name]()


def test_helper_cases_name_public_functions():
    stale = sorted(n for n in HELPER_CASES if n not in lox.__all__ and n != "state_shardings")
    assert not stale, stale


def test_optax_wrappers_keep_the_checks(problem):
    """Errors also come through optax wrappers users put around the optimizers."""
    params = problem.random_params()
    grads, _ = problem.grads(params)
    wrong = dict(grads, dense=dict(grads["dense"], lora_b=jnp.zeros((4, 13))))
    for tx in (
        optax.chain(lox.scaled_adamw(1e-3), optax.clip_by_global_norm(1.0)),
        optax.inject_hyperparams(lox.scaled_sgd)(learning_rate=0.1),
    ):
        state = tx.init(params)
        _raises(lambda tx=tx, state=state: tx.update(wrong, state, params), "dense/lora_b")
    # optax.MultiSteps accumulates before the inner update: optax's own error.
    multi = optax.MultiSteps(lox.scaled_sgd(0.1), every_k_schedule=2)
    _raises(lambda: multi.update(wrong, multi.init(params), params))
    assert np.isfinite(float(problem.loss(params)))


@pytest.mark.parametrize("name", ["scaled_adamw", "lora_rite", "lora_one", "ilora"])
def test_bf16_injected_beta_names_hyperparam_dtype(name):
    """``inject_hyperparams`` on bf16 params stores b2 = 0.999 as bf16 1.0 (plain
    optax.adamw then silently turns to NaN); the error must name the fix."""
    params = {"lora_a": jnp.ones((8, 2), jnp.bfloat16), "lora_b": jnp.zeros((2, 8), jnp.bfloat16)}
    factory = getattr(lox, name)
    tx = optax.inject_hyperparams(factory)(learning_rate=1e-3, b2=0.999)
    with pytest.raises(ValueError, match=r"b2.*hyperparam_dtype=jnp\.float32"):
        tx.init(params)
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, b2=0.999
    )
    state = tx.init(params)
    updates, _ = tx.update(params, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
