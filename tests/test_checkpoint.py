"""Published checkpoints: every layout loads and runs, round trips, fine-tune adaptation, errors."""

import csv
import functools
import http.server
import os
import pickle
import threading
import zipfile

import jax
import numpy as np
import pytest
import tiny

from vit_jax import checkpoint, models, weights
from vit_jax.weights.errors import CheckpointError
from vit_jax.weights.tree import flatten

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
HYBRID = dict(TINY, name="tiny-hybrid", resnet=dict(num_layers=(1,), width_factor=0.5))
MIXER = dict(
    name="tiny-mixer",
    model_type="Mixer",
    patches=dict(size=(4, 4)),
    hidden_dim=16,
    num_blocks=2,
    tokens_mlp_dim=8,
    channels_mlp_dim=32,
)


def _images(size=8, n=2, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


def _model(spec, num_classes=5, size=8, seed=0, **overrides):
    """(model, params as numpy): every leaf random, so no check passes on zeros or ones."""
    model = models.get_model(spec, num_classes=num_classes, **overrides)
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, size)
    )
    return model, params


def _apply(model, params, size=8):
    run = jax.jit(functools.partial(model.apply, train=False))
    return np.asarray(run({"params": params}, _images(size))[0])


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "spec, overrides, size",
    [
        (TINY, {}, 8),
        (TINY, dict(classifier="map", representation_size=8), 8),
        (TINY, dict(scan=True), 8),
        (HYBRID, {}, 32),
        (MIXER, {}, 8),
        (MIXER, dict(scan=True), 8),
    ],
    ids=["vit", "vit-map-rep", "vit-scanned", "hybrid", "mixer", "mixer-scanned"],
)
def test_save_npz_round_trip_is_bit_exact(tmp_path, spec, overrides, size):
    model, params = _model(spec, size=size, **overrides)
    path = checkpoint.save_npz(params, tmp_path / "x.npz")
    loaded = checkpoint.load(path)
    # published files are per-layer
    tiny.assert_same_tree(loaded, models.unstack_layers(params), dtypes=True)
    if overrides.get("scan"):
        loaded = models.stack_layers(loaded)
    np.testing.assert_array_equal(_apply(model, loaded, size), _apply(model, params, size))
    with np.load(path, allow_pickle=False) as f:  # the flat layout published loaders read
        keys = set(f.files)
    if spec is MIXER:
        assert "MixerBlock_1/token_mixing/Dense_0/kernel" in keys
    else:
        assert {
            "embedding/kernel",
            "Transformer/encoder_norm/scale",
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias",
            "Transformer/encoderblock_0/LayerNorm_2/scale",
        } <= keys


def test_save_npz_writes_sidecar_and_bfloat16_as_float32(tmp_path):
    _, params = _model(TINY)
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
    meta = {"model": models.get_config(TINY).to_dict(), "class_names": list("abcde")}
    path = checkpoint.save_npz(bf16, tmp_path / "w.npz", metadata=meta)
    loaded, meta = weights.open(path)
    config, names = meta["model"], meta["class_names"]
    assert config["hidden_size"] == 16 and names == list("abcde")
    for key, value in flatten(loaded).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, flatten(bf16)[key].astype(np.float32))


# ----------------------------------------------------------------------------- published layouts


def _write(path, flat):
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
    return path


def test_reference_and_opt_target_files_load_and_run(tmp_path):
    model, params = _model(TINY)
    flat = flatten(params)
    expected = _apply(model, params)
    plain = _write(tmp_path / "plain.npz", flat)
    wrapped = {f"opt/target/{k}": v for k, v in flat.items()}
    wrapped["opt/state/step"] = np.array(7)  # optimizer state beside the weights is ignored
    wrapped["opt/state/param_states/cls/momentum"] = np.zeros((1, 1, 16))
    old = _write(tmp_path / "old.npz", wrapped)
    for path in (plain, old):
        loaded = checkpoint.load(path)
        tiny.assert_same_tree(loaded, params, dtypes=True)
        np.testing.assert_array_equal(_apply(model, loaded), expected)


def test_hybrid_groupnorm_stored_4d_loads_and_runs(tmp_path):
    model, params = _model(HYBRID, size=32)
    flat = flatten(params)
    gn = [k for k in flat if "/" in k and k.split("/")[-2].startswith("gn")]
    assert "gn_root/scale" in gn and "block1/unit1/gn_proj/bias" in gn
    old = {k: v.reshape(1, 1, 1, -1) if k in gn else v for k, v in flat.items()}
    loaded = checkpoint.load(_write(tmp_path / "r.npz", old))
    tiny.assert_same_tree(loaded, params, dtypes=True)
    np.testing.assert_array_equal(_apply(model, loaded, 32), _apply(model, params, 32))


def _big_vision_layout(params):
    """Our tree as big_vision writes it: params/, Linen names, root posemb, scanned blocks."""
    linen = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    stacked = models.stack_layers(params)
    out = {}
    for key, value in flatten(stacked).items():
        parts = key.split("/")
        if parts[:2] == ["Transformer", "encoderblock"]:
            parts[2] = linen.get(parts[2], parts[2])
        key = "/".join(parts)
        if key == "Transformer/posembed_input/pos_embedding":
            key = "pos_embedding"
            if "cls" in params:  # big_vision's cls gets no position embedding
                value = value[:, 1:]
        out[f"params/{key}"] = value
    out["opt/mu/head/bias"] = np.zeros(5)
    return out


@pytest.mark.parametrize("classifier", ["map", "token"])
def test_big_vision_files_load_and_run(tmp_path, classifier):
    model, params = _model(TINY, classifier=classifier)
    if classifier == "token":  # big_vision adds no posemb to the class token: a zero slot
        params["Transformer"]["posembed_input"]["pos_embedding"][:, 0] = 0
    flat = _big_vision_layout(params)
    assert "params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in flat
    assert flat["params/Transformer/encoderblock/LayerNorm_1/scale"].shape == (2, 16)
    path = _write(tmp_path / "bv.npz", flat)
    loaded = checkpoint.load(path)
    assert models.is_stacked(loaded)  # kept scanned; load_pretrained converts to the model
    tiny.assert_same_tree(models.unstack_layers(loaded), params, dtypes=True)
    expected = _apply(model, params)
    np.testing.assert_array_equal(_apply(model, models.unstack_layers(loaded)), expected)
    scanned = models.get_model(TINY, num_classes=5, classifier=classifier, scan=True)
    np.testing.assert_allclose(_apply(scanned, loaded), expected, atol=1e-5)
    if classifier == "map":
        assert "MAPHead_0" in loaded and "cls" not in loaded
        assert loaded["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 4, 16)


# ----------------------------------------------------------------------------- resampling


def test_resample_identity_at_equal_grid():
    posemb = np.random.RandomState(0).normal(size=(1, 1 + 9, 4)).astype(np.float32)
    out = weights.resample_posemb(posemb, (3, 3), num_prefix_tokens=1)
    np.testing.assert_array_equal(out, posemb)


@pytest.mark.parametrize("old, new", [((3, 3), (5, 5)), ((3, 5), (5, 9)), ((5, 5), (3, 3))])
def test_resample_is_exact_on_a_linear_ramp(old, new):
    def ramp(gh, gw):  # value = 2 * row + 4 * col in the corner-aligned coordinates of `old`
        y = np.linspace(0, old[0] - 1, gh)[:, None]
        x = np.linspace(0, old[1] - 1, gw)[None, :]
        table = np.stack([2 * y + 4 * x, -y + 0 * x], axis=-1)
        return table.reshape(1, gh * gw, 2).astype(np.float32)

    cls = np.array([[[7.0, -3.0]]], np.float32)
    posemb = np.concatenate([cls, ramp(*old)], axis=1)
    out = weights.resample_posemb(posemb, new, num_prefix_tokens=1, old_grid=old)
    assert out.shape == (1, 1 + new[0] * new[1], 2)
    np.testing.assert_array_equal(out[:, :1], cls)
    np.testing.assert_array_equal(out[:, 1:], ramp(*new))


# ----------------------------------------------------------------------------- fine-tuning


def test_load_pretrained_new_head_and_resolution(tmp_path):
    _, pretrained = _model(TINY, num_classes=10)
    path = checkpoint.save_npz(pretrained, tmp_path / "p.npz")
    model, init = _model(TINY, num_classes=3, size=16, seed=5)
    config = models.get_config(TINY)
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config)
    np.testing.assert_array_equal(params["head"]["kernel"], init["head"]["kernel"])
    np.testing.assert_array_equal(
        params["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
        pretrained["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
    )
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    stored = pretrained["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape == (1, 1 + 16, 16)
    np.testing.assert_array_equal(posemb[:, 0], stored[:, 0])
    np.testing.assert_array_equal(
        posemb, weights.resample_posemb(stored, (4, 4), num_prefix_tokens=1)
    )
    assert _apply(model, params, 16).shape == (2, 3)


def test_load_pretrained_non_square_grid_needs_image_size(tmp_path):
    _, pretrained = _model(TINY)
    model, init = _model(TINY, size=(8, 16))
    config = models.get_config(TINY)
    with pytest.raises(CheckpointError, match="not a square grid: pass image_size"):
        checkpoint.load_pretrained(
            pretrained_path=pretrained, init_params=init, model_config=config
        )
    params = checkpoint.load_pretrained(
        pretrained_path=pretrained, init_params=init, model_config=config, image_size=(8, 16)
    )
    stored = pretrained["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(
        params["Transformer"]["posembed_input"]["pos_embedding"],
        weights.resample_posemb(stored, (2, 4), num_prefix_tokens=1),
    )
    assert _apply(model, params, (8, 16)).shape == (2, 5)
    # ... and back: the stored grid comes from the file's sidecar image_size.
    meta = {"model": config.to_dict(), "image_size": [8, 16]}
    path = checkpoint.save_npz(params, tmp_path / "wide.npz", metadata=meta)
    back = checkpoint.load_pretrained(
        pretrained_path=path, init_params=pretrained, model_config=config
    )
    assert back["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 16)


@pytest.mark.parametrize("keep", [True, False])
def test_load_pretrained_representation_kept_or_dropped(keep):
    _, pretrained = _model(TINY, num_classes=10, representation_size=8)
    rep = 8 if keep else None
    model, init = _model(TINY, num_classes=3, seed=3, representation_size=rep)
    config = models.get_config(TINY, representation_size=rep)
    params = checkpoint.load_pretrained(
        pretrained_path=pretrained, init_params=init, model_config=config
    )
    assert ("pre_logits" in params) == keep
    if keep:
        np.testing.assert_array_equal(
            params["pre_logits"]["kernel"], pretrained["pre_logits"]["kernel"]
        )
    assert _apply(model, params).shape == (2, 3)


def test_load_pretrained_converts_scanned_and_per_layer():
    _, per_layer = _model(TINY)
    scanned_model, scanned_init = _model(TINY, scan=True, seed=4)
    config = models.get_config(TINY, scan=True)
    params = checkpoint.load_pretrained(
        pretrained_path=per_layer, init_params=scanned_init, model_config=config
    )
    assert models.is_stacked(params)
    back = checkpoint.load_pretrained(
        pretrained_path=params, init_params=per_layer, model_config=models.get_config(TINY)
    )
    tiny.assert_same_tree(back, per_layer, dtypes=True)


def test_load_pretrained_other_architecture_lists_keys_with_shapes(tmp_path):
    _, other = _model(TINY, hidden_size=24, transformer=dict(num_layers=3))
    path = checkpoint.save_npz(other, tmp_path / "other.npz")
    _, init = _model(TINY)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_pretrained(
            pretrained_path=path, init_params=init, model_config=models.get_config(TINY)
        )
    message = str(e.value)
    assert str(path) in message
    assert "unexpected (" in message and "encoderblock_2" in message
    assert "mismatched (" in message
    assert "encoderblock_0/LayerNorm_0/scale: stored (24,), model (16,)" in message


def test_load_pretrained_missing_representation_is_an_error():
    _, pretrained = _model(TINY)
    _, init = _model(TINY, representation_size=8)
    match = r"fit tiny: missing \(2\) \[pre_logits/bias \(8,\); pre_logits/kernel \(16, 8\)\]$"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load_pretrained(
            pretrained_path=pretrained,
            init_params=init,
            model_config=models.get_config(TINY, representation_size=8),
        )


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def good_file(tmp_path):
    _, params = _model(TINY)
    return checkpoint.save_npz(params, tmp_path / "good.npz")


def test_truncated_and_corrupted_files_are_one_clear_error(tmp_path, good_file):
    data = good_file.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}: a truncated or corrupted"):
        checkpoint.load(truncated)
    corrupted = tmp_path / "corrupted.npz"
    broken = bytearray(data)
    broken[len(data) // 3] ^= 0xFF  # inside an array: the zip CRC catches it
    corrupted.write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match=f"{corrupted}: truncated or corrupted"):
        checkpoint.load(corrupted)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/vit_jax_pickle_ran", "w"))


def test_pickle_files_are_never_unpickled(tmp_path):
    marker = "/tmp/vit_jax_pickle_ran"
    if os.path.exists(marker):
        os.remove(marker)
    for name, payload in (("p.npz", {"x": _Boom()}), ("obj.npz", None)):
        path = tmp_path / name
        if payload is None:  # an npz holding a pickled object array
            np.savez(path, x=np.array([_Boom()], dtype=object))
            match = "pickled object arrays"
        else:
            path.write_bytes(pickle.dumps(payload))
            match = "a pickle file"
        with pytest.raises(CheckpointError, match=f"{path}: .*{match}"):
            checkpoint.load(path)
    assert not os.path.exists(marker)


def test_other_files_are_one_clear_error(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such checkpoint file"):
        checkpoint.load(missing)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        checkpoint.load(npy)
    torch_like = tmp_path / "model.pth.npz"
    with zipfile.ZipFile(torch_like, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="'archive/data.pkl'.*PyTorch"):
        checkpoint.load(torch_like)


# ----------------------------------------------------------------------------- names and urls


def test_resolve_pretrained_names_and_augreg_index(tmp_path):
    assert checkpoint.resolve_pretrained("gs://vit_models/imagenet21k", "ViT-B_16") == (
        "gs://vit_models/imagenet21k/ViT-B_16.npz"
    )
    rows = [
        ("B_16-i21k-300ep-lr_0.001-aug_light1", "i21k", "0.40"),
        ("B_16-i21k-300ep-lr_0.001-aug_medium2", "i21k", "0.47"),
        ("B_16-i1k-300ep-lr_0.001-aug_strong2", "i1k", "0.80"),
        ("B_16x-i21k-300ep-lr_0.001-aug_none", "i21k", "0.99"),
        ("R26_S_32-i21k-300ep-lr_0.001-aug_light0", "i21k", "0.41"),
    ]
    with open(tmp_path / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "ds", "final_val", "filename"])
        w.writerows([(r[0].split("-")[0], r[1], r[2], r[0]) for r in rows])
    assert checkpoint.resolve_pretrained(str(tmp_path), "B_16") == (
        f"{tmp_path}/B_16-i21k-300ep-lr_0.001-aug_medium2.npz"
    )
    assert checkpoint.resolve_pretrained(str(tmp_path), "R26_S_32").endswith("aug_light0.npz")
    with pytest.raises(CheckpointError, match="no i21k AugReg checkpoint for 'S_16'"):
        checkpoint.resolve_pretrained(str(tmp_path), "S_16")


def test_remote_file_is_downloaded_once_into_the_cache(tmp_path, good_file, monkeypatch):
    monkeypatch.setenv(weights.cache.CACHE_ENV, str(tmp_path / "cache"))
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(good_file.parent), **kw)

        def do_GET(self):
            served.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/good.npz"
        first = checkpoint.load(url)
        second = checkpoint.load(url)
        with pytest.raises(FileNotFoundError, match="missing.npz: cannot be downloaded"):
            checkpoint.load(f"http://127.0.0.1:{server.server_port}/missing.npz")
    finally:
        server.shutdown()
    assert served == ["/good.npz", "/missing.npz"]
    tiny.assert_same_tree(first, checkpoint.load(good_file), dtypes=True)
    tiny.assert_same_tree(second, first, dtypes=True)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-good.npz")


def test_save_npz_never_overwrites_unless_asked(tmp_path):
    params = {"head": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    path = checkpoint.save_npz(params, tmp_path / "w.npz")
    before = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="w.npz: exists; refusing to overwrite"):
        checkpoint.save_npz({"head": {"kernel": np.zeros((2, 3), np.float32)}}, path)
    assert path.read_bytes() == before
    twice = {"head": {"kernel": 2 * np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    checkpoint.save_npz(twice, path, overwrite=True)
    np.testing.assert_array_equal(checkpoint.load(path)["head"]["kernel"], 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


# ----------------------------------------------------------------------------- one door


def test_open_and_save_go_through_every_format_and_back_bit_exactly(tmp_path):
    """npz -> timm -> HF -> npz through `weights.save` / `weights.open`: same params, same facts;
    `format_of` names each on the way (exact GELU and eps 1e-12, which the HF format records)."""
    spec = dict(TINY, gelu_approximate=False, layernorm_epsilon=1e-12)
    _, params = _model(spec, num_classes=3)
    meta = {
        "model": models.get_config(spec).to_dict(),
        "class_names": ["a", "b", "c"],
        "image_size": [8, 8],
    }
    path, current = tmp_path / "w.npz", params
    weights.save(params, meta, path)
    # each its own stem: w.safetensors would share (and be refused) w.npz's sidecar w.json
    for dst, fmt in (("timm.safetensors", "timm"), ("hf_dir", "hf"), ("back.npz", "npz")):
        loaded, loaded_meta = weights.open(path)
        assert loaded_meta["class_names"] == ["a", "b", "c"], path
        assert loaded_meta["image_size"] == [8, 8], path
        tiny.assert_same_tree(loaded, params, dtypes=True)
        written, kind = weights.save(loaded, loaded_meta, tmp_path / dst)
        assert kind == fmt and weights.format_of(written) == fmt
        path = written
    current, back_meta = weights.open(path)
    tiny.assert_same_tree(current, params, dtypes=True)
    assert back_meta["model"]["layernorm_epsilon"] == 1e-12
    assert back_meta["model"]["gelu_approximate"] is False


def test_format_of_and_open_refuse_what_they_cannot_read(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert weights.format_of(tmp_path / "run") == "run"
    assert weights.format_of(tmp_path / "x.bin") == "timm"
    assert weights.format_of("gs://bucket/ViT-B_16.npz") == "npz"
    with pytest.raises(CheckpointError, match="no trainer checkpoint found"):
        weights.open(tmp_path / "run")
    with pytest.raises(weights.CheckpointNotFoundError, match="no such checkpoint file"):
        weights.open(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="write timm state dicts as .safetensors"):
        weights.save({}, {}, tmp_path / "x.pth")
