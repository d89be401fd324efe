"""Model library: ViT (with hybrids), MLP-Mixer, the published zoo and layout converters."""

from vit_jax.models.layout import is_stacked, stack_layers, unstack_layers
from vit_jax.models.mixer import MlpMixer
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
)

__all__ = [
    "AUGREG_NAMES",
    "DEFAULT_RESOLUTION",
    "MODEL_CONFIGS",
    "MlpMixer",
    "VisionTransformer",
    "count_params",
    "get_config",
    "get_model",
    "init_shapes",
    "is_stacked",
    "list_models",
    "sincos2d_posemb",
    "stack_layers",
    "unstack_layers",
]
