"""A short LoRA fine-tune on CPU, comparing optimizers on the same problem.

A frozen two-layer MLP ("pretrained" random weights) gets LoRA adapters on both
layers; the task is to match a teacher whose weights differ from the base by a
low-rank change. Each optimizer starts from the same standard LoRA initialisation
(A random, B = 0) and the script prints the training loss as it goes down.

    python examples/demo.py [--steps 300] [--optimizers adamw,scaled_adamw,lora_rite]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import lora_optax as lox

D_IN, D_HIDDEN, D_OUT, RANK = 64, 128, 32, 4


def make_task(seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 8)
    base = {
        "fc1": {"kernel": jax.random.normal(k[0], (D_IN, D_HIDDEN)) / D_IN**0.5},
        "fc2": {"kernel": jax.random.normal(k[1], (D_HIDDEN, D_OUT)) / D_HIDDEN**0.5},
    }
    # The teacher differs from the base by a rank-2 change per layer.
    teacher = {
        "fc1": base["fc1"]["kernel"]
        + 0.5 * jax.random.normal(k[2], (D_IN, 2)) @ jax.random.normal(k[3], (2, D_HIDDEN)) / D_IN,
        "fc2": base["fc2"]["kernel"]
        + 0.5
        * jax.random.normal(k[4], (D_HIDDEN, 2))
        @ jax.random.normal(k[5], (2, D_OUT))
        / D_HIDDEN,
    }
    x = jax.random.normal(k[6], (512, D_IN))
    y = jnp.tanh(x @ teacher["fc1"]) @ teacher["fc2"]
    lora = {
        "fc1": {
            "lora_a": jax.random.normal(k[7], (D_IN, RANK)) / D_IN**0.5,
            "lora_b": jnp.zeros((RANK, D_HIDDEN)),
        },
        "fc2": {
            "lora_a": jax.random.normal(k[0], (D_HIDDEN, RANK)) / D_HIDDEN**0.5,
            "lora_b": jnp.zeros((RANK, D_OUT)),
        },
    }
    return base, lora, x, y


def forward(base, lora, x):
    h = x @ base["fc1"]["kernel"] + (x @ lora["fc1"]["lora_a"]) @ lora["fc1"]["lora_b"]
    h = jnp.tanh(h)
    return h @ base["fc2"]["kernel"] + (h @ lora["fc2"]["lora_a"]) @ lora["fc2"]["lora_b"]


def loss_fn(lora, base, x, y):
    return jnp.mean((forward(base, lora, x) - y) ** 2)


# Learning rates for this problem: adaptive (AdamW-type) and SGD-type optimizers. The
# optimizers themselves come from the registry, lora_optax.OPTIMIZERS.
ADAPTIVE_LR, SGD_LR = 3e-3, 0.3
DEFAULT = ("adamw", "scaled_adamw", "lora_rite")


def make_optimizer(name: str) -> optax.GradientTransformation:
    """The registry's optimizer ``name`` at this demo's learning rate, without weight
    decay (the teacher is exactly representable) and with the LoRA+ ratio 4."""
    spec = lox.OPTIMIZERS[name]
    if spec.needs_full_grads:
        raise SystemExit(f"{name} needs full-weight gradients, which this demo does not compute.")
    settings = {"weight_decay": 0.0, "ratio": 4.0}
    kwargs = {k: v for k, v in settings.items() if k in spec.defaults}
    return lox.get_optimizer(name, SGD_LR if spec.base == "sgd" else ADAPTIVE_LR, **kwargs)


def train(name: str, steps: int, report_every: int) -> list[float]:
    base, lora, x, y = make_task()
    tx = make_optimizer(name)
    state = tx.init(lora)

    @jax.jit
    def step(lora, state):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, x, y)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    losses = []
    start = time.perf_counter()
    for i in range(steps + 1):
        lora, state, loss = step(lora, state)
        if i % report_every == 0:
            losses.append(float(loss))
            print(f"  {name:>13s} step {i:4d}  loss {float(loss):.5f}")
    print(f"  {name:>13s} done in {time.perf_counter() - start:.1f}s")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report-every", type=int, default=50)
    names = sorted(n for n, spec in lox.OPTIMIZERS.items() if not spec.needs_full_grads)
    parser.add_argument("--optimizers", default=",".join(DEFAULT), help=f"from {names}")
    args = parser.parse_args()
    print(f"LoRA rank {RANK} on a frozen {D_IN}-{D_HIDDEN}-{D_OUT} MLP, jax {jax.__version__}")
    results = {}
    for name in args.optimizers.split(","):
        results[name] = train(name, args.steps, args.report_every)
    print("\nfinal loss / initial loss:")
    for name, losses in results.items():
        print(f"  {name:>13s}  {losses[0]:.5f} -> {losses[-1]:.5f}  ({losses[-1] / losses[0]:.3f})")


if __name__ == "__main__":
    main()
