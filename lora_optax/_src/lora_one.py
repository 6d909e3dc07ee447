"""LoRA-One (Zhang, Liu & Chen): spectral initialisation + preconditioned AdamW.

Notation: ``A`` is read as an m×r matrix and ``B`` as an r×n matrix (``ΔW = s·A B``,
``s`` the LoRA scale); ``G = ∂L/∂W`` is the full-weight gradient of the frozen base
weight (``in × out``, i.e. m×n), ``G_r`` its best rank-r approximation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_optax._src import base, linalg, pairwise
from lora_optax._src.pairs import (
    LeafIndex,
    PairSpec,
    full_grad_for_pair,
    path_str,
    resolve_pairs,
)

# Reference-code LoRA alpha; the default scale of `spectral_init` is ALPHA / sqrt(r).
REFERENCE_ALPHA = 16.0
_METHODS = ("full", "randomized")


class SpectralInit(NamedTuple):
    """What :func:`spectral_init` returns.

    Attributes:
      a: ``A₀`` of shape ``(*batch, *in_axes, r)``.
      b: ``B₀`` of shape ``(*batch, r, *out_axes)``.
      base_delta: with ``preserve_output=True``, ``ΔW₀ = −s·A₀B₀`` in the full
        gradient's shape and dtype (add it to the frozen base weight); else ``None``.
    """

    a: jax.Array
    b: jax.Array
    base_delta: jax.Array | None = None


# ---------------------------------------------------------------------------------------
# Spectral initialisation
# ---------------------------------------------------------------------------------------


def _canonical_signs(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips each singular pair ``(uᵢ, vᵢ)`` so that the entry of largest magnitude of
    ``uᵢ`` is positive (the SVD fixes it only up to a joint sign)."""
    idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)  # (*batch, 1, r)
    lead = jnp.take_along_axis(u, idx, axis=-2)
    sign = jnp.where(lead < 0, -1.0, 1.0).astype(u.dtype)  # (*batch, 1, r)
    return u * sign, vt * jnp.swapaxes(sign, -1, -2)


def _orthonormal(y: jax.Array) -> jax.Array:
    q, _ = jnp.linalg.qr(y, mode="reduced")
    return q


def _top_svd(
    mat: jax.Array,
    rank: int,
    method: str,
    key: Any,
    oversample: int,
    power_iters: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Top-``rank`` ``(U_r, S_r, V_rᵀ, σ₁)`` of a batched ``(*batch, m, n)`` matrix."""
    m, n = mat.shape[-2:]
    if method == "full":
        u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
        sigma1 = s[..., 0]
    else:
        # Randomized range finder with power iterations (Halko, Martinsson & Tropp,
        # 2011, Alg. 4.4 + 5.1); one Gaussian test matrix shared by all batch slices.
        k = min(rank + oversample, m, n)
        omega = jax.random.normal(key, (n, k), mat.dtype)
        q = _orthonormal(mat @ omega)
        for _ in range(power_iters):
            z = _orthonormal(jnp.swapaxes(mat, -1, -2) @ q)
            q = _orthonormal(mat @ z)
        small = jnp.swapaxes(q, -1, -2) @ mat  # (*batch, k, n)
        ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
        u = q @ ub
        sigma1 = s[..., 0]
    u, vt = _canonical_signs(u[..., :rank], vt[..., :rank, :])
    return u, s[..., :rank], vt, sigma1


def _concrete_array(x: Any) -> np.ndarray | None:
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # pragma: no cover - non-addressable arrays
        return None


def _check_method(method: str, key: Any) -> None:
    if method not in _METHODS:
        raise ValueError(f"spectral_init: method must be one of {_METHODS}, got {method!r}.")
    if method == "randomized" and key is None:
        raise ValueError(
            "spectral_init: method='randomized' needs a PRNG key (key=jax.random.key(0))."
        )


def _spectral_matrices(
    g_m: jax.Array,
    rank: int,
    *,
    gamma: float,
    preserve_output: bool,
    method: str,
    key: Any,
    oversample: int,
    power_iters: int,
    name: str,
) -> tuple[jax.Array, jax.Array]:
    """``(A₀, B₀)`` as ``(*batch, m, r)``, ``(*batch, r, n)`` matrices in float32+."""
    m, n = g_m.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"spectral_init ({name}): rank {rank} must be between 1 and min(m, n) = "
            f"{min(m, n)} for a full gradient of matrix shape {tuple(g_m.shape)}."
        )
    ct = linalg.compute_dtype(g_m.dtype)
    neg_g = -g_m.astype(ct)
    concrete = _concrete_array(neg_g)
    if concrete is not None and not np.all(np.isfinite(concrete)):
        raise ValueError(f"spectral_init ({name}): the full gradient has non-finite entries.")
    u, s, vt, sigma1 = _top_svd(neg_g, rank, method, key, oversample, power_iters)
    sig = _concrete_array(sigma1)
    if sig is not None and np.any(sig <= 0):
        raise ValueError(
            f"spectral_init ({name}): the full gradient is zero (σ₁ = 0"
            f"{' in some stacked slice' if sig.ndim else ''}); a spectral initialisation "
            "from it would leave both factors without gradient. Check that G = dL/dW "
            "was computed (e.g. the probes reach the loss)."
        )
    g_arr = jnp.asarray(gamma, ct)
    if preserve_output:
        root = jnp.sqrt(g_arr)
        return root * u, root * vt
    # A₀ = U_r √S_r / √(σ₁γ), B₀ = √S_r V_rᵀ / √(σ₁γ); a zero σ₁ (traced input) gives 0.
    sigma1 = sigma1[..., None, None]
    safe = sigma1 > 0
    norm = jnp.sqrt(jnp.where(safe, sigma1, 1.0) * g_arr)
    sq = jnp.sqrt(jnp.maximum(s, 0.0))
    a0 = jnp.where(safe, u * sq[..., None, :] / norm, 0.0)
    b0 = jnp.where(safe, sq[..., :, None] * vt / norm, 0.0)
    return a0, b0


def _placed_like(x: jax.Array, ref: Any) -> jax.Array:
    """``x`` with ``ref``'s sharding (a concrete ``NamedSharding``, or an explicit mesh's)."""
    sharding = getattr(ref, "sharding", None)
    if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.device_put(x, sharding)
        return x
    return linalg.reshard_like(x, ref)


def _check_common(gamma: Any, method: str, key: Any) -> None:
    base.check_positive(gamma, "gamma")
    _check_method(method, key)


def spectral_init(
    full_grad: jax.Array,
    rank: int,
    *,
    gamma: float = 128.0,
    scale: float | None = None,
    preserve_output: bool = False,
    method: str = "full",
    key: Any = None,
    in_ndim: int = 1,
    batch_ndim: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
    dtype: Any = None,
) -> SpectralInit:
    r"""LoRA-One's spectral initialisation of one LoRA pair from its full gradient.

    ``G = ∇_W L(W₀)`` is the gradient of the loss with respect to the frozen base
    weight at the pre-trained weights, in the library's orientation (``in × out``),
    ideally averaged over a few batches (the reference code uses 8 micro-batches).
    With the SVD ``−G = U S Vᵀ`` and ``σ₁ = S₁₁``:

    * ``preserve_output=False`` (default; the authors' code):

      .. math::

        A_0 = U_r \,\mathrm{diag}(\sqrt{S_r}) / \sqrt{\sigma_1\gamma}, \qquad
        B_0 = \mathrm{diag}(\sqrt{S_r})\, V_r^\top / \sqrt{\sigma_1\gamma},

      so ``s·A₀B₀ = −(s/(σ₁γ))·G_r`` (``G_r`` the best rank-r approximation of
      ``G``): the adapter starts at one normalised gradient step of full fine-tuning,
      and the base weight is NOT modified (the model output changes at
      initialisation by design). ``scale`` does not enter ``A₀``, ``B₀``;
      ``base_delta`` is ``None``.
    * ``preserve_output=True`` (the talk slides' Algorithm 1, LoRA-GA style):
      ``A₀ = √γ U_r``, ``B₀ = √γ V_rᵀ`` (same SVD of ``−G``) and the base weight must
      become ``W ← W − s·A₀B₀``. ``base_delta`` is ``ΔW₀ = −s·A₀B₀`` in
      ``full_grad``'s shape and dtype: the correction to ADD to
      the frozen base weight, so that ``W + ΔW₀ + s·A₀B₀ = W`` (the model output is
      unchanged). The slides take the SVD of ``+G``, which gives the same ``U_r`` and
      ``−V_r``; call ``spectral_init(-G, ...)`` for that literal variant (the
      first-order preconditioned dynamics are the same).

    **The scale must be the one the model applies** (``y = x W + s·x A B``): it only
    enters ``ΔW₀`` here, and a mismatch leaves ``W + ΔW₀ + s_model A₀B₀ ≠ W``. The
    default ``scale=None`` is the reference code's rsLoRA scale ``s = α/√r`` with
    ``α = 16``; flax ``nnx.LoRA`` uses ``s = 1``, qwix ``α/r``.

    Each singular pair's sign is fixed so that the largest-magnitude entry of
    ``uᵢ`` is positive (the product ``A₀B₀`` does not depend on it), so the result is
    deterministic and comparable across SVD methods. The SVD runs in float32 or
    wider.

    Args:
      full_grad: ``G`` of shape ``(*batch, *in_axes, *out_axes)`` (the base kernel's
        shape; e.g. ``(D, N, H)`` with ``in_ndim=1`` gives ``A (D, r)``,
        ``B (r, N, H)``) or ``(*batch, m, n)``.
      rank: the LoRA rank ``r`` (``≤ min(m, n)``).
      gamma: ``γ``; the reference code uses 128.
      scale: the model's LoRA scale ``s`` (default ``16/√r``); used only with
        ``preserve_output=True``.
      preserve_output: use the slides' output-preserving variant (see above).
      method: ``"full"`` (deterministic full SVD, default) or ``"randomized"``
        (randomized range finder + power iterations, for large matrices; needs
        ``key``). The randomized method's ``σ₁`` is that of the sketch, within the
        sketch's accuracy of the true ``σ₁``.
      key: a PRNG key, for ``method="randomized"``.
      in_ndim: number of input axes of ``G`` (after the batch axes).
      batch_ndim: number of leading stacked-layer axes shared by ``G``, ``A`` and
        ``B``; every slice is initialised from its own SVD.
      oversample: extra sketch columns of the randomized method.
      power_iters: power iterations of the randomized method.
      dtype: dtype of the results (default: ``full_grad``'s dtype).

    Returns:
      A :class:`SpectralInit` ``(a, b, base_delta)``: ``A₀`` of shape
      ``(*batch, *in_axes, r)``, ``B₀`` of shape ``(*batch, r, *out_axes)`` and, with
      ``preserve_output=True``, ``ΔW₀`` (else ``None``).

    Raises:
      ValueError: for a rank outside ``[1, min(m, n)]``, bad axis counts, an
        unknown method, a missing key, ``γ ≤ 0``, or (for concrete inputs) a
        full gradient that is zero or non-finite.

    Example:
      >>> import jax.numpy as jnp, lora_optax
      >>> g = jnp.arange(12.0).reshape(4, 3) - 5.0
      >>> init = lora_optax.spectral_init(g, 2, gamma=64.0)
      >>> init.a.shape, init.b.shape, init.base_delta
      ((4, 2), (2, 3), None)

    References:
      Zhang, Liu & Chen, *LoRA-One: One-Step Full Gradient Could Suffice for
      Fine-Tuning Large Language Models, Provably and Efficiently*, ICML 2025.
      https://arxiv.org/abs/2502.01235
    """
    _check_common(gamma, method, key)
    full_grad = jnp.asarray(full_grad)
    shape = tuple(full_grad.shape)
    k = int(batch_ndim)
    if k < 0 or not 1 <= in_ndim <= len(shape) - k - 1:
        raise ValueError(
            f"spectral_init: full_grad of shape {shape} with batch_ndim={batch_ndim} "
            f"needs 1 <= in_ndim <= {len(shape) - k - 1} (at least one input and one "
            f"output axis), got in_ndim={in_ndim}."
        )
    in_shape, out_shape = shape[k : k + in_ndim], shape[k + in_ndim :]
    m, n = math.prod(in_shape), math.prod(out_shape)
    g_m = full_grad.reshape(shape[:k] + (m, n))
    out_dtype = full_grad.dtype if dtype is None else dtype
    a0, b0 = _spectral_matrices(
        g_m,
        int(rank),
        gamma=gamma,
        preserve_output=preserve_output,
        method=method,
        key=key,
        oversample=oversample,
        power_iters=power_iters,
        name=f"G {shape}",
    )
    a_out = a0.reshape(shape[:k] + in_shape + (rank,)).astype(out_dtype)
    b_out = b0.reshape(shape[:k] + (rank,) + out_shape).astype(out_dtype)
    if not preserve_output:
        return SpectralInit(a_out, b_out)
    if scale is None:
        scale = REFERENCE_ALPHA / math.sqrt(rank)
    dw = (-jnp.asarray(scale, a0.dtype) * (a0 @ b0)).reshape(shape).astype(full_grad.dtype)
    return SpectralInit(a_out, b_out, dw)


def spectral_init_pairs(
    params: Any,
    full_grads: Any,
    *,
    pairs: PairSpec = None,
    gamma: float = 128.0,
    scale: float | None = None,
    preserve_output: bool = False,
    method: str = "full",
    key: Any = None,
    oversample: int = 10,
    power_iters: int = 2,
) -> Any:
    r"""Spectral (LoRA-One) initialisation of every LoRA pair of a params tree.

    Each pair's ``(A, B)`` is replaced by :func:`spectral_init` of its full gradient;
    every other leaf is returned unchanged. Factors keep their dtypes and, for sharded
    params, their shardings (the SVD itself runs on the gathered matrix).

    ``full_grads`` uses the layout shared with SoLoRA (see
    :func:`lora_optax.full_grad_for_pair`): a pytree shaped like ``params`` holding,
    at each pair's PARENT node (the node that holds its ``A`` and ``B``), the pair's
    ``G = ∂L/∂W`` of the frozen base weight, in the base kernel's shape
    ``(*batch, *in_axes, *out_axes)`` or its matrix form ``(*batch, m, n)``.
    :func:`lora_optax.value_and_full_grads` returns exactly this tree; average it
    over a few batches first (the reference code uses 8 micro-batches), with the
    factors at any value (``G`` does not depend on them when ``B = 0``).

    Scale: ``scale=None`` uses each pair's :attr:`LoRAPair.scale` (set it with
    ``pairs=functools.partial(lora_optax.find_lora_pairs, scale=s)``; discovery
    defaults to 1). It matters only with ``preserve_output=True`` and **must be the
    scale the model applies** to ``A B``.

    Args:
      params: the parameters (holding the LoRA factors).
      full_grads: the full-gradient tree described above.
      pairs: pair spec (see :func:`lora_optax.resolve_pairs`).
      gamma: ``γ`` (reference code: 128).
      scale: one scale for all pairs, or ``None`` for each pair's ``scale``.
      preserve_output: the slides' output-preserving variant (see
        :func:`spectral_init`).
      method: ``"full"`` or ``"randomized"`` SVD.
      key: PRNG key for ``method="randomized"`` (folded with each pair's index).
      oversample, power_iters: randomized-SVD settings.

    Returns:
      The new params; with ``preserve_output=True`` the tuple
      ``(new_params, base_deltas)``, where ``base_deltas`` has the structure of
      ``full_grads`` and holds ``ΔW₀ = −s·A₀B₀`` (shape and dtype of the pair's
      ``G``) where the pair's ``G`` was, zeros elsewhere: add each ``ΔW₀`` to the
      pair's frozen base weight so that the model output is unchanged.

    Raises:
      ValueError: when a pair's full gradient is missing or mis-shaped, or for the
        reasons of :func:`spectral_init`.

    Example:
      >>> import jax.numpy as jnp, lora_optax
      >>> params = {"q": {"lora_a": jnp.zeros((6, 2)), "lora_b": jnp.zeros((2, 4))}}
      >>> full_grads = {"q": jnp.arange(24.0).reshape(6, 4) - 11.0}
      >>> new = lora_optax.spectral_init_pairs(params, full_grads, gamma=64.0)
      >>> bool(jnp.any(new["q"]["lora_b"] != 0))
      True

    References:
      Zhang, Liu & Chen, *LoRA-One: One-Step Full Gradient Could Suffice for
      Fine-Tuning Large Language Models, Provably and Efficiently*, ICML 2025
      (spectral initialisation, Alg. 1). https://arxiv.org/abs/2502.01235
    """
    _check_common(gamma, method, key)
    what = "spectral_init_pairs"
    resolved = resolve_pairs(pairs, params, what=what)
    p = LeafIndex(params)
    fg = full_grads if isinstance(full_grads, LeafIndex) else LeafIndex(full_grads)
    new: dict[Any, Any] = {}
    deltas: dict[Any, Any] = {}
    for i, pair in enumerate(resolved):
        a, b = p[pair.a_path], p[pair.b_path]
        g = full_grad_for_pair(pair, None if full_grads is None else fg, p, what=what)
        g_m = linalg.full_grad_matrix(pair, jnp.asarray(g))
        pair_key = None if key is None else jax.random.fold_in(key, i)
        a0, b0 = _spectral_matrices(
            g_m,
            pair.rank,
            gamma=gamma,
            preserve_output=preserve_output,
            method=method,
            key=pair_key,
            oversample=oversample,
            power_iters=power_iters,
            name=f"LoRA pair {pair.name}",
        )
        new[pair.a_path] = _placed_like(linalg.from_matrix(a0, a.shape, pair).astype(a.dtype), a)
        new[pair.b_path] = _placed_like(linalg.from_matrix(b0, b.shape, pair).astype(b.dtype), b)
        if preserve_output:
            s = pair.scale if scale is None else scale
            dw = -jnp.asarray(s, a0.dtype) * (a0 @ b0)
            g_path = next(path for path, leaf in fg.items() if leaf is g)
            if g_path in deltas:
                raise ValueError(
                    f"{what}: two LoRA pairs read the same full gradient at "
                    f"{path_str(g_path)}; give each pair its own entry."
                )
            deltas[g_path] = _placed_like(dw.reshape(g.shape).astype(g.dtype), g)
    new_params = p.replace(new)
    if not preserve_output:
        return new_params
    base_deltas = fg.map(lambda path, leaf: deltas.get(path, jnp.zeros_like(leaf)))
    return new_params, base_deltas


# ---------------------------------------------------------------------------------------
# Training: preconditioned AdamW (optionally without Adam's bias correction)
# ---------------------------------------------------------------------------------------


def scale_by_adam_uncorrected(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's scaling WITHOUT bias correction: ``μ / (√(ν + ε_root) + ε)``.

    ``μ ← b1 μ + (1−b1) g``, ``ν ← b2 ν + (1−b2) g²``, update
    ``μ / (√(ν + eps_root) + eps)`` (LoRA-One's reference code, with ``eps_root = 0``).
    The state is :class:`optax.ScaleByAdamState`, as for :func:`optax.scale_by_adam`,
    so tools that read ``mu``/``nu`` keep working. Compared with bias-corrected Adam
    the update is multiplied by ``(1 − b1ᵗ)/√(1 − b2ᵗ)`` at step ``t``: with
    (0.9, 0.999) about 3.2× at t = 1, 6.5× at t = 10, 3.2× at t = 100, 1.26× at
    t = 1000, → 1 later.

    Args:
      b1, b2, eps, eps_root: as in :func:`optax.scale_by_adam`.
      mu_dtype: dtype of the first moment (default: the parameter dtype).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (needs no ``params``).
    """
    pairwise.check_adamw_hyperparams(None, b1, b2, eps, eps_root)

    def init_fn(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        out = jax.tree.map(
            lambda m, v: None if m is None else m / (jnp.sqrt(v + eps_root) + eps),
            mu,
            nu,
            is_leaf=lambda x: x is None,
        )
        return out, optax.ScaleByAdamState(
            count=optax.safe_increment(state.count),
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_one(
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
    bias_correction: bool = False,
    sequential: bool = False,
    pairs: PairSpec = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-One's training optimizer: Riemannian-preconditioned AdamW.

    .. math::

      \tilde g_A = g_A (B B^\top + \delta I)^{-1}, \qquad
      \tilde g_B = (A^\top A + \delta I)^{-1} g_B,

    from the pre-step factors, then AdamW on ``g̃``: ``μ ← b1 μ + (1−b1) g̃``,
    ``ν ← b2 ν + (1−b2) g̃²``, ``Δ = −η (μ/(√ν + ε) + wd·p)``. By default there is
    **no Adam bias correction**, as in the authors' code; the early updates are then
    larger than bias-corrected Adam's by ``(1 − b1ᵗ)/√(1 − b2ᵗ)`` (up to ~6.5× around
    t = 10 with (0.9, 0.999)), so use a warm-up. ``bias_correction=True`` gives
    exactly :func:`lora_optax.scaled_adamw`. Leaves outside any pair get the base
    optimizer: the same AdamW (uncorrected by default) without the preconditioning.

    Pair it with :func:`lora_optax.spectral_init_pairs` for the initialisation; the
    optimizer itself works from any initialisation.

    **Update order.** ``sequential=False`` (default) preconditions both gradients with
    the pre-step factors; ``sequential=True`` is the authors' order (``A``'s whole step,
    then ``B`` preconditioned with the updated ``A``, decoupled weight decay after the
    step), as described under :func:`lora_optax.scaled_adamw`; the state is then a
    :class:`lora_optax.SequentialRiemannianState`. With the defaults (no bias
    correction, ``ε`` outside the root), ``sequential=True`` is the step of the
    authors' preconditioned AdamW as their code runs it.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`optax.adamw`
        (``eps`` outside the root).
      delta: damping ``δ`` (the slides' ``λ``) of the r×r Gram matrices; 1e-6 as in
        the reference code.
      bias_correction: apply Adam's bias correction (default False, reference code).
      sequential: the authors' order (``A``'s whole step, then ``B`` preconditioned
        with the updated ``A``) instead of the simultaneous default; see above.
      pairs: pair spec, see :func:`lora_optax.scale_by_riemannian_preconditioner`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> params = {"q": {"lora_a": jnp.zeros((6, 2)), "lora_b": jnp.zeros((2, 4))}}
      >>> full_grads = {"q": jnp.arange(24.0).reshape(6, 4) - 11.0}  # G of the base weight
      >>> params = lora_optax.spectral_init_pairs(params, full_grads)  # LoRA-One's init
      >>> tx = lora_optax.lora_one(1e-3)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)

    References:
      Zhang, Liu & Chen, *LoRA-One: One-Step Full Gradient Could Suffice for
      Fine-Tuning Large Language Models, Provably and Efficiently*, ICML 2025 (Alg. 1),
      https://arxiv.org/abs/2502.01235; Zhang & Pilanci, *Riemannian Preconditioned
      LoRA for Fine-Tuning Foundation Models*, ICML 2024,
      https://arxiv.org/abs/2402.02347.
    """
    pairwise.check_adamw_hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay)
    if bias_correction:
        adam: optax.GradientTransformation = optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype
        )
    else:
        adam = scale_by_adam_uncorrected(b1, b2, eps, eps_root, mu_dtype)
    base_optimizer = optax.chain(
        adam, pairwise.decay_and_learning_rate(learning_rate, weight_decay, mask)
    )
    if sequential:
        for_pairs: optax.GradientTransformation = pairwise.sequential_riemannian(
            learning_rate,
            adam,
            weight_decay=weight_decay,
            mask=mask,
            delta=delta,
            pairs=pairs,
            what="lora_one",
        )
    else:
        precondition = pairwise.riemannian_preconditioner(delta=delta, pairs=pairs, what="lora_one")
        for_pairs = optax.chain(precondition, base_optimizer)
    return pairwise.lora_optimizer(for_pairs, base_optimizer, pairs=pairs, what="lora_one")
