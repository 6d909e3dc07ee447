"""Independent float64 NumPy reference implementations of every algorithm in SPEC.md §2.

This module is the ground truth of the test suite. It is written from the equations
(SPEC.md first, then the papers in ``shared/papers``, then — where both leave a detail
open — the behaviour of the authors' public code), deliberately by the straightforward
route (explicit QR, SVD, pseudo-inverses, Kronecker products), so that it shares no
numerical shortcut with the library (Gram/Cholesky/eigh route). It imports no JAX.

Orientation (the library's, SPEC §1). Every function works on single 2-D matrices:

* ``A`` is ``m × r`` (input side, rank axis last), ``B`` is ``r × n`` (output side),
* ``ΔW = s·A @ B``; ``G = ∂L/∂W`` is ``m × n``,
* ``g_A = s·G @ Bᵀ`` (``m × r``), ``g_B = s·Aᵀ @ G`` (``r × n``).

Callers flatten multi-axis factors to these matrices and loop over stacked (batch)
axes themselves. All arithmetic is float64; inputs are converted with ``np.asarray(...,
dtype=float64)`` and never modified in place.

Conventions shared by all functions:

* Learning rates are plain floats: the caller evaluates a schedule and passes the
  current value (``η_t``) to each ``*_step``.
* Step counters are 0-based *before* a step (``count`` = number of steps already
  taken), as in optax.
* Singular r×r Gram matrices (``B = 0`` at a standard LoRA initialisation is the normal
  case) are inverted with the Moore–Penrose pseudo-inverse whenever no damping is
  given, so every function returns finite values for ``B = 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

Array = np.ndarray

__all__ = [
    "AdamWState",
    "PairAdamWState",
    "RiteFactorState",
    "RitePairState",
    "RiteState",
    "SoLoRAMomentumState",
    "SoLoRAState",
    "adafactor_decay",
    "adamw_init",
    "adamw_step",
    "authors_loop_step",
    "ilora_step",
    "imbalance_objective",
    "imbalance_regularization",
    "lora_one_step",
    "lora_plus_step",
    "lora_pro_equivalent_gradient",
    "lora_pro_step",
    "pair_adamw_init",
    "pilora_step",
    "qr_positive",
    "riemannian_precondition",
    "rite_init",
    "rite_step",
    "scaled_adamw_step",
    "scaled_sgd_step",
    "solora_adamw_init",
    "solora_adamw_step",
    "solora_direction",
    "solora_metric",
    "solora_sgd_init",
    "solora_sgd_step",
    "spectral_init",
    "sylvester_solve_direct",
    "tangent_projectors",
]


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _f64(x: Array | float) -> Array:
    return np.array(x, dtype=np.float64, copy=True)


def _sym(x: Array) -> Array:
    return 0.5 * (x + x.T)


def _rms(x: Array) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _inv_spd(k: Array, delta: float) -> Array:
    """``(K + δI)⁻¹`` for a symmetric PSD ``K``; the pseudo-inverse when ``δ = 0``."""
    k = _sym(_f64(k))
    if delta > 0.0:
        return np.linalg.inv(k + delta * np.eye(k.shape[0]))
    return np.linalg.pinv(k, hermitian=True)


def _safe_recip(x: Array) -> Array:
    """Element-wise ``1/x`` with ``1/0 := 0`` (pseudo-inverse of a diagonal matrix)."""
    out = np.zeros_like(x)
    nz = x != 0
    out[nz] = 1.0 / x[nz]
    return out


def qr_positive(x: Array) -> tuple[Array, Array]:
    """Reduced QR ``x = Q R`` (``x`` is ``k × r``, ``k ≥ r``) with ``diag(R) ≥ 0``.

    ``np.linalg.qr`` (LAPACK Householder) may return negative diagonal entries of R.
    Flipping the signs of those rows of R (and columns of Q) makes R the unique upper
    Cholesky factor of ``xᵀx`` whenever ``x`` has full column rank, i.e. the same R that
    the library's Gram/Cholesky route produces (``xᵀx = RᵀR``). This matters for the
    comparison of LoRA-RITE's *state* (moments are expressed in the Q basis), not for
    the parameter updates, which are basis independent. Zero diagonal entries keep
    their sign (+1).
    """
    q, r = np.linalg.qr(_f64(x), mode="reduced")
    d = np.where(np.diag(r) < 0.0, -1.0, 1.0)
    return q * d[None, :], r * d[:, None]


# ---------------------------------------------------------------------------------------
# 2.1 Riemannian preconditioner (Zhang & Pilanci) + AdamW
# ---------------------------------------------------------------------------------------


def riemannian_precondition(
    g_a: Array, g_b: Array, a: Array, b: Array, delta: float = 1e-6
) -> tuple[Array, Array]:
    """Riemannian (scaled-GD) preconditioning of one pair's gradients, SPEC §2.1.

    ``g̃_A = g_A (B Bᵀ + δI)⁻¹``, ``g̃_B = (AᵀA + δI)⁻¹ g_B``, both from the pre-step
    ``a``, ``b`` (simultaneous; paper eq. (1)). ``δ = 0`` uses the pseudo-inverse (so
    ``B = 0`` gives ``g̃_A = 0`` instead of an error); ``δ > 0`` uses an exact inverse,
    so ``B = 0`` gives ``g̃_A = g_A / δ`` (which is 0 when ``g_A = s·G Bᵀ``).

    Args:
      g_a: ``m × r`` gradient of A.
      g_b: ``r × n`` gradient of B.
      a: ``m × r`` factor A.
      b: ``r × n`` factor B.
      delta: damping ``δ`` (paper 1e-6; PEFT port 1e-2).

    Returns:
      ``(g̃_A, g̃_B)``.
    """
    a, b, g_a, g_b = _f64(a), _f64(b), _f64(g_a), _f64(g_b)
    inv_bb = _inv_spd(b @ b.T, delta)
    inv_aa = _inv_spd(a.T @ a, delta)
    return g_a @ inv_bb, inv_aa @ g_b


@dataclasses.dataclass
class AdamWState:
    """Adam moments of one array. ``count`` is the number of steps already taken."""

    mu: Array
    nu: Array
    count: int = 0


def adamw_init(p: Array) -> AdamWState:
    """Zero moments shaped like ``p``."""
    p = _f64(p)
    return AdamWState(mu=np.zeros_like(p), nu=np.zeros_like(p), count=0)


def adamw_step(
    p: Array,
    g: Array,
    state: AdamWState,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    eps_root: float = 0.0,
    no_bias_correction: bool = False,
) -> tuple[Array, AdamWState]:
    """One ``optax.adamw`` step (defaults are optax's, including ``weight_decay=1e-4``).

    ``t = count + 1``; ``μ ← b1 μ + (1−b1) g``, ``ν ← b2 ν + (1−b2) g²``;
    ``μ̂ = μ/(1−b1ᵗ)``, ``ν̂ = ν/(1−b2ᵗ)`` (skipped when ``no_bias_correction``:
    ``μ̂ = μ``, ``ν̂ = ν``, as LoRA-One's reference code does);
    ``u = μ̂ / (√(ν̂ + eps_root) + eps) + wd·p``; ``p ← p − lr·u`` (decoupled weight decay
    multiplied by the learning rate, optax's ``add_decayed_weights`` then
    ``scale_by_learning_rate``).

    Returns:
      ``(new_p, new_state)``.
    """
    p, g = _f64(p), _f64(g)
    t = state.count + 1
    mu = b1 * state.mu + (1.0 - b1) * g
    nu = b2 * state.nu + (1.0 - b2) * g * g
    if no_bias_correction:
        mu_hat, nu_hat = mu, nu
    else:
        mu_hat = mu / (1.0 - b1**t)
        nu_hat = nu / (1.0 - b2**t)
    u = mu_hat / (np.sqrt(nu_hat + eps_root) + eps) + weight_decay * p
    return p - lr * u, AdamWState(mu=mu, nu=nu, count=t)


@dataclasses.dataclass
class PairAdamWState:
    """AdamW states of the two factors of one pair."""

    a: AdamWState
    b: AdamWState


def pair_adamw_init(a: Array, b: Array) -> PairAdamWState:
    """Zero AdamW states for a pair."""
    return PairAdamWState(a=adamw_init(a), b=adamw_init(b))


def scaled_sgd_step(
    a: Array, b: Array, g_a: Array, g_b: Array, lr: float, delta: float = 1e-6
) -> tuple[Array, Array]:
    """Scaled GD (SPEC §2.1): ``A ← A − η g̃_A``, ``B ← B − η g̃_B`` (simultaneous)."""
    pg_a, pg_b = riemannian_precondition(g_a, g_b, a, b, delta)
    return _f64(a) - lr * pg_a, _f64(b) - lr * pg_b


def scaled_adamw_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState,
    lr: float,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    delta: float = 1e-6,
    no_bias_correction: bool = False,
) -> tuple[Array, Array, PairAdamWState]:
    """Scaled AdamW (SPEC §2.1, paper Alg. 1): precondition the raw gradients with the
    pre-step factors, then an ordinary :func:`adamw_step` on each factor."""
    pg_a, pg_b = riemannian_precondition(g_a, g_b, a, b, delta)
    kw = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    new_a, sa = adamw_step(a, pg_a, state.a, lr, **kw, no_bias_correction=no_bias_correction)
    new_b, sb = adamw_step(b, pg_b, state.b, lr, **kw, no_bias_correction=no_bias_correction)
    return new_a, new_b, PairAdamWState(a=sa, b=sb)


# ---------------------------------------------------------------------------------------
# 2.1b The order of the authors' code: A's whole step, then B's with the updated A
# ---------------------------------------------------------------------------------------


def authors_loop_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState | None,
    lr: float,
    *,
    sequential: bool = True,
    adam: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    delta: float = 1e-6,
    no_bias_correction: bool = False,
) -> tuple[Array, Array, PairAdamWState | None]:
    """One step of a preconditioned-AdamW (``adam``) or scaled-GD loop over ``[A, B]``.

    Written as the authors' PyTorch loop reads (Zhang & Pilanci's Mistral ``AdamWr``;
    LoRA-One's trainer): the factors are visited in the order ``A``, ``B``; each
    factor's gradient is preconditioned with the OTHER factor's value at the time of
    the visit, ``g_A (BBᵀ + δI)⁻¹`` or ``(AᵀA + δI)⁻¹ g_B``; then its own step
    ``p₁ = p − lr·d`` (``d`` the Adam direction ``μ̂/(√(ν̂ + eps_root) + eps)``, or
    ``d = g̃`` for scaled GD) and its decoupled weight decay of the stepped factor,
    ``p ← p₁ − lr·wd·p₁``, in place. With ``sequential=True`` the visit of ``B`` sees
    the ``A`` just written (``c1 = p1.data`` aliases it); with ``sequential=False`` it
    sees a copy taken before the loop (the simultaneous order). Both gradients are
    taken at the pre-step point. ``state`` is ``None`` for scaled GD.
    """
    current = {"a": _f64(a), "b": _f64(b)}
    grads = {"a": _f64(g_a), "b": _f64(g_b)}
    snapshot = dict(current)
    new_state = {}
    for name in ("a", "b"):
        other = (current if sequential else snapshot)["b" if name == "a" else "a"]
        if name == "a":
            g = grads["a"] @ _inv_spd(other @ other.T, delta)
        else:
            g = _inv_spd(other.T @ other, delta) @ grads["b"]
        if adam:
            assert state is not None
            st = state.a if name == "a" else state.b
            t = st.count + 1
            mu = b1 * st.mu + (1.0 - b1) * g
            nu = b2 * st.nu + (1.0 - b2) * np.square(g)
            corr1 = 1.0 if no_bias_correction else 1.0 - b1**t
            corr2 = 1.0 if no_bias_correction else 1.0 - b2**t
            d = (mu / corr1) / (np.sqrt(nu / corr2 + eps_root) + eps)
            new_state[name] = AdamWState(mu=mu, nu=nu, count=t)
        else:
            d = g
        p1 = current[name] - lr * d
        current[name] = p1 - lr * weight_decay * p1
    out_state = PairAdamWState(a=new_state["a"], b=new_state["b"]) if adam else None
    return current["a"], current["b"], out_state


# ---------------------------------------------------------------------------------------
# 2.2 LoRA-RITE (Yen et al., Alg. 1)
# ---------------------------------------------------------------------------------------


def adafactor_decay(beta: float, k: int) -> float:
    """Adafactor's bias-corrected decay ``β(1−βᵏ)/(1−βᵏ⁺¹)``, ``k`` the 0-based step.

    ``k = 0`` gives 0 (the first moment estimate is the first sample); tends to ``β``.
    """
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1))


@dataclasses.dataclass
class RiteFactorState:
    """LoRA-RITE state of one factor, in the factor's *rank-last* view.

    The rank-last view is ``A`` itself (``m × r``) for the A factor and ``Bᵀ``
    (``n × r``) for the B factor.

    Attributes:
      m: unmagnified first moment ``M̄`` (same shape as the rank-last view), expressed
        in the basis ``Q`` of the OTHER factor at the step it was written.
      v: ``r × r`` unmagnified second moment ``V̄`` (same basis).
      rho: escaped mass ``ρ`` (stays 0 unless ``escape_mass=True``).
      basis: ``Q`` of THIS factor's rank-last view at the last step (zeros before the
        first step); it is used for the OTHER factor's basis change ``P``.
    """

    m: Array
    v: Array
    rho: float
    basis: Array


@dataclasses.dataclass
class RitePairState:
    """LoRA-RITE state of one pair."""

    a: RiteFactorState
    b: RiteFactorState


@dataclasses.dataclass
class RiteState:
    """LoRA-RITE state of a list of pairs.

    Attributes:
      pairs: per-pair states, in the order of the ``pairs`` list.
      count: number of steps already taken (0-based step index of the next step).
      n_skipped: cumulative number of FACTOR updates whose unmagnified gradient was
        zeroed by the RMS skip test (each pair contributes 0, 1 or 2 per step).
      last_grad_norm: the global norm ``√Σ_pairs (‖Ḡ_A‖² + ‖Ḡ_B‖²)`` of the last step,
        measured AFTER the skip test and BEFORE clipping (the value compared with
        ``clip_unmagnified_grad``). ``nan`` before the first step.
    """

    pairs: list[RitePairState]
    count: int = 0
    n_skipped: int = 0
    last_grad_norm: float = math.nan


def _rite_factor_init(view: Array) -> RiteFactorState:
    k, r = view.shape
    return RiteFactorState(m=np.zeros((k, r)), v=np.zeros((r, r)), rho=0.0, basis=np.zeros((k, r)))


def rite_init(pairs: Sequence[tuple[Array, Array]]) -> RiteState:
    """Zero LoRA-RITE state for a list of ``(A, B)`` pairs (``Q_prev = 0``, SPEC §2.2)."""
    states = []
    for a, b in pairs:
        a, b = _f64(a), _f64(b)
        states.append(RitePairState(a=_rite_factor_init(a), b=_rite_factor_init(b.T)))
    return RiteState(pairs=states, count=0, n_skipped=0, last_grad_norm=math.nan)


def _escaped_mass(v_old: Array, v_new: Array) -> float:
    """``d(V_old, P V_old Pᵀ)`` as in the authors' PyTorch port (see :func:`rite_step`)."""
    eig_old = np.linalg.eigvalsh(v_old)  # ascending
    eig_new = np.linalg.eigvalsh(v_new)  # ascending
    eig_diff = max(float(np.max(eig_old - eig_new)), 0.0)
    trace_diff = max(float(np.trace(v_old) - np.trace(v_new)), 0.0)
    return min(eig_diff, trace_diff)


def _rite_factor_update(
    view: Array,
    gbar: Array,
    r_other_pinv: Array,
    p: Array,
    fs: RiteFactorState,
    basis: Array,
    *,
    lr: float,
    b1_hat: float,
    b2_hat: float,
    eps: float,
    weight_decay: float,
    escape_mass: bool,
) -> tuple[Array, RiteFactorState]:
    """Lines 6–10 of Alg. 1 for one factor (rank-last view); see :func:`rite_step`."""
    rows = gbar.shape[0]
    v_rot = _sym(p @ fs.v @ p.T)
    rho = b2_hat * (fs.rho + _escaped_mass(fs.v, v_rot)) if escape_mass else 0.0
    v = _sym(b2_hat * v_rot + (1.0 - b2_hat) * _sym(gbar.T @ gbar / rows))
    lam, u = np.linalg.eigh(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_root = 1.0 / (np.sqrt(lam + rho) + eps)
        precond = _sym((u * inv_root[None, :]) @ u.T)
        s = gbar @ precond
    s = np.where(np.isfinite(s), s, 0.0)
    m = b1_hat * (fs.m @ p.T) + (1.0 - b1_hat) * s
    update = m @ r_other_pinv.T + weight_decay * view
    new_view = view - lr * update
    return new_view, RiteFactorState(m=m, v=v, rho=float(rho), basis=basis)


def rite_step(
    pairs: Sequence[tuple[Array, Array]],
    grads: Sequence[tuple[Array, Array]],
    state: RiteState,
    lr: float,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    clip_unmagnified_grad: float = 1.0,
    skip_threshold: float = 1.0,
    escape_mass: bool = False,
) -> tuple[list[tuple[Array, Array]], RiteState]:
    """One LoRA-RITE step (SPEC §2.2, paper Alg. 1) for a LIST of pairs.

    A list, because the unmagnified-gradient clipping is joint over all pairs. Let ``k =
    state.count`` (0-based) and ``β̂ᵢ = adafactor_decay(βᵢ, k)``. Written for A; B is the
    same with the roles swapped on B's rank-last view ``Bᵀ`` (``n × r``) and
    ``Ḡ_B = g_Bᵀ R_A⁺`` (``n × r``).

    1. QR of both factors (``np.linalg.qr``, sign-normalised by :func:`qr_positive` so
       ``diag R ≥ 0``): ``A = Q_A R_A``, ``Bᵀ = Q_B R_B``.
    2. Unmagnified gradient ``Ḡ_A = g_A R_B⁺`` with ``R⁺`` the PSEUDO-inverse
       (``np.linalg.pinv``; SPEC, port): ``B = 0`` gives ``Ḡ_A = 0`` (A does not move at
       step 1) while B gets a finite update.
    3. Basis change ``P_A = Q_Bᵀ Q_B,prev`` with ``Q_prev = 0`` before the first step
       (SPEC, paper line 5, port). ``P_A`` (r×r) is applied as ``V̄ ↦ P V̄ Pᵀ`` and
       ``M̄ ↦ M̄ Pᵀ`` (``M̄`` is rows × r, its rank axis is the column axis).
    4. Skip test (port ``update_skipping``, on by default): if ``skip_threshold > 0``
       and ``RMS(Ḡ_A) = ‖Ḡ_A‖_F / √(m r) > skip_threshold``, ``Ḡ_A := 0`` for this step.
       Decisions made by the port that this reference follows: the test is PER FACTOR
       (A and B of a pair independently), on the UNCLIPPED unmagnified gradient, and it
       happens BEFORE clipping. A skipped factor still runs the rest of the step with
       a zero gradient (moments decay and are rotated, the step counter advances, the
       parameter still moves by its momentum and weight decay). Skipped factors are
       counted in ``state.n_skipped``.
    5. Global clipping (port ``clip_unmagnified_grad``, on by default): ``g_norm =
       √Σ_{pairs} (‖Ḡ_A‖²_F + ‖Ḡ_B‖²_F)`` over ALL pairs and both factors, computed from
       the unmagnified gradients AFTER the skip test (a skipped factor contributes 0);
       if ``clip > 0`` and ``g_norm > clip``, every ``Ḡ`` is multiplied by
       ``clip / g_norm``. ``state.last_grad_norm = g_norm`` (pre-clip).
    6. Second moment ``V̄_A ← β̂₂ P_A V̄_A P_Aᵀ + (1−β̂₂) Ḡ_AᵀḠ_A / m`` (divided by the
       number of rows of the rank-last view: m for A, n for B; SPEC, port), symmetrised.
    7. Escaped mass (only if ``escape_mass``; default off): the port computes
       ``d = min(max(maxᵢ(λᵢ(V̄_old) − λᵢ(P V̄_old Pᵀ)), 0), max(tr V̄_old − tr(P V̄_old
       Pᵀ), 0))`` with both spectra sorted ascending, and ``ρ ← β̂₂ (ρ + d)`` (the EMA
       form of paper eq. (15): old mass and new loss are both decayed by ``β̂₂``, nothing
       is added with ``1−β̂₂``). ``ρ = 0`` at the first step (``β̂₂ = 0``). Because
       ``‖P‖ ≤ 1`` the eigenvalues can only shrink, so in exact arithmetic ``d`` equals
       the paper's ``d_λ = maxᵢ |λᵢ(X₁) − λᵢ(X₂)|``; the clamps and the trace bound only
       guard against round-off. With ``escape_mass=False`` ``ρ = 0`` always.
    8. ``S̄_A = Ḡ_A (V̄_A + ρI)^(-1/2)`` with the inverse root by ``eigh``:
       ``U diag(1/(√(λ+ρ) + ε)) Uᵀ`` — ε OUTSIDE the square root, no eigenvalue clamp
       (SPEC, port ``force_positive=False``); non-finite entries of S̄ are set to 0
       (SPEC; the port's ``nan_to_num`` maps NaN to 0 too).
    9. ``M̄_A ← β̂₁ M̄_A P_Aᵀ + (1−β̂₁) S̄_A``.
    10. ``A ← A − η (M̄_A (R_B⁺)ᵀ + wd·A)`` (decoupled weight decay multiplied by η, as
        in the port).

    All per-pair quantities of steps 1–5 are computed from the PRE-step parameters of
    all pairs before any parameter moves. The port's ``update_capping`` (off by
    default), ``relative_epsilon`` (off) and ``balance_param`` (off) are not modelled.

    Invariance: ``Ḡ_A = s·G Q_B`` depends on ``B`` only through its row space, and its
    Frobenius norm (hence RMS, the global norm and the eigenvalues used for ρ) does not
    depend on the choice of orthonormal basis, so the update of ``A B`` is invariant
    under ``(A T, T⁻¹B)`` with the safeguards and escaped mass on or off. Decoupled
    weight decay keeps it too: ``A ↦ (1−ηλ)A``, ``B ↦ (1−ηλ)B`` maps the class
    ``{(A T, T⁻¹B)}`` to the class of ``((1−ηλ)A, (1−ηλ)B)``. The self-check verifies
    all of these.

    Args:
      pairs: list of ``(A (m×r), B (r×n))``.
      grads: list of ``(g_A, g_B)`` in the same shapes.
      state: from :func:`rite_init` or a previous call.
      lr: learning rate of this step.
      b1, b2: moment decays (port defaults 0.9, 0.999).
      eps: added outside the square root (port default 1e-6).
      weight_decay: decoupled weight decay (port default 0).
      clip_unmagnified_grad: global-norm clip threshold; 0 disables (port 1.0).
      skip_threshold: per-factor RMS skip threshold; 0 disables (port 1.0).
      escape_mass: add the escaped mass ρ (port default False).

    Returns:
      ``(new_pairs, new_state)``; ``new_pairs`` is a list of ``(A, B)``.
    """
    if len(pairs) != len(grads) or len(pairs) != len(state.pairs):
        raise ValueError("pairs, grads and state must have the same length")
    k = state.count
    b1_hat, b2_hat = adafactor_decay(b1, k), adafactor_decay(b2, k)

    prepared = []
    n_skipped = state.n_skipped
    sq_norm = 0.0
    for (a, b), (g_a, g_b), ps in zip(pairs, grads, state.pairs):
        a, b, g_a, g_b = _f64(a), _f64(b), _f64(g_a), _f64(g_b)
        q_a, r_a = qr_positive(a)  # A  = Q_A R_A   (m×r)
        q_b, r_b = qr_positive(b.T)  # Bᵀ = Q_B R_B   (n×r)
        r_a_pinv, r_b_pinv = np.linalg.pinv(r_a), np.linalg.pinv(r_b)
        gbar_a = g_a @ r_b_pinv  # m×r
        gbar_b = g_b.T @ r_a_pinv  # n×r
        p_a = q_b.T @ ps.b.basis  # basis change for A's moments
        p_b = q_a.T @ ps.a.basis  # basis change for B's moments
        if skip_threshold > 0.0:
            if _rms(gbar_a) > skip_threshold:
                gbar_a = np.zeros_like(gbar_a)
                n_skipped += 1
            if _rms(gbar_b) > skip_threshold:
                gbar_b = np.zeros_like(gbar_b)
                n_skipped += 1
        sq_norm += float(np.sum(gbar_a**2) + np.sum(gbar_b**2))
        prepared.append((a, b, q_a, q_b, r_a_pinv, r_b_pinv, gbar_a, gbar_b, p_a, p_b))
    g_norm = math.sqrt(sq_norm)
    factor = 1.0
    if clip_unmagnified_grad > 0.0 and g_norm > clip_unmagnified_grad:
        factor = clip_unmagnified_grad / g_norm

    kw = dict(
        lr=lr,
        b1_hat=b1_hat,
        b2_hat=b2_hat,
        eps=eps,
        weight_decay=weight_decay,
        escape_mass=escape_mass,
    )
    new_pairs: list[tuple[Array, Array]] = []
    new_states: list[RitePairState] = []
    for (a, b, q_a, q_b, ra_pinv, rb_pinv, gbar_a, gbar_b, p_a, p_b), ps in zip(
        prepared, state.pairs
    ):
        new_a, fs_a = _rite_factor_update(a, factor * gbar_a, rb_pinv, p_a, ps.a, q_a, **kw)
        new_bt, fs_b = _rite_factor_update(b.T, factor * gbar_b, ra_pinv, p_b, ps.b, q_b, **kw)
        new_pairs.append((new_a, new_bt.T.copy()))
        new_states.append(RitePairState(a=fs_a, b=fs_b))
    return new_pairs, RiteState(
        pairs=new_states, count=k + 1, n_skipped=n_skipped, last_grad_norm=g_norm
    )


# ---------------------------------------------------------------------------------------
# 2.3 iLoRA / πLoRA (Zhu et al.)
# ---------------------------------------------------------------------------------------


def imbalance_objective(a: Array, b: Array) -> float:
    """``‖AᵀA − ρ B Bᵀ‖²_F`` with ``ρ = r / n`` (the quantity iLoRA regularises)."""
    a, b = _f64(a), _f64(b)
    r, n = b.shape
    d = a.T @ a - (r / n) * (b @ b.T)
    return float(np.sum(d * d))


def imbalance_regularization(
    a_star: Array, b_star: Array, lr: float, strength: float
) -> tuple[Array, Array]:
    """iLoRA's decoupled imbalance step (SPEC §2.3; paper eqs. (4)–(5)).

    With ``ρ = r / n`` (``n = B.shape[1]``, the OUTPUT dimension; paper ``r/m`` with its
    m = output features), ``D = A*ᵀA* − ρ B*B*ᵀ`` (r×r), both from the post-base-step
    parameters (simultaneous):

    ``A ← A* − η λ A* D``,  ``B ← B* + η λ ρ D B*``  (= ``B* − ηλρ(ρB*B*ᵀ − A*ᵀA*)B*``).

    Translation from the paper (``A_p = Aᵀ``, ``B_p = Bᵀ``): ``A_pA_pᵀ = AᵀA``,
    ``B_pᵀB_p = BBᵀ``; eq. (4) ``A_p ← A_p − ηλ(·)A_p`` transposes to ``A − ηλ A (·)``.
    This is ¼ of the gradient step on ``λ‖AᵀA − ρBBᵀ‖²_F``.
    """
    a, b = _f64(a_star), _f64(b_star)
    r, n = b.shape
    rho = r / n
    d = a.T @ a - rho * (b @ b.T)
    return a - lr * strength * (a @ d), b + lr * strength * rho * (d @ b)


def ilora_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState,
    lr: float,
    *,
    strength: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    no_bias_correction: bool = False,
) -> tuple[Array, Array, PairAdamWState]:
    """iLoRA (SPEC §2.3, paper Alg. 1/2): :func:`adamw_step` on each factor (optax
    semantics), then :func:`imbalance_regularization` with the same ``lr``."""
    kw = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    a_s, sa = adamw_step(a, g_a, state.a, lr, **kw, no_bias_correction=no_bias_correction)
    b_s, sb = adamw_step(b, g_b, state.b, lr, **kw, no_bias_correction=no_bias_correction)
    new_a, new_b = imbalance_regularization(a_s, b_s, lr, strength)
    return new_a, new_b, PairAdamWState(a=sa, b=sb)


def pilora_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState,
    lr: float,
    *,
    strength: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    delta: float = 1e-6,
    no_bias_correction: bool = False,
) -> tuple[Array, Array, PairAdamWState]:
    """πLoRA (SPEC §2.3, paper Alg. 3): :func:`scaled_adamw_step` (gradients
    preconditioned with the PRE-step factors), then :func:`imbalance_regularization`
    on the post-AdamW factors."""
    a_s, b_s, st = scaled_adamw_step(
        a,
        b,
        g_a,
        g_b,
        state,
        lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        no_bias_correction=no_bias_correction,
    )
    new_a, new_b = imbalance_regularization(a_s, b_s, lr, strength)
    return new_a, new_b, st


# ---------------------------------------------------------------------------------------
# 2.4 LoRA-One (Zhang, Liu, Chen)
# ---------------------------------------------------------------------------------------


def spectral_init(
    g: Array,
    rank: int,
    gamma: float = 128.0,
    scale: float = 1.0,
    preserve_output: bool = False,
    *,
    canonical_signs: bool = True,
) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """LoRA-One spectral initialisation from the full gradient ``G`` (SPEC §2.4).

    SVD of ``−G = U S Vᵀ`` (``G`` is ``m × n``, in×out), top ``r = rank`` triplets,
    ``σ₁ = S[0]``.

    * ``preserve_output=False`` (reference code, the default): ``A₀ = U_r diag(√S_r) /
      √(σ₁γ)``, ``B₀ = diag(√S_r) V_rᵀ / √(σ₁γ)``, so ``s A₀B₀ = −(s/(σ₁γ)) G_r`` (one
      normalised best-rank-r gradient step; W is not modified). Returns ``(A₀, B₀)``;
      ``scale`` does not enter.
    * ``preserve_output=True`` (slides' Algorithm 1, LoRA-GA style): ``A₀ = √γ U_r``,
      ``B₀ = √γ V_rᵀ`` and ``W ← W − s A₀B₀``. Returns ``(A₀, B₀, ΔW₀)`` with
      ``ΔW₀ = −s A₀ B₀`` (``m × n``) the correction the caller ADDS to the frozen base
      weight, so that ``W + ΔW₀ + s A₀B₀ = W`` (model output unchanged at init).
      Decision: U, V come from the same SVD of ``−G`` as above (SPEC's single SVD).
      The slides literally take the SVD of ``+∇_W L``, which gives the same ``U_r`` and
      ``−V_r``, i.e. ``B₀ → −B₀`` and ``ΔW₀ → −ΔW₀``; call ``spectral_init(-g, ...)``
      to get that literal variant. First-order preconditioned dynamics are identical.

    Sign convention (``canonical_signs=True``): the SVD fixes each triplet only up to
    ``(uᵢ, vᵢ) → (−uᵢ, −vᵢ)``; this function flips each pair so the entry of largest
    magnitude of ``uᵢ`` is positive. ``A₀B₀`` never depends on it — compare products
    (or align signs) when testing a different implementation.
    """
    g = _f64(g)
    u, s_vals, vt = np.linalg.svd(-g, full_matrices=False)
    u_r, s_r, vt_r = u[:, :rank], s_vals[:rank], vt[:rank, :]
    if canonical_signs:
        idx = np.argmax(np.abs(u_r), axis=0)
        sgn = np.where(u_r[idx, np.arange(rank)] < 0.0, -1.0, 1.0)
        u_r = u_r * sgn[None, :]
        vt_r = vt_r * sgn[:, None]
    if preserve_output:
        a0 = math.sqrt(gamma) * u_r
        b0 = math.sqrt(gamma) * vt_r
        return a0, b0, -scale * (a0 @ b0)
    sigma1 = float(s_vals[0])
    norm = math.sqrt(sigma1 * gamma)
    sq = np.sqrt(s_r)
    return u_r * sq[None, :] / norm, sq[:, None] * vt_r / norm


def lora_one_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState,
    lr: float,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 1e-6,
    no_bias_correction: bool = True,
) -> tuple[Array, Array, PairAdamWState]:
    """LoRA-One training step (SPEC §2.4): preconditioned AdamW exactly as §2.1 with
    ``δ = 1e-6``, reference-code Adam: NO bias correction, ``eps = 1e-8`` outside the
    square root. (Slides' loop: ``G_A = ∇_A (BBᵀ+λI)⁻¹``, ``G_B = (AᵀA+λI)⁻¹ ∇_B``,
    then AdamW.)"""
    return scaled_adamw_step(
        a,
        b,
        g_a,
        g_b,
        state,
        lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        no_bias_correction=no_bias_correction,
    )


# ---------------------------------------------------------------------------------------
# 2.5 SoLoRA
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoLoRAState:
    """SoLoRA (Alg. 1) statistics: ``r_in`` (m,), ``l_out`` (n,), steps taken."""

    r_in: Array
    l_out: Array
    count: int = 0


@dataclasses.dataclass
class SoLoRAMomentumState:
    """SoLoRA (Alg. 2) statistics plus the full ``m × n`` gradient momentum ``M``.

    Memory: Alg. 2 holds a FULL ``m × n`` moment per pair (as large as the frozen
    weight); Alg. 1 only ``O(m + n)``.
    """

    r_in: Array
    l_out: Array
    mom: Array
    count: int = 0


def solora_metric(vec: Array) -> Array:
    """Diagonal of ``diag(v / √‖v‖₁)`` (entries of ``v`` are ≥ 0). ``v = 0`` gives 0."""
    vec = _f64(vec)
    l1 = float(np.sum(np.abs(vec)))
    return vec / math.sqrt(l1) if l1 > 0.0 else np.zeros_like(vec)


def solora_direction(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    r_in: Array,
    l_out: Array,
    *,
    use_metric: bool = True,
    balanced: bool = True,
    delta: float = 0.0,
) -> tuple[Array, Array]:
    """SoLoRA directions ``(Δ_A, Δ_B)`` (SPEC §2.5, paper Thm 3.1/3.2, Alg. 1 l. 5–6).

    With ``R = diag(solora_metric(r_in))`` (m×m, input side) and ``L =
    diag(solora_metric(l_out))`` (n×n, output side), ``K_A = AᵀR^½A`` and
    ``K_B = B L^½ Bᵀ`` (r×r):

    ``Δ_A = [I − ½ A K_A⁻¹ AᵀR^½] R^(-½) g_A K_B⁻¹``,
    ``Δ_B = K_A⁻¹ g_B L^(-½) [I − ½ L^½ Bᵀ K_B⁻¹ B]``.

    Translation from the paper (``A_p = Aᵀ``, ``B_p = Bᵀ``, paper L ↔ our out axis, R ↔
    our in axis, ``G_{A_p} = g_Aᵀ``, ``G_{B_p} = g_Bᵀ``): Alg. 1 line 6 transposed is
    Δ_A, line 5 transposed is Δ_B. ``g_A``, ``g_B`` are the LoRA gradients including
    the scale ``s`` (SPEC §1/§2.5; the paper has ``s = 1``).

    Identity (checked in the self-test): ``Δ_A B + A Δ_B = s·P̃_T(R^(-½) G L^(-½))``
    with ``P̃_T(X) = P̃_c X + X P̃_r − P̃_c X P̃_r``, ``P̃_c = A K_A⁻¹ AᵀR^½``,
    ``P̃_r = L^½ Bᵀ K_B⁻¹ B`` (paper eq. (10)), when ``g_A = sGBᵀ``, ``g_B = sAᵀG``.

    Decisions: ``K⁻¹`` is ``(K + δI)⁻¹`` for ``delta > 0``, else the pseudo-inverse
    (``B = 0`` at initialisation then gives ``Δ_A = 0`` and ``Δ_B = K_A⁻¹ g_B L^(-½)``);
    the same damped/pseudo inverse is used inside the ½-projection terms.
    ``R^(-½)``, ``L^(-½)`` use ``1/0 := 0`` for zero statistics.

    Flags for reduction tests: ``use_metric=False`` sets ``L = R = I``;
    ``balanced=False`` drops the two ½-terms. With both off,
    ``(Δ_A, Δ_B) = (g_A (BBᵀ)⁻¹, (AᵀA)⁻¹ g_B)`` = :func:`riemannian_precondition` (δ=0).
    """
    a, b, g_a, g_b = _f64(a), _f64(b), _f64(g_a), _f64(g_b)
    m, n = a.shape[0], b.shape[1]
    if use_metric:
        r_diag, l_diag = solora_metric(r_in), solora_metric(l_out)
    else:
        r_diag, l_diag = np.ones(m), np.ones(n)
    r_half, l_half = np.sqrt(r_diag), np.sqrt(l_diag)
    r_mhalf, l_mhalf = _safe_recip(r_half), _safe_recip(l_half)
    k_a_inv = _inv_spd(a.T @ (r_half[:, None] * a), delta)
    k_b_inv = _inv_spd((b * l_half[None, :]) @ b.T, delta)

    d_a = (r_mhalf[:, None] * g_a) @ k_b_inv  # R^(-½) g_A K_B⁻¹   (m×r)
    d_b = k_a_inv @ (g_b * l_mhalf[None, :])  # K_A⁻¹ g_B L^(-½)   (r×n)
    if balanced:
        # [I − ½ A K_A⁻¹ AᵀR^½] X   and   Y [I − ½ L^½ Bᵀ K_B⁻¹ B]
        d_a = d_a - 0.5 * a @ (k_a_inv @ (a.T @ (r_half[:, None] * d_a)))
        d_b = d_b - 0.5 * ((d_b * l_half[None, :]) @ b.T) @ k_b_inv @ b
    return d_a, d_b


def solora_sgd_init(a: Array, b: Array) -> SoLoRAState:
    """Zero statistics ``r₀ = 0`` (m,), ``l₀ = 0`` (n,) (Alg. 1 line 1)."""
    return SoLoRAState(r_in=np.zeros(np.shape(a)[0]), l_out=np.zeros(np.shape(b)[1]), count=0)


def _solora_stats(g: Array, r_in: Array, l_out: Array, beta: float) -> tuple[Array, Array]:
    g2 = g * g
    return beta * r_in + (1.0 - beta) * g2.sum(axis=1), beta * l_out + (1.0 - beta) * g2.sum(axis=0)


def solora_sgd_step(
    a: Array,
    b: Array,
    g: Array,
    state: SoLoRAState,
    lr: float,
    beta: float = 0.98,
    scale: float = 1.0,
    *,
    use_metric: bool = True,
    balanced: bool = True,
    delta: float = 0.0,
) -> tuple[Array, Array, SoLoRAState]:
    """SoLoRA with SGD (SPEC §2.5, paper Alg. 1).

    ``G`` is the full-weight gradient (m×n) at the current effective weight.
    ``r_in ← β r_in + (1−β) rowsums(G⊙G)`` (m), ``l_out ← β l_out + (1−β)
    colsums(G⊙G)`` (n) — no bias correction in Alg. 1 (paper β₁ = β₂ = β = 0.98);
    ``g_A = s G Bᵀ``, ``g_B = s Aᵀ G``; ``(Δ_A, Δ_B) =`` :func:`solora_direction` from
    the pre-step factors and the UPDATED statistics; ``A ← A − ηΔ_A``, ``B ← B − ηΔ_B``.
    """
    a, b, g = _f64(a), _f64(b), _f64(g)
    r_in, l_out = _solora_stats(g, state.r_in, state.l_out, beta)
    g_a, g_b = scale * g @ b.T, scale * a.T @ g
    d_a, d_b = solora_direction(
        a, b, g_a, g_b, r_in, l_out, use_metric=use_metric, balanced=balanced, delta=delta
    )
    return a - lr * d_a, b - lr * d_b, SoLoRAState(r_in=r_in, l_out=l_out, count=state.count + 1)


def solora_adamw_init(a: Array, b: Array) -> SoLoRAMomentumState:
    """Zero statistics and zero full momentum ``M₀ = 0`` (m×n) (Alg. 2 line 1)."""
    m, n = np.shape(a)[0], np.shape(b)[1]
    return SoLoRAMomentumState(r_in=np.zeros(m), l_out=np.zeros(n), mom=np.zeros((m, n)))


def solora_adamw_step(
    a: Array,
    b: Array,
    g: Array,
    state: SoLoRAMomentumState,
    lr: float,
    beta: float = 0.98,
    beta3: float = 0.9,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    *,
    use_metric: bool = True,
    balanced: bool = True,
    delta: float = 0.0,
) -> tuple[Array, Array, SoLoRAMomentumState]:
    """SoLoRA with momentum (SPEC §2.5, paper Alg. 2), ``t = count + 1``.

    Statistics updated from the RAW ``G`` exactly as in Alg. 1; ``M ← β₃M + (1−β₃)G``
    (full m×n); the directions use ``g_A = s M Bᵀ``, ``g_B = s Aᵀ M`` and the pre-step
    factors; ``η̃ = η √(1−βᵗ) / (1−β₃ᵗ)``;
    ``A ← (1 − λη) A − η̃ Δ_A``, ``B ← (1 − λη) B − η̃ Δ_B`` (decoupled weight decay with
    the un-corrected η; the paper's "(1 − λη_t B_t)" is read as ``(1 − λη_t) B_t``).
    """
    a, b, g = _f64(a), _f64(b), _f64(g)
    t = state.count + 1
    r_in, l_out = _solora_stats(g, state.r_in, state.l_out, beta)
    mom = beta3 * state.mom + (1.0 - beta3) * g
    g_a, g_b = scale * mom @ b.T, scale * a.T @ mom
    d_a, d_b = solora_direction(
        a, b, g_a, g_b, r_in, l_out, use_metric=use_metric, balanced=balanced, delta=delta
    )
    lr_t = lr * math.sqrt(1.0 - beta**t) / (1.0 - beta3**t)
    decay = 1.0 - weight_decay * lr
    return (
        decay * a - lr_t * d_a,
        decay * b - lr_t * d_b,
        SoLoRAMomentumState(r_in=r_in, l_out=l_out, mom=mom, count=t),
    )


# ---------------------------------------------------------------------------------------
# 2.6 Baselines: LoRA+ and LoRA-Pro
# ---------------------------------------------------------------------------------------


def lora_plus_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    state: PairAdamWState,
    lr: float,
    *,
    ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> tuple[Array, Array, PairAdamWState]:
    """LoRA+ with AdamW (SPEC §2.6): learning rate ``lr`` for A, ``ratio·lr`` for B
    (weight decay therefore also scaled by ``ratio·lr`` on B, as with optax)."""
    kw = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    new_a, sa = adamw_step(a, g_a, state.a, lr, **kw)
    new_b, sb = adamw_step(b, g_b, state.b, ratio * lr, **kw)
    return new_a, new_b, PairAdamWState(a=sa, b=sb)


def tangent_projectors(a: Array, b: Array, delta: float = 0.0) -> tuple[Array, Array]:
    """``(P_col, P_row)``: orthogonal projectors onto col-span(A) (m×m) and row-span(B)
    (n×n): ``P_col = A (AᵀA)⁻¹ Aᵀ``, ``P_row = Bᵀ (BBᵀ)⁻¹ B`` (pseudo-inverse if
    ``delta = 0``, else damped)."""
    a, b = _f64(a), _f64(b)
    return a @ _inv_spd(a.T @ a, delta) @ a.T, b.T @ _inv_spd(b @ b.T, delta) @ b


def lora_pro_equivalent_gradient(
    a: Array, b: Array, g: Array, scale: float = 1.0, delta: float = 0.0
) -> Array:
    """LoRA-Pro's equivalent gradient in our orientation (SPEC §2.6).

    The tangent space of ``{s A B}`` at ``AB`` is ``{X B + A Y}``; the Frobenius
    projection of ``G`` onto it is ``g̃ = P_col G + G P_row − P_col G P_row`` with
    ``P_col`` the projector onto col-span(A) (input side) and ``P_row`` onto
    row-span(B) (output side). The paper (``W = W₀ + s B_p A_p``, ``B_p`` out×r,
    ``A_p`` r×in) writes ``P_{B_p} g + g P_{A_p} − P_{B_p} g P_{A_p}``; transposed into
    our orientation (``B_p = Bᵀ``, ``A_p = Aᵀ``, ``g = Gᵀ``) this is the formula above.
    ``scale`` does not enter (kept for a uniform signature): the paper defines
    ``g̃ = s B_p g^A + s g^B A_p``, in which the s factors cancel.
    """
    p_col, p_row = tangent_projectors(a, b, delta)
    g = _f64(g)
    return p_col @ g + g @ p_row - p_col @ g @ p_row


def sylvester_solve_direct(p: Array, q: Array, c: Array) -> Array:
    """Solve ``P X + X Q = C`` (``P`` k×k, ``Q`` l×l, ``C`` k×l) by the dense Kronecker
    system: with row-major ``vec``, ``vec(PX) = (P ⊗ I_l) vec X`` and ``vec(XQ) =
    (I_k ⊗ Qᵀ) vec X``, so ``(P ⊗ I + I ⊗ Qᵀ) vec X = vec C`` (``np.linalg.solve``)."""
    p, q, c = _f64(p), _f64(q), _f64(c)
    k, l = c.shape
    kron = np.kron(p, np.eye(l)) + np.kron(np.eye(k), q.T)
    return np.linalg.solve(kron, c.reshape(-1)).reshape(k, l)


def lora_pro_step(
    a: Array,
    b: Array,
    g_a: Array,
    g_b: Array,
    scale: float = 1.0,
    *,
    delta: float = 0.0,
) -> tuple[Array, Array]:
    """LoRA-Pro adjusted low-rank gradients ``(g̃_A, g̃_B)`` in our orientation.

    Paper closed form (``W = W₀ + s B_p A_p``, ``B_p`` m_out×r, ``A_p`` r×n_in, LoRA
    gradients ``g^A_lora = sB_pᵀg``, ``g^B_lora = s g A_pᵀ``), Thm. 2.1/2.2 and the
    authors' code:
    ``g^A = s⁻²(B_pᵀB_p)⁻¹ g^A_lora + X A_p``,
    ``g^B = s⁻²[I − B_p(B_pᵀB_p)⁻¹B_pᵀ] g^B_lora (A_pA_pᵀ)⁻¹ − B_p X``,
    ``B_pᵀB_p X + X A_pA_pᵀ = −s⁻²(B_pᵀB_p)⁻¹ g^A_lora A_pᵀ``.

    Ours (``A = A_pᵀ``, ``B = B_pᵀ``, transposing everything, ``Y = Xᵀ`` r×r):

    ``g̃_A = s⁻² g_A (BBᵀ)⁻¹ + A Y``,
    ``g̃_B = s⁻² (AᵀA)⁻¹ g_B (I − P_row) − Y B``,  ``P_row = Bᵀ(BBᵀ)⁻¹B``,
    ``(AᵀA) Y + Y (BBᵀ) = −s⁻² Aᵀ g_A (BBᵀ)⁻¹``  (solved by :func:`sylvester_solve_direct`).

    Properties (checked in the self-test, with ``g_A = sGBᵀ``, ``g_B = sAᵀG``):
    ``s(g̃_A B + A g̃_B) = P_col G + G P_row − P_col G P_row`` (the Y terms cancel), and
    Y minimises ``‖g̃_A − g_A‖² + ‖g̃_B − g_B‖²``. Inverses are pseudo-inverses when
    ``delta = 0`` (the authors use ``pinv(K + 1e-8 I)``); ``B = 0`` then gives
    ``g̃_A = 0``, ``Y = 0``, ``g̃_B = s⁻²(AᵀA)⁻¹g_B`` (the authors' first-step branch).
    """
    a, b, g_a, g_b = _f64(a), _f64(b), _f64(g_a), _f64(g_b)
    inv_bb = _inv_spd(b @ b.T, delta)
    inv_aa = _inv_spd(a.T @ a, delta)
    s2 = 1.0 / scale**2
    rhs = -s2 * (a.T @ g_a @ inv_bb)
    y = sylvester_solve_direct(a.T @ a, b @ b.T, rhs)
    p_row = b.T @ inv_bb @ b
    new_g_a = s2 * g_a @ inv_bb + a @ y
    new_g_b = s2 * inv_aa @ g_b @ (np.eye(b.shape[1]) - p_row) - y @ b
    return new_g_a, new_g_b


# ---------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------


def _close(x: Array | float, y: Array | float, tol: float = 1e-9, what: str = "") -> None:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    err = float(np.max(np.abs(x - y))) if x.size else 0.0
    ref = max(1.0, float(np.max(np.abs(y))) if y.size else 0.0)
    if not err <= tol * ref:
        raise AssertionError(f"{what}: max abs err {err:.3e} > {tol:.1e} * {ref:.3e}")


def _self_check() -> None:
    rng = np.random.default_rng(0)
    m, n, r, s = 9, 7, 3, 0.5

    def rand(*shape: int) -> Array:
        return rng.normal(size=shape)

    # --- 2.1 Riemannian preconditioner --------------------------------------------------
    a, b, g = rand(m, r), rand(r, n), rand(m, n)
    g_a, g_b = s * g @ b.T, s * a.T @ g
    pa, pb = riemannian_precondition(g_a, g_b, a, b, 1e-3)
    _close(pa @ (b @ b.T + 1e-3 * np.eye(r)), g_a, what="precond A")
    _close((a.T @ a + 1e-3 * np.eye(r)) @ pb, g_b, what="precond B")
    z = np.zeros((r, n))
    pa0, pb0 = riemannian_precondition(s * g @ z.T, s * a.T @ g, a, z, 0.0)
    assert np.all(pa0 == 0.0) and np.all(np.isfinite(pb0))

    # --- AdamW -------------------------------------------------------------------------
    p, st = rand(4, 3), adamw_init(np.zeros((4, 3)))
    g1 = rand(4, 3)
    p1, st = adamw_step(p, g1, st, 0.1, weight_decay=0.01)
    _close(p1, p - 0.1 * (g1 / (np.abs(g1) + 1e-8) + 0.01 * p), what="adamw step 1")
    g2 = rand(4, 3)
    p2, _ = adamw_step(p1, g2, st, 0.1, weight_decay=0.0)
    mu = 0.9 * 0.1 * g1 + 0.1 * g2
    nu = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    _close(
        p2,
        p1 - 0.1 * (mu / (1 - 0.81)) / (np.sqrt(nu / (1 - 0.999**2)) + 1e-8),
        what="adamw step 2",
    )
    p1n, _ = adamw_step(p, g1, adamw_init(p), 0.1, no_bias_correction=True, weight_decay=0)
    _close(p1n, p - 0.1 * 0.1 * g1 / (np.sqrt(0.001) * np.abs(g1) + 1e-8), what="no bc")

    # --- 2.2 LoRA-RITE: transformation invariance --------------------------------------
    w_star = rand(m, n)
    m2, n2 = 6, 8

    # Gradient magnitudes chosen so that, with the safeguards on, some steps are clipped
    # (global norm > 1) and some factors are skipped (RMS > 1), but not all.
    grad_scales = (0.1, 0.4, 0.25, 3.0, 0.3, 0.05, 0.6, 0.2, 8.0, 0.15)

    def run_rite(
        init_pairs: list[tuple[Array, Array]], **kw: float
    ) -> tuple[list[list[Array]], list[float], RiteState]:
        targets = [w_star, target2]
        pairs_ = [(x.copy(), y.copy()) for x, y in init_pairs]
        st_ = rite_init(pairs_)
        products, norms = [], []
        for c in grad_scales:
            grads_ = []
            for (x, y), tgt in zip(pairs_, targets):
                gg = (s * x @ y - tgt) * c
                grads_.append((s * gg @ y.T, s * x.T @ gg))
            pairs_, st_ = rite_step(pairs_, grads_, st_, 0.05, **kw)
            products.append([x @ y for x, y in pairs_])
            norms.append(st_.last_grad_norm)
        return products, norms, st_

    target2 = rand(m2, n2)
    a1, b1_ = rand(m, r), rand(r, n)
    a2, b2_ = rand(m2, r), np.zeros((r, n2))  # second pair starts at B = 0
    t1, t2 = rand(r, r) + 2 * np.eye(r), rand(r, r) + 2 * np.eye(r)
    base_pairs = [(a1, b1_), (a2, b2_)]
    moved_pairs = [(a1 @ t1, np.linalg.solve(t1, b1_)), (a2 @ t2, np.linalg.solve(t2, b2_))]
    for kw in (
        dict(clip_unmagnified_grad=0.0, skip_threshold=0.0),
        dict(clip_unmagnified_grad=1.0, skip_threshold=1.0),
        dict(clip_unmagnified_grad=1.0, skip_threshold=1.0, escape_mass=True),
        dict(clip_unmagnified_grad=0.0, skip_threshold=0.0, escape_mass=True),
        dict(clip_unmagnified_grad=1.0, skip_threshold=1.0, weight_decay=0.5),
    ):
        prod1, norms1, st1 = run_rite(base_pairs, **kw)
        prod2, norms2, st2 = run_rite(moved_pairs, **kw)
        for pp1, pp2 in zip(prod1, prod2):
            for x, y in zip(pp1, pp2):
                _close(x, y, 1e-8, what=f"rite invariance {kw}")
        assert st1.n_skipped == st2.n_skipped
        _close(norms1, norms2, 1e-9, what="rite gnorm")
        if kw["skip_threshold"] > 0:
            n_factors = 2 * len(base_pairs) * len(grad_scales)
            assert 0 < st1.n_skipped < n_factors, st1.n_skipped
            assert any(1.0 < x for x in norms1), norms1
        if kw.get("escape_mass"):
            assert all(ps.a.rho >= 0 and ps.b.rho >= 0 for ps in st1.pairs)
            assert any(ps.a.rho > 0 or ps.b.rho > 0 for ps in st1.pairs)
    assert np.max(np.abs(prod1[-1][0] - a1 @ b1_)) > 1e-2  # the trajectory did move
    # qr_positive's R is the Cholesky factor used by the library's Gram route.
    _, r_chk = qr_positive(b1_.T)
    _close(r_chk, np.linalg.cholesky(b1_ @ b1_.T).T, what="qr_positive = cholesky")
    # B = 0 at step 1: A does not move, B gets a finite update.
    st0 = rite_init([(a2, b2_)])
    gg = s * a2 @ b2_ - target2
    ((na, nb),) = rite_step([(a2, b2_)], [(s * gg @ b2_.T, s * a2.T @ gg)], st0, 0.1)[0]
    assert np.array_equal(na, a2) and np.all(np.isfinite(nb)) and np.any(nb != 0)
    # First step (β̂ = 0, no safeguards): ΔA = −η Ḡ (ḠᵀḠ/m)^(-1/2) R_B^(-T) exactly.
    g_a = s * (s * a1 @ b1_ - w_star) @ b1_.T
    g_b = s * a1.T @ (s * a1 @ b1_ - w_star)
    ((na, nb),) = rite_step(
        [(a1, b1_)],
        [(g_a, g_b)],
        rite_init([(a1, b1_)]),
        0.1,
        clip_unmagnified_grad=0.0,
        skip_threshold=0.0,
        eps=0.0,
    )[0]
    _, rb = np.linalg.qr(b1_.T)
    gbar = g_a @ np.linalg.inv(rb)
    lam, uu = np.linalg.eigh(gbar.T @ gbar / m)
    _close(
        na, a1 - 0.1 * gbar @ (uu / np.sqrt(lam)) @ uu.T @ np.linalg.inv(rb).T, what="rite step 1"
    )
    # Skip test zeros a factor; counted.
    big = [(1e3 * g_a, g_b)]
    _, st_skip = rite_step([(a1, b1_)], big, rite_init([(a1, b1_)]), 0.1)
    assert st_skip.n_skipped >= 1

    # --- 2.3 iLoRA ---------------------------------------------------------------------
    a, b = rand(m, r), rand(r, n)
    before = imbalance_objective(a, b)
    na, nb = imbalance_regularization(a, b, 1e-3, 1.0)
    assert imbalance_objective(na, nb) < before
    # ¼ of the exact gradient of ‖AᵀA − ρBBᵀ‖²: compare with finite differences.
    eps_fd, direction_a, direction_b = 1e-6, rand(m, r), rand(r, n)
    fd = (
        imbalance_objective(a + eps_fd * direction_a, b + eps_fd * direction_b)
        - imbalance_objective(a - eps_fd * direction_a, b - eps_fd * direction_b)
    ) / (2 * eps_fd)
    step_a, step_b = (a - na) / 1e-3, (b - nb) / 1e-3
    _close(
        4 * (np.sum(step_a * direction_a) + np.sum(step_b * direction_b)),
        fd,
        1e-6,
        what="ilora gradient",
    )
    g_a, g_b = rand(m, r), rand(r, n)
    na, nb, _ = ilora_step(a, b, g_a, g_b, pair_adamw_init(a, b), 1e-2, strength=0.5)
    ea, _ = adamw_step(a, g_a, adamw_init(a), 1e-2)
    eb, _ = adamw_step(b, g_b, adamw_init(b), 1e-2)
    ra_, rb_ = imbalance_regularization(ea, eb, 1e-2, 0.5)
    _close(na, ra_, what="ilora A")
    _close(nb, rb_, what="ilora B")
    na, nb, _ = pilora_step(a, b, g_a, g_b, pair_adamw_init(a, b), 1e-2, strength=0.5)
    assert np.all(np.isfinite(na)) and np.all(np.isfinite(nb))

    # --- 2.4 LoRA-One ------------------------------------------------------------------
    g = rand(m, n)
    a0, b0 = spectral_init(g, r, gamma=64.0, scale=s)
    u, sv, vt = np.linalg.svd(g)
    g_r = (u[:, :r] * sv[:r]) @ vt[:r]
    _close(s * a0 @ b0, -(s / (sv[0] * 64.0)) * g_r, what="spectral init")
    a0p, b0p, dw = spectral_init(g, r, gamma=64.0, scale=s, preserve_output=True)
    _close(dw + s * a0p @ b0p, np.zeros((m, n)), what="preserve output")
    _close(a0p.T @ a0p, 64.0 * np.eye(r), what="slides A0")
    _close(np.abs(a0p), np.abs(a0) * np.sqrt(64.0 * sv[0] * 64.0 / sv[:r]), what="same U")
    na, nb, _ = lora_one_step(a0, b0, s * g @ b0.T, s * a0.T @ g, pair_adamw_init(a0, b0), 1e-3)
    assert np.all(np.isfinite(na)) and np.all(np.isfinite(nb))

    # --- 2.5 SoLoRA --------------------------------------------------------------------
    a, b, g = rand(m, r), rand(r, n), rand(m, n)
    g_a, g_b = s * g @ b.T, s * a.T @ g
    d_a, d_b = solora_direction(
        a, b, g_a, g_b, np.ones(m), np.ones(n), use_metric=False, balanced=False
    )
    pa, pb = riemannian_precondition(g_a, g_b, a, b, 0.0)
    _close(d_a, pa, what="solora -> riemannian A")
    _close(d_b, pb, what="solora -> riemannian B")
    st = solora_sgd_init(a, b)
    for _ in range(3):
        st = SoLoRAState(*_solora_stats(rand(m, n), st.r_in, st.l_out, 0.98), st.count + 1)
    d_a, d_b = solora_direction(a, b, g_a, g_b, st.r_in, st.l_out)
    rh = np.sqrt(solora_metric(st.r_in))
    lh = np.sqrt(solora_metric(st.l_out))
    x = (g / rh[:, None]) / lh[None, :]
    pc = a @ np.linalg.inv(a.T @ (rh[:, None] * a)) @ a.T * rh[None, :]
    pr = (lh[:, None] * b.T) @ np.linalg.inv((b * lh[None, :]) @ b.T) @ b
    _close(d_a @ b + a @ d_b, s * (pc @ x + x @ pr - pc @ x @ pr), what="solora tangent")
    d_a, d_b = solora_direction(a, b, g_a, g_b, st.r_in, st.l_out, use_metric=False)
    _close(d_a @ b + a @ d_b, s * lora_pro_equivalent_gradient(a, b, g), what="solora L=R=I")
    # Alg. 1 from B = 0 is finite; Alg. 2 with β₃ = 0, wd = 0 equals Alg. 1 up to the
    # step-size factor √(1−βᵗ).
    z = np.zeros((r, n))
    na, nb, _ = solora_sgd_step(a, z, g, solora_sgd_init(a, z), 0.1, scale=s)
    assert np.array_equal(na, a) and np.all(np.isfinite(nb)) and np.any(nb != 0)
    st1, st2 = solora_sgd_init(a, b), solora_adamw_init(a, b)
    x1, y1, x2, y2 = a, b, a, b
    for t in range(1, 4):
        gt = rand(m, n)
        x1, y1, st1 = solora_sgd_step(x1, y1, gt, st1, 0.01 * math.sqrt(1 - 0.98**t), scale=s)
        x2, y2, st2 = solora_adamw_step(x2, y2, gt, st2, 0.01, beta3=0.0, scale=s)
        _close(x1, x2, what="solora alg2 vs alg1 A")
        _close(y1, y2, what="solora alg2 vs alg1 B")

    # --- 2.6 LoRA-Pro ------------------------------------------------------------------
    a, b, g = rand(m, r), rand(r, n), rand(m, n)
    p_, q_, c_ = rand(r, r), rand(r + 1, r + 1), rand(r, r + 1)
    p_, q_ = p_ @ p_.T + np.eye(r), q_ @ q_.T + np.eye(r + 1)
    xs = sylvester_solve_direct(p_, q_, c_)
    _close(p_ @ xs + xs @ q_, c_, what="sylvester")
    g_a, g_b = s * g @ b.T, s * a.T @ g
    ga_t, gb_t = lora_pro_step(a, b, g_a, g_b, s)
    geq = lora_pro_equivalent_gradient(a, b, g, s)
    _close(s * (ga_t @ b + a @ gb_t), geq, what="lora-pro equivalent gradient")
    resid = g - geq  # orthogonal to the tangent space {XB + AY}
    _close(a.T @ resid, np.zeros((r, n)), what="tangent orth A")
    _close(resid @ b.T, np.zeros((m, r)), what="tangent orth B")
    # Y minimises ‖g̃_A − g_A‖² + ‖g̃_B − g_B‖² (least squares over vec Y).
    inv_bb, inv_aa = np.linalg.inv(b @ b.T), np.linalg.inv(a.T @ a)
    c_a = g_a @ inv_bb / s**2
    c_b = inv_aa @ g_b @ (np.eye(n) - b.T @ inv_bb @ b) / s**2
    rows_a = np.kron(a, np.eye(r))  # vec(A Y) = (A ⊗ I) vec Y  (row-major)
    rows_b = -np.kron(np.eye(r), b.T)  # vec(−Y B) = −(I ⊗ Bᵀ) vec Y
    lhs = np.vstack([rows_a, rows_b])
    rhs = np.concatenate([(g_a - c_a).ravel(), (g_b - c_b).ravel()])
    y_ls = np.linalg.lstsq(lhs, rhs, rcond=None)[0].reshape(r, r)
    _close(ga_t, c_a + a @ y_ls, 1e-8, what="lora-pro X optimal A")
    _close(gb_t, c_b - y_ls @ b, 1e-8, what="lora-pro X optimal B")
    ga0, gb0 = lora_pro_step(a, z, s * g @ z.T, s * a.T @ g, s)
    assert np.all(ga0 == 0) and np.all(np.isfinite(gb0))
    _close(gb0, np.linalg.inv(a.T @ a) @ (s * a.T @ g) / s**2, what="lora-pro B=0")
    na, nb, _ = lora_plus_step(a, b, g_a, g_b, pair_adamw_init(a, b), 1e-3, ratio=4.0)
    assert np.all(np.isfinite(na)) and np.all(np.isfinite(nb))


if __name__ == "__main__":
    _self_check()
    print("OK")
