"""Tiny nnx models shared by the flax integration tests."""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """nnx.Linear (q) plus two einsum layers of different layouts (kv: transposed)."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.q = nnx.Linear(d, 6, rngs=rngs)
        # weight (N, D, H): qwix LoRA A (D, r), B (r, N, H) -> G needs a transpose
        self.kv = nnx.Einsum("btd,ndh->btnh", (2, 6, 3), rngs=rngs)
        self.o = nnx.Einsum("btnh,nhd->btd", (2, 3, d), rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.kv(self.q(x)))
        return x + self.o(h) + 0.1 * self.mlp(x)


class Tiny(nnx.Module):
    def __init__(self, d: int = 5, layers: int = 2, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(d, rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


TARGETS = r"(?:.*/)?(?:q|kv|o)"


def example_input(batch: int = 4, seq: int = 3, d: int = 5, seed: int = 1):
    return jax.random.normal(jax.random.key(seed), (batch, seq, d))


def make_lora_model(
    *, rank: int = 2, alpha: float = 4.0, scale: str = "alpha/r", seed: int = 0, b_std: float = 0.0
):
    model = Tiny(rngs=nnx.Rngs(seed))
    b_init = nnx.initializers.normal(b_std) if b_std else None
    from lora_optax.flax import apply_lora

    return apply_lora(
        model,
        targets=TARGETS,
        rank=rank,
        alpha=alpha,
        scale=scale,
        rngs=nnx.Rngs(seed + 1),
        model_inputs=(example_input(),),
        b_initializer=b_init,
    )


def regression_loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def regression_batch(seed: int = 0, batch: int = 8):
    x = example_input(batch=batch, seed=seed)
    y = jnp.sin(jnp.arange(3.0)) * jnp.ones((batch, 3, 3)) + 0.1 * x[..., :3]
    return x, y


def copy_model(model):
    """A clone with its own buffers (train steps donate theirs)."""
    clone = nnx.clone(model)
    nnx.update(clone, jax.tree.map(jnp.copy, nnx.state(clone)))
    return clone
