"""tunix ``PeftTrainer`` for the optimizers that need full-weight gradients.

Every optimizer of the library works in tunix's stock ``PeftTrainer`` (it builds
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and calls ``optimizer.update(model,
grads)``), except those whose ``update`` needs the gradient ``G = ∂L/∂W`` of the
frozen base weights as ``full_grads=`` (SoLoRA; LoRA-Pro optionally): the stock step
has no way to pass it. :class:`FullGradPeftTrainer` is ``PeftTrainer`` with a train
step that differentiates the LoRA factors and the base kernels of the LoRA layers in
the same backward pass (as :func:`lora_optax.flax.make_train_step` with
``full_grads=True``) and passes ``full_grads``; everything else (loop, jit, metrics,
checkpoints, hooks) is tunix's. Needs ``pip install 'lora_optax[gemma]'``.

Example::

    trainer = FullGradPeftTrainer(model, lora_optax.solora_adamw(1e-3, pairs=spec), config)
    trainer.with_loss_fn(loss_fn).train(batches)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax
from flax import nnx
from tunix.sft import peft_trainer

from lora_optax._src.pairs import LoRAPair
from lora_optax.flax.train import FullGradPlan, _grads

__all__ = ["FullGradPeftTrainer"]


class FullGradPeftTrainer(peft_trainer.PeftTrainer):
    """tunix ``PeftTrainer`` whose step also hands the optimizer ``full_grads=``.

    Args:
      model: the model with LoRA applied.
      optimizer: the optax transformation (e.g. :func:`lora_optax.solora_adamw`).
      training_config: tunix ``TrainingConfig``.
      pairs: the LoRA pairs (default: all pairs of ``model``).
      **kwargs: passed to ``PeftTrainer``.
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        training_config: Any,
        *,
        pairs: Sequence[LoRAPair] | None = None,
        **kwargs: Any,
    ):
        self._plan = FullGradPlan.from_model(model, pairs)
        super().__init__(model, optimizer, training_config, **kwargs)

    def _train_step(self, model: nnx.Module, optimizer: nnx.Optimizer, inputs: Any):
        inputs = self.gen_model_input_fn(inputs)

        def loss_fn(m, batch):
            return self.loss_fn(m, **batch)

        loss, aux, grads, full = _grads(
            model, loss_fn, inputs, has_aux=self._has_aux, plan=self._plan
        )
        lora_grads = nnx.state(grads, nnx.LoRAParam)
        optimizer.update(model, lora_grads, full_grads=full)
        return loss, aux, optax.global_norm(lora_grads)
