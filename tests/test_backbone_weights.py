"""Today's backbones' weights: SigLIP, DINOv2 (registers, SwiGLU) and DeiT through Hugging Face
transformers (parity at the native size and two others, one non-square, loaded with and without
`resolution=`; bit-exact round trips), timm state dicts and big_vision SigLIP `.npz` files;
unknown keys refused by name."""

import functools
import json

import jax
import numpy as np
import pytest
import scipy.ndimage
import tiny
from safetensors.numpy import load_file, save_file

from vit_jax import inference, models, weights
from vit_jax.convert.__main__ import main as cli
from vit_jax.weights import hf as hf_format
from vit_jax.weights.errors import ConversionError

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
    import transformers
except ImportError:
    torch = transformers = None

ATOL = 1e-4


def _images(size, n=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _saved(model, tmp_path, name="hf"):
    """`model` with every weight perturbed (so nothing is a zero or a one), saved, in eval."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval().save_pretrained(tmp_path / name)
    return tmp_path / name


def _run(config, params, x, num_classes=None):
    model = models.get_model(config, num_classes=num_classes)
    logits, out = jax.jit(functools.partial(model.apply, train=False))({"params": params}, x)
    return np.asarray(logits), {k: np.asarray(v) for k, v in out.items()}


def _images_hw(h, w, n=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


def _loaded(path, h, w, x):
    """The converted `.npz` run at h x w through `inference.load_model`: without `resolution=`
    (the recorded `posemb_grid` table resampled on the fly) and, for square sizes, loaded at
    that resolution; the same numbers both ways. Returns (intermediates, logits)."""
    runs = [inference.load_model(str(path))]
    if h == w:
        runs.append(inference.load_model(str(path), resolution=h))
    outs = [(r.intermediates(x), r.logits(x)) for r in runs]
    for out, logits in outs[1:]:
        np.testing.assert_array_equal(logits, outs[0][1])
        for key in ("encoded", "pre_logits"):
            np.testing.assert_array_equal(out[key], outs[0][0][key], err_msg=key)
    return outs[0]


def _converted(tmp_path, src):
    """`python -m vit_jax.convert SRC ours.npz`, then `weights.open`."""
    dst = tmp_path / "ours.npz"
    assert cli([str(src), str(dst)]) == 0
    params, meta = weights.open(dst)
    return params, models.get_config(meta["model"]), meta


def _round_trip(tmp_path, src, params, config):
    """ours -> HF (`python -m vit_jax.convert ours.npz DIR`) -> ours: bit-exact, and the
    written state dict equals the original one key for key."""
    back = tmp_path / "back"
    assert cli([str(tmp_path / "ours.npz"), str(back)]) == 0
    again = hf_format.from_hf(back)
    tiny.assert_same_tree(again.params, params)
    assert again.model_config.to_dict() == {**config.to_dict(), "name": again.model_config.name}
    original, written = (
        load_file(str(src / "model.safetensors")),
        load_file(str(back / "model.safetensors")),
    )
    return back, original, written


# ----------------------------------------------------------------------------- SigLIP


def _siglip(tmp_path, **overrides):
    torch.manual_seed(0)
    args = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = transformers.SiglipVisionConfig(**{**args, **overrides})
    return transformers.SiglipVisionModel(config)


@pytest.mark.torch
def test_hf_siglip_tokens_and_pooled_output_match_at_any_size(tmp_path):
    hf = _siglip(tmp_path)
    src = _saved(hf, tmp_path)
    params, config, meta = _converted(tmp_path, src)
    assert (config.classifier, config.posemb, config.gelu_approximate) == ("map", "learn", True)
    assert meta["image_size"] == [32, 32] and "cls" not in params
    assert (tuple(config.posemb_grid), config.posemb_resample) == ((4, 4), "bicubic")
    for h, w in ((32, 32), (48, 48), (24, 40)):
        x = _images_hw(h, w)
        with torch.no_grad():
            expected = hf(pixel_values=_nchw(x), interpolate_pos_encoding=(h, w) != (32, 32))
        out, logits = _loaded(tmp_path / "ours.npz", h, w, x)
        np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["pre_logits"], expected.pooler_output, atol=ATOL, rtol=0)
        np.testing.assert_allclose(logits, expected.pooler_output, atol=ATOL, rtol=0)
        assert np.abs(expected.pooler_output.numpy()).max() > 0.1
    back, original, written = _round_trip(tmp_path, src, params, config)
    assert sorted(written) == sorted(f"vision_model.{k}" for k in original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[f"vision_model.{key}"], value, err_msg=key)
    reloaded = transformers.SiglipVisionModel.from_pretrained(back).eval()
    x = _images(32)
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(pixel_values=_nchw(x)).pooler_output, hf(pixel_values=_nchw(x)).pooler_output
        )


@pytest.mark.torch
def test_full_siglip_checkpoint_reads_its_image_tower(tmp_path):
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=8,
    )
    full = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config=vision)
    )
    src = _saved(full, tmp_path)
    c = hf_format.from_hf(src)
    x = _images(16)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=_nchw(x))
    _, out = _run(c.model_config, c.params, x)
    np.testing.assert_allclose(out["pre_logits"], expected.pooler_output, atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.torch
def test_siglip_unknown_key_and_missing_head_are_refused_by_name(tmp_path):
    src = _saved(_siglip(tmp_path), tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["head.attention.extra_bias"] = np.zeros(3, np.float32)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"head\.attention\.extra_bias \(3,\)"):
        hf_format.from_hf(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vision_use_head": False}))
    with pytest.raises(ConversionError, match="vision_use_head false"):
        hf_format.from_hf(src)


# ----------------------------------------------------------------------------- DINOv2


def _dinov2(registers=0, **overrides):
    torch.manual_seed(0)
    args = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=7,
        layerscale_value=0.5,
    )
    args.update(overrides)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **args)
        return transformers.Dinov2WithRegistersModel(config)
    return transformers.Dinov2Model(transformers.Dinov2Config(**args))


@pytest.mark.parametrize(
    "registers, swiglu", [(0, False), (0, True), (2, False)], ids=["plain", "swiglu", "reg2"]
)
@pytest.mark.torch
def test_hf_dinov2_tokens_and_pooled_output_match_at_any_size(tmp_path, registers, swiglu):
    hf = _dinov2(registers, use_swiglu_ffn=swiglu)
    src = _saved(hf, tmp_path)
    params, config, meta = _converted(tmp_path, src)
    assert config.classifier == "token" and config.transformer.layer_scale_init == 0.5
    assert config.get("num_registers", 0) == registers and meta["image_size"] == [28, 28]
    if swiglu:  # (int(64 * 2 / 3) + 7) // 8 * 8
        assert config.transformer.mlp_type == "swiglu" and config.transformer.mlp_dim == 48
    method = "bicubic_antialias" if registers else "bicubic"  # as transformers resamples
    assert (tuple(config.posemb_grid), config.posemb_resample) == ((4, 4), method)
    for h, w in ((28, 28), (42, 42), (21, 35)):
        x = _images_hw(h, w)
        with torch.no_grad():
            expected = hf(pixel_values=_nchw(x))
        out, _ = _loaded(tmp_path / "ours.npz", h, w, x)
        np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["pre_logits"], expected.pooler_output, atol=ATOL, rtol=0)
    back, original, written = _round_trip(tmp_path, src, params, config)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        expected_value = np.zeros_like(value) if key == "embeddings.mask_token" else value
        np.testing.assert_array_equal(written[key], expected_value, err_msg=key)
    cls = type(hf)
    reloaded = cls.from_pretrained(back).eval()
    x = _images(28)
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(pixel_values=_nchw(x)).last_hidden_state,
            hf(pixel_values=_nchw(x)).last_hidden_state,
        )


@pytest.mark.torch
def test_dinov2_classifier_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=14,
        patch_size=7,
        num_labels=3,
    )
    src = _saved(transformers.Dinov2ForImageClassification(config), tmp_path)
    with pytest.raises(ConversionError, match="classifier.weight: Dinov2ForImageClassification"):
        hf_format.from_hf(src)


@pytest.mark.torch
def test_dinov2_transformers5_in_memory_names_read_the_same(tmp_path):
    hf = _dinov2(use_swiglu_ffn=True)
    src = _saved(hf, tmp_path)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert "encoder.layer.0.mlp.gate_proj.weight" in state  # transformers 5 names
    v5 = tmp_path / "v5"
    v5.mkdir()
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    (v5 / "config.json").write_text((src / "config.json").read_text())
    tiny.assert_same_tree(hf_format.from_hf(v5).params, hf_format.from_hf(src).params)


# ----------------------------------------------------------------------------- DeiT


def _deit_config(**overrides):
    args = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    return transformers.DeiTConfig(**{**args, **overrides})


@pytest.mark.torch
def test_hf_deit_with_teacher_matches_at_any_size(tmp_path):
    torch.manual_seed(0)
    hf = transformers.DeiTForImageClassificationWithTeacher(_deit_config())
    src = _saved(hf, tmp_path)
    params, config, meta = _converted(tmp_path, src)
    assert config.distillation_token and meta["class_names"] == ["a", "b", "c"]
    assert (config.gelu_approximate, config.layernorm_epsilon) == (False, 1e-12)
    assert (tuple(config.posemb_grid), config.posemb_resample) == ((4, 4), "bicubic")
    for h, w in ((32, 32), (48, 48), (40, 24)):
        x = _images_hw(h, w)
        interpolate = (h, w) != (32, 32)
        with torch.no_grad():
            expected = hf(pixel_values=_nchw(x), interpolate_pos_encoding=interpolate)
            hidden = hf.deit(pixel_values=_nchw(x), interpolate_pos_encoding=interpolate)
        out, logits = _loaded(tmp_path / "ours.npz", h, w, x)
        np.testing.assert_allclose(logits, expected.logits, atol=ATOL, rtol=0)
        np.testing.assert_allclose(
            out["logits_dist"], expected.distillation_logits, atol=ATOL, rtol=0
        )
        np.testing.assert_allclose(out["encoded"], hidden.last_hidden_state, atol=ATOL, rtol=0)
    _, original, written = _round_trip(tmp_path, src, params, config)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.torch
def test_hf_deit_model_pooler_is_our_representation(tmp_path):
    torch.manual_seed(0)
    hf = transformers.DeiTModel(_deit_config())
    src = _saved(hf, tmp_path)
    params, config, _ = _converted(tmp_path, src)
    assert config.representation_size == 32
    x = _images(32)
    with torch.no_grad():
        expected = hf(pixel_values=_nchw(x))
    _, out = _run(config, params, x)
    np.testing.assert_allclose(out["encoded"], expected.last_hidden_state, atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["pre_logits"][:, 0], expected.pooler_output, atol=ATOL, rtol=0)
    _round_trip(tmp_path, src, params, config)


@pytest.mark.torch
def test_deit_classifier_on_the_class_token_alone_is_refused(tmp_path):
    torch.manual_seed(0)
    src = _saved(transformers.DeiTForImageClassification(_deit_config()), tmp_path)
    with pytest.raises(ConversionError, match="classifier.weight: DeiTForImageClassification"):
        hf_format.from_hf(src)


# ----------------------------------------------------------------------------- big_vision

BV_SPEC = dict(
    name="bv-siglip",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
    classifier="map",
    posemb="learn",
    gelu_approximate=True,
    layernorm_epsilon=1e-6,
)


def _big_vision_file(path, layers=2, d=16, heads=2, mlp=32, width=8, seed=0):
    """A big_vision SigLIP checkpoint's key layout (scanned image tower under params/img/,
    Linen block names, the text tower and the scalars t, b beside it), random weights."""
    rng = np.random.RandomState(seed)
    hd = d // heads

    def attention(prefix, depth=()):
        out = {}
        for name in ("query", "key", "value"):
            out[f"{prefix}/{name}/kernel"] = (*depth, d, heads, hd)
            out[f"{prefix}/{name}/bias"] = (*depth, heads, hd)
        out[f"{prefix}/out/kernel"], out[f"{prefix}/out/bias"] = (*depth, heads, hd, d), (*depth, d)
        return out

    def mlp_block(prefix, depth=()):
        return {
            f"{prefix}/Dense_0/kernel": (*depth, d, mlp),
            f"{prefix}/Dense_0/bias": (*depth, mlp),
            f"{prefix}/Dense_1/kernel": (*depth, mlp, d),
            f"{prefix}/Dense_1/bias": (*depth, d),
        }

    def norm(prefix, depth=()):
        return {f"{prefix}/scale": (*depth, d), f"{prefix}/bias": (*depth, d)}

    block, head = "img/Transformer/encoderblock", "img/MAPHead_0"
    shapes = {
        "img/embedding/kernel": (4, 4, 3, d),
        "img/embedding/bias": (d,),
        "img/pos_embedding": (1, 16, d),
        **norm(f"{block}/LayerNorm_0", (layers,)),
        **attention(f"{block}/MultiHeadDotProductAttention_0", (layers,)),
        **norm(f"{block}/LayerNorm_1", (layers,)),
        **mlp_block(f"{block}/MlpBlock_0", (layers,)),
        **norm("img/Transformer/encoder_norm"),
        f"{head}/probe": (1, 1, d),
        **attention(f"{head}/MultiHeadDotProductAttention_0"),
        **norm(f"{head}/LayerNorm_0"),
        **mlp_block(f"{head}/MlpBlock_0"),
        "img/head/kernel": (d, width),
        "img/head/bias": (width,),
        "txt/Embed_0/embedding": (50, d),
        "txt/head/kernel": (d, width),
        "t": (1,),
        "b": (1,),
    }
    flat = {f"params/{k}": rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
    np.savez(path, **flat)
    return flat


@pytest.mark.torch
def test_big_vision_siglip_file_loads_matches_hf_and_round_trips(tmp_path, caplog):
    flat = _big_vision_file(tmp_path / "siglip.npz")
    # absl's logger: a SavedModel export earlier in this process may have raised its level.
    with caplog.at_level("INFO", logger="absl"):
        params, meta = weights.open(tmp_path / "siglip.npz", model=BV_SPEC)
    assert "leaving out 4 entries (b, t, txt/)" in caplog.text
    config = models.get_config(meta["model"])
    assert meta["image_size"] == [16, 16]
    per_layer = models.unstack_layers(params)
    assert per_layer["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 16)
    # the native grid is recorded: another size (non-square) runs without resolution=, the
    # table resampled as big_vision's resample_posemb does (scipy.ndimage.zoom, order 1)
    assert (tuple(config.posemb_grid), config.posemb_resample) == ((4, 4), "linear_align_corners")
    table = per_layer["Transformer"]["posembed_input"]["pos_embedding"].reshape(4, 4, 16)
    zoomed = scipy.ndimage.zoom(table.astype(np.float64), (6 / 4, 3 / 4, 1), order=1)
    plain = dict(BV_SPEC, posemb_grid=None)
    moved = {**per_layer, "Transformer": dict(per_layer["Transformer"])}
    moved["Transformer"]["posembed_input"] = {"pos_embedding": zoomed.reshape(1, 18, 16)}
    x = _images_hw(24, 12)
    trained = inference.load_model(str(tmp_path / "siglip.npz"), model=BV_SPEC)
    want, _ = _run(models.get_config(plain), moved, x, num_classes=8)
    np.testing.assert_allclose(trained.logits(x), want, atol=1e-5, rtol=0)
    # the image tower without its projection equals transformers' SiglipVisionModel
    features = {k: v for k, v in per_layer.items() if k != "head"}
    hf_dir = hf_format.to_hf(features, config, tmp_path / "hf")
    hf = transformers.SiglipVisionModel.from_pretrained(hf_dir).eval()
    x = _images(16)
    with torch.no_grad():
        expected = hf(pixel_values=_nchw(x)).pooler_output.numpy()
    logits, out = _run(config, per_layer, x, num_classes=8)
    np.testing.assert_allclose(out["pre_logits"], expected, atol=ATOL, rtol=0)
    head = flat["params/img/head/kernel"], flat["params/img/head/bias"]
    np.testing.assert_allclose(logits, expected @ head[0] + head[1], atol=ATOL, rtol=0)
    # written back in the published layout, bit for bit (the image tower)
    path, fmt = weights.save(params, meta, tmp_path / "back.npz", layout="big_vision")
    with np.load(path) as written:
        back = {k: written[k] for k in written.files}
    image = {k: v for k, v in flat.items() if k.startswith("params/img/")}
    assert sorted(back) == sorted(image) and fmt == "npz"
    for key, value in image.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # ... and through the converter (python -m vit_jax.convert ... --layout big_vision)
    from vit_jax import convert

    *_, again, _ = convert.convert(
        tmp_path / "siglip.npz", tmp_path / "again.npz", model=BV_SPEC, layout="big_vision"
    )
    with np.load(again) as written:
        assert sorted(written.files) == sorted(image)
    with pytest.raises(
        ConversionError, match="SiglipVisionModel has no classifier.*head/kernel \\(16, 8\\)"
    ):
        hf_format.to_hf(per_layer, config, tmp_path / "refused")


# ----------------------------------------------------------------------------- timm


def _timm_round_trip(tmp_path, params, config, expected_keys):
    """ours -> timm state dict -> ours bit-exact, and -> timm again key for key."""
    from vit_jax.weights import pytorch
    from vit_jax.weights import timm as timm_format

    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors")
    state = pytorch.read_safetensors(path)
    for key, shape in expected_keys.items():
        assert state[key].shape == shape, key
    back = timm_format.from_timm(path)
    tiny.assert_same_tree(back.params, params)
    again = pytorch.read_safetensors(
        timm_format.to_timm(back.params, back.model_config, tmp_path / "again.safetensors")
    )
    assert sorted(again) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    return back, state


@pytest.mark.torch
def test_timm_siglip_map_head_rows_round_trip(tmp_path):
    src = _saved(_siglip(tmp_path), tmp_path)
    c = hf_format.from_hf(src)
    keys = {
        "attn_pool.latent": (1, 1, 32),
        "attn_pool.q.weight": (32, 32),
        "attn_pool.kv.weight": (64, 32),
        "attn_pool.kv.bias": (64,),
        "attn_pool.proj.weight": (32, 32),
        "attn_pool.mlp.fc1.weight": (48, 32),
        "pos_embed": (1, 16, 32),
    }
    back, state = _timm_round_trip(tmp_path, c.params, c.model_config, keys)
    assert "cls_token" not in state and back.model_config.classifier == "map"
    hf_state = load_file(str(src / "model.safetensors"))  # q / kv are HF's in_proj rows
    in_proj = hf_state["head.attention.in_proj_weight"]
    np.testing.assert_array_equal(state["attn_pool.q.weight"], in_proj[:32])
    np.testing.assert_array_equal(state["attn_pool.kv.weight"], in_proj[32:])


@pytest.mark.torch
@pytest.mark.parametrize("swiglu", [False, True], ids=["reg2", "reg2-swiglu"])
def test_timm_dinov2_registers_layer_scale_swiglu_round_trip(tmp_path, swiglu):
    src = _saved(_dinov2(2, use_swiglu_ffn=swiglu), tmp_path)
    c = hf_format.from_hf(src)
    mlp = c.model_config.transformer.mlp_dim
    keys = {
        "reg_token": (1, 2, 32),
        "blocks.1.ls2.gamma": (32,),
        "blocks.0.mlp.fc1.weight": ((2 if swiglu else 1) * mlp, 32),
        "blocks.0.mlp.fc2.weight": (32, mlp),
        "pos_embed": (1, 17, 32),
    }
    back, state = _timm_round_trip(tmp_path, c.params, c.model_config, keys)
    assert back.model_config.num_registers == 2
    assert back.model_config.transformer.get("mlp_type", "gelu") == ("swiglu" if swiglu else "gelu")
    hf_state = load_file(str(src / "model.safetensors"))
    name = "weights_in" if swiglu else "fc1"
    np.testing.assert_array_equal(
        state["blocks.0.mlp.fc1.weight"], hf_state[f"encoder.layer.0.mlp.{name}.weight"]
    )


def test_timm_deit3_no_embed_class_and_qk_norm_round_trip(tmp_path):
    spec = dict(
        name="deit3-tiny",
        patches=dict(size=(4, 4)),
        hidden_size=16,
        transformer=dict(mlp_dim=32, num_heads=2, num_layers=2, layer_scale_init=0.1, qk_norm=True),
        posemb_covers_prefix=False,
        gelu_approximate=False,
    )
    config = models.get_config(spec)
    model = models.get_model(config, num_classes=3)
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, (8, 8))
    )
    keys = {
        "pos_embed": (1, 4, 16),
        "cls_token": (1, 1, 16),
        "blocks.0.attn.q_norm.weight": (8,),
        "blocks.1.attn.k_norm.bias": (8,),
    }
    back, _ = _timm_round_trip(tmp_path, params, config, keys)
    assert back.model_config.posemb_covers_prefix is False
    assert back.model_config.transformer.qk_norm is True
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["timm"]["kwargs"]["no_embed_class"] and meta["timm"]["kwargs"]["qk_norm"]


@pytest.mark.torch
def test_timm_register_rows_in_pos_embed_are_refused(tmp_path):
    from vit_jax.weights import pytorch
    from vit_jax.weights import timm as timm_format

    c = hf_format.from_hf(_saved(_dinov2(2), tmp_path))
    path = timm_format.to_timm(c.params, c.model_config, tmp_path / "m.safetensors")
    state = pytorch.read_safetensors(path)
    state["pos_embed"] = np.zeros((1, 1 + 2 + 16, 32), np.float32)
    save_file(state, str(path))
    with pytest.raises(ConversionError, match=r"pos_embed \(1, 19, 32\) has rows for the register"):
        timm_format.from_timm(path)
