"""SoLoRA: second-order low-rank adaptation with an adaptive weighted metric.

*LoRA Meets Second-Order Optimization: Towards Optimal Low-Rank Updates* (anonymous
submission under double-blind review, 2025; Alg. 1 with SGD, Alg. 2 with momentum),
translated to the library's orientation: ``A`` is read as an m×r matrix on the input
side, ``B`` as an r×n matrix on the output side, ``ΔW = s·A B`` (``s`` the LoRA scale);
the paper's ``W = B_p A_p`` has ``A = A_pᵀ``, ``B = B_pᵀ``, its ``L`` on our output axis
and its ``R`` on our input axis.

SoLoRA needs the full-weight gradient ``G = ∂L/∂W`` of every pair each step. It is
passed as the ``full_grads=`` keyword of ``update`` (an optax extra argument, so it
flows through :func:`optax.chain`, :func:`optax.inject_hyperparams`,
:func:`optax.masked` / :func:`optax.partition` and :class:`optax.MultiSteps`); see
:func:`lora_optax.full_grad_for_pair` for the layout and
:func:`lora_optax.value_and_full_grads` for how to compute it in the same backward
pass as the LoRA gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg, pairwise
from lora_optax._src.pairs import (
    LeafIndex,
    LoRAPair,
    PairSpec,
    full_grad_for_pair,
    resolve_pairs,
)


class ScaleBySoLoRAState(NamedTuple):
    """State of :func:`scale_by_solora`.

    Attributes:
      count: number of steps taken (int32).
      stats: a tree laid out like the params: at each pair's ``A`` position the input
        statistic ``r_in`` (shape ``(*batch, *in_axes)``), at its ``B`` position the
        output statistic ``l_out`` (shape ``(*batch, *out_axes)``), float32 or wider;
        ``optax.MaskedNode()`` in place of every other leaf. O(m + n) per pair.
      momentum: Alg. 2 only: a tree laid out like the params holding, at each pair's
        ``A`` position, the FULL gradient momentum ``M`` of the base weight's shape
        ``(*batch, *in_axes, *out_axes)`` (one base-weight-sized array per pair);
        ``optax.MaskedNode()`` elsewhere (everywhere for Alg. 1).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    stats: Any
    momentum: Any


def _metric_sqrt(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Diagonals of ``D^½`` and ``D^(-½)`` for ``D = diag(v / sqrt(‖v‖₁))``, ``v ≥ 0``.

    ``D^½ = sqrt(v) / ‖v‖₁^¼``. Zero entries (and ``v = 0``) give ``D^½ = 0`` and,
    by the pseudo-inverse convention ``1/0 := 0``, ``D^(-½) = 0``; entries whose
    square root is below the dtype's smallest normal number are treated as zero so that
    the reciprocal stays finite.
    """
    l1 = jnp.sum(v, axis=-1, keepdims=True)
    pos = l1 > 0
    half = jnp.where(pos, jnp.sqrt(v) / jnp.sqrt(jnp.sqrt(jnp.where(pos, l1, 1.0))), 0.0)
    ok = half > jnp.finfo(half.dtype).tiny
    mhalf = jnp.where(ok, 1.0 / jnp.where(ok, half, 1.0), 0.0)
    return half, mhalf


def solora_direction(
    a_m: jax.Array,
    b_m: jax.Array,
    g_a: jax.Array,
    g_b: jax.Array,
    r_in: jax.Array,
    l_out: jax.Array,
    delta: Any,
    *,
    use_metric: bool = True,
    balanced: bool = True,
) -> tuple[jax.Array, jax.Array]:
    r"""SoLoRA's directions ``(Δ_A, Δ_B)`` for batched matrices.

    With ``R = diag(r_in / sqrt(‖r_in‖₁))`` (m, input side), ``L = diag(l_out /
    sqrt(‖l_out‖₁))`` (n, output side), ``K_A = AᵀR^½A + δI`` and ``K_B = B L^½ Bᵀ + δI``:

    .. math::

      Δ_A = [I − ½ A K_A^{-1} A^⊤ R^{½}]\, R^{-½} g_A K_B^{-1}, \qquad
      Δ_B = K_A^{-1} g_B L^{-½}\, [I − ½ L^{½} B^⊤ K_B^{-1} B].

    Args:
      a_m, b_m: ``(*batch, m, r)`` and ``(*batch, r, n)`` factor views.
      g_a, g_b: the LoRA gradients (``s G Bᵀ``, ``s Aᵀ G``, or with ``M`` for Alg. 2),
        same shapes.
      r_in, l_out: ``(*batch, m)`` and ``(*batch, n)`` statistics (≥ 0).
      delta: damping ``δ`` of both r×r matrices (every inverse above is damped).
      use_metric: ``False`` sets ``L = R = I`` (for tests of the reduction).
      balanced: ``False`` drops the two ½-terms; with ``use_metric=False`` too this is
        the Riemannian preconditioner ``(g_A (BBᵀ+δI)⁻¹, (AᵀA+δI)⁻¹ g_B)``.

    Returns:
      ``(Δ_A, Δ_B)`` in float32 or wider.
    """
    ct = linalg.compute_dtype(jnp.result_type(a_m, b_m, g_a, g_b, r_in, l_out))
    a_m, b_m, g_a, g_b = (x.astype(ct) for x in (a_m, b_m, g_a, g_b))
    if use_metric:
        r_half, r_mhalf = _metric_sqrt(r_in.astype(ct))
        l_half, l_mhalf = _metric_sqrt(l_out.astype(ct))
    else:
        r_half = r_mhalf = jnp.ones(a_m.shape[:-1], ct)
        l_half = l_mhalf = jnp.ones(b_m.shape[:-2] + b_m.shape[-1:], ct)
    ra = r_half[..., :, None] * a_m  # R^½ A                  (m×r)
    k_a = linalg.symmetrize(linalg.cross_gram_cols(a_m, ra))  # Aᵀ R^½ A   (r×r)
    bl = b_m * l_half[..., None, :]  # B L^½                  (r×n)
    k_b = linalg.symmetrize(linalg.cross_gram_rows(bl, b_m))  # B L^½ Bᵀ   (r×r)
    delta_a, delta_b = linalg.safe_damping(k_a, delta), linalg.safe_damping(k_b, delta)
    d_a = linalg.solve_right_spd(r_mhalf[..., :, None] * g_a, k_b, delta_b)  # R^-½ g_A K_B⁻¹
    d_b = linalg.solve_left_spd(k_a, g_b * l_mhalf[..., None, :], delta_a)  # K_A⁻¹ g_B L^-½
    if balanced:
        # [I − ½ A K_A⁻¹ AᵀR^½] X: AᵀR^½X is r×r, so no m×m matrix is formed.
        y = linalg.cross_gram_cols(ra, d_a)
        d_a = d_a - 0.5 * (a_m @ linalg.solve_left_spd(k_a, y, delta_a))
        # Y [I − ½ L^½ Bᵀ K_B⁻¹ B]: Y L^½ Bᵀ is r×r.
        w = linalg.cross_gram_rows(d_b * l_half[..., None, :], b_m)
        d_b = d_b - 0.5 * (linalg.solve_right_spd(w, k_b, delta_b) @ b_m)
    return d_a, d_b


def _vec_a(pair: LoRAPair, v: jax.Array) -> jax.Array:
    """``(*batch, *in) -> (*batch, m)`` (a vector over A's input axes)."""
    return linalg.a_matrix(pair, v[..., None])[..., 0]


def _vec_b(pair: LoRAPair, v: jax.Array) -> jax.Array:
    """``(*batch, *out) -> (*batch, n)`` (a vector over B's output axes)."""
    return linalg.b_matrix(pair, jnp.expand_dims(v, pair.batch_ndim))[..., 0, :]


def full_grad_kernel(pair: LoRAPair, g: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """A full gradient given in kernel or matrix form, in kernel form."""
    if tuple(g.shape) == tuple(kernel_shape):
        return g
    return linalg.from_matrix(g, kernel_shape, pair)


def _updated_statistics(
    pair: LoRAPair, g: jax.Array, r_old: jax.Array, l_old: jax.Array, beta: Any
) -> tuple[jax.Array, jax.Array]:
    """``β r + (1-β) rowsums(G⊙G)`` and ``β l + (1-β) colsums(G⊙G)`` in the statistics'
    own layouts (``(*batch, *in)`` and ``(*batch, *out)``) and shardings."""
    g_m = linalg.full_grad_matrix(pair, g)
    g2 = g_m * g_m
    k = pair.batch_ndim
    row = linalg.from_matrix(jnp.sum(g2, axis=-1)[..., None], r_old.shape + (1,), pair)
    col = jnp.sum(g2, axis=-2)[..., None, :]
    col = linalg.from_matrix(col, l_old.shape[:k] + (1,) + l_old.shape[k:], pair)
    r_new = beta * r_old + (1.0 - beta) * linalg.reshard_like(row[..., 0], r_old)
    l_new = beta * l_old + (1.0 - beta) * linalg.reshard_like(jnp.squeeze(col, axis=k), l_old)
    return r_new, l_new


def _momentum_gradients(
    pair: LoRAPair, g: jax.Array, m_old: jax.Array, a_m: jax.Array, b_m: jax.Array, momentum: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Alg. 2: ``M ← β₃ M + (1-β₃) G`` and the LoRA gradients rebuilt from it,
    ``(M, s M Bᵀ, s Aᵀ M)``."""
    g_k = full_grad_kernel(pair, g, m_old.shape)
    m_new = momentum * m_old + (1.0 - momentum) * linalg.reshard_like(
        g_k.astype(m_old.dtype), m_old
    )
    mm = linalg.full_grad_matrix(pair, m_new)
    g_a = pair.scale * linalg.contract_like("...mn,...rn->...mr", mm, b_m, a_m)
    g_b = pair.scale * linalg.contract_like("...mr,...mn->...rn", a_m, mm, b_m)
    return m_new, g_a, g_b


def scale_by_solora(
    mu_dtype: Any = None,
    *,
    beta: float = 0.98,
    momentum: float | None = None,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SoLoRA's preconditioned LoRA directions (paper Alg. 1 / Alg. 2).

    ``update(updates, state, params, *, full_grads)``. For every LoRA pair, with ``G``
    its full-weight gradient (m×n, from ``full_grads``):

    .. math::

      r_{in} ← β r_{in} + (1-β)\,\mathrm{rowsums}(G⊙G), \quad
      l_{out} ← β l_{out} + (1-β)\,\mathrm{colsums}(G⊙G)

    (no bias correction, as in the paper), then the directions of
    :func:`solora_direction` from the pre-step ``A``, ``B`` and the updated statistics.

    * ``momentum=None`` (Alg. 1): ``g_A``, ``g_B`` are the incoming updates (what
      backprop gives: ``s G Bᵀ``, ``s Aᵀ G``); ``G`` only feeds the statistics. The
      output is ``(Δ_A, Δ_B)``.
    * ``momentum=β₃`` (Alg. 2): ``M ← β₃ M + (1-β₃) G`` (a full m×n array per pair),
      ``g_A = s M Bᵀ``, ``g_B = s Aᵀ M`` (the incoming updates of A and B are not used)
      and the output is ``c_t (Δ_A, Δ_B)`` with ``c_t = sqrt(1-βᵗ) / (1-β₃ᵗ)``.

    ``s`` is :attr:`LoRAPair.scale` (set it, e.g. ``find_lora_pairs(scale=alpha/r)``;
    it only matters for Alg. 2, where the LoRA gradients are rebuilt from ``M``).

    Damping (a library decision; the paper inverts ``AᵀR^½A`` and ``B L^½ Bᵀ`` as if
    they were always invertible): both r×r matrices get ``+ δI`` everywhere they are
    inverted, like the Riemannian preconditioner, plus a relative floor ``ε·tr(K)``
    (ε the float epsilon) that keeps the Cholesky
    factorisation from failing when large steps make the factors ill-conditioned
    (negligible otherwise: below 1e-15 relative in float64). ``B = 0`` at initialisation then gives
    ``Δ_A = 0`` (as ``g_A = 0``) and ``Δ_B = K_A⁻¹ g_B L^(-½)``. Zero statistics
    (e.g. an input feature that never receives gradient) give ``R^(-½) = 0`` there
    (pseudo-inverse convention). All of it runs in float32 or wider; r×r systems are
    solved by Cholesky.

    Leaves outside any pair pass through unchanged (the aliases give them their base
    optimizer: :func:`optax.sgd` for :func:`solora_sgd`, :func:`optax.adamw` for
    :func:`solora_adamw`).

    Memory: Alg. 1 keeps O(m + n) per pair. Alg. 2 keeps one base-weight-sized array
    per pair (``M``, in ``mu_dtype``, default float32) — as much as the frozen weight.

    Extra arguments: the kwarg ``full_grads`` passes through :func:`optax.chain`,
    :func:`optax.inject_hyperparams`, :func:`optax.masked`/:func:`optax.partition`
    (not masked unless ``mask_compatible_extra_args``; lookups are by path anyway).
    :class:`optax.MultiSteps` forwards the ``full_grads`` of the call that emits the
    update, NOT an average over the micro-steps (it averages only ``updates``): pass
    the running mean of the micro-batch full gradients yourself if that matters.

    Args:
      mu_dtype: dtype of ``M`` (Alg. 2; default: float32 or wider).
      beta: decay ``β`` of the statistics (paper: ``β₁ = β₂ = 0.98``).
      momentum: ``None`` for Alg. 1, else ``β₃`` of Alg. 2 (paper: 0.9).
      delta: damping ``δ`` of the r×r matrices.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``
      and ``full_grads``.

    Example:
      >>> import jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> tx = optax.chain(lora_optax.scale_by_solora(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> full_grads = jnp.ones((4, 3))  # the pair's parent node is the root
      >>> updates, state = tx.update(grads, state, params, full_grads=full_grads)
      >>> updates["lora_a"].shape
      (4, 2)

    References:
      *LoRA Meets Second-Order Optimization: Towards Optimal Low-Rank Updates*
      (SoLoRA), anonymous submission under double-blind review, 2025, Alg. 1 and 2.
    """
    base.check_betas(beta=beta)
    if momentum is not None:
        base.check_betas(momentum=momentum)
    base.check_non_negative(delta, "delta")
    what = "scale_by_solora" if momentum is None else "scale_by_solora(momentum=...)"

    def init_fn(params):
        resolved = resolve_pairs(pairs, params, what=what)
        index = LeafIndex(params)
        stats, mom = {}, {}
        for pair in resolved:
            a, b = index[pair.a_path], index[pair.b_path]
            ct = linalg.compute_dtype(jnp.result_type(a.dtype, b.dtype))
            stats[pair.a_path], stats[pair.b_path] = pairwise.pair_state_zeros(
                pair, a, b, ct, full=False
            )
            if momentum is not None:
                dt = ct if mu_dtype is None else mu_dtype
                mom[pair.a_path] = pairwise.pair_state_zeros(pair, a, b, dt, full=True)
        return ScaleBySoLoRAState(
            count=jnp.zeros([], jnp.int32),
            stats=pairwise.pair_state_tree(params, stats),
            momentum=pairwise.pair_state_tree(params, mom),
        )

    def update_fn(updates, state, params=None, *, full_grads=None, **extra_args):
        del extra_args
        inputs = pairwise.resolve_update(pairs, updates, params, what)
        p, u = inputs.params, inputs.updates
        assert p is not None
        fg = None if full_grads is None else LeafIndex(full_grads)
        stats, mom = LeafIndex(state.stats), LeafIndex(state.momentum)
        t = state.count + 1
        new_u, new_stats, new_mom = {}, {}, {}
        for pair in inputs.pairs:
            g = full_grad_for_pair(pair, full_grads if fg is None else fg, p, what=what)
            r_old, l_old = stats[pair.a_path], stats[pair.b_path]
            ct = r_old.dtype
            g = g.astype(ct)
            r_new, l_new = _updated_statistics(pair, g, r_old, l_old, beta)
            new_stats[pair.a_path], new_stats[pair.b_path] = r_new, l_new
            a_m, b_m = linalg.a_matrix(pair, p[pair.a_path]), linalg.b_matrix(pair, p[pair.b_path])
            if momentum is None:
                g_a = linalg.a_matrix(pair, u[pair.a_path])
                g_b = linalg.b_matrix(pair, u[pair.b_path])
                factor = 1.0
            else:
                new_mom[pair.a_path], g_a, g_b = _momentum_gradients(
                    pair, g, mom[pair.a_path], a_m, b_m, momentum
                )
                tt = t.astype(ct)
                factor = jnp.sqrt(1.0 - beta**tt) / (1.0 - momentum**tt)
            d_a, d_b = solora_direction(
                a_m, b_m, g_a, g_b, _vec_a(pair, r_new), _vec_b(pair, l_new), delta
            )
            new_u.update(pairwise.factor_updates(pair, u, factor * d_a, factor * d_b))
        new_state = ScaleBySoLoRAState(
            count=optax.safe_increment(state.count),
            stats=stats.replace(new_stats),
            momentum=mom.replace(new_mom),
        )
        return u.replace(new_u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def solora_sgd(
    learning_rate: base.ScalarOrSchedule,
    *,
    beta: float = 0.98,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SoLoRA with SGD (paper Alg. 1): ``A ← A − η Δ_A``, ``B ← B − η Δ_B``.

    ``Δ_A``, ``Δ_B`` are :func:`scale_by_solora`'s directions (adaptive weighted
    metric from the full-weight gradients ``G``, balanced low-rank projection). Leaves
    outside any pair get the base optimizer, :func:`optax.sgd`. ``update`` needs
    ``params`` and ``full_grads=``.

    The directions are invariant to the scale of ``G`` (degree 0), so learning rates
    behave like Adam's rather than SGD's (paper Table 4: 5e-5 … 8e-4 for GPT-2).

    Args:
      learning_rate: a float or an optax schedule.
      beta: decay of the statistics (paper: 0.98).
      delta: damping of the r×r matrices (see :func:`scale_by_solora`).
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"layer": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}}
      >>> tx = lora_optax.solora_sgd(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> full_grads = {"layer": jnp.ones((8, 8))}  # G at the pair's parent node
      >>> updates, state = tx.update(grads, state, params, full_grads=full_grads)

    References:
      *LoRA Meets Second-Order Optimization: Towards Optimal Low-Rank Updates*
      (SoLoRA), anonymous submission under double-blind review, 2025, Alg. 1.
    """
    base.check_learning_rate(learning_rate)
    return pairwise.lora_optimizer(
        optax.chain(scale_by_solora(beta=beta, delta=delta, pairs=pairs), optax.sgd(learning_rate)),
        optax.sgd(learning_rate),
        pairs=pairs,
        what="solora_sgd",
    )


def solora_adamw(
    learning_rate: base.ScalarOrSchedule,
    eps: float = 1e-8,
    mu_dtype: Any = None,
    weight_decay: float = 0.01,
    mask: Any = None,
    *,
    beta: float = 0.98,
    momentum: float = 0.9,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SoLoRA with momentum and decoupled weight decay (paper Alg. 2).

    For every pair, with ``t`` the 1-based step:

    .. math::

      M ← β_3 M + (1-β_3) G, \quad g_A = s M B^⊤, \quad g_B = s A^⊤ M,

      A ← (1-λη) A − η \frac{\sqrt{1-β^t}}{1-β_3^t} Δ_A, \qquad
      B ← (1-λη) B − η \frac{\sqrt{1-β^t}}{1-β_3^t} Δ_B,

    with ``Δ`` from :func:`solora_direction` and the statistics updated from the raw
    ``G`` (see :func:`scale_by_solora`). The paper's "(1 − λη_t B_t)" is read as
    ``(1 − λη_t) B_t``. Leaves outside any pair get the base optimizer,
    :func:`optax.adamw` with ``b1 = momentum``, ``b2 = beta`` and this ``eps``,
    ``mu_dtype``, ``weight_decay`` and ``mask``.

    Memory: one full base-weight-sized momentum ``M`` per pair (float32 unless
    ``mu_dtype``), in addition to the O(m + n) statistics.

    Args:
      learning_rate: a float or an optax schedule.
      eps: Adam's epsilon for leaves outside any pair.
      mu_dtype: dtype of ``M`` and of other leaves' first moment.
      weight_decay: decoupled weight decay ``λ`` (paper: 0.01), multiplied by ``η``.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      beta: decay of the statistics ``β = β₁ = β₂`` (paper: 0.98).
      momentum: ``β₃`` (paper: 0.9).
      delta: damping of the r×r matrices.
      pairs: pair spec.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``
      and ``full_grads=``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"layer": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}}
      >>> tx = lora_optax.solora_adamw(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params,
      ...                            full_grads={"layer": jnp.ones((8, 8))})

    References:
      *LoRA Meets Second-Order Optimization: Towards Optimal Low-Rank Updates*
      (SoLoRA), anonymous submission under double-blind review, 2025, Alg. 2.
    """
    for_pairs = optax.chain(
        scale_by_solora(mu_dtype, beta=beta, momentum=momentum, delta=delta, pairs=pairs),
        pairwise.decay_and_learning_rate(learning_rate, weight_decay, mask),
    )
    base_optimizer = pairwise.adamw_base(
        learning_rate, momentum, beta, eps, 0.0, mu_dtype, weight_decay, mask
    )
    return pairwise.lora_optimizer(for_pairs, base_optimizer, pairs=pairs, what="solora_adamw")
