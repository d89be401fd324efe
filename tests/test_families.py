"""The model-family registry: dispatch, checkpoint-fitting facts, weight decay, sharding rules."""

import re
import types

import jax
import pytest

from vit_jax import models, sharding, weights

TINY = dict(
    patches=dict(size=(4, 4)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=4, num_layers=2),
)
MIXER = dict(
    model_type="Mixer",
    patches=dict(size=(4, 4)),
    hidden_dim=32,
    num_blocks=2,
    tokens_mlp_dim=16,
    channels_mlp_dim=64,
)
# The weight-decay exclusions as a fixed list of leaf names (what vit_jax.optim used).
LEGACY_NO_DECAY_NAMES = ("bias", "scale", "pos_embedding", "cls", "dist", "probe")


def _paths(config, size=16):
    return list(weights.flatten(models.init_shapes(models.get_model(config, num_classes=5), size)))


def test_registry_dispatch_and_errors():
    assert models.known_families()[:2] == ["ViT", "Mixer"]
    assert isinstance(models.get_model(TINY, num_classes=3), models.VisionTransformer)
    assert isinstance(models.get_model(MIXER, num_classes=3), models.MlpMixer)
    with pytest.raises(ValueError, match=r"unknown model_type 'Conv'; known: 'ViT', 'Mixer'"):
        models.get_family("Conv")
    with pytest.raises(ValueError, match=r"unknown model_type 'Conv'"):
        models.get_config(dict(TINY, model_type="Conv"))
    with pytest.raises(ValueError, match=r"already registered"):
        models.register_family(models.Family(**{**vars(models.get_family("ViT")), "name": "ViT"}))
    vit = models.get_family("ViT")
    with pytest.raises(ValueError, match=r"model_type 'Mixer'"):
        vit.build(models.get_config(MIXER), 3)
    # `build` overrides replace the module fields derived from the config.
    model = vit.build(models.get_config(TINY), 3, attention_implementation="xla")
    assert model.attention_implementation == "xla" and model.num_classes == 3


@pytest.mark.parametrize(
    "config,expected",
    [
        (TINY, 1),
        (dict(TINY, distillation_token=True), 2),
        (dict(TINY, classifier="token_unpooled"), 1),
        (dict(TINY, classifier="gap"), 0),
        (dict(TINY, classifier="map"), 0),
        (MIXER, 0),
    ],
)
def test_num_prefix_tokens_is_the_models_learned_tokens(config, expected):
    assert models.num_prefix_tokens(config) == expected
    shapes = models.init_shapes(models.get_model(config, num_classes=5), 16)
    assert sum(k in shapes for k in ("cls", "dist")) == expected
    if "posembed_input" in shapes.get("Transformer", {}):
        total = shapes["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
        assert total == expected + 4 * 4


@pytest.mark.parametrize(
    "name,stride",
    [
        ("ViT-B_16", (16, 16)),
        ("ViT-L_32", (32, 32)),
        ("R+ViT-Ti_16", (32, 32)),  # root only: patch 8 x 4
        ("R26+ViT-S_32", (32, 32)),
        ("R50+ViT-B_16", (16, 16)),
        ("Mixer-B_32", (32, 32)),
    ],
)
def test_stride_and_token_grid(name, stride):
    assert models.stride(name) == stride
    assert models.get_model(name, num_classes=None).stride() == stride
    assert models.token_grid(name, (stride[0] * 3, stride[1] * 5)) == (3, 5)
    with pytest.raises(
        ValueError, match=rf"image size {stride[0] + 1}x{stride[1]} .*'{re.escape(name)}'"
    ):
        models.token_grid(name, (stride[0] + 1, stride[1]))


def test_scan_block_is_the_layout_name():
    for config, name in ((TINY, "encoderblock"), (MIXER, "MixerBlock")):
        assert models.scan_block(config) == name
        scanned = _paths(dict(config, scan=True))
        assert any(f"{name}/" in p for p in scanned)
        assert not any(re.search(rf"{name}_\d+/", p) for p in scanned)
        assert any(f"{name}_1/" in p for p in _paths(config))


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dict(TINY, classifier="map", representation_size=8),
        dict(
            TINY,
            distillation_token=True,
            transformer=dict(TINY["transformer"], layer_scale_init=0.1),
        ),
        dict(TINY, resnet=dict(num_layers=(1,), width_factor=0.5)),
        dict(TINY, scan=True),
        MIXER,
    ],
    ids=["vit", "map", "deit-layerscale", "hybrid", "scanned", "mixer"],
)
def test_no_decay_patterns_match_the_legacy_name_list(config):
    patterns = models.no_decay_patterns(config)
    paths = _paths(config)
    got = {p for p in paths if any(re.search(r, p) for r in patterns)}
    expected = {p for p in paths if p.split("/")[-1] in LEGACY_NO_DECAY_NAMES}
    assert got == expected
    assert any(p.endswith("kernel") for p in paths) and not any(p.endswith("kernel") for p in got)


def _mesh(model=1, fsdp=1):
    """`partition_spec` reads only the axis sizes."""
    return types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "model": model})


def test_mixer_mlps_are_tensor_parallel():
    mesh = _mesh(model=2)
    shapes = weights.flatten(models.init_shapes(models.get_model(MIXER, num_classes=5), 16))
    spec = lambda p: sharding.partition_spec(p, shapes[p].shape, mesh)
    assert spec("MixerBlock_0/token_mixing/Dense_0/kernel") == jax.P(None, "model")
    assert spec("MixerBlock_0/token_mixing/Dense_0/bias") == jax.P("model")
    assert spec("MixerBlock_1/channel_mixing/Dense_1/kernel") == jax.P("model", None)
    assert spec("MixerBlock_1/channel_mixing/Dense_1/bias") == jax.P(None)
    assert spec("stem/kernel") == jax.P(None, None, None, None)
    # Scanned: the leading depth axis stays unsharded; an optimizer-state path matches too.
    scanned = sharding.partition_spec(
        "opt/mu/MixerBlock/token_mixing/Dense_0/kernel", (2, 16, 16), mesh
    )
    assert scanned == jax.P(None, None, "model")
    # Only the Mixer's rules given: the same; ViT's rules alone would not split it.
    only = models.logical_axes(MIXER)
    path = "MixerBlock_0/channel_mixing/Dense_0/kernel"
    assert sharding.partition_spec(path, (32, 64), mesh, only) == jax.P(None, "model")
    assert sharding.partition_spec(path, (32, 64), mesh, models.logical_axes(TINY)) == jax.P(
        None, None
    )
    with pytest.raises(ValueError, match=r"mlp_dim=16 is not divisible by the mesh's model axis"):
        sharding.partition_spec(
            "MixerBlock_0/token_mixing/Dense_0/kernel", (16, 16), _mesh(model=3)
        )


def test_vit_rules_and_fsdp_unchanged():
    mesh = _mesh(model=2, fsdp=2)
    shapes = weights.flatten(models.init_shapes(models.get_model(TINY, num_classes=6), 16))
    block = "Transformer/encoderblock_0/"
    expected = {
        block + "MultiHeadDotProductAttention_1/query/kernel": jax.P("fsdp", "model", None),
        block + "MultiHeadDotProductAttention_1/query/bias": jax.P("model", "fsdp"),
        block + "MultiHeadDotProductAttention_1/out/kernel": jax.P("model", None, "fsdp"),
        block + "MlpBlock_3/Dense_0/kernel": jax.P("fsdp", "model"),
        block + "MlpBlock_3/Dense_1/kernel": jax.P("model", "fsdp"),
        "embedding/kernel": jax.P(None, None, None, "fsdp"),
        "head/kernel": jax.P("fsdp", None),
    }
    for path, spec in expected.items():
        assert sharding.partition_spec(path, shapes[path].shape, mesh) == spec, path
        assert (
            sharding.partition_spec(path, shapes[path].shape, mesh, models.logical_axes(TINY))
            == spec
        )
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible .*mesh.model=3"):
        path = block + "MultiHeadDotProductAttention_1/query/kernel"
        sharding.partition_spec(path, shapes[path].shape, _mesh(model=3))
