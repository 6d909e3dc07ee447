"""LoRA-RITE (Yen et al., ICLR 2025): transformation-invariant adaptive matrix preconditioning.

Notation of SPEC §1/§2.2: ``A`` is ``m × r``, ``B`` is ``r × n``; the algorithm is written
for ``A`` and applied to ``B`` through its rank-last view ``Bᵀ`` (``n × r``). Every
quantity below is per pair and per stacked layer.

Implementation outline (one ``update``):

1. Factor-sized pass (per pair, or per group of same-shape pairs when
   ``stack_pairs=True``): the r×r Gram matrices ``XᵀX`` of both factors, ``gᵀg`` of
   both gradients and ``X_newᵀ X_prev`` (Gram route), or the QR factors (QR route).
2. r×r pass, batched over ALL factors of the same rank at once: pseudo-inverse of
   ``R``, basis change ``P``, unmagnified-gradient statistics (``‖Ḡ‖``, skip test,
   joint clipping), second moment, escaped mass, inverse root. Everything is reduced
   to three r×r multipliers per factor: ``W₁ = β̂₁Pᵀ``, ``W₂ = (1-β̂₁)·c·R_o⁺(V̄+ρI)^-½``
   and ``W₃ = R_o⁺ᵀ`` (``o`` the other factor, ``c`` the clip/skip factor).
3. Factor-sized pass: ``M̄ ← M̄ W₁ + g W₂`` and the direction ``M̄ W₃``.

So the factor-sized work is a handful of ``(m×r)·(r×r)`` products per factor, and the
many small r×r eigendecompositions of a model run as one batched call.
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


class ScaleByLoRARiteState(NamedTuple):
    """State of :func:`scale_by_lora_rite`.

    The trees ``mu``, ``nu``, ``prev``, ``prev_rinv`` and ``rho`` mirror the params
    tree (so their shardings follow the params'); at leaves outside any pair the last
    three hold ``optax.MaskedNode()``.

    Attributes:
      count: number of steps taken (int32); the 0-based step ``k`` of β̂.
      mu: at each factor, its unmagnified first moment ``M̄`` in the factor's own layout
        (A-shaped for ``A``, B-shaped for ``B``), expressed in the basis of the other
        factor at the last step; at other leaves Adam's first moment.
      nu: at each factor, the r×r unmagnified second moment ``V̄`` (``(*batch, r, r)``,
        float32+); at other leaves Adam's second moment.
      prev: at each factor, what the next step's basis change needs: the factor itself
        at the last step (``basis="gram"``) or the ``Q`` of its QR decomposition in
        the factor's layout (``basis="qr"``); zeros before the first step.
      prev_rinv: ``basis="gram"`` only: the r×r pseudo-inverse ``R⁺`` of the factor at
        the last step (``(*batch, r, r)``); ``MaskedNode`` for ``basis="qr"``.
      rho: escaped mass ``ρ`` per factor (``(*batch,)``; zeros unless ``escape_mass``).
      n_skipped: cumulative number of factor updates dropped by the skip test (one
        count per factor and stacked layer), int32.
      grad_norm: global norm of the unmagnified gradients at the last step, after the
        skip test and before clipping (NaN before the first step).
    """

    count: jax.Array
    mu: Any
    nu: Any
    prev: Any
    prev_rinv: Any
    rho: Any
    n_skipped: jax.Array
    grad_norm: jax.Array


def _adafactor_decay(beta: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``β(1-βᵏ)/(1-βᵏ⁺¹)`` with ``k = count`` (0-based); 0 at the first step."""
    beta = jnp.asarray(beta, dtype)
    k = count.astype(dtype)
    return beta * (1.0 - beta**k) / (1.0 - beta ** (k + 1.0))


def _mt(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _pair_ct(pair: LoRAPair, index: LeafIndex) -> Any:
    return linalg.compute_dtype(jnp.result_type(index[pair.a_path], index[pair.b_path]))


class _Unit:
    """One pair, or a group of same-shape pairs stacked along a leading axis.

    All factor views are ``(N, m, r)`` / ``(N, r, n)``, ``N`` the number of pairs times
    their stacked layers; r×r statistics are ``(N, r, r)``.
    """

    def __init__(self, pairs: tuple[LoRAPair, ...]):
        self.pairs = pairs
        self.rank = pairs[0].rank

    def stack(self, index: LeafIndex, role: str) -> jax.Array:
        if role == "a":
            xs = [linalg.a_matrix(p, index[p.a_path]) for p in self.pairs]
        else:
            xs = [linalg.b_matrix(p, index[p.b_path]) for p in self.pairs]
        out, self._unstack = linalg.stack_leading(xs, 2)
        return out

    def stack_rr(self, index: LeafIndex, role: str, core_ndim: int) -> jax.Array:
        xs = [index[p.a_path if role == "a" else p.b_path] for p in self.pairs]
        return linalg.stack_leading([linalg.replicate(x) for x in xs], core_ndim)[0]

    def unstack(self, y: jax.Array) -> list[jax.Array]:
        return self._unstack(y)

    def unstack_rr(self, y: jax.Array, index: LeafIndex, role: str, core_ndim: int) -> dict:
        refs = [index[p.a_path if role == "a" else p.b_path] for p in self.pairs]
        _, unstack = linalg.stack_leading(refs, core_ndim)
        out = {}
        for p, ref, part in zip(self.pairs, refs, unstack(y)):
            out[p.a_path if role == "a" else p.b_path] = linalg.reshard_like(
                part.astype(ref.dtype), ref
            )
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
    stack_pairs: bool = False,
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

    * ``"gram"`` (default): never forms ``Q``. ``R⁺`` is the pseudo-inverse of the polar
      factor ``R = (XᵀX)^½`` from an eigendecomposition of the r×r Gram matrix
      (eigenvalues below ``r·ε·λ_max`` count as zero), and
      ``P = R_new⁺ᵀ (X_newᵀ X_prev) R_prev⁺``, so the state stores the previous
      factor and its r×r ``R⁺``. All factor-sized work is ``(m×r)(r×r)`` products.
    * ``"qr"``: Householder QR of each factor (``jnp.linalg.qr``), ``R⁺`` by
      ``jnp.linalg.pinv``, ``P = Qᵀ Q_prev``; the state stores ``Q``. Slow on CPU and
      accelerators; kept as the literal form of the algorithm.

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
      stack_pairs: also stack the factor-sized work of pairs with identical shapes
        (:func:`lora_optax._src.linalg.group_pairs`), one batched computation per
        layer shape. The r×r work is always batched over all pairs of one rank.
        Stacking copies the factors into the stacked arrays; on CPU it makes the
        compiled update smaller but not faster (see ``benchmarks/``).
      mu_dtype: dtype of the factor-sized first moments and of Adam's first moment
        (default: the parameter dtype).
      pairs: how to find the LoRA pairs: ``None`` for automatic discovery
        (:func:`lora_optax.find_lora_pairs`), a sequence of
        :class:`lora_optax.LoRAPair`, a callable ``params -> pairs`` or a label tree.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params`` and
      whose state is a :class:`ScaleByLoRARiteState`.

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
        roles = {}
        for pair in resolved:
            roles[pair.a_path] = pair
            roles[pair.b_path] = pair
        masked = optax.MaskedNode()

        def mu(path, x):
            return linalg.zeros_like_param(x, mu_dtype)

        def nu(path, x):
            if path not in roles:
                return linalg.zeros_like_param(x)
            pair = roles[path]
            k, r = pair.batch_ndim, pair.rank
            return linalg.replicated_zeros(
                tuple(x.shape[:k]) + (r, r), _pair_ct(pair, index), like=x, batch_ndim=k
            )

        def prev(path, x):
            return linalg.zeros_like_param(x) if path in roles else masked

        def prev_rinv(path, x):
            return nu(path, x) if path in roles and basis == "gram" else masked

        def rho(path, x):
            if path not in roles:
                return masked
            pair = roles[path]
            k = pair.batch_ndim
            return linalg.replicated_zeros(
                tuple(x.shape[:k]), _pair_ct(pair, index), like=x, batch_ndim=k
            )

        norm_dtype = jnp.float32
        if resolved:
            norm_dtype = jnp.result_type(*[_pair_ct(p, index) for p in resolved])
        return ScaleByLoRARiteState(
            count=jnp.zeros([], jnp.int32),
            mu=index.map(mu),
            nu=index.map(nu),
            prev=index.map(prev),
            prev_rinv=index.map(prev_rinv),
            rho=index.map(rho),
            n_skipped=jnp.zeros([], jnp.int32),
            grad_norm=jnp.full([], jnp.nan, norm_dtype),
        )

    def update_fn(updates, state, params=None):
        resolved = resolve_pairs(pairs, updates, what=what)
        p_index = pair_params(resolved, params, what)
        g_index = LeafIndex(updates)
        mu_index, nu_index = LeafIndex(state.mu), LeafIndex(state.nu)
        prev_index, rinv_index = LeafIndex(state.prev), LeafIndex(state.prev_rinv)
        rho_index = LeafIndex(state.rho)
        count = state.count

        groups = linalg.group_pairs(resolved, p_index) if stack_pairs else [(p,) for p in resolved]
        units = [_Unit(g) for g in groups]

        # ---- 1. factor-sized pass: r×r statistics of every unit -------------------
        stats = []
        for u in units:
            a, b = u.stack(p_index, "a"), u.stack(p_index, "b")
            ga, gb = u.stack(g_index, "a"), u.stack(g_index, "b")
            prev_a, prev_b = u.stack(prev_index, "a"), u.stack(prev_index, "b")
            st = {
                "a": a,
                "b": b,
                "ga": ga,
                "gb": gb,
                "g2_a": linalg.replicate(linalg.gram_cols(ga)),
                "g2_b": linalg.replicate(linalg.gram_rows(gb)),
                "v_a": u.stack_rr(nu_index, "a", 2),
                "v_b": u.stack_rr(nu_index, "b", 2),
                "rho_a": u.stack_rr(rho_index, "a", 0),
                "rho_b": u.stack_rr(rho_index, "b", 0),
            }
            if basis == "gram":
                st["k_a"] = linalg.replicate(linalg.gram_cols(a))
                st["k_b"] = linalg.replicate(linalg.gram_rows(b))
                st["c_a"] = linalg.replicate(linalg.cross_gram_cols(a, prev_a))
                st["c_b"] = linalg.replicate(linalg.cross_gram_rows(b, prev_b))
                st["rprev_a"] = u.stack_rr(rinv_index, "a", 2)
                st["rprev_b"] = u.stack_rr(rinv_index, "b", 2)
            else:
                ct = linalg.compute_dtype(jnp.result_type(a, b))
                q_a, r_a = jnp.linalg.qr(linalg.replicate(a).astype(ct))
                q_b, r_b = jnp.linalg.qr(linalg.replicate(_mt(b)).astype(ct))
                q_bt = _mt(q_b)
                st["q_a"], st["q_bt"] = q_a, q_bt
                st["r_a"], st["r_b"] = r_a, r_b
                st["c_a"] = linalg.replicate(linalg.cross_gram_cols(q_a, prev_a))
                st["c_b"] = linalg.replicate(linalg.cross_gram_rows(q_bt, prev_b))
            stats.append(st)

        # ---- 2. r×r pass, batched over all units of one (rank, dtype) ---------------
        by_rank: dict[Any, list[int]] = {}
        for i, u in enumerate(units):
            ct = linalg.compute_dtype(jnp.result_type(stats[i]["a"], stats[i]["b"]))
            by_rank.setdefault((u.rank, jnp.dtype(ct)), []).append(i)

        def cat(key: str, members: list[int]) -> jax.Array:
            xs = [stats[i][key] for i in members]
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)

        def both(key: str, members: list[int]) -> jax.Array:
            """A-side entries of all members, then B-side entries (F = 2N factors)."""
            return jnp.concatenate([cat(key + "_a", members), cat(key + "_b", members)], 0)

        def swap(x: jax.Array) -> jax.Array:
            n = x.shape[0] // 2
            return jnp.concatenate([x[n:], x[:n]], axis=0)

        rr = {}
        total_sq = []
        for (rank, ct), members in by_rank.items():
            g = {}
            rows = []
            for side in ("a", "b"):
                for i in members:
                    st = stats[i]
                    n_i = st["a"].shape[0]
                    dim = st["a"].shape[-2] if side == "a" else st["b"].shape[-1]
                    rows.append(jnp.full((n_i,), dim, ct))
            g["rows"] = jnp.concatenate(rows)
            if basis == "gram":
                rinv = linalg.pinv_sqrt_psd(both("k", members).astype(ct))
                rprev = both("rprev", members).astype(ct)
                # Basis change of each factor's own Q: Q_newᵀ Q_prev = R⁺ᵀ (X_newᵀX_prev) R_prev⁺
                p_own = _mt(rinv) @ both("c", members).astype(ct) @ rprev
            else:
                rinv = jnp.linalg.pinv(both("r", members).astype(ct))
                p_own = both("c", members).astype(ct)
            rinv_o = swap(rinv)  # R⁺ of the OTHER factor of the pair
            gg = _mt(rinv_o) @ both("g2", members).astype(ct) @ rinv_o  # Ḡᵀ Ḡ
            sq = jnp.trace(gg, axis1=-2, axis2=-1)
            rms = jnp.sqrt(sq / (g["rows"] * rank))
            skip = ~jnp.isfinite(sq)
            thr = jnp.asarray(skip_threshold, ct)
            skip = skip | ((thr > 0) & (rms > thr))
            g.update(rinv=rinv, rinv_o=rinv_o, p=swap(p_own), gg=gg, skip=skip)
            total_sq.append(jnp.sum(jnp.where(skip, 0.0, sq)).astype(state.grad_norm.dtype))
            rr[(rank, ct)] = g

        if total_sq:
            g_norm = jnp.sqrt(sum(total_sq[1:], total_sq[0]))
        else:
            g_norm = jnp.zeros([], state.grad_norm.dtype)
        clip = jnp.asarray(clip_unmagnified_grad, g_norm.dtype)
        do_clip = (clip > 0) & (g_norm > clip)
        clip_factor = jnp.where(do_clip, clip / jnp.where(do_clip, g_norm, 1.0), 1.0)

        n_skipped = state.n_skipped
        for (rank, ct), members in by_rank.items():
            g = rr[(rank, ct)]
            b1h = _adafactor_decay(b1, count, ct)
            b2h = _adafactor_decay(b2, count, ct)
            keep = ~g["skip"]
            scale = jnp.where(keep, clip_factor.astype(ct), 0.0)
            v_old = both("v", members).astype(ct)
            p = g["p"]
            v_rot = linalg.zero_nonfinite(linalg.symmetrize(p @ v_old @ _mt(p)))
            rho_old = both("rho", members).astype(ct)
            if escape_mass:
                eig_old = jnp.linalg.eigvalsh(linalg.symmetrize(v_old))
                eig_new = jnp.linalg.eigvalsh(v_rot)
                eig_diff = jnp.maximum(jnp.max(eig_old - eig_new, axis=-1), 0.0)
                tr_diff = jnp.maximum(
                    jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(v_rot, axis1=-2, axis2=-1),
                    0.0,
                )
                rho = b2h * (rho_old + jnp.minimum(eig_diff, tr_diff))
            else:
                rho = jnp.zeros_like(rho_old)
            fresh = jnp.where(
                keep[:, None, None],
                (scale**2)[:, None, None] * g["gg"] / g["rows"][:, None, None],
                0.0,
            )
            v_new = linalg.symmetrize(b2h * v_rot + (1.0 - b2h) * linalg.symmetrize(fresh))
            cinv = linalg.inv_root_eps_outside(v_new, eps, rho[:, None])
            w2 = linalg.zero_nonfinite(((1.0 - b1h) * scale)[:, None, None] * (g["rinv_o"] @ cinv))
            g.update(w1=b1h * _mt(p), w2=w2, w3=_mt(g["rinv_o"]), v=v_new, rho=rho, keep=keep)
            n_skipped = n_skipped + jnp.sum(g["skip"]).astype(jnp.int32)

        # Split the r×r results back to units.
        for (rank, ct), members in by_rank.items():
            g = rr[(rank, ct)]
            sizes = [stats[i]["a"].shape[0] for i in members]
            offsets = []
            o = 0
            for side in ("a", "b"):
                for i, s in zip(members, sizes):
                    offsets.append((i, side, o, o + s))
                    o += s
            for key in ("w1", "w2", "w3", "v", "rho", "rinv", "keep"):
                arr = g[key]
                for i, side, lo, hi in offsets:
                    stats[i][f"{key}_out_{side}"] = arr[lo:hi]

        # ---- 3. factor-sized pass: moments and directions -------------------------
        new_updates, new_mu, new_nu, new_prev, new_rinv, new_rho = {}, {}, {}, {}, {}, {}
        for u, st in zip(units, stats):
            ct = linalg.compute_dtype(jnp.result_type(st["a"], st["b"]))
            for side in ("a", "b"):
                w1, w2, w3 = (st[f"{k}_out_{side}"] for k in ("w1", "w2", "w3"))
                keep = st[f"keep_out_{side}"][:, None, None]
                g_x = st["g" + side]
                x = st[side]
                m_old = u.stack(mu_index, side)
                w1 = linalg.reshard_rr(w1, x, 1)
                w2 = linalg.reshard_rr(w2, x, 1)
                w3 = linalg.reshard_rr(w3, x, 1)
                if side == "a":
                    fresh = jnp.where(keep, g_x.astype(ct) @ w2, 0.0)
                    m_new = m_old.astype(ct) @ w1 + fresh
                    direction = m_new @ w3
                else:
                    fresh = jnp.where(keep, _mt(w2) @ g_x.astype(ct), 0.0)
                    m_new = _mt(w1) @ m_old.astype(ct) + fresh
                    direction = _mt(w3) @ m_new
                if basis == "gram":
                    prev_new = x
                else:
                    prev_new = st["q_a"] if side == "a" else st["q_bt"]
                for pair, d, m, pv in zip(
                    u.pairs, u.unstack(direction), u.unstack(m_new), u.unstack(prev_new)
                ):
                    path = pair.a_path if side == "a" else pair.b_path
                    grad = g_index[path]
                    new_updates[path] = linalg.from_matrix(d, grad.shape, pair).astype(grad.dtype)
                    ref = mu_index[path]
                    new_mu[path] = linalg.from_matrix(m, ref.shape, pair).astype(ref.dtype)
                    ref = prev_index[path]
                    pv = linalg.from_matrix(pv, ref.shape, pair).astype(ref.dtype)
                    new_prev[path] = linalg.reshard_like(pv, ref)
                new_nu.update(u.unstack_rr(st[f"v_out_{side}"], nu_index, side, 2))
                new_rho.update(u.unstack_rr(st[f"rho_out_{side}"], rho_index, side, 0))
                if basis == "gram":
                    new_rinv.update(u.unstack_rr(st[f"rinv_out_{side}"], rinv_index, side, 2))

        # ---- leaves outside any pair: Adam ----------------------------------------
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
            prev=prev_index.replace(new_prev),
            prev_rinv=rinv_index.replace(new_rinv),
            rho=rho_index.replace(new_rho),
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
    stack_pairs: bool = False,
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
      stack_pairs: stack the factor-sized work of same-shape pairs.
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
