"""SigLIP two towers (`models.two_tower`, `models.text`) against transformers' `SiglipModel`:
a tiny random model saved with `save_pretrained`, read by `weights.hf_siglip_text`: image and
text embeddings and logits within 1e-4 (with and without an attention mask); ours -> a
SiglipModel directory -> ours bit-exact; a misshapen key refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vit_jax.models import two_tower
from vit_jax.models.text import TextConfig, TextTransformer
from vit_jax.weights import hf_siglip_text
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.tree import flatten

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
    import transformers
except ImportError:
    torch = transformers = None

ATOL = 1e-4
LEN = 16


def _hf_model(tmp_path):
    """A tiny random SiglipModel (every weight perturbed, logit scale / bias nonzero), saved."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=LEN,
                         bos_token_id=None, eos_token_id=None, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4),
    )  # fmt: skip
    model = transformers.SiglipModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(10.0) + 0.1)
        model.logit_bias.fill_(-3.0)
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _inputs(n_img=2, n_txt=3, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.uniform(-1, 1, (n_img, 32, 32, 3)).astype(np.float32)
    ids = rng.randint(0, 100, (n_txt, LEN)).astype(np.int32)
    mask = np.ones((n_txt, LEN), np.int32)
    mask[0, 10:] = 0  # padded text: the masked keys change the result
    mask[2, 5:] = 0
    return images, ids, mask


def _hf_out(model, images, ids, mask=None):
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids).long(),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            **kw,
        )


def _ours(converted, images, ids, mask=None):
    model = two_tower.build(converted.image_config, converted.text_config)
    return model.apply({"params": converted.params}, images, ids, mask=mask, train=False)


@pytest.mark.torch
def test_embeddings_and_logits_match_transformers(tmp_path):
    hf, src = _hf_model(tmp_path)
    converted = hf_siglip_text.read(src)
    assert converted.image_size == (32, 32)
    assert converted.text_config == TextConfig(
        vocab_size=100, hidden_size=32, mlp_dim=48, num_layers=2, num_heads=4, max_len=LEN,
        projection_size=32,
    )  # fmt: skip
    images, ids, mask = _inputs()
    for m in (None, mask):
        expected = _hf_out(hf, images, ids, m)
        out = _ours(converted, images, ids, m)
        for ours, theirs in (
            ("img_emb", "image_embeds"),
            ("txt_emb", "text_embeds"),
            ("logits_per_image", "logits_per_image"),
        ):
            want = getattr(expected, theirs).numpy()
            np.testing.assert_allclose(out[ours], want, atol=ATOL, rtol=0, err_msg=ours)
        assert np.abs(expected.logits_per_image.numpy()).max() > 0.5  # not a trivial match
    # the mask matters (so the masked comparison above tests something)
    unmasked = _ours(converted, images, ids)["txt_emb"]
    masked = _ours(converted, images, ids, mask)["txt_emb"]
    assert np.abs(np.asarray(unmasked[0]) - np.asarray(masked[0])).max() > 1e-3


@pytest.mark.torch
def test_text_tower_tokens_and_pooled_match_transformers(tmp_path):
    hf, src = _hf_model(tmp_path)
    converted = hf_siglip_text.read(src)
    _, ids, _ = _inputs()
    short = ids[:, :9]  # shorter than max_len: the first rows of the position table
    with torch.no_grad():
        expected = hf.text_model(input_ids=torch.from_numpy(short).long())
    pooled, tokens = TextTransformer(converted.text_config).apply(
        {"params": converted.params["txt"]}, short
    )
    assert pooled.shape == (3, 32) and tokens.shape == (3, 9, 32)
    np.testing.assert_allclose(tokens, expected.last_hidden_state, atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, expected.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.torch
def test_round_trip_is_bit_exact_and_transformers_loads_it(tmp_path):
    hf, src = _hf_model(tmp_path)
    converted = hf_siglip_text.read(src)
    back = hf_siglip_text.write(
        converted.params, converted.image_config, converted.text_config, tmp_path / "back"
    )
    original, written = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    again = hf_siglip_text.read(back)
    assert again.text_config == converted.text_config
    unnamed = lambda c: {k: v for k, v in c.to_dict().items() if k != "name"}  # the folder's
    assert unnamed(again.image_config) == unnamed(converted.image_config)
    a, b = flatten(converted.params), flatten(again.params)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    reloaded, info = transformers.SiglipModel.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info
    images, ids, _ = _inputs()
    np.testing.assert_array_equal(
        _hf_out(reloaded.eval(), images, ids).logits_per_image,
        _hf_out(hf, images, ids).logits_per_image,
    )


@pytest.mark.torch
def test_misshapen_key_is_one_error_naming_it(tmp_path):
    _, src = _hf_model(tmp_path)
    state = load_file(src / "model.safetensors")
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    state[key] = np.zeros((47, 32), np.float32)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as e:
        hf_siglip_text.read(src)
    message = str(e.value)
    assert key in message and "(47, 32)" in message and "(48, 32)" in message, message
    state = load_file(src / "model.safetensors")
    state[key] = np.zeros((48, 32), np.float32)
    state["vision_model.post_layernorm.weight"] = np.zeros((31,), np.float32)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="post_layernorm.weight"):
        hf_siglip_text.read(src)


def test_two_tower_init_shapes_and_logits_formula():
    """No transformers needed: init, the parameter tree and the logits' formula."""
    from vit_jax import models

    image_config = models.get_config(
        "SigLIP-B_16-224",
        hidden_size=32,
        patches=dict(size=(8, 8)),
        transformer=dict(mlp_dim=48, num_heads=4, num_layers=1),
        posemb_grid=(4, 4),
    )
    text = TextConfig(vocab_size=50, hidden_size=32, mlp_dim=48, num_layers=1, num_heads=4,
                      max_len=8, projection_size=32)  # fmt: skip
    model = two_tower.build(image_config, text)
    images = jnp.zeros((2, 32, 32, 3))
    ids = jnp.arange(24).reshape(3, 8) % 50
    params = model.init(jax.random.PRNGKey(0), images, ids)["params"]
    assert set(params) == {"img", "txt", "logit_scale", "logit_bias"}
    assert params["txt"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 8, 32)
    np.testing.assert_allclose(params["logit_scale"], [np.log(10.0)], rtol=1e-6)
    out = model.apply({"params": params}, images, ids)
    assert out["logits_per_image"].shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(out["txt_emb"], axis=-1), 1.0, rtol=1e-5)
    want = 10.0 * out["img_emb"] @ out["txt_emb"].T - 10.0
    np.testing.assert_allclose(out["logits_per_image"], want, rtol=1e-5, atol=1e-5)
    alone = model.apply({"params": params}, tokens=ids)
    assert set(alone) == {"txt_emb"}


def test_bfloat16_compute_stays_close():
    """`dtype=bfloat16` reaches both towers (mixed precision) and stays near float32."""
    from vit_jax import models

    image_config = models.get_config(
        "SigLIP-B_16-224",
        hidden_size=32,
        patches=dict(size=(8, 8)),
        transformer=dict(mlp_dim=48, num_heads=4, num_layers=1),
        posemb_grid=(4, 4),
    )
    text = TextConfig(vocab_size=50, hidden_size=32, mlp_dim=48, num_layers=1, num_heads=4,
                      max_len=8)  # fmt: skip
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    ids = jnp.arange(24).reshape(3, 8) % 50
    f32 = two_tower.build(image_config, text)
    params = f32.init(jax.random.PRNGKey(0), images, ids)["params"]
    bf16 = two_tower.build(image_config, text, dtype=jnp.bfloat16)
    want = f32.apply({"params": params}, images, ids)
    got = bf16.apply({"params": params}, images, ids)
    for key in ("img_emb", "txt_emb"):
        assert got[key].dtype == jnp.float32
        np.testing.assert_allclose(got[key], want[key], atol=0.05, err_msg=key)
        assert np.abs(got[key] - want[key]).max() > 0, f"{key}: not computed in bfloat16"
