"""Parity with PEFT's LoRA optimizers on a real PEFT LoRA model, in float64.

PEFT's ``create_riemannian_optimizer`` (Riemannian preconditioner in front of a torch
optimizer) with ``torch.optim.AdamW`` / ``torch.optim.SGD``, and its
``create_loraplus_optimizer`` with ``torch.optim.AdamW``, train a two-layer torch model
with PEFT LoRA adapters for 20 steps. The same model in JAX (frozen base weights, our
``(A, B)`` layout) trained with ``scaled_adamw``, ``scaled_sgd`` and ``lora_plus`` must
give the same LoRA factors after every step.

Layout: PEFT's ``lora_A.weight`` is ``(r, in) = Aᵀ`` and ``lora_B.weight`` is
``(out, r) = Bᵀ``; here ``A`` is ``(in, r)``, ``B`` is ``(r, out)`` and ``ΔW = s·A B``
with ``s = lora_alpha / r``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import jax
import jax.numpy as jnp
import optax
import peft
import torch
from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer

import lora_optax

STEPS = 20
RANK, ALPHA = 3, 6
IN, HIDDEN, OUT, BATCH = 7, 9, 5, 16
LAYERS = ("0", "2")  # the two Linear layers of the torch Sequential
TOL = 1e-14


def _peft_model(seed: int = 0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    ).double()
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(LAYERS)
    )
    model = peft.get_peft_model(base, config)
    # B ≠ 0 from the first step (PEFT initialises B = 0), so every step moves both factors.
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name in LAYERS:
            layer = model.base_model.model[int(name)]
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.copy_(torch.from_numpy(rng.normal(0.0, 0.5, tuple(weight.shape))))
    return model


def _layers(model):
    return [model.base_model.model[int(name)] for name in LAYERS]


def _lora_tree(model) -> dict:
    """PEFT's LoRA weights in our layout: ``A = lora_A.weightᵀ``, ``B = lora_B.weightᵀ``."""
    return {
        f"layer{name}": {
            "lora_a": layer.lora_A["default"].weight.detach().numpy().T.copy(),
            "lora_b": layer.lora_B["default"].weight.detach().numpy().T.copy(),
        }
        for name, layer in zip(LAYERS, _layers(model))
    }


def _data(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(BATCH, IN)), rng.normal(size=(BATCH, OUT))


def _train_peft(make_optimizer) -> list[dict]:
    model = _peft_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), trainable
    x, y = (torch.from_numpy(v) for v in _data())
    optimizer = make_optimizer(model)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        optimizer.step()
        history.append(_lora_tree(model))
    return history


def _train_ours(tx) -> list[dict]:
    model = _peft_model()
    frozen = [
        (
            jnp.asarray(layer.base_layer.weight.detach().numpy()),
            jnp.asarray(layer.base_layer.bias.detach().numpy()),
        )
        for layer in _layers(model)
    ]
    scale = ALPHA / RANK
    x, y = (jnp.asarray(v) for v in _data())

    def loss_fn(params):
        h = x
        for i, (name, (w, b)) in enumerate(zip(LAYERS, frozen)):
            pair = params[f"layer{name}"]
            # torch Linear: h Wᵀ + b; LoRA adds s·h A B
            h = h @ w.T + b + scale * (h @ pair["lora_a"]) @ pair["lora_b"]
            if i == 0:
                h = jnp.tanh(h)
        return jnp.mean((h - y) ** 2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.asarray, _lora_tree(model))
    assert jax.tree.leaves(params)[0].dtype == jnp.float64
    state = tx.init(params)
    history = []
    for _ in range(STEPS):
        params, state = step(params, state)
        history.append(jax.tree.map(np.asarray, params))
    return history


def _max_diffs(ours: list[dict], theirs: list[dict]) -> tuple[float, float, float]:
    """Max abs difference, max difference relative to the leaf's size, and max movement."""
    abs_diff = rel_diff = moved = 0.0
    start = _lora_tree(_peft_model())
    for mine, ref in zip(ours, theirs):
        for a, b, s in zip(jax.tree.leaves(mine), jax.tree.leaves(ref), jax.tree.leaves(start)):
            assert a.shape == b.shape
            d = float(np.max(np.abs(a - b)))
            abs_diff = max(abs_diff, d)
            rel_diff = max(rel_diff, d / float(np.max(np.abs(b))))
            moved = max(moved, float(np.max(np.abs(b - s))))
    return abs_diff, rel_diff, moved


LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
REG = 1e-2  # PEFT's default damping `reg`; ours is `delta`


def _peft_riemannian_adamw(weight_decay):
    return lambda model: create_riemannian_optimizer(
        model, torch.optim.AdamW, lr=LR, reg=REG, betas=BETAS, eps=EPS, weight_decay=weight_decay
    )


CASES = {
    "scaled_adamw": (
        _peft_riemannian_adamw(0.0),
        lambda: lora_optax.scaled_adamw(
            LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0, delta=REG
        ),
    ),
    "scaled_adamw_weight_decay": (
        _peft_riemannian_adamw(0.1),
        lambda: lora_optax.scaled_adamw(
            LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.1, delta=REG
        ),
    ),
    "scaled_sgd": (
        lambda model: create_riemannian_optimizer(model, torch.optim.SGD, lr=LR, reg=REG),
        lambda: lora_optax.scaled_sgd(LR, delta=REG),
    ),
    "lora_plus": (
        lambda model: create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=LR,
            loraplus_lr_ratio=16.0,
            betas=BETAS,
            eps=EPS,
            loraplus_weight_decay=0.1,
        ),
        lambda: lora_optax.lora_plus(
            LR, ratio=16.0, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.1
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_peft(name, x64):
    make_peft, make_ours = CASES[name]
    theirs = _train_peft(make_peft)
    ours = _train_ours(make_ours())
    abs_diff, rel_diff, moved = _max_diffs(ours, theirs)
    print(f"{name}: max abs diff {abs_diff:.2e}, max rel diff {rel_diff:.2e}, moved {moved:.2e}")
    assert moved > 1e-2, "the factors barely moved: the comparison would say nothing"
    assert abs_diff <= TOL and rel_diff <= TOL, (abs_diff, rel_diff)


WRONG = {
    # plain AdamW: the preconditioner is visible at this tolerance
    "scaled_adamw": lambda: optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0),
    # a wrong B/A learning-rate ratio is visible too
    "lora_plus": lambda: lora_optax.lora_plus(
        LR, ratio=8.0, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.1
    ),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_comparison_detects_a_different_optimizer(name, x64):
    theirs = _train_peft(CASES[name][0])
    ours = _train_ours(WRONG[name]())
    assert _max_diffs(ours, theirs)[0] > 1e-4
