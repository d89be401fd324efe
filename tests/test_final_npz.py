"""A run's final.npz carries the run's eval preprocessing: every reader of the file resizes,
crops and antialiases as the run was evaluated, so `--checkpoint RUN/final.npz` and
`--checkpoint RUN` give the same outputs."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import inference, predict, weights
from vit_jax import workdir as workdir_lib


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """The 355 test digits of the embedded dataset as 8x8 PNG files, and their labels."""
    from vit_jax.data import digits

    out = tmp_path_factory.mktemp("digits")
    n = digits.NUM_TEST
    images, labels = (t.numpy() for t in digits.open_split("test").load(tf.range(n)))
    paths = []
    for i, image in enumerate(images):
        paths.append(str(out / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths, labels


@pytest.mark.slow
def test_final_npz_records_the_eval_preprocessing_and_loads_as_the_run(default_run):
    final = default_run / workdir_lib.FINAL_NPZ
    sidecar = json.loads(weights.npz.metadata_path(final).read_text())
    # configs/default.py evaluates digits resized to 18, centre-cropped to 16, antialiased.
    assert sidecar["eval_preprocessing"] == {"resize": 18, "crop": 16, "antialias": True}
    run, npz = inference.load_model(str(default_run)), inference.load_model(str(final))
    for trained in (run, npz):
        assert (trained.resize, trained.crop, trained.antialias) == (18, 16, True)
    assert npz.normalization == run.normalization


@pytest.mark.slow
def test_predict_on_final_npz_equals_predict_on_the_run(default_run, digit_files, capsys):
    """Identical top-5 (names and probabilities) for every test digit; without the recorded
    resize the file's path crops 16 of 16 instead of 16 of 18 and many answers change."""
    paths, labels = digit_files
    answers = {}
    for name, checkpoint in (("run", default_run), ("npz", default_run / "final.npz")):
        argv = ["--checkpoint", str(checkpoint), "--json", "--batch", "128", *paths]
        assert predict.main(argv) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        answers[name] = {r["image"]: r["top_k"] for r in rows}
    assert len(answers["run"]) == len(paths)
    assert answers["npz"] == answers["run"]
    # The outputs are the model's: the run's recorded test accuracy, as predict counts it.
    meta = json.loads(weights.npz.metadata_path(default_run / "final.npz").read_text())
    classes = meta["class_names"]
    correct = sum(
        answers["run"][p][0]["label"] == classes[y] for p, y in zip(paths, labels, strict=True)
    )
    accuracy = _recorded_test_accuracy(default_run)
    assert abs(correct - accuracy * len(paths)) <= 1, (correct, accuracy)


def _recorded_test_accuracy(wd) -> float:
    rows = [json.loads(line) for line in (wd / workdir_lib.METRICS_JSONL).read_text().splitlines()]
    return [r["test_accuracy"] for r in rows if "test_accuracy" in r][-1]


def _with_sidecar(src, dst, **changes):
    """A copy of final.npz (`src`) at `dst` whose sidecar has `changes` (None: key removed)."""
    dst.write_bytes(src.read_bytes())
    meta = json.loads(weights.npz.metadata_path(src).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    weights.npz.metadata_path(dst).write_text(json.dumps(meta))
    return dst


@pytest.mark.slow
def test_an_npz_from_before_the_key_is_evaluated_at_its_image_size(default_run, tmp_path):
    old = _with_sidecar(default_run / "final.npz", tmp_path / "old.npz", eval_preprocessing=None)
    trained = inference.load_model(str(old))
    assert (trained.resize, trained.crop, trained.antialias) == (16, 16, True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recorded, message",
    [
        ({"resize": 18, "crop": 20, "antialias": True}, "resize >= crop >= 1"),
        ({"resize": 18, "crop": 16, "antialias": "yes"}, "antialias must be true or false"),
        ({"resize": 18}, "needs 'resize' and 'crop'"),
        ({"resize": 24, "crop": 20, "antialias": True}, "crops 20x20, but the weights were"),
    ],
)
def test_a_bad_recorded_eval_preprocessing_is_one_error_naming_the_file(
    default_run, tmp_path, capsys, recorded, message
):
    bad = _with_sidecar(
        default_run / "final.npz", tmp_path / "bad.npz", eval_preprocessing=recorded
    )
    with pytest.raises(weights.CheckpointError, match=message) as e:
        inference.load_model(str(bad))
    assert str(bad) in str(e.value) and "eval_preprocessing" in str(e.value)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", str(bad), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
