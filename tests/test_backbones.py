"""Modern backbones (SigLIP, DINOv2 with/without registers, DeiT-III): exact parameter counts
against the published implementations, and the block / embedding options they are built from
(register tokens, qk-norm, SwiGLU, the on-the-fly bicubic position table, DeiT-III's table)."""

import functools
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import attention as attention_lib
from vit_jax.models import layers as layers_lib
from vit_jax.models import vit as vit_lib

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
except ImportError:
    torch = None

# Published totals, counted outside this process with the independent implementations:
# timm 1.0.31 `sum(p.numel() for p in timm.create_model(name).parameters())` (pretrained=False,
# its default head: none for SigLIP / DINOv2, 1000 classes for DeiT-III) and Hugging Face
# transformers 5.24 `SiglipVisionModel` / `Dinov2Model` / `Dinov2WithRegistersModel` built from
# the published configs (hidden size, layers, heads, MLP, patch, image size; DINOv2: 518 px,
# patch 14, `use_swiglu_ffn` for g). Ours is the feature extractor (num_classes=None) except
# DeiT-III (1000 classes, as timm counts it).
TIMM_COUNTS = {
    "SigLIP-B_16-224": ("vit_base_patch16_siglip_224", 92_884_224),
    "SigLIP-B_16-256": ("vit_base_patch16_siglip_256", 92_930_304),
    "SigLIP-B_16-384": ("vit_base_patch16_siglip_384", 93_176_064),
    "SigLIP-B_16-512": ("vit_base_patch16_siglip_512", 93_520_128),
    "SigLIP-L_16-256": ("vit_large_patch16_siglip_256", 315_956_224),
    "SigLIP-L_16-384": ("vit_large_patch16_siglip_384", 316_283_904),
    "SigLIP-So400m_14-224": ("vit_so400m_patch14_siglip_224", 427_680_704),
    "SigLIP-So400m_14-384": ("vit_so400m_patch14_siglip_384", 428_225_600),
    "DINOv2-S_14": ("vit_small_patch14_dinov2", 22_056_192),
    "DINOv2-B_14": ("vit_base_patch14_dinov2", 86_579_712),
    "DINOv2-L_14": ("vit_large_patch14_dinov2", 304_367_616),
    "DINOv2-g_14": ("vit_giant_patch14_dinov2", 1_136_479_232),
    "DINOv2-S_14-reg4": ("vit_small_patch14_reg4_dinov2", 22_057_344),
    "DINOv2-B_14-reg4": ("vit_base_patch14_reg4_dinov2", 86_582_016),
    "DINOv2-L_14-reg4": ("vit_large_patch14_reg4_dinov2", 304_370_688),
    "DINOv2-g_14-reg4": ("vit_giant_patch14_reg4_dinov2", 1_136_483_840),
    "DeiT3-S_16": ("deit3_small_patch16_224", 22_059_496),
    "DeiT3-B_16": ("deit3_base_patch16_224", 86_585_320),
    "DeiT3-L_16": ("deit3_large_patch16_224", 304_374_760),
}
HF_COUNTS = {
    "SigLIP-B_16-224": 92_884_224,
    "SigLIP-B_16-256": 92_930_304,
    "SigLIP-B_16-384": 93_176_064,
    "SigLIP-B_16-512": 93_520_128,
    "SigLIP-L_16-256": 315_956_224,
    "SigLIP-L_16-384": 316_283_904,
    "SigLIP-So400m_14-224": 427_680_704,
    "SigLIP-So400m_14-384": 428_225_600,
    "DINOv2-S_14": 22_056_576,
    "DINOv2-B_14": 86_580_480,
    "DINOv2-L_14": 304_368_640,
    "DINOv2-g_14": 1_136_480_768,
    "DINOv2-S_14-reg4": 22_058_112,
    "DINOv2-B_14-reg4": 86_583_552,
    "DINOv2-L_14-reg4": 304_372_736,
    "DINOv2-g_14-reg4": 1_136_486_912,
}
# Ours: the README table's counts (feature extractors; DeiT-III with 1000 classes).
BACKBONE_COUNTS = {
    "SigLIP-B_16-224": 92_884_224,
    "SigLIP-B_16-256": 92_930_304,
    "SigLIP-B_16-384": 93_176_064,
    "SigLIP-B_16-512": 93_520_128,
    "SigLIP-L_16-256": 315_956_224,
    "SigLIP-L_16-384": 316_283_904,
    "SigLIP-So400m_14-224": 427_680_704,
    "SigLIP-So400m_14-384": 428_225_600,
    "DINOv2-S_14": 22_056_192,
    "DINOv2-B_14": 86_579_712,
    "DINOv2-L_14": 304_367_616,
    "DINOv2-g_14": 1_136_479_232,
    "DINOv2-S_14-reg4": 22_057_728,
    "DINOv2-B_14-reg4": 86_582_784,
    "DINOv2-L_14-reg4": 304_371_712,
    "DINOv2-g_14-reg4": 1_136_485_376,
    "DeiT3-S_16": 22_059_496,
    "DeiT3-B_16": 86_585_320,
    "DeiT3-L_16": 304_374_760,
}


def _num_classes(name):
    return 1000 if name.startswith("DeiT3") else None


@pytest.mark.parametrize("name", sorted(BACKBONE_COUNTS))
def test_backbone_counts_are_the_published_ones(name):
    """Our counts equal timm's and Hugging Face's, up to the parameters each one keeps apart:

    - SigLIP: equal to both (HF `SiglipVisionModel` has the MAP head and no projection; the
      big_vision `img/head` projection would be our `head`, absent in the feature extractor).
    - DINOv2: equal to timm; HF's `Dinov2Model` / `Dinov2WithRegistersModel` also hold a
      `mask_token` (1, D) for masked-image pre-training, which we do not keep: ours = HF - D.
    - DINOv2 -reg4: our table has a class-token row (as HF and the original checkpoints);
      timm's `reg4` models use `no_embed_class` and fold that row into `cls_token` when
      converting: ours = timm + D.
    - DeiT-III: equal to timm (1000-class head), whose `no_embed_class` table has no class-token
      row: ours models it with `posemb_covers_prefix=False` (no row, so nothing to freeze).
    """
    d = models.get_config(name).hidden_size
    ours = models.count_params(name, num_classes=_num_classes(name))
    assert ours == BACKBONE_COUNTS[name]
    timm_name, timm_total = TIMM_COUNTS[name]
    timm_extra = d if name.endswith("-reg4") else 0  # the class-token position row
    assert ours == timm_total + timm_extra, timm_name
    if name in HF_COUNTS:
        hf_missing = d if name.startswith("DINOv2") else 0  # mask_token
        assert ours == HF_COUNTS[name] - hf_missing
    # posemb_grid fixes the table: the count does not depend on the input resolution.
    stride = models.stride(name)
    other = models.count_params(
        name, num_classes=_num_classes(name), image_size=(stride[0] * 9, stride[1] * 7)
    )
    assert other == ours


def test_readme_backbone_table_is_the_counts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| backbone |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        name, count = [c.strip() for c in line.strip("|").split("|")][:2]
        rows[name] = int(count.replace(",", ""))
    # DINOv3's counts are checked against transformers' DINOv3ViTModel in tests/test_dinov3.py.
    dinov3 = [name for name in models.list_models() if name.startswith("DINOv3-")]
    assert len(dinov3) == 6
    assert rows == {
        **BACKBONE_COUNTS,
        **{n: models.count_params(n, num_classes=None) for n in dinov3},
    }


def test_backbone_architectures():
    """The published architecture facts of each family, and the tree names they give."""
    so400m = models.get_config("SigLIP-So400m_14-384")
    assert (so400m.hidden_size, so400m.transformer.num_layers, so400m.transformer.mlp_dim) == (
        1152,
        27,
        4304,
    )
    assert so400m.classifier == "map" and tuple(so400m.posemb_grid) == (27, 27)
    shapes = models.init_shapes(models.get_model("SigLIP-B_16-224", num_classes=None))
    assert "cls" not in shapes and "head" not in shapes and "MAPHead_0" in shapes
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 196, 768)
    assert models.num_prefix_tokens("SigLIP-B_16-224") == 0
    g = models.init_shapes(models.get_model("DINOv2-g_14-reg4", num_classes=None), 224)
    block = g["Transformer"]["encoderblock_39"]
    assert block["MlpBlock_3"]["Dense_0"]["kernel"].shape == (1536, 8192)
    assert block["MlpBlock_3"]["Dense_1"]["kernel"].shape == (4096, 1536)
    assert block["LayerScale_1"]["scale"].shape == (1536,)
    assert g["registers"].shape == (1, 4, 1536)
    assert g["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 37 * 37, 1536)
    assert models.num_prefix_tokens("DINOv2-g_14-reg4") == 5
    assert models.num_posemb_prefix_tokens("DINOv2-g_14-reg4") == 1
    dino = models.get_config("DINOv2-S_14")
    assert not dino.gelu_approximate and dino.transformer.layer_scale_init == 1e-5
    deit = models.init_shapes(models.get_model("DeiT3-S_16", num_classes=1000))
    assert deit["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 196, 384)
    assert models.num_prefix_tokens("DeiT3-S_16") == 1
    assert models.num_posemb_prefix_tokens("DeiT3-S_16") == 0


# --- The position table resampled on the fly: torch's bicubic, exactly.

GRIDS = [
    ((37, 37), (16, 16)),
    ((16, 16), (37, 37)),
    ((14, 14), (24, 24)),
    ((27, 27), (16, 16)),
    ((4, 6), (7, 3)),
    ((5, 5), (5, 9)),
    ((37, 37), (36, 36)),
    ((3, 3), (11, 2)),
]


@pytest.mark.torch
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", GRIDS)
def test_resample_posemb_bicubic_is_torch_interpolate(old, new, antialias):
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 2 + old[0] * old[1], 8)).astype(np.float32)
    grid = torch.from_numpy(posemb[:, 2:]).reshape(1, *old, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=new, mode="bicubic", align_corners=False, antialias=antialias
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    out = np.asarray(
        models.resample_posemb_bicubic(
            posemb, new, old_grid=old, num_prefix_tokens=2, antialias=antialias
        )
    )
    np.testing.assert_array_equal(out[:, :2], posemb[:, :2])
    np.testing.assert_allclose(out[:, 2:], expected, atol=1e-5, rtol=0)


def test_resample_posemb_bicubic_errors_and_identity():
    posemb = np.zeros((1, 1 + 12, 4), np.float32)
    with pytest.raises(ValueError, match=r"12 grid rows after 1 prefix rows, not grid \(4, 4\)"):
        models.resample_posemb_bicubic(posemb, (2, 2), old_grid=(4, 4), num_prefix_tokens=1)
    same = models.resample_posemb_bicubic(posemb, (3, 4), old_grid=(3, 4), num_prefix_tokens=1)
    np.testing.assert_array_equal(same, posemb)


TINY = dict(
    patches=dict(size=(4, 4)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=4, num_layers=2),
)


def _randomize(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pairs = zip(keys, leaves, strict=True)
    values = [0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in pairs]
    return jax.tree.unflatten(tree, values)


def _images(h, w, n=2):
    return jax.random.uniform(jax.random.key(0), (n, h, w, 3), minval=-1, maxval=1)


@pytest.mark.parametrize("antialias", [False, True])
def test_model_runs_at_another_grid_through_the_resampled_table(antialias):
    """A model with `posemb_grid` (4, 4) at 24x12 (grid 6x3) is the model whose stored table is
    the resampled one: the same parameters, the table replaced."""
    config = dict(TINY, posemb_grid=(4, 4), posemb_antialias=antialias)
    model = models.get_model(config, num_classes=3)
    params = _randomize(model.init(jax.random.key(0), _images(16, 16), train=False)["params"])
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert table.shape == (1, 17, 32)
    resampled = models.resample_posemb_bicubic(
        table, (6, 3), old_grid=(4, 4), num_prefix_tokens=1, antialias=antialias
    )
    plain = models.get_model(TINY, num_classes=3)  # table made for the input grid
    fixed = jax.tree.map(lambda x: x, params)
    fixed["Transformer"]["posembed_input"]["pos_embedding"] = resampled
    x = _images(24, 12)
    got = model.apply({"params": params}, x, train=False)[0]
    want = plain.apply({"params": fixed}, x, train=False)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"apply to posemb 'learn' only"):
        models.get_model(dict(config, posemb="sincos2d"), num_classes=3).init(
            jax.random.key(0), _images(16, 16), train=False
        )


def test_table_without_prefix_rows_leaves_the_class_token_alone():
    """DeiT-III (`posemb_covers_prefix=False`): grid rows only; the class token gets none."""
    pe = vit_lib.AddPositionEmbs(grid=(2, 3), covers_prefix=False)
    x = jax.random.normal(jax.random.key(0), (2, 1 + 6, 8))
    variables = pe.init(jax.random.key(1), x, (2, 3))
    table = variables["params"]["pos_embedding"]
    assert table.shape == (1, 6, 8)
    y = pe.apply(variables, x, (2, 3))
    np.testing.assert_array_equal(y[:, :1], x[:, :1])
    np.testing.assert_allclose(y[:, 1:], x[:, 1:] + table, atol=1e-6)


# --- Register tokens.


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_registers_sit_after_the_class_token_and_are_dropped_before_pooling(classifier):
    config = dict(TINY, num_registers=3, classifier=classifier)
    model = models.get_model(config, num_classes=None)
    x = _images(16, 16)
    params = _randomize(model.init(jax.random.key(0), x, train=False)["params"])
    assert params["registers"].shape == (1, 3, 32)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    prefix = 1 if classifier == "token" else 0
    assert posemb.shape == (1, prefix + 16, 32)  # no rows for the registers
    assert models.num_prefix_tokens(config) == prefix + 3
    assert models.num_posemb_prefix_tokens(config) == prefix
    features, out = model.apply({"params": params}, x, train=False)
    assert out["encoded"].shape == (2, prefix + 3 + 16, 32)
    np.testing.assert_array_equal(out["registers"], out["encoded"][:, prefix : prefix + 3])
    if classifier == "token":
        np.testing.assert_array_equal(features, out["encoded"][:, 0])
    else:
        np.testing.assert_allclose(features, out["encoded"][:, 3:].mean(axis=1), atol=1e-6)
    # The registers enter after the position table: the first block sees [cls, regs, patches].
    _, inter = model.apply({"params": params}, x, train=False, return_intermediates=True)
    assert inter["attention_weights"].shape == (2, 2, 4, prefix + 19, prefix + 19)


def test_registers_initialised_small_and_decay_free():
    model = models.get_model(dict(TINY, num_registers=2), num_classes=None)
    params = model.init(jax.random.key(0), _images(16, 16), train=False)["params"]
    assert 0 < float(jnp.abs(params["registers"]).max()) < 1e-4
    assert any(re.search(p, "registers") for p in models.no_decay_patterns("DINOv2-S_14"))


# --- qk-norm and SwiGLU, against direct numpy implementations.


def _layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_qk_norm_normalises_queries_and_keys_per_head():
    eps = 1e-6
    norm = functools.partial(nn.LayerNorm, epsilon=eps)
    attn = attention_lib.MultiHeadAttention(num_heads=2, qk_norm=norm, implementation="explicit")
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = _randomize(attn.init(jax.random.key(1), x, x, deterministic=True)["params"])
    assert params["query_norm"]["scale"].shape == (4,)
    assert params["key_norm"]["bias"].shape == (4,)
    y, _ = attn.apply({"params": params}, x, x, deterministic=True)
    p = jax.tree.map(np.asarray, params)
    xn = np.asarray(x, np.float64)
    proj = lambda n: np.einsum("bnd,dhk->bhnk", xn, p[n]["kernel"]) + p[n]["bias"][:, None]
    q = _layer_norm(proj("query"), p["query_norm"]["scale"], p["query_norm"]["bias"], eps)
    k = _layer_norm(proj("key"), p["key_norm"]["scale"], p["key_norm"]["bias"], eps)
    v = proj("value")
    s = np.einsum("bhqk,bhnk->bhqn", q, k) / np.sqrt(4)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqn,bhnk->bqhk", w, v)
    want = np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(y, want, atol=1e-4)
    # Through the config: the blocks' attention gets them, the MAP head's does not.
    shapes = models.init_shapes(
        models.get_model(
            dict(TINY, classifier="map", transformer=dict(TINY["transformer"], qk_norm=True)),
            num_classes=None,
        ),
        16,
    )
    block_attn = shapes["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]
    assert block_attn["query_norm"]["scale"].shape == (8,)
    assert "query_norm" not in shapes["MAPHead_0"]["MultiHeadDotProductAttention_0"]


def test_swiglu_is_silu_gate_on_the_packed_projection():
    mlp = layers_lib.SwiGLUMlpBlock(6)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    params = _randomize(mlp.init(jax.random.key(1), x, deterministic=True)["params"])
    assert params["Dense_0"]["kernel"].shape == (8, 12)
    assert params["Dense_1"]["kernel"].shape == (6, 8)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    x1, x2 = h[..., :6], h[..., 6:]
    want = (x1 / (1 + np.exp(-x1)) * x2) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x, deterministic=True), want, 1e-5)
    with pytest.raises(ValueError, match=r"transformer.mlp_type must be one of .*'geglu'"):
        models.get_model(
            dict(TINY, transformer=dict(TINY["transformer"], mlp_type="geglu")), num_classes=2
        ).init(jax.random.key(0), _images(16, 16), train=False)


def test_visualize_hides_registers_and_shows_them_on_request(tmp_path):
    from types import SimpleNamespace

    from vit_jax import visualize

    config = models.get_config(dict(TINY, num_registers=2))
    model = models.get_model(config, num_classes=3)
    x = _images(16, 16, n=1)
    params = _randomize(model.init(jax.random.key(0), x, train=False)["params"])
    trained = SimpleNamespace(
        model_config=config,
        normalization=None,
        crop=16,
        intermediates=lambda images: model.apply(
            {"params": params}, images, train=False, return_intermediates=True
        )[1],
    )
    image = np.asarray(x[0])
    hidden = visualize._maps(trained, image, tmp_path / "a", size=32, heads=True)
    assert sorted(hidden) == [f"{tmp_path / 'a'}_heads.png", f"{tmp_path / 'a'}_rollout.png"]
    shown = visualize._maps(trained, image, tmp_path / "a", size=32, heads=False, registers=True)
    assert shown[f"{tmp_path / 'a'}_registers.png"].size == (2 * 32, 32)
    weights = trained.intermediates(x)["attention_weights"]
    cls_map = visualize.attention_rollout(weights, num_prefix_tokens=3)
    reg_map = visualize.attention_rollout(weights, num_prefix_tokens=3, token=2)
    assert cls_map.shape == reg_map.shape == (1, 16)  # the patches only
    np.testing.assert_allclose(reg_map.sum(-1), 1.0)
    assert not np.allclose(cls_map, reg_map)


def test_position_table_grid_is_the_fixed_grid_when_set():
    assert models.position_table_grid("DINOv2-S_14", 224) == (37, 37)
    assert models.position_table_grid("SigLIP-So400m_14-224", 448) == (16, 16)
    assert models.position_table_grid("ViT-B_16", (384, 224)) == (24, 14)


def test_a_fixed_table_model_loads_at_any_resolution(tmp_path):
    """predict / evaluate / the teacher read a `posemb_grid` model at another size: the stored
    table is kept (fit does not resample it), the model resamples it on the fly."""
    from vit_jax import inference, weights

    config = dict(TINY, name="tiny-fixed", posemb_grid=(4, 4), num_registers=2)
    model = models.get_model(config, num_classes=3)
    params = _randomize(model.init(jax.random.key(0), _images(16, 16), train=False)["params"])
    params = jax.tree.map(np.asarray, params)
    meta = {"model": models.get_config(config).to_dict(), "image_size": [16, 16]}
    weights.save(params, meta, tmp_path / "fixed.npz")
    at_24 = inference.load_model(str(tmp_path / "fixed.npz"), resolution=24)
    table = at_24.params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(table, params["Transformer"]["posembed_input"]["pos_embedding"])
    images = np.asarray(_images(24, 24))
    expected, _ = model.apply({"params": params}, images, train=False)
    np.testing.assert_allclose(at_24.logits(images), expected, atol=1e-5)
