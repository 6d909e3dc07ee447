"""tunix ``PeftTrainer`` for lora_optax: full-weight gradients (SoLoRA), LoRA-One's init.

tunix's :class:`tunix.sft.peft_trainer.PeftTrainer` takes any optax transformation,
so most optimizers of the library plug in unchanged. :class:`LoRAPeftTrainer` is a
``PeftTrainer`` with two additions:

* ``full_grads=True``: SoLoRA (:func:`lora_optax.solora_sgd`,
  :func:`lora_optax.solora_adamw`) also needs ``G = ∂L/∂W`` of the frozen base weight
  of every LoRA pair, passed as ``update(..., full_grads=G)``, which tunix's train
  step does not compute. The train step then differentiates the LoRA factors and the
  base kernels of the LoRA layers in the same backward pass
  (:class:`lora_optax.flax.FullGradPlan`) and passes ``full_grads=``.
* resuming on a mesh with an optimizer whose state holds no sharded array (SGD-type:
  :func:`lora_optax.scaled_sgd`, :func:`lora_optax.lora_pro_sgd`, ``solora_sgd``, and
  ``optax.sgd`` itself): tunix 0.1.7 restores such a state's counters to one device,
  and its first train step then fails ("Received incompatible devices for jitted
  computation"). The trainer replicates them onto the mesh first.

With ``gradient_accumulation_steps=k`` tunix wraps the optimizer in
:class:`optax.MultiSteps`, which averages the LoRA gradients of ``k`` micro-batches
but hands the inner optimizer only the extra arguments of the last one. The trainer
therefore keeps a running sum of ``G`` (one float32 buffer per LoRA layer, the size
of its base kernel, sharded like it) and passes the mean over the ``k`` micro-batches,
so that an accumulated step equals one step on the whole batch.

:func:`peft_lora_one_init` runs LoRA-One's spectral initialisation
(:func:`lora_optax.flax.lora_one_init`) with tunix's loss conventions; call it before
building the trainer.

Written against ``google-tunix`` 0.1.7 (its ``PeftTrainer._train_step(model,
optimizer, inputs)``); other versions get a clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tunix.sft import peft_trainer

from lora_optax._src.pairs import LoRAPair
from lora_optax.flax.lora import flat_paths
from lora_optax.flax.train import FullGradPlan, commit_arrays, lora_one_init, replicate_onto_mesh

__all__ = ["LoRAPeftTrainer", "peft_loss_fn", "peft_lora_one_init"]

_TRAIN_STEP_ARGS = ["self", "model", "optimizer", "inputs"]


class FullGradSum(nnx.Variable):
    """Running sum of the full-weight gradients of the current accumulation window.

    Not an ``nnx.optimizer.OptState``: tunix checkpoints only those, and it saves at
    update boundaries, where this sum is zero.
    """


def _check_tunix_api() -> None:
    args = list(inspect.signature(peft_trainer.PeftTrainer._train_step).parameters)
    if args != _TRAIN_STEP_ARGS:
        import tunix

        version = getattr(tunix, "__version__", "unknown")
        raise RuntimeError(
            "LoRAPeftTrainer(full_grads=True) supports google-tunix 0.1.7, whose "
            f"PeftTrainer._train_step takes {tuple(_TRAIN_STEP_ARGS[1:])}; the installed "
            f"tunix {version} takes {tuple(args[1:])}. Install google-tunix==0.1.7, or "
            "train with lora_optax.flax.make_train_step(loss_fn, full_grads=True)."
        )


class LoRAPeftTrainer(peft_trainer.PeftTrainer):
    """A tunix ``PeftTrainer`` that can pass ``full_grads=`` to the optimizer.

    With ``full_grads=True`` use it for :func:`lora_optax.solora_sgd` /
    :func:`lora_optax.solora_adamw` (any optimizer whose ``update`` reads
    ``full_grads``); the extra cost per step is the gradients of the LoRA layers' base
    kernels (no second forward or backward pass). Everything else of ``PeftTrainer``
    (checkpoints, gradient accumulation, metrics, meshes, hooks) is unchanged, except
    that optimizer arrays restored to a single device are replicated onto the mesh
    (see the module docstring), and that without a mesh the model's and the
    optimizer's arrays are committed to their device before the first step, so the
    step compiles once (tunix's own trainer compiles it twice when the model's arrays
    are committed, e.g. after :func:`lora_optax.flax.make_train_step`, and a fresh
    optimizer state is not).

    Args:
      model: a model with LoRA factors (:func:`lora_optax.flax.apply_lora`, or qwix
        directly); its base weights stay frozen.
      optimizer: the optax transformation; build it with
        ``pairs=lora_optax.flax.pair_spec(model)`` so that it sees the model's LoRA
        scale (with :func:`optax.inject_hyperparams`, pass
        ``static_args=("pairs",)``: a callable hyperparameter is otherwise taken
        for a schedule).
      training_config: tunix's ``TrainingConfig``.
      full_grads: compute the full-weight gradients and pass them as
        ``update(..., full_grads=...)``.
      pairs: the LoRA pairs (default: :func:`lora_optax.flax.lora_pairs` of ``model``).
      **kwargs: passed on to ``PeftTrainer`` (``metrics_logger``, tracers).

    Raises:
      ValueError: with ``full_grads=True``, when ``model`` has no LoRA parameters.
      RuntimeError: on a tunix version whose train step this class does not know.

    Example::

        from tunix.sft import peft_trainer
        import lora_optax
        from lora_optax import flax as lf

        tx = lora_optax.solora_adamw(1e-3, pairs=lf.pair_spec(model))
        config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=1000)
        trainer = lf.LoRAPeftTrainer(model, tx, config, full_grads=True)
        trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
        trainer.train(train_ds)
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        training_config: peft_trainer.TrainingConfig,
        *,
        full_grads: bool = False,
        pairs: Sequence[LoRAPair] | None = None,
        **kwargs: Any,
    ):
        self._full_grad_plan: FullGradPlan | None = None
        if full_grads:
            _check_tunix_api()
            if not nnx.state(model, nnx.LoRAParam):
                raise ValueError(
                    "LoRAPeftTrainer(full_grads=True): the model has no nnx.LoRAParam; "
                    "add LoRA first (lora_optax.flax.apply_lora): full-weight gradients "
                    "are taken at the base weights of LoRA layers."
                )
            self._full_grad_plan = FullGradPlan.from_model(model, pairs)
        super().__init__(model, optimizer, training_config, **kwargs)
        self._accumulation_steps = training_config.get_with_default(
            "gradient_accumulation_steps", 1
        )
        if self._full_grad_plan is not None and self._accumulation_steps > 1:
            kernels = flat_paths(nnx.state(model, nnx.Param))
            self.optimizer.full_grad_sum = nnx.List(
                [
                    FullGradSum(_zeros_like_kernel(kernels[e.kernel_path]))
                    for e in self._full_grad_plan.entries
                ]
            )

    def _shard_optimizer(self, mesh: Any) -> None:
        if mesh.empty:
            # tunix places (and so commits) the state only on a mesh; a committed model
            # beside a fresh, uncommitted optimizer state compiles the step twice
            commit_arrays((self.model, self.optimizer))
        else:
            replicate_onto_mesh(self.optimizer, mesh)
        super()._shard_optimizer(mesh)

    def _train_step(self, model: nnx.Module, optimizer: nnx.Optimizer, inputs: Any) -> Any:
        plan = self._full_grad_plan
        if plan is None:
            return super()._train_step(model, optimizer, inputs)
        inputs = self.gen_model_input_fn(inputs)
        wrt = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, plan.filter()))
        grad_fn = nnx.value_and_grad(
            self.loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=self._has_aux
        )
        out, grads = grad_fn(model, **inputs)
        lora_grads = nnx.state(grads, nnx.LoRAParam)
        flat = flat_paths(grads)
        kernel_grads = {e.kernel_path: flat[e.kernel_path] for e in plan.entries}
        if self._accumulation_steps > 1:
            kernel_grads = self._accumulate(optimizer, kernel_grads)
        grad_norm = optax.global_norm(lora_grads)
        optimizer.update(model, lora_grads, full_grads=plan.full_grads(kernel_grads))
        if self._has_aux:
            loss, aux = out
            return loss, aux, grad_norm
        return out, None, grad_norm

    def _accumulate(self, optimizer: nnx.Optimizer, kernel_grads: dict) -> dict:
        """Mean ``G`` of this accumulation window so far; resets the sum at its end.

        ``optax.MultiSteps`` applies the inner update at the window's last
        micro-batch, where this is the mean over all ``k`` of them.
        """
        k = self._accumulation_steps
        last = optimizer.step[...] % k == k - 1
        means = {}
        assert self._full_grad_plan is not None
        sums = optimizer.full_grad_sum  # type: ignore[attr-defined]  # set in __init__
        for entry, total in zip(self._full_grad_plan.entries, sums):
            acc = total[...] + kernel_grads[entry.kernel_path].astype(total.dtype)
            means[entry.kernel_path] = acc / k
            total[...] = jnp.where(last, jnp.zeros_like(acc), acc)
        return means


def _zeros_like_kernel(kernel: jax.Array) -> jax.Array:
    zeros = jnp.zeros(kernel.shape, jnp.promote_types(kernel.dtype, jnp.float32))
    sharding = getattr(kernel, "sharding", None)
    return jax.device_put(zeros, sharding) if sharding is not None else zeros


def peft_loss_fn(
    gen_model_input_fn: Callable[[Any], dict[str, Any]] | None = None,
    loss_fn: Callable[..., Any] | None = None,
) -> Callable[[nnx.Module, Any], Any]:
    """``(model, batch) -> loss`` from tunix's conventions, for the lora_optax.flax helpers.

    tunix calls ``loss_fn(model, **gen_model_input_fn(batch))``; the helpers of
    :mod:`lora_optax.flax.train` call ``loss_fn(model, batch)``.

    Args:
      gen_model_input_fn: the function given to ``with_gen_model_input_fn``
        (default: the identity, as in tunix).
      loss_fn: the function given to ``with_loss_fn`` (default: tunix's next-token
        cross-entropy).
    """
    gen = gen_model_input_fn or (lambda batch: batch)
    fn = loss_fn or peft_trainer._default_loss_fn

    def loss(model: nnx.Module, batch: Any) -> Any:
        return fn(model, **gen(batch))

    return loss


def peft_lora_one_init(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    gen_model_input_fn: Callable[[Any], dict[str, Any]] | None = None,
    loss_fn: Callable[..., Any] | None = None,
    has_aux: bool = False,
    **spectral_kwargs: Any,
) -> nnx.Module:
    """LoRA-One's spectral initialisation of ``model``, in place, with tunix's loss.

    :func:`lora_optax.flax.lora_one_init` on :func:`peft_loss_fn` (``batches``: a
    few training batches, as the trainer would see them). Call it BEFORE building
    the ``PeftTrainer``, then train with :func:`lora_optax.lora_one`.

    Resuming: tunix checkpoints only the LoRA factors. With
    ``preserve_output=True`` the init also shifts the frozen base weights
    (``W₀ ← W₀ − s A₀ B₀``), which are not in the checkpoint: run the same init (same
    batches; it is deterministic) on the rebuilt model before the resuming trainer
    restores the factors.

    Args:
      model: the LoRA model.
      batches: the batches whose mean full-weight gradient initialises the factors.
      gen_model_input_fn, loss_fn: as given to the trainer (see :func:`peft_loss_fn`).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **spectral_kwargs: ``gamma``, ``preserve_output``, ``method`` ... of
        :func:`lora_optax.spectral_init_pairs`.

    Returns:
      ``model``.
    """
    loss = peft_loss_fn(gen_model_input_fn, loss_fn)
    return lora_one_init(model, loss, batches, has_aux=has_aux, **spectral_kwargs)
