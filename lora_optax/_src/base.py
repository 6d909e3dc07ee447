"""Argument checks and small pieces shared by every transformation."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
import optax


def _concrete(value: Any) -> float | None:
    """The value as a float when it is a concrete number, else None (traced/array)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        return float(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        if value.ndim == 0:
            return float(value)
    return None


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
    """A learning rate is a non-negative number or a schedule (callable)."""
    if callable(value):
        return
    v = _concrete(value)
    if v is None:
        if isinstance(value, jax.Array):  # traced under inject_hyperparams
            return
        raise TypeError(f"{name} must be a float or an optax schedule, got {value!r}.")
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_in_range(
    value: Any, name: str, lo: float, hi: float, *, hi_inclusive: bool = False
) -> None:
    """Checks ``lo <= value < hi`` (or ``<= hi``) for concrete values."""
    v = _concrete(value)
    if v is None:
        return
    ok = lo <= v <= hi if hi_inclusive else lo <= v < hi
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise ValueError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}.")


def check_non_negative(value: Any, name: str) -> None:
    if callable(value):
        return
    v = _concrete(value)
    if v is not None and (not np.isfinite(v) or v < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_positive(value: Any, name: str) -> None:
    v = _concrete(value)
    if v is not None and (not np.isfinite(v) or v <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_betas(**betas: Any) -> None:
    for name, value in betas.items():
        _check_not_rounded_to_one(value, name)
        check_in_range(value, name, 0.0, 1.0)


def _check_not_rounded_to_one(value: Any, name: str) -> None:
    """A decay rate held in a low-precision array that rounded to 1 (bf16 has no number
    between 0.996 and 1): the typical cause is ``optax.inject_hyperparams`` storing the
    hyperparameters in the dtype of bf16 params."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        return
    if jax.numpy.finfo(dtype).bits > 16 or _concrete(value) != 1.0:
        return
    raise ValueError(
        f"{name} is {value!r}: a {dtype} hyperparameter rounds decay rates such as 0.999 "
        "to 1. With optax.inject_hyperparams on bfloat16 params, pass "
        "`hyperparam_dtype=jnp.float32` (e.g. optax.inject_hyperparams(lora_optax.lora_rite, "
        "hyperparam_dtype=jnp.float32)(learning_rate=1e-3))."
    )


def require_params(params: Any, what: str) -> None:
    if params is None:
        raise ValueError(
            f"{what} needs the current parameters: call `update(updates, state, params)`."
        )


def learning_rate_at(learning_rate: Any, count: jax.Array) -> Any:
    """The learning rate (float or schedule value) for the step ``count``."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


ScalarOrSchedule = optax.ScalarOrSchedule
