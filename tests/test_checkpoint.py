"""Orbax checkpoints of LoRA training (lora_optax.flax.checkpoint): bit-exact resume."""

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from flax import nnx

import lora_optax
from lora_optax import flax as lf
from lora_optax.flax import train
from lora_optax.flax.checkpoint import LoRACheckpointer
from lora_optax.tasks import DataIterator
from tests.flax_fixtures import Tiny, regression_loss

DATA = [
    (np.full((3, 5), i / 7.0, np.float32), np.full((3, 3), np.sin(i), np.float32))
    for i in range(11)
]


def collate(items):
    return tuple(np.stack(x) for x in zip(*items))


def fresh(mesh=None):
    model = lf.apply_lora(Tiny(rngs=nnx.Rngs(0)), targets=["q", "mlp"], rank=2, alpha=4.0)
    if mesh is not None:
        train.shard_model(model, mesh, [(r".*/q/base_module/kernel", jax.P(None, "model"))])
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        lora_optax.scaled_adamw(optax.linear_schedule(1e-2, 0.0, 20), pairs=lf.pair_spec(model)),
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


def run(model, opt, it, steps, step_fn):
    return [float(step_fn(model, opt, next(it))[0]) for _ in range(steps)]


@pytest.mark.parametrize("sharded", [False, True])
def test_resume_is_bit_exact(tmp_path, sharded):
    mesh = train.make_mesh({"data": 2, "model": 2}) if sharded else None
    step_fn = train.make_train_step(regression_loss, mesh=mesh)
    n, k = 3, 3
    # uninterrupted run
    model, opt = fresh(mesh)
    it = DataIterator(DATA, batch_size=4, seed=1, collate=collate)
    full = run(model, opt, it, n + k, step_fn)
    final = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam).to_pure_dict())
    # interrupted: n steps, save, k more (discarded)
    model, opt = fresh(mesh)
    it = DataIterator(DATA, batch_size=4, seed=1, collate=collate)
    first = run(model, opt, it, n, step_fn)
    ckpt = LoRACheckpointer(str(tmp_path / "ckpt"))
    ckpt.save(n, model, opt, data=it.state(), extra={"note": "x"})
    run(model, opt, it, k, step_fn)
    ckpt.close()
    # resume in a fresh process-like setting
    model, opt = fresh(mesh)
    ckpt = LoRACheckpointer(str(tmp_path / "ckpt"))
    assert ckpt.latest_step() == n
    meta = ckpt.restore(model, opt)
    assert meta["step"] == n and meta["extra"] == {"note": "x"}
    assert int(opt.step[...]) == n
    it = DataIterator(DATA, batch_size=4, seed=1, collate=collate)
    it.restore(meta["data"])
    resumed = run(model, opt, it, k, train.make_train_step(regression_loss, mesh=mesh))
    assert first + resumed == full
    got = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam).to_pure_dict())
    jax.tree.map(np.testing.assert_array_equal, got, final)
    if sharded:
        assert model.layers[0].q.lora_b[...].sharding.spec == jax.P(None, "model")
    ckpt.close()


def test_missing_checkpoint(tmp_path):
    model, opt = fresh()
    with pytest.raises(FileNotFoundError):
        LoRACheckpointer(str(tmp_path / "none")).restore(model, opt)
