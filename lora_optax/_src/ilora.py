"""iLoRA and πLoRA: imbalance-regularised LoRA (Zhu, Wu, Gu & Cevher).

Notation: ``A`` is read as an m×r matrix and ``B`` as an r×n matrix (``ΔW = s·A B``);
``n_out = n`` is ``B``'s flattened output size and ``ρ = r / n_out``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg, pairwise
from lora_optax._src.pairs import LoRAPair, PairSpec, resolve_pairs

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


def _inf_norm(m: jax.Array) -> jax.Array:
    """``max_i Σ_j |m_ij|`` of batched square matrices, an upper bound of the spectral
    norm of a symmetric matrix (at most √r times too large), kept as ``(*batch, 1, 1)``."""
    return jnp.max(jnp.sum(jnp.abs(m), axis=-1, keepdims=True), axis=-2, keepdims=True)


def imbalance_step(
    a_m: jax.Array, b_m: jax.Array, step: Any, *, safeguard: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """The decoupled imbalance step of matrix views ``A* (*batch, m, r)``,
    ``B* (*batch, r, n)``, as increments of ``A*`` and ``B*``.

    With ``D = A*ᵀA* − ρ B*B*ᵀ`` (r×r, ``ρ = r / n``) and ``c = η λ`` (``step``),
    returns ``(−c A* D, c ρ D B*)`` in float32 or wider, so that ``A* − c A* D`` and
    ``B* − c ρ (ρ B*B*ᵀ − A*ᵀA*) B*`` are the regularised factors. With
    ``safeguard = τ``, ``c`` is replaced by ``min(c, τ/ν)`` (see
    :func:`add_imbalance_regularization`).
    """
    ct = linalg.compute_dtype(jnp.result_type(a_m, b_m))
    a_m, b_m = a_m.astype(ct), b_m.astype(ct)
    rho = a_m.shape[-1] / b_m.shape[-1]
    c = jnp.asarray(step, ct)
    if safeguard is None:
        d = linalg.gram_cols(a_m) - jnp.asarray(rho, ct) * linalg.gram_rows(b_m)
        return -c * jnp.matmul(a_m, d), (c * rho) * jnp.matmul(d, b_m)
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
    return -coef * jnp.matmul(a_s, d), (coef * rho) * jnp.matmul(d, b_s)


def _regularized(
    pair: LoRAPair, m: linalg.PairMatrices, *, step: Any, safeguard: float | None
) -> tuple[jax.Array, jax.Array]:
    """``u + Δ(p + u)`` for one pair: the base step ``u`` plus the imbalance step taken
    at the post-base-step factors ``A* = A + u_A``, ``B* = B + u_B``."""
    del pair
    assert m.a is not None and m.b is not None
    ct = linalg.compute_dtype(jnp.result_type(m.g_a, m.g_b, m.a, m.b))
    u_a, u_b = m.g_a.astype(ct), m.g_b.astype(ct)
    d_a, d_b = imbalance_step(m.a.astype(ct) + u_a, m.b.astype(ct) + u_b, step, safeguard=safeguard)
    return u_a + d_a, u_b + d_b


def add_imbalance_regularization(
    learning_rate: base.ScalarOrSchedule,
    *,
    strength: float,
    safeguard: float | None = SAFEGUARD,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
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
      learning_rate: the base optimizer's learning rate (float or optax schedule);
        it must be the same one, so that the regularisation decays with it.
      strength: the regularisation strength ``λ`` (non-negative).
      safeguard: the bound ``τ > 0`` on ``ηλν`` (see above), or ``None`` for the
        paper's explicit step unconditionally.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}
      >>> tx = optax.chain(optax.sgd(0.1),
      ...                  lora_optax.add_imbalance_regularization(0.1, strength=0.1))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> # ρ = 2/4, AᵀA − ρBBᵀ = (8 − 2)·11ᵀ, A·D = 12: A ← 1 − 0.1·0.1·12
      >>> round(float(new["lora_a"][0, 0]), 4)
      0.88

    References:
      Zhu, Wu, Gu & Cevher, *Imbalance-Regularized LoRA: A Plug-and-Play Method for
      Improving Fine-Tuning of Foundation Models*, Alg. 1–3, eqs. (4)–(5).
    """
    base.check_non_negative(strength, "strength")
    base.check_learning_rate(learning_rate)
    if safeguard is not None:
        base.check_positive(safeguard, "safeguard")
    what = "add_imbalance_regularization"

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return ImbalanceRegularizationState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        inputs = pairwise.resolve_update(pairs, updates, params, what)
        lr = base.learning_rate_at(learning_rate, state.count)
        step = jnp.asarray(lr) * jnp.asarray(strength)
        fn = functools.partial(_regularized, step=step, safeguard=safeguard)
        new = pairwise.map_pairs(fn, inputs)
        return inputs.updates.replace(new), ImbalanceRegularizationState(
            count=optax.safe_increment(state.count)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ilora(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    strength: float = ILORA_STRENGTH,
    safeguard: float | None = SAFEGUARD,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""iLoRA: AdamW followed by the decoupled imbalance regularisation.

    Each step is exactly :func:`optax.adamw` (bias-corrected moments, decoupled
    weight decay), giving ``(A*, B*)``, then
    ``A ← A* − ηλ A*(A*ᵀA* − ρB*B*ᵀ)``, ``B ← B* − ηλρ(ρB*B*ᵀ − A*ᵀA*)B*`` with
    ``ρ = r / n_out`` (see :func:`add_imbalance_regularization`). Leaves outside any
    pair get the base optimizer, the same :func:`optax.adamw`.

    Default strength ``λ = 0.1``: the paper tunes ``λ`` per task over
    ``{1e-3, …, 1e2}`` (Mistral-7B GLUE, Table 5: iLoRA values 0.01 … 100; GPT-2 E2E,
    Table 3: 10), and its robustness study (App. D.4.4, Table 10) fixes ``λ = 0.1``
    across tasks with only a small loss against per-task tuning; that untuned setting
    is the natural default. The step is proportional to ``η λ ‖A‖²``-sized terms, so
    tune ``λ`` together with the learning rate and the factors' scale.

    Args:
      learning_rate: a float or an optax schedule (also scales the regularisation).
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`
        (the paper's experiments use weight_decay 0.01).
      strength: the regularisation strength ``λ``.
      safeguard: bound on the imbalance step for huge factors (inactive in the
        normal regime; ``None``: the paper's step unconditionally), see
        :func:`add_imbalance_regularization`.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))}
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> tx, adamw = lora_optax.ilora(1e-3, strength=0.0), optax.adamw(1e-3)
      >>> u, _ = tx.update(grads, tx.init(params), params)  # λ = 0: exactly AdamW
      >>> v, _ = adamw.update(grads, adamw.init(params), params)
      >>> bool(jnp.array_equal(u["lora_a"], v["lora_a"]))
      True

    References:
      Zhu, Wu, Gu & Cevher, *Imbalance-Regularized LoRA: A Plug-and-Play Method for
      Improving Fine-Tuning of Foundation Models*, Alg. 1/2.
    """
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    regularize = add_imbalance_regularization(
        learning_rate, strength=strength, safeguard=safeguard, pairs=pairs
    )
    return pairwise.lora_optimizer(optax.chain(adamw, regularize), adamw, pairs=pairs, what="ilora")


def pilora(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    strength: float = PILORA_STRENGTH,
    delta: float = 1e-6,
    safeguard: float | None = SAFEGUARD,
    sequential: bool = False,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""πLoRA: scaled AdamW followed by the decoupled imbalance regularisation.

    Each step is scaled AdamW (raw gradients preconditioned with the PRE-step
    factors, ``g̃_A = g_A(BBᵀ + δI)⁻¹``, ``g̃_B = (AᵀA + δI)⁻¹g_B``, then
    :func:`optax.adamw`; see :func:`lora_optax.scaled_adamw`), giving ``(A*, B*)``,
    then the step of :func:`add_imbalance_regularization` on ``(A*, B*)`` (paper
    Alg. 3). Leaves outside any pair get the base optimizer, the same
    :func:`optax.adamw`.

    Default strength ``λ = 1``: the paper's GPT-2 E2E setting for πLoRA (Table 3),
    and the geometric mean of its per-task Mistral-7B GLUE values (Table 5: 0.01,
    0.001, 0.01, 10, 100, 10, 10, 1, 100). The paper gives no untuned πLoRA setting;
    tune ``λ`` over ``{1e-3, …, 1e2}`` as it does.

    **Update order.** ``sequential=False`` (default) preconditions both gradients with
    the pre-step factors; ``sequential=True`` is the authors' order (``A``'s whole step,
    then ``B`` preconditioned with the updated ``A``, decoupled weight decay after the
    step), as described under :func:`lora_optax.scaled_adamw`; the state is then a
    :class:`lora_optax.SequentialRiemannianState`. The imbalance step follows on the
    finished ``(A⁺, B⁺)`` in both orders.

    Args:
      learning_rate: a float or an optax schedule (also scales the regularisation).
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`.
      strength: the regularisation strength ``λ``.
      delta: damping ``δ`` of the r×r Gram matrices of the preconditioner.
      sequential: the authors' order (``A``'s whole step, then ``B`` preconditioned
        with the updated ``A``) instead of the simultaneous default; see above.
      safeguard: bound on the imbalance step for huge factors (inactive in the
        normal regime; ``None``: the paper's step unconditionally), see
        :func:`add_imbalance_regularization`.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": 2.0 * jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))}
      >>> no_grad = jax.tree.map(jnp.zeros_like, params)
      >>> tx = lora_optax.pilora(1e-2, weight_decay=0.0)
      >>> updates, _ = tx.update(no_grad, tx.init(params), params)
      >>> bool(jnp.all(updates["lora_a"] < 0))  # AᵀA > ρBBᵀ: the step shrinks A
      True

    References:
      Zhu, Wu, Gu & Cevher, *Imbalance-Regularized LoRA: A Plug-and-Play Method for
      Improving Fine-Tuning of Foundation Models*, Alg. 3 (πLoRA); Zhang & Pilanci,
      *Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models*, ICML 2024,
      https://arxiv.org/abs/2402.02347 (scaled AdamW).
    """
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    regularize = add_imbalance_regularization(
        learning_rate, strength=strength, safeguard=safeguard, pairs=pairs
    )
    # The simultaneous chain stays flat (precondition, adamw, regularize): its state layout.
    steps: list[optax.GradientTransformation]
    if sequential:
        steps = [
            pairwise.sequential_riemannian(
                learning_rate,
                optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype),
                weight_decay=weight_decay,
                mask=mask,
                delta=delta,
                pairs=pairs,
                what="pilora",
            )
        ]
    else:
        steps = [pairwise.riemannian_preconditioner(delta=delta, pairs=pairs, what="pilora"), adamw]
    return pairwise.lora_optimizer(
        optax.chain(*steps, regularize), adamw, pairs=pairs, what="pilora"
    )
