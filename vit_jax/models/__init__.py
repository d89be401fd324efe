"""Model library: ViT (with hybrids), MLP-Mixer, the published zoo, the family table, layouts."""

from vit_jax.models.families import FAMILIES, get_family, known_families, register_family
from vit_jax.models.family import Family
from vit_jax.models.layout import is_stacked, stack_layers, unstack_layers
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.posemb import (
    RESAMPLE_METHODS,
    interpolation_matrix,
    resample_posemb,
    resample_posemb_bicubic,
)
from vit_jax.models.vit import VisionTransformer, sincos2d_posemb
from vit_jax.models.zoo import (
    AUGREG_NAMES,
    DEFAULT_RESOLUTION,
    MODEL_CONFIGS,
    count_params,
    get_config,
    get_model,
    init_shapes,
    list_models,
    logical_axes,
    no_decay_patterns,
    num_posemb_prefix_tokens,
    num_prefix_tokens,
    position_table_grid,
    scan_block,
    stored_config,
    stride,
    token_grid,
)

__all__ = [
    "AUGREG_NAMES",
    "DEFAULT_RESOLUTION",
    "FAMILIES",
    "MODEL_CONFIGS",
    "RESAMPLE_METHODS",
    "Family",
    "MlpMixer",
    "VisionTransformer",
    "count_params",
    "get_config",
    "get_family",
    "get_model",
    "init_shapes",
    "interpolation_matrix",
    "is_stacked",
    "known_families",
    "list_models",
    "logical_axes",
    "no_decay_patterns",
    "num_posemb_prefix_tokens",
    "num_prefix_tokens",
    "position_table_grid",
    "register_family",
    "resample_posemb",
    "resample_posemb_bicubic",
    "scan_block",
    "sincos2d_posemb",
    "stack_layers",
    "stored_config",
    "stride",
    "token_grid",
    "unstack_layers",
]
