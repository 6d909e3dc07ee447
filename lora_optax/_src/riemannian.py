"""Riemannian-preconditioned LoRA: scaled GD and scaled AdamW (Zhang & Pilanci, 2024).

Notation: ``A`` is read as an m×r matrix and ``B`` as an r×n matrix (``ΔW = s·A B``,
``s`` the LoRA scale); ``g_A``, ``g_B`` are their gradients and ``δ`` a damping.
"""

from __future__ import annotations

from typing import Any

import optax

from lora_optax._src import base, pairwise
from lora_optax._src.pairs import PairSpec


def scale_by_riemannian_preconditioner(
    *, delta: float = 1e-6, pairs: PairSpec = None
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions LoRA gradients with the Riemannian metric of Zhang & Pilanci.

    For every LoRA pair (``ΔW = s·A B``; ``A`` is read as an m×r matrix, ``B`` as an
    r×n matrix, ``g_A``, ``g_B`` are their gradients):

    .. math::

      \tilde g_A = g_A (B B^\top + \delta I)^{-1}, \qquad
      \tilde g_B = (A^\top A + \delta I)^{-1} g_B,

    both from the pre-step parameters (simultaneous update, paper eq. (1)). The r×r
    systems are solved by Cholesky in float32 or wider, with ``δ`` raised by a
    relative floor ``r·ε·tr(·)`` (ε the compute dtype's epsilon; below 1e-15 relative in
    float64) so that ill-conditioned or rank-deficient factors stay finite; ``B = 0`` gives
    ``g̃_A = g_A / δ``, which is 0 at a standard LoRA initialisation since then
    ``g_A = s·G Bᵀ = 0``. Leaves that are not in any pair pass through unchanged.
    Batched over the stacked-layer axes of each pair.

    Args:
      delta: damping ``δ`` added to both Gram matrices (paper: 1e-6).
      pairs: how to find the LoRA pairs: ``None`` for automatic discovery
        (:func:`lora_optax.find_lora_pairs`), a sequence of
        :class:`lora_optax.LoRAPair`, a callable ``params -> pairs`` or a label tree.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` whose ``update``
      needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> tx = optax.chain(lora_optax.scale_by_riemannian_preconditioner(),
      ...                  optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["lora_b"].shape
      (2, 3)

    References:
      Zhang & Pilanci, *Riemannian Preconditioned LoRA for Fine-Tuning Foundation
      Models*, ICML 2024. https://arxiv.org/abs/2402.02347
    """
    return pairwise.riemannian_preconditioner(
        delta=delta, pairs=pairs, what="scale_by_riemannian_preconditioner"
    )


def scaled_sgd(
    learning_rate: base.ScalarOrSchedule,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scaled gradient descent: SGD on Riemannian-preconditioned LoRA gradients.

    .. math::

      A \leftarrow A - \eta\, g_A (B B^\top + \delta I)^{-1}, \qquad
      B \leftarrow B - \eta\, (A^\top A + \delta I)^{-1} g_B.

    Leaves outside any pair get the base optimizer, :func:`optax.sgd`.

    Args:
      learning_rate: a float or an optax schedule.
      delta: damping of the r×r Gram matrices.
      pairs: pair spec, see :func:`scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, lora_optax
      >>> a = jnp.zeros((4, 2)).at[0, 0].set(1.0).at[1, 1].set(2.0)  # AᵀA = diag(1, 4)
      >>> params = {"lora_a": a, "lora_b": jnp.zeros((2, 3))}
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> tx = lora_optax.scaled_sgd(0.1)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> [round(float(x), 4) for x in updates["lora_b"][:, 0]]  # −η (AᵀA + δI)⁻¹ g_B
      [-0.1, -0.025]

    References:
      Zhang & Pilanci, *Riemannian Preconditioned LoRA for Fine-Tuning Foundation
      Models*, ICML 2024 (scaled GD, Alg. 1 without momentum).
      https://arxiv.org/abs/2402.02347
    """
    base.check_learning_rate(learning_rate)
    return pairwise.lora_optimizer(
        optax.chain(
            scale_by_riemannian_preconditioner(delta=delta, pairs=pairs),
            optax.sgd(learning_rate),
        ),
        optax.sgd(learning_rate),
        pairs=pairs,
        what="scaled_sgd",
    )


def scaled_adamw(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scaled AdamW: Riemannian preconditioning of the raw gradient, then AdamW.

    The preconditioned gradients ``g̃_A = g_A (BBᵀ + δI)⁻¹``,
    ``g̃_B = (AᵀA + δI)⁻¹ g_B`` are fed to exactly :func:`optax.adamw` (bias-corrected
    moments, decoupled weight decay). Leaves outside any pair get the base optimizer,
    the same :func:`optax.adamw`.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`.
      delta: damping of the r×r Gram matrices.
      pairs: pair spec, see :func:`scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> pair = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> params = {"layer": pair, "bias": jnp.ones(3)}
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> tx = lora_optax.scaled_adamw(1e-3)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> adamw = optax.adamw(1e-3)  # the bias is outside any pair: plain AdamW
      >>> want, _ = adamw.update(grads["bias"], adamw.init(params["bias"]), params["bias"])
      >>> bool(jnp.allclose(updates["bias"], want))
      True

    References:
      Zhang & Pilanci, *Riemannian Preconditioned LoRA for Fine-Tuning Foundation
      Models*, ICML 2024, Alg. 1 (scaled AdamW). https://arxiv.org/abs/2402.02347
    """
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    return pairwise.lora_optimizer(
        optax.chain(scale_by_riemannian_preconditioner(delta=delta, pairs=pairs), adamw),
        adamw,
        pairs=pairs,
        what="scaled_adamw",
    )
