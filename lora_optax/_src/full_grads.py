"""Full-weight gradients ``G = ∂L/∂W`` alongside the LoRA gradients, in pure JAX.

SoLoRA (every step) and LoRA-One (at initialisation) need, for every LoRA pair, the
gradient of the loss with respect to the frozen base weight at the current effective
weight ``W = W₀ + s·A B``. Backprop through a LoRA layer never forms it, but it is
the gradient with respect to an additive zero "probe" ``P`` on the base kernel:

    L(W₀ + P + s·A B)  ⇒  ∂L/∂P |_{P=0} = ∂L/∂W |_{W = W₀ + s A B} = G,

and differentiating jointly with respect to (params, probes) gives the LoRA gradients
and all ``G`` in ONE backward pass (``g_A = s G Bᵀ``, ``g_B = s Aᵀ G`` then hold
exactly). The model only has to add the probe to its kernel: ``x @ (w0 + probe)``.

This module is framework-free; the flax integration wraps it for ``nnx`` modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lora_optax._src import linalg
from lora_optax._src.pairs import (
    LeafIndex,
    PairSpec,
    full_grad_shapes,
    pair_parent,
    path_str,
    resolve_pairs,
)


def zero_probes(params: Any, pairs: PairSpec = None, *, dtype: Any = None) -> Any:
    """Zero probes laid out as a ``full_grads`` tree.

    Returns nested dicts keyed by the path components of each pair's parent node (the
    node holding its ``A`` and ``B``), holding zeros of the base kernel's shape
    ``(*batch, *in_axes, *out_axes)``; for params ``{"layer": {"lora_a": ..,
    "lora_b": ..}}`` this is ``{"layer": zeros((m, n))}``. Sequence indices become
    string keys (``probes["layers"]["0"]``). A single pair at the root gives the bare
    array. The zeros are sharded like the product ``A B`` when the factors are.

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      pairs: pair spec (see :func:`lora_optax.resolve_pairs`).
      dtype: the probes' dtype (default: each pair's ``A`` dtype). The gradients
        ``G`` come back in this dtype; use float32 for bf16 models if the base
        kernel's precision is not enough.

    Raises:
      ValueError: when one pair's parent node is an ancestor of another's (the tree
        would need a node that is both an array and a dict).
    """
    resolved = resolve_pairs(pairs, params, what="zero_probes")
    index = LeafIndex(params)
    entries = []
    for pair in resolved:
        a, b = index[pair.a_path], index[pair.b_path]
        kernel, _ = full_grad_shapes(pair, a.shape, b.shape)
        k = pair.batch_ndim
        sa, sb = linalg.sharding_spec(a), linalg.sharding_spec(b)
        spec = None
        if sa is not None or sb is not None:
            sa = sa or (None,) * len(a.shape)
            sb = sb or (None,) * len(b.shape)
            spec = sa[:-1] + sb[k + 1 :]
        zeros = linalg.zeros_with_spec(kernel, a.dtype if dtype is None else dtype, a, spec)
        entries.append((pair_parent(pair), zeros, pair))
    if len(entries) == 1 and entries[0][0] == ():
        return entries[0][1]
    tree: dict[str, Any] = {}
    for parent, zeros, pair in entries:
        if parent == ():
            raise ValueError(
                f"zero_probes: LoRA pair {pair.name} sits at the root of the tree next to "
                "other pairs; its probe has no position of its own."
            )
        node = tree
        for key in parent[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"zero_probes: the probe of LoRA pair {pair.name} would sit below "
                    f"another pair's probe at {path_str(parent)}."
                )
            node = child
        if isinstance(node.get(parent[-1]), dict):
            raise ValueError(
                f"zero_probes: the probe of LoRA pair {pair.name} at {path_str(parent)} "
                "would hold other pairs' probes below it."
            )
        if parent[-1] in node:
            raise ValueError(
                f"zero_probes: two LoRA pairs share the parent node {path_str(parent)} "
                f"(second: {pair.name}); give each pair its own node or build the "
                "full_grads tree yourself (qwix pairs may use parent/<weight name>)."
            )
        node[parent[-1]] = zeros
    return tree


def value_and_full_grads(
    loss_fn: Callable[..., Any],
    *,
    pairs: PairSpec = None,
    has_aux: bool = False,
    probe_dtype: Any = None,
) -> Callable[..., Any]:
    """Like :func:`jax.value_and_grad`, also returning every pair's full gradient.

    ``loss_fn(params, probes, *args, **kwargs)`` must add ``probes[<parent path>]``
    (zeros, see :func:`zero_probes`) to the base kernel of each LoRA layer, i.e.
    compute with ``W₀ + probe + s·A B``. The returned function evaluates
    ``(value, (grads, full_grads))`` in one forward and one backward pass, where
    ``full_grads`` has the layout :func:`lora_optax.full_grad_for_pair` reads (the
    ``full_grads=`` argument of :func:`lora_optax.solora_sgd` and friends) and holds
    ``G = ∂L/∂W`` at the current effective weight.

    Memory: one extra base-weight-sized gradient per pair (plus the zero probe, which
    XLA folds into the kernel addition under ``jit``) — as much as full fine-tuning
    would keep for the LoRA-targeted weights' gradients, not their optimizer state.

    Args:
      loss_fn: ``(params, probes, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
      pairs: pair spec (see :func:`lora_optax.resolve_pairs`).
      has_aux: as in :func:`jax.value_and_grad`.
      probe_dtype: dtype of the probes and hence of ``G`` (see :func:`zero_probes`).

    Returns:
      ``f(params, *args, **kwargs) -> (value, (grads, full_grads))``; ``value`` is
      ``(loss, aux)`` when ``has_aux``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_optax
      >>> w0 = jnp.ones((4, 3))
      >>> params = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}
      >>> def loss_fn(params, probes, x):
      ...     p = params["dense"]
      ...     w = w0 + probes["dense"] + p["lora_a"] @ p["lora_b"]
      ...     return jnp.sum((x @ w) ** 2)
      >>> f = lora_optax.value_and_full_grads(loss_fn)
      >>> loss, (grads, full_grads) = f(params, jnp.ones((5, 4)))
      >>> full_grads["dense"].shape
      (4, 3)
    """
    if not callable(loss_fn):
        raise TypeError(
            "value_and_full_grads: loss_fn must be a callable "
            f"(params, probes, *args, **kwargs) -> loss, got {loss_fn!r}."
        )

    def wrapped(params, *args, **kwargs):
        probes = zero_probes(params, pairs, dtype=probe_dtype)
        value, (grads, full) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=has_aux)(
            params, probes, *args, **kwargs
        )
        return value, (grads, full)

    return wrapped
