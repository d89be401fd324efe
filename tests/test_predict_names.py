"""predict's answers carry the right names and numbers: ImageNet names for a 1000-class model
that records none, and a Hugging Face directory's `id2label` with transformers' probabilities."""

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import inference, models, predict, weights

try:  # the `torch` extra; the newest-stack CI leg has none and deselects `-m torch` (conftest.py)
    import torch
    import transformers
except ImportError:
    torch = transformers = None

TINY = dict(
    name="tiny-1k",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=1),
)
SIZE = 8
# Well-known ImageNet-1k classes at their indices (the synset order every 1000-class checkpoint
# uses): index -> first name.
IMAGENET_KNOWN = {
    0: "tench",
    1: "goldfish",
    207: "golden retriever",
    281: "tabby",
    999: "toilet tissue",
}


def _image_file(path, size, seed=0):
    """A random RGB picture of exactly the model's input size (resize and crop are then the
    identity); returns its pixels in [-1, 1], as the published models take them."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.float64) / 127.5 - 1


def _printed(capsys, argv) -> str:
    assert predict.main(argv) == 0
    return capsys.readouterr().out


def test_imagenet_labels_are_the_class_names():
    names = inference.imagenet_labels(1000)
    assert names is not None and len(names) == 1000
    for index, name in IMAGENET_KNOWN.items():
        assert names[index] == name, index
    assert not any(n.startswith("n0") or n.startswith("class_") for n in names)  # not synsets
    assert inference.imagenet_labels(10) is None


def test_predict_names_a_1000_class_model_that_records_no_names(tmp_path, capsys):
    """A tiny random 1000-class model saved without class names: predict prints ImageNet names
    (no `class_N` placeholder), the top five of logits computed here from the parameters."""
    model = models.get_model(TINY, num_classes=1000)
    rng = np.random.RandomState(1)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, SIZE)
    )
    path = tmp_path / "tiny1k.npz"
    weights.save(params, {"model": models.get_config(TINY).to_dict(), "image_size": SIZE}, path)
    assert not weights.open(path)[1].get("class_names")  # nothing recorded
    image = tmp_path / "x.png"
    pixels = _image_file(image, SIZE)

    names = inference.imagenet_labels(1000)
    assert names[:2] == ["tench", "goldfish"]
    logits, _ = model.apply({"params": params}, pixels[None].astype(np.float32), train=False)
    order = np.argsort(-np.asarray(logits[0], np.float64), kind="stable")[:5]
    probs = np.asarray(jax.nn.softmax(np.asarray(logits[0], np.float64)))
    assert probs[order[0]] - probs[order[1]] > 1e-4  # a clear top class

    out = _printed(capsys, ["--checkpoint", str(path), "--top-k", "5", str(image)])
    assert "class_" not in out and not re.search(r"\bn\d{8}\b", out)  # no placeholder, no synset
    listed = out.strip().split(": ", 1)[1]
    expected = ", ".join(f"{names[i]} {probs[i]:.3f}" for i in order)
    assert listed == expected
    rows = json.loads(_printed(capsys, ["--checkpoint", str(path), "--json", str(image)]))
    assert [t["label"] for t in rows["top_k"]] == [names[i] for i in order]
    assert all(t["label"] in names for t in rows["top_k"])


@pytest.mark.torch
def test_predict_on_a_transformers_directory_answers_what_transformers_does(tmp_path, capsys):
    """A tiny ViTForImageClassification saved with `save_pretrained` (id2label, no image
    processor: inputs in [-1, 1]): predict's probabilities equal transformers' on the same pixels,
    and the names printed are its `id2label`."""
    labels = ["cat", "dog", "fish", "owl", "yak"]
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=SIZE,
        patch_size=4,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    hf = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    image = tmp_path / "x.png"
    pixels = _image_file(image, SIZE, seed=2)

    ours = inference.load_model(str(tmp_path / "hf")).preprocess_file(str(image))
    np.testing.assert_allclose(ours, pixels, atol=1e-6)  # the pixels predict runs on
    with torch.no_grad():
        nchw = torch.from_numpy(ours.transpose(2, 0, 1)[None].copy())
        theirs = torch.softmax(hf(pixel_values=nchw).logits.double(), -1)[0].numpy()
    assert theirs.max() - np.sort(theirs)[-2] > 1e-3  # a clear top class
    assert np.ptp(theirs) > 0.1  # far from uniform: the weights matter

    argv = ["--checkpoint", str(tmp_path / "hf"), "--top-k", str(len(labels))]
    answer = json.loads(_printed(capsys, [*argv, "--json", str(image)]))
    got = np.zeros(len(labels))
    for t in answer["top_k"]:
        assert t["label"] == labels[t["index"]]
        got[t["index"]] = t["probability"]
    # The two float32 forwards differ by ~1e-7 here; tanh GELU for the exact one: 7e-5.
    np.testing.assert_allclose(got, theirs, atol=1e-5)
    assert answer["top_k"][0]["index"] == int(theirs.argmax())
    line = _printed(capsys, [*argv, str(image)])
    assert line.split(": ", 1)[1].split()[0] == labels[int(theirs.argmax())]
