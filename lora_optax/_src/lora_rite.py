"""LoRA-RITE (Yen et al., ICLR 2025): transformation-invariant adaptive matrix preconditioning.

Notation of SPEC §1/§2.2: ``A`` is ``m × r``, ``B`` is ``r × n``; the algorithm is written
for ``A`` and applied to ``B`` through its rank-last view ``Bᵀ`` (``n × r``). Every
quantity below is per pair and per stacked layer.

Implementation outline (one ``update``):

1. Pairs with identical shapes are stacked into groups (``stack_pairs=True``, default),
   and per group the r×r Gram matrices ``XᵀX`` of both factors, ``gᵀg`` of both
   gradients and ``X_newᵀ X_prev`` are formed by batched contractions (Gram route), or
   QR factors are computed (QR route).
2. r×r pass, batched over ALL factors of the same rank: pseudo-inverse of ``R``, basis
   change ``P``, unmagnified-gradient statistics (``‖Ḡ‖``, skip test, joint clipping),
   second moment, escaped mass, inverse root, all reduced to three r×r multipliers per
   factor: ``W₁ = β̂₁Pᵀ``, ``W₂ = (1-β̂₁)·c·R_o⁺(V̄+ρI)^-½`` and ``W₃ = R_o⁺ᵀ``
   (``o`` the other factor, ``c`` the clip/skip factor).
3. Per group: ``M̄ ← M̄ W₁ + g W₂`` and the direction ``M̄ W₃`` (batched products).

The pair state is kept stacked per group, so the stacked factors of this step are the
next step's ``prev`` and the moments need no per-factor slicing: an update compiles to a
few kernels per group plus one per factor (the unstacked direction), fewer than AdamW's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg
from lora_optax._src.pairs import LeafIndex, LoRAPair, PairSpec, resolve_pairs
from lora_optax._src.riemannian import pair_params

_BASES = ("gram", "qr")


class LoRARiteGroupState(NamedTuple):
    """LoRA-RITE state of one group of same-shape pairs, stacked along axis 0.

    ``N`` is the group's number of pairs times their stacked layers, in the order of
    :func:`lora_rite_groups` (pairs in order, each pair's layers row-major).

    Attributes:
      mu_a: ``(N, m, r)`` unmagnified first moments ``M̄_A`` (basis of ``B``'s ``Q``).
      mu_b: ``(N, r, n)`` unmagnified first moments of ``B``, in ``B``'s layout
        (``M̄_Bᵀ`` of the rank-last view).
      prev_a, prev_b: what the next basis change needs: the factors at the last step
        (``basis="gram"``), or their ``Q`` (``"qr"``; ``Q_Bᵀ`` in ``B``'s layout);
        zeros before the first step.
      v: ``(2N, r, r)`` unmagnified second moments ``V̄``: rows ``[0, N)`` of the
        ``A`` factors, ``[N, 2N)`` of the ``B`` factors. Float32 or wider.
      rinv: ``(2N, r, r)`` pseudo-inverses ``R⁺`` at the last step (``"gram"``), or
        ``optax.MaskedNode()`` (``"qr"``).
      rho: ``(2N,)`` escaped masses ``ρ`` (zeros unless ``escape_mass``).
    """

    mu_a: jax.Array
    mu_b: jax.Array
    prev_a: jax.Array
    prev_b: jax.Array
    v: jax.Array
    rinv: Any
    rho: jax.Array


class ScaleByLoRARiteState(NamedTuple):
    """State of :func:`scale_by_lora_rite`.

    Attributes:
      count: number of steps taken (int32); the 0-based step ``k`` of β̂.
      mu: params-like tree: Adam's first moment at leaves outside any pair,
        ``optax.MaskedNode()`` at LoRA factors.
      nu: params-like tree: Adam's second moment at leaves outside any pair,
        ``optax.MaskedNode()`` at LoRA factors.
      groups: one :class:`LoRARiteGroupState` per group of pairs (see
        :func:`lora_rite_groups`; use :func:`lora_rite_factor_state` to read the state
        of one factor). Keeping same-shape pairs stacked lets one update run a few
        batched kernels instead of several per factor, and the stacked factors of
        this step become the next step's ``prev`` without a copy.
      n_skipped: cumulative number of factor updates dropped by the skip test (one
        count per factor and stacked layer), int32.
      grad_norm: global norm of the unmagnified gradients at the last step, after the
        skip test and before clipping (NaN before the first step).
    """

    count: jax.Array  # type: ignore[assignment]  # field name shadows tuple.count
    mu: Any
    nu: Any
    groups: tuple[LoRARiteGroupState, ...]
    n_skipped: jax.Array
    grad_norm: jax.Array


def _adafactor_decay(beta: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``β(1-βᵏ)/(1-βᵏ⁺¹)`` with ``k = count`` (0-based); 0 at the first step."""
    beta = jnp.asarray(beta, dtype)
    k = count.astype(dtype)
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1.0))


def _mt(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def lora_rite_groups(
    pairs: tuple[LoRAPair, ...], tree: Any, *, stack_pairs: bool = True
) -> tuple[tuple[LoRAPair, ...], ...]:
    """The groups of pairs whose state :func:`scale_by_lora_rite` stacks together
    (:func:`lora_optax._src.linalg.group_pairs`, or one group per pair)."""
    if stack_pairs:
        return linalg.group_pairs(pairs, tree)
    return tuple((p,) for p in pairs)


def _stack(group: tuple[LoRAPair, ...], index: LeafIndex, role: str) -> tuple[jax.Array, Any]:
    """The group's factors (role "a" or "b") as ``(N, m, r)`` / ``(N, r, n)``."""
    if role == "a":
        xs = [linalg.a_matrix(p, index[p.a_path]) for p in group]
    else:
        xs = [linalg.b_matrix(p, index[p.b_path]) for p in group]
    return linalg.stack_leading(xs, 2)


def lora_rite_factor_state(
    state: ScaleByLoRARiteState,
    params: Any,
    *,
    pairs: PairSpec = None,
    stack_pairs: bool = True,
) -> dict[str, dict[str, jax.Array]]:
    """The LoRA-RITE state of every factor, unstacked, keyed by the factor's path.

    Args:
      state: a :class:`ScaleByLoRARiteState` (e.g. ``opt_state[0]`` of
        :func:`lora_rite`).
      params: the params (or a tree of the same structure and shapes).
      pairs, stack_pairs: as given to :func:`scale_by_lora_rite`.

    Returns:
      ``{"path/of/factor": {"mu": ..., "prev": ..., "v": ..., "rinv": ..., "rho":
      ...}}`` with ``mu``/``prev`` in the factor's shape, ``v``/``rinv`` of shape
      ``(*batch, r, r)`` and ``rho`` of shape ``(*batch,)`` (``rinv`` absent for
      ``basis="qr"``).
    """
    resolved = resolve_pairs(pairs, params, what="lora_rite_factor_state")
    index = LeafIndex(params)
    out: dict[str, dict[str, jax.Array]] = {}
    groups = lora_rite_groups(resolved, index, stack_pairs=stack_pairs)
    for group, gs in zip(groups, state.groups):
        n = gs.mu_a.shape[0]
        for role in ("a", "b"):
            _, unstack = _stack(group, index, role)
            sl = slice(0, n) if role == "a" else slice(n, 2 * n)
            fields = {
                "mu": unstack(gs.mu_a if role == "a" else gs.mu_b),
                "prev": unstack(gs.prev_a if role == "a" else gs.prev_b),
                "v": unstack(gs.v[sl]),
                "rho": unstack(gs.rho[sl][:, None, None]),
            }
            if not isinstance(gs.rinv, optax.MaskedNode):
                fields["rinv"] = unstack(gs.rinv[sl])
            for i, pair in enumerate(group):
                path = pair.a_path if role == "a" else pair.b_path
                shape = index[path].shape
                k = pair.batch_ndim
                entry = {
                    "mu": linalg.from_matrix(fields["mu"][i], shape, pair),
                    "prev": linalg.from_matrix(fields["prev"][i], shape, pair),
                    "v": fields["v"][i],
                    "rho": fields["rho"][i].reshape(tuple(shape[:k])),
                }
                if "rinv" in fields:
                    entry["rinv"] = fields["rinv"][i]
                out["/".join(path)] = entry
    return out


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    clip_unmagnified_grad: float = 1.0,
    skip_threshold: float = 1.0,
    escape_mass: bool = False,
    basis: str = "gram",
    stack_pairs: bool = True,
    mu_dtype: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformation:
    r"""LoRA-RITE's transformation-invariant preconditioning (direction, before ``-η``).

    For every LoRA pair (``ΔW = s·A B``, ``A`` m×r, ``B`` r×n), written for ``A``
    (``B`` is the same on its rank-last view ``Bᵀ`` with the roles swapped), at the
    0-based step ``k`` with ``β̂ = β(1-βᵏ)/(1-βᵏ⁺¹)`` (Adafactor's bias-corrected
    decay; no further bias correction):

    .. math::

      B^\top = Q_B R_B, \quad \bar G_A = g_A R_B^{+}, \quad P_A = Q_B^\top Q_{B,prev}

      \bar V_A \leftarrow \hat\beta_2 P_A \bar V_A P_A^\top
                + (1-\hat\beta_2)\,\bar G_A^\top \bar G_A / m

      \bar S_A = \bar G_A\, U \operatorname{diag}\big(1/(\sqrt{\lambda + \rho_A}
                + \epsilon)\big) U^\top \quad (\bar V_A = U \Lambda U^\top)

      \bar M_A \leftarrow \hat\beta_1 \bar M_A P_A^\top + (1-\hat\beta_1) \bar S_A,
      \qquad \text{direction}_A = \bar M_A R_B^{+\top}.

    Behaviour of the first author's PyTorch port of the original JAX code (SPEC §2.2),
    which these defaults reproduce:

    * ``R⁺`` is a pseudo-inverse: ``B = 0`` gives ``Ḡ_A = 0`` (no update of ``A`` at the
      first step of a standard LoRA initialisation) and a finite update of ``B``;
      ``Q_prev = 0`` before the first step.
    * Skip test, per factor (and stacked layer), on the unclipped unmagnified
      gradient: if ``RMS(Ḡ) = ‖Ḡ‖_F/√(rows·r) > skip_threshold`` that factor's
      gradient is replaced by 0 for this step (its moments still decay, its parameter
      still moves by momentum). A factor whose ``‖Ḡ‖`` is not finite is always
      dropped that way (the port would let NaN into the second moment for good).
      Counted in ``state.n_skipped``.
    * Then joint clipping: ``g_norm = √Σ (‖Ḡ_A‖² + ‖Ḡ_B‖²)`` over ALL pairs (skipped
      factors count 0); if ``g_norm > clip_unmagnified_grad`` every ``Ḡ`` is scaled by
      ``clip/g_norm``. ``state.grad_norm = g_norm``.
    * ``ε`` outside the square root, no eigenvalue clamp (an eigenvalue rounding below
      ``-ρ`` makes ``S̄`` non-finite); non-finite entries of ``S̄`` are set to 0.
    * Escaped mass (off by default; paper eq. (15) in the port's EMA form):
      ``ρ ← β̂₂(ρ + d)``, ``d = min(max(maxᵢ(λᵢ(V̄) − λᵢ(PV̄Pᵀ)), 0), max(tr V̄ −
      tr PV̄Pᵀ, 0))`` with both spectra ascending.

    With both safeguards off (``clip_unmagnified_grad=0``, ``skip_threshold=0``) and in
    exact arithmetic, equivalent pairs ``(A T, T⁻¹B)`` produce the same sequence of
    ``A B`` (the safeguards depend on ``Ḡ = s·G Q`` only through basis-free norms, so
    they keep the invariance too; they make it non-smooth).

    Two computational routes give the same updates (``basis``):

    * ``"gram"`` (default): never forms ``Q``. ``R`` is the Cholesky factor of the r×r
      Gram matrix ``XᵀX = RᵀR`` (the QR ``R`` with a non-negative diagonal), inverted
      as a triangular matrix (substitution up to 16×16, recursive 2×2 blocking above);
      when a factor is numerically rank deficient (a Cholesky pivot
      ``≤ r·ε·tr XᵀX``, e.g. ``B = 0``), ``R⁺`` is instead the pseudo-inverse of the
      polar factor ``(XᵀX)^½`` from an eigendecomposition (eigenvalues below
      ``r·ε·λ_max`` count as zero). ``P = R_new⁺ᵀ (X_newᵀ X_prev) R_prev⁺``, so the
      state stores the previous factor and its r×r ``R⁺``. All factor-sized work is
      contractions with r×r matrices.
    * ``"qr"``: Householder QR of each factor (``jnp.linalg.qr``), ``R⁺`` by
      ``jnp.linalg.pinv``, ``P = Qᵀ Q_prev``; the state stores ``Q``. Slow on CPU and
      accelerators; kept as the literal form of the algorithm. Known issue: with
      jaxlib 0.10.2 on a 2-core CPU, the batched QR of a large tree (72 pairs of the
      Gemma-2B LoRA tree) deadlocked inside jaxlib's parallel batch loop (both pool
      threads waiting on sub-tasks queued behind them); use ``"gram"`` there.

    The two routes express the moments in different (equally valid) orthonormal bases,
    so their states differ by an r×r rotation while their updates agree; with
    rank-deficient factors they also agree except where the QR route's arbitrary
    basis of the null space enters ``P`` (never at a standard B = 0 start).

    Leaves outside any pair get Adam's direction (``optax.scale_by_adam`` with the
    same ``b1``, ``b2``, ``eps``).

    Args:
      b1: first-moment decay β₁.
      b2: second-moment decay β₂.
      eps: ε added outside the square root of the eigenvalues (port: 1e-6).
      clip_unmagnified_grad: joint clip threshold for the unmagnified gradients of all
        pairs; 0 turns clipping off.
      skip_threshold: per-factor RMS threshold of the skip test; 0 turns it off.
      escape_mass: add the escaped mass ``ρ`` of paper eq. (15).
      basis: ``"gram"`` or ``"qr"`` (see above).
      stack_pairs: group pairs with identical shapes, dtypes and shardings
        (:func:`lora_optax._src.linalg.group_pairs`) and keep their state stacked:
        one batched computation per layer shape (default). ``False``: one group per
        pair (more, smaller kernels: slower to compile and, on CPU, to run; see
        ``benchmarks/results``). The r×r work is batched over all pairs of one rank
        either way. Stacking copies the factors and gradients of a group once per
        step (models whose layers are already stacked along a batch axis form one
        group without copies).
      mu_dtype: dtype of the factor-sized first moments and of Adam's first moment
        (default: the parameter dtype).
      pairs: how to find the LoRA pairs: ``None`` for automatic discovery
        (:func:`lora_optax.find_lora_pairs`), a sequence of
        :class:`lora_optax.LoRAPair`, a callable ``params -> pairs`` or a label tree.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params`` and
      whose state is a :class:`ScaleByLoRARiteState` (per-factor view:
      :func:`lora_rite_factor_state`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = optax.chain(lora_optax.scale_by_lora_rite(), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> float(jnp.abs(updates["lora_a"]).max())  # B = 0: A does not move
      0.0

    References:
      Yen, Si, Wei, Chen, Wang, Zhang, Hsieh, Wang, Kumar, *LoRA Done RITE: Robust
      Invariant Transformation Equilibration for LoRA Optimization*, ICLR 2025,
      Alg. 1. https://arxiv.org/abs/2410.20625
    """
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(clip_unmagnified_grad, "clip_unmagnified_grad")
    base.check_non_negative(skip_threshold, "skip_threshold")
    if basis not in _BASES:
        raise ValueError(f"basis must be one of {_BASES}, got {basis!r}.")
    if not isinstance(escape_mass, bool):
        raise TypeError(f"escape_mass must be a bool, got {escape_mass!r}.")
    what = "scale_by_lora_rite"

    def init_fn(params):
        resolved = resolve_pairs(pairs, params, what=what)
        index = LeafIndex(params)
        factors = {p.a_path for p in resolved} | {p.b_path for p in resolved}
        masked = optax.MaskedNode()
        zeros = LeafIndex(index.map(lambda path, x: linalg.zeros_like_param(x)))
        mu_zeros = LeafIndex(index.map(lambda path, x: linalg.zeros_like_param(x, mu_dtype)))
        groups = []
        for group in lora_rite_groups(resolved, index, stack_pairs=stack_pairs):
            ct = linalg.compute_dtype(
                jnp.result_type(index[group[0].a_path], index[group[0].b_path])
            )
            prev_a = _stack(group, zeros, "a")[0]
            n, r = prev_a.shape[0], group[0].rank

            def rr(shape, ct=ct, prev_a=prev_a):  # a fresh buffer per field (donation)
                return linalg.replicated_zeros(shape, ct, like=prev_a, batch_ndim=0)

            groups.append(
                LoRARiteGroupState(
                    mu_a=_stack(group, mu_zeros, "a")[0],
                    mu_b=_stack(group, mu_zeros, "b")[0],
                    prev_a=prev_a,
                    prev_b=_stack(group, zeros, "b")[0],
                    v=rr((2 * n, r, r)),
                    rinv=rr((2 * n, r, r)) if basis == "gram" else masked,
                    rho=rr((2 * n,)),
                )
            )
        norm_dtype = jnp.float32
        if groups:
            norm_dtype = jnp.result_type(*[g.v.dtype for g in groups])
        return ScaleByLoRARiteState(
            count=jnp.zeros([], jnp.int32),
            mu=index.map(lambda path, x: masked if path in factors else mu_zeros[path]),
            nu=index.map(lambda path, x: masked if path in factors else zeros[path]),
            groups=tuple(groups),
            n_skipped=jnp.zeros([], jnp.int32),
            grad_norm=jnp.full([], jnp.nan, norm_dtype),
        )

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p_index = pair_params(resolved, params, what, updates=updates)
        g_index = LeafIndex(updates)
        count = state.count
        groups = lora_rite_groups(resolved, p_index, stack_pairs=stack_pairs)
        if len(groups) != len(state.groups):
            raise ValueError(
                f"{what}: the state holds {len(state.groups)} pair groups but the tree "
                f"has {len(groups)}; was the state initialised for another tree or "
                "another stack_pairs setting?"
            )

        # ---- 1. factor-sized pass: stacked views and r×r statistics ---------------
        work = []
        for group, gs in zip(groups, state.groups):
            a, unstack = _stack(group, p_index, "a")
            b = _stack(group, p_index, "b")[0]
            ga = _stack(group, g_index, "a")[0]
            gb = _stack(group, g_index, "b")[0]
            ct = linalg.compute_dtype(jnp.result_type(a, b))
            w = {"group": group, "gs": gs, "a": a, "b": b, "ga": ga, "gb": gb}
            w["unstack"], w["ct"] = unstack, jnp.dtype(ct)
            w["g2"] = (linalg.gram_cols(ga), linalg.gram_rows(gb))
            if basis == "gram":
                w["k"] = (linalg.gram_cols(a), linalg.gram_rows(b))
                w["c"] = (
                    linalg.cross_gram_cols(a, gs.prev_a),
                    linalg.cross_gram_rows(b, gs.prev_b),
                )
            else:
                q_a, r_a = jnp.linalg.qr(linalg.replicate(a).astype(ct))
                q_b, r_b = jnp.linalg.qr(linalg.replicate(_mt(b)).astype(ct))
                w["q"] = (q_a, _mt(q_b))
                w["r"] = (r_a, r_b)
                w["c"] = (
                    linalg.cross_gram_cols(q_a, gs.prev_a),
                    linalg.cross_gram_rows(_mt(q_b), gs.prev_b),
                )
            work.append(w)

        # ---- 2. r×r pass, batched over all groups of one (rank, dtype) -------------
        # Layout of a batch: per group, its N A-factors then its N B-factors.
        batches: dict[Any, list[dict]] = {}
        for w in work:
            batches.setdefault((w["group"][0].rank, w["ct"]), []).append(w)

        def cat(xs: list[jax.Array]) -> jax.Array:
            xs = [linalg.replicate(x) for x in xs]
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)

        rr = {}
        total_sq = []
        for key, members in batches.items():
            rank, ct = key
            sizes = [w["a"].shape[0] for w in members]
            # Index of the other factor of the same pair, for every row of the batch.
            other, rows, off = [], [], 0
            for w, n in zip(members, sizes):
                other += list(range(off + n, off + 2 * n)) + list(range(off, off + n))
                rows += [w["a"].shape[-2]] * n + [w["b"].shape[-1]] * n
                off += 2 * n
            other_idx = jnp.asarray(other, jnp.int32)
            rows_arr = jnp.asarray(rows, ct)

            def both(name: str, members=members, ct=ct) -> jax.Array:
                return cat([x for w in members for x in w[name]]).astype(ct)

            def gather(x: jax.Array, other_idx=other_idx) -> jax.Array:
                return jnp.take(x, other_idx, axis=0)

            if basis == "gram":
                rinv = linalg.gram_factor_pinv(both("k"))
                rprev = cat([w["gs"].rinv for w in members]).astype(ct)
                # Each factor's own basis change Q_newᵀ Q_prev = R⁺ᵀ (X_newᵀ X_prev) R_prev⁺.
                p_own = _mt(rinv) @ both("c") @ rprev
            else:
                rinv = jnp.linalg.pinv(both("r"))
                p_own = both("c")
            rinv_o = gather(rinv)  # R⁺ of the OTHER factor of the pair
            p = gather(p_own)  # basis change of this factor's moments
            gg = _mt(rinv_o) @ both("g2") @ rinv_o  # Ḡᵀ Ḡ
            sq = jnp.trace(gg, axis1=-2, axis2=-1)
            rms = jnp.sqrt(sq / (rows_arr * rank))
            thr = jnp.asarray(skip_threshold, ct)
            skip = ~jnp.isfinite(sq) | ((thr > 0) & (rms > thr))
            total_sq.append(jnp.sum(jnp.where(skip, 0.0, sq)).astype(state.grad_norm.dtype))
            rr[key] = dict(
                sizes=sizes, rinv=rinv, rinv_o=rinv_o, p=p, gg=gg, skip=skip, rows=rows_arr
            )

        if total_sq:
            g_norm = jnp.sqrt(sum(total_sq[1:], total_sq[0]))
        else:
            g_norm = jnp.zeros([], state.grad_norm.dtype)
        clip = jnp.asarray(clip_unmagnified_grad, g_norm.dtype)
        do_clip = (clip > 0) & (g_norm > clip)
        clip_factor = jnp.where(do_clip, clip / jnp.where(do_clip, g_norm, 1.0), 1.0)

        n_skipped = state.n_skipped
        for key, members in batches.items():
            rank, ct = key
            g = rr[key]
            b1h = _adafactor_decay(b1, count, ct)
            b2h = _adafactor_decay(b2, count, ct)
            skip = g["skip"]
            scale = jnp.where(skip, 0.0, clip_factor.astype(ct))
            v_old = cat([w["gs"].v for w in members]).astype(ct)
            p = g["p"]
            v_rot = linalg.zero_nonfinite(linalg.symmetrize(p @ v_old @ _mt(p)))
            rho_old = cat([w["gs"].rho for w in members]).astype(ct)
            if escape_mass:
                eig_old = jnp.linalg.eigvalsh(linalg.symmetrize(v_old))
                eig_new = jnp.linalg.eigvalsh(v_rot)
                eig_diff = jnp.maximum(jnp.max(eig_old - eig_new, axis=-1), 0.0)
                tr_old = jnp.trace(v_old, axis1=-2, axis2=-1)
                tr_diff = jnp.maximum(tr_old - jnp.trace(v_rot, axis1=-2, axis2=-1), 0.0)
                rho = b2h * (rho_old + jnp.minimum(eig_diff, tr_diff))
            else:
                rho = jnp.zeros_like(rho_old)
            fresh = jnp.where(
                skip[:, None, None],
                0.0,
                (scale**2 / g["rows"])[:, None, None] * g["gg"],
            )
            v_new = linalg.symmetrize(b2h * v_rot + (1.0 - b2h) * linalg.symmetrize(fresh))
            cinv = linalg.inv_root_eps_outside(v_new, eps, rho[:, None])
            # g W₂ = (1-β̂₁)·c·S̄; a skipped factor has W₂ = 0. Non-finite S̄ entries → 0.
            w2 = linalg.zero_nonfinite(((1.0 - b1h) * scale)[:, None, None] * (g["rinv_o"] @ cinv))
            n_skipped = n_skipped + jnp.sum(skip).astype(jnp.int32)
            # One array per group and quantity: split the batch back to groups.
            off = 0
            for w, n in zip(members, g["sizes"]):
                sl = slice(off, off + 2 * n)
                w["v_new"], w["rho_new"] = v_new[sl], rho[sl]
                w["rinv_new"] = g["rinv"][sl]
                for name, x in (("w1", b1h * _mt(p)), ("w2", w2), ("w3", _mt(g["rinv_o"]))):
                    w[name] = (x[off : off + n], x[off + n : off + 2 * n])
                off += 2 * n

        # ---- 3. factor-sized pass: moments and directions -------------------------
        new_updates, new_groups = {}, []
        for w in work:
            gs, ct, group = w["gs"], w["ct"], w["group"]
            a, b = w["a"], w["b"]
            w1a, w2a, w3a = (linalg.reshard_batch_like(w[k][0], a, 1) for k in ("w1", "w2", "w3"))
            w1b, w2b, w3b = (linalg.reshard_batch_like(w[k][1], b, 1) for k in ("w1", "w2", "w3"))
            # A (N, m, r):  M̄ ← M̄ W₁ + g W₂;  direction = M̄ W₃.
            mu_a = gs.mu_a.astype(ct) @ w1a + linalg.zero_nonfinite(w["ga"].astype(ct) @ w2a)
            dir_a = mu_a @ w3a
            # B in its own layout (N, r, n): the transposes of the rank-last formulas.
            mu_b = _mt(w1b) @ gs.mu_b.astype(ct) + linalg.zero_nonfinite(
                _mt(w2b) @ w["gb"].astype(ct)
            )
            dir_b = _mt(w3b) @ mu_b
            for role, d in (("a", dir_a), ("b", dir_b)):
                for pair, part in zip(group, w["unstack"](d)):
                    path = pair.a_path if role == "a" else pair.b_path
                    grad = g_index[path]
                    new_updates[path] = linalg.from_matrix(part, grad.shape, pair).astype(
                        grad.dtype
                    )
            if basis == "gram":
                prev_a, prev_b = w["a"], w["b"]
            else:
                prev_a, prev_b = w["q"]
            new_groups.append(
                LoRARiteGroupState(
                    mu_a=mu_a.astype(gs.mu_a.dtype),
                    mu_b=mu_b.astype(gs.mu_b.dtype),
                    prev_a=linalg.reshard_like(prev_a.astype(gs.prev_a.dtype), gs.prev_a),
                    prev_b=linalg.reshard_like(prev_b.astype(gs.prev_b.dtype), gs.prev_b),
                    v=linalg.reshard_like(w["v_new"].astype(gs.v.dtype), gs.v),
                    rinv=(
                        linalg.reshard_like(w["rinv_new"].astype(gs.rinv.dtype), gs.rinv)
                        if basis == "gram"
                        else gs.rinv
                    ),
                    rho=linalg.reshard_like(w["rho_new"].astype(gs.rho.dtype), gs.rho),
                )
            )

        # ---- leaves outside any pair: Adam ----------------------------------------
        mu_index, nu_index = LeafIndex(state.mu), LeafIndex(state.nu)
        new_mu, new_nu = {}, {}
        count_inc = optax.safe_int32_increment(count)
        for path, g in g_index.items():
            if path in new_updates or not hasattr(g, "shape"):
                continue
            m = optax.tree.update_moment(g, mu_index[path], b1, 1)
            v = optax.tree.update_moment_per_elem_norm(g, nu_index[path], b2, 2)
            m_hat = optax.tree.bias_correction(m, b1, count_inc)
            v_hat = optax.tree.bias_correction(v, b2, count_inc)
            new_updates[path] = (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)
            new_mu[path] = m.astype(mu_index[path].dtype)
            new_nu[path] = v.astype(nu_index[path].dtype)

        new_state = ScaleByLoRARiteState(
            count=count_inc,
            mu=mu_index.replace(new_mu),
            nu=nu_index.replace(new_nu),
            groups=tuple(new_groups),
            n_skipped=n_skipped,
            grad_norm=g_norm.astype(state.grad_norm.dtype),
        )
        return g_index.replace(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_rite(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    clip_unmagnified_grad: float = 1.0,
    skip_threshold: float = 1.0,
    escape_mass: bool = False,
    basis: str = "gram",
    stack_pairs: bool = True,
    mu_dtype: Any = None,
    mask: Any = None,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-RITE: :func:`scale_by_lora_rite`, decoupled weight decay, learning rate.

    .. math::

      \Delta A = -\eta\,(\bar M_A R_B^{+\top} + \lambda A), \qquad
      \Delta B^\top = -\eta\,(\bar M_B R_A^{+\top} + \lambda B^\top)

    (weight decay multiplied by the learning rate, as in the reference port). Leaves
    outside any pair get AdamW with the same ``b1``, ``b2``, ``eps`` and
    ``weight_decay``. The defaults are those of the first author's PyTorch port of
    the original JAX code (β = (0.9, 0.999), ε = 1e-6, joint clipping of the
    unmagnified gradients at 1.0, RMS skip test at 1.0, no escaped mass, no weight
    decay); see :func:`scale_by_lora_rite` for the algorithm and every option.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: see :func:`scale_by_lora_rite`.
      weight_decay: decoupled weight decay λ.
      clip_unmagnified_grad: joint clip threshold (0: off).
      skip_threshold: per-factor RMS skip threshold (0: off).
      escape_mass: add the escaped mass of paper eq. (15).
      basis: ``"gram"`` (default, no QR) or ``"qr"``.
      stack_pairs: group same-shape pairs (see :func:`scale_by_lora_rite`).
      mu_dtype: dtype of the first moments.
      mask: weight-decay mask, as in :func:`optax.adamw`.
      pairs: pair spec, see :func:`scale_by_lora_rite`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_optax
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 8))}
      >>> tx = lora_optax.lora_rite(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Yen et al., *LoRA Done RITE: Robust Invariant Transformation Equilibration for
      LoRA Optimization*, ICLR 2025. https://arxiv.org/abs/2410.20625
    """
    base.check_learning_rate(learning_rate)
    base.check_non_negative(weight_decay, "weight_decay")
    return optax.chain(
        scale_by_lora_rite(
            b1,
            b2,
            eps,
            clip_unmagnified_grad=clip_unmagnified_grad,
            skip_threshold=skip_threshold,
            escape_mass=escape_mass,
            basis=basis,
            stack_pairs=stack_pairs,
            mu_dtype=mu_dtype,
            pairs=pairs,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
