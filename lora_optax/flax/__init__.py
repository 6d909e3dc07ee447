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
