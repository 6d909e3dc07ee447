"""Small LoRA problems shared by the tests.

``FactorizationProblem`` fits four LoRA pairs of different layouts — a 2-D pair, a
stacked pair (two layers), a qwix-style multi-axis pair and a square pair (m = n) —
plus a bias that is in no pair, to low-rank targets:

    L = Σ_pairs ½‖s·A B − W*‖²_F + ½‖b − b*‖²

Full-weight gradients ``G = ∂L/∂W`` are obtained independently of the library, as the
gradient w.r.t. a zero "probe" added to each pair's effective weight.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# name -> (A shape, B shape, A sharding spec, B sharding spec)
LAYOUT: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]] = {
    "dense": ((16, 4), (4, 12), ("data", None), (None, "model")),
    "stacked": ((2, 8, 3), (2, 3, 10), (None, "data", None), (None, None, "model")),
    "einsum": ((12, 4), (4, 2, 5), ("data", None), (None, "model", None)),
    # m = n (d_model × d_model projections): a method that swaps row and column
    # quantities (statistics, Gram sides) runs silently here instead of failing on shapes.
    "square": ((16, 3), (3, 16), ("data", None), (None, "model")),
}
BIAS_SHAPE = (12,)
BIAS_SPEC = ("model",)
A_KEY = {"dense": "lora_a", "stacked": "lora_a", "einsum": "w_lora_a", "square": "lora_a"}
B_KEY = {"dense": "lora_b", "stacked": "lora_b", "einsum": "w_lora_b", "square": "lora_b"}


def lowrank_product(a: jax.Array, b: jax.Array, batch: int) -> jax.Array:
    """``A B`` for A (*batch, *in, r), B (*batch, r, *out), in the weight's shape."""
    a_m = a.reshape(a.shape[:batch] + (-1, a.shape[-1]))
    b_m = b.reshape(b.shape[: batch + 1] + (-1,))
    w = a_m @ b_m
    return w.reshape(a.shape[:-1] + b.shape[batch + 1 :])


def _wide(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _batch(name: str) -> int:
    return 1 if name == "stacked" else 0


@dataclasses.dataclass
class FactorizationProblem:
    targets: dict[str, jax.Array]
    bias_target: jax.Array
    scale: float = 1.0

    @classmethod
    def create(cls, seed: int = 0, scale: float = 1.0) -> FactorizationProblem:
        rng = np.random.default_rng(seed)
        targets = {}
        for name, (a_shape, b_shape, _, _) in LAYOUT.items():
            k = _batch(name)
            r_true = a_shape[-1] - 1
            u = rng.normal(size=a_shape[:-1] + (r_true,))
            v = rng.normal(size=a_shape[:k] + (r_true,) + b_shape[k + 1 :])
            w = np.asarray(lowrank_product(jnp.asarray(u), jnp.asarray(v), k))
            targets[name] = jnp.asarray(2.0 * w / np.linalg.norm(w))
        bias = jnp.asarray(rng.normal(size=BIAS_SHAPE))
        return cls(targets, bias, scale)

    def init_params(self, seed: int = 1, dtype: Any = jnp.float32) -> dict[str, Any]:
        """Standard LoRA initialisation: A random, B = 0."""
        rng = np.random.default_rng(seed)
        params: dict[str, Any] = {}
        for name, (a_shape, b_shape, _, _) in LAYOUT.items():
            m = int(np.prod(a_shape[_batch(name) : -1]))
            params[name] = {
                A_KEY[name]: jnp.asarray(rng.normal(size=a_shape) / np.sqrt(m), dtype),
                B_KEY[name]: jnp.zeros(b_shape, dtype),
            }
        params["bias"] = jnp.zeros(BIAS_SHAPE, dtype)
        return params

    def random_params(self, seed: int = 2, dtype: Any = jnp.float32) -> dict[str, Any]:
        """Both factors random (B ≠ 0), for tests that need a generic point."""
        rng = np.random.default_rng(seed)
        params = self.init_params(seed, dtype)
        for name, (_, b_shape, _, _) in LAYOUT.items():
            params[name][B_KEY[name]] = jnp.asarray(rng.normal(size=b_shape) * 0.3, dtype)
        params["bias"] = jnp.asarray(rng.normal(size=BIAS_SHAPE) * 0.1, dtype)
        return params

    def loss_with_probes(self, params: dict[str, Any], probes: dict[str, Any]) -> jax.Array:
        total = jnp.zeros((), _wide(jnp.result_type(float)))
        for name in LAYOUT:
            a = params[name][A_KEY[name]]
            b = params[name][B_KEY[name]]
            a, b = a.astype(_wide(a.dtype)), b.astype(_wide(b.dtype))
            w = self.scale * lowrank_product(a, b, _batch(name)) + probes[name]
            total = total + 0.5 * jnp.sum((w - self.targets[name]) ** 2)
        bias = params["bias"].astype(_wide(params["bias"].dtype))
        return total + 0.5 * jnp.sum((bias - self.bias_target) ** 2)

    def zero_probes(self) -> dict[str, jax.Array]:
        return {k: jnp.zeros_like(v) for k, v in self.targets.items()}

    def loss(self, params: dict[str, Any]) -> jax.Array:
        return self.loss_with_probes(params, self.zero_probes())

    def grads(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(gradients w.r.t. params in their dtypes, full-weight gradients tree).

        The full-gradient tree mirrors ``params`` with, at each pair's parent node,
        that pair's ``G`` (the base weight's shape); the bias position holds nothing.
        """
        return self._jitted_grads(params)

    @functools.cached_property
    def _jitted_grads(self):
        # Jitted once per problem: eager differentiation dispatches every op separately,
        # which costs seconds on an 8-device mesh.
        @jax.jit
        def grads(params):
            probes = self.zero_probes()
            g, g_full = jax.grad(self.loss_with_probes, argnums=(0, 1))(params, probes)
            g = jax.tree.map(lambda x, p: x.astype(p.dtype), g, params)
            return g, dict(g_full)

        return grads


def shard_params(params: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Places A/B over their non-rank axes (FSDP-style) and the bias over 'model'."""
    from jax.sharding import NamedSharding, PartitionSpec

    out: dict[str, Any] = {}
    for name, (_, _, a_spec, b_spec) in LAYOUT.items():
        out[name] = {
            A_KEY[name]: jax.device_put(
                params[name][A_KEY[name]], NamedSharding(mesh, PartitionSpec(*a_spec))
            ),
            B_KEY[name]: jax.device_put(
                params[name][B_KEY[name]], NamedSharding(mesh, PartitionSpec(*b_spec))
            ),
        }
    out["bias"] = jax.device_put(params["bias"], NamedSharding(mesh, PartitionSpec(*BIAS_SPEC)))
    return out


def factor_matrices(x: Any, batch_ndim: int, role: str) -> list[np.ndarray]:
    """Float64 2-D matrices of a factor, one per stacked-layer index.

    ``role="a"``: ``(*batch, *in, r) -> [m × r]``; ``role="b"``:
    ``(*batch, r, *out) -> [r × n]``; gradients of the factors read the same way.
    """
    x = np.asarray(x, np.float64)
    batch = x.shape[:batch_ndim]
    flat = x.reshape((-1,) + x.shape[batch_ndim:]) if batch_ndim else x[None]
    if role == "a":
        mats = [f.reshape(-1, f.shape[-1]) for f in flat]
    else:
        mats = [f.reshape(f.shape[0], -1) for f in flat]
    assert len(mats) == (int(np.prod(batch)) if batch_ndim else 1)
    return mats


def stack_matrices(mats: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`factor_matrices`: back to the factor's shape."""
    return np.stack(mats).reshape(shape)


def pair_batch(name: str) -> int:
    """Number of stacked-layer axes of a LAYOUT pair."""
    return _batch(name)
