"""Input normalisation travels with the weights and is applied as preprocessing, never folded
into the weights: (pixel / 255 - mean) / std, recorded by the trainer and the converters, read
back by `weights.open`, applied by the data pipeline, predict and the exported SavedModel."""

import json
import logging

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import inference, models, weights
from vit_jax.data import preprocess
from vit_jax.weights.errors import CheckpointError

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
    import transformers
except ImportError:
    torch = transformers = None

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)


def _pixels(seed=0, size=(8, 8)):
    return np.random.RandomState(seed).randint(0, 256, (*size, 3)).astype(np.uint8)


def test_default_is_the_published_range_bit_for_bit_and_others_follow_the_formula():
    image = _pixels()
    default = preprocess.to_model_range(tf.constant(image)).numpy()
    np.testing.assert_array_equal(default, image.astype(np.float32) / 127.5 - 1.0)
    out = preprocess.to_model_range(tf.constant(image), IMAGENET).numpy()
    expected = (image / 255.0 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(  # pictures of a model input go back to [-1, 1]
        preprocess.to_display_range(out, IMAGENET), image / 127.5 - 1.0, atol=1e-5
    )
    with pytest.raises(ValueError, match="3 means and 3 positive stds"):
        preprocess.normalization([0.5, 0.5], [0.5, 0.5, 0.5])


def test_data_pipeline_applies_config_pp_mean_std():
    """The same digits eval batch under the default and under ImageNet's mean/std: the second is
    the formula applied to the first's pixels."""
    from vit_jax import configs, data, sharding

    def first_batch(**pp):
        config = configs.get_config()
        config.dataset, config.batch_eval = "digits", 16
        config.pp.update(dict(train="train", test="test", resize=8, crop=8, **pp))
        batches = data.eval_iterator(config, sharding.batch_sharding(sharding.make_mesh()))
        return np.asarray(jax.device_get(next(iter(batches))["image"]))

    plain = first_batch()
    normalised = first_batch(mean=tuple(IMAGENET["mean"]), std=tuple(IMAGENET["std"]))
    pixels = (plain + 1.0) * 127.5
    expected = (pixels / 255.0 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(normalised, expected, atol=1e-5)
    assert not np.allclose(normalised, plain, atol=0.1)


def _save_tiny(path, norm=None):
    model = models.get_model(TINY, num_classes=3)
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, 8)
    )
    meta = {
        "model": models.get_config(TINY).to_dict(),
        "class_names": ["a", "b", "c"],
        "image_size": [8, 8],
    }
    if norm is not None:
        meta["normalization"] = norm
    weights.save(params, meta, path)
    return params, meta


def test_normalization_round_trips_through_every_format(tmp_path):
    _save_tiny(tmp_path / "w.npz", IMAGENET)
    _, meta = weights.open(tmp_path / "w.npz")
    assert meta["normalization"] == IMAGENET
    source = tmp_path / "w.npz"
    for dst in ("timm.safetensors", "hf_dir", "back.npz"):  # npz -> timm -> HF -> npz
        params, meta = weights.open(source)
        source, _ = weights.save(params, meta, tmp_path / dst)
        assert weights.open(source)[1]["normalization"] == IMAGENET, dst
    processor = json.loads((tmp_path / "hf_dir" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == IMAGENET["mean"] and processor["do_normalize"] is True
    # Nothing recorded: the published [-1, 1].
    _save_tiny(tmp_path / "plain.npz")
    assert weights.open(tmp_path / "plain.npz")[1]["normalization"] == weights.normalization.DEFAULT
    bad = json.loads((tmp_path / "plain.json").read_text())
    (tmp_path / "plain.json").write_text(json.dumps({**bad, "normalization": {"mean": [1]}}))
    with pytest.raises(CheckpointError, match="plain.npz: normalization"):
        weights.open(tmp_path / "plain.npz")


@pytest.mark.torch
def test_hf_image_processor_normalisation_is_read_and_applied_by_predict(tmp_path):
    """A transformers model whose image processor normalises with ImageNet's mean/std: our
    preprocessing of a file equals the formula, so the logits equal HF's on the same pixels."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    hf = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    processor = transformers.ViTImageProcessor(
        image_mean=IMAGENET["mean"], image_std=IMAGENET["std"], size={"height": 8, "width": 8}
    )
    processor.save_pretrained(tmp_path / "hf")
    image = _pixels(1)
    Image.fromarray(image).save(tmp_path / "x.png")

    trained = inference.load_model(str(tmp_path / "hf"))
    assert trained.normalization == IMAGENET
    ours = trained.preprocess_file(str(tmp_path / "x.png"))
    expected = (image / 255.0 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    pixel_values = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    np.testing.assert_allclose(ours, pixel_values[0].permute(1, 2, 0).numpy(), atol=1e-5)
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values).logits.numpy()
    np.testing.assert_allclose(trained.logits(ours[None]), theirs, atol=1e-4)


def test_saved_model_applies_the_recorded_normalisation(tmp_path):
    """The exported SavedModel normalises uint8 images as the checkpoint records (ImageNet's
    mean/std here), so it answers what predict answers."""
    from vit_jax import export

    _save_tiny(tmp_path / "w.npz", IMAGENET)
    trained = inference.load_model(str(tmp_path / "w.npz"))
    absl_logger = logging.getLogger("absl")
    before = absl_logger.level
    meta = export.export(trained, "saved_model", tmp_path / "sm", platforms=("cpu",))
    assert absl_logger.level == before  # TensorFlow's writer raises it; export puts it back
    assert meta["preprocessing"]["normalization"] == IMAGENET
    image = _pixels(2, size=(13, 9))
    Image.fromarray(image).save(tmp_path / "x.png")
    expected = trained.logits(trained.preprocess_file(str(tmp_path / "x.png"))[None])
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    got = loaded.signatures["serving_default"](images=tf.constant(image[None]))["logits"]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    plain = trained.logits(
        inference.preprocess_file(str(tmp_path / "x.png"), resize=8, crop=8)[None]
    )
    assert not np.allclose(plain, expected, atol=1e-3)  # the normalisation matters here
