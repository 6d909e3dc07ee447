"""Matrix views of LoRA factors and the r×r numerics every method shares.

Factors are viewed as batched matrices: ``A (*batch, *in, r) -> (*batch, m, r)`` and
``B (*batch, r, *out) -> (*batch, r, n)``. All r×r algebra runs in float32 or wider,
whatever the parameter dtype, and never forms an explicit inverse of a
possibly singular matrix: B = 0 at initialisation is the normal case.

Contractions over the long (m or n) axes are written so that they also run on
explicitly-sharded arrays (``jax.sharding.AxisType.Explicit`` meshes, the default of
``jax.make_mesh``): the r×r result is requested replicated over the mesh, keeping
only the sharding of the batch axes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lora_optax._src.pairs import LoRAPair


class PairMatrices(NamedTuple):
    """The matrix views of one pair's gradients and factors (or of a stacked group).

    ``g_a``, ``a``: ``(*batch, m, r)``; ``g_b``, ``b``: ``(*batch, r, n)``; ``a`` and
    ``b`` are ``None`` for transformations that do not read the params.
    """

    g_a: jax.Array
    g_b: jax.Array
    a: jax.Array | None
    b: jax.Array | None


def compute_dtype(dtype: Any) -> Any:
    """float32 for low-precision inputs, the input dtype when it is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    if not any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return None
    return sharding


def _spec(sharding: NamedSharding, ndim: int) -> tuple[Any, ...]:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _reshape(x: jax.Array, shape: tuple[int, ...], keep: int) -> jax.Array:
    """Reshapes merging or splitting the axes after the first ``keep`` ones.

    Under an explicit mesh, jax refuses a merge where a minor merged axis is sharded;
    then the merged axis is gathered (the only layout-compatible choice).
    """
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x.reshape(shape)
    try:
        return x.reshape(shape)
    except Exception:
        spec = _spec(sharding, x.ndim)[:keep] + (None,) * (len(shape) - keep)
        out = NamedSharding(sharding.mesh, PartitionSpec(*spec))
        return jax.lax.reshape(x, shape, out_sharding=out)


def a_matrix(pair: LoRAPair, a: jax.Array) -> jax.Array:
    """``A (*batch, *in, r) -> (*batch, m, r)``."""
    k = pair.batch_ndim
    m = math.prod(a.shape[k:-1])
    return _reshape(a, a.shape[:k] + (m, a.shape[-1]), k)


def b_matrix(pair: LoRAPair, b: jax.Array) -> jax.Array:
    """``B (*batch, r, *out) -> (*batch, r, n)``."""
    k = pair.batch_ndim
    n = math.prod(b.shape[k + 1 :])
    return _reshape(b, b.shape[: k + 1] + (n,), k + 1)


def from_matrix(x: jax.Array, shape: tuple[int, ...], pair: LoRAPair) -> jax.Array:
    """Inverse of :func:`a_matrix` / :func:`b_matrix` for a factor of ``shape``."""
    return _reshape(x, tuple(shape), pair.batch_ndim)


def _rr_out_sharding(x: jax.Array, batch_ndim: int) -> NamedSharding | None:
    """Sharding for an r×r result contracted from ``x``: batch axes kept, rest replicated."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return None
    spec = _spec(sharding, x.ndim)[:batch_ndim] + (None, None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _mt(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _rr_contraction(subscripts: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """An r×r ``einsum`` over the long axis in float32+, replicated but for the batch axes."""
    ct = compute_dtype(jnp.result_type(x, y))
    out = _rr_out_sharding(x, x.ndim - 2)
    return jnp.einsum(subscripts, x.astype(ct), y.astype(ct), out_sharding=out)


def cross_gram_cols(x: jax.Array, y: jax.Array) -> jax.Array:
    """``Xᵀ Y`` for batched ``(*batch, m, r)`` matrices, contracting the long axis."""
    return _rr_contraction("...mi,...mj->...ij", x, y)


def cross_gram_rows(x: jax.Array, y: jax.Array) -> jax.Array:
    """``X Yᵀ`` for batched ``(*batch, r, n)`` matrices, contracting the long axis."""
    return _rr_contraction("...in,...jn->...ij", x, y)


def gram_cols(x: jax.Array) -> jax.Array:
    """``Xᵀ X`` (r×r) of a batched ``(*batch, m, r)`` matrix, in float32+."""
    return symmetrize(cross_gram_cols(x, x))


def gram_rows(x: jax.Array) -> jax.Array:
    """``X Xᵀ`` (r×r) of a batched ``(*batch, r, n)`` matrix, in float32+."""
    return symmetrize(cross_gram_rows(x, x))


def symmetrize(m: jax.Array) -> jax.Array:
    return 0.5 * (m + _mt(m))


def eye_like(m: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)


def on_replicated_batch(fn: Any, *xs: jax.Array) -> Any:
    """``fn(*xs)`` for r×r routines (cholesky, eigh, triangular_solve) on operands
    whose batch (stacked-layer) axes may be explicitly sharded.

    jax's decompositions reject explicitly sharded batch axes; the (tiny) r×r stacks
    are replicated for the call and every result is resharded to the first operand's
    batch sharding (trailing axes replicated). Without explicit sharding, ``fn(*xs)``.
    """
    s0 = _explicit_sharding(xs[0])
    shardings = [_explicit_sharding(x) for x in xs]
    if all(s is None or all(p is None for p in _spec(s, x.ndim)) for s, x in zip(shardings, xs)):
        return fn(*xs)
    replicated = [
        x if s is None else jax.sharding.reshard(x, NamedSharding(s.mesh, PartitionSpec()))
        for x, s in zip(xs, shardings)
    ]
    out = fn(*replicated)
    if s0 is None:
        return out
    batch = _spec(s0, xs[0].ndim)[: xs[0].ndim - 2]

    def back(o: jax.Array) -> jax.Array:
        spec = batch[: o.ndim] + (None,) * max(o.ndim - len(batch), 0)
        return jax.sharding.reshard(o, NamedSharding(s0.mesh, PartitionSpec(*spec)))

    return jax.tree.map(back, out)


def eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` that also runs on explicitly batch-sharded r×r stacks."""
    return on_replicated_batch(jnp.linalg.eigh, m)


def _cholesky(m: jax.Array) -> jax.Array:
    return on_replicated_batch(jnp.linalg.cholesky, m)


def solve_right_spd(g: jax.Array, m: jax.Array, delta: Any) -> jax.Array:
    """``g (M + δI)⁻¹`` for batched ``g (*batch, k, r)`` and SPD ``M (*batch, r, r)``.

    Cholesky factorisation ``M + δI = L Lᵀ``; the r×r triangular factor is inverted
    (:func:`tril_inverse`), and ``g`` (whose long axis ``k`` may be sharded) meets only
    two matmuls, ``(g L⁻ᵀ) L⁻¹``. A ``triangular_solve`` with ``g`` itself as
    right-hand side would be all-gathered along ``k`` by XLA's SPMD partitioner (a
    whole factor-sized array on every device); the matmuls partition over any
    sharding. Inverting the well-conditioned triangular factor (never ``M`` itself)
    keeps the accuracy of substitution. The result is in the compute dtype (float32+).
    """
    ct = compute_dtype(jnp.result_type(g, m))
    m = m.astype(ct)
    chol = _cholesky(m + jnp.asarray(delta, ct) * eye_like(m))
    l_inv = on_replicated_batch(tril_inverse, chol)
    y = jnp.einsum("...kr,...sr->...ks", g.astype(ct), l_inv)  # g L⁻ᵀ
    return jnp.einsum("...ks,...st->...kt", y, l_inv)  # (g L⁻ᵀ) L⁻¹


_TRSM_BLOCK = 16


def tril_inverse(l: jax.Array) -> jax.Array:
    r"""``L⁻¹`` of a batched lower-triangular ``L (*batch, n, n)``.

    Triangular solves against the identity for ``n ≤ 16``; larger matrices are split
    recursively,

    .. math::

      \begin{pmatrix} A & 0 \\ C & D \end{pmatrix}^{-1}
      = \begin{pmatrix} A^{-1} & 0 \\ -D^{-1} C A^{-1} & D^{-1} \end{pmatrix},

    with both diagonal blocks of a level inverted together (stacked), down to blocks
    of at most 16 (``n`` is first padded with an identity block, which is exact).
    Both are triangular inversion methods of the same accuracy class (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §14.2). Why not one solve: on
    CPU, ``triangular_solve`` calls the LAPACK/OpenBLAS ``trsm``, which for larger
    matrices runs OpenBLAS worker threads that contend with XLA's own thread pool
    (measured on a 2-core machine: 288 solves of 64×64 took 0.7–2.3 s inside a
    jitted optimizer step, ~10 ms without the contention); the matmuls stay inside
    XLA. Only entries on and below the diagonal are read. The batch axes must not
    be explicitly sharded (see :func:`on_replicated_batch`).
    """
    n = l.shape[-1]
    x = jnp.tril(l)
    if n <= _TRSM_BLOCK:
        return jax.lax.linalg.triangular_solve(x, eye_like(x), left_side=True, lower=True)
    size = _TRSM_BLOCK << (-(-n // _TRSM_BLOCK) - 1).bit_length()
    if size != n:
        pad = [(0, 0)] * (l.ndim - 2) + [(0, size - n), (0, size - n)]
        x = jnp.pad(x, pad) + jnp.diag(jnp.arange(size) >= n).astype(x.dtype)
    h = size // 2
    inv = tril_inverse(jnp.stack([x[..., :h, :h], x[..., h:, h:]]))
    a_inv, d_inv = inv[0], inv[1]
    c_inv = -(d_inv @ x[..., h:, :h] @ a_inv)
    top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
    out = jnp.concatenate([top, jnp.concatenate([c_inv, d_inv], axis=-1)], axis=-2)
    return out[..., :n, :n]


def solve_left_spd(m: jax.Array, g: jax.Array, delta: Any) -> jax.Array:
    """``(M + δI)⁻¹ g`` for SPD ``M (*batch, r, r)`` and ``g (*batch, r, k)``."""
    return _mt(solve_right_spd(_mt(g), m, delta))


def riemannian_precondition(m: PairMatrices, delta: Any) -> tuple[jax.Array, jax.Array]:
    """``(g_A (B Bᵀ + δI)⁻¹, (AᵀA + δI)⁻¹ g_B)`` on matrix views, in float32+.

    ``δ`` is raised by the relative floor ``r·ε·tr(K)`` of :func:`safe_damping` (``r``
    the rank): a fixed ``δ`` far below the float32 resolution of an ill-conditioned
    Gram matrix would let its Cholesky factorisation fail (NaN).
    """
    assert m.a is not None and m.b is not None, "the preconditioner reads the params"
    k_b, k_a = gram_rows(m.b), gram_cols(m.a)
    rel = float(m.g_a.shape[-1])  # Cholesky's backward error grows with the matrix size
    new_g_a = solve_right_spd(m.g_a, k_b, safe_damping(k_b, delta, rel=rel))
    new_g_b = solve_left_spd(k_a, m.g_b, safe_damping(k_a, delta, rel=rel))
    return new_g_a, new_g_b


def solve_sylvester_sym(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """Solves ``P X + X Q = C`` for symmetric PSD ``P``, ``Q`` with two eighs.

    With ``P = U diag(a) Uᵀ`` and ``Q = V diag(b) Vᵀ``,
    ``X = U [(Uᵀ C V) / (a_i + b_j)] Vᵀ``. Where ``a_i + b_j = 0`` (both factors
    singular in the same direction) the equation does not determine ``X``; the
    minimum-norm choice 0 is taken there.
    """
    ct = compute_dtype(jnp.result_type(p, q, c))
    a, u = eigh(symmetrize(p.astype(ct)))
    b, v = eigh(symmetrize(q.astype(ct)))
    ct_c = _mt(u) @ c.astype(ct) @ v
    denom = a[..., :, None] + b[..., None, :]
    tiny = jnp.finfo(ct).eps * jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
    safe = jnp.abs(denom) > tiny
    y = jnp.where(safe, ct_c / jnp.where(safe, denom, 1.0), 0.0)
    return u @ y @ _mt(v)


def zero_nonfinite(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def replicated_zeros(shape: tuple[int, ...], dtype: Any, like: Any, batch_ndim: int) -> Any:
    """Zeros for r×r-type state: batch axes sharded like ``like``, the rest replicated.

    Eager arrays get an explicit ``NamedSharding`` over ``like``'s mesh (never a
    single-device array), so the state has the same sharding before and after a
    jitted update.
    """
    zeros = jnp.zeros(shape, dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        out = _rr_out_sharding(like, batch_ndim) if _is_array(like) else None
        if out is not None:
            return jax.sharding.reshard(zeros, out)
        return zeros
    spec = _spec(sharding, len(like.shape))[:batch_ndim]
    spec = spec + (None,) * (len(shape) - len(spec))
    return jax.device_put(zeros, NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def zeros_like_param(x: Any, dtype: Any = None) -> Any:
    """Zeros with ``x``'s shape and sharding (works for ``jax.ShapeDtypeStruct``)."""
    dtype = x.dtype if dtype is None else dtype
    if _is_array(x):
        return jnp.zeros_like(x, dtype=dtype)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(jnp.zeros(x.shape, dtype), sharding)
    return jnp.zeros(x.shape, dtype)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer))


# ---------------------------------------------------------------------------------------
# Full-weight-sized (m×n) arrays: full gradients and their moments (SoLoRA, LoRA-Pro).
# ---------------------------------------------------------------------------------------


def full_grad_matrix(pair: LoRAPair, g: jax.Array) -> jax.Array:
    """A full gradient in kernel form ``(*batch, *in, *out)`` or matrix form
    ``(*batch, m, n)`` viewed as ``(*batch, m, n)``."""
    k = pair.batch_ndim
    if g.ndim == k + 2:
        return g
    m = math.prod(g.shape[k : k + pair.in_ndim])
    return _reshape(g, g.shape[:k] + (m, math.prod(g.shape[k + pair.in_ndim :])), k)


def sharding_spec(x: Any) -> tuple[Any, ...] | None:
    """The partition spec of ``x`` padded to its rank (None when not a NamedSharding)."""
    sharding = _explicit_sharding(x) if _is_array(x) else None
    if sharding is None:
        sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    return _spec(sharding, len(x.shape))


def _dedupe_spec(spec: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drops mesh axes that an earlier array axis already uses (a spec may use each once)."""
    used: set[str] = set()
    out: list[Any] = []
    for entry in spec:
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        if any(n in used for n in names):
            out.append(None)
        else:
            used.update(names)
            out.append(entry)
    return tuple(out)


def zeros_with_spec(shape: tuple[int, ...], dtype: Any, like: Any, spec: Any) -> Any:
    """Zeros of ``shape`` partitioned by ``spec`` over the mesh of ``like``.

    For state whose shape derives from a parameter's (a vector over A's input axes, a
    full m×n moment over A's and B's axes): eager arrays get ``NamedSharding(mesh of
    like, spec)``; under tracing with an explicit mesh the zeros are resharded to it;
    otherwise (no mesh, or an Auto mesh under jit) plain zeros.
    """
    zeros = jnp.zeros(shape, dtype)
    if spec is None:
        return zeros
    spec = PartitionSpec(*_dedupe_spec(tuple(spec)))
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        explicit = _explicit_sharding(like) if _is_array(like) else None
        if explicit is not None:
            return jax.sharding.reshard(zeros, NamedSharding(explicit.mesh, spec))
        if isinstance(sharding, NamedSharding):  # ShapeDtypeStruct with a sharding
            return jax.device_put(zeros, NamedSharding(sharding.mesh, spec))
        return zeros
    return jax.device_put(zeros, NamedSharding(sharding.mesh, spec))


def reshard_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` resharded to ``ref``'s explicit sharding (unchanged without one).

    Used to bring a user-supplied array (a full gradient) onto the layout of the state
    it is combined with, and to keep state layouts fixed from step to step.
    """
    sharding = _explicit_sharding(ref)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, sharding)


def contract_like(subscripts: str, x: jax.Array, y: jax.Array, like: jax.Array) -> jax.Array:
    """``einsum(subscripts, x, y)`` in float32+, its result sharded like ``like``.

    For contractions over a long (possibly sharded) axis whose result is factor-sized,
    e.g. ``M Bᵀ`` (m×r, sharded like A's matrix view) or ``Aᵀ M`` (r×n, like B's).
    """
    ct = compute_dtype(jnp.result_type(x, y))
    return jnp.einsum(subscripts, x.astype(ct), y.astype(ct), out_sharding=_explicit_sharding(like))


def safe_damping(m: jax.Array, delta: Any, *, rel: float = 1.0) -> jax.Array:
    """``δ + rel·ε·tr(M)`` shaped ``(*batch, 1, 1)``, for :func:`solve_right_spd` & co.

    A symmetric PSD ``M`` formed in floating point can be indefinite by about
    ``ε‖M‖`` (ε the dtype's machine epsilon), and a fixed ``δ`` that is small
    against ``‖M‖`` then lets the Cholesky factorisation fail (NaN) for
    ill-conditioned factors. The relative floor ``rel·ε·tr(M) ≥ rel·ε‖M‖₂`` keeps
    ``M + δI`` numerically positive definite; in float64 it is below 1e-14 relative.
    """
    ct = compute_dtype(m.dtype)
    tr = jnp.trace(m.astype(ct), axis1=-2, axis2=-1)
    floor = rel * jnp.finfo(ct).eps * jnp.maximum(tr, 0.0)
    return (jnp.asarray(delta, ct) + floor)[..., None, None]


# ---------------------------------------------------------------------------------------
# Batching many pairs: stacking along one leading axis (the groups of
# lora_optax._src.pairwise), and the r×r numerics of LoRA-RITE (pseudo-inverse square
# roots, unclamped inverse roots).
# ---------------------------------------------------------------------------------------


def replicate(x: jax.Array) -> jax.Array:
    """``x`` fully replicated over its explicit mesh (unchanged without one).

    For small (r×r) arrays that are about to be merged with arrays of other pairs.
    """
    sharding = _explicit_sharding(x) if _is_array(x) else None
    if sharding is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def stack_leading(xs: Any, core_ndim: int) -> tuple[jax.Array, Any]:
    """Stacks arrays ``(*lead_i, *core)`` (same core shape) into ``(Σ prod lead_i, *core)``.

    Returns the stacked array and ``unstack(y)``, which splits an array ``(N, *core')``
    computed from it back into a list of ``(*lead_i, *core')``. A single array is
    reshaped, not copied.
    """
    xs = list(xs)
    leads = [tuple(x.shape[: x.ndim - core_ndim]) for x in xs]
    sizes = [math.prod(lead) for lead in leads]
    flat = [_reshape(x, (s,) + tuple(x.shape[x.ndim - core_ndim :]), 0) for x, s in zip(xs, sizes)]
    stacked = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)

    def unstack(y: jax.Array) -> list[jax.Array]:
        if len(xs) == 1:
            parts = [y]
        else:
            offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
            parts = jnp.split(y, offsets, axis=0)
        return [_reshape(p, lead + tuple(y.shape[1:]), 0) for p, lead in zip(parts, leads)]

    return stacked, unstack


def pinv_sqrt_psd(k: jax.Array, *, rtol: Any = None) -> jax.Array:
    """Pseudo-inverse of the square root of a symmetric PSD ``K`` (eigh).

    ``U diag(λ⁻½ if λ > rtol·λ_max else 0) Uᵀ``. For a Gram matrix ``K = XᵀX`` this is
    ``R⁺`` for the polar factor ``R = K½`` (``X = Q R`` with ``Q = X R⁺`` orthonormal on
    the column space of ``X`` and zero elsewhere): the factor-free route to
    ``X``'s "magnitude". ``K = 0`` gives 0. ``rtol`` defaults to ``r·ε`` of the compute
    dtype (relative to the largest eigenvalue, i.e. a singular-value cut-off of
    ``√(r·ε)``, the resolution of a Gram matrix formed in floating point).
    """
    ct = compute_dtype(k.dtype)
    lam, u = eigh(symmetrize(k.astype(ct)))
    if rtol is None:
        rtol = k.shape[-1] * jnp.finfo(ct).eps
    cut = jnp.asarray(rtol, ct) * jnp.max(lam, axis=-1, keepdims=True)
    keep = lam > jnp.maximum(cut, jnp.finfo(ct).tiny)
    d = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return symmetrize(jnp.einsum("...ij,...j,...kj->...ik", u, d, u))


def inv_root_eps_outside(m: jax.Array, eps: Any, shift: Any = 0.0) -> jax.Array:
    """``U diag(1 / (√(λ + shift) + ε)) Uᵀ`` of a symmetric ``M``, WITHOUT clamping λ.

    The LoRA-RITE reference behaviour: an eigenvalue that rounds below ``-shift``
    gives NaN (callers zero non-finite results); no clamp. ``shift`` broadcasts
    against the eigenvalues ``(*batch, r)``.
    """
    ct = compute_dtype(m.dtype)
    lam, u = eigh(symmetrize(m.astype(ct)))
    d = 1.0 / (jnp.sqrt(lam + jnp.asarray(shift, ct)) + jnp.asarray(eps, ct))
    return symmetrize(jnp.einsum("...ij,...j,...kj->...ik", u, d, u))


def gram_factor_pinv(k: jax.Array, *, rtol: Any = None) -> jax.Array:
    """``R⁺`` for SOME factor ``R`` with ``RᵀR = K`` (``K = XᵀX``, batched r×r).

    Fast path: the Cholesky factor ``R = Lᵀ`` (the ``R`` of a QR decomposition of
    ``X`` with a non-negative diagonal), inverted by :func:`tril_inverse`. When any
    matrix of the batch is numerically rank deficient (a Cholesky pivot at or below
    ``rtol·tr K``, or non-finite), the whole batch takes :func:`pinv_sqrt_psd`
    instead (the polar factor's pseudo-inverse), inside one ``lax.cond``. Both are
    valid "magnitudes" of ``X`` (``X R⁺`` is orthonormal on the column space of
    ``X``); they differ by an r×r rotation, which basis-independent algorithms such
    as LoRA-RITE do not see.
    """
    ct = compute_dtype(k.dtype)
    k = symmetrize(k.astype(ct))
    if rtol is None:
        rtol = k.shape[-1] * jnp.finfo(ct).eps
    chol = jnp.linalg.cholesky(k)
    pivots = jnp.diagonal(chol, axis1=-2, axis2=-1) ** 2
    floor = jnp.asarray(rtol, ct) * jnp.trace(k, axis1=-2, axis2=-1)[..., None]
    ok = jnp.all(jnp.isfinite(chol)) & jnp.all(pivots > jnp.maximum(floor, jnp.finfo(ct).tiny))

    def cholesky_path(chol):
        return _mt(tril_inverse(chol))  # R = Lᵀ, R⁻¹ = L⁻ᵀ

    return jax.lax.cond(ok, cholesky_path, lambda _: pinv_sqrt_psd(k, rtol=rtol), chol)


def reshard_batch_like(w: jax.Array, like: jax.Array, batch_ndim: int) -> jax.Array:
    """An r×r-type array resharded as :func:`gram_cols` of ``like`` would be: its batch
    axes sharded like ``like``'s, the rest replicated (unchanged without an explicit
    mesh). For r×r multipliers about to be contracted with a batched factor."""
    out = _rr_out_sharding(like, batch_ndim) if _is_array(like) else None
    if out is None:
        return w
    return jax.sharding.reshard(w, out)
