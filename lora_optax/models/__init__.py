"""Reference models in flax nnx for the LoRA examples and tests (optional extra: ``flax``).

Not imported by ``lora_optax``; import ``lora_optax.models`` explicitly (needs ``flax``,
``safetensors`` and, for tokenisation, ``tokenizers``).
"""
