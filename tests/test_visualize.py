"""visualize against independent values: the rollout arithmetic on hand-made matrices, the
written pictures' heat read back from the pixels, and the refusals of models without a class
token. Checkpoints are tiny random models written as `.npz` (no trained workdir)."""

from fractions import Fraction

import jax
import numpy as np
import pytest
import tiny
from PIL import Image

from vit_jax import checkpoint, inference, models, visualize

TINY = dict(
    name="tiny",
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
)
MIXER = dict(
    name="tiny-mixer",
    model_type="Mixer",
    patches=dict(size=(4, 4)),
    hidden_dim=16,
    num_blocks=2,
    tokens_mlp_dim=8,
    channels_mlp_dim=32,
)
SIZE = 16  # model input: a 4 x 4 patch grid
SCALE = 128  # picture size: 32 pixels per grid cell


def _npz(path, spec, seed=0) -> str:
    """A random model (normal(0, 0.5) weights, so the attention is far from uniform)."""
    model = models.get_model(spec, num_classes=3)
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(model, SIZE)
    )
    meta = {
        "model": models.get_config(spec).to_dict(),
        "class_names": ["a", "b", "c"],
        "image_size": [SIZE, SIZE],
    }
    return str(checkpoint.save_npz(params, path, metadata=meta))


# ----------------------------------------------------------------------------- arithmetic


def test_rollout_matches_a_hand_computation():
    """2 layers, 2 heads, tokens (cls, p0, p1). By hand:
    A1 = mean of heads = [[0, 1/2, 3/2], [1/2, 1/2, 0], [1/2, 0, 1/2]] (rows not summing to 1,
    so adding the identity before or after renormalising differ); R1 = rows of A1 + I
    renormalised = [[1/3, 1/6, 1/2], [1/4, 3/4, 0], [1/4, 0, 3/4]]. A2 = [[1/2, 0, 1/2],
    [0, 1/2, 1/2], [0, 1, 0]], R2 = [[3/4, 0, 1/4], [0, 3/4, 1/4], [0, 1/2, 1/2]]. The rollout is
    R2 @ R1 (the last layer on the left); its class row over the patches is (1/8, 9/16), i.e.
    (2/11, 9/11) normalised. The wrong variants give other numbers: R1 @ R2 (1/2, 1/2), no
    identity (1/6, 5/6), identity after renormalising (1/6, 5/6), row 1 (3/4, 1/4), the last
    layer alone (0, 1)."""
    layer1 = [[[0, 1, 0], [0, 1, 0], [1, 0, 0]], [[0, 0, 3], [1, 0, 0], [0, 0, 1]]]
    layer2 = [[[0, 0, 1], [0, 0, 1], [0, 1, 0]], [[1, 0, 0], [0, 1, 0], [0, 1, 0]]]
    weights = np.array([layer1, layer2], np.float64)[:, None]  # (layers, B=1, heads, N, N)
    got = visualize.attention_rollout(weights)
    np.testing.assert_allclose(got, [[2 / 11, 9 / 11]], rtol=1e-12)
    # The same numbers from exact fractions, written independently of the code above.
    r1 = [[Fraction(1, 3), Fraction(1, 6), Fraction(1, 2)], [Fraction(1, 4), Fraction(3, 4), 0]]
    r1.append([Fraction(1, 4), 0, Fraction(3, 4)])
    cls_row = [Fraction(3, 4), 0, Fraction(1, 4)]  # row 0 of R2
    patches = [sum(cls_row[k] * r1[k][j] for k in range(3)) for j in (1, 2)]
    assert patches == [Fraction(1, 8), Fraction(9, 16)]
    # A batch of two: each image's rollout is its own (the second is the first's reverse).
    both = visualize.attention_rollout(np.concatenate([weights, weights[::-1]], axis=1))
    np.testing.assert_allclose(both, [[2 / 11, 9 / 11], [1 / 2, 1 / 2]], rtol=1e-12)


# ----------------------------------------------------------------------------- pictures


def _rollout_by_hand(weights: np.ndarray, prefix: int, token: int = 0) -> np.ndarray:
    """Token `token`'s (the class token's) rollout over the patches (one image), written out
    loop by loop."""
    layers, _, heads, n, _ = weights.shape
    rollout = np.eye(n)
    for layer in range(layers):
        mean = sum(weights[layer, 0, h] for h in range(heads)) / heads
        step = mean + np.eye(n)
        step = step / step.sum(axis=1, keepdims=True)
        rollout = step @ rollout
    row = rollout[token, prefix:]
    return row / row.sum()


def _scaled(values: np.ndarray) -> np.ndarray:
    """A map as the picture shows it: the 4 x 4 grid scaled to [0, 1]."""
    grid = values.reshape(SIZE // 4, SIZE // 4)
    return (grid - grid.min()) / (grid.max() - grid.min())


def _heat_read_back(picture: np.ndarray) -> np.ndarray:
    """The heat of each grid cell of a picture of a uniform grey input: where the heat is h the
    green channel is grey * (1 - 0.6 h); the 2 x 2 pixels at a cell's centre sit symmetric about
    the enlarged grid value, so their mean is it up to uint8 rounding."""
    green = picture[..., 1].astype(np.float64)
    grey = green.max()  # the coldest cell: h = 0
    cells, cell = SIZE // 4, SCALE // (SIZE // 4)
    centre = green.reshape(cells, cell, cells, cell)[:, cell // 2 - 1 : cell // 2 + 1]
    centre = centre[..., cell // 2 - 1 : cell // 2 + 1].mean(axis=(1, 3))
    return (1 - centre / grey) / 0.6


@pytest.mark.parametrize("spec", [TINY, dict(TINY, name="tiny-deit", distillation_token=True)])
def test_pictures_show_the_rollout_and_each_heads_map(spec, tmp_path, capsys):
    """The written `_rollout.png` and `_heads.png`, read back pixel by pixel, against maps built
    here from the model's attention weights: the rollout by `_rollout_by_hand`, panel i from head
    i of the last layer's class-token row (after the class / distillation tokens). The input is
    uniform grey, so each cell's heat can be read from the green channel; reading it at cell
    centres keeps resize and uint8 rounding within 0.03 of the map scaled to [0, 1]. The maps
    compared are checked to differ from each other (and from the first layer's) by more than that,
    so a wrong layer, head, token row or prefix cannot pass."""
    model = _npz(tmp_path / "m.npz", spec)
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 150, np.uint8)).save(path)
    out = tmp_path / "maps"
    argv = ["--checkpoint", model, "--out", str(out), "--heads", "--scale", str(SCALE), str(path)]
    assert visualize.main(argv) == 0
    assert capsys.readouterr().out.split() == [f"{out}/grey_rollout.png", f"{out}/grey_heads.png"]

    trained = inference.load_model(model)
    image = trained.preprocess_file(str(path))
    assert np.ptp(image) == 0  # uniform input, uniform picture under the heat
    weights = np.asarray(trained.intermediates(image[None])["attention_weights"], np.float64)
    prefix = 1 + int(spec.get("distillation_token", False))
    assert weights.shape == (2, 1, 2, prefix + 16, prefix + 16)
    rollout = _scaled(_rollout_by_hand(weights, prefix))
    heads = [_scaled(weights[-1, 0, h, 0, prefix:]) for h in range(2)]
    first_layer = [_scaled(weights[0, 0, h, 0, prefix:]) for h in range(2)]
    # The maps a wrong layer, head or token row would draw are told apart by the read-back.
    row1 = _scaled(_rollout_by_hand(weights, prefix, token=1))
    pairs = [(rollout, m) for m in [*heads, *first_layer, row1]]
    pairs += [(heads[0], heads[1]), (heads[0], first_layer[0]), (heads[1], first_layer[1])]
    assert all(np.abs(a - b).max() > 0.1 for a, b in pairs)

    picture = np.asarray(Image.open(out / "grey_rollout.png"))
    assert picture.shape == (SCALE, SCALE, 3)
    np.testing.assert_allclose(_heat_read_back(picture), rollout, atol=0.03)
    sheet = np.asarray(Image.open(out / "grey_heads.png"))
    assert sheet.shape == (SCALE, 2 * SCALE, 3)
    for h, want in enumerate(heads):
        panel = sheet[:, h * SCALE : (h + 1) * SCALE]
        np.testing.assert_allclose(_heat_read_back(panel), want, atol=0.03)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (MIXER, "Mixer"),
        (dict(TINY, name="tiny-gap", classifier="gap"), "'gap'"),
        (dict(TINY, name="tiny-map", classifier="map"), "'map'"),
    ],
)
def test_models_without_a_class_token_are_refused_exit_2(spec, named, tmp_path, capsys):
    """One error line naming the file, the model type or classifier and what is needed; exit 2
    before any image is read (the image does not exist) and nothing written."""
    model = _npz(tmp_path / "m.npz", spec)
    out = tmp_path / "maps"
    assert visualize.main(["--checkpoint", model, "--out", str(out), "missing.png"]) == 2
    line = tiny.error_line(capsys)
    needed, got = line.split(", got ")
    assert model in needed and needed.endswith(
        "needs a ViT with a class token (classifier 'token')"
    )
    assert named in got and "'token'" not in got  # no classifier claimed that the model lacks
    assert not out.exists()
    assert capsys.readouterr().out == ""
