"""The registry of optimizers: every optimizer of the library, and the baselines.

:data:`OPTIMIZERS` maps a name to an :class:`OptimizerSpec`; :func:`get_optimizer`
builds one by name. The command line of the examples, the benchmarks, the demo and the
common test table all read this one table, so adding a method is its module, one entry
here, and its tests.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import optax

from lora_optax._src import base
from lora_optax._src.ilora import ilora, pilora
from lora_optax._src.lora_one import lora_one, spectral_init_pairs
from lora_optax._src.lora_plus import lora_plus
from lora_optax._src.lora_pro import lora_pro_adamw, lora_pro_sgd
from lora_optax._src.lora_rite import lora_rite
from lora_optax._src.riemannian import scaled_adamw, scaled_sgd
from lora_optax._src.solora import solora_adamw, solora_sgd


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of :data:`OPTIMIZERS`.

    Attributes:
      name: the registry key.
      factory: ``factory(learning_rate, **hyperparameters)`` builds the
        :class:`optax.GradientTransformation`.
      label: a display name (tables, plots).
      paper: the paper it implements (authors, title, venue), or the baseline's.
      reference: a URL of the paper (arXiv where there is one), or ``""``.
      base: the base optimizer that leaves outside LoRA pairs get (``"adamw"``,
        ``"sgd"``; for a baseline, the optimizer itself).
      lora: ``True`` for the LoRA-specific methods, which take ``pairs=``; ``False``
        for the plain optax baselines.
      needs_full_grads: ``update`` needs the full-weight gradients as
        ``full_grads=`` (see :func:`lora_optax.value_and_full_grads`).
      initializer: the method's own initialisation of the LoRA factors, if any
        (LoRA-One's :func:`lora_optax.spectral_init_pairs`), else ``None``.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    label: str
    paper: str
    reference: str
    base: str
    lora: bool = True
    needs_full_grads: bool = False
    initializer: Callable[..., Any] | None = None

    @functools.cached_property
    def defaults(self) -> Mapping[str, Any]:
        """The factory's hyperparameters (everything but ``learning_rate``) and their
        defaults, in signature order (``inspect.Parameter.empty`` for required ones)."""
        params = inspect.signature(self.factory).parameters
        return types.MappingProxyType(
            {k: p.default for k, p in params.items() if k != "learning_rate"}
        )


_RIEMANNIAN = (
    "Zhang & Pilanci, Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models, ICML 2024"
)
_ILORA = (
    "Zhu, Wu, Gu & Cevher, Imbalance-Regularized LoRA: A Plug-and-Play Method for "
    "Improving Fine-Tuning of Foundation Models"
)
_SOLORA = (
    "LoRA Meets Second-Order Optimization: Towards Optimal Low-Rank Updates (SoLoRA), "
    "anonymous submission under double-blind review, 2025"
)
_LORA_PRO = (
    "Wang, Liang, He, Wang & Tan, LoRA-Pro: Are Low-Rank Adapters Properly Optimized?, ICLR 2025"
)

_SPECS = (
    OptimizerSpec(
        "adamw",
        optax.adamw,
        "AdamW",
        "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019",
        "https://arxiv.org/abs/1711.05101",
        "adamw",
        lora=False,
    ),
    OptimizerSpec(
        "lamb",
        optax.lamb,
        "Lamb",
        "You et al., Large Batch Optimization for Deep Learning: Training BERT in 76 "
        "minutes, ICLR 2020",
        "https://arxiv.org/abs/1904.00962",
        "lamb",
        lora=False,
    ),
    OptimizerSpec("sgd", optax.sgd, "SGD", "stochastic gradient descent", "", "sgd", lora=False),
    OptimizerSpec(
        "scaled_sgd",
        scaled_sgd,
        "scaled GD",
        _RIEMANNIAN,
        "https://arxiv.org/abs/2402.02347",
        "sgd",
    ),
    OptimizerSpec(
        "scaled_adamw",
        scaled_adamw,
        "ScaledAdamW",
        _RIEMANNIAN,
        "https://arxiv.org/abs/2402.02347",
        "adamw",
    ),
    OptimizerSpec(
        "lora_plus",
        lora_plus,
        "LoRA+",
        "Hayou, Ghosh & Yu, LoRA+: Efficient Low Rank Adaptation of Large Models, ICML 2024",
        "https://arxiv.org/abs/2402.12354",
        "adamw",
    ),
    OptimizerSpec(
        "lora_rite",
        lora_rite,
        "LoRA-RITE",
        "Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, LoRA Done RITE: Robust "
        "Invariant Transformation Equilibration for LoRA Optimization, ICLR 2025",
        "https://arxiv.org/abs/2410.20625",
        "adamw",
    ),
    OptimizerSpec("ilora", ilora, "iLoRA", _ILORA, "", "adamw"),
    OptimizerSpec("pilora", pilora, "πLoRA", _ILORA, "", "adamw"),
    OptimizerSpec(
        "lora_one",
        lora_one,
        "LoRA-One",
        "Zhang, Liu & Chen, LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning "
        "Large Language Models, Provably and Efficiently, ICML 2025",
        "https://arxiv.org/abs/2502.01235",
        "adamw",
        initializer=spectral_init_pairs,
    ),
    OptimizerSpec(
        "solora_sgd", solora_sgd, "SoLoRA (SGD)", _SOLORA, "", "sgd", needs_full_grads=True
    ),
    OptimizerSpec(
        "solora_adamw", solora_adamw, "SoLoRA", _SOLORA, "", "adamw", needs_full_grads=True
    ),
    OptimizerSpec(
        "lora_pro_sgd",
        lora_pro_sgd,
        "LoRA-Pro (SGD)",
        _LORA_PRO,
        "https://arxiv.org/abs/2407.18242",
        "sgd",
    ),
    OptimizerSpec(
        "lora_pro_adamw",
        lora_pro_adamw,
        "LoRA-Pro",
        _LORA_PRO,
        "https://arxiv.org/abs/2407.18242",
        "adamw",
    ),
)

OPTIMIZERS: Mapping[str, OptimizerSpec] = types.MappingProxyType({s.name: s for s in _SPECS})
"""Every optimizer of the library and the optax baselines it is compared with, by name."""


def get_optimizer(
    name: str, learning_rate: base.ScalarOrSchedule, **hyperparameters: Any
) -> optax.GradientTransformation:
    """The optimizer ``name`` of :data:`OPTIMIZERS`, built with ``learning_rate``.

    Args:
      name: a key of :data:`OPTIMIZERS` (e.g. ``"lora_rite"``, ``"adamw"``).
      learning_rate: a float or an optax schedule.
      **hyperparameters: the factory's other arguments (see
        ``OPTIMIZERS[name].defaults``), e.g. ``b1=0.9`` or ``pairs=...``.

    Returns:
      The :class:`optax.GradientTransformation`.

    Raises:
      ValueError: for an unknown name (listing the known ones).
      TypeError: for a hyperparameter the optimizer does not have (listing those it has).

    Example:
      >>> import lora_optax
      >>> tx = lora_optax.get_optimizer("lora_rite", 1e-3, weight_decay=0.0)
      >>> lora_optax.OPTIMIZERS["solora_adamw"].needs_full_grads
      True
    """
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}.")
    unknown = sorted(set(hyperparameters) - set(spec.defaults))
    if unknown:
        raise TypeError(
            f"get_optimizer({name!r}): {spec.factory.__name__} has no hyperparameter "
            f"{', '.join(unknown)}; it takes {', '.join(spec.defaults)}."
        )
    return spec.factory(learning_rate, **hyperparameters)
