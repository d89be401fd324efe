"""The reader CLIs (predict, evaluate, visualize, convert) on faulty inputs: each fault injected,
the outcome, the exit code (2 configuration, 1 runtime) and a one-line `error:` naming file
and keys. Checkpoints are tiny random models written directly; one 2-step trainer run provides
a real workdir."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tiny
from PIL import Image

from vit_jax import checkpoint, evaluate, inference, models, predict, visualize
from vit_jax.convert.__main__ import main as convert_main
from vit_jax.weights import hf

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
DIGITS = [str(i) for i in range(10)]


def _params(spec=TINY, num_classes=10, size=8, seed=0, **overrides):
    model = models.get_model(spec, num_classes=num_classes, **overrides)
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, size)
    )


def _npz(path, params, *, model=TINY, class_names=DIGITS, image_size=(8, 8), sidecar=True):
    meta = None
    if sidecar:
        meta = {
            "model": models.get_config(model).to_dict(),
            "class_names": class_names,
            "image_size": list(image_size),
        }
    return str(checkpoint.save_npz(params, path, metadata=meta))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    pixels = np.random.RandomState(0).randint(0, 255, (12, 12, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def unfit(tmp_path_factory):
    """An .npz whose sidecar claims hidden size 32 while its arrays are a hidden-16 model."""
    root = tmp_path_factory.mktemp("unfit")
    return _npz(root / "unfit.npz", _params(), model=dict(TINY, hidden_size=32))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real trainer workdir: a 2-step tiny digits run (pp.crop 8, hidden size 32)."""
    from vit_jax import trainer

    workdir = tmp_path_factory.mktemp("run")
    config = tiny.tiny_config(
        total_steps=2, warmup_steps=1, checkpoint_every=2, eval_every=100, progress_every=1
    )
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


def _digits_config(**changes):
    return tiny.tiny_config(**changes)


# ----------------------------------------------------------------------------- item 7


def _assert_names_file_and_keys(line: str, path: str) -> None:
    assert path in line
    assert "does not fit" in line and "mismatched (" in line
    assert "embedding/kernel: stored (4, 4, 3, 16), model (4, 4, 3, 32)" in line


def test_predict_unfit_checkpoint_is_one_line_exit_2(unfit, image, capsys):
    assert predict.main(["--checkpoint", unfit, image]) == 2
    _assert_names_file_and_keys(tiny.error_line(capsys), unfit)
    assert capsys.readouterr().out == ""


def test_visualize_unfit_checkpoint_is_one_line_exit_2(unfit, image, tmp_path, capsys):
    assert visualize.main(["--checkpoint", unfit, "--out", str(tmp_path / "maps"), image]) == 2
    _assert_names_file_and_keys(tiny.error_line(capsys), unfit)
    assert not (tmp_path / "maps").exists() or not any((tmp_path / "maps").iterdir())


def test_evaluate_unfit_checkpoint_is_one_line_exit_2(unfit, capsys):
    argv = ["--checkpoint", unfit, "--config=configs/default.py"]
    assert evaluate.main([*argv, *tiny.flags()]) == 2
    _assert_names_file_and_keys(tiny.error_line(capsys), unfit)


def test_wrong_model_name_for_a_file_is_exit_2(tmp_path, image, capsys):
    bare = _npz(tmp_path / "bare.npz", _params(), sidecar=False)
    assert predict.main(["--checkpoint", bare, image]) == 2
    assert "pass --model" in tiny.error_line(capsys)
    assert predict.main(["--checkpoint", bare, "--model", "ViT-Ti_16", image]) == 2
    line = tiny.error_line(capsys)
    assert bare in line and "embedding/kernel: stored (4, 4, 3, 16)" in line
    assert predict.main(["--checkpoint", bare, "--model", "ViT-B_61", image]) == 2
    assert "unknown model name 'ViT-B_61'" in tiny.error_line(capsys)


def test_resolution_resamples_the_position_embeddings(tmp_path, image, capsys):
    model = _npz(tmp_path / "m.npz", _params())  # trained at 8x8: a 2x2 grid
    trained = inference.load_model(model, resolution=12)
    assert trained.crop == 12
    assert trained.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 10, 16)
    assert predict.main(["--checkpoint", model, "--resolution", "12", image]) == 0
    assert predict.main(["--checkpoint", model, "--resolution", "10", image]) == 2
    assert "10x10 is not divisible by the model's patch stride 4x4" in tiny.error_line(capsys)


def test_bad_flags_are_one_line_exit_2(unfit, image, capsys):
    for argv in (
        [predict.main, "--checkpoint", unfit, image],
        [visualize.main, "--checkpoint", unfit, "--out", "o", image],
        [convert_main, unfit, "out.npz"],
    ):
        with pytest.raises(SystemExit) as e:
            argv[0]([*argv[1:], "--no-such-flag"])
        assert e.value.code == 2
        assert "unrecognized arguments: --no-such-flag" in tiny.error_line(capsys)
    with pytest.raises(SystemExit) as e:
        predict.main([image])
    assert e.value.code == 2
    assert "required: --checkpoint" in tiny.error_line(capsys)
    assert evaluate.main(["--checkpoint", unfit, "--bogus"]) == 2
    assert "bogus" in tiny.error_line(capsys)
    assert evaluate.main(["--checkpoint", unfit]) == 2
    assert "--config are required" in tiny.error_line(capsys)


def test_unreadable_image_is_a_runtime_failure_exit_1(tmp_path, image, capsys):
    good = _npz(tmp_path / "good.npz", _params())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert predict.main(["--checkpoint", good, image, str(broken)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{image}: ")  # the good image still gets its answer
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken}: not a readable image"), err


def test_convert_errors_exit_2_one_line(tmp_path, capsys):
    params = _params(size=8)
    bare = _npz(tmp_path / "p.npz", params, sidecar=False)
    assert convert_main([bare, str(tmp_path / "hf"), "--model", "ViT-Ti_16"]) == 2
    line = tiny.error_line(capsys)
    assert bare in line and "embedding/kernel: found (4, 4, 3, 16)" in line


# ----------------------------------------------------------------------------- item 2


def test_predict_trusts_the_checkpoint_over_a_changed_config_json(run_dir, tmp_path, image):
    wd = tmp_path / "run"
    shutil.copytree(run_dir, wd)
    config = json.loads((wd / "config.json").read_text())
    assert config["pp"]["crop"] == 8 and config["model"]["hidden_size"] == 32
    config["pp"].update(crop=20, resize=20)
    config["model"]["hidden_size"] = 64
    config["model"]["transformer"]["num_layers"] = 5
    (wd / "config.json").write_text(json.dumps(config))

    trained = inference.load_model(str(wd))
    assert (trained.crop, trained.resize) == (8, 8)
    assert trained.model.hidden_size == 32 and trained.model.num_layers == 2
    assert trained.class_names == DIGITS
    assert predict.main(["--checkpoint", str(wd), "--json", image]) == 0
    # The step directory itself reads the same way.
    step_dir = next((wd / "checkpoints").iterdir())
    assert inference.load_model(str(step_dir)).crop == 8


def _as_before_eval_preprocessing(wd):
    """The run as written before checkpoints recorded `eval_preprocessing` (the key dropped from
    each checkpoint's JSON meta): its eval geometry then comes from config.json."""
    for meta in (wd / "checkpoints").glob("*/meta/metadata"):
        recorded = json.loads(meta.read_text())
        assert recorded.pop("eval_preprocessing") == {"resize": 8, "crop": 8, "antialias": True}
        meta.write_text(json.dumps(recorded))


def test_the_checkpoint_s_eval_preprocessing_wins_over_an_edited_config_json(run_dir, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(run_dir, wd)
    config = json.loads((wd / "config.json").read_text())
    config["pp"].update(resize=10, antialias=False)  # edited after the run
    (wd / "config.json").write_text(json.dumps(config))
    trained = inference.load_model(str(wd))
    assert (trained.resize, trained.crop, trained.antialias) == (8, 8, True)


def test_unchanged_config_json_supplies_the_eval_resize(run_dir, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(run_dir, wd)
    _as_before_eval_preprocessing(wd)
    config = json.loads((wd / "config.json").read_text())
    config["pp"]["resize"] = 10  # crop still 8: the run's config, so its resize is used
    (wd / "config.json").write_text(json.dumps(config))
    assert (inference.load_model(str(wd)).resize, inference.load_model(str(wd)).crop) == (10, 8)


@pytest.mark.parametrize("antialias", [False, True, "no"])
def test_a_runs_pp_antialias_reaches_predict(run_dir, tmp_path, image, capsys, antialias):
    """A run evaluated with plain bilinear downscaling (`pp.antialias=False`) is read with it by
    predict (and serve / visualize / export, through the same TrainedModel); a value that is not
    a boolean is ignored with a warning, as any unreadable config.json. (Runs from before the
    checkpoints recorded it; newer ones carry it with the weights.)"""
    wd = tmp_path / "run"
    shutil.copytree(run_dir, wd)
    _as_before_eval_preprocessing(wd)
    config = json.loads((wd / "config.json").read_text())
    config["pp"]["antialias"] = antialias  # the fixture's image is 12 px, downscaled to 8
    (wd / "config.json").write_text(json.dumps(config))
    trained = inference.load_model(str(wd))
    assert trained.antialias is (antialias is not False)
    chosen = trained.preprocess_file(image)
    plain = inference.preprocess_file(image, resize=8, crop=8, antialias=False)
    smooth = inference.preprocess_file(image, resize=8, crop=8, antialias=True)
    assert np.abs(plain - smooth).max() > 0.1  # the two resizes really differ here
    np.testing.assert_array_equal(chosen, plain if antialias is False else smooth)
    assert predict.main(["--checkpoint", str(wd), "--json", image]) == 0
    row = json.loads(capsys.readouterr().out)
    logits = trained.logits(chosen[None])[0].astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {r["index"]: r["probability"] for r in row["top_k"]}
    for index, probability in got.items():
        assert probability == pytest.approx(expected[index], abs=1e-5)


def test_predict_skips_a_damaged_newest_checkpoint(run_dir, tmp_path, image, capsys, caplog):
    wd = tmp_path / "run"
    shutil.copytree(run_dir, wd)
    (step,) = [p.name for p in (wd / "checkpoints").iterdir()]
    newer = wd / "checkpoints" / str(int(step) + 100)
    shutil.copytree(wd / "checkpoints" / step, newer)
    meta = newer / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])  # a truncated meta, as a crashed copy leaves it
    assert predict.main(["--checkpoint", str(wd), image]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert any(str(newer) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert newer.is_dir()  # a reader never changes the run
    # When no checkpoint reads: one line naming the run, exit 2.
    (wd / "checkpoints" / step / "meta" / "metadata").write_bytes(b"{")
    assert predict.main(["--checkpoint", str(wd), image]) == 2
    assert str(wd) in tiny.error_line(capsys)


def test_workdir_without_checkpoint_is_exit_2(tmp_path, image, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")
    assert predict.main(["--checkpoint", str(tmp_path), image]) == 2
    assert str(tmp_path) in tiny.error_line(capsys)


# ----------------------------------------------------------------------------- item 8


def test_evaluate_class_count_mismatch_needs_the_flag(tmp_path, capsys):
    two = _npz(tmp_path / "two.npz", _params(num_classes=2), class_names=["a", "b"])
    argv = ["--checkpoint", two, "--config=configs/default.py", *tiny.flags()]
    assert evaluate.main(argv) == 2
    line = tiny.error_line(capsys)
    assert two in line and "predicts 2 classes" in line and "has 10" in line
    assert "--allow-class-mismatch" in line
    assert evaluate.main([*argv, "--allow-class-mismatch", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_examples"] == 355


def test_evaluate_class_name_mismatch_is_an_error(tmp_path, capsys):
    letters = _npz(tmp_path / "letters.npz", _params(), class_names=list("abcdefghij"))
    argv = ["--checkpoint", letters, "--config=configs/default.py", *tiny.flags()]
    assert evaluate.main(argv) == 2
    line = tiny.error_line(capsys)
    assert "class 0 is 'a' in the checkpoint, '0' in digits" in line


def test_evaluate_npz_without_sidecar_uses_the_configs_model(tmp_path, capsys):
    """The doc says config.model supplies the model when the file does not record it."""
    spec = dict(tiny.tiny_config().model.to_dict())
    bare = _npz(tmp_path / "bare.npz", _params(spec), sidecar=False)
    argv = ["--checkpoint", bare, "--config=configs/default.py", *tiny.flags()]
    assert evaluate.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_examples"] == 355
    # ... and when it does not fit the config's model, that is the one-line report.
    other = _npz(tmp_path / "other.npz", _params(), sidecar=False)  # hidden 16, config 32
    assert evaluate.main(["--checkpoint", other, *argv[2:]]) == 2
    assert other in tiny.error_line(capsys)


def test_evaluate_uses_the_checkpoints_image_size(tmp_path, capsys):
    size12 = _npz(tmp_path / "s12.npz", _params(size=12), image_size=(12, 12))
    argv = ["--checkpoint", size12, "--config=configs/default.py", *tiny.flags()]
    assert evaluate.main([*argv, "--json"]) == 0  # config.pp.crop is 8
    assert json.loads(capsys.readouterr().out)["test_examples"] == 355


# ----------------------------------------------------------------------------- item 9


def test_visualize_same_basename_gives_two_files(tmp_path, image, capsys):
    model = _npz(tmp_path / "m.npz", _params())
    (tmp_path / "img" / "dup").mkdir(parents=True)
    a, b = tmp_path / "img" / "good.png", tmp_path / "img" / "dup" / "good.png"
    shutil.copy(image, a)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(b)
    out = tmp_path / "maps"
    assert visualize.main(["--checkpoint", model, "--out", str(out), str(a), str(b)]) == 0
    first, second = out / "good_rollout.png", out / "dup" / "good_rollout.png"
    assert first.exists() and second.exists()
    assert Image.open(first).tobytes() != Image.open(second).tobytes()
    assert capsys.readouterr().out.split() == [str(first), str(second)]


def test_output_stems_are_unique():
    stems = visualize.output_stems(
        ["/d/a/good.png", "/d/a/dup/good.png", "/d/a/x.jpg", "/d/a/x.png", "/d/a/good.png"],
        visualize.pathlib.Path("out"),
    )
    assert {k: str(v) for k, v in stems.items()} == {
        "/d/a/good.png": "out/good",
        "/d/a/dup/good.png": "out/dup/good",
        "/d/a/x.jpg": "out/x.jpg",
        "/d/a/x.png": "out/x.png",
    }


def test_visualize_out_is_an_existing_file(tmp_path, image, capsys):
    model = _npz(tmp_path / "m.npz", _params())
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    assert visualize.main(["--checkpoint", model, "--out", str(taken), image]) == 2
    line = tiny.error_line(capsys)
    assert str(taken) in line and "existing file" in line
    assert taken.read_text() == "keep me"


def test_visualize_deit_distillation_token(tmp_path, image):
    deit = dict(TINY, name="tiny-deit", distillation_token=True)
    model = _npz(tmp_path / "deit.npz", _params(deit), model=deit)
    out = tmp_path / "maps"
    assert visualize.main(["--checkpoint", model, "--out", str(out), "--heads", image]) == 0
    assert Image.open(out / "x_heads.png").size == (224 * 2, 224)


def test_rollout_skips_both_prefix_tokens():
    layers, heads, n = 2, 2, 6  # cls, dist and 4 patches
    focused = np.zeros((layers, 1, heads, n, n))
    focused[..., 1] = 0.5  # half of every row on the distillation token
    focused[..., 4] = 0.5  # half on patch 2
    maps = visualize.attention_rollout(focused, num_prefix_tokens=2)
    assert maps.shape == (1, 4)
    np.testing.assert_allclose(maps.sum(-1), 1.0)
    assert maps[0].argmax() == 2


# ----------------------------------------------------------------------------- item 10


@pytest.fixture
def hf_sharded(tmp_path):
    """A transformers dir whose weights are split into two shards listed in the index."""
    from vit_jax.weights import pytorch as pt

    config = models.get_config(TINY)
    model_dir = hf.to_hf(_params(num_classes=3), config, tmp_path / "model", image_size=(8, 8))
    state = pt.read_safetensors(model_dir / hf.WEIGHTS)
    (model_dir / hf.WEIGHTS).unlink()
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for name, part in (("a.safetensors", keys[:half]), ("b.safetensors", keys[half:])):
        pt.write_safetensors({k: state[k] for k in part}, model_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    index = model_dir / f"{hf.WEIGHTS}.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(model_dir / "b.safetensors", tmp_path / "evil.safetensors")
    return model_dir, index, weight_map


def _point_shards(index, weight_map, old, new):
    index.write_text(
        json.dumps({"weight_map": {k: new if v == old else v for k, v in weight_map.items()}})
    )


def test_hf_sharded_checkpoint_reads(hf_sharded):
    model_dir, _, _ = hf_sharded
    assert hf.from_hf(model_dir).params["head"]["kernel"].shape == (16, 3)


@pytest.mark.parametrize("shard", ["../evil.safetensors", "ABSOLUTE", "sub/../../evil.safetensors"])
def test_hf_index_outside_the_folder_is_refused(hf_sharded, shard, tmp_path, capsys):
    model_dir, index, weight_map = hf_sharded
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "evil.safetensors")
    _point_shards(index, weight_map, "b.safetensors", shard)
    assert convert_main([str(model_dir), str(tmp_path / "out.npz")]) == 2
    line = tiny.error_line(capsys)
    assert str(index) in line and repr(shard) in line and "refused" in line
    assert not (tmp_path / "out.npz").exists()


def test_hf_index_symlink_escaping_the_folder_is_refused(hf_sharded, tmp_path, capsys):
    model_dir, index, weight_map = hf_sharded
    os.symlink(tmp_path / "evil.safetensors", model_dir / "link.safetensors")
    _point_shards(index, weight_map, "b.safetensors", "link.safetensors")
    assert convert_main([str(model_dir), str(tmp_path / "out.npz")]) == 2
    line = tiny.error_line(capsys)
    assert "'link.safetensors'" in line and "outside" in line


def test_hf_cache_snapshot_symlinks_into_blobs_are_read(hf_sharded, tmp_path):
    """The hub cache keeps files in <repo>/blobs and links them from <repo>/snapshots/<rev>."""
    model_dir, _, _ = hf_sharded
    repo = tmp_path / "models--x--tiny"
    snapshot = repo / "snapshots" / "rev0"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        os.symlink(f"../../blobs/{f.name}", snapshot / f.name)
    assert hf.from_hf(snapshot).params["head"]["kernel"].shape == (16, 3)


def test_hf_index_that_is_not_an_index(hf_sharded, tmp_path, capsys):
    model_dir, index, _ = hf_sharded
    index.write_text('{"weights": []}')
    assert convert_main([str(model_dir), str(tmp_path / "out.npz")]) == 2
    assert "not a sharded-checkpoint index" in tiny.error_line(capsys)
