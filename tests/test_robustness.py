"""Numerical robustness of every optimizer in ``CASES``.

* A grid of extreme but finite inputs (factor scales 1e-8 … 1e8, zero and rank-1
  factors, zero gradients, tiny / huge gradients), f32 and bf16, evaluated for all
  conditions at once with ``vmap`` (one compilation per optimizer and dtype): the
  updates, the new state and the new params are finite for 3 steps.
* A hypothesis fuzz over shapes (2-D, stacked, multi-axis), ranks 1…64, scales, zero
  and rank-deficient factors, zero gradients and dtypes (eager, 2 steps).
* Non-finite gradients: ``optax.apply_if_finite`` and ``optax.MultiSteps(...,
  should_skip_update_fn=optax.skip_not_finite)`` around every optimizer skip NaN/inf
  steps and keep the state finite; the unwrapped behaviour is the one documented in
  the Reliability guide (docs/guides/reliability.md).
"""

from __future__ import annotations

import itertools
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.optimizer_cases import CASES, OptimizerCase, case_ids, extra_args
from tests.problems import FactorizationProblem

PARAMETRIZE = pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))


def _finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


def _nonfinite_paths(tree) -> list[str]:
    return [
        jax.tree_util.keystr(kp)
        for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not np.all(np.isfinite(np.asarray(x, np.float64)))
    ]


# --------------------------------------------------------------------------- inputs


def lora_inputs(
    a: np.ndarray, b: np.ndarray, g: np.ndarray, batch: int, dtype: Any
) -> tuple[dict, dict, dict]:
    """(params, grads, full_grads) of one pair ``layer`` plus a bias, from float64
    ``A (*batch, m, r)``, ``B (*batch, r, *out)`` and ``G (*batch, m, *out)``.

    The gradients are the consistent ones, ``g_A = G Bᵀ``, ``g_B = Aᵀ G``.
    """
    r = a.shape[-1]
    n_shape = b.shape[batch + 1 :]
    b_m = b.reshape(b.shape[: batch + 1] + (-1,))
    g_m = g.reshape(g.shape[: batch + 1] + (-1,))
    g_a = g_m @ np.swapaxes(b_m, -1, -2)
    g_b = (np.swapaxes(a, -1, -2) @ g_m).reshape(a.shape[:batch] + (r,) + n_shape)
    bias = np.linspace(-1.0, 1.0, 3)

    def cast(x):
        return jnp.asarray(x, dtype)

    params = {"layer": {"lora_a": cast(a), "lora_b": cast(b)}, "bias": cast(bias)}
    grads = {"layer": {"lora_a": cast(g_a), "lora_b": cast(g_b)}, "bias": cast(0.1 * bias)}
    # Full gradients in float32 (bf16 G would round away what the test is about).
    full = {"layer": jnp.asarray(g, jnp.promote_types(dtype, jnp.float32))}
    return params, grads, full


# --------------------------------------------------------------------------- grid

M, R, N = 12, 4, 10


def _conditions() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    a0 = rng.normal(size=(M, R)) / np.sqrt(M)
    b0 = rng.normal(size=(R, N)) * 0.3
    g0 = rng.normal(size=(M, N))
    rank1_a = np.outer(rng.normal(size=M), rng.normal(size=R)) / M
    rank1_b = np.outer(rng.normal(size=R), rng.normal(size=N)) / N
    out = []
    for sa, sb in itertools.product((1e-8, 1.0, 1e8), repeat=2):
        out.append((f"scale A {sa:g} B {sb:g}", sa * a0, sb * b0, g0))
    zero_a, zero_b, zero_g = np.zeros_like(a0), np.zeros_like(b0), np.zeros_like(g0)
    out += [
        ("B = 0", a0, zero_b, g0),
        ("A = 0", zero_a, b0, g0),
        ("A = B = 0", zero_a, zero_b, g0),
        ("rank-1 A", rank1_a, b0, g0),
        ("rank-1 B", a0, rank1_b, g0),
        ("rank-1 A and B", rank1_a, rank1_b, g0),
        ("rank-1 A, B = 0", rank1_a, zero_b, g0),
        ("zero gradient", a0, b0, zero_g),
        ("zero gradient, B = 0", a0, zero_b, zero_g),
        ("tiny gradient", a0, b0, 1e-8 * g0),
        ("huge gradient", a0, b0, 1e4 * g0),
        ("huge A, tiny B, B-zero columns", 1e8 * a0, 1e-8 * b0 * (np.arange(N) % 2), g0),
    ]
    return out


CONDITIONS = _conditions()


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# Known divergences (reported to the module owners): case -> (condition predicate, why).
# (iLoRA/πLoRA's explicit imbalance step, cubic in the factor scale, used to overflow
# at scale 1e8; its default safeguard now keeps it finite, see tests/test_ilora.py.)
KNOWN_DIVERGENCE: dict[str, tuple[Any, str]] = {}


@PARAMETRIZE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_extreme_inputs_finite(case, dtype):
    """Every grid condition, 3 steps, in one vmapped and scanned compilation."""
    inputs = [lora_inputs(a, b, g, 0, dtype) for _, a, b, g in CONDITIONS]
    params, grads, full = (_stack([x[i] for x in inputs]) for i in range(3))
    tx = case.make(learning_rate=0.1 * case.learning_rate)

    @jax.jit
    @jax.vmap
    def run(params, grads, full):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(grads, state, params, **extra_args(case, full))
            params = optax.apply_updates(params, updates)
            finite = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), (updates, state, params))
            return (params, state), finite

        _, finite = jax.lax.scan(step, (params, tx.init(params)), length=3)
        return finite

    finite = run(params, grads, full)  # leaves: (conditions, steps) booleans
    known, why = KNOWN_DIVERGENCE.get(case.name, (lambda label: False, ""))
    failures, expected = [], []
    for i, (label, *_) in enumerate(CONDITIONS):
        for step in range(3):
            bad = [
                jax.tree_util.keystr(kp)
                for kp, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
                if not bool(ok[i, step])
            ]
            if bad:
                (expected if known(label) else failures).append(
                    f"{label} (step {step + 1}): {bad[:4]}"
                )
                break
    assert not failures, f"{case.name} non-finite on finite input:\n" + "\n".join(failures)
    if expected:
        pytest.xfail(f"{case.name}: known divergence ({why}): {expected}")


# --------------------------------------------------------------------------- fuzz


@st.composite
def lora_problem(draw):
    rank = draw(st.one_of(st.integers(1, 8), st.sampled_from([16, 33, 64])))
    layout = draw(st.sampled_from(["dense", "stacked", "multi-axis"]))
    m = rank + draw(st.integers(0, 6))
    n = rank + draw(st.integers(0, 6))
    batch = 1 if layout == "stacked" else 0
    lead = (2,) if batch else ()
    out_shape = (n,) if layout != "multi-axis" else (n, 2)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a = rng.normal(size=lead + (m, rank)) / np.sqrt(m)
    b = rng.normal(size=lead + (rank,) + out_shape)
    g = rng.normal(size=lead + (m,) + out_shape)
    a = a * 10.0 ** draw(st.floats(-8, 8))
    b = b * 10.0 ** draw(st.floats(-8, 8))
    kind = draw(st.sampled_from(["generic", "zero B", "zero A", "rank-deficient", "zero grad"]))
    if kind == "zero B":
        b = np.zeros_like(b)
    elif kind == "zero A":
        a = np.zeros_like(a)
    elif kind == "rank-deficient":
        k = draw(st.integers(1, max(1, rank - 1)))
        a[..., k:] = a[..., :1] * 0.5  # columns beyond k repeat the first one
        b[..., k:, :] = 0.0
    elif kind == "zero grad":
        g = np.zeros_like(g)
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return kind, batch, dtype, a, b, g


def _fuzz_settings():
    # Eager updates of ever-new shapes: fewer examples per optimizer than the profile
    # (3 with the CI profile's 25; HYPOTHESIS_PROFILE=dev / more for longer runs).
    return settings(max_examples=max(3, settings.default.max_examples // 8), deadline=None)


@PARAMETRIZE
def test_fuzz_finite(case):
    tx = case.make(learning_rate=0.1 * case.learning_rate)

    @_fuzz_settings()
    @given(lora_problem())
    def check(problem):
        kind, batch, dtype, a, b, g = problem
        params, grads, full = lora_inputs(a, b, g, batch, dtype)
        state = tx.init(params)
        for step in range(2):
            updates, state = tx.update(grads, state, params, **extra_args(case, full))
            params = optax.apply_updates(params, updates)
            bad = _nonfinite_paths((updates, state, params))
            scale = max(np.abs(a).max(), np.abs(b).max())
            if bad and case.name in KNOWN_DIVERGENCE and scale > 1e3:
                return  # documented divergence for large factors (see KNOWN_DIVERGENCE)
            assert not bad, (
                f"{case.name}: {kind}, A {a.shape}, B {b.shape}, {jnp.dtype(dtype).name}, "
                f"|A| {np.abs(a).max():.1e}, |B| {np.abs(b).max():.1e}, step {step + 1}: {bad}"
            )
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
                assert u.dtype == p.dtype == dtype

    check()


# --------------------------------------------------------------------------- non-finite


@pytest.fixture(scope="module")
def problem() -> FactorizationProblem:
    return FactorizationProblem.create(seed=0)


def _poison(tree, value):
    """The tree with the first element of every leaf set to ``value``."""
    return jax.tree.map(lambda x: x.reshape(-1).at[0].set(value).reshape(x.shape), tree)


# step -> kind of gradient; "spike" is finite (x1e6) and must be applied.
SCHEDULE = ("ok", "nan", "ok", "inf", "ok", "spike", "ok")


_POISON = {"nan": jnp.nan, "inf": jnp.inf}


def _run_wrapped(case: OptimizerCase, wrap, problem):
    tx = wrap(case.make(learning_rate=case.learning_rate))
    params = problem.random_params()
    state = tx.init(params)
    # The kind of step is data (one compilation): a multiplier for every gradient
    # entry and an addend (0, NaN or inf) for the first entry of every leaf.
    scale = jnp.asarray([1e6 if k == "spike" else 1.0 for k in SCHEDULE])
    poison = jnp.asarray([_POISON.get(k, 0.0) for k in SCHEDULE])

    @jax.jit
    def step(i, params, state):
        grads, full = problem.grads(params)

        def corrupt(x):
            x = x * scale[i].astype(x.dtype)
            return x.reshape(-1).at[0].add(poison[i].astype(x.dtype)).reshape(x.shape)

        grads, full = jax.tree.map(corrupt, grads), jax.tree.map(corrupt, full)
        updates, state = tx.update(grads, state, params, **extra_args(case, full))
        return optax.apply_updates(params, updates), state, updates

    trace = []
    for i, kind in enumerate(SCHEDULE):
        new_params, state, updates = step(i, params, state)
        trace.append((kind, params, new_params, state, updates))
        params = new_params
    return trace


def _inner_state(state):
    return state.inner_state if hasattr(state, "inner_state") else state.inner_opt_state


@PARAMETRIZE
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(
            lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3), id="apply_if_finite"
        ),
        pytest.param(
            lambda tx: optax.MultiSteps(
                tx, every_k_schedule=1, should_skip_update_fn=optax.skip_not_finite
            ),
            id="skip_not_finite",
        ),
    ],
)
def test_nonfinite_steps_skipped(case, wrap, problem):
    trace = _run_wrapped(case, wrap, problem)
    previous_inner = None
    for step, (kind, params, new_params, state, updates) in enumerate(trace):
        assert _finite(state), (case.name, step, kind, _nonfinite_paths(state))
        assert _finite(new_params), (case.name, step, kind)
        inner = _inner_state(state)
        if kind in ("nan", "inf"):
            for u in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(u), 0.0)
            jax.tree.map(np.testing.assert_array_equal, params, new_params)
            jax.tree.map(np.testing.assert_array_equal, previous_inner, inner)
        else:
            assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates)), (
                case.name,
                step,
                kind,
            )
        previous_inner = inner
    final = trace[-1][3]
    if hasattr(final, "total_notfinite"):
        assert int(final.total_notfinite) == 2


# What an unwrapped optimizer does with a NaN gradient, per the table of the
# Reliability guide.
_GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs/guides/reliability.md"


def _documented_behaviour() -> dict[str, str]:
    text = _GUIDE.read_text() if _GUIDE.exists() else ""
    section = text.split("**Non-finite gradients.**", 1)[-1]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([\w]+)`\s*\|\s*([\w -]+?)\s*\|", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def observed_nonfinite_behaviour(case: OptimizerCase, problem) -> str:
    """'propagates' (updates and state become non-finite), 'updates only' (the state
    stays finite), 'skipped' (zero update, state finite) or 'zeroed' (a finite
    non-zero update)."""
    tx = case.make(learning_rate=case.learning_rate)

    @jax.jit
    def run(params):
        grads, full = problem.grads(params)
        state = tx.init(params)
        # One good step first so that moment-based states are non-trivial.
        _, state = tx.update(grads, state, params, **extra_args(case, full))
        bad_grads, bad_full = _poison(grads, jnp.nan), _poison(full, jnp.nan)
        return tx.update(bad_grads, state, params, **extra_args(case, bad_full))

    updates, new_state = run(problem.random_params())
    if not _finite(updates):
        return "propagates" if not _finite(new_state) else "updates only"
    if all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates)):
        return "skipped"
    return "zeroed"


@PARAMETRIZE
def test_nonfinite_behaviour_documented(case, problem):
    documented = _documented_behaviour()
    assert case.name in documented, (
        f"docs/guides/reliability.md table has no row for `{case.name}` (non-finite gradients)."
    )
    assert observed_nonfinite_behaviour(case, problem) == documented[case.name]
