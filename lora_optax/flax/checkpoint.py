"""Orbax checkpoints of LoRA training: LoRA params, optimizer state, step, data position.

Only what training changes is saved (the LoRA factors, the ``nnx.Optimizer`` state
with its step counter) plus a JSON record (step, the data iterator's position —
``lora_optax.tasks.DataIterator.state()`` — and anything else you pass). The frozen
base weights are not saved: rebuild the model the same way (load the base weights,
:func:`lora_optax.flax.apply_lora`, :func:`~lora_optax.flax.train.shard_model`, a
fresh ``nnx.Optimizer``) and :func:`restore` into it. Arrays are restored with the
shardings of the target model/optimizer, so a resumed run continues bit-exactly
(same next batches, same updates).

Example::

    ckpt = LoRACheckpointer("/tmp/run/ckpt", max_to_keep=2)
    ckpt.save(step, model, optimizer, data=it.state())
    ...
    meta = ckpt.restore(model, optimizer)          # latest step
    it.restore(meta["data"])
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["LoRACheckpointer"]


def _trainable(model: nnx.Module, optimizer: nnx.Optimizer | None) -> dict[str, Any]:
    out = {"lora": nnx.state(model, nnx.LoRAParam).to_pure_dict()}
    if optimizer is not None:
        out["optimizer"] = nnx.state(optimizer).to_pure_dict()
    return out


def _abstract(tree: Any) -> Any:
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray | np.generic):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree.map(one, tree)


class LoRACheckpointer:
    """Saves and restores LoRA training state with an orbax ``CheckpointManager``.

    Args:
      directory: checkpoint root (created if missing); one sub-directory per step.
      max_to_keep: keep the newest ``max_to_keep`` checkpoints (``None``: all).
      async_save: let orbax write in the background (call :meth:`wait` or
        :meth:`close` before exiting).
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None``."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        *,
        data: Any = None,
        extra: dict[str, Any] | None = None,
        force: bool = True,
    ) -> bool:
        """Saves the LoRA params, optimizer state and a JSON record at ``step``.

        Args:
          step: the training step (number of updates done).
          model: the model (only its ``nnx.LoRAParam`` s are saved).
          optimizer: the ``nnx.Optimizer`` (whole state, including its step).
          data: the data position, e.g. ``DataIterator.state()`` (JSON-serialisable).
          extra: other JSON-serialisable values to keep (config, metrics).
          force: save even if the manager's save policy would skip this step.
        """
        ocp = self._ocp
        meta = {"step": int(step), "data": data, "extra": extra or {}}
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_trainable(model, optimizer)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        return bool(saved)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        *,
        step: int | None = None,
    ) -> dict[str, Any]:
        """Restores into ``model`` / ``optimizer`` in place; returns the JSON record.

        ``model`` and ``optimizer`` must have the structure of the saved ones (same
        LoRA targets, rank and optimizer); their current arrays give the shapes,
        dtypes and shardings to restore to.

        Returns:
          ``{"step": int, "data": <data position>, "extra": {...}}``.

        Raises:
          FileNotFoundError: when there is no checkpoint (at ``step``).
        """
        ocp = self._ocp
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        target = _trainable(model, optimizer)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        lora_state = nnx.state(model, nnx.LoRAParam)
        lora_state.replace_by_pure_dict(state["lora"])
        nnx.update(model, lora_state)
        if optimizer is not None:
            opt_state = nnx.state(optimizer)
            opt_state.replace_by_pure_dict(state["optimizer"])
            nnx.update(optimizer, opt_state)
        return dict(restored["meta"])
