"""LoRA-Pro (Wang et al., ICLR 2025): LoRA gradients adjusted to the full gradient.

SPEC §2.6, in the library's orientation (``A`` m×r input side, ``B`` r×n output side,
``ΔW = s·A B``). The paper writes ``W = W₀ + s B_p A_p`` with ``B_p`` out×r and
``A_p`` r×in, i.e. ``A = A_pᵀ``, ``B = B_pᵀ``; every formula below is the paper's
transposed (its ``X`` is our ``Yᵀ``).

No full-weight gradient is needed: the optimal adjusted gradients depend on ``G``
only through ``Bᵀ``- and ``Aᵀ``-projections of it, which are exactly the LoRA
gradients ``g_A = s G Bᵀ`` and ``g_B = s Aᵀ G``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg
from lora_optax._src.pairs import LeafIndex, LoRAPair, PairSpec, resolve_pairs
from lora_optax._src.riemannian import pair_params
from lora_optax._src.solora import mask_paths, pair_state_zeros


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


def _adjust_pair(pair: LoRAPair, g_a, g_b, a, b, delta):
    a_m, b_m = linalg.a_matrix(pair, a), linalg.b_matrix(pair, b)
    new_a, new_b = lora_pro_adjust(
        a_m, b_m, linalg.a_matrix(pair, g_a), linalg.b_matrix(pair, g_b), pair.scale, delta
    )
    return new_a, new_b


def scale_by_lora_pro(
    *, delta: float = 1e-6, pairs: PairSpec = None
) -> optax.GradientTransformation:
    r"""Replaces each pair's LoRA gradients by LoRA-Pro's adjusted gradients.

    ``(g_A, g_B) → (g̃_A, g̃_B)`` of :func:`lora_pro_adjust`, from the pre-step
    factors; SGD on them is "LoRA-Pro with SGD" (paper; SoLoRA's baseline). The
    equivalent full-weight step ``s(g̃_A B + A g̃_B)`` is the tangent-space projection
    of ``G``. Leaves outside any pair pass through. Stateless.

    Damping: the paper/authors invert ``K + 1e-8 I`` with a pseudo-inverse; the
    library uses Cholesky with ``δ`` (default 1e-6, as the Riemannian preconditioner)
    plus a relative floor of ``ε·tr(K)`` (see ``linalg.safe_damping``). ``B = 0``
    gives ``g̃_A = 0``, ``Y = 0``, ``g̃_B = s⁻²(AᵀA)⁻¹ g_B`` — the authors' first-step
    branch — without a special case. ``s`` is :attr:`LoRAPair.scale`.

    Args:
      delta: damping of ``AᵀA`` and ``BBᵀ``.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      A stateless :class:`optax.GradientTransformation`; ``update`` needs ``params``.

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
    what = "scale_by_lora_pro"

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p = pair_params(resolved, params, what, updates=updates)
        u = LeafIndex(updates)
        new = {}
        for pair in resolved:
            ua, ub = u[pair.a_path], u[pair.b_path]
            na, nb = _adjust_pair(pair, ua, ub, p[pair.a_path], p[pair.b_path], delta)
            new[pair.a_path] = linalg.from_matrix(na, ua.shape, pair).astype(ua.dtype)
            new[pair.b_path] = linalg.from_matrix(nb, ub.shape, pair).astype(ub.dtype)
        return u.replace(new), state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro_sgd(
    learning_rate: base.ScalarOrSchedule,
    *,
    delta: float = 1e-6,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""LoRA-Pro with SGD: ``A ← A − η g̃_A``, ``B ← B − η g̃_B``.

    See :func:`scale_by_lora_pro`. Leaves outside any pair get plain SGD.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.lora_pro_sgd(0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)

    References:
      Wang et al., ICLR 2025 (LoRA-Pro); SGD variant as in the SoLoRA paper's baselines.
    """
    base.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_lora_pro(delta=delta, pairs=pairs),
        optax.scale_by_learning_rate(learning_rate),
    )


class ScaleByLoRAProAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pro_adam`.

    Attributes:
      count: steps taken (int32).
      mu, nu: trees shaped like the params holding, at each pair's ``A`` position,
        Adam's first / second moment of the pair's equivalent gradient, of the base
        weight's shape ``(*batch, *in_axes, *out_axes)`` (two base-weight-sized arrays
        per pair); ``optax.MaskedNode()`` elsewhere.
      other: :func:`optax.scale_by_adam`'s state for leaves outside any pair.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Any
    nu: Any
    other: Any


def scale_by_lora_pro_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    delta: float = 1e-6,
    mu_dtype: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""LoRA-Pro's Adam: full-size Adam on the equivalent gradient, pulled back.

    The authors' AdamW variant (their public DeepSpeed code, run with an SGD outer
    optimizer). For every pair, each step:

    1. equivalent gradient ``g̃ = s(g̃_A B + A g̃_B)`` (m×n) from the adjusted
       gradients of :func:`lora_pro_adjust` — the tangent-space projection of ``G``,
       computed from ``g_A``, ``g_B`` alone;
    2. Adam on ``g̃``: ``μ ← b1 μ + (1−b1) g̃``, ``ν ← b2 ν + (1−b2) g̃²``,
       ``u = μ̂ / (sqrt(ν̂) + eps)`` with the usual bias corrections;
    3. ``u`` treated as a full gradient: ``g_A' = s u Bᵀ``, ``g_B' = s Aᵀ u``, and the
       output is their adjusted pair ``(g̃_A', g̃_B')`` (:func:`lora_pro_adjust`).

    Leaves outside any pair get :func:`optax.scale_by_adam`. Memory: two
    base-weight-sized moments per pair (float32 unless ``mu_dtype`` for ``μ``).
    No full-weight gradient input is needed.

    Args:
      b1, b2, eps: Adam's parameters (authors: 0.9, 0.999, 1e-8).
      delta: damping, see :func:`scale_by_lora_pro`.
      mu_dtype: dtype of the first moments.
      pairs: pair spec.

    Returns:
      An :class:`optax.GradientTransformation`; ``update`` needs ``params``.

    References:
      Wang et al., ICLR 2025 (LoRA-Pro), Alg. 1 and https://github.com/mrflogs/LoRA-Pro.
    """
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(delta, "delta")
    what = "scale_by_lora_pro_adam"
    other_tx = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

    def _pair_paths(resolved):
        return {p for pair in resolved for p in (pair.a_path, pair.b_path)}

    def init_fn(params):
        resolved = resolve_pairs(pairs, params, what=what)
        index = LeafIndex(params)
        mu, nu = {}, {}
        for pair in resolved:
            a, b = index[pair.a_path], index[pair.b_path]
            ct = linalg.compute_dtype(jnp.result_type(a.dtype, b.dtype))
            mu[pair.a_path] = pair_state_zeros(
                pair, a, b, ct if mu_dtype is None else mu_dtype, full=True
            )
            nu[pair.a_path] = pair_state_zeros(pair, a, b, ct, full=True)
        masked = optax.MaskedNode()
        return ScaleByLoRAProAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=index.map(lambda p, _: mu.get(p, masked)),
            nu=index.map(lambda p, _: nu.get(p, masked)),
            other=other_tx.init(mask_paths(index, _pair_paths(resolved))),
        )

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p = pair_params(resolved, params, what, updates=updates)
        u = LeafIndex(updates)
        mu, nu = LeafIndex(state.mu), LeafIndex(state.nu)
        t = state.count + 1
        new_u, new_mu, new_nu = {}, {}, {}
        for pair in resolved:
            a, b = p[pair.a_path], p[pair.b_path]
            ua, ub = u[pair.a_path], u[pair.b_path]
            a_m, b_m = linalg.a_matrix(pair, a), linalg.b_matrix(pair, b)
            ga, gb = _adjust_pair(pair, ua, ub, a, b, delta)
            ct = ga.dtype
            a_c, b_c = a_m.astype(ct), b_m.astype(ct)
            equiv = pair.scale * (ga @ b_c + a_c @ gb)  # (*batch, m, n)
            mu_old, nu_old = mu[pair.a_path], nu[pair.a_path]
            equiv = linalg.reshard_like(linalg.from_matrix(equiv, mu_old.shape, pair), mu_old)
            mu_new = b1 * mu_old + (1.0 - b1) * equiv.astype(mu_old.dtype)
            nu_new = b2 * nu_old + (1.0 - b2) * (equiv * equiv).astype(nu_old.dtype)
            new_mu[pair.a_path], new_nu[pair.a_path] = mu_new, nu_new
            tt = t.astype(ct)
            bc1, bc2 = 1.0 - b1**tt, 1.0 - b2**tt
            step = (mu_new.astype(ct) / bc1) / (jnp.sqrt(nu_new.astype(ct) / bc2) + eps)
            step_m = linalg.full_grad_matrix(pair, step)
            g_a = pair.scale * linalg.contract_like("...mn,...rn->...mr", step_m, b_c, a_m)
            g_b = pair.scale * linalg.contract_like("...mr,...mn->...rn", a_c, step_m, b_m)
            na, nb = lora_pro_adjust(a_m, b_m, g_a, g_b, pair.scale, delta)
            new_u[pair.a_path] = linalg.from_matrix(na, ua.shape, pair).astype(ua.dtype)
            new_u[pair.b_path] = linalg.from_matrix(nb, ub.shape, pair).astype(ub.dtype)
        paths = _pair_paths(resolved)
        other_u, other_state = other_tx.update(
            mask_paths(u, paths),
            state.other,
            None if params is None else mask_paths(LeafIndex(params), paths),
        )
        new_u.update(LeafIndex(other_u).items())
        new_state = ScaleByLoRAProAdamState(
            count=optax.safe_increment(state.count),
            mu=mu.replace(new_mu),
            nu=nu.replace(new_nu),
            other=other_state,
        )
        return u.replace(new_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    delta: float = 1e-6,
    mu_dtype: Any = None,
    mask: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""LoRA-Pro with AdamW (the paper's main optimizer).

    :func:`scale_by_lora_pro_adam` (full-size Adam on the equivalent gradient, pulled
    back to A and B with the optimal Sylvester balancing), then decoupled weight decay
    and the learning rate: ``A ← A − η(g̃_A' + λA)``. Leaves outside any pair get
    AdamW. ``update`` needs ``params``; no full-weight gradient is needed.

    Memory: two base-weight-sized Adam moments per pair (as full fine-tuning's Adam).

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's parameters (authors: 0.9, 0.999, 1e-8).
      weight_decay: decoupled weight decay (authors' scripts: 0).
      delta: damping of ``AᵀA`` and ``BBᵀ`` (see :func:`scale_by_lora_pro`).
      mu_dtype: dtype of the first moments.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      pairs: pair spec.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.lora_pro(1e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)

    References:
      Wang, Liang, He, Wang, Tan, *LoRA-Pro: Are Low-Rank Adapters Properly
      Optimized?*, ICLR 2025. https://arxiv.org/abs/2407.18242
    """
    base.check_learning_rate(learning_rate)
    base.check_non_negative(weight_decay, "weight_decay")
    return optax.chain(
        scale_by_lora_pro_adam(b1, b2, eps, delta=delta, mu_dtype=mu_dtype, pairs=pairs),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
