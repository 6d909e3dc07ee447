"""iLoRA and πLoRA: imbalance-regularised LoRA (Zhu et al.), SPEC §2.3."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg
from lora_optax._src.pairs import LeafIndex, LoRAPair, PairSpec, resolve_pairs, with_input_checks
from lora_optax._src.riemannian import pair_params, scaled_adamw

# Default regularisation strengths λ (see the docstrings of `ilora` / `pilora`).
ILORA_STRENGTH = 0.1
PILORA_STRENGTH = 1.0
# Default bound τ on ηλν (see `add_imbalance_regularization`): 2 is the stability
# limit of explicit Euler, so the paper's step is kept wherever it is stable.
SAFEGUARD = 2.0


class ImbalanceRegularizationState(NamedTuple):
    """State of :func:`add_imbalance_regularization`: the number of steps taken
    (the learning-rate schedule is evaluated at it, as optax's own ``scale_by_schedule``)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def imbalance_ratio(pair: LoRAPair, b_shape: tuple[int, ...]) -> float:
    """``ρ = r / n_out`` of a pair, ``n_out`` the flattened output size of ``B``."""
    n_out = 1
    for d in b_shape[pair.batch_ndim + 1 :]:
        n_out *= int(d)
    return pair.rank / n_out


def _inf_norm(m: jax.Array) -> jax.Array:
    """``max_i Σ_j |m_ij|`` of batched square matrices, an upper bound of the spectral
    norm of a symmetric matrix (at most √r times too large), kept as ``(*batch, 1, 1)``."""
    return jnp.max(jnp.sum(jnp.abs(m), axis=-1, keepdims=True), axis=-2, keepdims=True)


def imbalance_step(
    pair: LoRAPair, a_star: Any, b_star: Any, step: Any, *, safeguard: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """The decoupled imbalance step of one pair, as increments of ``A*`` and ``B*``.

    With ``D = A*ᵀA* − ρ B*B*ᵀ`` (r×r, ``ρ = r / n_out``) and ``c = η λ`` (``step``),
    returns ``(−c A* D, c ρ D B*)`` in the factors' shapes and in float32 or wider,
    so that ``A* − c A* D`` and ``B* − c ρ (ρ B*B*ᵀ − A*ᵀA*) B*`` are the
    regularised factors. With ``safeguard = τ``, ``c`` is replaced by ``min(c, τ/ν)``
    (see :func:`add_imbalance_regularization`).
    """
    a_m, b_m = linalg.a_matrix(pair, a_star), linalg.b_matrix(pair, b_star)
    ct = linalg.compute_dtype(jnp.result_type(a_m, b_m))
    a_m, b_m = a_m.astype(ct), b_m.astype(ct)
    rho = imbalance_ratio(pair, b_star.shape)
    c = jnp.asarray(step, ct)
    if safeguard is None:
        d = linalg.gram_cols(a_m) - jnp.asarray(rho, ct) * linalg.gram_rows(b_m)
        delta_a = -c * jnp.matmul(a_m, d)
        delta_b = (c * rho) * jnp.matmul(d, b_m)
    else:
        # Work on the factors divided by 2^e, 2^e ~ their largest entry (per matrix):
        # a power-of-two scaling is exact in binary floating point, so every product
        # below is the unscaled one times a power of two (the same step, bit for bit,
        # while the safeguard is inactive), and D ~ |A|² and A·D ~ |A|³ cannot
        # overflow, however large the factors.
        big = jnp.maximum(
            jnp.max(jnp.abs(a_m), axis=(-2, -1), keepdims=True),
            jnp.max(jnp.abs(b_m), axis=(-2, -1), keepdims=True),
        )
        info = jnp.finfo(ct)
        e = jnp.clip(jnp.frexp(big)[1], 3 - int(info.maxexp), int(info.maxexp) - 3)
        one = jnp.ones((), ct)
        pow_e, pow_neg_e = jnp.ldexp(one, e), jnp.ldexp(one, -e)  # exact: |e| < maxexp - 2
        a_s, b_s = a_m * pow_neg_e, b_m * pow_neg_e
        d = linalg.gram_cols(a_s) - jnp.asarray(rho, ct) * linalg.gram_rows(b_s)  # D/2^{2e}
        nu = max(1.0, rho) * _inf_norm(d)  # ν / 2^{2e}, ν ≥ max(1, ρ)‖D‖₂
        c_s = c * pow_e * pow_e  # c·2^{2e}; inf if it overflows
        tau = jnp.asarray(safeguard, ct)
        coef = jnp.where(c_s * nu <= tau, c_s, tau / jnp.where(nu > 0, nu, 1))
        # One scalar factor per product (c·2^{3e} while inactive), as in the plain
        # formula, so that XLA contracts it with the caller's addition the same way;
        # D = 0 (no step) must not meet an overflowed c·2^{3e}.
        coef = jnp.where(nu > 0, coef * pow_e, 0)
        delta_a = -coef * jnp.matmul(a_s, d)
        delta_b = (coef * rho) * jnp.matmul(d, b_s)
    return (
        linalg.from_matrix(delta_a, a_star.shape, pair),
        linalg.from_matrix(delta_b, b_star.shape, pair),
    )


def add_imbalance_regularization(
    strength: float,
    learning_rate: base.ScalarOrSchedule,
    *,
    safeguard: float | None = SAFEGUARD,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""Adds iLoRA's decoupled imbalance-regularisation step to a finished update.

    Place it LAST in a chain, after the base optimizer INCLUDING its learning rate
    (like decoupled weight decay in AdamW, paper Alg. 1): the incoming ``updates``
    are the base step ``u``. For every LoRA pair (``A`` m×r, ``B`` r×n) it forms the
    parameters after the base step, ``A* = A + u_A``, ``B* = B + u_B``, and returns
    updates that lead to

    .. math::

      A \leftarrow A^* - \eta\lambda\, A^* (A^{*\top}A^* - \rho B^*B^{*\top}), \qquad
      B \leftarrow B^* - \eta\lambda\rho\, (\rho B^*B^{*\top} - A^{*\top}A^*)\, B^*,

    with ``ρ = r / n_out`` (``n_out``: ``B``'s flattened output size, the paper's
    ``r/m`` with its m the output dimension), ``λ = strength`` and ``η`` the current
    learning rate (the schedule's value at the step count this transformation keeps
    in its state, i.e. the same ``η`` the base step used). Both lines use the
    post-base-step factors (simultaneous). The step is ``η`` times **¼ of the exact
    gradient** of ``λ‖AᵀA − ρBBᵀ‖²_F`` (whose gradient is ``4λ A(AᵀA − ρBBᵀ)`` for
    ``A`` and ``4λρ(ρBBᵀ − AᵀA)B`` for ``B``): the paper's equations (4)–(5), which
    the library follows literally, so ``λ`` values from the paper carry over.

    **Safeguard.** The step is one explicit Euler step of the flow ``Ȧ = −A D``,
    ``Ḃ = ρ D B`` (``D = AᵀA − ρBBᵀ``). Along an eigenvector of ``D`` with
    eigenvalue ``d`` it multiplies ``A`` by ``1 − ηλd`` and ``B`` by ``1 + ηλρd``;
    explicit Euler is stable only while these factors stay in ``[−1, 1]`` where the
    flow shrinks (``ηλd ≤ 2``, ``ηλρ(−d) ≤ 2``). Beyond that the step enlarges the
    factor it should shrink, by ``~ηλ‖A‖²``, so it blows up cubically (factors of
    size 1e8 overflow float32 within two steps). With ``safeguard = τ`` the step size
    ``ηλ`` is replaced by

    .. math::

      \min(\eta\lambda,\ \tau / \nu), \qquad
      \nu = \max(1, \rho)\, \|D\|_\infty \ \ge\ \max(1, \rho)\, \|D\|_2

    (``‖·‖_∞`` the largest absolute row sum of the r×r matrix, computed on the
    factors rescaled by an exact power of two so that it cannot overflow). It is
    inactive — the paper's step, bit for bit — whenever ``ηλν ≤ τ``. When it acts,
    ``ηλ|d| ≤ τ`` and ``ηλρ|d| ≤ τ`` for every eigenvalue, so each factor changes
    by at most ``τ`` times its spectral norm (``‖ΔA‖₂ ≤ τ‖A*‖₂``,
    ``‖ΔB‖₂ ≤ τ‖B*‖₂``) and the update stays finite for any finite factors (below
    ``1/(1 + τ)`` of the float maximum). The default ``τ = 2`` is the Euler
    stability limit: the library deviates from the paper only where the paper's
    explicit step is unstable (up to the slack of the ``∞``-norm bound, at most a
    factor ``√r`` and close to 1 for near-orthogonal factors), e.g. ``ηλ‖A‖² ≳ 2``;
    typical LoRA factors (``‖A‖ ~ 1``, ``ηλ ≤ 1e-2``) are far from it. When it acts
    with ``τ = 2``, the factor being shrunk is never enlarged; smaller ``τ`` (``≤ 1``:
    no sign flips) track the continuous flow more closely.

    The r×r algebra runs in float32 or wider; results are cast back to the update
    dtype. Leaves outside any pair pass through unchanged. Batched over stacked-layer
    axes; multi-axis factors are flattened to their matrix views.

    Args:
      strength: the regularisation strength ``λ`` (non-negative).
      learning_rate: the base optimizer's learning rate (float or optax schedule);
        it must be the same one, so that the regularisation decays with it.
      safeguard: the bound ``τ > 0`` on ``ηλν`` (see above), or ``None`` for the
        paper's explicit step unconditionally.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}
      >>> tx = optax.chain(optax.sgd(0.1),
      ...                  lora_optax.add_imbalance_regularization(0.1, 0.1))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> # ρ = 2/4, AᵀA − ρBBᵀ = (8 − 2)·11ᵀ, A·D = 12: A ← 1 − 0.1·0.1·12
      >>> round(float(new["lora_a"][0, 0]), 4)
      0.88

    References:
      Zhu et al., *Imbalance-Regularized LoRA: A Plug-and-Play Method for Improving
      Fine-Tuning of Foundation Models*, Alg. 1–3, eqs. (4)–(5).
    """
    base.check_non_negative(strength, "strength")
    base.check_learning_rate(learning_rate)
    if safeguard is not None:
        base.check_positive(safeguard, "safeguard")
    what = "add_imbalance_regularization"

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return ImbalanceRegularizationState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p = pair_params(resolved, params, what, updates=updates)
        u = LeafIndex(updates)
        lr = base.learning_rate_at(learning_rate, state.count)
        step = jnp.asarray(lr) * jnp.asarray(strength)
        new = {}
        for pair in resolved:
            u_a, u_b = u[pair.a_path], u[pair.b_path]
            ct = linalg.compute_dtype(jnp.result_type(u_a, u_b, p[pair.a_path], p[pair.b_path]))
            u_a_c, u_b_c = u_a.astype(ct), u_b.astype(ct)
            a_star = p[pair.a_path].astype(ct) + u_a_c
            b_star = p[pair.b_path].astype(ct) + u_b_c
            d_a, d_b = imbalance_step(pair, a_star, b_star, step, safeguard=safeguard)
            new[pair.a_path] = (u_a_c + d_a).astype(u_a.dtype)
            new[pair.b_path] = (u_b_c + d_b).astype(u_b.dtype)
        return u.replace(new), ImbalanceRegularizationState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def ilora(
    learning_rate: base.ScalarOrSchedule,
    *,
    strength: float = ILORA_STRENGTH,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mu_dtype: Any = None,
    mask: Any = None,
    safeguard: float | None = SAFEGUARD,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""iLoRA: AdamW followed by the decoupled imbalance regularisation (SPEC §2.3).

    Each step is exactly :func:`optax.adamw` (bias-corrected moments, decoupled
    weight decay), giving ``(A*, B*)``, then
    ``A ← A* − ηλ A*(A*ᵀA* − ρB*B*ᵀ)``, ``B ← B* − ηλρ(ρB*B*ᵀ − A*ᵀA*)B*`` with
    ``ρ = r / n_out`` (see :func:`add_imbalance_regularization`). Leaves outside any
    pair get plain AdamW.

    Default strength ``λ = 0.1``: the paper tunes ``λ`` per task over
    ``{1e-3, …, 1e2}`` (Mistral-7B GLUE, Table 5: iLoRA values 0.01 … 100; GPT-2 E2E,
    Table 3: 10), and its robustness study (App. D.4.4, Table 10) fixes ``λ = 0.1``
    across tasks with only a small loss against per-task tuning; that untuned setting
    is the natural default. The step is proportional to ``η λ ‖A‖²``-sized terms, so
    tune ``λ`` together with the learning rate and the factors' scale.

    Args:
      learning_rate: a float or an optax schedule (also scales the regularisation).
      strength: the regularisation strength ``λ``.
      b1, b2, eps: Adam's decay rates and denominator epsilon.
      weight_decay: decoupled weight decay (paper experiments: 0.01).
      mu_dtype: dtype of Adam's first moment.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      safeguard: bound on the imbalance step for huge factors (inactive in the
        normal regime; ``None``: the paper's step unconditionally), see
        :func:`add_imbalance_regularization`.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformation`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.ilora(1e-3, strength=0.1)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)

    References:
      Zhu et al., *Imbalance-Regularized LoRA*, Alg. 1/2.
    """
    base.check_learning_rate(learning_rate)
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(weight_decay, "weight_decay")
    return with_input_checks(
        optax.chain(
            optax.adamw(
                learning_rate,
                b1=b1,
                b2=b2,
                eps=eps,
                weight_decay=weight_decay,
                mu_dtype=mu_dtype,
                mask=mask,
            ),
            add_imbalance_regularization(strength, learning_rate, safeguard=safeguard, pairs=pairs),
        ),
        "ilora",
    )


def pilora(
    learning_rate: base.ScalarOrSchedule,
    *,
    strength: float = PILORA_STRENGTH,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    delta: float = 1e-6,
    mu_dtype: Any = None,
    mask: Any = None,
    safeguard: float | None = SAFEGUARD,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""πLoRA: scaled AdamW followed by the decoupled imbalance regularisation.

    Each step is :func:`lora_optax.scaled_adamw` (raw gradients preconditioned with
    the PRE-step factors, ``g̃_A = g_A(BBᵀ + δI)⁻¹``, ``g̃_B = (AᵀA + δI)⁻¹g_B``, then
    AdamW), giving ``(A*, B*)``, then the step of
    :func:`add_imbalance_regularization` on ``(A*, B*)`` (SPEC §2.3, paper Alg. 3).
    Leaves outside any pair get plain AdamW.

    Default strength ``λ = 1``: the paper's GPT-2 E2E setting for πLoRA (Table 3),
    and the geometric mean of its per-task Mistral-7B GLUE values (Table 5: 0.01,
    0.001, 0.01, 10, 100, 10, 10, 1, 100). The paper gives no untuned πLoRA setting;
    tune ``λ`` over ``{1e-3, …, 1e2}`` as it does.

    Args:
      learning_rate: a float or an optax schedule (also scales the regularisation).
      strength: the regularisation strength ``λ``.
      b1, b2, eps: Adam's decay rates and denominator epsilon.
      weight_decay: decoupled weight decay.
      delta: damping ``δ`` of the r×r Gram matrices of the preconditioner.
      mu_dtype: dtype of Adam's first moment.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      safeguard: bound on the imbalance step for huge factors (inactive in the
        normal regime; ``None``: the paper's step unconditionally), see
        :func:`add_imbalance_regularization`.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformation`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.pilora(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)

    References:
      Zhu et al., *Imbalance-Regularized LoRA*, Alg. 3 (πLoRA); Zhang & Pilanci,
      ICML 2024 (scaled AdamW).
    """
    return optax.chain(
        scaled_adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            mu_dtype=mu_dtype,
            mask=mask,
            pairs=pairs,
        ),
        add_imbalance_regularization(strength, learning_rate, safeguard=safeguard, pairs=pairs),
    )
