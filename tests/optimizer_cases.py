"""The table of optimizers every test in ``test_common.py`` runs.

It is read from :data:`lora_optax.OPTIMIZERS`: every LoRA-specific optimizer of the
registry is a case (the optax baselines are not). ``make`` builds the transformation
from a learning rate (float or schedule); ``learning_rate`` is the rate used by the
convergence test (below, per registry name); ``needs_full_grads`` (from the registry)
makes the tests pass the full-weight gradients as the ``full_grads=`` extra argument of
``update``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

import lora_optax as lox

# Registry name -> (convergence learning rate, hyperparameters other than the defaults).
# A new optimizer of the registry needs its row here (test_every_lora_optimizer_is_a_case).
SETTINGS: dict[str, tuple[float, dict[str, Any]]] = {
    "scaled_sgd": (0.5, {"delta": 1e-6}),
    "scaled_adamw": (3e-2, {"delta": 1e-6}),
    "lora_plus": (1e-2, {"ratio": 4.0}),
    "solora_sgd": (1e-2, {}),
    "solora_adamw": (1e-2, {}),
    "lora_pro_sgd": (0.3, {}),
    "lora_pro_adamw": (1e-2, {}),
    "ilora": (1e-2, {}),
    "pilora": (1e-2, {}),
    "lora_one": (1e-2, {}),
    # 3e-2 sits at the edge of stability on this problem: whether the skip test freezes
    # the dense pair at a bad point there depended on the CPU's float rounding.
    "lora_rite": (1e-2, {}),
}


@dataclasses.dataclass(frozen=True)
class OptimizerCase:
    name: str
    make: Callable[..., optax.GradientTransformation]
    learning_rate: float
    needs_full_grads: bool = False

    def __repr__(self) -> str:
        return self.name


def _case(spec: lox.OptimizerSpec) -> OptimizerCase:
    learning_rate, hyper = SETTINGS[spec.name]
    make = functools.partial(spec.factory, **hyper) if hyper else spec.factory
    return OptimizerCase(spec.name, make, learning_rate, spec.needs_full_grads)


CASES: list[OptimizerCase] = [
    _case(spec) for spec in lox.OPTIMIZERS.values() if spec.lora and spec.name in SETTINGS
]


def case_ids(cases: list[OptimizerCase]) -> list[str]:
    return [c.name for c in cases]


def extra_args(case: OptimizerCase, full_grads: Any) -> dict[str, Any]:
    return {"full_grads": full_grads} if case.needs_full_grads else {}


def find_state(state: Any, cls: type) -> Any:
    """The one ``cls`` (a state NamedTuple) inside an optimizer's state."""
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
        if isinstance(x, cls)
    ]
    assert len(found) == 1, (cls.__name__, len(found))
    return found[0]
