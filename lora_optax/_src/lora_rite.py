"""LoRA-RITE (Yen et al., ICLR 2025): transformation-invariant adaptive matrix preconditioning.

Notation: ``A`` is read as an ``m × r`` matrix and ``B`` as an ``r × n`` matrix
(``ΔW = s·A B``); the algorithm is written for ``A`` and applied to ``B`` through its
rank-last view ``Bᵀ`` (``n × r``). Every quantity below is per pair and per stacked layer.

One ``update`` runs three named passes over typed records:

1. :func:`_factor_pass` (per group of same-shape pairs, stacked on one leading axis):
   the r×r Gram matrices ``XᵀX`` of both factors, ``gᵀg`` of both gradients and
   ``X_newᵀ X_prev`` by batched contractions (Gram route), or QR factors (QR route):
   a :class:`_GroupInputs`.
2. r×r passes, batched over ALL factors of the same rank and dtype:
   :func:`_unmagnified_pass` (pseudo-inverse of ``R``, basis change ``P``,
   unmagnified-gradient statistics ``‖Ḡ‖`` and the skip test: a :class:`_RankBatch`),
   :func:`_clip_factor` (joint clipping over all pairs), then :func:`_multiplier_pass`
   (second moment, escaped mass, inverse root) reducing everything to three r×r
   multipliers per factor, ``W₁ = β̂₁Pᵀ``, ``W₂ = (1-β̂₁)·c·R_o⁺(V̄+ρI)^-½`` and
   ``W₃ = R_o⁺ᵀ`` (``o`` the other factor, ``c`` the clip/skip factor): a
   :class:`_GroupMultipliers` per group.
3. :func:`_direction_pass` (per group): ``M̄ ← M̄ W₁ + g W₂`` and the direction ``M̄ W₃``
   (batched products), and the group's new :class:`LoRARiteGroupState`.

The pair state is kept stacked per group, so the stacked factors of this step are the
next step's ``prev`` and the moments need no per-factor slicing: an update compiles to a
few kernels per group plus one per factor (the unstacked direction), fewer than AdamW's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg, pairwise
from lora_optax._src.pairs import LeafIndex, LoRAPair, PairSpec, Path, resolve_pairs

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
    groups: tuple[LoRARiteGroupState, ...]
    n_skipped: jax.Array
    grad_norm: jax.Array


class _Hyper(NamedTuple):
    """The hyperparameters of one :func:`scale_by_lora_rite`."""

    b1: Any
    b2: Any
    eps: Any
    clip_unmagnified_grad: Any
    skip_threshold: Any
    escape_mass: bool
    basis: str


class _GroupInputs(NamedTuple):
    """Pass 1 of one group: stacked factors and gradients and their r×r statistics.

    Pairs of arrays are ``(of A, of B)``. ``factor_gram`` (``XᵀX``) is the Gram
    route's, ``q`` and ``r`` (QR factors; ``Q_B`` in ``B``'s layout) the QR route's;
    ``cross`` is ``X_newᵀ X_prev`` or ``Q_newᵀ Q_prev``.
    """

    group: pairwise.PairGroup
    state: LoRARiteGroupState
    a: jax.Array
    b: jax.Array
    g_a: jax.Array
    g_b: jax.Array
    unstack: Any
    ct: Any
    grad_gram: tuple[jax.Array, jax.Array]
    factor_gram: tuple[jax.Array, jax.Array] | None
    cross: tuple[jax.Array, jax.Array]
    q: tuple[jax.Array, jax.Array] | None
    r: tuple[jax.Array, jax.Array] | None

    @property
    def n(self) -> int:
        return self.a.shape[0]


class _RankBatch(NamedTuple):
    """Pass 2a of every factor of one (rank, dtype): rows are, per member group, its
    ``N`` ``A`` factors then its ``N`` ``B`` factors.

    ``rinv``: each factor's ``R⁺``; ``rinv_other``: ``R⁺`` of the other factor of
    its pair; ``p``: the basis change of each factor's moments; ``gg``: ``ḠᵀḠ``;
    ``skip``: the skip test; ``rows``: ``m`` (or ``n``) per factor; ``sq``: the sum of
    the kept ``‖Ḡ‖²``.
    """

    members: tuple[_GroupInputs, ...]
    rinv: jax.Array
    rinv_other: jax.Array
    p: jax.Array
    gg: jax.Array
    skip: jax.Array
    rows: jax.Array
    sq: jax.Array


class _GroupMultipliers(NamedTuple):
    """Pass 2b of one group: its new r×r state and the multipliers of pass 3.

    ``w1``, ``w2``, ``w3`` are ``(of A, of B)`` pairs of ``(N, r, r)`` arrays.
    """

    v: jax.Array
    rho: jax.Array
    rinv: jax.Array
    w1: tuple[jax.Array, jax.Array]
    w2: tuple[jax.Array, jax.Array]
    w3: tuple[jax.Array, jax.Array]


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
    """The groups of pairs whose state :func:`scale_by_lora_rite` stacks together:
    pairs whose factors agree in shape, dtype, sharding and geometry (or, with
    ``stack_pairs=False``, one group per pair), in order of first appearance."""
    return tuple(g.pairs for g in pairwise.group_pairs(pairs, tree, stack=stack_pairs))


def _find_state(state: Any) -> ScaleByLoRARiteState:
    """The :class:`ScaleByLoRARiteState` inside ``state`` (e.g. :func:`lora_rite`'s)."""
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByLoRARiteState))
        if isinstance(x, ScaleByLoRARiteState)
    ]
    if len(found) != 1:
        raise ValueError(
            "lora_rite_factor_state: expected a state holding exactly one "
            f"ScaleByLoRARiteState (of scale_by_lora_rite or lora_rite), found {len(found)}."
        )
    return found[0]


def lora_rite_factor_state(
    state: Any,
    params: Any,
    *,
    pairs: PairSpec = None,
    stack_pairs: bool = True,
) -> dict[str, dict[str, jax.Array]]:
    """The LoRA-RITE state of every factor, unstacked, keyed by the factor's path.

    Args:
      state: the state of :func:`lora_rite` or :func:`scale_by_lora_rite` (or any
        state holding one :class:`ScaleByLoRARiteState`, e.g. inside optax wrappers).
      params: the params (or a tree of the same structure and shapes).
      pairs, stack_pairs: as given to :func:`scale_by_lora_rite`.

    Returns:
      ``{"path/of/factor": {"mu": ..., "prev": ..., "v": ..., "rinv": ..., "rho":
      ...}}`` with ``mu``/``prev`` in the factor's shape, ``v``/``rinv`` of shape
      ``(*batch, r, r)`` and ``rho`` of shape ``(*batch,)`` (``rinv`` absent for
      ``basis="qr"``).
    """
    rite = _find_state(state)
    resolved = resolve_pairs(pairs, params, what="lora_rite_factor_state")
    index = LeafIndex(params)
    out: dict[str, dict[str, jax.Array]] = {}
    groups = pairwise.group_pairs(resolved, index, stack=stack_pairs)
    for group, gs in zip(groups, rite.groups):
        for role in ("a", "b"):
            _, unstack = group.stack(index, role)
            out.update(_factor_entries(group, gs, role, unstack, index))
    return out


def _factor_entries(
    group: pairwise.PairGroup, gs: LoRARiteGroupState, role: str, unstack: Any, index: LeafIndex
) -> dict[str, dict[str, jax.Array]]:
    """:func:`lora_rite_factor_state`'s entries of one group's ``A`` or ``B`` factors."""
    n = gs.mu_a.shape[0]
    sl = slice(0, n) if role == "a" else slice(n, 2 * n)
    fields = {
        "mu": unstack(gs.mu_a if role == "a" else gs.mu_b),
        "prev": unstack(gs.prev_a if role == "a" else gs.prev_b),
        "v": unstack(gs.v[sl]),
        "rho": unstack(gs.rho[sl][:, None, None]),
    }
    if not isinstance(gs.rinv, optax.MaskedNode):
        fields["rinv"] = unstack(gs.rinv[sl])
    out = {}
    for i, (pair, path) in enumerate(zip(group.pairs, group.paths(role))):
        shape = index[path].shape
        entry = {
            "mu": linalg.from_matrix(fields["mu"][i], shape, pair),
            "prev": linalg.from_matrix(fields["prev"][i], shape, pair),
            "v": fields["v"][i],
            "rho": fields["rho"][i].reshape(tuple(shape[: pair.batch_ndim])),
        }
        if "rinv" in fields:
            entry["rinv"] = fields["rinv"][i]
        out["/".join(path)] = entry
    return out


# ---------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------


def _init_group(
    group: pairwise.PairGroup,
    index: LeafIndex,
    zeros: Mapping[Path, Any],
    mu_zeros: Mapping[Path, Any],
    basis: str,
) -> LoRARiteGroupState:
    """Zeros of one group's state, sharded like its factors (r×r state: batch axes)."""
    ct = linalg.compute_dtype(jnp.result_type(index[group.pair.a_path], index[group.pair.b_path]))
    prev_a = group.stack(zeros, "a")[0]
    n, r = prev_a.shape[0], group.pair.rank

    def rr(shape):  # a fresh buffer per field (donation)
        return linalg.replicated_zeros(shape, ct, like=prev_a, batch_ndim=0)

    return LoRARiteGroupState(
        mu_a=group.stack(mu_zeros, "a")[0],
        mu_b=group.stack(mu_zeros, "b")[0],
        prev_a=prev_a,
        prev_b=group.stack(zeros, "b")[0],
        v=rr((2 * n, r, r)),
        rinv=rr((2 * n, r, r)) if basis == "gram" else optax.MaskedNode(),
        rho=rr((2 * n,)),
    )


def _init(params: Any, pairs: PairSpec, h: _Hyper, mu_dtype: Any, stack_pairs: bool, what: str):
    resolved = resolve_pairs(pairs, params, what=what)
    index = LeafIndex(params)
    factors = pairwise.factor_paths(resolved)
    zeros = {p: linalg.zeros_like_param(index[p]) for p in factors}
    mu_zeros = {p: linalg.zeros_like_param(index[p], mu_dtype) for p in factors}
    groups = tuple(
        _init_group(group, index, zeros, mu_zeros, h.basis)
        for group in pairwise.group_pairs(resolved, index, stack=stack_pairs)
    )
    norm_dtype = jnp.result_type(*[g.v.dtype for g in groups]) if groups else jnp.float32
    return ScaleByLoRARiteState(
        count=jnp.zeros([], jnp.int32),
        groups=groups,
        n_skipped=jnp.zeros([], jnp.int32),
        grad_norm=jnp.full([], jnp.nan, norm_dtype),
    )


# ---------------------------------------------------------------------------------------
# update: the passes
# ---------------------------------------------------------------------------------------


def _factor_pass(
    group: pairwise.PairGroup,
    gs: LoRARiteGroupState,
    p_index: LeafIndex,
    g_index: LeafIndex,
    basis: str,
) -> _GroupInputs:
    """Pass 1: a group's stacked factors and gradients and their r×r statistics."""
    a, unstack = group.stack(p_index, "a")
    b = group.stack(p_index, "b")[0]
    g_a = group.stack(g_index, "a")[0]
    g_b = group.stack(g_index, "b")[0]
    ct = jnp.dtype(linalg.compute_dtype(jnp.result_type(a, b)))
    grad_gram = (linalg.gram_cols(g_a), linalg.gram_rows(g_b))
    if basis == "gram":
        factor_gram = (linalg.gram_cols(a), linalg.gram_rows(b))
        cross = (linalg.cross_gram_cols(a, gs.prev_a), linalg.cross_gram_rows(b, gs.prev_b))
        q = r = None
    else:
        factor_gram = None
        q_a, r_a = jnp.linalg.qr(linalg.replicate(a).astype(ct))
        q_b, r_b = jnp.linalg.qr(linalg.replicate(_mt(b)).astype(ct))
        q, r = (q_a, _mt(q_b)), (r_a, r_b)
        cross = (
            linalg.cross_gram_cols(q_a, gs.prev_a),
            linalg.cross_gram_rows(_mt(q_b), gs.prev_b),
        )
    return _GroupInputs(group, gs, a, b, g_a, g_b, unstack, ct, grad_gram, factor_gram, cross, q, r)


def _cat(xs: list[jax.Array]) -> jax.Array:
    xs = [linalg.replicate(x) for x in xs]
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)


def _both(members: tuple[_GroupInputs, ...], field: str, ct: Any) -> jax.Array:
    """A per-factor r×r quantity of every member, in the batch layout of :class:`_RankBatch`."""
    return _cat([x for w in members for x in getattr(w, field)]).astype(ct)


def _unmagnified_pass(members: tuple[_GroupInputs, ...], h: _Hyper, norm_dtype: Any) -> _RankBatch:
    """Pass 2a over every factor of one (rank, dtype): ``R⁺``, the basis change ``P``,
    ``ḠᵀḠ`` of the unmagnified gradients and the skip test."""
    rank, ct = members[0].group.pair.rank, members[0].ct
    # Index of the other factor of the same pair, for every row of the batch.
    other, rows, off = [], [], 0
    for w in members:
        n = w.n
        other += list(range(off + n, off + 2 * n)) + list(range(off, off + n))
        rows += [w.a.shape[-2]] * n + [w.b.shape[-1]] * n
        off += 2 * n
    other_idx = jnp.asarray(other, jnp.int32)
    rows_arr = jnp.asarray(rows, ct)
    if h.basis == "gram":
        rinv = linalg.gram_factor_pinv(_both(members, "factor_gram", ct))
        rprev = _cat([w.state.rinv for w in members]).astype(ct)
        # Each factor's own basis change Q_newᵀ Q_prev = R⁺ᵀ (X_newᵀ X_prev) R_prev⁺.
        p_own = _mt(rinv) @ _both(members, "cross", ct) @ rprev
    else:
        rinv = jnp.linalg.pinv(_both(members, "r", ct))
        p_own = _both(members, "cross", ct)
    rinv_o = jnp.take(rinv, other_idx, axis=0)  # R⁺ of the OTHER factor of the pair
    p = jnp.take(p_own, other_idx, axis=0)  # basis change of this factor's moments
    gg = _mt(rinv_o) @ _both(members, "grad_gram", ct) @ rinv_o  # Ḡᵀ Ḡ
    sq = jnp.trace(gg, axis1=-2, axis2=-1)
    rms = jnp.sqrt(sq / (rows_arr * rank))
    thr = jnp.asarray(h.skip_threshold, ct)
    skip = ~jnp.isfinite(sq) | ((thr > 0) & (rms > thr))
    kept = jnp.sum(jnp.where(skip, 0.0, sq)).astype(norm_dtype)
    return _RankBatch(members, rinv, rinv_o, p, gg, skip, rows_arr, kept)


def _clip_factor(batches: list[_RankBatch], h: _Hyper, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Joint clipping: ``(g_norm, min(1, clip / g_norm))`` over the kept ``Ḡ`` of all
    pairs (factor 1 when clipping is off)."""
    total = [rb.sq for rb in batches]
    g_norm = jnp.sqrt(sum(total[1:], total[0])) if total else jnp.zeros([], dtype)
    clip = jnp.asarray(h.clip_unmagnified_grad, g_norm.dtype)
    do_clip = (clip > 0) & (g_norm > clip)
    return g_norm, jnp.where(do_clip, clip / jnp.where(do_clip, g_norm, 1.0), 1.0)


def _escaped_mass(v_old, v_rot, rho_old, b2h):
    """``ρ ← β̂₂(ρ + min(max(maxᵢ(λᵢ(V̄) − λᵢ(PV̄Pᵀ)), 0), max(tr V̄ − tr PV̄Pᵀ, 0)))``."""
    eig_old = jnp.linalg.eigvalsh(linalg.symmetrize(v_old))
    eig_new = jnp.linalg.eigvalsh(v_rot)
    eig_diff = jnp.maximum(jnp.max(eig_old - eig_new, axis=-1), 0.0)
    tr_old = jnp.trace(v_old, axis1=-2, axis2=-1)
    tr_diff = jnp.maximum(tr_old - jnp.trace(v_rot, axis1=-2, axis2=-1), 0.0)
    return b2h * (rho_old + jnp.minimum(eig_diff, tr_diff))


def _multiplier_pass(
    rb: _RankBatch, count: jax.Array, clip_factor: jax.Array, h: _Hyper
) -> list[_GroupMultipliers]:
    """Pass 2b over every factor of one (rank, dtype): second moment, escaped mass,
    inverse root, and the multipliers ``W₁, W₂, W₃``, split back per group."""
    ct = rb.members[0].ct
    b1h = _adafactor_decay(h.b1, count, ct)
    b2h = _adafactor_decay(h.b2, count, ct)
    scale = jnp.where(rb.skip, 0.0, clip_factor.astype(ct))
    v_old = _cat([w.state.v for w in rb.members]).astype(ct)
    v_rot = linalg.zero_nonfinite(linalg.symmetrize(rb.p @ v_old @ _mt(rb.p)))
    rho_old = _cat([w.state.rho for w in rb.members]).astype(ct)
    rho = _escaped_mass(v_old, v_rot, rho_old, b2h) if h.escape_mass else jnp.zeros_like(rho_old)
    fresh = jnp.where(rb.skip[:, None, None], 0.0, (scale**2 / rb.rows)[:, None, None] * rb.gg)
    v_new = linalg.symmetrize(b2h * v_rot + (1.0 - b2h) * linalg.symmetrize(fresh))
    cinv = linalg.inv_root_eps_outside(v_new, h.eps, rho[:, None])
    # g W₂ = (1-β̂₁)·c·S̄; a skipped factor has W₂ = 0. Non-finite S̄ entries → 0.
    w2 = linalg.zero_nonfinite(((1.0 - b1h) * scale)[:, None, None] * (rb.rinv_other @ cinv))
    w1, w3 = b1h * _mt(rb.p), _mt(rb.rinv_other)
    out, off = [], 0
    for w in rb.members:  # one array per group and quantity: split the batch back
        n = w.n
        sl, sl_a, sl_b = slice(off, off + 2 * n), slice(off, off + n), slice(off + n, off + 2 * n)
        out.append(
            _GroupMultipliers(
                v=v_new[sl],
                rho=rho[sl],
                rinv=rb.rinv[sl],
                w1=(w1[sl_a], w1[sl_b]),
                w2=(w2[sl_a], w2[sl_b]),
                w3=(w3[sl_a], w3[sl_b]),
            )
        )
        off += 2 * n
    return out


def _direction_pass(
    w: _GroupInputs, mult: _GroupMultipliers, g_index: LeafIndex, basis: str
) -> tuple[dict[Path, jax.Array], LoRARiteGroupState]:
    """Pass 3 of one group: ``M̄ ← M̄ W₁ + g W₂``, the direction ``M̄ W₃`` of every
    factor (in its shape and dtype) and the group's new state."""
    gs, ct = w.state, w.ct
    w1a, w2a, w3a = (linalg.reshard_batch_like(x[0], w.a, 1) for x in (mult.w1, mult.w2, mult.w3))
    w1b, w2b, w3b = (linalg.reshard_batch_like(x[1], w.b, 1) for x in (mult.w1, mult.w2, mult.w3))
    # A (N, m, r):  M̄ ← M̄ W₁ + g W₂;  direction = M̄ W₃.
    mu_a = gs.mu_a.astype(ct) @ w1a + linalg.zero_nonfinite(w.g_a.astype(ct) @ w2a)
    dir_a = mu_a @ w3a
    # B in its own layout (N, r, n): the transposes of the rank-last formulas.
    mu_b = _mt(w1b) @ gs.mu_b.astype(ct) + linalg.zero_nonfinite(_mt(w2b) @ w.g_b.astype(ct))
    dir_b = _mt(w3b) @ mu_b
    updates = {}
    for pair, part_a, part_b in zip(w.group.pairs, w.unstack(dir_a), w.unstack(dir_b)):
        updates.update(pairwise.factor_updates(pair, g_index, part_a, part_b))
    prev_a, prev_b = (w.a, w.b) if basis == "gram" else w.q  # type: ignore[misc]
    state = LoRARiteGroupState(
        mu_a=mu_a.astype(gs.mu_a.dtype),
        mu_b=mu_b.astype(gs.mu_b.dtype),
        prev_a=linalg.reshard_like(prev_a.astype(gs.prev_a.dtype), gs.prev_a),
        prev_b=linalg.reshard_like(prev_b.astype(gs.prev_b.dtype), gs.prev_b),
        v=linalg.reshard_like(mult.v.astype(gs.v.dtype), gs.v),
        rinv=(
            linalg.reshard_like(mult.rinv.astype(gs.rinv.dtype), gs.rinv)
            if basis == "gram"
            else gs.rinv
        ),
        rho=linalg.reshard_like(mult.rho.astype(gs.rho.dtype), gs.rho),
    )
    return updates, state


def _update(updates, state, params, pairs: PairSpec, h: _Hyper, stack_pairs: bool, what: str):
    inputs = pairwise.resolve_update(pairs, updates, params, what)
    p_index, g_index = inputs.params, inputs.updates
    assert p_index is not None
    groups = pairwise.group_pairs(inputs.pairs, p_index, stack=stack_pairs)
    if len(groups) != len(state.groups):
        raise ValueError(
            f"{what}: the state holds {len(state.groups)} pair groups but the tree "
            f"has {len(groups)}; was the state initialised for another tree or "
            "another stack_pairs setting?"
        )
    work = [_factor_pass(g, gs, p_index, g_index, h.basis) for g, gs in zip(groups, state.groups)]
    by_rank: dict[Any, list[_GroupInputs]] = {}
    for w in work:  # the r×r passes batch every factor of one (rank, dtype)
        by_rank.setdefault((w.group.pair.rank, w.ct), []).append(w)
    norm_dtype = state.grad_norm.dtype
    batches = [_unmagnified_pass(tuple(ms), h, norm_dtype) for ms in by_rank.values()]
    g_norm, clip_factor = _clip_factor(batches, h, norm_dtype)
    mults: dict[int, _GroupMultipliers] = {}
    n_skipped = state.n_skipped
    for rb in batches:
        for w, mult in zip(rb.members, _multiplier_pass(rb, state.count, clip_factor, h)):
            mults[id(w)] = mult
        n_skipped = n_skipped + jnp.sum(rb.skip).astype(jnp.int32)
    new_updates: dict[Path, jax.Array] = {}
    new_groups = []
    for w in work:
        group_updates, group_state = _direction_pass(w, mults[id(w)], g_index, h.basis)
        new_updates.update(group_updates)
        new_groups.append(group_state)
    new_state = ScaleByLoRARiteState(
        count=optax.safe_int32_increment(state.count),
        groups=tuple(new_groups),
        n_skipped=n_skipped,
        grad_norm=g_norm.astype(norm_dtype),
    )
    return g_index.replace(new_updates), new_state


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Any = None,
    *,
    clip_unmagnified_grad: float = 1.0,
    skip_threshold: float = 1.0,
    escape_mass: bool = False,
    basis: str = "gram",
    stack_pairs: bool = True,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-RITE's transformation-invariant preconditioning (direction, before ``-η``).

    For every LoRA pair (``ΔW = s·A B``; ``A`` read as an m×r matrix, ``B`` as an r×n
    matrix, ``g_A`` the gradient of ``A``, ``X = Q R`` a QR decomposition, ``⁺`` the
    pseudo-inverse), written for ``A``
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

    Behaviour of the first author's PyTorch port of the original JAX code, which these
    defaults reproduce:

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

    Leaves outside any pair pass through unchanged (:func:`lora_rite` gives them its
    base optimizer, :func:`optax.adamw`).

    Args:
      b1: first-moment decay β₁.
      b2: second-moment decay β₂.
      eps: ε added outside the square root of the eigenvalues (port: 1e-6).
      mu_dtype: dtype of the factor-sized first moments (default: the parameter
        dtype).
      clip_unmagnified_grad: joint clip threshold for the unmagnified gradients of all
        pairs; 0 turns clipping off.
      skip_threshold: per-factor RMS threshold of the skip test; 0 turns it off.
      escape_mass: add the escaped mass ``ρ`` of paper eq. (15).
      basis: ``"gram"`` or ``"qr"`` (see above).
      stack_pairs: group pairs with identical shapes, dtypes and shardings
        (:func:`lora_rite_groups`) and keep their state stacked:
        one batched computation per layer shape (default). ``False``: one group per
        pair (more, smaller kernels: slower to compile and, on CPU, to run; see
        ``benchmarks/results``). The r×r work is batched over all pairs of one rank
        either way. Stacking copies the factors and gradients of a group once per
        step (models whose layers are already stacked along a batch axis form one
        group without copies).
      pairs: how to find the LoRA pairs: ``None`` for automatic discovery
        (:func:`lora_optax.find_lora_pairs`), a sequence of
        :class:`lora_optax.LoRAPair`, a callable ``params -> pairs`` or a label tree.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
      ``params`` and whose state is a :class:`ScaleByLoRARiteState` (per-factor view:
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
      Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, *LoRA Done RITE: Robust
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
    h = _Hyper(b1, b2, eps, clip_unmagnified_grad, skip_threshold, escape_mass, basis)

    def init_fn(params):
        return _init(params, pairs, h, mu_dtype, stack_pairs, what)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return _update(updates, state, params, pairs, h, stack_pairs, what)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_rite(
    learning_rate: base.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    clip_unmagnified_grad: float = 1.0,
    skip_threshold: float = 1.0,
    escape_mass: bool = False,
    basis: str = "gram",
    stack_pairs: bool = True,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-RITE: :func:`scale_by_lora_rite`, decoupled weight decay, learning rate.

    .. math::

      \Delta A = -\eta\,(\bar M_A R_B^{+\top} + \lambda A), \qquad
      \Delta B^\top = -\eta\,(\bar M_B R_A^{+\top} + \lambda B^\top)

    (weight decay multiplied by the learning rate, as in the reference port). Leaves
    outside any pair get the base optimizer, :func:`optax.adamw` with the same ``b1``,
    ``b2``, ``eps``, ``mu_dtype``, ``weight_decay`` and ``mask``. The defaults are those
    of the first author's PyTorch port of the original JAX code (β = (0.9, 0.999),
    ε = 1e-6, joint clipping of the unmagnified gradients at 1.0, RMS skip test at 1.0,
    no escaped mass, no weight decay); see :func:`scale_by_lora_rite` for the algorithm
    and every option.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, mu_dtype: see :func:`scale_by_lora_rite`; weight_decay (λ), mask: as
        in :func:`optax.adamw`.
      clip_unmagnified_grad: joint clip threshold (0: off).
      skip_threshold: per-factor RMS skip threshold (0: off).
      escape_mass: add the escaped mass of paper eq. (15).
      basis: ``"gram"`` (default, no QR) or ``"qr"``.
      stack_pairs: group same-shape pairs (see :func:`scale_by_lora_rite`).
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
      Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, *LoRA Done RITE: Robust
      Invariant Transformation Equilibration for LoRA Optimization*, ICLR 2025. https://arxiv.org/abs/2410.20625
    """
    rite = scale_by_lora_rite(
        b1,
        b2,
        eps,
        mu_dtype,
        clip_unmagnified_grad=clip_unmagnified_grad,
        skip_threshold=skip_threshold,
        escape_mass=escape_mass,
        basis=basis,
        stack_pairs=stack_pairs,
        pairs=pairs,
    )
    for_pairs = optax.chain(
        rite, pairwise.decay_and_learning_rate(learning_rate, weight_decay, mask)
    )
    adamw = pairwise.adamw_base(learning_rate, b1, b2, eps, 0.0, mu_dtype, weight_decay, mask)
    return pairwise.lora_optimizer(for_pairs, adamw, pairs=pairs, what="lora_rite")
