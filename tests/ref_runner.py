"""Runs a library optimizer and a ``tests/reference.py`` pair step side by side.

Shared by the exact-formula tests of iLoRA/πLoRA and LoRA-One: the library runs on the
full :class:`tests.problems.FactorizationProblem` params tree (2-D, stacked and
multi-axis pairs plus a bias), the reference runs per pair and per stacked slice on the
2-D matrix views, with the gradients of the library's current parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.problems import A_KEY, B_KEY, LAYOUT, factor_matrices, pair_batch, stack_matrices


def library_run(tx: optax.GradientTransformation, problem, params, steps: int) -> list[Any]:
    """Parameter history ``[p0, p1, …]`` of ``tx`` on the problem (jitted steps)."""

    @jax.jit
    def step(p, s):
        grads, _ = problem.grads(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    history = [params]
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history


def reference_run(
    pair_step: Callable[..., tuple[np.ndarray, np.ndarray, Any]],
    init_state: Callable[[np.ndarray, np.ndarray], Any],
    problem,
    params,
    steps: int,
) -> list[Any]:
    """History of the reference: ``pair_step(a, b, g_a, g_b, state, t)`` on every 2-D
    slice of every pair (the bias is carried unchanged)."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    states: dict[Any, Any] = {}
    history = [params]
    for t in range(steps):
        grads, _ = problem.grads(jax.tree.map(jnp.asarray, params))
        grads = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        new: dict[str, Any] = {}
        for name in LAYOUT:
            k = pair_batch(name)
            a, b = params[name][A_KEY[name]], params[name][B_KEY[name]]
            ga, gb = grads[name][A_KEY[name]], grads[name][B_KEY[name]]
            new_a, new_b = [], []
            slices = zip(
                factor_matrices(a, k, "a"),
                factor_matrices(b, k, "b"),
                factor_matrices(ga, k, "a"),
                factor_matrices(gb, k, "b"),
            )
            for i, (am, bm, gam, gbm) in enumerate(slices):
                key = (name, i)
                if key not in states:
                    states[key] = init_state(am, bm)
                na, nb, states[key] = pair_step(am, bm, gam, gbm, states[key], t)
                new_a.append(na)
                new_b.append(nb)
            new[name] = {
                A_KEY[name]: stack_matrices(new_a, a.shape),
                B_KEY[name]: stack_matrices(new_b, b.shape),
            }
        new["bias"] = params["bias"]
        params = new
        history.append(params)
    return history


def compare_histories(lib_hist, ref_hist, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert len(lib_hist) == len(ref_hist)
    for t, (lib, want) in enumerate(zip(lib_hist, ref_hist)):
        for name in LAYOUT:
            for key in (A_KEY[name], B_KEY[name]):
                assert np.all(np.isfinite(want[name][key])), (t, name, key)
                np.testing.assert_allclose(
                    np.asarray(lib[name][key]),
                    want[name][key],
                    rtol=rtol,
                    atol=atol,
                    err_msg=f"step {t}, {name}/{key}",
                )
