"""LoRA-Pro (Wang et al., ICLR 2025): LoRA gradients adjusted to the full gradient.

In the library's orientation: ``A`` is read as an m×r matrix on the input side, ``B``
as an r×n matrix on the output side, ``ΔW = s·A B`` (``s`` the LoRA scale), ``G`` the
full-weight gradient (m×n). The paper writes ``W = W₀ + s B_p A_p`` with ``B_p`` out×r and
``A_p`` r×in, i.e. ``A = A_pᵀ``, ``B = B_pᵀ``; every formula below is the paper's
transposed (its ``X`` is our ``Yᵀ``).

No full-weight gradient is needed: the optimal adjusted gradients depend on ``G``
only through ``Bᵀ``- and ``Aᵀ``-projections of it, which are exactly the LoRA
gradients ``g_A = s G Bᵀ`` and ``g_B = s Aᵀ G``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg, pairwise
from lora_optax._src.pairs import LeafIndex, LoRAPair, PairSpec, resolve_pairs


def lora_pro_adjust(
    a_m: jax.Array,
    b_m: jax.Array,
    g_a: jax.Array,
    g_b: jax.Array,
    scale: float,
    delta: Any,
) -> tuple[jax.Array, jax.Array]:
    r"""LoRA-Pro's adjusted gradients for batched matrices (paper Thm. 2.1 / 2.2).

    With ``K_A = AᵀA``, ``K_B = BBᵀ`` (inverted with damping ``δ``), ``P_row =
    Bᵀ K_B⁻¹ B``:

    .. math::

      \tilde g_A = s^{-2} g_A K_B^{-1} + A Y, \qquad
      \tilde g_B = s^{-2} K_A^{-1} g_B (I - P_{row}) - Y B,

      K_A Y + Y K_B = -s^{-2} A^⊤ g_A K_B^{-1}

    (Sylvester equation, both matrices symmetric PSD: two eighs,
    :func:`linalg.solve_sylvester_sym`). Then ``s(g̃_A B + A g̃_B)`` is the Frobenius
    projection of ``G`` onto the tangent space of the rank-r matrices at ``A B``,
    ``P_col G + G P_row − P_col G P_row`` (the ``Y`` terms cancel), and ``Y`` makes
    ``(g̃_A, g̃_B)`` the closest such pair to ``(g_A, g_B)``.

    Returns:
      ``(g̃_A, g̃_B)`` in float32 or wider.
    """
    ct = linalg.compute_dtype(jnp.result_type(a_m, b_m, g_a, g_b))
    a_m, b_m, g_a, g_b = (x.astype(ct) for x in (a_m, b_m, g_a, g_b))
    s2 = 1.0 / (scale * scale)
    k_a, k_b = linalg.gram_cols(a_m), linalg.gram_rows(b_m)
    delta_a, delta_b = linalg.safe_damping(k_a, delta), linalg.safe_damping(k_b, delta)
    ga_kb = linalg.solve_right_spd(g_a, k_b, delta_b)  # g_A K_B⁻¹           (m×r)
    y = linalg.solve_sylvester_sym(k_a, k_b, -s2 * linalg.cross_gram_cols(a_m, ga_kb))
    # g_B (I − Bᵀ K_B⁻¹ B) = g_B − (g_B Bᵀ) K_B⁻¹ B; g_B Bᵀ is r×r.
    gb_proj = g_b - linalg.solve_right_spd(linalg.cross_gram_rows(g_b, b_m), k_b, delta_b) @ b_m
    new_a = s2 * ga_kb + a_m @ y
    new_b = s2 * linalg.solve_left_spd(k_a, gb_proj, delta_a) - y @ b_m
    return new_a, new_b


def _adjusted(pair: LoRAPair, m: linalg.PairMatrices, *, delta: Any) -> tuple[jax.Array, jax.Array]:
    assert m.a is not None and m.b is not None
    return lora_pro_adjust(m.a, m.b, m.g_a, m.g_b, pair.scale, delta)


def scale_by_lora_pro(
    *, delta: float = 1e-6, pairs: PairSpec = None
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces each pair's LoRA gradients by LoRA-Pro's adjusted gradients.

    ``(g_A, g_B) → (g̃_A, g̃_B)`` of :func:`lora_pro_adjust`, from the pre-step
    factors; SGD on them is "LoRA-Pro with SGD" (paper; SoLoRA's baseline). The
    equivalent full-weight step ``s(g̃_A B + A g̃_B)`` is the tangent-space projection
    of ``G``. Leaves outside any pair pass through. Stateless.

    Damping: the paper/authors invert ``K + 1e-8 I`` with a pseudo-inverse; the
    library uses Cholesky with ``δ`` (default 1e-6, as the Riemannian preconditioner)
    plus a relative floor of ``ε·tr(K)`` (ε the float epsilon). ``B = 0``
    gives ``g̃_A = 0``, ``Y = 0``, ``g̃_B = s⁻²(AᵀA)⁻¹ g_B`` — the authors' first-step
    branch — without a special case. ``s`` is :attr:`LoRAPair.scale`.

    Args:
      delta: damping of ``AᵀA`` and ``BBᵀ``.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> tx = optax.chain(lora_optax.scale_by_lora_pro(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["lora_a"].shape
      (4, 2)

    References:
      Wang, Liang, He, Wang, Tan, *LoRA-Pro: Are Low-Rank Adapters Properly
      Optimized?*, ICLR 2025. https://arxiv.org/abs/2407.18242
    """
    base.check_non_negative(delta, "delta")
    return pairwise.stateless_pair_transformation(
        functools.partial(_adjusted, delta=delta), pairs=pairs, what="scale_by_lora_pro"
    )


def lora_pro_sgd(
    learning_rate: base.ScalarOrSchedule,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pro with SGD: ``A ← A − η g̃_A``, ``B ← B − η g̃_B``.

    See :func:`scale_by_lora_pro`. Leaves outside any pair get the base optimizer,
    :func:`optax.sgd`.

    Args:
      learning_rate: a float or an optax schedule.
      delta: damping of ``AᵀA`` and ``BBᵀ`` (see :func:`scale_by_lora_pro`).
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> grads = {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.ones((2, 8))}  # g_A = s G Bᵀ = 0
      >>> tx = lora_optax.lora_pro_sgd(0.1)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> float(jnp.abs(updates["lora_a"]).max())  # B = 0: g̃_A = 0 (the authors' first step)
      0.0

    References:
      Wang, Liang, He, Wang & Tan, *LoRA-Pro: Are Low-Rank Adapters Properly
      Optimized?*, ICLR 2025, https://arxiv.org/abs/2407.18242; SGD variant as in the
      SoLoRA paper's baselines.
    """
    base.check_learning_rate(learning_rate)
    return pairwise.lora_optimizer(
        optax.chain(scale_by_lora_pro(delta=delta, pairs=pairs), optax.sgd(learning_rate)),
        optax.sgd(learning_rate),
        pairs=pairs,
        what="lora_pro_sgd",
    )


class ScaleByLoRAProAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pro_adam`.

    Attributes:
      count: steps taken (int32).
      mu, nu: trees laid out like the params holding, at each pair's ``A`` position,
        Adam's first / second moment of the pair's equivalent gradient, of the base
        weight's shape ``(*batch, *in_axes, *out_axes)`` (two base-weight-sized arrays
        per pair); ``optax.MaskedNode()`` in place of every other leaf.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Any
    nu: Any


def _adam_pulled_back(
    pair: LoRAPair,
    m: linalg.PairMatrices,
    moments: tuple[jax.Array, jax.Array],
    t: jax.Array,
    hyper: tuple[Any, Any, Any, Any, Any],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One pair's step of :func:`scale_by_lora_pro_adam`: the adjusted gradients of
    ``u Bᵀ``, ``Aᵀ u`` for Adam's ``u`` on the equivalent gradient, and the moments."""
    b1, b2, eps, eps_root, delta = hyper
    assert m.a is not None and m.b is not None
    mu_old, nu_old = moments
    ga, gb = _adjusted(pair, m, delta=delta)
    ct = ga.dtype
    a_c, b_c = m.a.astype(ct), m.b.astype(ct)
    equiv = pair.scale * (ga @ b_c + a_c @ gb)  # (*batch, m, n)
    equiv = linalg.reshard_like(linalg.from_matrix(equiv, mu_old.shape, pair), mu_old)
    mu_new = b1 * mu_old + (1.0 - b1) * equiv.astype(mu_old.dtype)
    nu_new = b2 * nu_old + (1.0 - b2) * (equiv * equiv).astype(nu_old.dtype)
    tt = t.astype(ct)
    bc1, bc2 = 1.0 - b1**tt, 1.0 - b2**tt
    step = (mu_new.astype(ct) / bc1) / (jnp.sqrt(nu_new.astype(ct) / bc2 + eps_root) + eps)
    step_m = linalg.full_grad_matrix(pair, step)
    g_a = pair.scale * linalg.contract_like("...mn,...rn->...mr", step_m, b_c, m.a)
    g_b = pair.scale * linalg.contract_like("...mr,...mn->...rn", a_c, step_m, m.b)
    na, nb = lora_pro_adjust(m.a, m.b, g_a, g_b, pair.scale, delta)
    return na, nb, mu_new, nu_new


def scale_by_lora_pro_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pro's Adam: full-size Adam on the equivalent gradient, pulled back.

    The authors' AdamW variant (their public DeepSpeed code, run with an SGD outer
    optimizer). For every pair, each step:

    1. equivalent gradient ``g̃ = s(g̃_A B + A g̃_B)`` (m×n) from the adjusted
       gradients of :func:`lora_pro_adjust` — the tangent-space projection of ``G``,
       computed from ``g_A``, ``g_B`` alone;
    2. Adam on ``g̃``: ``μ ← b1 μ + (1−b1) g̃``, ``ν ← b2 ν + (1−b2) g̃²``,
       ``u = μ̂ / (sqrt(ν̂ + eps_root) + eps)`` with the usual bias corrections;
    3. ``u`` treated as a full gradient: ``g_A' = s u Bᵀ``, ``g_B' = s Aᵀ u``, and the
       output is their adjusted pair ``(g̃_A', g̃_B')`` (:func:`lora_pro_adjust`).

    Leaves outside any pair pass through unchanged (:func:`lora_pro_adamw` gives them
    its base optimizer, :func:`optax.adamw`). Memory: two base-weight-sized moments
    per pair (float32 unless ``mu_dtype`` for ``μ``). No full-weight gradient input
    is needed.

    Args:
      b1, b2, eps, eps_root: Adam's parameters (authors: 0.9, 0.999, 1e-8, 0).
      mu_dtype: dtype of the first moments.
      delta: damping, see :func:`scale_by_lora_pro`.
      pairs: pair spec.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    References:
      Wang, Liang, He, Wang & Tan, *LoRA-Pro: Are Low-Rank Adapters Properly
      Optimized?*, ICLR 2025, Alg. 1, https://arxiv.org/abs/2407.18242; authors' code
      https://github.com/mrflogs/LoRA-Pro.
    """
    pairwise.check_adamw_hyperparams(None, b1, b2, eps, eps_root)
    base.check_non_negative(delta, "delta")
    what = "scale_by_lora_pro_adam"
    hyper = (b1, b2, eps, eps_root, delta)

    def init_fn(params):
        resolved = resolve_pairs(pairs, params, what=what)
        index = LeafIndex(params)
        mu, nu = {}, {}
        for pair in resolved:
            a, b = index[pair.a_path], index[pair.b_path]
            ct = linalg.compute_dtype(jnp.result_type(a.dtype, b.dtype))
            mu_dt = ct if mu_dtype is None else mu_dtype
            mu[pair.a_path] = pairwise.pair_state_zeros(pair, a, b, mu_dt, full=True)
            nu[pair.a_path] = pairwise.pair_state_zeros(pair, a, b, ct, full=True)
        return ScaleByLoRAProAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=pairwise.pair_state_tree(params, mu),
            nu=pairwise.pair_state_tree(params, nu),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        inputs = pairwise.resolve_update(pairs, updates, params, what)
        u, p = inputs.updates, inputs.params
        assert p is not None
        mu, nu = LeafIndex(state.mu), LeafIndex(state.nu)
        t = state.count + 1
        new_u, new_mu, new_nu = {}, {}, {}
        for pair in inputs.pairs:
            m = pairwise.pair_matrices(pair, inputs)
            moments = (mu[pair.a_path], nu[pair.a_path])
            na, nb, new_mu[pair.a_path], new_nu[pair.a_path] = _adam_pulled_back(
                pair, m, moments, t, hyper
            )
            new_u.update(pairwise.factor_updates(pair, u, na, nb))
        new_state = ScaleByLoRAProAdamState(
            count=optax.safe_increment(state.count),
            mu=mu.replace(new_mu),
            nu=nu.replace(new_nu),
        )
        return u.replace(new_u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_pro_adamw(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pro with AdamW (the paper's main optimizer).

    :func:`scale_by_lora_pro_adam` (full-size Adam on the equivalent gradient, pulled
    back to A and B with the optimal Sylvester balancing), then decoupled weight decay
    and the learning rate: ``A ← A − η(g̃_A' + λA)``. Leaves outside any pair get the
    base optimizer, :func:`optax.adamw` with the same hyperparameters. ``update``
    needs ``params``; no full-weight gradient is needed.

    Memory: two base-weight-sized Adam moments per pair (as full fine-tuning's Adam).

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`
        (the authors use 0.9, 0.999, 1e-8, 0 and no weight decay).
      delta: damping of ``AᵀA`` and ``BBᵀ`` (see :func:`scale_by_lora_pro`).
      pairs: pair spec.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 6))}
      >>> state = lora_optax.lora_pro_adamw(1e-3).init(params)
      >>> adam = state.inner_states["lora"].inner_state[0]  # the LoRA factors' moments
      >>> adam.mu["lora_a"].shape  # one base-weight-sized (m × n) moment per pair
      (8, 6)

    References:
      Wang, Liang, He, Wang & Tan, *LoRA-Pro: Are Low-Rank Adapters Properly
      Optimized?*, ICLR 2025. https://arxiv.org/abs/2407.18242
    """
    for_pairs = optax.chain(
        scale_by_lora_pro_adam(b1, b2, eps, eps_root, mu_dtype, delta=delta, pairs=pairs),
        pairwise.decay_and_learning_rate(learning_rate, weight_decay, mask),
    )
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    return pairwise.lora_optimizer(for_pairs, adamw, pairs=pairs, what="lora_pro_adamw")


@functools.wraps(lora_pro_adamw, assigned=("__module__", "__annotations__", "__type_params__"))
def lora_pro(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """Deprecated alias of :func:`lora_pro_adamw` (kept for one release).

    .. deprecated:: 0.2
      Use :func:`lora_optax.lora_pro_adamw`, whose name matches the other
      AdamW-type aliases (``scaled_adamw``, ``solora_adamw``); the arguments are the
      same.
    """
    warnings.warn(
        "lora_optax.lora_pro is deprecated and will be removed in the next release; "
        "use lora_optax.lora_pro_adamw (same arguments).",
        DeprecationWarning,
        stacklevel=2,
    )
    return lora_pro_adamw(*args, **kwargs)
