"""Writers never clobber and readers never block: convert and export stage beside the
destination, refuse an existing one unless --overwrite (then replace it whole), leave nothing
behind on a failure, clean up after a killed run, and refuse FIFOs where a file belongs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny
from safetensors.numpy import load_file, save_file

from vit_jax import export, models, weights
from vit_jax.convert.__main__ import main as convert
from vit_jax.weights import hf, hf_common, normalization, timm
from vit_jax.weights.errors import CheckpointError

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
FAULT_TIMEOUT = 60  # a reader that opens a FIFO blocks forever: a regression fails, not hangs


def _npz(path, num_classes, seed=0):
    """A random tiny ViT with `num_classes` classes, saved as our .npz + sidecar."""
    config = models.get_config(TINY)
    model = models.get_model(config, num_classes=num_classes)
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, (8, 8))
    )
    names = [f"class{i}" for i in range(num_classes)]
    meta = {"model": config.to_dict(), "image_size": [8, 8], "class_names": names}
    weights.save(params, meta, path)
    return path


def _sharded_hf(src_npz, folder):
    """`src_npz` as a transformers folder whose weights are two shards and an index."""
    assert convert([str(src_npz), str(folder)]) == 0
    single = folder / hf_common.WEIGHTS
    state = load_file(single)
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2 :]), strict=True):
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{hf_common.WEIGHTS}.index.json").write_text(json.dumps(index))
    single.unlink()
    return folder, names


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _leftovers(parent):
    """Staging / partial entries anywhere under `parent` (ours or the older `.partial`)."""
    return sorted(
        str(p.relative_to(parent))
        for p in parent.rglob("*")
        if ".vit_jax-" in p.name or p.name.endswith(".partial")
    )


# ----------------------------------------------------------------------------- convert


def test_convert_refuses_an_existing_sharded_hf_dir_and_overwrite_replaces_it_whole(
    tmp_path, capsys
):
    ten, three = _npz(tmp_path / "ten.npz", 10), _npz(tmp_path / "three.npz", 3, seed=1)
    hf, shards = _sharded_hf(ten, tmp_path / "hf")
    assert weights.open(hf)[1]["class_names"] == [f"class{i}" for i in range(10)]
    before = _snapshot(hf)
    capsys.readouterr()

    assert convert([str(three), str(hf)]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {hf}: exists and is not empty; pass --overwrite to replace it"
    )
    assert _snapshot(hf) == before

    assert convert([str(three), str(hf), "--overwrite"]) == 0
    assert sorted(_snapshot(hf)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]  # no shard, no index of the old model
    params, meta = weights.open(hf)
    expected, _ = weights.open(three)
    tiny.assert_same_tree(params, expected)
    assert meta["class_names"] == [f"class{i}" for i in range(3)]
    assert _leftovers(tmp_path) == []
    assert not any(shard in os.listdir(hf) for shard in shards)


def test_convert_into_a_single_file_hf_dir_leaves_no_partial_on_failure(
    tmp_path, capsys, monkeypatch
):
    """Refused without --overwrite; with it, a writer failing midway (here: the preprocessor
    config, written last) leaves the old folder as it was and no staging or .partial file."""
    ten, three = _npz(tmp_path / "ten.npz", 10), _npz(tmp_path / "three.npz", 3, seed=1)
    hf = tmp_path / "hf"
    assert convert([str(ten), str(hf)]) == 0
    before = _snapshot(hf)
    capsys.readouterr()
    assert convert([str(three), str(hf)]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {hf}: exists and is not empty; pass --overwrite to replace it"
    )
    assert _snapshot(hf) == before and _leftovers(tmp_path) == []

    def disk_full(directory, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(normalization, "write_hf", disk_full)
    assert convert([str(three), str(hf), "--overwrite"]) == 1
    line = tiny.error_line(capsys)
    assert line.startswith(f"error: {hf}: cannot be written (") and "No space left" in line
    assert _snapshot(hf) == before and _leftovers(tmp_path) == []


def test_convert_overwrite_replaces_only_a_transformers_folder(tmp_path, capsys):
    """--overwrite never replaces a folder that is not a transformers model (a training run, a
    folder of anything); an existing .npz or its sidecar alone is refused, then replaced."""
    three = _npz(tmp_path / "three.npz", 3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    capsys.readouterr()
    for folder, why in ((run, "is a training run"), (other, "is not a transformers model folder")):
        before = _snapshot(folder)
        assert convert([str(three), str(folder), "--overwrite"]) == 2
        assert tiny.error_line(capsys).startswith(f"error: {folder}: {why}")
        assert _snapshot(folder) == before
    sidecar_only = tmp_path / "out.json"
    sidecar_only.write_text('{"model": "an older model"}')
    assert convert([str(three), str(tmp_path / "out.npz")]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {sidecar_only}: exists (the JSON sidecar of out.npz); pass --overwrite to "
        "replace it"
    )
    assert convert([str(three), str(tmp_path / "out.npz"), "--overwrite"]) == 0
    assert weights.open(tmp_path / "out.npz")[1]["class_names"] == ["class0", "class1", "class2"]
    assert _leftovers(tmp_path) == []


def _fifo_sharded(tmp_path):
    folder, names = _sharded_hf(_npz(tmp_path / "ten.npz", 10), tmp_path / "sharded")
    fifo = folder / names[0]
    fifo.unlink()
    os.mkfifo(fifo)
    return folder, fifo


def _fifo_single(tmp_path):
    folder = tmp_path / "single"
    assert convert([str(_npz(tmp_path / "ten.npz", 10)), str(folder)]) == 0
    fifo = folder / hf_common.WEIGHTS
    fifo.unlink()
    os.mkfifo(fifo)
    return folder, fifo


def _fifo_npz(tmp_path):
    os.mkfifo(tmp_path / "x.npz")
    return tmp_path / "x.npz", tmp_path / "x.npz"


def _fifo_sidecar(tmp_path):
    npz = _npz(tmp_path / "x.npz", 3)
    sidecar = tmp_path / "x.json"
    sidecar.unlink()
    os.mkfifo(sidecar)
    return npz, sidecar


def _fifo_timm(tmp_path):
    os.mkfifo(tmp_path / "t.safetensors")
    return tmp_path / "t.safetensors", tmp_path / "t.safetensors"


@pytest.mark.parametrize(
    "make",
    [_fifo_sharded, _fifo_single, _fifo_npz, _fifo_sidecar, _fifo_timm],
    ids=lambda f: f.__name__[6:],
)
def test_a_fifo_where_a_weights_file_belongs_is_refused_not_opened(tmp_path, make):
    src, fifo = make(tmp_path)
    cmd = [sys.executable, "-m", "vit_jax.convert", str(src), str(tmp_path / "out.npz")]
    if make is _fifo_timm:  # a timm file without sidecar names its model
        cmd += ["--model", "ViT-Ti_16"]
    run = tiny.run(cmd, timeout=FAULT_TIMEOUT)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        f"error: {fifo}: is a FIFO (named pipe), not a regular file (refused, never opened)"
    )
    assert not (tmp_path / "out.npz").exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- library


def test_library_writers_refuse_existing_destinations_unless_overwrite(tmp_path):
    """`weights.save` and the writers under it refuse what exists (a folder, a file, a sidecar)
    with DestinationExistsError, and replace it whole with overwrite=True."""
    ten, three = _npz(tmp_path / "ten.npz", 10), _npz(tmp_path / "three.npz", 3, seed=1)
    p10, m10 = weights.open(ten)
    p3, m3 = weights.open(three)
    for dst in ("hf", "t.safetensors", "w.npz"):
        path = tmp_path / dst
        weights.save(p10, m10, path)
        before = _snapshot(tmp_path)
        with pytest.raises(CheckpointError, match="refusing to overwrite it") as e:
            weights.save(p3, m3, path)
        assert isinstance(e.value, weights.DestinationExistsError)
        assert _snapshot(tmp_path) == before
        weights.save(p3, m3, path, overwrite=True)
        tiny.assert_same_tree(weights.open(path)[0], p3)
        assert weights.open(path)[1]["class_names"] == m3["class_names"]
    config = models.get_config(TINY)
    with pytest.raises(CheckpointError, match="hf: exists and is not empty"):
        hf.to_hf(p3, config, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="t.safetensors: exists"):
        timm.to_timm(p3, config, tmp_path / "t.safetensors")
    # overwrite without a sidecar removes the old one: it would describe the new weights
    weights.npz.save_npz(p10, tmp_path / "w.npz", overwrite=True)
    assert not (tmp_path / "w.json").exists()
    assert _leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_staging_is_removed_only_when_ours_and_its_writer_is_gone(tmp_path):
    from vit_jax.weights import files

    dst, host = tmp_path / "out", files._host()
    dead, alive = _dead_pid(), os.getppid()
    mine = [f".out.vit_jax-staging-{host}-{dead}-abc123"]
    kept = [
        f".out.vit_jax-staging-{host}-{alive}-abc123",  # its writer still runs
        f".out.vit_jax-staging-{host}x-{dead}-abc123",  # another host's
        f".other.vit_jax-staging-{host}-{dead}-abc123",  # another destination's
        ".out.abc123",  # an older export's temporary folder: not unambiguously ours
    ]
    for name in mine + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_text("x")
    aside = tmp_path / f".out.vit_jax-replaced-{host}-{dead}-abc123"
    aside.mkdir()
    (aside / "model.json").write_text("the old export")
    files.clean_stale(dst)  # a replacement that never finished: the old folder comes back
    assert (dst / "model.json").read_text() == "the old export" and not aside.exists()
    with files.staged_dir(dst, overwrite=True) as staging:
        (staging / "model.json").write_text("new")
    assert (dst / "model.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])


# ----------------------------------------------------------------------------- export


def _export(capsys, *argv) -> tuple[int, str]:
    code = export.main([*argv, "--platforms", "cpu"])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_export_refuses_an_existing_out_unless_overwrite_replaces_an_earlier_export(
    tmp_path, capsys
):
    ckpt = _npz(tmp_path / "m.npz", 3)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--format", "stablehlo", "--out", str(out)]
    assert _export(capsys, *args)[0] == 0
    (out / "stale.bin").write_text("from an older export")
    before = _snapshot(out)
    code, err = _export(capsys, *args)
    assert code == 2 and err == (
        f"error: --out {out} exists and is not empty; give a new or empty directory, or pass "
        "--overwrite to replace it"
    )
    assert _snapshot(out) == before
    code, err = _export(capsys, *args, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(json.loads((out / "model.json").read_text())["files"])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    code, err = _export(capsys, *args[:-1], str(notes), "--overwrite")
    assert code == 2 and err == (
        f"error: --out {notes} is not an earlier export (no model.json naming a format); not "
        "replaced; give a new or empty directory"
    )
    assert (notes / "todo.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_a_killed_export_leaves_staging_that_the_next_export_removes(tmp_path, capsys):
    ckpt = _npz(tmp_path / "m.npz", 3)
    out = tmp_path / "saved_model"
    staged = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".saved_model.")]  # noqa: E731
    cmd = [sys.executable, "-m", "vit_jax.export", "--checkpoint", str(ckpt),
           "--format", "saved_model", "--platforms", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tiny.ROOT, env=tiny.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not staged() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert staged(), f"no staging folder appeared (exit {proc.poll()})"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = staged()
    assert left and not out.exists()  # what a kill leaves
    code, err = _export(
        capsys, "--checkpoint", str(ckpt), "--format", "stablehlo", "--out", str(out)
    )
    assert code == 0, err
    assert staged() == [] and json.loads((out / "model.json").read_text())["format"] == "stablehlo"
