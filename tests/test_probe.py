"""The feature / probe CLI: k-NN and ridge probes checked by hand, on trained and random models."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from vit_jax import inference, probe

# ----------------------------------------------------------------------------- the probes


def test_knn_on_a_hand_made_2d_set_gives_the_expected_labels():
    """Cosine similarity only sees directions: class 0 near +x, class 1 near +y, 2 near -x."""
    train = np.array(
        [[1, 0.1], [2, -0.1], [5, 0.2],  # class 0: angle ~0
         [0.1, 1], [-0.1, 3], [0.2, 2],  # class 1: angle ~90
         [-1, 0.05], [-4, -0.1]],  # class 2: angle ~180
        np.float32,
    )  # fmt: skip
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    queries = np.array([[10, 1], [0.5, 7], [-3, 0.2], [1, 1.2], [-1, 0.9]], np.float32)
    # k=1: the single nearest direction.
    got = probe.knn_predict(train, labels, queries, k=1, temperature=0.07, num_classes=3)
    np.testing.assert_array_equal(got, [0, 1, 2, 1, 2])
    # k=3, majority: [-1, 0.9] (angle 138) has neighbours class 2, 2 and 1 -> 2.
    got = probe.knn_predict(train, labels, queries, k=3, temperature=0.0, num_classes=3)
    np.testing.assert_array_equal(got, [0, 1, 2, 1, 2])
    # Plain majority and DINO weighting disagree: three class-0 points 36-40 degrees from the
    # query, two class-1 points 10-12 degrees from it; k=5 takes all five.
    polar = lambda *deg: np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], -1)
    bank, bank_labels = polar(0, 2, 4, 50, 52).astype(np.float32), np.array([0, 0, 0, 1, 1])
    q = polar(40).astype(np.float32)
    assert probe.knn_predict(bank, bank_labels, q, k=5, temperature=0.0)[0] == 0
    assert probe.knn_predict(bank, bank_labels, q, k=5, temperature=0.07)[0] == 1
    # k larger than the bank: all of it.
    assert probe.knn_predict(bank, bank_labels, q, k=50, temperature=0.0)[0] == 0
    # A tie in the plain vote goes to the smallest class index.
    tie = probe.knn_predict(bank[[0, 3]], bank_labels[[0, 3]], q, k=2, temperature=0.0)
    assert tie[0] == 0


def test_ridge_equals_lstsq_of_the_regularised_system():
    """W of ridge_fit solves [xc; sqrt(lam) I] W = [yc; 0] in the least-squares sense."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([1, 2, 3, 0.5, 4, 1]) + 3.0
    y = np.eye(4)[rng.integers(0, 4, size=50)]
    lam = 2.5
    w, b = probe.ridge_fit(x, y, lam)
    xc, yc = x - x.mean(0), y - y.mean(0)
    system = np.concatenate([xc, np.sqrt(lam) * np.eye(6)])
    target = np.concatenate([yc, np.zeros((6, 4))])
    expected = np.linalg.lstsq(system, target, rcond=None)[0]
    np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ expected, rtol=1e-10, atol=1e-12)


def test_ridge_probe_separates_a_linear_problem_and_picks_alpha_on_held_out_train():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 5)) * 4
    labels = rng.integers(0, 3, size=300)
    x = centres[labels] + rng.normal(size=(300, 5))
    result = probe.ridge_probe(x[:200], labels[:200], x[200:], num_classes=3)
    assert np.mean(result["predictions"] == labels[200:]) > 0.95
    assert result["alpha"] in probe.ALPHAS and result["heldout_accuracy"] > 0.95
    assert result["lambda"] == pytest.approx(result["alpha"] * probe._scale(x[:200]))


# ----------------------------------------------------------------------------- on digits


def _run(trained, features="pooled", **kwargs):
    config = probe.probe_config("digits", batch=512)
    config.pp.crop, config.pp.resize = trained.crop, trained.resize
    return probe.run_probe(trained, config, features=features, **kwargs)


@pytest.fixture(scope="module")
def trained(trained_workdir):
    return inference.load_model(str(trained_workdir))


def _recorded_accuracy(workdir) -> float:
    """The trainer's final test accuracy, from the workdir's metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["test_accuracy"] for r in rows if "test_accuracy" in r][-1]


def test_probes_of_the_trained_digits_model(trained, trained_workdir):
    """Trained features: both probes far above chance (0.1) and near the fine-tuned head."""
    r = _run(trained)
    assert (r["num_train"], r["num_test"], r["dim"]) == (1442, 355, 32)
    head, knn, linear = r["head"]["accuracy"], r["knn"]["accuracy"], r["linear"]["accuracy"]
    # The head's accuracy is the trainer's own evaluation of the same 355 images (> 0.75 by the
    # fixture), up to one near-tie that the probe's other batching may round the other way.
    assert abs(head - _recorded_accuracy(trained_workdir)) <= 1 / 355 + 1e-9, r
    # Probes on the same model, scored on the same images: over seeds 0-9 both land 0.01-0.05
    # above the head (binomial sd of an accuracy on 355 examples <= 0.027), and within 0.1 of
    # it they are > 0.65, 6x chance.
    assert abs(knn - head) < 0.1 and abs(linear - head) < 0.1, r
    # Random-initialised weights of the same model: clearly worse features.
    from vit_jax import models

    model = models.get_model(trained.model_config, num_classes=None)
    params = model.init(
        jax.random.key(0), jnp.zeros((1, trained.crop, trained.crop, 3)), train=False
    )
    random = dataclasses.replace(trained, model=model, params=params["params"])
    rr = _run(random)
    assert "head" not in rr
    # Random-init features are machine-independent (counter-based jax.random; rounding can flip
    # only near-ties): k-NN 0.57, linear 0.65 with key 0, the same on XLA builds capped at AVX2,
    # AVX and SSE4.2. Trained ones, over seeds 0-9: k-NN and linear >= 0.83, so 0.1 below them
    # still clears the random ones by > 3 binomial sd (0.027 on 355 examples).
    assert rr["knn"]["accuracy"] < knn - 0.1 and rr["linear"]["accuracy"] < linear - 0.1, rr


def test_token_features_and_out_round_trip(trained, tmp_path):
    out = tmp_path / "f.npz"
    r = _run(trained, features="tokens", methods=("knn",), out=str(out))
    assert "linear" not in r, r
    # The patch tokens' mean is a weaker feature than the class token the head reads, but of the
    # same model: over seeds 0-9 its k-NN lands 0.03-0.12 below the head (binomial sd of a
    # difference on 355 examples ~0.03), so within 0.2; with the fixture's head > 0.75, > 5x
    # chance.
    assert r["knn"]["accuracy"] > r["head"]["accuracy"] - 0.2, r
    with np.load(out) as f:
        assert f["train_features"].shape == (1442, 1 + 16, 32)  # class token + 4x4 patches
        assert f["test_features"].shape == (355, 17, 32)
        np.testing.assert_array_equal(f["test_labels"], trained_labels("test"))
        assert list(f["class_names"]) == [str(i) for i in range(10)]
        assert json.loads(str(f["meta"]))["knn"]["accuracy"] == r["knn"]["accuracy"]
        # The saved tokens are what the probe used: its k-NN on their patch mean agrees.
        x_train = f["train_features"][:, 1:].mean(1)
        x_test = f["test_features"][:, 1:].mean(1)
        pred = probe.knn_predict(x_train, f["train_labels"], x_test, k=20, temperature=0.07)
        assert np.mean(pred == f["test_labels"]) == r["knn"]["accuracy"]


def trained_labels(split):
    from vit_jax.data import digits

    return digits.open_split(split).labels()


# ----------------------------------------------------------------------------- the CLI


def test_cli_json_and_out_never_overwrites(trained_workdir, tmp_path):
    out = tmp_path / "features.npz"
    cmd = [sys.executable, "-m", "vit_jax.probe", f"--checkpoint={trained_workdir}", "--json"]
    proc = tiny.run([*cmd, "--method=knn", "--k=10", f"--out={out}"])
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    result = json.loads(line)
    # As the k=20 probe in test_probes_of_the_trained_digits_model: over seeds 0-9 k=10 lands
    # 0.01-0.05 above the head, whose accuracy the fixture puts above 0.75.
    assert result["knn"]["k"] == 10, result
    assert abs(result["knn"]["accuracy"] - result["head"]["accuracy"]) < 0.1, result
    assert result["checkpoint"] == str(trained_workdir)
    assert "train features: 1442 examples" in proc.stderr
    with np.load(out) as f:
        assert f["train_features"].shape == (1442, 32)
        assert f["train_labels"].tolist() == trained_labels("train").tolist()
    before = out.read_bytes()
    again = tiny.run([*cmd, f"--out={out}"])
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        f"error: --out {out} exists; choose another path (never overwritten)"
    ]
    assert out.read_bytes() == before


def _main(argv, capsys) -> tuple[int, str, list[str]]:
    """probe.main in this process: (exit code, stdout, stderr lines)."""
    try:
        code = probe.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method=svm"], "--method takes knn, linear (comma-separated), got 'svm'"),
        (["--k=0"], "argument --k: must be at least 1, got 0"),
        (["--batch=-3"], "argument --batch: must be at least 1, got -3"),
        (["--knn-temperature=-1"], "--knn-temperature must be at least 0, got -1"),
        (["--pp=crop=big"], "--pp 'crop=big': crop must be a positive integer"),
        (["--pp=shuffle=1"], "--pp 'shuffle=1': expected KEY=VALUE"),
        (["--pp=test=validation"], "digits: cannot use split 'validation'"),
        (["--features=cls"], "argument --features: invalid choice: 'cls'"),
        (["--dataset=no_such_dataset_xyz"], "config.dataset='no_such_dataset_xyz'"),
        (["--model=ViT-Q_99"], "ViT-Q_99"),
        # An empty split: before, k-NN and ridge gave nan (exit 0) or top_k failed inside jax.
        (["--pp=test=test[:0]"], "digits split 'test[:0]' (--pp test=...) has no examples"),
        (["--pp=train=train[:0]"], "digits split 'train[:0]' (--pp train=...) has no examples"),
    ],
)
def test_bad_flags_are_one_line_exit_2(trained_workdir, capsys, flags, message):
    checkpoint = trained_workdir / "final.npz" if "--model" in flags[0] else trained_workdir
    code, out, lines = _main([f"--checkpoint={checkpoint}", *flags], capsys)
    assert code == 2 and out == "", lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    code, out, lines = _main([f"--checkpoint={tmp_path / 'none'}"], capsys)
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(tmp_path / "none") in lines[0]
