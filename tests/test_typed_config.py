"""models/typed_config.py: an option's declaration is the only place its type, default, choices
and config path are written; the config template, the module's fields and the accessors that
read stored configs all come from it."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from vit_jax.models import typed_config
from vit_jax.models.typed_config import option


@dataclasses.dataclass(frozen=True)
class _Block(typed_config.Options):
    heads: int = option(doc="attention heads", at="transformer.num_heads")
    mlp: str = option("gelu", "MLP kind", at="transformer.mlp_type", choices=("gelu", "swiglu"))
    scale: float | None = option(None, "LayerScale init", at="transformer.layer_scale_init")


@dataclasses.dataclass
class _Module:
    block: _Block
    width: int = option(doc="token width", at="hidden_size")
    patch: tuple[int, int] = option(16, "patch size", at="patches.size")


SCHEMA = typed_config.Schema(_Module, base={"name": None})


def test_the_template_comes_from_the_declarations():
    assert SCHEMA.defaults == {
        "name": None,
        "hidden_size": None,  # required: set by the config
        "patches": {"size": 16},
        "transformer": {"num_heads": None, "mlp_type": "gelu", "layer_scale_init": None},
    }
    assert SCHEMA.optional == {"layer_scale_init"}
    assert SCHEMA.optional_types == {"layer_scale_init": float}


def _complete(**entries) -> ml_collections.ConfigDict:
    """The template with `entries` set (`build` reads a config completed this way)."""
    config = ml_collections.ConfigDict(SCHEMA.defaults, type_safe=False)
    for path, value in entries.items():
        node = config
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def test_values_are_typed_and_grouped():
    config = _complete(hidden_size="64", patches__size=8, transformer__num_heads=4.0)
    fields = SCHEMA.values(config)
    assert fields["width"] == 64 and fields["patch"] == (8, 8)
    assert fields["block"] == _Block(heads=4, mlp="gelu", scale=None)
    assert type(fields["block"].heads) is int


def test_choices_are_checked_where_declared():
    config = _complete(hidden_size=64, transformer__num_heads=4, transformer__mlp_type="relu")
    with pytest.raises(
        ValueError, match=r"^transformer.mlp_type must be one of 'gelu', 'swiglu', got 'relu'$"
    ):
        SCHEMA.values(config)


def test_value_reads_partial_and_stored_configs_with_the_declared_default():
    assert SCHEMA.value({}, "mlp") == "gelu"
    assert SCHEMA.value({"transformer": None}, "mlp") == "gelu"
    assert SCHEMA.value({"transformer": {"mlp_type": "swiglu"}}, "mlp") == "swiglu"
    assert SCHEMA.value({"transformer": {"layer_scale_init": 1}}, "scale") == 1.0
    assert SCHEMA.value({"patches": {"size": [14, 14]}}, "patch") == (14, 14)
    assert SCHEMA.value({}, "width") is None  # required and absent
    with pytest.raises(ValueError, match="transformer.mlp_type must be one of"):
        SCHEMA.value({"transformer": {"mlp_type": "relu"}}, "mlp")


def test_a_sub_config_made_in_code_checks_its_choices_too():
    assert _Block(heads=2, mlp="swiglu").mlp == "swiglu"
    with pytest.raises(
        ValueError, match=r"^transformer.mlp_type must be one of 'gelu', 'swiglu', got 'x'$"
    ):
        _Block(heads=2, mlp="x")
