"""Model library: published parameter counts, shapes of every variant, layouts, dtypes, errors."""

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vit_jax import models
from vit_jax.models import vit as vit_lib

PUBLISHED_COUNTS = {
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-B_16": 86_567_656,
    "ViT-L_16": 304_326_632,
    "ViT-H_14": 632_045_800,
    "ViT-B_8": 86_576_872,
    "ViT-S_32": 22_878_952,
    "ViT-B_32": 88_224_232,
    "ViT-L_32": 306_535_400,
    "R+ViT-Ti_16": 6_337_704,
    "R50+ViT-B_16": 98_659_112,
    "R26+ViT-S_32": 36_431_912,
    "R50+ViT-L_32": 328_994_856,
    "Mixer-B_16": 59_880_472,
    "Mixer-L_16": 208_196_168,
    "Mixer-B_32": 60_293_428,
    "ViT-S_16-gap-norep": 22_049_896,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-S_32-gap-norep": 22_878_184,
    "ViT-B_32-gap-norep": 88_222_696,
}

TINY = dict(
    patches=dict(size=(4, 4)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=4, num_layers=3),
)
MIXER = dict(
    model_type="Mixer",
    patches=dict(size=(4, 4)),
    hidden_dim=32,
    num_blocks=2,
    tokens_mlp_dim=16,
    channels_mlp_dim=64,
)


def _images(n=2, size=16, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _init(model, x):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)["params"]


def _apply(model, params, x, **kwargs):
    """Jitted apply -> (logits, out): op-by-op dispatch is what makes eager tests slow on CPU."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kwargs))(params, x)


def _logits(model, params, x, **kwargs):
    return _apply(model, params, x, **kwargs)[0]


def _randomize(params, seed=1):
    """Non-trivial values everywhere (the head starts at zero)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED_COUNTS.items()))
def test_published_parameter_counts(name, expected):
    assert models.count_params(name, num_classes=1000, image_size=224) == expected


def test_i21k_head_count_and_augreg_names():
    assert models.count_params("ViT-B_16", num_classes=21843) == 102_595_923
    assert models.get_config("R26_S_32").name == "R26+ViT-S_32"
    for short, full in models.AUGREG_NAMES.items():
        assert models.get_config(short).to_dict() == models.get_config(full).to_dict()


def test_published_tree_names_and_shapes():
    shapes = models.init_shapes(models.get_model("ViT-B_16", num_classes=1000))
    flat = {
        "/".join(k.key for k in path): v.shape
        for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    block = "Transformer/encoderblock_0"
    expected = {
        "embedding/kernel": (16, 16, 3, 768),
        "cls": (1, 1, 768),
        "Transformer/posembed_input/pos_embedding": (1, 197, 768),
        f"{block}/LayerNorm_0/scale": (768,),
        f"{block}/MultiHeadDotProductAttention_1/query/kernel": (768, 12, 64),
        f"{block}/MultiHeadDotProductAttention_1/value/bias": (12, 64),
        f"{block}/MultiHeadDotProductAttention_1/out/kernel": (12, 64, 768),
        f"{block}/LayerNorm_2/bias": (768,),
        f"{block}/MlpBlock_3/Dense_0/kernel": (768, 3072),
        f"{block}/MlpBlock_3/Dense_1/kernel": (3072, 768),
        "Transformer/encoder_norm/scale": (768,),
        "head/kernel": (768, 1000),
    }
    for key, shape in expected.items():
        assert flat[key] == shape, key
    assert "Transformer/encoderblock_11/LayerNorm_0/bias" in flat
    hybrid = models.init_shapes(models.get_model("R50+ViT-B_16", num_classes=10))
    assert hybrid["conv_root"]["kernel"].shape == (7, 7, 3, 64)
    assert hybrid["gn_root"]["scale"].shape == (64,)
    assert hybrid["block3"]["unit9"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
    assert set(hybrid["block2"]["unit1"]) >= {"conv_proj", "gn_proj", "gn1", "gn2", "gn3"}
    mixer = models.init_shapes(models.get_model("Mixer-B_16", num_classes=10))
    assert mixer["MixerBlock_11"]["token_mixing"]["Dense_0"]["kernel"].shape == (196, 384)
    assert mixer["MixerBlock_0"]["channel_mixing"]["Dense_1"]["kernel"].shape == (3072, 768)
    assert set(mixer) == {
        "stem",
        *(f"MixerBlock_{i}" for i in range(12)),
        "pre_head_layer_norm",
        "head",
    }


@pytest.mark.parametrize("classifier", ["token", "gap", "map", "unpooled", "token_unpooled"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d", "none"])
def test_pooling_and_posemb_shapes(classifier, posemb):
    x = _images()
    model = models.get_model(TINY, num_classes=5, classifier=classifier, posemb=posemb)
    params = _init(model, x)
    logits = _logits(model, params, x, train=False)
    tokens = 16 + (classifier in ("token", "token_unpooled"))
    expected = {"unpooled": (2, 16, 5), "token_unpooled": (2, 17, 5)}.get(classifier, (2, 5))
    assert logits.shape == expected
    has_posemb = "posembed_input" in params["Transformer"]
    assert has_posemb == (posemb == "learn")
    if has_posemb:
        assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, tokens, 32)
    assert ("cls" in params) == (classifier in ("token", "token_unpooled"))
    assert ("MAPHead_0" in params) == (classifier == "map")


def _without_posemb(params):
    """`params` without the learned position table (the tree of a `sincos2d` / `none` model)."""
    encoder = {k: v for k, v in params["Transformer"].items() if k != "posembed_input"}
    return {**params, "Transformer": encoder}


def _with_table(params, table):
    encoder = dict(params["Transformer"], posembed_input={"pos_embedding": jnp.asarray(table)})
    return {**params, "Transformer": encoder}


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_fixed_position_embeddings_equal_a_learned_table_holding_them(classifier):
    """`none` is a `learn` model whose table is zeros; `sincos2d` one whose table is
    `sincos2d_posemb` over the grid with a zero row for each prefix token (class token first).
    Same other parameters, same input: the same logits and tokens. A 4 x 6 grid (16 x 24
    pixels), so a transposed table cannot pass."""
    x = jax.random.uniform(jax.random.key(3), (2, 16, 24, 3), minval=-1, maxval=1)
    kw = dict(num_classes=5, classifier=classifier)
    learn = models.get_model(TINY, posemb="learn", **kw)
    params = _randomize(_init(learn, x))
    prefix = int(classifier == "token")
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, prefix + 24, 32)
    shared = _without_posemb(params)
    sincos = np.asarray(models.sincos2d_posemb(4, 6, 32), np.float32)
    assert sincos.shape == (1, 24, 32) and np.abs(sincos).max() > 0.5
    for posemb, table in (
        ("none", np.zeros((1, prefix + 24, 32), np.float32)),
        ("sincos2d", np.concatenate([np.zeros((1, prefix, 32), np.float32), sincos], axis=1)),
    ):
        fixed = models.get_model(TINY, posemb=posemb, **kw)
        assert jax.tree.structure(_init(fixed, x)) == jax.tree.structure(shared)
        want, want_out = _apply(learn, _with_table(params, table), x, train=False)
        got, got_out = _apply(fixed, shared, x, train=False)
        assert np.abs(want).max() > 0.1, posemb  # not a zero head
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=posemb)
        np.testing.assert_allclose(
            got_out["encoded"], want_out["encoded"], rtol=1e-6, atol=1e-6, err_msg=posemb
        )
    # The learned table matters: a random one gives other logits (so the above is not vacuous).
    random_table, _ = _apply(learn, params, x, train=False)
    assert np.abs(random_table - got).max() > 1e-3


@pytest.mark.parametrize(
    ("classifier", "registers"), [("unpooled", 0), ("token_unpooled", 0), ("token_unpooled", 2)]
)
def test_unpooled_logits_are_the_head_on_every_token(classifier, registers):
    """Per-token logits = encoded token @ head.kernel + head.bias, recomputed in float64 from
    the encoder output; the class token's row first (`token_unpooled`), registers left out."""
    x = _images()
    model = models.get_model(TINY, num_classes=5, classifier=classifier, num_registers=registers)
    params = _randomize(_init(model, x))
    logits, out = _apply(model, params, x, train=False)
    encoded = np.asarray(out["encoded"], np.float64)
    prefix = int(classifier == "token_unpooled")
    assert encoded.shape == (2, prefix + registers + 16, 32)
    tokens = np.concatenate([encoded[:, :prefix], encoded[:, prefix + registers :]], axis=1)
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    expected = tokens @ head["kernel"] + head["bias"]
    assert logits.shape == (2, prefix + 16, 5)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_every_remat_policy_gives_the_plain_gradients(scan):
    """Rematerialisation only trades memory for compute: with each policy `REMAT_POLICIES`
    lists, the gradient of every parameter equals the one without remat, in train mode with
    dropout, attention dropout and stochastic depth under one fixed dropout key (the
    recomputed forward must draw the same masks)."""
    assert set(vit_lib.REMAT_POLICIES) == {
        "nothing_saveable",
        "dots_saveable",
        "dots_with_no_batch_dims_saveable",
        "everything_saveable",
    }
    spec = dict(
        TINY,
        transformer=dict(
            TINY["transformer"],
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            stochastic_depth_rate=0.2,
        ),
    )
    x = _images()
    weights = jax.random.normal(jax.random.key(7), (2, 5))

    def gradients(model, params):
        def loss(p):
            logits, _ = model.apply(
                {"params": p}, x, train=True, rngs={"dropout": jax.random.key(11)}
            )
            return jnp.sum(logits * weights)

        return jax.jit(jax.grad(loss))(params)

    plain = models.get_model(spec, num_classes=5, scan=scan)
    params = _randomize(_init(plain, x))
    want = gradients(plain, params)
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    # The tolerance is relative to the largest gradient: some are zero in exact arithmetic (the
    # key bias: softmax ignores a shift shared by all keys) and only rounding noise here.
    scale = max(float(jnp.abs(g).max()) for _, g in flat_want)
    assert scale > 0.1
    for policy in vit_lib.REMAT_POLICIES:
        model = models.get_model(spec, num_classes=5, scan=scan, remat=True, remat_policy=policy)
        got = gradients(model, params)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for (path, g), (_, w) in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], flat_want, strict=True
        ):
            np.testing.assert_allclose(
                g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{policy} {jax.tree_util.keystr(path)}"
            )


def test_head_is_zero_init_with_bias_and_representation():
    x = _images()
    model = models.get_model(TINY, num_classes=7, representation_size=16, head_bias_init=-2.0)
    params = _init(model, x)
    assert params["pre_logits"]["kernel"].shape == (32, 16)
    assert not np.any(params["head"]["kernel"])
    np.testing.assert_array_equal(_logits(model, params, x, train=False), -2.0)
    features = models.get_model(TINY, num_classes=None)
    assert "head" not in _init(features, x)
    assert _logits(features, _init(features, x), x, train=False).shape == (2, 32)


def test_sincos2d_table():
    table = np.asarray(models.sincos2d_posemb(3, 5, 16))
    assert table.shape == (1, 15, 16)
    # sin^2 + cos^2 = 1 for each frequency of x and of y.
    np.testing.assert_allclose(table[0, :, 0:4] ** 2 + table[0, :, 4:8] ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(table[0, :, 8:12] ** 2 + table[0, :, 12:16] ** 2, 1.0, atol=1e-6)
    # Row-major grid: position (row 1, col 2) = index 7; the first frequency is 1 rad per step.
    np.testing.assert_allclose(table[0, 7, 0], np.sin(2.0), atol=1e-6)  # sin(x)
    np.testing.assert_allclose(table[0, 7, 8], np.sin(1.0), atol=1e-6)  # sin(y)
    assert len({tuple(np.round(r, 5)) for r in table[0]}) == 15  # every position distinct
    with pytest.raises(ValueError, match="% 4"):
        models.sincos2d_posemb(2, 2, 6)


@pytest.mark.parametrize(
    "spec", [TINY, dict(TINY, resnet=dict(num_layers=(1,), width_factor=0.5)), "mixer"]
)
def test_scanned_and_unrolled_agree(spec):
    if spec == "mixer":
        spec = dict(
            model_type="Mixer",
            patches=dict(size=(4, 4)),
            hidden_dim=32,
            num_blocks=3,
            tokens_mlp_dim=16,
            channels_mlp_dim=64,
        )
    x = _images(size=32)
    unrolled = models.get_model(spec, num_classes=5)
    scanned = models.get_model(spec, num_classes=5, scan=True, remat=True)
    params = _randomize(_init(unrolled, x))
    stacked = models.stack_layers(params)
    assert models.is_stacked(stacked) and not models.is_stacked(params)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, _init(scanned, x))
    a = _logits(unrolled, params, x, train=False)
    b = _logits(scanned, stacked, x, train=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    back = models.unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda p, q: bool(jnp.array_equal(p, q)), params, back))


def test_bfloat16_compute_close_to_float32():
    x = _images()
    model32 = models.get_model(TINY, num_classes=5)
    model16 = models.get_model(TINY, num_classes=5, dtype="bfloat16")
    params = _randomize(_init(model32, x))
    assert jax.tree.leaves(_init(model16, x))[0].dtype == jnp.float32  # params stay fp32
    a = _logits(model32, params, x, train=False)
    b = _logits(model16, params, x, train=False)
    assert b.dtype == jnp.float32
    scale = float(jnp.abs(a).max())
    assert float(jnp.abs(a - b).max()) < 0.05 * scale
    assert float(jnp.abs(a - b).max()) > 0  # the compute really ran in bf16


def _einsum_attention(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("implementation", [None, "explicit", "xla"])
def test_attention_matches_einsum_reference(implementation):
    layer = vit_lib.MultiHeadAttention(num_heads=4, implementation=implementation)
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    params = layer.init(jax.random.key(1), x, x, deterministic=True)["params"]
    fast, weights = layer.apply({"params": params}, x, x, deterministic=True)
    explicit, weights = layer.apply(
        {"params": params}, x, x, deterministic=True, return_weights=True
    )
    proj = lambda name: (
        jnp.einsum("bnd,dhk->bnhk", x, params[name]["kernel"]) + params[name]["bias"]
    )
    y = _einsum_attention(proj("query"), proj("key"), proj("value"))
    ref = jnp.einsum("bnhk,hkd->bnd", y, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    np.testing.assert_allclose(explicit, ref, atol=1e-5)
    assert weights.shape == (2, 4, 9, 9)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_intermediates_shapes():
    x = _images()
    model = models.get_model(TINY, num_classes=5, representation_size=8)
    params = _randomize(_init(model, x))  # a zero head would make every logit 0
    logits, out = _apply(model, params, x, train=False, return_intermediates=True)
    assert out["stem"].shape == (2, 16, 32)
    assert out["tokens"].shape == (3, 2, 17, 32)
    assert out["attention_weights"].shape == (3, 2, 4, 17, 17)
    assert out["encoded"].shape == (2, 17, 32)
    assert out["pre_logits"].shape == (2, 8)
    assert logits.shape == (2, 5)
    lean_logits, lean = _apply(model, params, x, train=False)
    assert set(lean) == {"stem", "encoded", "pre_logits"}  # the costly per-block ones on request
    # The same logits. Two compiled programs (the extra outputs change XLA's fusions) need not
    # round alike on every CPU: to float32 precision, against logits of order 1.
    assert np.abs(logits).max() > 0.5
    np.testing.assert_allclose(lean_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention_weights"].sum(-1), 1.0, atol=1e-5)


def test_train_mode_regularisers_use_dropout_rng():
    x = _images()
    spec = dict(
        TINY,
        transformer=dict(
            TINY["transformer"],
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            stochastic_depth_rate=0.3,
        ),
    )
    for scan in (False, True):
        model = models.get_model(spec, num_classes=5, scan=scan)
        params = _randomize(_init(model, x))
        run = jax.jit(
            lambda p, x, seed, model=model: model.apply(
                {"params": p}, x, train=True, rngs={"dropout": jax.random.key(seed)}
            )[0]
        )
        assert not np.allclose(run(params, x, 0), run(params, x, 1))
        np.testing.assert_array_equal(run(params, x, 0), run(params, x, 0))
        ev = _logits(model, params, x, train=False)
        np.testing.assert_array_equal(ev, _logits(model, params, x, train=False))


def test_drop_path_keeps_expectation():
    x = jnp.ones((4000, 3))
    y = vit_lib.drop_path(x, 0.25, jax.random.key(0))
    kept = np.asarray(y[:, 0] > 0)
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)


def test_hybrid_and_mixer_forward():
    """Every family runs and returns its outputs; the values are checked against independent
    forwards in test_hybrid_reference.py and test_mixer_reference.py."""
    x = _images(size=64)
    small = dict(hidden_size=32, transformer=dict(num_layers=1, mlp_dim=32, num_heads=2))
    hybrid = models.get_model("R+ViT-Ti_16", num_classes=3, **small)
    assert _logits(hybrid, _init(hybrid, x), x, train=False).shape == (2, 3)
    r26 = models.get_model("R26+ViT-S_32", num_classes=3, resnet=dict(width_factor=0.5), **small)
    assert _logits(r26, _init(r26, x), x, train=False).shape == (2, 3)
    mixer = models.get_model("Mixer-B_16", num_classes=3, num_blocks=1, hidden_dim=32)
    assert _logits(mixer, _init(mixer, x), x, train=False).shape == (2, 3)
    for model, tokens, width in ((hybrid, 1 + 4, 32), (mixer, 16, 32)):  # every family: a pair
        logits, out = _apply(model, _init(model, x), x, train=False, return_intermediates=True)
        assert logits.shape == (2, 3) and logits.dtype == jnp.float32
        assert out["encoded"].shape == (2, tokens, width)
        assert out["pre_logits"].shape[-1] == width and "stem" in out


def test_errors_are_one_clear_message():
    with pytest.raises(ValueError, match=r"ViT-B_16"):
        models.get_model("ViT-B16", num_classes=10)  # close name suggested
    with pytest.raises(ValueError, match=r"unknown model config field 'hiden_size'.*hidden_size"):
        models.get_model(dict(TINY, hiden_size=3), num_classes=10)
    with pytest.raises(ValueError, match=r"transformer.num_layer"):
        models.get_model(TINY, num_classes=10, transformer=dict(num_layer=3))
    with pytest.raises(ValueError, match=r"must be set"):
        models.get_model(dict(patches=dict(size=(4, 4))), num_classes=10)
    model = models.get_model(TINY, num_classes=10)
    with pytest.raises(ValueError, match=r"18x18 is not divisible by the model's patch stride 4x4"):
        model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)), train=False)
    hybrid = models.get_model("R50+ViT-B_16", num_classes=10)
    with pytest.raises(ValueError, match=r"patch stride 16x16"):
        hybrid.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)), train=False)
    # Options with choices: refused by name when the model is built (typed_config).
    with pytest.raises(ValueError, match=r"^classifier must be one of 'token', .*got 'cls'$"):
        models.get_model(TINY, num_classes=10, classifier="cls")
    with pytest.raises(
        ValueError,
        match=r"^posemb must be one of 'learn', 'sincos2d', 'none', 'rope', got 'rotary'$",
    ):
        models.get_model(TINY, num_classes=10, posemb="rotary")
    bad = dict(
        remat_policy=("dots", r"remat_policy 'dots' unknown; one of \['dots_saveable'"),
        attention_implementation=("flash", r"attention_implementation must be one of"),
    )
    for field, (value, message) in bad.items():
        m = models.get_model(TINY, num_classes=10, remat=True, **{field: value})
        with pytest.raises(ValueError, match=message):
            m.init(jax.random.key(0), _images(), train=False)
    mixer = models.get_model(MIXER, num_classes=10, remat=True, remat_policy="dots")
    with pytest.raises(ValueError, match=r"remat_policy 'dots' unknown"):
        mixer.init(jax.random.key(0), _images(), train=False)


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_zoo_section() -> str:
    text = README.read_text()
    return text.split("\n## Model zoo\n", 1)[1].split("\n## ", 1)[0]


def _readme_zoo_rows() -> dict[str, tuple[int, str, int, int]]:
    """The README's zoo tables (`| model |` and `| backbone |`): name -> (parameters, head,
    patch, resolution), the patch and resolution cells read up to their first non-digit."""
    rows, columns = {}, None
    lead = lambda cell: int(re.match(r"\d+", cell).group())  # noqa: E731
    for line in _readme_zoo_section().splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if columns is None:
            columns = cells
            continue
        if set(cells[0]) <= {"-", ":"}:
            continue
        row = dict(zip(columns, cells, strict=True))
        resolution = next(v for k, v in row.items() if "resolution" in k)
        assert cells[0] not in rows, f"{cells[0]} twice in the README"
        rows[cells[0]] = (
            int(row["parameters"].replace(",", "")),
            row["head"],
            lead(row["patch"]),
            lead(resolution),
        )
    return rows


def test_readme_tables_and_the_zoo_cli_agree_row_by_row():
    """`python -m vit_jax.models` and the README's two zoo tables: the same models, and for each
    the same parameter count, head (1000 classes, or none for the SigLIP / DINOv2 feature
    extractors), patch and resolution; the classifiers' counts are the published ones."""
    printed = subprocess.run(
        [sys.executable, "-m", "vit_jax.models"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    header, *lines = printed.strip().splitlines()
    assert header.split() == ["model", "parameters", "head", "patch", "resolution"]
    cli = {}
    for line in lines[: lines.index("")]:
        name, count, head, patch, resolution = line.split()
        cli[name] = (int(count.replace(",", "")), head, int(patch.split("x")[0]), int(resolution))
    assert lines[-1].startswith("head: classes of the counted head")  # what the columns mean
    readme = _readme_zoo_rows()
    assert list(cli) == models.list_models()
    assert sorted(readme) == sorted(cli)
    for name, row in cli.items():
        assert readme[name] == row, name
    for name, expected in PUBLISHED_COUNTS.items():
        assert readme[name] == (expected, "1000", readme[name][2], 224), name
    # As the backbones are published: SigLIP / DINOv2 / DINOv3 without a head, the rest with one.
    for name, (_, head, _, _) in cli.items():
        assert head == ("none" if name.startswith(("SigLIP", "DINOv2", "DINOv3")) else "1000"), name
    assert cli["DINOv2-S_14"][3] == 518 and cli["SigLIP-B_16-384"][3] == 384


def test_zoo_cli_counts_every_row_alike_on_request(capsys):
    """`--num-classes 0 --resolution 448 --json` (448: divisible by every zoo stride): no head
    anywhere and the position table at a 28 x 28 grid (patch 16): ViT-B/16 loses its 1000-class
    head (768 x 1000 + 1000) and gains (785 - 197) x 768 position rows; a fixed-grid model's
    count does not change."""
    from vit_jax.models.__main__ import main

    main(["--json", "--num-classes", "0", "--resolution", "448"])
    rows = {r["model"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == models.list_models()
    assert all(r["num_classes"] is None and r["resolution"] == 448 for r in rows.values())
    base = PUBLISHED_COUNTS["ViT-B_16"]
    assert rows["ViT-B_16"]["parameters"] == base - (768 * 1000 + 1000) + (785 - 197) * 768
    assert rows["SigLIP-B_16-224"]["parameters"] == 92_884_224  # the README's count (no head)


def test_readme_model_zoo_snippet_runs_as_written():
    """The Python block of the README's Model zoo section, executed as it stands (offline: a
    random init), and what its comments say about the results."""
    blocks = re.findall(r"```python\n(.*?)```", _readme_zoo_section(), re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md (Model zoo)", "exec"), namespace)  # noqa: S102
    logits, out = namespace["logits"], namespace["out"]
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert {"stem", "encoded", "pre_logits", "tokens", "attention_weights"} <= set(out)
    assert out["attention_weights"].shape == (12, 2, 12, 197, 197)
    np.testing.assert_allclose(out["attention_weights"].sum(-1), 1.0, atol=1e-5)
    assert namespace["tiny_logits"].shape == (2, 10)
    assert namespace["tiny_logits"].dtype == jnp.float32


def _with_layer_scale(init, **extra):
    return dict(TINY, transformer=dict(TINY["transformer"], layer_scale_init=init), **extra)


def test_layer_scale_parameters_count_and_init():
    base = models.count_params(models.get_model(TINY, num_classes=5), image_size=16)
    model = models.get_model(_with_layer_scale(0.1), num_classes=5)
    assert models.count_params(model, image_size=16) == base + 2 * 32 * 3  # 2 x (D,) per block
    assert models.get_config("ViT-B_16").transformer.layer_scale_init is None
    params = _init(model, _images())
    for i in range(3):
        for name in ("LayerScale_1", "LayerScale_3"):
            scale = params["Transformer"][f"encoderblock_{i}"][name]["scale"]
            np.testing.assert_array_equal(scale, np.full((32,), 0.1, np.float32))
    scanned = models.get_model(_with_layer_scale(1e-5), num_classes=5, scan=True)
    stacked = _init(scanned, _images())["Transformer"]["encoderblock"]["LayerScale_3"]["scale"]
    np.testing.assert_array_equal(stacked, np.full((3, 32), 1e-5, np.float32))


def test_layer_scale_scales_each_branch_per_channel():
    """y = x + s1 * attn(LN(x)) (then + s3 * mlp(LN(.))): identity at 0, the plain block at 1."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    kw = dict(
        attention=functools.partial(vit_lib.MultiHeadAttention, num_heads=4),
        mlp=functools.partial(vit_lib.MlpBlock, 64),
    )
    plain = vit_lib.Encoder1DBlock(**kw)
    scaled = vit_lib.Encoder1DBlock(**kw, layer_scale=functools.partial(vit_lib.LayerScale, 1.0))
    params = _randomize(scaled.init(jax.random.key(1), x, 0.0, True)["params"])
    run = lambda s1, s3: scaled.apply(
        {"params": dict(params, LayerScale_1={"scale": s1}, LayerScale_3={"scale": s3})},
        x,
        0.0,
        True,
    )[0]
    ones, zeros = jnp.ones(32), jnp.zeros(32)
    np.testing.assert_array_equal(run(zeros, zeros), x)
    without = {k: v for k, v in params.items() if not k.startswith("LayerScale")}
    np.testing.assert_allclose(
        run(ones, ones), plain.apply({"params": without}, x, 0.0, True)[0], atol=1e-6
    )
    s1 = jax.random.uniform(jax.random.key(2), (32,), minval=-2, maxval=2)
    branch = run(ones, zeros) - x
    assert float(jnp.abs(branch).max()) > 0.1
    np.testing.assert_allclose(run(s1, zeros) - x, s1 * branch, atol=1e-5)


def test_layers_are_bound_once_and_the_block_is_pluggable():
    """`layers()` binds the options into the constructors; `block_cls` swaps the block."""
    model = models.get_model(
        TINY, num_classes=5, dtype="bfloat16", layernorm_epsilon=1e-5, gelu_approximate=False
    )
    parts = model.layers()
    dense, norm = parts.dense(3), parts.norm()
    assert (dense.dtype, dense.param_dtype) == (jnp.bfloat16, jnp.float32)
    assert (norm.epsilon, norm.dtype) == (1e-5, jnp.bfloat16)
    assert parts.attention().num_heads == 4 and parts.attention().dtype == jnp.bfloat16
    mlp = parts.mlp()
    assert mlp.mlp_dim == 64 and mlp.dense is parts.dense
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_array_equal(mlp.act(x), jax.nn.gelu(x, approximate=False))
    assert vit_lib.CLASSIFIERS == tuple(vit_lib.POOLINGS)
    assert tuple(vit_lib.POSITION_EMBEDDINGS) == ("learn", "sincos2d", "none")

    class MlpOnlyBlock(vit_lib.Encoder1DBlock):
        @nn.compact
        def __call__(self, x, drop_rate, deterministic):
            y = self.mlp(name="MlpBlock_3")(self.norm(name="LayerNorm_2")(x), deterministic=True)
            return x + y, None

    for scan in (False, True):
        base = models.get_model(TINY, num_classes=5, scan=scan)
        custom = base.clone(block_cls=MlpOnlyBlock)
        params = _init(custom, _images())
        block = params["Transformer"]["encoderblock" if scan else "encoderblock_1"]
        assert set(block) == {"LayerNorm_2", "MlpBlock_3"}
        assert _logits(custom, _randomize(params), _images(), train=False).shape == (2, 5)


def _np_layernorm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_map_head(tokens, p):
    """big_vision's MAP head in float64 numpy: probe attends over tokens, then + MLP(LN(x))."""
    a = p["MultiHeadDotProductAttention_0"]
    probe = np.broadcast_to(p["probe"], (tokens.shape[0], 1, tokens.shape[-1]))
    q, k, v = (
        np.einsum("bld,dhk->blhk", z, a[n]["kernel"]) + a[n]["bias"]
        for z, n in ((probe, "query"), (tokens, "key"), (tokens, "value"))
    )
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhqt,bthk->bqhk", weights, v)
    x = np.einsum("bqhk,hkd->bqd", heads, a["out"]["kernel"]) + a["out"]["bias"]
    m = p["MlpBlock_0"]
    h = _np_gelu_tanh(
        _np_layernorm(x, p["LayerNorm_0"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"]
    )
    return (x + h @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"])[:, 0]


@pytest.mark.parametrize("classifier", ["token", "gap", "map"])
def test_pooling_arithmetic_against_numpy(classifier):
    """pre_logits from the normed encoder output, recomputed independently: the class token,
    the mean of the patch tokens (registers excluded), or the MAP probe's attention (4 heads)."""
    x = _images()
    model = models.get_model(TINY, num_classes=5, classifier=classifier, num_registers=2)
    params = _randomize(_init(model, x))
    _, out = _apply(model, params, x, train=False, return_intermediates=True)
    last_block = np.asarray(out["tokens"][-1], np.float64)  # before Transformer/encoder_norm
    norm = jax.tree.map(np.asarray, params["Transformer"]["encoder_norm"])
    encoded = _np_layernorm(last_block, norm)
    np.testing.assert_allclose(out["encoded"], encoded, rtol=1e-4, atol=1e-5)
    prefix = int(classifier == "token")
    assert encoded.shape == (2, prefix + 2 + 16, 32)
    np.testing.assert_allclose(out["registers"], encoded[:, prefix : prefix + 2], atol=1e-6)
    patches = encoded[:, prefix + 2 :]
    if classifier == "token":
        expected = encoded[:, 0]
    elif classifier == "gap":
        expected = patches.mean(axis=1)
    else:
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["MAPHead_0"])
        expected = _np_map_head(patches, p)
    np.testing.assert_allclose(out["pre_logits"], expected, rtol=1e-4, atol=1e-5)


# --- Options are declared once (`vit.SCHEMA`); RMSNorm was added through that one declaration.


def test_every_option_is_declared_once_and_derived_everywhere():
    """The config template, the optional entries, `build` and `model.<option>` all come from
    the sub-config declarations: each option's config path holds its default, and a config
    value reaches the module typed."""
    schema = vit_lib.SCHEMA
    assert vit_lib.CONFIG_DEFAULTS is schema.defaults
    names = [o.name for o in schema.options]
    assert len(names) == len(set(names)) and "norm" in names
    config = models.get_config(TINY, resnet=dict(num_layers=(1,)))  # every path set
    model = models.get_model(config, num_classes=5)
    for o in schema.options:
        node = config
        for key in o.at.split("."):
            node = node[key]
        assert getattr(model, o.name) == o.convert(node), o.name
    assert set(vit_lib.VisionTransformer.__dataclass_fields__) - {"parent", "name"} == {
        "num_classes", "encoder", "block", "embed", "readout", "dtype", "param_dtype", "block_cls"
    }  # fmt: skip
    assert models.get_family("ViT").optional == schema.optional
    assert models.get_family("ViT").optional_types == {
        "representation_size": int,
        "attention_implementation": str,
        "layer_scale_init": float,
        "posemb_grid": tuple,
    }


def test_rms_norm_builds_trains_and_is_refused_by_formats_without_it(tmp_path):
    """`transformer.norm='rmsnorm'`: every norm is an RMSNorm (a `scale` only, the model's
    epsilon), one SGD step trains it, and HF ViT refuses it in one line."""
    from vit_jax.weights import flatten, hf
    from vit_jax.weights.errors import ConversionError

    spec = dict(TINY, transformer=dict(TINY["transformer"], norm="rmsnorm"), classifier="map")
    model = models.get_model(spec, num_classes=5, layernorm_epsilon=1e-5)
    x = _images()
    params = _init(model, x)
    norms = {
        k: v for k, v in flatten(params).items() if re.search(r"(LayerNorm_\d|encoder_norm)/", k)
    }
    assert norms and all(k.endswith("/scale") for k in norms)
    assert models.count_params(model, image_size=16) == models.count_params(
        models.get_model(dict(spec, transformer=TINY["transformer"]), num_classes=5),
        image_size=16,
    ) - sum(v.size for v in norms.values())  # a LayerNorm has a bias of the same size
    norm = model.layers().norm()
    assert isinstance(norm, nn.RMSNorm) and norm.epsilon == 1e-5
    y = jax.random.normal(jax.random.key(3), (2, 5, 32))
    scale = jax.random.normal(jax.random.key(4), (32,))
    want = y / np.sqrt(np.mean(np.square(y), -1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(norm.apply({"params": {"scale": scale}}, y), want, atol=1e-5)

    labels = jax.nn.one_hot(jnp.array([1, 3]), 5)

    def loss(p):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})[0]
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))

    params = _randomize(params)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert np.isfinite(value) and float(jax.jit(loss)(stepped)) < float(value)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

    config = models.get_config(spec)
    with pytest.raises(ConversionError) as e:
        hf.to_hf(jax.device_get(params), config, tmp_path / "hf", model_type="vit")
    message = str(e.value)
    assert "\n" not in message and "RMSNorm (transformer.norm='rmsnorm')" in message
    assert message.startswith(f"{hf.CODECS['vit'].can.target} cannot express ")
    assert not (tmp_path / "hf").exists()
