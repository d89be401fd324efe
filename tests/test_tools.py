"""predict / evaluate / visualize / benchmark on a model trained in the test session."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
import tiny
from PIL import Image

from vit_jax import benchmark, predict, visualize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """20 test digits as PNG files named with their label, plus an unreadable file."""
    from vit_jax.data import digits

    root = tmp_path_factory.mktemp("digits")
    split = digits.open_split("test")
    files = []
    for i in range(0, 355, 18):
        image, label = split.load(tf.constant(i, tf.int64))
        path = root / f"{i}_{int(label)}.png"
        Image.fromarray(image.numpy()).save(path)
        files.append((str(path), int(label)))
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return files, str(bad)


def test_predict_json_top1_mostly_correct_and_bad_image(trained_workdir, digit_files, capsys):
    files, bad = digit_files
    status = predict.main(
        [
            "--checkpoint",
            str(trained_workdir),
            "--top-k",
            "3",
            "--json",
            *[f for f, _ in files],
            bad,
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 1  # the bad image makes the run fail at the end ...
    rows = [json.loads(line) for line in out]
    assert [r["image"] for r in rows] == [f for f, _ in files] + [bad]  # ... after all answers
    assert set(rows[-1]) == {"image", "error"} and "broken.png" in rows[-1]["error"]
    correct = 0
    for row, (_, label) in zip(rows[:-1], files, strict=True):
        assert set(row) == {"image", "top_k"} and len(row["top_k"]) == 3
        for t in row["top_k"]:
            assert set(t) == {"label", "index", "probability"}
            assert t["label"] == str(t["index"])  # digits' class names are "0".."9"
        probs = [t["probability"] for t in row["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        correct += row["top_k"][0]["index"] == label
    # The fixture's model gets > 0.75 of the test set right: with errors falling on these 20 as
    # on any, fewer than 10 right has probability < 0.4% (binomial, p = 0.75); chance (0.1)
    # reaches 10 with probability < 1e-5.
    assert correct >= 10, correct


def test_evaluate_agrees_with_trainer_eval(trained_workdir):
    from vit_jax import evaluate

    config = tiny.tiny_config(**tiny.GOOD)
    results = evaluate.evaluate_checkpoint(str(trained_workdir), config)
    rows = [json.loads(x) for x in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "test_accuracy" in r][-1]
    assert results["test_examples"] == 355
    assert results["test_accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-6)
    assert results["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)


def test_rollout_normalisation():
    layers, heads, n = 3, 2, 5
    uniform = np.full((layers, 1, heads, n, n), 1 / n)
    maps = visualize.attention_rollout(uniform)
    assert maps.shape == (1, n - 1)
    np.testing.assert_allclose(maps.sum(-1), 1.0)
    np.testing.assert_allclose(maps, 1 / (n - 1))  # uniform attention: a flat map
    # Every token attends only to patch 2 (token 3): the rollout puts most mass there.
    focused = np.zeros((layers, 1, heads, n, n))
    focused[..., 3] = 1.0
    maps = visualize.attention_rollout(focused)
    assert maps[0].argmax() == 2 and maps[0, 2] > 0.5


def test_visualize_writes_pngs(trained_workdir, digit_files, tmp_path):
    files, _ = digit_files
    status = visualize.main(
        ["--checkpoint", str(trained_workdir), "--out", str(tmp_path), "--heads", files[0][0]]
    )
    assert status == 0
    stem = files[0][0].rsplit("/", 1)[1][:-4]
    rollout = Image.open(tmp_path / f"{stem}_rollout.png")
    heads = Image.open(tmp_path / f"{stem}_heads.png")
    assert rollout.size == (224, 224) and rollout.mode == "RGB"
    assert heads.size == (224 * 2, 224)  # the tiny model has 2 heads


VIT_TI_PARAMS = 5_717_416  # published count, 1000 classes


def _embedding_flops(patches=4, patch_dim=16 * 16 * 3, width=192):
    return 2 * patches * patch_dim * width


def _vit_forward_matmul_flops(layers, tokens=5, width=192, mlp=768, classes=1000):
    """2 m n k per matmul for ViT-Ti/16 at 32x32 (4 patches + cls): patch embedding; per layer
    q, k, v, out projections, the two MLP matmuls and the two attention products (q k^T, a v);
    the head on the class token. Norms, softmax, GELU and biases are not counted."""
    per_layer = tokens * 2 * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens**2 * width
    return _embedding_flops(width=width) + layers * per_layer + 2 * width * classes


def test_benchmark_json_keys_mfu_and_flops_against_a_hand_count(capsys):
    benchmark.main(
        [
            "--model",
            "ViT-Ti_16",
            "--batch",
            "2",
            "--resolution",
            "32",
            "--mode",
            "train",
            "--steps",
            "2",
            "--json",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    for key in (
        "img_per_sec",
        "step_time_s",
        "compile_time_s",
        "mfu",
        "peak_memory_bytes",
        "model",
        "batch",
        "resolution",
        "dtype",
        "device_kind",
        "jax_version",
    ):
        assert key in r
    assert r["img_per_sec"] == pytest.approx(2 / r["step_time_s"])
    assert (r["precision"], r["attention"]) == ("float32 throughout", "auto")
    assert r["peak_memory_bytes"] > 5_000_000 * 4  # params + momentum
    # MFU is the record's own FLOPs per second over its measured matmul peak.
    flops_per_step = r["model_flops_per_image"] * r["batch"]
    assert r["mfu"] == pytest.approx(flops_per_step / r["step_time_s"] / r["matmul_peak_flops"])
    # Train step = forward + backward matmuls (3x the forward, less the patch embedding's unneeded
    # input gradient), plus elementwise work (GELU, softmax, norms, loss, ~1%) and the SGD
    # momentum / clipping update, a few FLOPs per parameter (XLA counts ~14 per parameter).
    matmuls = 3 * _vit_forward_matmul_flops(layers=12) - _embedding_flops()
    per_image = r["model_flops_per_image"]
    assert matmuls <= per_image <= 1.05 * matmuls + 20 * VIT_TI_PARAMS / 2, (per_image, matmuls)


def test_benchmark_counts_a_scanned_model_like_the_unrolled_one():
    # XLA's cost analysis counts a scanned loop body once; the benchmark reports model FLOPs.
    case = benchmark.Case("ViT-Ti_16", batch=2, resolution=32, mode="infer")
    kwargs = dict(steps=1, warmup=1, measure_peak=False)
    tiny = {"transformer": {"num_layers": 3}}
    plain = benchmark.run(dataclasses.replace(case, model_overrides=tiny), **kwargs)
    scanned = benchmark.run(
        dataclasses.replace(case, model_overrides={**tiny, "scan": True}), **kwargs
    )
    assert scanned["model_flops_per_image"] == pytest.approx(plain["model_flops_per_image"], 0.02)
    # The forward's matmuls counted by hand; XLA adds the elementwise ops (~1.3% here).
    matmuls = _vit_forward_matmul_flops(layers=3)
    assert matmuls <= plain["model_flops_per_image"] <= 1.03 * matmuls
