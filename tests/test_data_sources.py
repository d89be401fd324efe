"""Sources of the input pipeline: digits, image folders, tfds (mocked cifar10 and a real tiny
dataset in both file formats), and the error for each bad input."""

import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from sklearn import datasets as sklearn_datasets

from vit_jax import data
from vit_jax.data import digits, sources, tfds_source


def make_config(dataset: str, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            tfds_data_dir=None,
            tfds_manual_dir=None,
            class_subset=None,
            pp=dict(
                train="train",
                test="test",
                resize=8,
                crop=8,
                inception_crop=False,
                flip=False,
                mixup_alpha=0.0,
                randaugment_layers=0,
                randaugment_magnitude=10,
            ),
            batch=4,
            batch_eval=4,
            seed=0,
            skip_bad_images=False,
            prefetch=2,
        )
    )
    for key, value in overrides.items():
        target, name = config, key
        if "." in key:
            head, name = key.split(".")
            target = config[head]
        target[name] = value
    return config


@pytest.fixture(scope="module")
def sharding() -> NamedSharding:
    return NamedSharding(jax.make_mesh((1,), ("data",)), PartitionSpec("data"))


@pytest.fixture(autouse=True)
def _fresh_sources():
    sources.clear_cache()
    yield
    sources.clear_cache()


def to_uint8(images) -> np.ndarray:
    return np.round((np.asarray(images) + 1.0) * 127.5).astype(np.int64)


def eval_examples(config, sharding, split=None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of all unmasked eval rows, in order."""
    images, labels = [], []
    for batch in data.eval_iterator(config, sharding, split=split):
        mask = np.asarray(batch["mask"])
        images.append(to_uint8(batch["image"])[mask])
        labels.append(np.asarray(batch["label"])[mask])
    return np.concatenate(images), np.concatenate(labels)


# ---------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_balance_and_values(sharding):
    train, test = digits.open_split("train"), digits.open_split("test")
    assert (len(train), len(test)) == (digits.NUM_TRAIN, digits.NUM_TEST) == (1442, 355)
    train_counts = np.bincount(train.labels(), minlength=10)
    test_counts = np.bincount(test.labels(), minlength=10)
    np.testing.assert_array_equal(
        train_counts + test_counts,
        np.bincount(sklearn_datasets.load_digits().target),
    )
    assert train_counts.min() >= 140 and test_counts.min() >= 34
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    info = data.get_info(make_config("digits"))
    assert info == data.DatasetInfo("digits", 10, [str(i) for i in range(10)], 1442, 355)
    config = make_config("digits", **{"pp.resize": 32, "pp.crop": 32}, batch_eval=128)
    batch = next(iter(data.eval_iterator(config, sharding)))
    images = np.asarray(batch["image"])
    assert images.shape == (128, 32, 32, 3) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0  # background 0 -> -1, full ink 16 -> 1
    assert (images[..., 0] == images[..., 2]).all()  # gray replicated to RGB


def test_digits_slices_and_class_subset():
    assert len(digits.open_split("train[:10%]")) == 144
    assert len(digits.open_split("train[-5:]+test")) == 360
    config = make_config("digits", class_subset=(5, 6, 7, 8, 9))
    info = data.get_info(config)
    expected = np.bincount(digits.open_split("train").labels())[5:].sum()
    assert info.class_names == ["5", "6", "7", "8", "9"] and info.num_classes == 5
    assert info.num_train == expected
    labels = sources.open_split(config, "train").labels()
    assert set(labels) == {0, 1, 2, 3, 4}
    with pytest.raises(data.DataError, match="class_subset"):
        data.get_info(make_config("digits", class_subset=(3, 10)))


def test_bad_split_names_error():
    with pytest.raises(data.DataError, match="digits.*'validation'"):
        data.get_info(make_config("digits", **{"pp.test": "validation"}))


# --------------------------------------------------------------------------------------- folders

# (class, file name, PIL mode, format, RGB colour) of each readable training image.
TRAIN_FILES = [
    ("ant", "a0.png", "RGB", "PNG", (200, 30, 40)),
    ("ant", "a1.JPG", "RGB", "JPEG", (40, 160, 200)),
    ("ant", "gray.png", "L", "PNG", (77, 77, 77)),
    ("ant", "alpha.png", "RGBA", "PNG", (10, 200, 30)),
    ("bee", "b0.gif", "P", "GIF", (250, 250, 0)),
    ("bee", "b1.bmp", "P", "BMP", (0, 0, 255)),
    ("bee", "b2.jpeg", "CMYK", "JPEG", (120, 60, 180)),
]
TEST_FILES = [
    ("ant", "t0.png", "RGB", "PNG", (1, 2, 3)),
    ("bee", "t1.png", "RGB", "PNG", (9, 8, 7)),
]


def _write(root, split, files):
    for cls, name, mode, fmt, colour in files:
        os.makedirs(root / split / cls, exist_ok=True)
        image = Image.new("RGB", (9 + len(name), 7), colour)
        if mode == "RGBA":
            image = image.convert("RGBA")
            image.putalpha(Image.linear_gradient("L").resize(image.size))
        elif mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        else:
            image = image.convert(mode)
        image.save(root / split / cls / name, fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    _write(root, "train", TRAIN_FILES)
    _write(root, "test", TEST_FILES)
    jpeg = (root / "train" / "ant" / "a1.JPG").read_bytes()
    (root / "train" / "bee" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "bee" / "text.png").write_text("this is not an image")
    (root / "train" / "ant" / "notes.txt").write_text("not an image extension")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    return root


def test_folder_reads_every_format_with_skip(image_folder, sharding, caplog):
    config = make_config(str(image_folder), skip_bad_images=True)
    info = data.get_info(config)
    assert info.class_names == ["ant", "bee"] and info.num_classes == 2
    assert (info.num_train, info.num_test) == (7, 2)
    assert "skipping 2 unreadable image files of 9" in caplog.text
    assert "broken.jpg" in caplog.text and "text.png" in caplog.text
    assert "notes.txt" in caplog.text  # non-image entries are listed, not dropped silently
    images, labels = eval_examples(config, sharding, split="train")
    got = sorted((tuple(img[4, 4]), int(lbl)) for img, lbl in zip(images, labels, strict=True))
    want = sorted((c, ["ant", "bee"].index(cls)) for cls, _, mode, _, c in TRAIN_FILES)
    assert len(got) == len(want)
    for (got_colour, got_label), (want_colour, want_label) in zip(got, want, strict=True):
        assert got_label == want_label
        np.testing.assert_allclose(got_colour, want_colour, atol=3)  # JPEG/CMYK rounding
    for image in images:  # solid colours stay solid through resize and crop
        assert np.ptp(image, axis=(0, 1)).max() <= 1
    images, labels = eval_examples(config, sharding)
    assert sorted(map(tuple, images[:, 0, 0])) == sorted(c for *_, c in TEST_FILES)


def test_folder_bad_image_error_names_the_file(image_folder, sharding):
    config = make_config(str(image_folder))
    assert data.get_info(config).num_train == 9
    with pytest.raises(data.BadImageError, match=r"(broken\.jpg|text\.png).*skip_bad_images"):
        for _ in data.eval_iterator(config, sharding, split="train"):
            pass
    iterator = data.train_iterator(config, sharding)
    with pytest.raises(data.BadImageError) as error:
        for _ in range(10):  # 9 examples, batch 4: both bad files come up within 3 steps
            next(iterator)
    assert os.path.basename(error.value.path) in ("broken.jpg", "text.png")


def test_folder_slices_validation_fallback_and_layout_errors(image_folder, tmp_path):
    config = make_config(str(image_folder), skip_bad_images=True)
    config.pp.train, config.pp.test = "train[:5]", "train[5:]"
    info = data.get_info(config)
    assert (info.num_train, info.num_test) == (5, 2)

    only_train = tmp_path / "only_train"
    _write(only_train, "train", TEST_FILES)
    with pytest.raises(data.DataError, match=r"no test/ or validation/.*'train\[90%:\]'"):
        data.get_info(make_config(str(only_train)))
    _write(only_train, "validation", TEST_FILES[:1])
    assert data.get_info(make_config(str(only_train))).num_test == 1

    empty_class = tmp_path / "empty_class"
    _write(empty_class, "train", TEST_FILES)
    _write(empty_class, "test", TEST_FILES)
    os.makedirs(empty_class / "train" / "cow")
    with pytest.raises(data.DataError, match=r"class folder .*cow contains no images"):
        data.get_info(make_config(str(empty_class)))

    extra_class = tmp_path / "extra_class"
    _write(extra_class, "train", TEST_FILES)
    _write(extra_class, "test", TEST_FILES + [("cow", "c.png", "RGB", "PNG", (0, 0, 0))])
    with pytest.raises(data.DataError, match=r"\['cow'\] that train/ does not have"):
        data.get_info(make_config(str(extra_class)))

    with pytest.raises(data.UnknownDatasetError, match="no such folder"):
        data.get_info(make_config(str(tmp_path / "does" / "not" / "exist")))


# ------------------------------------------------------------------------------------------ tfds


def test_tfds_mock_cifar10(sharding, monkeypatch):
    config = make_config("cifar10", **{"pp.resize": 12, "pp.crop": 10}, batch=8, batch_eval=8)
    for random_access in (False, True):  # in-memory tfrecord path, then tfds.data_source path
        monkeypatch.setattr(tfds_source, "has_random_access", lambda b, r=random_access: r)
        sources.clear_cache()
        with tfds.testing.mock_data(num_examples=20):
            info = data.get_info(config)
            batch = next(data.train_iterator(config, sharding))
            count = sum(int(b["mask"].sum()) for b in data.eval_iterator(config, sharding))
        assert info.num_classes == len(info.class_names) == 10  # mock names: '0'..'9'
        assert (info.num_train, info.num_test) == (20, 20)
        assert batch["image"].shape == (8, 10, 10, 3) and batch["label"].shape == (8, 10)
        assert np.asarray(batch["image"]).std() > 0.3  # random mock pixels, decoded
        np.testing.assert_allclose(np.asarray(batch["label"]).sum(axis=1), 1.0)
        assert count == 20


def test_tfds_unknown_name_suggests_close_names():
    with pytest.raises(data.UnknownDatasetError, match="did you mean 'cifar10'"):
        data.get_info(make_config("cifr10"))


def test_tfds_not_downloaded_without_network(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    config = make_config("cifar10", tfds_data_dir=str(tmp_path))
    with pytest.raises(
        data.DatasetNotPreparedError,
        match=r"'cifar10' is not prepared in .*"
        r"ConnectionError.*tfds build cifar10",
    ):
        data.get_info(config)


class VitJaxTestSquares(tfds.core.GeneratorBasedBuilder):
    """A real tiny tfds dataset: solid images whose pixel value identifies the example."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(12, 0), "test": self._generate_examples(5, 100)}

    def _generate_examples(self, count, first_value):
        for i in range(count):
            image = np.full((6 + i % 3, 8, 3), first_value + i, np.uint8)
            yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def squares_dirs(tmp_path_factory) -> dict[str, str]:
    """{file format: data_dir} with the squares dataset prepared in it."""
    dirs = {}
    for file_format in ("tfrecord", "array_record"):
        data_dir = str(tmp_path_factory.mktemp(file_format))
        tfds.builder(
            "vit_jax_test_squares", data_dir=data_dir, file_format=file_format
        ).download_and_prepare()
        dirs[file_format] = data_dir
    return dirs


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_real_dataset_both_file_formats(squares_dirs, sharding, file_format):
    config = make_config(
        "vit_jax_test_squares", tfds_data_dir=squares_dirs[file_format], batch=4, batch_eval=4
    )
    split = sources.open_split(config, "train")
    kind = tfds_source.DataSourceSplit if file_format == "array_record" else None
    assert kind is None or isinstance(split, kind)
    info = data.get_info(config)
    assert info == data.DatasetInfo("vit_jax_test_squares", 3, ["red", "green", "blue"], 12, 5)
    images, labels = eval_examples(config, sharding)
    values = images[:, 0, 0, 0]
    assert sorted(values) == [100, 101, 102, 103, 104]
    np.testing.assert_array_equal(labels, (values - 100) % 3)
    iterator = data.train_iterator(config, sharding)
    epochs = [
        np.concatenate([to_uint8(next(iterator)["image"])[:, 0, 0, 0] for _ in range(3)])
        for _ in range(2)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))  # each example once/epoch
    assert list(epochs[0]) != list(epochs[1])  # reshuffled per epoch
    sliced = make_config(
        "vit_jax_test_squares",
        tfds_data_dir=squares_dirs[file_format],
        class_subset=(2, 0),
        **{"pp.train": "train[:50%]"},
    )
    info = data.get_info(sliced)
    assert info.class_names == ["blue", "red"] and info.num_train == 4  # 6 examples, 2/3 kept
    with pytest.raises(data.DataError, match=r"'validation'.*\['test', 'train'\]"):
        data.get_info(
            make_config(
                "vit_jax_test_squares",
                tfds_data_dir=squares_dirs[file_format],
                **{"pp.test": "validation"},
            )
        )


def test_tfds_large_tfrecord_split_is_refused(squares_dirs, monkeypatch):
    monkeypatch.setattr(tfds_source, "MAX_IN_MEMORY_BYTES", 10)
    config = make_config("vit_jax_test_squares", tfds_data_dir=squares_dirs["tfrecord"])
    with pytest.raises(data.DataError, match="too large.*tfds convert_format"):
        data.get_info(config)
