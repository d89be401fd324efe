"""`vit_jax.export`: each format from a trained run and from a converted Hugging Face model,
reloaded in a process that runs the artifact with its own runtime only (tests/export_reload.py:
jax.export, TensorFlow or onnxruntime; never vit_jax), against our logits and predict's output."""

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import tiny
from PIL import Image

from vit_jax import export, inference, predict

pytestmark = pytest.mark.slow

RELOAD = tiny.ROOT / "tests" / "export_reload.py"
HF_CLASSES = ["cat", "dog", "fish"]
IMAGE_SIZES = [(9, 13), (16, 16), (50, 37)]  # (height, width): up-, same- and downscaled
TOL = 1e-4


def _hf_npz(tmp_path):
    """A random tiny transformers ViT (16x16, 4x4 patches, 3 labels), converted to our .npz."""
    import torch
    import transformers

    from vit_jax.convert.__main__ import main as convert

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_labels=3,
        id2label=dict(enumerate(HF_CLASSES)),
        label2id={n: i for i, n in enumerate(HF_CLASSES)},
    )
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "hf")
    npz = tmp_path / "hf.npz"
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert([str(tmp_path / "hf"), str(npz)]) == 0
    return npz


def _predict_probabilities(checkpoint, files, num_classes) -> np.ndarray:
    """`python -m vit_jax.predict --json` (in process): every class's probability per file."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        argv = ["--checkpoint", str(checkpoint), "--json", "--top-k", str(num_classes)]
        assert predict.main([*argv, *map(str, files)]) == 0
    probs = np.zeros((len(files), num_classes))
    for row, line in enumerate(stdout.getvalue().splitlines()):
        for entry in json.loads(line)["top_k"]:
            probs[row, entry["index"]] = entry["probability"]
    return probs


def _case(tmp_path, name, checkpoint, *, via_cli=()):
    """Exports `checkpoint` in every format; the inputs and what vit_jax says about them."""
    trained = inference.load_model(str(checkpoint))
    res, n = trained.crop, len(trained.class_names)
    rng = np.random.default_rng(len(name))
    x = rng.uniform(-1, 1, (4, res, res, 3)).astype(np.float32)
    inputs = {"x": x}
    expected = {"logits": trained.logits(x), "class_names": trained.class_names}
    for i, (h, w) in enumerate(IMAGE_SIZES):
        batch = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        files = []
        for j, image in enumerate(batch):
            files.append(tmp_path / f"{name}_{i}_{j}.png")
            Image.fromarray(image).save(files[-1])
        inputs[f"images_{i}"] = batch
        pre = np.stack(
            [inference.preprocess_file(str(f), resize=trained.resize, crop=res) for f in files]
        )
        expected[f"logits_{i}"] = trained.logits(pre)
        expected[f"probabilities_{i}"] = _predict_probabilities(checkpoint, files, n)
    np.savez(tmp_path / f"{name}_inputs.npz", **inputs)
    for fmt in export.FORMATS:
        out = tmp_path / f"{name}_{fmt}"
        if fmt in via_cli:
            cmd = [sys.executable, "-m", "vit_jax.export", "--checkpoint", str(checkpoint)]
            run = tiny.run([*cmd, "--format", fmt, "--out", str(out)], timeout=300)
            assert run.returncode == 0, run.stderr
            assert run.stdout.startswith(f"wrote {out} ({fmt}: ") and "classes)" in run.stdout
            assert run.stderr == "", run.stderr  # the libraries' chatter stays quiet
        else:
            meta = export.export(trained, fmt, out)
            assert meta["class_names"] == trained.class_names and meta["resolution"] == res
    return {"dir": tmp_path, "name": name, "expected": expected, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def trained_case(tmp_path_factory, trained_workdir):
    return _case(tmp_path_factory.mktemp("export"), "trained", trained_workdir)


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_hf")
    return _case(tmp, "hf", _hf_npz(tmp), via_cli=("stablehlo",))


@pytest.fixture(params=["trained", pytest.param("hf", marks=pytest.mark.torch)])
def cases(request):
    """One case per test: our trained run, and a converted transformers model (needs PyTorch)."""
    return {request.param: request.getfixturevalue(f"{request.param}_case")}


def _reload(cases, fmt) -> dict[str, dict]:
    """Runs export_reload.py for `fmt` on every case, in one process without vit_jax."""
    argv = []
    for case in cases.values():
        d, name = case["dir"], case["name"]
        argv += [d / f"{name}_{fmt}", d / f"{name}_inputs.npz", d / f"{name}_{fmt}_out.npz"]
    env = {"PYTHONPATH": None, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(RELOAD), fmt, *map(str, argv)]
    run = tiny.run(cmd, cwd=argv[0].parent, env_changes=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {}
    for key, case in cases.items():
        with np.load(case["dir"] / f"{case['name']}_{fmt}_out.npz") as f:
            results[key] = dict(f)
    return results


def _check_model_input(results, cases):
    for key, case in cases.items():
        got, want = results[key], case["expected"]
        np.testing.assert_allclose(got["logits"], want["logits"], atol=TOL, rtol=0, err_msg=key)
        np.testing.assert_allclose(got["logits_first"], want["logits"][:1], atol=TOL, rtol=0)
        assert list(got["class_names"]) == list(want["class_names"])
        assert list(got["json_class_names"]) == list(want["class_names"])


def test_stablehlo_runs_with_jax_export_alone(cases):
    results = _reload(cases, "stablehlo")
    _check_model_input(results, cases)
    if "hf" not in cases:
        return
    assert list(results["hf"]["class_names"]) == HF_CLASSES
    meta = json.loads((cases["hf"]["dir"] / "hf_stablehlo" / "model.json").read_text())
    assert meta["input"] == {
        "name": "inputs",
        "shape": ["batch", 16, 16, 3],
        "dtype": "float32",
        "range": [-1.0, 1.0],
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},  # = the range
        "layout": "NHWC",
    }
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["model"]["hidden_size"] == 16


def test_saved_model_preprocesses_uint8_images_of_any_size_as_predict(cases):
    results = _reload(cases, "saved_model")
    _check_model_input(results, cases)
    for key, case in cases.items():
        got, want = results[key], case["expected"]
        assert list(got["asset_class_names"]) == list(want["class_names"])
        for i, size in enumerate(IMAGE_SIZES):
            err = f"{key}: images of {size}"
            np.testing.assert_allclose(
                got[f"probabilities_{i}"], want[f"probabilities_{i}"], atol=TOL, rtol=0, err_msg=err
            )
            np.testing.assert_allclose(
                got[f"logits_{i}"], want[f"logits_{i}"], atol=TOL, rtol=0, err_msg=err
            )


def test_onnx_runs_with_onnxruntime_alone(cases):
    results = _reload(cases, "onnx")
    _check_model_input(results, cases)
    for key in results:
        assert key != "hf" or list(results["hf"]["class_names"]) == HF_CLASSES


def _cli_error(capsys, argv) -> str:
    """export's main() on bad input: exit 2 and exactly one `error:` line on stderr."""
    try:
        code = export.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.torch
def test_bad_input_is_one_line_and_exit_2(hf_case, tmp_path, capsys):
    hf = str(hf_case["checkpoint"])
    out = str(tmp_path / "new")
    line = _cli_error(capsys, ["--checkpoint", hf, "--format", "tflite", "--out", out])
    assert "--format" in line and "'tflite'" in line
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    line = _cli_error(capsys, ["--checkpoint", hf, "--format", "onnx", "--out", str(taken)])
    assert line == (
        f"error: --out {taken} exists and is not empty; give a new or empty directory, or pass "
        "--overwrite to replace it"
    )
    line = _cli_error(
        capsys, ["--checkpoint", hf, "--model", "ViT-Ti_16", "--format", "onnx", "--out", out]
    )
    assert line.startswith(f"error: {hf} does not fit ViT-Ti_16 at 16x16: missing (160)")
    assert "cls: stored (1, 1, 16), model (1, 1, 192)" in line
    garbage = tmp_path / "x.npz"
    garbage.write_bytes(b"not a checkpoint")
    line = _cli_error(capsys, ["--checkpoint", str(garbage), "--format", "stablehlo", "--out", out])
    assert str(garbage) in line and "not an .npz archive" in line
    assert not (tmp_path / "new").exists() and list(taken.iterdir()) == [taken / "x"]


def test_onnx_opset_is_chosen_and_checked(trained_case, tmp_path, capsys):
    """`--opset 20` (the lowest the graph allows: it uses Gelu) writes an opset-20 model that
    onnxruntime runs to the same logits; one it cannot write, or an opset for another format,
    is one line, exit 2, before the checkpoint is read."""
    import onnx
    import onnxruntime

    case = trained_case
    out = tmp_path / "opset20"
    assert export.main(["--checkpoint", str(case["checkpoint"]), "--format", "onnx",
                        "--opset", "20", "--out", str(out)]) == 0  # fmt: skip
    model = onnx.load(str(out / export.ONNX_FILE))
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    assert json.loads((out / "model.json").read_text())["opset"] == 20
    default = json.loads((case["dir"] / "trained_onnx" / "model.json").read_text())
    assert default["opset"] == export.ONNX_OPSET == 23
    session = onnxruntime.InferenceSession(str(out / export.ONNX_FILE))
    with np.load(case["dir"] / "trained_inputs.npz") as f:
        logits = session.run(["logits"], {"images": f["x"]})[0]
    np.testing.assert_allclose(logits, case["expected"]["logits"], atol=TOL, rtol=0)
    capsys.readouterr()
    missing = str(tmp_path / "no-such-run")  # never read: the opset is refused first
    line = _cli_error(capsys, ["--checkpoint", missing, "--format", "onnx", "--opset", "17",
                               "--out", str(tmp_path / "a")])  # fmt: skip
    assert line == (
        "error: --opset 17: the onnx export writes opsets 20 to 23 (the graph uses Gelu, an "
        "ONNX op from opset 20)"
    )
    line = _cli_error(capsys, ["--checkpoint", missing, "--format", "stablehlo", "--opset",
                               "21", "--out", str(tmp_path / "b")])  # fmt: skip
    assert line == "error: --opset 21: an opset applies to --format onnx only"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_benchmark_times_exported_artifacts(trained_case, tmp_path, capsys):
    from vit_jax import benchmark

    for fmt in ("onnx", "stablehlo"):
        artifact = trained_case["dir"] / f"trained_{fmt}"
        r = benchmark.run_artifact(str(artifact), batch=2, steps=2, warmup=1)
        assert r["format"] == fmt and r["resolution"] == 16 and r["batch"] == 2
        assert r["img_per_sec"] > 0 and r["step_time_s"] > 0
    # main returns the exit code, as every CLI's main does (cli.run exits with it)
    assert benchmark.main(["--artifact", str(tmp_path), "--batch", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: not an exported model")


def _readme_onnx_snippet() -> str:
    readme = (tiny.ROOT / "README.md").read_text()
    marker = "<!-- onnx-snippet: tests/test_export.py runs this block -->\n```python\n"
    assert readme.count(marker) == 1, "README's ONNX snippet marker"
    start = readme.index(marker) + len(marker)
    return readme[start : readme.index("```\n", start)]


def test_readme_onnx_snippet_classifies_an_image_file_as_predict(default_run, tmp_path):
    """README's ONNX snippet, run as written (numpy, Pillow, onnxruntime; vit_jax unimportable)
    on the default run (eval resize 18, crop 16), gives predict's top 5 for the same file.

    Pillow's bilinear filter and TensorFlow's antialiased one round differently, so the inputs
    are compared to one uint8 level (1/127.5 in [-1, 1]) and the probabilities to what such a
    difference moves (1e-2); resizing straight to 16 instead changes the input by up to ~1.
    """
    model_dir = tmp_path / "exported" / "vit_onnx"
    model_dir.parent.mkdir()
    assert export.main(["--checkpoint", str(default_run), "--format", "onnx",
                        "--out", str(model_dir)]) == 0  # fmt: skip
    from vit_jax.data import digits

    digit = digits.open_split("test").load(np.arange(1))[0].numpy()[0]  # 8x8 uint8
    image = tmp_path / "digit.png"  # lossless: TensorFlow's and Pillow's JPEG decoders differ
    Image.fromarray(digit).resize((40, 40), Image.NEAREST).save(image)

    code = "import sys\nsys.modules['vit_jax'] = None  # the snippet must not need vit_jax\n"
    code += _readme_onnx_snippet() + "np.save('snippet_input.npy', x)\n"
    run = tiny.run([sys.executable, "-c", code], cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = [line.rsplit(" ", 1) for line in run.stdout.splitlines()]

    trained = inference.load_model(str(default_run))
    expected = trained.preprocess_file(str(image))
    got = np.load(tmp_path / "snippet_input.npy")
    assert got.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(got[0], expected, atol=1 / 127.5 + 1e-6)
    straight = inference.preprocess_file(str(image), resize=16, crop=16)
    assert np.abs(straight - expected).max() > 0.2  # the crop the snippet must not skip

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert predict.main(["--checkpoint", str(default_run), "--json", str(image)]) == 0
    top = json.loads(stdout.getvalue())["top_k"]
    assert len(printed) == len(top) == 5
    assert printed[0][0] == top[0]["label"]
    theirs = {label: float(p) for label, p in printed}
    ours = dict(zip(trained.class_names, _softmax(trained.logits(expected[None])[0]), strict=True))
    for label, probability in theirs.items():
        assert abs(probability - ours[label]) < 1e-2, (label, probability, ours[label])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()
