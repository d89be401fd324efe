"""DINOv3 (`posemb='rope'`, the bias switches, transformers' DINOv3ViTModel both ways).

Parity with transformers: a random tiny `DINOv3ViTModel` saved with `save_pretrained`, read by
`weights.open`, run by our model at its native size and at a non-square one (last_hidden_state
and pooler_output within 1e-4); written back by `weights.save` and loaded by transformers; ours
-> transformers -> ours bit-exact. The RoPE training-time augmentations (off in eval, seeded in
training), the option errors, what the capability tables refuse, and the zoo's parameter counts
against transformers' for the published DINOv3 configurations.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from safetensors.numpy import load_file, save_file

from vit_jax import models, weights
from vit_jax.weights import hf, hf_dinov3
from vit_jax.weights.errors import ConversionError

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch`
    import torch
    import transformers
except ImportError:
    torch = transformers = None

ATOL = 1e-4
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NATIVE, OTHER = (32, 32), (48, 80)  # patch 16: a 2x2 grid, and a non-square 3x5 one


def _images(h, w, n=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _run(config, params, x, **kw):
    model = models.get_model(config, num_classes=None)
    apply = jax.jit(functools.partial(model.apply, **{"train": False, **kw}))
    _, out = apply({"params": params}, x)
    return {k: np.asarray(v) for k, v in out.items()}


# transformers configurations: the published DINOv3 layout in miniature (4 registers, no key
# bias), its gated-MLP variant (S+ / H+ / 7B), and 7B's bias-free q/k/v without registers.
VARIANTS = {
    "plain": dict(),
    "gated": dict(use_gated_mlp=True, hidden_act="silu"),
    "7b-like": dict(
        use_gated_mlp=True,
        hidden_act="silu",
        query_bias=False,
        value_bias=False,
        num_register_tokens=0,
        pos_embed_rescale=None,
    ),
}


def _dinov3(tmp_path, variant):
    torch.manual_seed(0)
    args = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        image_size=NATIVE[0],
        patch_size=16,
        layerscale_value=0.5,
    )
    hf_model = transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**{**args, **VARIANTS[variant]})
    )
    with torch.no_grad():  # every weight perturbed: nothing is a zero or a one
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf_model.eval().save_pretrained(tmp_path / "hf")
    # DINOv3's input normalisation (ImageNet mean / std), as its image processor records it
    preprocessor = dict(do_normalize=True, image_mean=IMAGENET["mean"], image_std=IMAGENET["std"])
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return hf_model, tmp_path / "hf"


@pytest.mark.torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokens_and_pooled_output_match_transformers_and_round_trip(tmp_path, variant):
    hf_model, src = _dinov3(tmp_path, variant)
    params, meta = weights.open(src)
    config = models.get_config(meta["model"])
    t = config.transformer
    assert (config.posemb, config.posemb_grid, config.classifier) == ("rope", None, "token")
    assert t.layer_scale_init == 0.5 and t.key_bias is False and meta["image_size"] == [32, 32]
    assert t.mlp_type == ("gelu" if variant == "plain" else "swiglu") and t.mlp_dim == 96
    assert (t.query_bias, t.value_bias) == ((False, False) if variant == "7b-like" else (True,) * 2)
    assert config.num_registers == (0 if variant == "7b-like" else 4)
    assert config.rope_train_rescale == (1.0 if variant == "7b-like" else 2.0)  # 1: off
    flat = weights.tree.flatten(params)
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/bias" not in flat
    for h, w in (NATIVE, OTHER):
        x = _images(h, w)
        with torch.no_grad():
            expected = hf_model(pixel_values=_nchw(x))
        out = _run(config, params, x)
        np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["pre_logits"], expected.pooler_output, atol=ATOL, rtol=0)

    # ours -> transformers: the same state dict key for key (mask_token as zeros), loaded by
    # transformers to the same outputs; -> ours again bit-exact, with the same config
    back = tmp_path / "back"
    weights.save(params, meta, back)
    original = load_file(str(src / "model.safetensors"))
    written = load_file(str(back / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        expected_value = np.zeros_like(value) if key == "embeddings.mask_token" else value
        np.testing.assert_array_equal(written[key], expected_value, err_msg=key)
    reloaded = transformers.DINOv3ViTModel.from_pretrained(back).eval()
    x = _images(*OTHER)
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(pixel_values=_nchw(x)).last_hidden_state,
            hf_model(pixel_values=_nchw(x)).last_hidden_state,
        )
    again, meta_again = weights.open(back)
    tiny.assert_same_tree(again, params)
    assert meta_again["model"] == {**meta["model"], "name": meta_again["model"]["name"]}
    assert meta["normalization"] == meta_again["normalization"] == IMAGENET


@pytest.mark.torch
def test_transformers5_in_memory_names_read_the_same(tmp_path):
    hf_model, src = _dinov3(tmp_path, "gated")
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert "model.layer.0.mlp.gate_proj.weight" in state  # transformers 5 in-memory names
    v5 = tmp_path / "v5"
    v5.mkdir()
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    (v5 / "config.json").write_text((src / "config.json").read_text())
    tiny.assert_same_tree(hf.from_hf(v5).params, hf.from_hf(src).params)


def _tiny(**overrides):
    spec = dict(
        name="tiny-dinov3",
        patches=dict(size=(8, 8)),
        hidden_size=32,
        transformer=dict(
            mlp_dim=48, num_heads=2, num_layers=2, layer_scale_init=0.1, key_bias=False
        ),
        posemb="rope",
        num_registers=2,
        gelu_approximate=False,
        layernorm_epsilon=1e-5,
    )
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return models.get_config(spec)


def _random_params(config, hw=(16, 24), seed=0):
    model = models.get_model(config, num_classes=None)
    rng = np.random.RandomState(seed)
    shapes = models.init_shapes(model, hw)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(transformer=dict(mlp_type="swiglu", mlp_bias=False, attention_out_bias=False)),
        dict(transformer=dict(query_bias=False, value_bias=False), num_registers=0),
    ],
    ids=["plain", "swiglu-no-mlp-out-bias", "no-qkv-bias"],
)
def test_ours_to_transformers_dir_to_ours_is_bit_exact(tmp_path, overrides):
    config = _tiny(rope_theta=50.0, rope_train_jitter=1.5, **overrides)
    params = _random_params(config)
    path, fmt = weights.save(params, {"model": config.to_dict()}, tmp_path / "hf")
    assert fmt == "hf" and json.loads((path / "config.json").read_text())["pos_embed_jitter"]
    again, meta = weights.open(path)
    tiny.assert_same_tree(again, params)
    back = models.get_config(meta["model"])
    assert back.to_dict() == {**config.to_dict(), "name": back.name}
    x = _images(16, 24)
    np.testing.assert_array_equal(
        _run(back, again, x)["encoded"], _run(config, params, x)["encoded"]
    )


@pytest.mark.torch
def test_our_model_written_runs_the_same_in_transformers(tmp_path):
    config = _tiny(transformer=dict(mlp_type="swiglu"))
    params = _random_params(config)
    path, _ = weights.save(params, {"model": config.to_dict(), "image_size": [16, 24]}, tmp_path)
    hf_model = transformers.DINOv3ViTModel.from_pretrained(path).eval()
    for h, w in ((16, 24), (32, 16)):
        x = _images(h, w)
        with torch.no_grad():
            expected = hf_model(pixel_values=_nchw(x))
        out = _run(config, params, x)
        np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["pre_logits"], expected.pooler_output, atol=ATOL, rtol=0)


def test_rope_augmentations_apply_in_training_only_and_are_seeded():
    plain = _tiny()
    augmented = _tiny(rope_train_shift=0.2, rope_train_jitter=1.3, rope_train_rescale=2.0)
    params = _random_params(plain)
    x = _images(16, 24)
    # eval: the plain grid, bit for bit, whatever the augmentations
    np.testing.assert_array_equal(
        _run(augmented, params, x)["encoded"], _run(plain, params, x)["encoded"]
    )
    # training (no dropout in these models): only the coordinates change, from the named rng
    train = lambda config, **rngs: _run(config, params, x, train=True, rngs=rngs)["encoded"]
    key, other = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(train(plain, dropout=key), _run(plain, params, x)["encoded"])
    first = train(augmented, rope=key)
    np.testing.assert_array_equal(train(augmented, rope=key), first)  # deterministic
    np.testing.assert_array_equal(train(augmented, rope=key, dropout=other), first)  # 'rope' wins
    assert np.abs(train(augmented, rope=other) - first).max() > 1e-3
    np.testing.assert_array_equal(train(augmented, dropout=key), first)  # else from 'dropout'
    model = models.get_model(augmented, num_classes=None)
    with pytest.raises(ValueError, match=r"need an rng: apply with rngs=\{'rope'"):
        model.apply({"params": params}, x, train=True)


def test_rope_runs_at_any_grid_and_rotates_patch_tokens_only():
    config = _tiny()
    params = _random_params(config)
    for hw in ((8, 8), (8, 40), (24, 16)):
        assert _run(config, params, _images(*hw))["encoded"].shape[1] == 1 + 2 + hw[0] * hw[1] // 64
    # one patch token: RoPE at the grid centre is the identity, so rope == none there
    none = models.get_config({**config.to_dict(), "posemb": "none"})
    x = _images(8, 8)
    np.testing.assert_allclose(
        _run(config, params, x)["encoded"], _run(none, params, x)["encoded"], atol=1e-6, rtol=0
    )
    x = _images(16, 24)  # on a 2 x 3 grid the patches are rotated
    assert (
        np.abs(_run(config, params, x)["encoded"] - _run(none, params, x)["encoded"]).max() > 1e-3
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            dict(posemb="rotary"),
            r"posemb must be one of 'learn', 'sincos2d', 'none', 'rope', got 'rotary'",
        ),
        (dict(rope_normalize_coords="diagonal"), "rope_normalize_coords must be one of"),
        (dict(rope_train_jitter=0.5), r"rope_train_jitter must be >= 1.0 \(1.0: off\), got 0.5"),
        (dict(rope_train_shift=-1.0), r"rope_train_shift must be >= 0.0"),
        (dict(rope_theta=0.0), r"rope_theta must be > 0"),
        (dict(hidden_size=36, transformer=dict(num_heads=2)), "a whole multiple of 4"),
        (dict(posemb_grid=(2, 2)), "posemb_grid / posemb_covers_prefix apply to posemb 'learn'"),
    ],
)
def test_a_bad_option_value_is_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message) as e:  # when built, or when run
        models.init_shapes(models.get_model(_tiny(**override), num_classes=None), (16, 16))
    assert "\n" not in str(e.value)


def test_what_the_capability_tables_refuse(tmp_path):
    dinov3 = hf_dinov3.CODEC.can.target
    cases = [  # (model, model_type, the refusal's words)
        (
            _tiny(posemb="learn", posemb_grid=(2, 2)),
            "dinov3_vit",
            "posemb 'learn' (supported: rope)",
        ),
        (_tiny(rope_normalize_coords="max"), "dinov3_vit", "rope_normalize_coords='max'"),
        (_tiny(transformer=dict(qk_norm=True)), "dinov3_vit", "query/key norms"),
        (_tiny(transformer=dict(layer_scale_init=None)), "dinov3_vit", "no LayerScale"),
        (_tiny(), "dinov2_with_registers", "posemb 'rope' (learned position embeddings only)"),
        (
            _tiny(posemb="learn", transformer=dict(mlp_bias=False)),
            "dinov2_with_registers",
            "no key bias (transformer.key_bias=False); no MLP bias (transformer.mlp_bias=False)",
        ),
    ]
    for config, model_type, words in cases:
        params = _random_params(config, hw=(16, 16))
        with pytest.raises(ConversionError) as e:
            hf.to_hf(params, config, tmp_path / "out", model_type=model_type, image_size=16)
        message = str(e.value)
        assert words in message and "\n" not in message, message
        assert message.startswith(f"{hf.CODECS[model_type].can.target} cannot express ")
        assert not (tmp_path / "out").exists()
    assert hf.hf_model_type(_tiny(), _random_params(_tiny())) == "dinov3_vit"
    assert dinov3 == "transformers DINOv3ViTModel"


# The published DINOv3 ViTs, written here from facebookresearch/dinov3 `dinov3/hub/backbones.py`
# (embed_dim, depth, num_heads, ffn_ratio, ffn_layer, qkv_bias; every one n_storage_tokens=4,
# mask_k_bias=True, patch 16) and turned into transformers' DINOv3ViTConfig as its
# `convert_dinov3_vit_to_hf.py` does: SwiGLU width int(D * ffn_ratio * 2 / 3) rounded up to a
# multiple of 8 (swiglu64, the 7B: of 64), hidden_act 'silu'; qkv_bias=False: no q/k/v biases.
PUBLISHED = {
    "DINOv3-S_16": (384, 12, 6, 4, None, True),
    "DINOv3-S+_16": (384, 12, 6, 6, 8, True),
    "DINOv3-B_16": (768, 12, 12, 4, None, True),
    "DINOv3-L_16": (1024, 24, 16, 4, None, True),
    "DINOv3-H+_16": (1280, 32, 20, 6, 8, True),
    "DINOv3-7B_16": (4096, 40, 32, 3, 64, False),
}


def _transformers_config(d, depth, heads, ffn_ratio, swiglu_align, qkv_bias):
    width = int(d * ffn_ratio)
    if swiglu_align:
        width = -(-int(width * 2 / 3) // swiglu_align) * swiglu_align
    return transformers.DINOv3ViTConfig(
        hidden_size=d,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=width,
        use_gated_mlp=bool(swiglu_align),
        hidden_act="silu" if swiglu_align else "gelu",
        query_bias=qkv_bias,
        key_bias=False,
        value_bias=qkv_bias,
        num_register_tokens=4,
        patch_size=16,
    )


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_parameter_counts_equal_transformers(name):
    """Ours (no head) = transformers' DINOv3ViTModel, built on the meta device (no memory),
    less its mask token (D: masked-image pretraining only, which we leave out)."""
    config = _transformers_config(*PUBLISHED[name])
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.DINOv3ViTModel(config).parameters())
    ours = models.count_params(models.get_model(name, num_classes=None), image_size=224)
    assert ours == theirs - config.hidden_size
    assert ours == models.count_params(models.get_model(name, num_classes=None), image_size=448)


def test_zoo_configs_build_and_run_small():
    """Every DINOv3 zoo entry builds at its published layout (init shapes only), with the
    published options: RoPE, 4 registers, no key bias (7B: no q/k/v biases), SwiGLU for S+ / H+
    / 7B."""
    for name in PUBLISHED:
        config = models.get_config(name)
        t = config.transformer
        assert (config.posemb, config.num_registers, t.key_bias) == ("rope", 4, False), name
        assert t.mlp_type == ("swiglu" if name[7:9] in ("S+", "H+", "7B") else "gelu"), name
        assert t.query_bias == t.value_bias == (name != "DINOv3-7B_16"), name
    small = models.get_model("DINOv3-S_16", num_classes=None)
    shapes = models.init_shapes(small, (32, 48))
    assert "posembed_input" not in shapes["Transformer"]
    out = jax.eval_shape(
        lambda p, x: small.apply({"params": p}, x, train=False)[1]["encoded"],
        shapes,
        jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32),
    )
    assert out.shape == (1, 1 + 4 + 6, 384)
