"""Every config file loads, names a buildable model and carries the reference recipe."""

import os
import pathlib
import sys

import pytest
import tiny
from test_models import PUBLISHED_COUNTS

from vit_jax import benchmark, cli, configs, models
from vit_jax.configs import augreg, default, mixer, transfer, vit


def test_vit_config_has_reference_finetune_recipe():
    c = vit.get_config("b16,cifar10")
    assert c.model_name == "ViT-B_16" and c.model.hidden_size == 768
    assert (c.optimizer, c.momentum, c.base_lr, c.batch) == ("sgd", 0.9, 0.03, 512)
    assert (c.warmup_steps, c.total_steps, c.decay_type, c.grad_norm_clip) == (
        500,
        10_000,
        "cosine",
        1.0,
    )
    assert (c.pp.train, c.pp.test, c.pp.crop) == ("train[:98%]", "test", 384)
    assert c.pretrained_dir == "."
    pets = vit.get_config("r50_b16,oxford_iiit_pet")
    assert pets.model_name == "R50+ViT-B_16" and pets.total_steps == 500
    assert vit.get_config("ViT-L_32,/data/folder").dataset == "/data/folder"
    with pytest.raises(ValueError, match="ViT-B_16"):
        vit.get_config("ViT-B16,cifar10")


def _vit_count(*, patch, width, mlp, depth, tokens, classes):
    """Parameters of a class-token ViT, counted layer by layer from the published architecture.

    Patch embedding (a p x p x 3 -> D conv with bias), `cls`, a position table with a row per
    patch and one for `cls`; per block two LayerNorms (scale, bias), query/key/value/out
    projections (D x D and D each) and the MLP (D x M, M, M x D, D); the final norm; the head.
    """
    d = width
    block = 2 * 2 * d + 4 * (d * d + d) + (d * mlp + mlp + mlp * d + d)
    return (
        patch * patch * 3 * d
        + d
        + d
        + (tokens + 1) * d
        + depth * block
        + 2 * d
        + d * classes
        + classes
    )


def _mixer_count(*, patch, width, tokens_mlp, channels_mlp, depth, tokens, classes):
    """Parameters of an MLP-Mixer: stem conv, per block two LayerNorms, the token MLP (S x T, T,
    T x S, S) and the channel MLP (D x C, C, C x D, D), the pre-head norm, the head."""
    d = width
    token_mlp = tokens * tokens_mlp + tokens_mlp + tokens_mlp * tokens + tokens
    channel_mlp = d * channels_mlp + channels_mlp + channels_mlp * d + d
    block = 2 * 2 * d + token_mlp + channel_mlp
    return patch * patch * 3 * d + d + depth * block + 2 * d + d * classes + classes


def _hybrid_count(published, *, width, tokens_at_224, tokens, classes):
    """A hybrid's count from its published one (224 px, 1000 classes): only the position table
    (one row per token and one for `cls`) and the head depend on the crop and the classes."""
    head = lambda c: width * c + c
    return (
        published - (tokens_at_224 + 1) * width + (tokens + 1) * width - head(1000) + head(classes)
    )


VIT = dict(
    Ti_16=dict(patch=16, width=192, mlp=768, depth=12),
    S_16=dict(patch=16, width=384, mlp=1536, depth=12),
    B_16=dict(patch=16, width=768, mlp=3072, depth=12),
    L_16=dict(patch=16, width=1024, mlp=4096, depth=24),
    H_14=dict(patch=14, width=1280, mlp=5120, depth=32),
    B_8=dict(patch=8, width=768, mlp=3072, depth=12),
    S_32=dict(patch=32, width=384, mlp=1536, depth=12),
    B_32=dict(patch=32, width=768, mlp=3072, depth=12),
    L_32=dict(patch=32, width=1024, mlp=4096, depth=24),
)
MIXER = dict(
    B_16=dict(patch=16, width=768, tokens_mlp=384, channels_mlp=3072, depth=12),
    L_16=dict(patch=16, width=1024, tokens_mlp=512, channels_mlp=4096, depth=24),
    B_32=dict(patch=32, width=768, tokens_mlp=384, channels_mlp=3072, depth=12),
)


def test_count_formulas_reproduce_the_published_counts():
    """At 224 px and 1000 classes the formulas give every published ViT and Mixer count."""
    for name, arch in VIT.items():
        tokens = (224 // arch["patch"]) ** 2
        count = _vit_count(**arch, tokens=tokens, classes=1000)
        assert count == PUBLISHED_COUNTS[f"ViT-{name}"], name
    for name, arch in MIXER.items():
        tokens = (224 // arch["patch"]) ** 2
        count = _mixer_count(**arch, tokens=tokens, classes=1000)
        assert count == PUBLISHED_COUNTS[f"Mixer-{name}"], name


DIGITS_VIT = dict(patch=4, width=64, mlp=128, depth=4, tokens=(16 // 4) ** 2, classes=10)


@pytest.mark.parametrize(
    "config,expected",
    [
        (default.get_config(), _vit_count(**DIGITS_VIT)),  # 138,954
        (
            vit.get_config("ti16,cifar100"),
            _vit_count(**VIT["Ti_16"], tokens=(384 // 16) ** 2, classes=10),  # 5,599,306
        ),
        (
            mixer.get_config("b32,cifar10"),
            _mixer_count(**MIXER["B_32"], tokens=(384 // 32) ** 2, classes=10),  # 60,408,778
        ),
        (
            augreg.get_config("R26_S_32,cifar100"),
            _hybrid_count(
                PUBLISHED_COUNTS["R26+ViT-S_32"],
                width=384,
                tokens_at_224=(224 // 32) ** 2,
                tokens=(384 // 32) ** 2,
                classes=10,
            ),  # 36,087,242
        ),
        (transfer.get_config("finetune"), _vit_count(**DIGITS_VIT)),  # 138,954
    ],
    ids=["default", "vit-ti16", "mixer-b32", "augreg-r26-s32", "transfer-finetune"],
)
def test_configs_build_their_model_with_the_expected_parameter_count(config, expected):
    """Each config's model at its crop with 10 classes has exactly the independently counted
    parameters (the position table follows the crop, the head the classes)."""
    model = models.get_model(config.model, num_classes=10)
    assert models.count_params(model, image_size=config.pp.crop) == expected
    assert set(configs.get_config().keys()) <= set(config.keys())


def test_one_schema_for_recipes_benchmark_and_tests():
    """The recipes and the benchmark start from the package's one schema."""
    schema = configs.get_config()
    bench = benchmark.train_config(batch=8)
    # A zoo model's config replaces the schema's (its None fields are typed placeholders, which
    # ml_collections' update cannot merge); a dict merges.
    dino = benchmark.train_config(model=models.get_config("DINOv2-S_14-reg4"), pp=dict(crop=8))
    assert dino.model.num_registers == 4 and dino.model.transformer.mlp_type == "gelu"
    assert dino.model.to_dict() == models.get_config("DINOv2-S_14-reg4").to_dict()
    assert (dino.pp.crop, dino.pp.resize) == (8, schema.pp.resize)
    assert set(bench.keys()) == set(schema.keys())
    assert (bench.optimizer, bench.momentum, bench.base_lr, bench.batch) == ("sgd", 0.9, 0.01, 8)
    assert (schema.objective, schema.wd_mults, schema.lion_b1, schema.lion_b2) == (
        "classification",
        (),
        0.9,
        0.99,
    )
    assert configs.image_size(vit.get_config("b16,cifar10")) == (384, 384)


def test_augreg_and_transfer_specifics():
    c = augreg.get_config("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0,cifar10")
    assert c.model.hidden_size == 768 and c.model_name.startswith("B_16-i21k")
    assert c.pretrained_dir == "gs://vit_models/augreg"
    assert transfer.get_config("pretrain").class_subset == (0, 1, 2, 3, 4)
    ft, scratch = transfer.get_config("finetune"), transfer.get_config("scratch")
    assert ft.class_subset == scratch.class_subset == (5, 6, 7, 8, 9)
    assert ft.total_steps == scratch.total_steps
    with pytest.raises(ValueError, match="pretrain, finetune or scratch"):
        transfer.get_config("other")


@pytest.mark.parametrize(
    "flag,message,node",
    [
        ("--config.bach=3", "config.bach (did you mean 'batch'?)", ()),
        ("--config.pp.crpo=8", "config.pp.crpo (did you mean 'crop'?)", ("pp",)),
    ],
)
def test_misspelt_config_key_exits_2_with_one_line_listing_the_valid_keys(
    tmp_path, flag, message, node
):
    """The train CLI's misspelt `--config.KEY`: exit 2 (cannot run as asked), no traceback."""
    out = tiny.run(
        [
            sys.executable,
            "-m",
            "vit_jax.train",
            "--config=configs/default.py",
            f"--workdir={tmp_path}",
            flag,
        ],
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    keys = default.get_config()
    for name in node:
        keys = keys[name]
    assert out.stderr.splitlines() == [
        f"error: unknown config key {message}; valid keys: {', '.join(sorted(keys.keys()))}"
    ]
    assert not (tmp_path / "config.json").exists()


def test_optional_model_fields_can_be_set_from_the_command_line(tmp_path):
    """Fields that default to None (LayerScale, the fixed position grid, the representation
    layer) are typed, so `--config.model.X=...` sets them instead of failing to parse."""
    out = tiny.run(
        [
            sys.executable,
            "-m",
            "vit_jax.train",
            "--config=configs/default.py",
            f"--workdir={tmp_path}",
            "--config.model.transformer.layer_scale_init=0.1",
            "--config.model.posemb_grid=(4, 4)",
            "--config.model.representation_size=32",
            "--config.total_steps=0",  # parsed, then refused: nothing is trained
        ],
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == "error: total_steps must be at least 1, got 0"


def test_packaged_recipes_are_named_as_in_a_checkout(tmp_path, monkeypatch):
    """`--config=configs/NAME.py[:ARG]` (or `NAME`) names the installed recipe from any
    directory; a file that exists at the given path wins; anything else is left to the loader."""
    monkeypatch.chdir(tmp_path)
    packaged = os.path.join(os.path.dirname(configs.__file__), "vit.py")
    assert packaged == vit.__file__
    for spec in ("configs/vit.py", "vit", "vit.py", "./configs/vit.py"):
        assert configs.recipe_file(spec) == packaged
        assert configs.recipe_file(f"{spec}:b16,cifar10") == f"{packaged}:b16,cifar10"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vit.py").write_text("def get_config(): ...\n")
    assert configs.recipe_file("configs/vit.py:b16") == "configs/vit.py:b16"  # the user's own
    assert configs.recipe_file("") == ""
    for other, hint in (("configs/vti.py", "configs/vit.py"), ("elsewhere/vit.py", None)):
        with pytest.raises(FileNotFoundError) as e:
            configs.recipe_file(f"{other}:b16")
        assert str(e.value).startswith(f"--config={other}:b16: no file {other}, and ")
        assert ("did you mean" in str(e.value)) == bool(hint) and "configs/default.py" in str(
            e.value
        )
    shipped = {p.stem for p in pathlib.Path(packaged).parent.glob("*.py")}
    assert set(configs.RECIPES) == shipped - {"__init__", "schema"}
    argv = ["train", "--config", "default", "--config=mixer.py:b16", "--config.batch=2"]
    assert cli.config_argv(argv) == [
        "train",
        "--config",
        default.__file__,
        f"--config={mixer.__file__}:b16",
        "--config.batch=2",
    ]


@pytest.mark.parametrize("cli_module", ["train", "evaluate"])
def test_broken_configs_are_one_line_exit_2_in_every_cli_that_reads_one(tmp_path, cli_module):
    """A missing file, an import error or a syntax error inside the config file and a name that
    its get_config does not know: one `error:` line naming the file and the cause, exit 2 (the
    README's "cannot run as asked"). Before, an unknown model name printed config_flags' wrapped
    traceback and a failing import gave only "No module named ...", with no file named."""
    (tmp_path / "imports.py").write_text("import no_such_module_xyz\n\ndef get_config(): ...\n")
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "nothing.py").write_text("CONFIG = 1\n")
    missing = tmp_path / "missing.py"
    cases = [
        (f"{missing}", f"no file {missing}"),
        (f"{tmp_path / 'imports.py'}", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        (f"{tmp_path / 'syntax.py'}", "SyntaxError: invalid syntax"),
        (f"{tmp_path / 'nothing.py'}", "defines no get_config()"),
        ("configs/vit.py:nosuchmodel,cifar10", "unknown model name 'nosuchmodel'"),
    ]
    where = ["--workdir", str(tmp_path / "w")] if cli_module == "train" else ["--checkpoint=x"]
    for spec, cause in cases:
        cmd = [sys.executable, "-m", f"vit_jax.{cli_module}", f"--config={spec}", *where]
        out = tiny.run(cmd, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and out.stdout == "", (spec, out.stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith("error: --config="), (spec, lines)
        assert cause in lines[0], (spec, lines)
        assert spec.partition(":")[0].removeprefix("configs/") in lines[0], (spec, lines)
    assert not (tmp_path / "w").exists()
