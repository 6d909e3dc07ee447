"""lora_optax: LoRA-specific optimizers as composable optax transformations."""

from lora_optax._src.full_grads import value_and_full_grads, zero_probes
from lora_optax._src.ilora import (
    ImbalanceRegularizationState,
    add_imbalance_regularization,
    ilora,
    pilora,
)
from lora_optax._src.lora_one import (
    SpectralInit,
    lora_one,
    scale_by_adam_uncorrected,
    spectral_init,
    spectral_init_pairs,
)
from lora_optax._src.lora_plus import lora_plus, scale_lora_b
from lora_optax._src.lora_pro import (
    ScaleByLoRAProAdamState,
    lora_pro,
    lora_pro_adamw,
    lora_pro_sgd,
    scale_by_lora_pro,
    scale_by_lora_pro_adam,
)
from lora_optax._src.lora_rite import (
    LoRARiteGroupState,
    ScaleByLoRARiteState,
    lora_rite,
    lora_rite_factor_state,
    lora_rite_groups,
    scale_by_lora_rite,
)
from lora_optax._src.pairs import (
    LeafIndex,
    LoRAPair,
    find_lora_pairs,
    full_grad_for_pair,
    label_tree,
    make_pair,
    pair_parent,
    resolve_pairs,
)
from lora_optax._src.registry import OPTIMIZERS, OptimizerSpec, get_optimizer
from lora_optax._src.riemannian import (
    scale_by_riemannian_preconditioner,
    scaled_adamw,
    scaled_sgd,
)
from lora_optax._src.sharding import state_shardings
from lora_optax._src.solora import (
    ScaleBySoLoRAState,
    scale_by_solora,
    solora_adamw,
    solora_sgd,
)
from lora_optax._version import __version__ as __version__

__all__ = [
    "OPTIMIZERS",
    "ImbalanceRegularizationState",
    "LeafIndex",
    "LoRAPair",
    "LoRARiteGroupState",
    "OptimizerSpec",
    "ScaleByLoRAProAdamState",
    "ScaleByLoRARiteState",
    "ScaleBySoLoRAState",
    "SpectralInit",
    "add_imbalance_regularization",
    "find_lora_pairs",
    "full_grad_for_pair",
    "get_optimizer",
    "ilora",
    "label_tree",
    "lora_one",
    "lora_plus",
    "lora_pro",
    "lora_pro_adamw",
    "lora_pro_sgd",
    "lora_rite",
    "lora_rite_factor_state",
    "lora_rite_groups",
    "make_pair",
    "pair_parent",
    "pilora",
    "resolve_pairs",
    "scale_by_adam_uncorrected",
    "scale_by_lora_pro",
    "scale_by_lora_pro_adam",
    "scale_by_lora_rite",
    "scale_by_riemannian_preconditioner",
    "scale_by_solora",
    "scale_lora_b",
    "scaled_adamw",
    "scaled_sgd",
    "solora_adamw",
    "solora_sgd",
    "spectral_init",
    "spectral_init_pairs",
    "state_shardings",
    "value_and_full_grads",
    "zero_probes",
]
