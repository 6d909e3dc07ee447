"""LoRA+ (Hayou, Ghosh & Yu, 2024): AdamW with a larger learning rate for ``B``.

Notation: ``A`` is read as an m×r matrix and ``B`` as an r×n matrix (``ΔW = s·A B``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, pairwise
from lora_optax._src.pairs import LoRAPair, PairSpec


def scale_lora_b(*, ratio: float, pairs: PairSpec = None) -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates of every pair's ``B`` factor by ``ratio``.

    Leaves outside pairs (and every ``A``) pass through unchanged.

    Args:
      ratio: the factor (``η_B / η_A`` when placed before the learning rate).
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs`.
    """
    base.check_positive(ratio, "ratio")

    def scale_b(pair: LoRAPair, m: pairwise.PairMatrices) -> tuple[jax.Array, jax.Array]:
        del pair
        return m.g_a, (m.g_b * jnp.asarray(ratio, m.g_b.dtype)).astype(m.g_b.dtype)

    return pairwise.stateless_pair_transformation(
        scale_b, pairs=pairs, what="scale_lora_b", needs_params=False
    )


def lora_plus(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    ratio: float = 16.0,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA+: AdamW whose learning rate for ``B`` is ``ratio`` times that of ``A``.

    .. math::

      A \leftarrow A - \eta\,(\hat m_A / (\sqrt{\hat v_A} + \epsilon) + \lambda A),
      \qquad
      B \leftarrow B - \rho\,\eta\,(\hat m_B / (\sqrt{\hat v_B} + \epsilon) + \lambda B)

    with ``ρ = ratio``, ``m̂``, ``v̂`` Adam's bias-corrected moments and ``λ`` the weight
    decay. ``A`` gets exactly :func:`optax.adamw`, and so do the leaves outside any pair
    (the base optimizer); the decoupled weight decay of ``B`` uses ``B``'s learning
    rate, as in the LoRA+ reference implementation.

    Args:
      learning_rate: learning rate of ``A`` (float or optax schedule).
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`.
      ratio: ``η_B / η_A`` (LoRA+ and PEFT: 16 = 2⁴; the LoRA-RITE paper used 4 for
        decoder models).
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.lora_plus(1e-3, weight_decay=0.0, ratio=16.0)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> float(updates["lora_b"][0, 0] / updates["lora_a"][0, 0])
      16.0

    References:
      Hayou, Ghosh & Yu, *LoRA+: Efficient Low Rank Adaptation of Large Models*,
      ICML 2024. https://arxiv.org/abs/2402.12354
    """
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    for_pairs = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        scale_lora_b(ratio=ratio, pairs=pairs),
        optax.scale_by_learning_rate(learning_rate),
    )
    return pairwise.lora_optimizer(for_pairs, adamw, pairs=pairs, what="lora_plus")
