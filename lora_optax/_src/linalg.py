"""Matrix views of LoRA factors and the r×r numerics every method shares.

Factors are viewed as batched matrices: ``A (*batch, *in, r) -> (*batch, m, r)`` and
``B (*batch, r, *out) -> (*batch, r, n)``. All r×r algebra runs in float32 or wider,
whatever the parameter dtype (SPEC §2), and never forms an explicit inverse of a
possibly singular matrix: B = 0 at initialisation is the normal case.

Contractions over the long (m or n) axes are written so that they also run on
explicitly-sharded arrays (``jax.sharding.AxisType.Explicit`` meshes, the default of
``jax.make_mesh``): the r×r result is requested replicated over the mesh, keeping
only the sharding of the batch axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lora_optax._src.pairs import LoRAPair


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


def cross_gram_cols(x: jax.Array, y: jax.Array) -> jax.Array:
    """``Xᵀ Y`` for batched ``(*batch, m, r)`` matrices, contracting the long axis."""
    ct = compute_dtype(jnp.result_type(x, y))
    return jnp.einsum(
        "...mi,...mj->...ij",
        x.astype(ct),
        y.astype(ct),
        out_sharding=_rr_out_sharding(x, x.ndim - 2),
    )


def cross_gram_rows(x: jax.Array, y: jax.Array) -> jax.Array:
    """``X Yᵀ`` for batched ``(*batch, r, n)`` matrices, contracting the long axis."""
    ct = compute_dtype(jnp.result_type(x, y))
    return jnp.einsum(
        "...in,...jn->...ij",
        x.astype(ct),
        y.astype(ct),
        out_sharding=_rr_out_sharding(x, x.ndim - 2),
    )


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


def _cholesky(m: jax.Array) -> jax.Array:
    return jnp.linalg.cholesky(m)


def solve_right_spd(g: jax.Array, m: jax.Array, delta: Any) -> jax.Array:
    """``g (M + δI)⁻¹`` for batched ``g (*batch, k, r)`` and SPD ``M (*batch, r, r)``.

    Cholesky factorisation and two triangular solves; no inverse is formed. The
    result is in the compute dtype (float32+).
    """
    ct = compute_dtype(jnp.result_type(g, m))
    m = m.astype(ct)
    chol = _cholesky(m + jnp.asarray(delta, ct) * eye_like(m))
    # g (L Lᵀ)⁻¹: solve X Lᵀ... written as right-side triangular solves.
    y = jax.lax.linalg.triangular_solve(
        chol, g.astype(ct), left_side=False, lower=True, transpose_a=True
    )
    return jax.lax.linalg.triangular_solve(chol, y, left_side=False, lower=True)


def solve_left_spd(m: jax.Array, g: jax.Array, delta: Any) -> jax.Array:
    """``(M + δI)⁻¹ g`` for SPD ``M (*batch, r, r)`` and ``g (*batch, r, k)``."""
    return _mt(solve_right_spd(_mt(g), m, delta))


def inv_sqrt_psd(m: jax.Array, *, eps: Any = 0.0, shift: Any = 0.0) -> jax.Array:
    """``U diag(1 / (sqrt(λ + shift) + eps)) Uᵀ`` of a symmetric PSD ``M`` (eigh).

    Eigenvalues that round below zero are clamped to zero before the square root;
    with ``eps = 0`` a zero eigenvalue gives an infinite entry, which callers that
    need finiteness must guard (LoRA-RITE zeroes non-finite entries, as its
    reference code does).
    """
    ct = compute_dtype(m.dtype)
    lam, u = jnp.linalg.eigh(symmetrize(m.astype(ct)))
    lam = jnp.maximum(lam + jnp.asarray(shift, ct), 0.0)
    d = 1.0 / (jnp.sqrt(lam) + jnp.asarray(eps, ct))
    return jnp.einsum("...ij,...j,...kj->...ik", u, d, u)


def solve_sylvester_sym(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """Solves ``P X + X Q = C`` for symmetric PSD ``P``, ``Q`` with two eighs.

    With ``P = U diag(a) Uᵀ`` and ``Q = V diag(b) Vᵀ``,
    ``X = U [(Uᵀ C V) / (a_i + b_j)] Vᵀ``. Where ``a_i + b_j = 0`` (both factors
    singular in the same direction) the equation does not determine ``X``; the
    minimum-norm choice 0 is taken there.
    """
    ct = compute_dtype(jnp.result_type(p, q, c))
    a, u = jnp.linalg.eigh(symmetrize(p.astype(ct)))
    b, v = jnp.linalg.eigh(symmetrize(q.astype(ct)))
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
