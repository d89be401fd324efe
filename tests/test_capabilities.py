"""Each format's capability table is the one answer to "can format F express option X".

For every format and every option of our ViT (`weights.options.OPTIONS`): an option the table
has no row for is refused on writing with one line naming the option and the format; an option
it has a row for survives the round trip ours -> format -> ours. Our own readers and writers
only (no torch), tiny models.
"""

import jax
import numpy as np
import pytest
import tiny

from vit_jax import models
from vit_jax.weights import hf, hf_dinov2, options, timm
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.tree import flatten

HW = (8, 8)
TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
LAYER_SCALE = dict(transformer=dict(layer_scale_init=0.1))

# format -> (codec, model_type for to_hf (None: timm), what the format needs, classes)
FORMATS = {
    "timm": (timm.CODEC, None, {}, 5),
    "hf-vit": (hf.CODECS["vit"], "vit", {}, 5),
    "hf-deit": (hf.CODECS["deit"], "deit", dict(distillation_token=True), 5),
    "hf-siglip": (
        hf.CODECS["siglip_vision_model"],
        "siglip_vision_model",
        {"classifier": "map"},
        0,
    ),
    "hf-dinov2": (hf_dinov2.CODECS[0], "dinov2", LAYER_SCALE, 0),
    "hf-dinov2-registers": (
        hf_dinov2.CODECS[1],
        "dinov2_with_registers",
        dict(num_registers=2, **LAYER_SCALE),
        0,
    ),
}
# option -> the model-config changes that turn it on (SwiGLU: a width DINOv2 can build)
TURN_ON = {
    "distillation_token": dict(distillation_token=True),
    "layer_scale": LAYER_SCALE,
    "representation": dict(representation_size=8),
    "num_registers": dict(num_registers=2),
    "qk_norm": dict(transformer=dict(qk_norm=True)),
    "swiglu": dict(transformer=dict(mlp_type="swiglu", mlp_dim=48)),
    "rms_norm": dict(transformer=dict(norm="rmsnorm")),
}


def test_every_option_has_a_way_to_turn_it_on():
    assert sorted(TURN_ON) == sorted(options.OPTIONS)


def _spec(*changes):
    spec = {**TINY, "transformer": dict(TINY["transformer"])}
    for change in changes:
        for key, value in change.items():
            if isinstance(value, dict):
                spec[key] = {**spec.get(key, {}), **value}
            else:
                spec[key] = value
    return spec


def _ours(spec, num_classes):
    config = models.get_config(spec)
    try:
        model = models.get_model(config, num_classes=num_classes)
        models.init_shapes(model, HW)
    except ValueError as e:  # not a model of ours (a distillation token with MAP pooling)
        pytest.skip(str(e))
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, HW)
    )
    return config, params


def _write(fmt, params, config, tmp_path):
    _, model_type, _, _ = FORMATS[fmt]
    if model_type is None:
        return timm.to_timm(params, config, tmp_path / "m.safetensors")
    return hf.to_hf(params, config, tmp_path / "hf", model_type=model_type)


def _read(fmt, path):
    return timm.from_timm(path) if FORMATS[fmt][1] is None else hf.from_hf(path)


def _field(config, dotted):
    for name in dotted.split("."):
        config = config.get(name) if config is not None else None
    return config


CASES = [(fmt, option) for fmt in FORMATS for option in options.OPTIONS]


@pytest.mark.parametrize("fmt, option", CASES)
def test_the_capability_table_decides_refusal_or_round_trip(tmp_path, fmt, option):
    codec, _, needs, classes = FORMATS[fmt]
    row = codec.can.row(option)
    if row is not None and row.alone:
        classes = 0  # only without a head (transformers' pooler)
    config, params = _ours(_spec(needs, TURN_ON[option]), classes)
    what = options.OPTIONS[option]
    if row is None:
        with pytest.raises(ConversionError) as e:
            _write(fmt, params, config, tmp_path)
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"{codec.can.target} cannot express tiny: ")
        assert what.says(config) in message
        assert not (tmp_path / "hf").exists() and not (tmp_path / "m.safetensors").exists()
        return
    back = _read(fmt, _write(fmt, params, config, tmp_path))
    assert what.on(back.model_config, flatten(back.params))
    assert _field(back.model_config, what.field) == _field(config, what.field)
    ours = flatten(models.unstack_layers(params))
    tiny.assert_same_tree(flatten(models.unstack_layers(back.params)), ours)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if FORMATS[f][0].can.row("representation")])
def test_a_representation_layer_alone_only(tmp_path, fmt):
    _, _, needs, _ = FORMATS[fmt]
    config, params = _ours(_spec(needs, TURN_ON["representation"]), 5)
    with pytest.raises(ConversionError, match=r"a representation layer \(pre_logits\) followed"):
        _write(fmt, params, config, tmp_path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_option_the_format_always_has_is_required(tmp_path, fmt):
    codec, _, needs, classes = FORMATS[fmt]
    required = [r.option for r in codec.can.rows if r.required]
    for option in required:
        without = {k: v for k, v in needs.items() if k not in ("distillation_token", "transformer")}
        config, params = _ours(_spec(without), classes)
        assert not options.OPTIONS[option].on(config, flatten(params))
        with pytest.raises(ConversionError) as e:
            _write(fmt, params, config, tmp_path)
        assert str(e.value).startswith(f"{codec.can.target} cannot express tiny: no ")
        assert f"({codec.can.short} always has it)" in str(e.value)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if not FORMATS[f][0].can.head])
def test_a_format_without_a_classifier_refuses_a_head(tmp_path, fmt):
    codec, _, needs, _ = FORMATS[fmt]
    config, params = _ours(_spec(needs), 5)
    with pytest.raises(ConversionError) as e:
        _write(fmt, params, config, tmp_path)
    assert str(e.value) == (
        f"{codec.can.target} cannot express tiny: a classifier ({codec.can.short} has no "
        "classifier; convert without head/kernel (16, 5))"
    )
