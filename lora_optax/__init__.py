"""lora_optax: LoRA-specific optimizers as composable optax transformations."""

from lora_optax._src.lora_plus import lora_plus, scale_lora_b
from lora_optax._src.pairs import (
    LeafIndex,
    LoRAPair,
    find_lora_pairs,
    label_tree,
    make_pair,
    resolve_pairs,
)
from lora_optax._src.riemannian import (
    scale_by_riemannian_preconditioner,
    scaled_adamw,
    scaled_sgd,
)

__version__ = "0.1.0"

__all__ = [
    "LeafIndex",
    "LoRAPair",
    "find_lora_pairs",
    "label_tree",
    "lora_plus",
    "make_pair",
    "resolve_pairs",
    "scale_by_riemannian_preconditioner",
    "scale_lora_b",
    "scaled_adamw",
    "scaled_sgd",
]
