"""The model-family table: dispatch, checkpoint-fitting facts, weight decay, layer decay,
sharding rules."""

import re
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
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


# Tiny examples of every family in the table (with the variants that add parameters), and the
# depth each config asks for: the table's rules are checked against what the models really hold.
EXAMPLES = {
    "ViT": [
        TINY,
        dict(TINY, classifier="map", representation_size=8),
        dict(TINY, distillation_token=True, num_registers=2),
        dict(TINY, resnet=dict(num_layers=(1,), width_factor=0.5)),
    ],
    "Mixer": [MIXER],
}
DEPTH = {"ViT": lambda c: c.transformer.num_layers, "Mixer": lambda c: c.num_blocks}


def test_every_family_in_the_table_has_examples():
    assert list(models.FAMILIES) == models.known_families() == ["ViT", "Mixer"]
    assert set(EXAMPLES) == set(DEPTH) == set(models.FAMILIES)


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
@pytest.mark.parametrize(
    "family,config",
    [(name, config) for name, configs in EXAMPLES.items() for config in configs],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_layer_decay_rule_places_every_parameter_by_depth(family, config, scan):
    """The table's rule gives every parameter a layer in [0, L + 1]: block i is i + 1 (scanned:
    1..L along the depth axis), L the config's depth, both ends used; optim reads the same rule."""
    from vit_jax import optim

    config = models.get_config(dict(config, scan=scan))
    shapes = models.init_shapes(models.get_model(config, num_classes=5), 16)
    rule = models.get_family(family)
    ids, num_layers = rule.layer_ids(shapes)
    depth = DEPTH[family](config)
    assert num_layers == depth
    flat_ids, flat_shapes = weights.flatten(ids), weights.flatten(shapes)
    block = re.compile(rf"(^|/){rule.scan_block}(_(\d+))?/")
    ends = set()
    for path, layer in flat_ids.items():
        if m := block.search(path):
            if scan:
                assert m.group(2) is None, path
                assert layer.shape == (depth,) + (1,) * (len(flat_shapes[path].shape) - 1), path
                assert layer.reshape(-1).tolist() == list(range(1, depth + 1)), path
            else:
                assert layer == int(m.group(3)) + 1, path
        else:
            assert layer in (0, depth + 1), path
            ends.add(layer)
    assert ends == {0, depth + 1}
    # The optimizer's layer decay reads the same rule for this config's model.
    d = 0.5
    tx_config = ml_collections.ConfigDict(dict(model=config.to_dict()))
    block_names, embedding = optim._layer_rules(tx_config)
    mults = weights.flatten(
        optim.layer_decay_multipliers(shapes, d, block_names=block_names, embedding=embedding)
    )
    for path, layer in flat_ids.items():
        np.testing.assert_array_equal(mults[path], np.float32(d) ** (depth + 1 - layer))


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_every_rule_of_the_table_matches_a_parameter_of_its_family(family):
    """No stale row: each `embedding`, `no_decay` and `logical_axes` regex of a family matches a
    parameter of one of its examples; `tokens_param` is one of its parameters."""
    rule = models.get_family(family)
    paths = set()
    for config in EXAMPLES[family]:
        paths |= set(_paths(config))
    patterns = list(rule.embedding) + list(rule.no_decay) + [p for p, _ in rule.logical_axes]
    for pattern in patterns:
        assert any(re.search(pattern, p) for p in paths), (family, pattern)
    if rule.tokens_param is not None:
        assert rule.tokens_param in paths


def test_importing_the_table_alone_lists_every_family():
    """The table is complete once `vit_jax.models.families` is imported: nothing registers
    itself later (the import-cycle test in test_project.py checks the graph)."""
    code = (
        "import sys; import vit_jax.models.families as f; "
        "print(f.known_families(), f.block_names(), len(f.logical_axes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.strip() == "['ViT', 'Mixer'] ('encoderblock', 'MixerBlock') 9"


def test_a_family_registered_at_run_time_joins_the_table():
    from vit_jax import optim
    from vit_jax.models import families

    toy = models.Family(
        **{
            **vars(models.get_family("Mixer")),
            "name": "Toy",
            "scan_block": "toyblock",
            "embedding": (r"^toy_stem/",),
            "logical_axes": ((r"toy_mlp/kernel$", ("embed", "mlp")),),
        }
    )
    assert models.register_family(toy) is toy
    try:
        assert models.known_families() == ["ViT", "Mixer", "Toy"]
        assert models.FAMILIES["Toy"] is toy and models.get_family("Toy") is toy
        assert models.layout.block_names()[-1] == "toyblock"
        assert sharding.default_rules()[-1] == (r"toy_mlp/kernel$", ("embed", "mlp"))
        tree = {"toy_stem": {"kernel": 1.0}, "toyblock_0": {"w": 1.0}, "toyblock_1": {"w": 1.0}}
        mults = optim.layer_decay_multipliers(dict(tree, head=1.0), 0.5)
        assert mults == {
            "toy_stem": {"kernel": 0.125}, "toyblock_0": {"w": 0.25}, "toyblock_1": {"w": 0.5},
            "head": 1.0,
        }  # fmt: skip
    finally:
        del families._TABLE["Toy"]
    assert "Toy" not in models.known_families()
