"""Which of our ViT's block and embedding options a foreign format can express.

The options (`num_registers`, `transformer.qk_norm`, `transformer.mlp_type`) belong to the model
config; a writer names the ones its format lacks in one error instead of dropping them.
"""

from __future__ import annotations

from typing import Any

from vit_jax.weights.errors import ConversionError

__all__ = ["check_options", "num_registers", "qk_norm", "swiglu"]


def num_registers(config: Any) -> int:
    """Register tokens of a model config (0 when the field is absent)."""
    return int(config.get("num_registers") or 0)


def qk_norm(config: Any) -> bool:
    """Whether queries and keys are LayerNormed (`transformer.qk_norm`)."""
    return bool((config.get("transformer") or {}).get("qk_norm") or False)


def swiglu(config: Any) -> bool:
    """Whether the MLP is SwiGLU (`transformer.mlp_type == 'swiglu'`)."""
    return ((config.get("transformer") or {}).get("mlp_type") or "gelu") == "swiglu"


def check_options(
    config: Any,
    target: str,
    *,
    registers: bool = False,
    query_key_norm: bool = False,
    swiglu_mlp: bool = False,
) -> None:
    """Raises naming every option of `config` that `target` cannot express."""
    problems = []
    if num_registers(config) and not registers:
        problems.append(f"{num_registers(config)} register tokens (num_registers)")
    if qk_norm(config) and not query_key_norm:
        problems.append("query/key norms (transformer.qk_norm)")
    if swiglu(config) and not swiglu_mlp:
        problems.append("a SwiGLU MLP (transformer.mlp_type='swiglu')")
    if problems:
        raise ConversionError(
            f"{target} cannot express {config.get('name') or 'this model'}: " + "; ".join(problems)
        )
