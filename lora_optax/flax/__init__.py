"""flax ``nnx`` integration: LoRA on models, train steps, checkpoints, export.

Optional extra (``pip install 'lora_optax[flax]'``: flax, orbax-checkpoint,
safetensors, qwix); not imported by :mod:`lora_optax` itself.

* :mod:`lora_optax.flax.lora` — :func:`apply_lora` (``nnx.Linear`` → :class:`ScaledLoRA`,
  einsum modules → qwix), scale conventions, :func:`lora_pairs` / :func:`pair_spec`.
* :mod:`lora_optax.flax.train` — :func:`make_train_step` (LoRA grads, optional
  full-weight grads in the same backward pass), meshes and shardings, LoRA-One init.
* :mod:`lora_optax.flax.checkpoint` — :class:`LoRACheckpointer` (orbax, bit-exact resume).
* :mod:`lora_optax.flax.export` — :func:`merge_lora`, PEFT-layout safetensors export.
* :mod:`lora_optax.flax.cli` — shared flags and loop of the ``examples/finetune_*``.
* :mod:`lora_optax.flax.tunix` — :class:`~lora_optax.flax.tunix.LoRAPeftTrainer`
  (tunix ``PeftTrainer`` that can pass ``full_grads=``, for SoLoRA) and
  :func:`~lora_optax.flax.tunix.peft_lora_one_init`; needs ``google-tunix``
  (``pip install 'lora_optax[gemma]'``), imported on first use of these names.
"""

from lora_optax.flax.checkpoint import LoRACheckpointer
from lora_optax.flax.export import (
    delta_weights,
    load_peft_adapter,
    merge_lora,
    peft_state_dict,
    save_peft_adapter,
)
from lora_optax.flax.lora import (
    SCALE_CONVENTIONS,
    TARGET_PRESETS,
    ScaledLoRA,
    apply_lora,
    lora_pairs,
    lora_scale,
    lora_scales,
    pair_spec,
    resolve_targets,
)
from lora_optax.flax.train import (
    FullGradPlan,
    average_full_grads,
    lora_one_init,
    make_eval_step,
    make_mesh,
    make_train_step,
    shard_batch,
    shard_model,
)

# Imported on first access, so that flax users without tunix are not affected.
_TUNIX_NAMES = ("LoRAPeftTrainer", "peft_loss_fn", "peft_lora_one_init")


def __getattr__(name: str):
    if name in _TUNIX_NAMES:
        try:
            from lora_optax.flax import tunix
        except ImportError as e:
            raise ImportError(
                f"lora_optax.flax.{name} needs google-tunix: pip install 'lora_optax[gemma]'."
            ) from e
        return getattr(tunix, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TUNIX_NAMES))


__all__ = [
    "SCALE_CONVENTIONS",
    "TARGET_PRESETS",
    "FullGradPlan",
    "LoRACheckpointer",
    "ScaledLoRA",
    "apply_lora",
    "average_full_grads",
    "delta_weights",
    "load_peft_adapter",
    "lora_one_init",
    "lora_pairs",
    "lora_scale",
    "lora_scales",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "merge_lora",
    "pair_spec",
    "peft_state_dict",
    "resolve_targets",
    "save_peft_adapter",
    "shard_batch",
    "shard_model",
]
