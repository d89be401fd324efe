"""Bounded work per image: sizes read from headers (against PIL's reading), decompression bombs
refused by predict, visualize and evaluate before anything decodes them, and visualize never
replacing an existing file unless asked."""

import io

import image_bombs
import jax
import numpy as np
import pytest
import tiny
from PIL import Image

from vit_jax import evaluate, models, predict, visualize, weights
from vit_jax.data import image_header, preprocess

DEFAULT = image_header.DEFAULT_MAX_PIXELS
PNG_BOMB = (20000, 20000)  # 1.2 GB of RGB from about 50 kB
JPEG_BOMB = (14000, 14000)  # 588 MB of RGB from 766 kB


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _pil_files() -> dict[str, bytes]:
    """The same 53 x 37 picture in every format and variant the decoder takes."""
    pixels = np.random.RandomState(0).randint(0, 256, (37, 53, 3), np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x010E] = "x" * 30000  # a large APP1 segment before the frame header
    frames = [Image.fromarray(np.roll(pixels, i, 0)).convert("P") for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": _encoded(image, "JPEG"),
        "jpeg progressive": _encoded(image, "JPEG", progressive=True),
        "jpeg exif icc": _encoded(image, "JPEG", exif=exif, icc_profile=bytes(50000)),
        "jpeg cmyk": _encoded(image.convert("CMYK"), "JPEG"),
        "png": _encoded(image, "PNG"),
        "png palette": _encoded(image.convert("P"), "PNG"),
        "png 16-bit": _encoded(Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG"),
        "gif": _encoded(image.convert("P"), "GIF"),
        "gif animated": animated.getvalue(),
        "bmp": _encoded(image, "BMP"),
        "bmp palette": _encoded(image.convert("P"), "BMP"),
        "bmp 1-bit": _encoded(image.convert("1"), "BMP"),
        "webp lossy": _encoded(image, "WEBP"),
        "webp lossless": _encoded(image, "WEBP", lossless=True),
        "webp extended": _encoded(image.convert("RGBA"), "WEBP", exif=exif),
    }


@pytest.mark.parametrize("kind", sorted(_pil_files()))
def test_header_sizes_are_pils(kind):
    """Every format decode_image takes: the size read from the header is the one PIL reads, and
    the pixels counted are what the decoder makes (an animated GIF: every frame)."""
    data = _pil_files()[kind]
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        frames = getattr(image, "n_frames", 1)
    size = image_header.read_size(data)
    assert (size.width, size.height, size.frames) == (width, height, frames) == (53, 37, frames)
    assert size.pixels == 53 * 37 * frames
    # the same from a file object, as the CLIs read it
    assert image_header.read_size(io.BytesIO(data)) == size


def test_an_animated_gif_counts_every_frame_and_frames_larger_than_the_screen():
    frames = _pil_files()["gif animated"]
    with pytest.raises(image_header.ImageTooLargeError) as refused:
        image_header.check_pixels(frames, "anim.gif", 53 * 37 * 2)
    assert str(refused.value) == (
        f"anim.gif: 53x37 pixels in 3 frames ({53 * 37 * 3} pixels decoded), "
        f"more than --max-pixels {53 * 37 * 2}"
    )
    # a 1 x 1 screen holding one 5000 x 5000 frame (the decoder allocates the frame's area)
    tiny_screen = b"GIF89a\x01\x00\x01\x00\x00\x00\x00"
    frame = b"\x2c\x00\x00\x00\x00\x88\x13\x88\x13\x00\x02\x00\x3b"  # 5000 = 0x1388
    size = image_header.read_size(tiny_screen + frame)
    assert (size.width, size.height, size.pixels) == (1, 1, 25_000_000)
    with pytest.raises(image_header.ImageTooLargeError, match="25000000 pixels decoded"):
        image_header.check_pixels(tiny_screen + frame, "frame.gif", DEFAULT // 4)


def test_unknown_and_broken_headers():
    """Bytes of no format decode_image takes: None (its decoder refuses them, nothing
    allocated). A known format whose header does not read: a one-line HeaderError."""
    image = Image.new("RGB", (8, 8))
    assert image_header.read_size(_encoded(image, "TIFF")) is None
    assert image_header.read_size(b"hello, not an image") is None
    png = _encoded(image, "PNG")
    with pytest.raises(image_header.HeaderError, match=r"^x.png: not a readable image \(PNG"):
        image_header.check_pixels(png[:20], "x.png", DEFAULT)
    jpeg = _encoded(image, "JPEG")
    sos = jpeg.index(b"\xff\xda")
    frame = jpeg.index(b"\xff\xc0")
    no_frame = jpeg[:frame] + jpeg[sos:]  # the scan with no frame header before it
    with pytest.raises(image_header.HeaderError, match="JPEG without a frame header"):
        image_header.check_pixels(no_frame, "x.jpg", DEFAULT)


def test_the_test_bombs_are_real(monkeypatch):
    """The bombs are what PIL itself refuses (DecompressionBombError: what the server's broad
    `except` used to swallow), with the size in their headers; built at a small size, the same
    bytes decode to ordinary images, in PIL and TensorFlow."""
    import tensorflow as tf

    for build, (width, height), limit in [
        (image_bombs.png, PNG_BOMB, 100_000),
        (image_bombs.jpeg, JPEG_BOMB, 800_000),
    ]:
        data = build(width, height)
        assert len(data) < limit
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))
        with monkeypatch.context() as unlimited:
            unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (width, height)
        assert image_header.read_size(data).pixels == width * height
        small = build(45, 30)
        with Image.open(io.BytesIO(small)) as image:
            pil = np.asarray(image.convert("RGB"))
        decoded = preprocess.decode_image(tf.constant(small)).numpy()
        assert pil.shape == decoded.shape == (30, 45, 3)
        np.testing.assert_array_equal(pil, decoded)
        assert np.ptp(decoded) == 0


# ----------------------------------------------------------------------------- the CLIs


@pytest.fixture
def model(tmp_path) -> str:
    """A tiny random 10-class digits-sized model as an .npz."""
    spec = tiny.tiny_config().model
    module = models.get_model(spec, num_classes=10)
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), models.init_shapes(module, 8)
    )
    meta = {"model": spec.to_dict(), "class_names": list("0123456789"), "image_size": 8}
    path = tmp_path / "tiny.npz"
    weights.save(params, meta, path)
    return str(path)


@pytest.fixture
def bombs(tmp_path) -> dict[str, str]:
    paths = {}
    for name, data in [
        ("bomb.png", image_bombs.png(*PNG_BOMB)),
        ("bomb.jpg", image_bombs.jpeg(*JPEG_BOMB)),
    ]:
        (tmp_path / name).write_bytes(data)
        paths[name] = str(tmp_path / name)
    return paths


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image reaches a decoder."""

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(preprocess, "decode_image", refuse)  # TensorFlow's, and PIL's for BMP


def _digit(path, size=(8, 8)) -> str:
    Image.fromarray(np.full((*size[::-1], 3), 200, np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize(("name", "size"), [("bomb.png", PNG_BOMB), ("bomb.jpg", JPEG_BOMB)])
def test_predict_refuses_a_bomb_before_decoding_anything(
    name, size, model, bombs, tmp_path, capsys, no_decoding
):
    good = _digit(tmp_path / "good.png")
    assert predict.main(["--checkpoint", model, good, bombs[name]]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {bombs[name]}: {size[0]}x{size[1]} pixels, more than --max-pixels {DEFAULT}"
    )
    assert capsys.readouterr().out == ""


def test_predict_max_pixels_flag(model, tmp_path, capsys):
    """The cap is the flag's: a 100 x 100 image is refused at 9999 pixels, classified at 10000."""
    image = _digit(tmp_path / "hundred.png", (100, 100))
    assert predict.main(["--checkpoint", model, "--max-pixels", "9999", image]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {image}: 100x100 pixels, more than --max-pixels 9999"
    )
    assert predict.main(["--checkpoint", model, "--max-pixels", "10000", image]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    with pytest.raises(SystemExit) as bad_flag:
        predict.main(["--checkpoint", model, "--max-pixels", "0", image])
    assert bad_flag.value.code == 2
    assert "argument --max-pixels: must be at least 1, got 0" in tiny.error_line(capsys)


def test_visualize_refuses_a_bomb_and_writes_nothing(model, bombs, tmp_path, capsys, no_decoding):
    out = tmp_path / "maps"
    good = _digit(tmp_path / "good.png")
    argv = ["--checkpoint", model, "--out", str(out), good, bombs["bomb.png"]]
    assert visualize.main(argv) == 2
    assert tiny.error_line(capsys) == (
        f"error: {bombs['bomb.png']}: 20000x20000 pixels, more than --max-pixels {DEFAULT}"
    )
    assert not out.exists()


def test_evaluate_refuses_a_bomb_in_an_image_folder(model, tmp_path, capsys, no_decoding):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label in "ab":
            (root / split / label).mkdir(parents=True)
            _digit(root / split / label / "x.png")
    bomb = root / "test" / "b" / "big.jpg"
    bomb.write_bytes(image_bombs.jpeg(*JPEG_BOMB))
    argv = ["--checkpoint", model, "--config=configs/default.py", *tiny.flags()]
    assert evaluate.main([*argv, f"--config.dataset={root}"]) == 2
    assert tiny.error_line(capsys) == (
        f"error: {bomb}: 14000x14000 pixels, more than --max-pixels {DEFAULT}"
    )
    assert evaluate.main([*argv, f"--config.dataset={root}", "--max-pixels=0"]) == 2
    assert "max-pixels" in tiny.error_line(capsys)


# ----------------------------------------------------------------------------- overwriting


def _vis(model, out, *images, extra=()) -> list[str]:
    return ["--checkpoint", model, "--out", str(out), "--heads", *extra, *map(str, images)]


def test_visualize_never_replaces_a_file_unless_overwrite(model, tmp_path, capsys):
    """A second run into the same --out refuses (exit 2, one line naming the file) and leaves
    the first run's files alone; a user's own file of an output's name stops the run before any
    map is written; --overwrite replaces them."""
    a, b = _digit(tmp_path / "a.png"), _digit(tmp_path / "b.png", (12, 12))
    out = tmp_path / "maps"
    assert visualize.main(_vis(model, out, a, b)) == 0
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["a_heads.png", "a_rollout.png", "b_heads.png", "b_rollout.png"]
    for p in out.iterdir():
        p.write_bytes(b"earlier " + p.name.encode())  # to tell them from a rewrite

    assert visualize.main(_vis(model, out, a, b)) == 2
    assert tiny.error_line(capsys) == (
        f"error: {out}/a_rollout.png already exists (and 3 more of this run's outputs); "
        "nothing was written: pass --overwrite to replace it, or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        name: b"earlier " + name.encode() for name in first
    }

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "b_heads.png").write_bytes(b"my own notes")
    assert visualize.main(_vis(model, mine, a, b)) == 2
    assert tiny.error_line(capsys).startswith(f"error: {mine}/b_heads.png already exists;")
    assert [p.name for p in mine.iterdir()] == ["b_heads.png"]  # a's maps not written either
    assert (mine / "b_heads.png").read_bytes() == b"my own notes"

    assert visualize.main(_vis(model, out, a, b, extra=["--overwrite"])) == 0
    assert capsys.readouterr().out.split() == [
        f"{out}/a_rollout.png", f"{out}/a_heads.png", f"{out}/b_rollout.png", f"{out}/b_heads.png"
    ]  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
