"""LoRA-RITE's decoder-LM protocol (Yen et al., ICLR 2025, A.1, Tables 2–3) on the real
Gemma 3 270M: ``benchmarks/reproduce_lora_rite.py --model gemma3-270m`` runs this module.

* Model: the packaged pretrained Gemma 3 270M (``lora_optax.flax.gemma.load_gemma3``),
  LoRA rank 16, α 16 (s = α/r) on q / kv / o of all 18 layers (``targets="gemma3"``;
  tunix's k and v projections share one einsum, hence one pair), every layer computed
  in every step (no caching shortcut). ``--model tiny``: a random 2-layer Gemma with a
  byte tokenizer (tests, ``--dry-run``).
* Data: the LLM-Adapters instruction prompts (``--prompt-style compact``, the default:
  the same instruction and answer text without the template's generic first sentence;
  ``instruction`` keeps it), loss on the answer tokens with the LM head at those
  positions only (``gemma.answer_loss``), linear warm-up then linear decay.
* Evaluation: multiple choice by the summed log-likelihood of each candidate answer
  with the LM head (``gemma.make_choice_evaluator``), as the paper does.
* Protocol per (task, rank, optimizer): a learning-rate grid on a validation split
  carved from train (seed 0, ``--grid-steps`` each); the best rate is then trained
  with every seed for ``--steps`` steps and scored on the test questions. A zero-shot
  row (no training) per task.
* Cost: the model's forward + backward is compiled once per (task shape, full-gradient
  flag) for every optimizer, rate and seed (``make_train_step(share_grads=True)``); the
  peak learning rate lives in the optimizer state (``optax.inject_hyperparams`` plus a
  traced peak), so only each optimizer's update compiles, once.
* Faults: every run's record is saved to the JSON as it finishes and an orbax
  checkpoint of the run in progress every ``--ckpt-every`` steps; ``--resume`` skips
  finished runs and continues a cut-off run from its last checkpoint.

Writes ``benchmarks/results/<name>.json`` (a list of run records under ``"runs"``),
``<name>.md`` (our table beside the paper's) and PNGs (learning-rate sensitivity,
training-loss curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma3_report
import reproduce_lora_rite as base

import lora_optax as lox
from lora_optax import tasks
from lora_optax.tasks import lm

MODELS = ("gemma3-270m", "tiny")
TASKS = ("openbookqa", "arc_challenge")
PAPER_OPTIMIZERS = ("adamw", "lora_plus", "scaled_adamw", "lamb", "lora_rite")
OPTIONAL_OPTIMIZERS = ("ilora", "pilora", "lora_one", "solora_adamw")


@dataclasses.dataclass
class Config:
    """What is run; the defaults are issue 12's minimum protocol on this CPU."""

    model: str = "gemma3-270m"
    combos: tuple[tuple[str, int], ...] = (("openbookqa", 16), ("arc_challenge", 16))
    optimizers: tuple[str, ...] = PAPER_OPTIMIZERS
    grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    extend_grid: int = 1  # extra lr steps past an edge of the grid that wins
    seeds: tuple[int, ...] = (0, 1)
    grid_steps: int = 100
    steps: int = 200
    warmup_frac: float = 0.05  # the paper: 100 of 2000
    batch_size: int = 8
    eval_batch_size: int = 16
    max_len: int = 128  # cap; each task uses its train prompts' 98th percentile
    prompt_style: str = "compact"
    alpha: float = 16.0
    val_size: int = 200
    test_size: int = 300
    split_seed: int = 0
    weight_decay: float = 0.0  # A.1
    lora_plus_ratio: float = 4.0  # the paper's decoder runs
    zero_shot: bool = True

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for t, _ in self.combos))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tup(v) for k, v in d.items() if k in cls.__dataclass_fields__})


# Fields that must agree for --resume to reuse runs.
RESUME_KEYS = (
    "model",
    "grid_steps",
    "steps",
    "warmup_frac",
    "batch_size",
    "max_len",
    "prompt_style",
    "alpha",
    "val_size",
    "test_size",
    "split_seed",
    "weight_decay",
    "lora_plus_ratio",
)

QUICK = dict(
    combos=(("openbookqa", 16),),
    optimizers=("adamw", "lora_rite"),
    grid=(3e-4, 1e-3),
    extend_grid=0,
    seeds=(0, 1),
    grid_steps=2,
    steps=3,
    batch_size=2,
    eval_batch_size=8,
    max_len=96,
    val_size=8,
    test_size=16,
)
DRY_RUN = dict(QUICK, model="tiny", val_size=4, test_size=4, max_len=48, eval_batch_size=4)


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Record:
    """One run: a grid point (``split="val"``), a test run, or the zero-shot row."""

    model: str
    task: str
    rank: int
    optimizer: str
    lr: float
    seed: int
    split: str
    accuracy: float | None
    steps: int
    lora_layers: int
    stage: str  # "grid" | "final" | "zero_shot"
    accuracy_norm: float | None = None
    questions: int = 0
    correct: list[int] = dataclasses.field(default_factory=list)  # per question, 0/1
    losses: list[float] = dataclasses.field(default_factory=list)
    diverged: bool = False
    train_s: float = 0.0
    first_step_s: float = 0.0
    eval_s: float = 0.0
    load1: float = 0.0
    batch_size: int = 0
    seq_len: int = 0
    resumed_from_step: int = 0

    def key(self) -> tuple:
        return (self.task, self.rank, self.optimizer, self.lr, self.seed, self.stage)

    @property
    def step_s(self) -> float:
        n = len(self.losses) - self.resumed_from_step - 1
        return (self.train_s - self.first_step_s) / n if n > 0 else float("nan")


# --------------------------------------------------------------------------- optimizer


class PeakState(NamedTuple):
    inner: Any  # optax.InjectHyperparamsState
    peak: jax.Array


def scheduled(make: Callable[[Any], optax.GradientTransformation], steps: int, warmup: int):
    """``make(lr)`` under a linear warm-up / linear decay of a traced peak rate.

    The peak is part of the state (set per run by :func:`with_peak`), and the rate of
    the step is computed inside the update, so one compiled update serves every
    learning rate and seed.
    """
    tx = optax.inject_hyperparams(lambda learning_rate: make(learning_rate))(learning_rate=0.0)
    shape = base.peak_schedule(steps, warmup)

    def init(params):
        return PeakState(tx.init(params), jnp.zeros([], jnp.float32))

    def update(updates, state, params=None, **extra):
        inner = state.inner
        lr = (state.peak * shape(inner.count)).astype(jnp.float32)
        inner = inner._replace(hyperparams={**inner.hyperparams, "learning_rate": lr})
        updates, inner = tx.update(updates, inner, params, **extra)
        return updates, PeakState(inner, state.peak)

    return optax.GradientTransformationExtraArgs(init, update)


def optimizer_factory(name: str, cfg: Config, pairs: Any) -> Callable[[Any], Any]:
    """``make(lr)`` for registry optimizer ``name`` with the A.1 settings."""
    spec = lox.OPTIMIZERS[name]
    settings = {"weight_decay": cfg.weight_decay, "ratio": cfg.lora_plus_ratio}
    kw = {k: v for k, v in settings.items() if k in spec.defaults}
    if spec.lora:
        kw["pairs"] = pairs

    def make(lr):
        return spec.factory(lr, **kw)

    return make


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class TaskData:
    task: str
    train: list[tasks.Example]
    val: list[tasks.Example]
    test: list[tasks.Example]
    seq_len: int
    num_targets: int
    collate: Callable[[list[tasks.Example]], dict[str, np.ndarray]]
    info: dict[str, Any]


def load_task(data_dir: Path, task: str, cfg: Config, tok: Any) -> TaskData:
    """Train / validation (carved from train) / test subset, and the training collate.

    The row length is the 98th percentile of the tokenised train rows (prompt + answer
    + EOS), rounded up to 16 and capped at ``cfg.max_len``; longer prompts lose tokens
    on the left (the instruction's fixed opening first)."""
    full = tasks.load_llm_adapters(data_dir, task, "train")
    test = tasks.load_llm_adapters(data_dir, task, "test")
    train, val = tasks.train_validation_split(full, cfg.val_size, seed=cfg.split_seed)
    if cfg.test_size and cfg.test_size < len(test):
        idx = np.random.default_rng([cfg.split_seed, 2]).permutation(len(test))[: cfg.test_size]
        test = [test[i] for i in sorted(idx)]
    if not train or not val or not test:
        raise SystemExit(f"{task}: empty split under {data_dir} (val_size {cfg.val_size}?)")
    pairs = [lm.prompt_and_target(ex, cfg.prompt_style) for ex in train[:2000]]
    lengths = [len(tok.encode(p)) + len(tok.encode(t)) + 2 for p, t in pairs]
    seq_len = min(cfg.max_len, lm.round_up(int(np.percentile(lengths, 98)), 16))
    answer = max(len(tok.encode(t)) for _, t in pairs)
    num_targets = lm.round_up(min(answer + 1, seq_len - 1))
    info = {
        "seq_len": seq_len,
        "truncated_rows_pct": float(100 * np.mean(np.asarray(lengths) > seq_len)),
        "num_targets": num_targets,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "chance_pct": float(100 * np.mean([1 / ex.num_choices for ex in test])),
    }
    collate = lm.make_train_collate(tok, seq_len, num_targets, cfg.prompt_style)
    return TaskData(task, train, val, test, seq_len, num_targets, collate, info)


# --------------------------------------------------------------------------- model


class Bench:
    """The model with LoRA per rank, the seeds' initial LoRA factors, evaluators and
    the train-step objects (one per (task, rank, optimizer): its update compiles once)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.base, self.tok = self._load()
        self.models: dict[int, Any] = {}
        self.inits: dict[tuple, Any] = {}
        self.steps: dict[tuple, Any] = {}
        self.evaluators: dict[tuple, Callable] = {}

    def _load(self):
        from lora_optax.flax import gemma

        if self.cfg.model == "tiny":
            from lora_optax.tasks.tokenizers import ByteTokenizer

            tok = ByteTokenizer()
            return gemma.tiny_model(0, num_embed=tok.vocab_size, num_layers=1), tok
        return gemma.load_gemma3()

    @property
    def num_layers(self) -> int:
        return int(self.base.config.num_layers)

    def model(self, rank: int) -> Any:
        if rank not in self.models:
            self.models[rank] = self._lora(rank, self.cfg.seeds[0])
        return self.models[rank]

    def _lora(self, rank: int, seed: int) -> Any:
        from flax import nnx

        from lora_optax.flax import apply_lora, gemma

        sample = np.full((1, 8), self.tok.bos_id, np.int32)
        return apply_lora(
            self.base,
            targets="gemma" if self.cfg.model == "tiny" else "gemma3",
            rank=rank,
            alpha=self.cfg.alpha,
            scale="alpha/r",
            rngs=nnx.Rngs(seed + 1),
            model_inputs=gemma.causal_inputs(sample, self.tok.pad_id),
        )

    def init_lora(self, rank: int, seed: int) -> Any:
        """The seed's initial LoRA factors (A random, B = 0), as a pure dict."""
        from flax import nnx

        key = (rank, seed)
        if key not in self.inits:
            m = self.model(rank) if seed == self.cfg.seeds[0] else self._lora(rank, seed)
            self.inits[key] = jax.device_get(nnx.to_pure_dict(nnx.state(m, nnx.LoRAParam)))
        return self.inits[key]

    def evaluator(self, data: TaskData, split: str) -> Callable:
        from lora_optax.flax import gemma

        key = (data.task, split)
        if key not in self.evaluators:
            self.evaluators[key] = gemma.make_choice_evaluator(
                self.tok,
                getattr(data, split),
                style=self.cfg.prompt_style,
                batch_size=self.cfg.eval_batch_size,
                window=getattr(self.base.config, "sliding_window_size", None),
                per_question=True,
            )
        return self.evaluators[key]

    def step_for(self, data: TaskData, rank: int, name: str) -> tuple[Any, Any]:
        """``(train_step, tx)`` of optimizer ``name`` on this task's schedule."""
        from lora_optax.flax import gemma, make_train_step, pair_spec

        key = (data.task, rank, name)
        if key not in self.steps:
            cfg = self.cfg
            spec = lox.OPTIMIZERS[name]
            make = optimizer_factory(name, cfg, pair_spec(self.model(rank)))
            txs = {
                stage: scheduled(make, n, max(1, round(cfg.warmup_frac * n)))
                for stage, n in (("grid", cfg.grid_steps), ("final", cfg.steps))
            }
            step = make_train_step(
                gemma.answer_loss, full_grads=spec.needs_full_grads, share_grads=True
            )
            self.steps[key] = (step, txs)
        return self.steps[key]


def _device_put(tree: Any) -> Any:
    # committed arrays: the step's jit cache then matches its own outputs
    dev = jax.devices()[0]
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), dev), tree)


def _set_lora(model: Any, pure: Any) -> None:
    from flax import nnx

    state = nnx.state(model, nnx.LoRAParam)
    state.replace_by_pure_dict(_device_put(pure))
    nnx.update(model, state)


def lora_one_start(bench: Bench, data: TaskData, rank: int, seed: int) -> Any:
    """LoRA-One's spectral initialisation (full gradient averaged over 8 batches of the
    seed's data order, γ = 128, W unchanged), cached per (task, rank, seed)."""
    from flax import nnx

    from lora_optax.flax import gemma
    from lora_optax.flax.train import lora_one_init

    key = ("lora_one", data.task, rank, seed)
    if key not in bench.inits:
        model = bench.model(rank)
        _set_lora(model, bench.init_lora(rank, seed))
        it = tasks.DataIterator(data.train, bench.cfg.batch_size, seed=seed + 10_000)
        batches = [data.collate(next(it)) for _ in range(8)]
        lora_one_init(model, gemma.answer_loss, batches)
        bench.inits[key] = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    return bench.inits[key]


class Progress:
    """Prints progress with an estimate of the time left (measured step time)."""

    def __init__(self, total_steps: int, every: int = 25):
        self.total = total_steps
        self.done = 0
        self.every = every
        self.step_times: list[float] = []
        self.t0 = time.perf_counter()

    def tick(self, label: str, i: int, n: int, dt: float, loss: float) -> None:
        self.done += 1
        self.step_times.append(dt)
        if (i + 1) % self.every == 0 or i + 1 == n:
            med = float(np.median(self.step_times[-50:]))
            left = max(self.total - self.done, 0) * med
            print(
                f"    {label} step {i + 1}/{n} loss {loss:.3f} {med:.2f}s/step "
                f"[table: {self.done}/{self.total} steps, ~{left / 60:.0f} min of training left]",
                flush=True,
            )


def train_run(
    bench: Bench,
    data: TaskData,
    rank: int,
    name: str,
    *,
    lr: float,
    seed: int,
    stage: str,
    ckpt_dir: Path | None,
    ckpt_every: int,
    progress: Progress,
) -> Record:
    """One training run from the seed's initial factors, then its evaluation."""
    from flax import nnx

    cfg = bench.cfg
    split = "val" if stage == "grid" else "test"
    n = cfg.grid_steps if stage == "grid" else cfg.steps
    model = bench.model(rank)
    step, txs = bench.step_for(data, rank, name)
    tx = txs[stage]
    start = bench.init_lora(rank, seed)
    if name == "lora_one":
        start = lora_one_start(bench, data, rank, seed)
    _set_lora(model, start)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    opt_state = optimizer.opt_state
    opt_state.peak.set_value(jax.device_put(jnp.float32(lr), jax.devices()[0]))
    it = tasks.DataIterator(data.train, cfg.batch_size, seed=seed, collate=data.collate)
    losses: list[float] = []
    ckpt, begin = _open_checkpoint(ckpt_dir, model, optimizer, it, losses)
    diverged, first_s = False, 0.0
    label = f"{data.task} r{rank} {name} lr={lr:g} seed={seed} {stage}"
    t0 = time.perf_counter()
    for i in range(begin, n):
        ts = time.perf_counter()
        loss = float(step(model, optimizer, next(it))[0])
        losses.append(loss)
        dt = time.perf_counter() - ts
        if i == begin:
            first_s = dt
        progress.tick(label, i, n, dt, loss)
        if not math.isfinite(loss):
            diverged = True
            break
        if ckpt is not None and ckpt_every and (i + 1) % ckpt_every == 0 and i + 1 < n:
            ckpt.save(i + 1, model, optimizer, data=it.state(), extra={"losses": losses})
    train_s = time.perf_counter() - t0
    if ckpt is not None:
        ckpt.close()
    rec = Record(
        model=cfg.model,
        task=data.task,
        rank=rank,
        optimizer=name,
        lr=lr,
        seed=seed,
        split=split,
        accuracy=None,
        steps=n,
        lora_layers=bench.num_layers,
        stage=stage,
        losses=losses,
        diverged=diverged,
        train_s=train_s,
        first_step_s=first_s,
        batch_size=cfg.batch_size,
        seq_len=data.seq_len,
        resumed_from_step=begin,
    )
    if not diverged:
        evaluate_into(rec, bench.evaluator(data, split), model)
    return rec


def _open_checkpoint(ckpt_dir, model, optimizer, it, losses):
    """The run's checkpointer (None without a directory) and the step to start at."""
    if ckpt_dir is None:
        return None, 0
    from lora_optax.flax.checkpoint import LoRACheckpointer

    ckpt = LoRACheckpointer(str(ckpt_dir), max_to_keep=1)
    if ckpt.latest_step() is None:
        return ckpt, 0
    meta = ckpt.restore(model, optimizer)
    it.restore(meta["data"])
    losses.extend(meta["extra"]["losses"])
    print(f"    resumed the cut-off run at step {meta['step']} ({ckpt_dir})", flush=True)
    return ckpt, int(meta["step"])


def evaluate_into(rec: Record, evaluate: Callable, model: Any) -> None:
    t = time.perf_counter()
    out = evaluate(model)
    rec.eval_s = time.perf_counter() - t
    rec.accuracy = 100.0 * float(out["accuracy"])
    rec.accuracy_norm = 100.0 * float(out["accuracy_norm"])
    rec.questions = int(out["eval_examples"])
    rec.correct = [int(c) for c in out.get("correct", [])]
    rec.load1 = os.getloadavg()[0]


# --------------------------------------------------------------------------- protocol


def pick_best(grid: Sequence[Record]) -> Record | None:
    """Highest validation accuracy; ties → lower final training loss → lower rate."""
    ok = [r for r in grid if r.accuracy is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.accuracy, -float(np.mean(r.losses[-10:])), -r.lr))


def next_rate(grid: Sequence[Record]) -> float | None:
    """One more grid step beyond the edge when the best rate is at an edge, else None."""
    best = pick_best(grid)
    return None if best is None else base.edge_extension([r.lr for r in grid], best.lr)


class Session:
    """Records of this invocation and of the resumed JSON; saves after every run."""

    def __init__(self, cfg: Config, args: argparse.Namespace, previous: list[Record]):
        self.cfg, self.args = cfg, args
        self.previous = {r.key(): r for r in previous}
        self.records: list[Record] = []
        self.task_info: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.prev_wall = args.prev_wall

    def elapsed(self) -> float:
        return self.prev_wall + time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        limit = self.args.max_wall_min
        if limit and time.perf_counter() - self.t0 > 60 * limit:
            print(f"--max-wall-min {limit} reached: no new runs (--resume continues)", flush=True)
            return True
        return False

    def find(self, key: tuple) -> Record | None:
        for r in self.records:
            if r.key() == key:
                return r
        return self.previous.get(key)

    def keep(self, rec: Record) -> None:
        """A finished record (resumed or of this invocation) that the table uses."""
        self.records = [r for r in self.records if r.key() != rec.key()] + [rec]

    def add(self, rec: Record) -> None:
        self.records = [r for r in self.records if r.key() != rec.key()] + [rec]
        acc = "—" if rec.accuracy is None else f"{rec.accuracy:.1f}"
        print(
            f"  done {rec.task} r{rec.rank} {rec.optimizer} lr={rec.lr:g} seed={rec.seed} "
            f"{rec.stage}: {rec.split} accuracy {acc} ({rec.questions} q) "
            f"train {rec.train_s:.0f}s ({rec.step_s:.2f}s/step) eval {rec.eval_s:.0f}s "
            f"load {rec.load1:.1f}{' DIVERGED' if rec.diverged else ''}",
            flush=True,
        )
        self.save()

    def all_records(self) -> list[Record]:
        mine = {r.key() for r in self.records}
        return self.records + [r for k, r in self.previous.items() if k not in mine]

    def save(self, final: bool = False) -> None:
        data = {
            "command": self.args.command,
            "config": dataclasses.asdict(self.cfg),
            "task_info": self.task_info,
            "hardware": base.hardware(),
            "budget_estimate": getattr(self.args, "estimate", None),
            "wall_s": self.elapsed() if final else None,
            "elapsed_s": self.elapsed(),
            "runs": [dataclasses.asdict(r) for r in self.all_records()],
        }
        path = self.args.out_dir / f"{self.args.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a stop never leaves a truncated json


def run_optimizer(session: Session, bench: Bench, data: TaskData, rank: int, name: str, progress):
    """Grid on validation (first seed), then the picked rate with every seed on test."""
    cfg = session.cfg

    def run(lr: float, seed: int, stage: str) -> Record:
        key = (data.task, rank, name, lr, seed, stage)
        rec = session.find(key)
        if rec is not None:
            session.keep(rec)
            return rec
        ckpt_dir = session.args.out_dir / f"{session.args.name}_ckpt" / "_".join(map(str, key))
        if not session.args.resume_path and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # a stale checkpoint of an earlier, unrelated run
        rec = train_run(
            bench,
            data,
            rank,
            name,
            lr=lr,
            seed=seed,
            stage=stage,
            ckpt_dir=ckpt_dir if session.args.ckpt_every else None,
            ckpt_every=session.args.ckpt_every,
            progress=progress,
        )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        session.add(rec)
        return rec

    grid = []
    for lr in cfg.grid:
        if session.out_of_time():
            return
        grid.append(run(lr, cfg.seeds[0], "grid"))
    for _ in range(cfg.extend_grid):
        nxt = next_rate(grid)
        if nxt is None:
            break
        grid.append(run(nxt, cfg.seeds[0], "grid"))
    best = pick_best(grid)
    if best is None:
        print(f"  {data.task} r{rank} {name}: every grid run diverged", flush=True)
        return
    for seed in cfg.seeds:
        if session.out_of_time():
            return
        run(best.lr, seed, "final")


def zero_shot(session: Session, bench: Bench, data: TaskData, rank: int) -> None:
    """The pretrained model (LoRA B = 0) on validation and test."""
    for split in ("val", "test"):
        key = (data.task, rank, "zero_shot", 0.0, 0, f"zero_shot_{split}")
        found = session.find(key)
        if found is not None:
            session.keep(found)
            continue
        model = bench.model(rank)
        _set_lora(model, bench.init_lora(rank, session.cfg.seeds[0]))
        rec = Record(
            model=session.cfg.model,
            task=data.task,
            rank=rank,
            optimizer="zero_shot",
            lr=0.0,
            seed=0,
            split=split,
            accuracy=None,
            steps=0,
            lora_layers=bench.num_layers,
            stage=f"zero_shot_{split}",
            seq_len=data.seq_len,
        )
        evaluate_into(rec, bench.evaluator(data, split), model)
        session.add(rec)


# --------------------------------------------------------------------------- budget


def planned(cfg: Config) -> dict[str, int]:
    """Training steps and evaluated questions of the whole table (grid extensions
    counted as if every optimizer needed them: an upper bound)."""
    per_opt_steps = (len(cfg.grid) + cfg.extend_grid) * cfg.grid_steps + len(cfg.seeds) * cfg.steps
    n_opt = len(cfg.combos) * len(cfg.optimizers)
    q_val, q_test = cfg.val_size, cfg.test_size
    per_opt_q = (len(cfg.grid) + cfg.extend_grid) * q_val + len(cfg.seeds) * q_test
    return {
        "runs": n_opt * (len(cfg.grid) + cfg.extend_grid + len(cfg.seeds)),
        "steps": n_opt * per_opt_steps,
        "questions": n_opt * per_opt_q + len(cfg.combos) * (q_val + q_test) * cfg.zero_shot,
    }


def probe(bench: Bench, data: TaskData, rank: int, n: int = 3) -> dict[str, float]:
    """Compiles the model's step (shared by all later runs) and times ``n`` steps of
    AdamW on real batches; the LoRA factors are reset afterwards."""
    from flax import nnx

    model = bench.model(rank)
    step, txs = bench.step_for(data, rank, "adamw")
    _set_lora(model, bench.init_lora(rank, bench.cfg.seeds[0]))
    optimizer = nnx.Optimizer(model, txs["grid"], wrt=nnx.LoRAParam)
    it = tasks.DataIterator(data.train, bench.cfg.batch_size, seed=12345, collate=data.collate)
    t = time.perf_counter()
    float(step(model, optimizer, next(it))[0])
    first = time.perf_counter() - t
    times = []
    for _ in range(n):
        t = time.perf_counter()
        float(step(model, optimizer, next(it))[0])
        times.append(time.perf_counter() - t)
    _set_lora(model, bench.init_lora(rank, bench.cfg.seeds[0]))
    return {"first_step_s": first, "step_s": float(np.median(times))}


def estimate(cfg: Config, step_s: float, question_s: float, compile_s: float) -> dict:
    plan = planned(cfg)
    n_updates = len(cfg.combos) * len(cfg.optimizers)
    total = plan["steps"] * step_s + plan["questions"] * question_s + n_updates * compile_s
    return {
        **plan,
        "step_s": step_s,
        "question_s": question_s,
        "update_compile_s_assumed": compile_s,
        "estimated_min": total / 60,
        "load": open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "",
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", choices=MODELS)
    p.add_argument("--data", type=Path, default=None, help="LLM-Adapters folder")
    p.add_argument("--quick", action="store_true", help="≤ 5 min: packaged OBQA slice")
    p.add_argument("--dry-run", action="store_true", help="random tiny Gemma, seconds")
    p.add_argument("--combos", default=None, help="comma list of task:rank")
    p.add_argument("--optimizers", default=None, help="comma list (registry names)")
    p.add_argument("--grid", default=None, help="comma list of peak learning rates")
    p.add_argument("--seeds", default=None)
    for f in ("grid_steps", "steps", "batch_size", "eval_batch_size", "max_len", "val_size"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--extend-grid", type=int, default=None)
    p.add_argument("--prompt-style", default=None, choices=["compact", "instruction"])
    p.add_argument("--no-zero-shot", action="store_true")
    p.add_argument("--out-dir", type=Path, default=base.RESULTS)
    p.add_argument("--name", default=None, help="output stem (default from the model)")
    p.add_argument(
        "--resume",
        dest="resume_path",
        type=Path,
        default=None,
        nargs="?",
        const=Path("-"),
        help="continue the saved json (default: <name>.json)",
    )
    p.add_argument("--ckpt-every", type=int, default=50, help="0: no run checkpoints")
    p.add_argument("--max-wall-min", type=float, default=0, help="start no run after this")
    p.add_argument("--estimate-only", action="store_true", help="print the budget, stop")
    p.add_argument("--report-only", action="store_true", help="redraw md/png from the json")
    args = p.parse_args(argv)
    preset = DRY_RUN if args.dry_run else QUICK if args.quick else {}
    cfg = Config(**preset)  # type: ignore[arg-type]
    if not args.dry_run:
        cfg = dataclasses.replace(cfg, model=args.model)
    conv = {"optimizers": str, "grid": float, "seeds": int}
    for f, c in conv.items():
        v = getattr(args, f)
        if v:
            cfg = dataclasses.replace(cfg, **{f: tuple(c(x) for x in v.split(","))})
    if args.combos:
        combos = tuple((t, int(r)) for t, r in (c.split(":") for c in args.combos.split(",")))
        cfg = dataclasses.replace(cfg, combos=combos)
    for f in (
        "grid_steps",
        "steps",
        "batch_size",
        "eval_batch_size",
        "max_len",
        "val_size",
        "test_size",
        "extend_grid",
        "prompt_style",
    ):
        if getattr(args, f) is not None:
            cfg = dataclasses.replace(cfg, **{f: getattr(args, f)})
    if args.no_zero_shot:
        cfg = dataclasses.replace(cfg, zero_shot=False)
    for t in cfg.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r} (choose from {TASKS})")
    unknown = [o for o in cfg.optimizers if o not in lox.OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizers {unknown} (registry: {sorted(lox.OPTIMIZERS)})")
    if args.data is None:
        if args.quick or args.dry_run or cfg.tasks == ("openbookqa",):
            args.data = tasks.packaged_data_dir()
        else:
            p.error("--data <LLM-Adapters folder> is needed (only OpenBookQA is packaged)")
    suffix = "_quick" if args.quick else "_dry_run" if args.dry_run else ""
    model_stem = "gemma3" if cfg.model == "gemma3-270m" else cfg.model
    args.name = args.name or f"reproduce_lora_rite_{model_stem}{suffix}"
    if args.resume_path == Path("-"):
        args.resume_path = args.out_dir / f"{args.name}.json"
    args.command = "python benchmarks/reproduce_lora_rite.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    return args, cfg


def load_previous(args: argparse.Namespace, cfg: Config) -> list[Record]:
    args.prev_wall = 0.0
    if args.resume_path is None or not args.resume_path.exists():
        return []
    prev = json.loads(args.resume_path.read_text())
    old = Config.from_dict(prev["config"])
    diff = [k for k in RESUME_KEYS if getattr(old, k) != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"--resume {args.resume_path}: the configuration differs in {diff}")
    args.prev_wall = float(prev.get("elapsed_s") or 0.0)
    fields = Record.__dataclass_fields__
    runs = [Record(**{k: v for k, v in r.items() if k in fields}) for r in prev["runs"]]
    print(f"resuming: {len(runs)} finished runs from {args.resume_path}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return gemma3_report.from_json(args.out_dir / f"{args.name}.json", args.out_dir, args.name)
    print(f"config: {cfg}\nload: {open('/proc/loadavg').read().strip()}", flush=True)
    session = Session(cfg, args, load_previous(args, cfg))
    bench = Bench(cfg)
    datas = {t: load_task(args.data, t, cfg, bench.tok) for t in cfg.tasks}
    for t, d in datas.items():
        session.task_info[t] = d.info
        print(f"[{t}] {d.info}", flush=True)
    first_task, first_rank = cfg.combos[0]
    if cfg.zero_shot:
        zero_shot(session, bench, datas[first_task], first_rank)
    zs = [r for r in session.records if r.stage.startswith("zero_shot") and r.eval_s > 0]
    question_s = sum(r.eval_s for r in zs) / max(sum(r.questions for r in zs), 1) if zs else 0.5
    timing = probe(bench, datas[first_task], first_rank)
    args.estimate = estimate(cfg, timing["step_s"], question_s, compile_s=timing["first_step_s"])
    args.estimate["probe"] = timing
    e = args.estimate
    print(
        f"budget: {e['runs']} runs, {e['steps']} train steps x {e['step_s']:.2f} s (measured, "
        f"batch {cfg.batch_size} x {datas[first_task].seq_len}), {e['questions']} questions x "
        f"{e['question_s']:.3f} s, {len(cfg.combos) * len(cfg.optimizers)} update compiles "
        f"(≤ {e['update_compile_s_assumed']:.0f} s each) → ~{e['estimated_min']:.0f} min "
        f"(load {e['load']})",
        flush=True,
    )
    if args.estimate_only:
        return 0
    progress = Progress(e["steps"])
    for task, rank in cfg.combos:
        data = datas[task]
        if cfg.zero_shot:
            zero_shot(session, bench, data, rank)
        for name in cfg.optimizers:
            run_optimizer(session, bench, data, rank, name, progress)
    session.save(final=True)
    ckpt_root = args.out_dir / f"{args.name}_ckpt"
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    recs = session.all_records()
    gemma3_report.write(
        recs,
        cfg,
        session.task_info,
        json.loads((args.out_dir / f"{args.name}.json").read_text()),
        args.out_dir,
        args.name,
    )
    print(f"wall {session.elapsed() / 60:.1f} min; wrote {args.out_dir / args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
