"""PyTorch interop: parity with Hugging Face transformers, the timm layout, the CLI, bad input."""

import functools
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny
from safetensors.numpy import save_file

from vit_jax import checkpoint, models, weights
from vit_jax.convert.__main__ import main as cli
from vit_jax.weights import hf as hf_format
from vit_jax.weights import pytorch
from vit_jax.weights import timm as timm_format
from vit_jax.weights.errors import ConversionError

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
    import torch.nn.functional as F
    import transformers
except ImportError:
    torch = F = transformers = None

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
HW = (8, 12)  # a non-square image: 2 x 3 patches


def _images(hw=HW, n=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, *hw, 3)).astype(np.float32)


def _ours(spec=TINY, num_classes=5, hw=HW, seed=0, **overrides):
    """(model, config, random numpy params)."""
    config = models.get_config(spec, **overrides)
    model = models.get_model(config, num_classes=num_classes)
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, hw)
    )
    return model, config, params


def _apply(model, params, x):
    return np.asarray(
        jax.jit(functools.partial(model.apply, train=False))({"params": params}, x)[0]
    )


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


# ----------------------------------------------------------------------------- Hugging Face


def _hf_model(tmp_path, name="hf", **config):
    """A randomly initialised tiny ViTForImageClassification (every weight perturbed), saved."""
    torch.manual_seed(0)
    args = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=list(HW),
        patch_size=4,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fish"},
        label2id={"cat": 0, "dog": 1, "fish": 2},
    )
    args.update(config)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


@pytest.mark.torch
def test_hf_to_ours_gives_the_same_logits(tmp_path):
    hf, path = _hf_model(tmp_path)  # exact GELU, layer_norm_eps 1e-12, a 2 x 3 patch grid
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=_nchw(x)).logits.numpy()
    c = hf_format.from_hf(path)
    assert c.image_size == HW and c.class_names == ["cat", "dog", "fish"]
    cfg = c.model_config
    assert (cfg.gelu_approximate, cfg.layernorm_epsilon, cfg.classifier) == (False, 1e-12, "token")
    assert (cfg.hidden_size, cfg.transformer.num_heads, cfg.transformer.num_layers) == (16, 2, 2)
    ours = _apply(models.get_model(cfg, num_classes=3), c.params, x)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1  # a real comparison, not of zeros


@pytest.mark.torch
def test_hf_without_qkv_bias_reads_zero_biases(tmp_path):
    hf, path = _hf_model(tmp_path, qkv_bias=False)
    assert "vit.encoder.layer.0.attention.attention.query.bias" not in hf.state_dict()
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=_nchw(x)).logits.numpy()
    c = hf_format.from_hf(path)
    attn = c.params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]
    np.testing.assert_array_equal(attn["value"]["bias"], np.zeros((2, 8), np.float32))
    ours = _apply(models.get_model(c.model_config, num_classes=3), c.params, x)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("gelu_approximate", [True, False])
def test_ours_to_hf_gives_the_same_logits(tmp_path, gelu_approximate):
    model, config, params = _ours(gelu_approximate=gelu_approximate)
    x = _images()
    expected = _apply(model, params, x)
    out = hf_format.to_hf(params, config, tmp_path / "hf", class_names=list("abcde"), image_size=HW)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["hidden_act"] == ("gelu_pytorch_tanh" if gelu_approximate else "gelu")
    assert hf_config["image_size"] == list(HW) and hf_config["id2label"]["4"] == "e"
    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = hf(pixel_values=_nchw(x)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    back = hf_format.from_hf(out)  # and back, bit for bit
    tiny.assert_same_tree(back.params, params)
    assert back.class_names == list("abcde") and back.model_config.layernorm_epsilon == 1e-6


@pytest.mark.torch
def test_ours_features_with_representation_to_hf_pooler(tmp_path):
    model, config, params = _ours(num_classes=None, hw=(8, 8), representation_size=12)
    x = _images((8, 8))
    expected = _apply(model, params, x)
    out = hf_format.to_hf(params, config, tmp_path / "features")
    hf = transformers.ViTModel.from_pretrained(out).eval()
    with torch.no_grad():
        pooled = hf(pixel_values=_nchw(x)).pooler_output.numpy()
    np.testing.assert_allclose(pooled, expected, atol=1e-4, rtol=0)
    back = hf_format.from_hf(out)
    assert back.model_config.representation_size == 12 and back.class_names is None
    tiny.assert_same_tree(back.params, params)


@pytest.mark.torch
def test_hf_reads_transformers5_in_memory_names(tmp_path):
    hf, path = _hf_model(tmp_path)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in state  # transformers 5 names
    v5 = tmp_path / "v5"
    v5.mkdir()
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    (v5 / "config.json").write_text((path / "config.json").read_text())
    tiny.assert_same_tree(hf_format.from_hf(v5).params, hf_format.from_hf(path).params)


@pytest.mark.torch
def test_hf_reads_sharded_safetensors_and_weights_only_bin(tmp_path):
    hf, path = _hf_model(tmp_path)
    expected = hf_format.from_hf(path).params
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((path / "config.json").read_text())
    tiny.assert_same_tree(hf_format.from_hf(sharded).params, expected)
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    tiny.assert_same_tree(hf_format.from_hf(path).params, expected)


@pytest.mark.torch
def test_load_pretrained_and_predict_read_an_hf_directory(tmp_path):
    _, path = _hf_model(tmp_path)
    params, meta = weights.open(path)
    config, names = meta["model"], meta["class_names"]
    assert config["gelu_approximate"] is False and names == ["cat", "dog", "fish"]
    # the converted config keeps the table's native 2 x 3 grid (resampled on the fly); a model
    # without a fixed grid gets it resampled at load time, by transformers' own bicubic
    assert (tuple(config["posemb_grid"]), config["posemb_resample"]) == ((2, 3), "bicubic")
    stored = params["Transformer"]["posembed_input"]["pos_embedding"]
    for grid, want in (((2, 3), (1, 1 + 2 * 3, 16)), (None, (1, 1 + 4 * 6, 16))):
        target = models.get_config(config, posemb_grid=grid)
        model = models.get_model(target, num_classes=7)
        shapes = models.init_shapes(model, (16, 24))
        init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        tuned = checkpoint.load_pretrained(
            pretrained_path=path, init_params=init, model_config=target, image_size=(16, 24)
        )
        assert tuned["head"]["kernel"].shape == (16, 7)
        table = tuned["Transformer"]["posembed_input"]["pos_embedding"]
        assert table.shape == want
    np.testing.assert_array_equal(table[:, :1], stored[:, :1])
    grid = torch.from_numpy(np.asarray(stored[0, 1:])).reshape(1, 2, 3, 16).permute(0, 3, 1, 2)
    bicubic = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    bicubic = bicubic.permute(0, 2, 3, 1).reshape(1, 24, 16).numpy()
    np.testing.assert_allclose(table[:, 1:], bicubic, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- timm


def _timm_reference(state, x, *, heads, gelu_tanh=False, eps=1e-6, no_embed_class=False):
    """timm VisionTransformer's forward (eval), written from its state-dict layout."""
    s = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    x = _nchw(x)
    w = s["patch_embed.proj.weight"]
    x = F.conv2d(x, w, s["patch_embed.proj.bias"], stride=w.shape[-2:]).flatten(2).transpose(1, 2)
    b, _, d = x.shape
    prefix = [s[k].expand(b, -1, -1) for k in ("cls_token", "dist_token") if k in s]
    if no_embed_class:
        x = torch.cat([*prefix, x + s["pos_embed"]], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + s["pos_embed"]
    n, hd = x.shape[1], d // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = lambda name, i=i: s[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = (
            F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
            .reshape(b, n, 3, heads, hd)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        y = F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        x = x + (y * p("ls1.gamma") if f"blocks.{i}.ls1.gamma" in s else y)  # LayerScale
        y = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps)
        y = F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))
        y = F.gelu(y, approximate="tanh" if gelu_tanh else "none")
        y = F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + (y * p("ls2.gamma") if f"blocks.{i}.ls2.gamma" in s else y)
        i += 1
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], eps)
    if "dist_token" in s:
        out = F.linear(x[:, 0], s["head.weight"], s["head.bias"])
        out = (out + F.linear(x[:, 1], s["head_dist.weight"], s["head_dist.bias"])) / 2
    else:
        pooled = x[:, 0] if "cls_token" in s else x.mean(1)
        out = F.linear(pooled, s["head.weight"], s["head.bias"])
    return out.numpy()


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(classifier="gap"), dict(distillation_token=True)],
    ids=["token", "gap", "distilled"],
)
@pytest.mark.torch
def test_timm_layout_matches_reference_forward_and_round_trips(tmp_path, overrides):
    model, config, params = _ours(gelu_approximate=False, **overrides)
    x = _images()
    expected = _apply(model, params, x)
    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors", image_size=HW)
    state = pytorch.read_safetensors(path)
    d = config.hidden_size
    assert state["blocks.1.attn.qkv.weight"].shape == (3 * d, d)
    assert ("cls_token" in state) == (config.classifier == "token")
    np.testing.assert_allclose(_timm_reference(state, x, heads=2), expected, atol=1e-4, rtol=0)
    meta = json.loads((tmp_path / "m.json").read_text())
    kwargs = meta["timm"]["kwargs"]
    assert (kwargs["num_heads"], kwargs["img_size"], kwargs["num_classes"]) == (2, list(HW), 5)
    back = timm_format.from_timm(path)  # heads, image size and config from the sidecar
    tiny.assert_same_tree(back.params, params)
    assert back.image_size == HW
    for field in ("classifier", "distillation_token", "gelu_approximate"):
        assert back.model_config[field] == config[field]


@pytest.mark.torch
def test_timm_without_sidecar_needs_heads_and_reads_no_embed_class(tmp_path):
    model, config, params = _ours(hw=(8, 8), gelu_approximate=False)
    params["Transformer"]["posembed_input"]["pos_embedding"][:, 0] = 0
    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors")
    os.remove(tmp_path / "m.json")
    state = pytorch.read_safetensors(path)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm no_embed_class=True
    save_file(state, str(path))
    x = _images((8, 8))
    reference = _timm_reference(state, x, heads=2, no_embed_class=True)
    with pytest.raises(ConversionError, match="number of attention heads; pass --model"):
        timm_format.from_timm(path)
    back = timm_format.from_timm(path, num_heads=2)
    # no_embed_class: a table of the patches only (posemb_covers_prefix=False), as timm has it
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    params["Transformer"]["posembed_input"]["pos_embedding"] = posemb[:, 1:]
    tiny.assert_same_tree(back.params, params)
    assert back.image_size == (8, 8) and back.model_config.layernorm_epsilon == 1e-6
    assert back.model_config.posemb_covers_prefix is False
    np.testing.assert_allclose(
        _apply(
            model,
            {
                **params,
                "Transformer": {
                    **params["Transformer"],
                    "posembed_input": {"pos_embedding": posemb},
                },
            },
            x,
        ),
        reference,
        atol=1e-4,
        rtol=0,
    )
    ours = models.get_model(back.model_config, num_classes=5)
    np.testing.assert_allclose(_apply(ours, back.params, x), reference, atol=1e-4, rtol=0)
    again = timm_format.to_timm(back.params, back.model_config, tmp_path / "again.safetensors")
    written = pytorch.read_safetensors(again)  # and back to timm, bit for bit
    assert sorted(written) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize(
    "architecture,heads,classifier,gelu_tanh",
    [
        ("vit_base_patch16_224.augreg_in21k", 12, "token", False),
        ("vit_base_patch16_gap_224", 16, "gap", False),  # 16 heads of 48, not 12 of 64
        ("vit_base_patch32_siglip_gap_256", 12, "gap", True),  # timm builds it with gelu_tanh
    ],
)
@pytest.mark.torch
def test_timm_hub_architecture_gives_heads_and_gelu(
    tmp_path, architecture, heads, classifier, gelu_tanh
):
    """A timm hub checkpoint (state dict + `config.json`, no sidecar): the heads and the GELU
    come from the architecture's name (facts of timm's model definitions), and the model then
    computes what timm's forward computes. Measured against timm 1.0.31 itself by
    benchmarks/timm_parity.py (BENCHMARKS.md); before, these read as 12 heads / exact GELU."""
    spec = dict(TINY, hidden_size=768, transformer=dict(mlp_dim=64, num_heads=heads, num_layers=1))
    _, config, params = _ours(spec, classifier=classifier, gelu_approximate=gelu_tanh)
    path = timm_format.to_timm(params, config, tmp_path / "model.safetensors", image_size=HW)
    os.remove(tmp_path / "model.json")  # what the hub has: config.json beside the weights
    hub = {"architecture": architecture, "pretrained_cfg": {"input_size": [3, *HW]}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    back = timm_format.from_timm(path)
    assert back.model_config.transformer.num_heads == heads
    assert back.model_config.gelu_approximate is gelu_tanh
    assert back.model_config.classifier == classifier and back.image_size == HW
    x = _images()
    reference = _timm_reference(pytorch.read_safetensors(path), x, heads=heads, gelu_tanh=gelu_tanh)
    ours = models.get_model(back.model_config, num_classes=5)
    np.testing.assert_allclose(_apply(ours, back.params, x), reference, atol=1e-4, rtol=0)
    hub["architecture"] = "vit_base_patch16_224_custom_width"  # ("base", 768) still says 12
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert timm_format.from_timm(path).model_config.transformer.num_heads == 12
    hub["architecture"] = "vit_medium_patch16_224"  # medium is 512 wide: no guess at 768
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(ConversionError, match="number of attention heads; pass --model"):
        timm_format.from_timm(path)


def test_a_timm_hub_folder_reads_as_its_weights_file(tmp_path):
    """A downloaded timm hub folder (`config.json` naming an `architecture`, `model.safetensors`)
    is a timm checkpoint, not a transformers directory; without weights it says what it wants."""
    _, config, params = _ours()
    folder = tmp_path / "hub"
    folder.mkdir()
    path = timm_format.to_timm(params, config, folder / "model.safetensors", image_size=HW)
    os.remove(folder / "model.json")
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    hub = {"architecture": "vit_tiny_patch4_8x12", "pretrained_cfg": {"input_size": [3, *HW]}}
    hub["pretrained_cfg"].update(imagenet)
    (folder / "config.json").write_text(json.dumps(hub))
    assert weights.format_of(folder) == weights.format_of(path) == "timm"
    from_folder, meta = weights.open(folder, num_heads=2)
    from_file, file_meta = weights.open(path, num_heads=2)
    tiny.assert_same_tree(from_folder, params)
    tiny.assert_same_tree(from_file, params)
    assert meta == file_meta and meta["format"] == "timm" and meta["image_size"] == list(HW)
    assert meta["normalization"] == imagenet
    hf_dir = hf_format.to_hf(params, config, tmp_path / "hf", image_size=HW)
    assert weights.format_of(hf_dir) == "hf"  # its config.json has a model_type
    path.unlink()
    with pytest.raises(
        ConversionError,
        match=f"{folder}: a timm hub folder without weights; expected model.safetensors or "
        "pytorch_model.bin",
    ):
        weights.open(folder, num_heads=2)


def test_timm_features_timm_cannot_express_are_refused(tmp_path):
    _, config, params = _ours(hw=(8, 8))
    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors")
    state = pytorch.read_safetensors(path)
    state["fc_norm.weight"] = np.ones(16, np.float32)
    save_file(state, str(path))
    with pytest.raises(ConversionError, match="the model has a LayerNorm after pooling"):
        timm_format.from_timm(path)


def _with_layer_scale(state, layers=2, d=16, seed=1):
    rng = np.random.RandomState(seed)
    for i in range(layers):
        for name in ("ls1", "ls2"):
            state[f"blocks.{i}.{name}.gamma"] = rng.uniform(0.01, 2, d).astype(np.float32)
    return state


def test_timm_layer_scale_converts_to_ours_and_back_bit_exact(tmp_path):
    _, config, params = _ours(hw=(8, 8), gelu_approximate=False)
    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors")
    state = _with_layer_scale(pytorch.read_safetensors(path))
    os.remove(tmp_path / "m.json")
    save_file(state, str(path))
    ours = timm_format.from_timm(path, num_heads=2)
    block = ours.params["Transformer"]["encoderblock_1"]
    np.testing.assert_array_equal(block["LayerScale_3"]["scale"], state["blocks.1.ls2.gamma"])
    assert ours.model_config.transformer.layer_scale_init == 1e-5  # timm's usual init_values
    back = timm_format.to_timm(ours.params, ours.model_config, tmp_path / "back.safetensors")
    written = pytorch.read_safetensors(back)
    assert sorted(written) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    meta = json.loads((tmp_path / "back.json").read_text())
    assert meta["timm"]["kwargs"]["init_values"] == 1e-5
    assert timm_format.from_timm(back).model_config.transformer.layer_scale_init == 1e-5


@pytest.mark.torch
def test_layer_scale_model_matches_timm_reference_forward(tmp_path):
    spec = dict(TINY, transformer=dict(TINY["transformer"], layer_scale_init=0.1))
    model, config, params = _ours(spec, gelu_approximate=False)  # every scale random
    x = _images()
    expected = _apply(model, params, x)
    path = timm_format.to_timm(params, config, tmp_path / "m.safetensors", image_size=HW)
    state = pytorch.read_safetensors(path)
    np.testing.assert_array_equal(
        state["blocks.0.ls1.gamma"],
        params["Transformer"]["encoderblock_0"]["LayerScale_1"]["scale"],
    )
    reference = _timm_reference(state, x, heads=2)
    np.testing.assert_allclose(reference, expected, atol=1e-4, rtol=0)
    without = {k: v for k, v in state.items() if ".ls" not in k}  # the scales matter
    assert np.abs(_timm_reference(without, x, heads=2) - expected).max() > 1e-2
    back = timm_format.from_timm(path)
    tiny.assert_same_tree(back.params, params)
    assert back.model_config.transformer.layer_scale_init == 0.1  # from the sidecar


def test_hf_refuses_layer_scale_naming_the_key(tmp_path):
    _, config, params = _ours(hw=(8, 8))
    blocks = params["Transformer"]
    for i in range(2):
        for name in ("LayerScale_1", "LayerScale_3"):
            blocks[f"encoderblock_{i}"][name] = {"scale": np.ones(16, np.float32)}
    with pytest.raises(ConversionError) as e:
        hf_format.to_hf(params, config, tmp_path / "hf")
    assert str(e.value) == (
        "transformers ViT cannot express tiny: "
        "LayerScale (Transformer/encoderblock_0/LayerScale_1/scale)"
    )
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- the engine

DIMS = dict(D=12, H=3, hd=4, M=20, ph=2, pw=3, T=7, N=5, R=6)
FORMATS = {
    "hf": (hf_format.TABLE, {"head", "representation", "qkv_bias"}),
    "timm": (
        timm_format.TABLE,
        {"class_token", "distillation", "head", "head_dist", "layer_scale"},
    ),
}


def _random(shapes, seed=0):
    rng = np.random.RandomState(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _keymap(fmt, layers=2):
    table, features = FORMATS[fmt]
    return table.at(layers=layers, dims=DIMS, features=features)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_table_round_trips_both_ways_bit_exact(fmt):
    keys = _keymap(fmt)
    ours = _random({k: e.ours_shape for e in keys.entries for k in e.ours})
    theirs = keys.to_theirs(ours, source="ours", what="the table")
    assert sorted(theirs) == sorted(keys.theirs_keys())
    tiny.assert_same_tree(keys.to_ours(theirs, source="theirs", what="the table"), ours)
    theirs = _random({e.theirs: e.theirs_shape for e in keys.entries}, seed=1)
    back = keys.to_theirs(keys.to_ours(theirs, source="theirs", what="t"), source="ours", what="t")
    tiny.assert_same_tree(back, theirs)
    # the layouts, checked independently of the transforms
    d, h, hd = DIMS["D"], DIMS["H"], DIMS["hd"]
    np.testing.assert_array_equal(
        ours["embedding/kernel"], theirs_of(keys, ours, "embedding/kernel").transpose(2, 3, 1, 0)
    )
    attn = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
    for j, name in enumerate(("query", "key", "value")):
        rows = theirs_of(keys, ours, f"{attn}{name}/kernel")
        if fmt == "timm":  # fused: rows j*D .. (j+1)*D of attn.qkv
            rows = rows[j * d : (j + 1) * d]
        np.testing.assert_array_equal(ours[f"{attn}{name}/kernel"], rows.T.reshape(d, h, hd))
    out = theirs_of(keys, ours, f"{attn}out/kernel")
    np.testing.assert_array_equal(ours[f"{attn}out/kernel"], out.T.reshape(h, hd, d))


def theirs_of(keys, ours, key):
    """Their array holding our `key` (written from `ours`)."""
    entry = next(e for e in keys.entries if key in e.ours)
    return keys.to_theirs(ours, source="ours", what="t")[entry.theirs]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_table_names_a_key_missing_on_either_side(fmt):
    keys = _keymap(fmt)
    ours = _random({k: e.ours_shape for e in keys.entries for k in e.ours})
    theirs = keys.to_theirs(ours, source="ours", what="the table")
    fc2 = "blocks.1.mlp.fc2.weight" if fmt == "timm" else "encoder.layer.1.output.dense.weight"
    del theirs[fc2]
    theirs["extra.weight"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ConversionError) as e:
        keys.to_ours(theirs, source="x.safetensors", what="a tiny ViT")
    assert str(e.value) == (
        f"x.safetensors: does not hold a tiny ViT: missing (1) [{fc2} (12, 20)]; "
        "unexpected (1) [extra.weight (2, 3)]"
    )
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    del ours[query]
    ours["embedding/bias"] = np.zeros(13, np.float32)
    with pytest.raises(ConversionError) as e:
        keys.to_theirs(ours, source="p.npz", what="a tiny ViT")
    assert str(e.value) == (
        "p.npz: does not hold a tiny ViT: missing (1) ["
        f"{query} (12, 3, 4)]; mismatched (1) [embedding/bias: found (13,), expected (12,)]"
    )


# ----------------------------------------------------------------------------- CLI and errors


@pytest.mark.torch
def test_cli_converts_hf_to_npz_to_timm_with_facts(tmp_path, capsys):
    hf, path = _hf_model(tmp_path)
    npz = tmp_path / "vit.npz"
    assert cli([str(path), str(npz)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {npz} (vit_jax .npz)") and "exact GELU" in line
    assert "8x12 px" in line and "LayerNorm eps 1e-12" in line
    meta = json.loads((tmp_path / "vit.json").read_text())
    assert meta["class_names"] == ["cat", "dog", "fish"] and meta["image_size"] == list(HW)
    st = tmp_path / "timm.safetensors"
    assert cli([str(npz), str(st)]) == 0
    back = timm_format.from_timm(st)
    assert back.model_config.layernorm_epsilon == 1e-12 and back.class_names == [
        "cat",
        "dog",
        "fish",
    ]
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=_nchw(x)).logits.numpy()
    state = pytorch.read_safetensors(st)
    np.testing.assert_allclose(
        _timm_reference(state, x, heads=2, eps=1e-12), expected, atol=1e-4, rtol=0
    )


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a checkpoint")
    run = subprocess.run(
        [sys.executable, "-m", "vit_jax.convert", str(bad), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2  # a configuration error (bad source), see vit_jax.cli
    assert (
        run.stderr.strip()
        == f"error: {bad}: not an .npz archive; expected an np.savez file of '/'-joined keys"
    )


def test_npz_without_sidecar_needs_model(tmp_path, capsys):
    _, _, params = _ours(hw=(8, 8))
    npz = checkpoint.save_npz(params, tmp_path / "p.npz")
    assert cli([str(npz), str(tmp_path / "hf")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert cli([str(npz), str(tmp_path / "hf"), "--model", "ViT-Ti_16"]) == 2
    err = capsys.readouterr().err
    assert "does not hold a ViT-Ti_16" in err
    assert "embedding/kernel: found (4, 4, 3, 16), expected (16, 16, 3, 192)" in err


@pytest.mark.parametrize(
    "spec, overrides, target, match",
    [
        (TINY, dict(resnet=dict(num_layers=(), width_factor=0.5)), "hf", "a ResNet stem"),
        (TINY, dict(classifier="gap"), "hf", "classifier 'gap'"),
        (TINY, dict(representation_size=8), "hf", "representation layer .* followed by a head"),
        (TINY, dict(representation_size=8), "timm", "representation layer"),
        (TINY, dict(classifier="unpooled"), "timm", "classifier 'unpooled'"),
    ],
)
def test_models_a_format_cannot_express_are_refused(tmp_path, spec, overrides, target, match):
    hw = (32, 32) if "resnet" in overrides else (8, 8)
    _, config, params = _ours(spec, hw=hw, **overrides)
    write = hf_format.to_hf if target == "hf" else timm_format.to_timm
    dst = tmp_path / ("hf" if target == "hf" else "m.safetensors")
    with pytest.raises(ConversionError, match=match):
        write(params, config, dst)
    assert not dst.exists()


def test_mixer_is_refused():
    mixer = dict(
        model_type="Mixer",
        patches=dict(size=(4, 4)),
        hidden_dim=8,
        num_blocks=1,
        tokens_mlp_dim=4,
        channels_mlp_dim=8,
    )
    _, config, params = _ours(mixer, hw=(8, 8))
    with pytest.raises(ConversionError, match="model_type 'Mixer'"):
        timm_format.to_timm(params, config, "/nonexistent/m.safetensors")


@pytest.mark.torch
def test_bad_pytorch_files_are_one_clear_error(tmp_path):
    _, path = _hf_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "beit"}))
    with pytest.raises(ConversionError, match=f"{path}: model_type 'beit'"):
        hf_format.from_hf(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ConversionError, match=f"{weights}: not a readable safetensors file"):
        timm_format.from_timm(weights)
    with pytest.raises(FileNotFoundError, match="no such file"):
        timm_format.from_timm(tmp_path / "missing.safetensors")

    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"patch_embed.proj.weight": Boom()}, protocol=2))
    with pytest.raises(ConversionError, match=f"{evil}: refused or unreadable"):
        timm_format.from_timm(evil)
    torch.save({"a": Boom()}, evil)
    with pytest.raises(ConversionError, match=f"{evil}: refused or unreadable"):
        timm_format.from_timm(evil)
    assert not marker.exists()


@pytest.mark.torch
def test_hf_wrong_shapes_list_every_problem(tmp_path):
    _, path = _hf_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError) as e:
        hf_format.from_hf(path)
    message = str(e.value)
    assert "missing (16) [" in message
    assert "encoder.layer.2.layernorm_before.weight (16,)" in message
    assert "\n" not in message  # one line (vit_jax.weights.errors.mismatch_report)
