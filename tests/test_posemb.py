"""Position embeddings: big_vision's sin-cos table, the variant older checkpoints keep, and the
one resampler of learned tables (scipy order 1 / torch bicubic, with and without antialiasing),
at load time and on the fly; the errors of inputs a model cannot take."""

import json

import jax
import numpy as np
import pytest
import scipy.ndimage
import tiny

from vit_jax import inference, models, predict, run_config, trainer, weights
from vit_jax import workdir as workdir_lib
from vit_jax.models import vit as vit_lib

try:  # the `torch` extra (conftest.py deselects `-m torch` where it is missing)
    import torch
except ImportError:
    torch = None

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=4, num_layers=2),
)


def _big_vision_table(h, w, width, temperature=10_000.0):
    """big_vision `posemb_sincos_2d`, written out from its definition in float64."""
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4, dtype=np.float64) / (width // 4 - 1)
    omega = 1.0 / temperature**omega
    y = y.flatten().astype(np.float64)[:, None] * omega[None]
    x = x.flatten().astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def _mocov3_table(h, w, width, temperature=10_000.0):
    """The MoCo v3 spacing (omega = k / (width // 4)): vit_jax's table before the variant."""
    q = width // 4
    pos = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2).astype(np.float64)
    omega = 1.0 / temperature ** (np.arange(q) / q)
    x, y = pos[:, :1] * omega, pos[:, 1:] * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def _randomize(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [rng.normal(0, 0.5, x.shape).astype(x.dtype) for x in leaves])


def _images(h, w, n=2, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


def _init(config, h, w, seed=1):
    model = models.get_model(config, num_classes=5)
    return model, _randomize(models.init_shapes(model, (h, w)), seed)


def _logits(model, params, x):
    """Jitted, as `inference.TrainedModel.logits` runs it (so equal means bit for bit)."""
    return np.asarray(
        jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])(params, x)
    )


def _with_table(params, table):
    """`params` of a fixed-table model plus a learned table holding `table` (prefix rows 0)."""
    encoder = dict(params["Transformer"], posembed_input={"pos_embedding": table})
    return {**params, "Transformer": encoder}


# ----------------------------------------------------------------------------- sincos2d


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
@pytest.mark.parametrize("width", [16, 64])
def test_sincos2d_is_big_vision_table(grid, width):
    table = np.asarray(models.sincos2d_posemb(*grid, width))
    expected = _big_vision_table(*grid, width)
    assert table.shape == expected.shape == (1, grid[0] * grid[1], width)
    np.testing.assert_allclose(table, expected, atol=1e-7, rtol=0)
    old = np.asarray(models.sincos2d_posemb(*grid, width, variant="mocov3"))
    np.testing.assert_allclose(old, _mocov3_table(*grid, width), atol=1e-7, rtol=0)
    assert np.abs(old - table).max() > 0.05  # the two variants are told apart


def test_sincos2d_errors_name_the_value():
    with pytest.raises(ValueError, match=r"posemb_sincos2d_variant must be one of .*'moco'"):
        models.sincos2d_posemb(2, 2, 16, variant="moco")
    with pytest.raises(ValueError, match="big_vision.*hidden_size >= 8, got 4"):
        models.sincos2d_posemb(2, 2, 4)
    with pytest.raises(ValueError, match=r"posemb_sincos2d_variant must be one of .*got 'x'"):
        models.get_model(dict(TINY, posemb="sincos2d", posemb_sincos2d_variant="x"), num_classes=2)


def _sincos_logits_via_table(config, params, x, table):
    """The logits of a `sincos2d` model computed as a `learn` model holding `table`."""
    learn = models.get_model(dict(config, posemb="learn"), num_classes=5)
    full = _with_table(params, np.asarray(table, np.float32))
    return np.asarray(learn.apply({"params": full}, x, train=False)[0])


@pytest.mark.parametrize("variant", ["big_vision", "mocov3"])
def test_sincos2d_model_adds_its_variant_table(variant):
    config = dict(TINY, classifier="gap", posemb="sincos2d", posemb_sincos2d_variant=variant)
    model, params = _init(config, 12, 20)
    x = _images(12, 20)
    got = np.asarray(model.apply({"params": params}, x, train=False)[0])
    reference = _big_vision_table if variant == "big_vision" else _mocov3_table
    want = _sincos_logits_via_table(config, params, x, reference(3, 5, 32))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert models.get_config(TINY).posemb_sincos2d_variant == "big_vision"  # the default


def _old_sidecar(config):
    """The model config exactly as vit_jax wrote it before `posemb_resample` and
    `posemb_sincos2d_variant` existed (it had `posemb_antialias`)."""
    record = models.get_config(config).to_dict()
    del record["posemb_resample"], record["posemb_sincos2d_variant"]
    record["posemb_antialias"] = False
    return json.loads(json.dumps(record))


def test_npz_written_before_the_variant_keeps_its_table(tmp_path):
    config = dict(TINY, classifier="gap", posemb="sincos2d")
    _, params = _init(config, 16, 16)
    old_config = dict(config, posemb_sincos2d_variant="mocov3")
    old_model = models.get_model(old_config, num_classes=5)
    x = _images(16, 16)
    expected = _logits(old_model, params, x)
    np.testing.assert_allclose(
        expected, _sincos_logits_via_table(config, params, x, _mocov3_table(4, 4, 32)), atol=1e-5
    )
    old = tmp_path / "old.npz"
    meta = {"model": _old_sidecar(config), "image_size": [16, 16]}
    weights.npz.save_npz(params, old, metadata=meta)
    assert "posemb_sincos2d_variant" not in json.loads((tmp_path / "old.json").read_text())["model"]
    loaded = inference.load_model(str(old))
    assert loaded.model_config.posemb_sincos2d_variant == "mocov3"
    np.testing.assert_array_equal(loaded.logits(x), expected)  # bit for bit
    # re-written by today's code, the variant is explicit and the logits stay
    _, meta_read = weights.open(old)
    again, _ = weights.save(params, meta_read, tmp_path / "again.npz")
    assert (
        json.loads((tmp_path / "again.json").read_text())["model"]["posemb_sincos2d_variant"]
        == "mocov3"
    )
    np.testing.assert_array_equal(inference.load_model(str(again)).logits(x), expected)
    # a file written from now on with the default gets big_vision's table
    new = tmp_path / "new.npz"
    weights.npz.save_npz(
        params, new, metadata={"model": models.get_config(config).to_dict(), "image_size": [16, 16]}
    )
    big_vision = _sincos_logits_via_table(config, params, x, _big_vision_table(4, 4, 32))
    np.testing.assert_allclose(inference.load_model(str(new)).logits(x), big_vision, atol=1e-5)
    assert np.abs(big_vision - expected).max() > 1e-3


def test_run_written_before_the_variant_keeps_its_table(tmp_path):
    config = dict(TINY, classifier="gap", posemb="sincos2d")
    _, params = _init(config, 16, 16)
    x = _images(16, 16)
    old_model = models.get_model(dict(config, posemb_sincos2d_variant="mocov3"), num_classes=5)
    expected = _logits(old_model, params, x)
    record = _old_sidecar(config)
    meta = {"step": 3, "data_step": 3, "model": record, "num_classes": 5, "image_size": [16, 16]}
    mngr = workdir_lib.checkpoint_manager(tmp_path / "run", async_save=False)
    state = trainer.TrainState(params=params, opt_state={"count": np.zeros((), np.int32)}, step=3)
    workdir_lib.save(mngr, 3, state, meta)
    mngr.close()
    loaded = inference.load_model(str(tmp_path / "run"))
    assert loaded.model_config.posemb_sincos2d_variant == "mocov3"
    np.testing.assert_array_equal(loaded.logits(x), expected)
    # a restart with today's default would change the table: refused, naming the field
    stored = {"model": record}
    new = run_config.with_current_defaults({"model": models.get_config(config).to_dict()})
    with pytest.raises(run_config.ConfigChangeError, match='posemb_sincos2d_variant "mocov3"'):
        run_config.check_restart(tmp_path, stored, new)
    same = run_config.with_current_defaults(
        {"model": dict(record, posemb_sincos2d_variant="mocov3")}
    )
    assert not [k for k in run_config.check_restart(tmp_path, stored, same) if "posemb" in k]


def test_stored_config_rules_touch_only_what_they_must():
    learn = _old_sidecar(TINY)
    assert models.stored_config(learn).posemb_sincos2d_variant == "big_vision"  # unused there
    assert models.stored_config(learn).posemb_resample == "linear_align_corners"
    grid = dict(learn, posemb_grid=[4, 4])
    assert models.stored_config(grid).posemb_resample == "bicubic"
    assert models.stored_config(dict(grid, posemb_antialias=True)).posemb_resample == (
        "bicubic_antialias"
    )
    partial = dict(TINY, posemb="sincos2d")  # not a stored record: today's default
    assert models.get_config(partial).posemb_sincos2d_variant == "big_vision"


# ----------------------------------------------------------------------------- the resampler


SIZES = [(4, 7), (7, 4), (5, 5), (3, 1), (1, 3), (6, 9), (9, 2), (37, 16)]


@pytest.mark.parametrize("n_in, n_out", SIZES)
def test_linear_align_corners_is_scipy_zoom_order_1(n_in, n_out):
    m = models.interpolation_matrix(n_in, n_out, "linear_align_corners")
    eye = np.eye(n_in)
    expected = scipy.ndimage.zoom(eye, (n_out / n_in, 1), order=1)
    assert expected.shape == (n_out, n_in)
    np.testing.assert_allclose(m, expected, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("method", ["bicubic", "bicubic_antialias"])
@pytest.mark.parametrize("n_in, n_out", SIZES)
def test_bicubic_matrices_are_torch_interpolate(method, n_in, n_out):
    m = models.interpolation_matrix(n_in, n_out, method)
    # each basis vector along the height (a width of 2 kept as is: torch's antialiased kernel
    # misreads a width of 1)
    eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1).repeat(1, 1, 1, 2)
    out = torch.nn.functional.interpolate(
        eye,
        size=(n_out, 2),
        mode="bicubic",
        align_corners=False,
        antialias=method == "bicubic_antialias",
    )[..., 0]
    np.testing.assert_allclose(m, out.reshape(n_in, n_out).numpy().T, atol=1e-6)


@pytest.mark.parametrize("method", models.RESAMPLE_METHODS)
def test_load_time_and_on_the_fly_are_one_resampler(method):
    rng = np.random.RandomState(0)
    posemb = rng.normal(size=(1, 2 + 4 * 5, 8)).astype(np.float32)
    on_the_fly = models.resample_posemb(
        jax.numpy.asarray(posemb), (6, 3), old_grid=(4, 5), num_prefix_tokens=2, method=method
    )
    load_time = weights.resample_posemb(
        posemb, (6, 3), old_grid=(4, 5), num_prefix_tokens=2, method=method
    )
    assert isinstance(load_time, np.ndarray) and load_time.dtype == np.float32
    np.testing.assert_array_equal(load_time[:, :2], posemb[:, :2])
    np.testing.assert_allclose(np.asarray(on_the_fly), load_time, atol=2e-6, rtol=0)
    rows = models.interpolation_matrix(4, 6, method)  # separable: rows, then columns
    cols = models.interpolation_matrix(5, 3, method)
    grid = posemb[0, 2:].astype(np.float64).reshape(4, 5, 8)
    expected = np.stack([rows @ grid[:, :, d] @ cols.T for d in range(8)], -1).reshape(1, 18, 8)
    np.testing.assert_allclose(load_time[:, 2:], expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"posemb_resample must be one of .*got 'area'"):
        models.interpolation_matrix(3, 4, "area")


def test_fit_resamples_with_the_stored_weights_method(tmp_path):
    """A table stored without a fixed grid, loaded at another size: fit resamples it with the
    method the weights record; with `posemb_grid` the model does the same on the fly."""
    for method in models.RESAMPLE_METHODS:
        config = dict(TINY, posemb_resample=method)
        _, params = _init(config, 16, 16)
        path = tmp_path / f"{method}.npz"
        meta = {"model": models.get_config(config).to_dict(), "image_size": [16, 16]}
        weights.npz.save_npz(params, path, metadata=meta)
        at_24 = inference.load_model(str(path), resolution=24)
        stored = params["Transformer"]["posembed_input"]["pos_embedding"]
        want = models.resample_posemb(
            stored, (6, 6), old_grid=(4, 4), num_prefix_tokens=1, method=method
        )
        got = at_24.params["Transformer"]["posembed_input"]["pos_embedding"]
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        fixed = models.get_model(dict(config, posemb_grid=(4, 4)), num_classes=5)
        x = _images(24, 24)
        np.testing.assert_allclose(
            at_24.logits(x), fixed.apply({"params": params}, x, train=False)[0], atol=1e-5
        )


# ----------------------------------------------------------------------------- errors


def test_a_model_without_a_fixed_grid_at_another_size_is_one_error(tmp_path):
    _, params = _init(TINY, 16, 16)
    path = tmp_path / "m.npz"
    meta = {"model": models.get_config(TINY).to_dict(), "image_size": [16, 16]}
    weights.npz.save_npz(params, path, metadata=meta)
    loaded = inference.load_model(str(path))
    with pytest.raises(ValueError) as e:
        loaded.intermediates(_images(20, 24))
    message = str(e.value)
    assert "\n" not in message
    assert "5x6 token grid needs a position table of 31 rows, the model's holds 17" in message
    assert "resolution" in message
    with pytest.raises(ValueError, match=r"image size 18x16 is not divisible .* stride 4x4"):
        loaded.logits(_images(18, 16))


def test_predict_cli_refuses_an_unfit_resolution_in_one_line(tmp_path, capsys):
    import PIL.Image

    config = dict(TINY, posemb_grid=(4, 4), posemb_resample="bicubic")
    _, params = _init(config, 16, 16)
    path = tmp_path / "m.npz"
    meta = {"model": models.get_config(config).to_dict(), "image_size": [16, 16]}
    weights.npz.save_npz(params, path, metadata=meta)
    image = tmp_path / "a.png"
    PIL.Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", str(path), "--resolution", "22", str(image)]) == 2
    line = tiny.error_line(capsys)
    assert "22x22" in line and "patch stride 4x4" in line
    assert predict.main(["--checkpoint", str(path), "--resolution", "24", str(image)]) == 0


def test_position_classes_are_registered():
    assert set(vit_lib.POSITION_EMBEDDINGS) == {"learn", "sincos2d", "none"}
    assert models.RESAMPLE_METHODS == ("linear_align_corners", "bicubic", "bicubic_antialias")
