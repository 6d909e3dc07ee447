"""The sequential order (``sequential=True``) of the Riemannian-preconditioned optimizers.

Exact formulas against ``tests/reference.py``'s :func:`authors_loop_step` (float64
NumPy, written as the authors' loop reads: A's whole step, then B preconditioned with
the updated A), on the 2-D, stacked and multi-axis pairs of the factorization problem;
the first-order agreement of the two orders; and composition with optax.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_optax as lox
from tests import reference as ref
from tests.problems import A_KEY, B_KEY, LAYOUT, FactorizationProblem
from tests.ref_runner import compare_histories, library_run, reference_run

STEPS = 4
STRENGTH = 0.5  # πLoRA's λ, large enough to matter on this problem


@pytest.fixture
def problem(x64):
    return FactorizationProblem.create(seed=5, scale=1.5)


def _f64_params(problem):
    return jax.tree.map(lambda x: x.astype(jnp.float64), problem.random_params())


def _sched(count):  # a decaying schedule, evaluated inside the one transformation
    return 0.03 - 0.02 * count / STEPS


# name -> (library factory, reference keywords); every one with sequential=True.
OPTIMIZERS = {
    "scaled_sgd": (
        lambda wd: lox.scaled_sgd(_sched, delta=1e-4, sequential=True),
        dict(adam=False, delta=1e-4),
    ),
    "scaled_adamw": (
        lambda wd: lox.scaled_adamw(
            _sched, b1=0.8, b2=0.95, eps=1e-7, weight_decay=wd, delta=1e-4, sequential=True
        ),
        dict(b1=0.8, b2=0.95, eps=1e-7, delta=1e-4),
    ),
    "lora_one": (
        lambda wd: lox.lora_one(_sched, weight_decay=wd, delta=1e-4, sequential=True),
        dict(delta=1e-4, no_bias_correction=True),
    ),
    "lora_one_corrected": (
        lambda wd: lox.lora_one(
            _sched, eps_root=1e-9, weight_decay=wd, bias_correction=True, sequential=True
        ),
        dict(eps_root=1e-9),
    ),
    "pilora": (
        lambda wd: lox.pilora(
            _sched, weight_decay=wd, strength=STRENGTH, delta=1e-4, sequential=True
        ),
        dict(delta=1e-4),
    ),
}
CASES = [
    ("scaled_sgd", 0.0),
    ("scaled_adamw", 0.2),
    ("lora_one", 0.2),
    ("lora_one_corrected", 0.0),
    ("pilora", 0.2),
]


@pytest.mark.parametrize("name,wd", CASES, ids=[f"{n}-wd{w}" for n, w in CASES])
def test_matches_reference(problem, name, wd):
    make, kw = OPTIMIZERS[name]
    params = _f64_params(problem)
    lib = library_run(make(wd), problem, params, STEPS)
    adam = kw.get("adam", True)

    def step(a, b, ga, gb, state, t):
        lr = float(_sched(t))
        na, nb, state = ref.authors_loop_step(a, b, ga, gb, state, lr, weight_decay=wd, **kw)
        if name == "pilora":
            na, nb = ref.imbalance_regularization(na, nb, lr, STRENGTH)
        return na, nb, state

    init = ref.pair_adamw_init if adam else (lambda a, b: None)
    want = reference_run(step, init, problem, params, STEPS)
    compare_histories(lib, want)


def _pair_gap(x, y):
    return max(
        float(np.max(np.abs(np.asarray(x[n][k]) - np.asarray(y[n][k]))))
        for n in LAYOUT
        for k in (A_KEY[n], B_KEY[n])
    )


# Adam's direction μ̂/(√ν̂ + ε) is not smooth where an entry of g̃ is near 0 (there it
# is ~sign(g̃)), so a tiny entry can flip by O(1) under an O(η) change of the
# preconditioner; ε larger than the gradients puts Adam in its smooth regime.
FIRST_ORDER = {
    "scaled_sgd": lambda lr, seq: lox.scaled_sgd(lr, sequential=seq),
    "scaled_adamw": lambda lr, seq: lox.scaled_adamw(lr, eps=1.0, weight_decay=0.1, sequential=seq),
    "pilora": lambda lr, seq: lox.pilora(lr, eps=1.0, weight_decay=0.1, sequential=seq),
}


def _final_params(make, problem, params, lrs, steps=3):
    """The params after ``steps`` steps for each learning rate, one compiled step."""

    @jax.jit
    def step(p, s, lr):
        grads, _ = problem.grads(p)
        updates, s = make(lr).update(grads, s, p)
        return optax.apply_updates(p, updates), s

    out = []
    for lr in lrs:
        p, s = params, make(lr).init(params)
        for _ in range(steps):
            p, s = step(p, s, jnp.asarray(lr))
        out.append(p)
    return out


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_orders_agree_to_first_order(problem, name):
    """The two orders differ by O(η²): halving η quarters the gap after a few steps
    (B's preconditioner differs by O(η) between A and A⁺; the weight-decay placements
    by η²·wd·d), while the steps themselves are O(η)."""
    params = _f64_params(problem)
    lrs = (4e-3, 2e-3, 1e-3)
    seq = _final_params(lambda lr: FIRST_ORDER[name](lr, True), problem, params, lrs)
    sim = _final_params(lambda lr: FIRST_ORDER[name](lr, False), problem, params, lrs)
    gaps = [_pair_gap(x, y) for x, y in zip(seq, sim)]
    moves = [_pair_gap(y, params) for y in sim]
    assert gaps[-1] > 0
    for big, small in itertools.pairwise(gaps):
        assert 3.5 < big / small < 4.5, gaps
    for big, small in itertools.pairwise(moves):
        assert 1.8 < big / small < 2.2, moves


def test_a_step_is_the_simultaneous_one(problem):
    """Without weight decay, A is stepped first with the current B in both orders, and
    leaves outside pairs get the same base optimizer; only B's step differs."""
    params = _f64_params(problem)
    grads, _ = problem.grads(params)

    @functools.partial(jax.jit, static_argnums=0)
    def first_update(seq):
        tx = lox.lora_one(1e-2, eps=1.0, sequential=seq)
        return tx.update(grads, tx.init(params), params)[0]

    out = {seq: first_update(seq) for seq in (True, False)}
    for n in LAYOUT:
        np.testing.assert_allclose(out[True][n][A_KEY[n]], out[False][n][A_KEY[n]], rtol=1e-13)
        assert not np.allclose(out[True][n][B_KEY[n]], out[False][n][B_KEY[n]], rtol=1e-6)
    np.testing.assert_array_equal(out[True]["bias"], out[False]["bias"])


def test_composes_with_optax():
    """One jitted step of ``scaled_adamw(sequential=True)`` inside optax's wrappers:
    a chain after gradient clipping, ``inject_hyperparams`` with a schedule as the
    learning rate (read inside the one transformation), and ``masked`` (a masked-out
    pair passes through, the others are unchanged)."""
    problem = FactorizationProblem.create(seed=5)
    params = problem.random_params()
    grads, _ = problem.grads(params)
    sched = optax.linear_schedule(3e-2, 1e-2, 4)

    def make(lr):
        return lox.scaled_adamw(lr, weight_decay=0.1, sequential=True)

    def run(tx, g=grads, p=params):
        state = tx.init(p)
        u1, state = jax.jit(tx.update)(g, state, p)
        u2, _ = jax.jit(tx.update)(g, state, p)
        return u1, u2

    want = run(make(sched))
    clip = 0.5
    clipped = jax.tree.map(lambda x: x * jnp.minimum(1.0, clip / optax.global_norm(grads)), grads)
    _assert_close(
        run(optax.chain(optax.clip_by_global_norm(clip), make(sched))), run(make(sched), clipped)
    )
    injected = optax.inject_hyperparams(lox.scaled_adamw)(
        learning_rate=sched, weight_decay=0.1, sequential=True
    )
    _assert_close(run(injected), want)
    assert float(sched(1)) != float(sched(0))  # the schedule moved between the steps
    mask = {name: name != "dense" for name in params}
    masked = run(optax.masked(make(sched), mask))
    for u_masked, u_full in zip(masked, want):
        np.testing.assert_array_equal(
            u_masked["dense"][A_KEY["dense"]], grads["dense"][A_KEY["dense"]]
        )
        for name in ("stacked", "einsum", "square"):
            _assert_close(u_masked[name], u_full[name])


def _assert_close(x, y):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), x, y)
