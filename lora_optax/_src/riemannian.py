"""Riemannian-preconditioned LoRA: scaled GD and scaled AdamW (Zhang & Pilanci, 2024)."""

from __future__ import annotations

from typing import Any

import optax

from lora_optax._src import base, linalg
from lora_optax._src.pairs import (
    LeafIndex,
    LoRAPair,
    PairSpec,
    check_tree_match,
    path_str,
    resolve_pairs,
)


def precondition_pair(
    pair: LoRAPair, g_a: Any, g_b: Any, a: Any, b: Any, delta: Any
) -> tuple[Any, Any]:
    """``(g_A (B Bᵀ + δI)⁻¹, (AᵀA + δI)⁻¹ g_B)`` for one pair, in the factors' dtypes."""
    a_m, b_m = linalg.a_matrix(pair, a), linalg.b_matrix(pair, b)
    g_a_m, g_b_m = linalg.a_matrix(pair, g_a), linalg.b_matrix(pair, g_b)
    # δ plus a relative floor ε·tr(K): a fixed δ far below float32 resolution of an
    # ill-conditioned Gram matrix would let its Cholesky factorisation fail (NaN).
    k_b, k_a = linalg.gram_rows(b_m), linalg.gram_cols(a_m)
    rel = float(pair.rank)  # Cholesky's backward error grows with the matrix size
    new_g_a = linalg.solve_right_spd(g_a_m, k_b, linalg.safe_damping(k_b, delta, rel=rel))
    new_g_b = linalg.solve_left_spd(k_a, g_b_m, linalg.safe_damping(k_a, delta, rel=rel))
    return (
        linalg.from_matrix(new_g_a, g_a.shape, pair).astype(g_a.dtype),
        linalg.from_matrix(new_g_b, g_b.shape, pair).astype(g_b.dtype),
    )


def pair_params(
    pairs: tuple[LoRAPair, ...], params: Any, what: str, *, updates: Any = None
) -> LeafIndex:
    """Indexes ``params`` and checks every pair's factors are in it.

    With ``updates`` given, also checks that ``updates`` and ``params`` have the same
    leaves and shapes (:func:`lora_optax._src.pairs.check_tree_match`).
    """
    base.require_params(params, what)
    if updates is not None:
        check_tree_match(updates, params, what=what)
    index = LeafIndex(params)
    for pair in pairs:
        for path in (pair.a_path, pair.b_path):
            if path not in index:
                raise ValueError(
                    f"{what}: params has no leaf at {path_str(path)} although the "
                    "updates do; params and updates must have the same structure."
                )
    return index


def scale_by_riemannian_preconditioner(
    delta: float = 1e-6, *, pairs: PairSpec = None
) -> optax.GradientTransformation:
    r"""Preconditions LoRA gradients with the Riemannian metric of Zhang & Pilanci.

    For every LoRA pair (``ΔW = s·A B``, ``A`` m×r, ``B`` r×n):

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
      A stateless :class:`optax.GradientTransformation` whose ``update`` needs
      ``params``.

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
    base.check_non_negative(delta, "delta")
    what = "scale_by_riemannian_preconditioner"

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p = pair_params(resolved, params, what, updates=updates)
        u = LeafIndex(updates)
        new = {}
        for pair in resolved:
            new[pair.a_path], new[pair.b_path] = precondition_pair(
                pair, u[pair.a_path], u[pair.b_path], p[pair.a_path], p[pair.b_path], delta
            )
        return u.replace(new), state

    return optax.GradientTransformation(init_fn, update_fn)


def scaled_sgd(
    learning_rate: base.ScalarOrSchedule,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""Scaled gradient descent: SGD on Riemannian-preconditioned LoRA gradients.

    .. math::

      A \leftarrow A - \eta\, g_A (B B^\top + \delta I)^{-1}, \qquad
      B \leftarrow B - \eta\, (A^\top A + \delta I)^{-1} g_B.

    Leaves outside any pair get plain SGD.

    Args:
      learning_rate: a float or an optax schedule.
      delta: damping of the r×r Gram matrices.
      pairs: pair spec, see :func:`scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformation`; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = lora_optax.scaled_sgd(0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)

    References:
      Zhang & Pilanci, ICML 2024 (scaled GD, Alg. 1 without momentum).
    """
    base.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_riemannian_preconditioner(delta, pairs=pairs),
        optax.scale_by_learning_rate(learning_rate),
    )


def scaled_adamw(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    delta: float = 1e-6,
    mu_dtype: Any = None,
    mask: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scaled AdamW: Riemannian preconditioning of the raw gradient, then AdamW.

    The preconditioned gradients ``g̃_A = g_A (BBᵀ + δI)⁻¹``,
    ``g̃_B = (AᵀA + δI)⁻¹ g_B`` are fed to exactly :func:`optax.adamw` (bias-corrected
    moments, decoupled weight decay). Leaves outside any pair get plain AdamW.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's decay rates and denominator epsilon.
      weight_decay: decoupled weight decay (multiplied by the learning rate).
      delta: damping of the r×r Gram matrices.
      mu_dtype: dtype of Adam's first moment (default: the parameter dtype).
      mask: weight-decay mask, as in :func:`optax.adamw`.
      pairs: pair spec, see :func:`scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.scaled_adamw(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)

    References:
      Zhang & Pilanci, *Riemannian Preconditioned LoRA for Fine-Tuning Foundation
      Models*, ICML 2024, Alg. 1 (scaled AdamW).
    """
    base.check_learning_rate(learning_rate)
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(weight_decay, "weight_decay")
    return optax.chain(
        scale_by_riemannian_preconditioner(delta, pairs=pairs),
        optax.adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mu_dtype=mu_dtype,
            mask=mask,
        ),
    )
