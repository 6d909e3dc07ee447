"""LoRA+ (Hayou et al., 2024): AdamW with a larger learning rate for B."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from lora_optax._src import base
from lora_optax._src.pairs import (
    LeafIndex,
    PairSpec,
    check_tree_match,
    resolve_pairs,
    with_input_checks,
)


def scale_lora_b(ratio: float, *, pairs: PairSpec = None) -> optax.GradientTransformation:
    """Multiplies the updates of every pair's ``B`` factor by ``ratio``.

    Args:
      ratio: the factor (``η_B / η_A`` when placed before the learning rate).
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      A stateless :class:`optax.GradientTransformation`.
    """
    base.check_positive(ratio, "ratio")
    what = "scale_lora_b"

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is not None:
            check_tree_match(updates, params, what=what)
        u = LeafIndex(updates)
        new = {}
        for pair in resolve_pairs(pairs, updates, what=what):
            g_b = u[pair.b_path]
            new[pair.b_path] = (g_b * jnp.asarray(ratio, g_b.dtype)).astype(g_b.dtype)
        return u.replace(new), state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_plus(
    learning_rate: base.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mu_dtype: Any = None,
    mask: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA+: AdamW whose learning rate for ``B`` is ``ratio`` times that of ``A``.

    .. math::

      A \leftarrow A - \eta\,(\hat m_A / (\sqrt{\hat v_A} + \epsilon) + \lambda A),
      \qquad
      B \leftarrow B - \rho\,\eta\,(\hat m_B / (\sqrt{\hat v_B} + \epsilon) + \lambda B)

    with ``ρ = ratio``. ``A`` and every leaf outside a pair get exactly
    :func:`optax.adamw`; the decoupled weight decay of ``B`` uses ``B``'s learning
    rate, as in the LoRA+ reference implementation.

    Args:
      learning_rate: learning rate of ``A`` (float or optax schedule).
      ratio: ``η_B / η_A`` (LoRA+ and PEFT: 16 = 2⁴; the LoRA-RITE paper used 4 for
        decoder models).
      b1, b2, eps: Adam's decay rates and denominator epsilon.
      weight_decay: decoupled weight decay.
      mu_dtype: dtype of Adam's first moment.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.lora_plus(1e-3, ratio=16.0, weight_decay=0.0)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> float(updates["lora_b"][0, 0] / updates["lora_a"][0, 0])
      16.0

    References:
      Hayou, Ghosh & Yu, *LoRA+: Efficient Low Rank Adaptation of Large Models*,
      ICML 2024. https://arxiv.org/abs/2402.12354
    """
    base.check_learning_rate(learning_rate)
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(weight_decay, "weight_decay")
    return with_input_checks(
        optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
            optax.add_decayed_weights(weight_decay, mask),
            scale_lora_b(ratio, pairs=pairs),
            optax.scale_by_learning_rate(learning_rate),
        ),
        "lora_plus",
    )
