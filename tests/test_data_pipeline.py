"""Train/eval iterators: determinism, resume, simulated hosts, eval padding, mixup, errors."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from vit_jax import data
from vit_jax.data import sources


def make_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            dataset="digits",
            tfds_data_dir=None,
            tfds_manual_dir=None,
            class_subset=None,
            pp=dict(
                train="train",
                test="test",
                resize=10,
                crop=8,
                inception_crop=False,
                flip=False,
                mixup_alpha=0.0,
                randaugment_layers=0,
                randaugment_magnitude=10,
            ),
            batch=8,
            batch_eval=64,
            seed=0,
            skip_bad_images=False,
            prefetch=2,
        )
    )
    for key, value in overrides.items():
        if "." in key:
            head, name = key.split(".")
            config[head][name] = value
        else:
            config[key] = value
    return config


# Every source of randomness on: inception crop, flip, RandAugment, mixup.
AUGMENTED = {
    "pp.inception_crop": True,
    "pp.flip": True,
    "pp.randaugment_layers": 1,
    "pp.mixup_alpha": 0.4,
}


@pytest.fixture(scope="module")
def sharding() -> NamedSharding:
    return NamedSharding(jax.make_mesh((1, 1), ("data", "fsdp")), PartitionSpec(("data", "fsdp")))


def as_numpy(batch) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [as_numpy(next(iterator)) for _ in range(count)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_same_seed_same_batches_and_resume(sharding):
    config = make_config(**AUGMENTED)
    iterator = data.train_iterator(config, sharding)
    assert iterator.step == 0
    run = take(iterator, 6)
    assert iterator.step == 6
    batch = run[0]
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8, 10) and batch["label"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    np.testing.assert_allclose(batch["label"].sum(axis=1), 1.0, rtol=1e-6)
    assert_batches_equal(take(data.train_iterator(config, sharding), 6), run)
    resumed = data.train_iterator(config, sharding, start_step=3)
    assert resumed.step == 3
    assert_batches_equal(take(resumed, 3), run[3:])
    assert resumed.step == 6
    first_plain = take(data.train_iterator(make_config(), sharding), 1)[0]
    other_seed = take(data.train_iterator(make_config(seed=1), sharding), 1)[0]
    assert not np.array_equal(other_seed["image"], first_plain["image"])
    assert not np.array_equal(run[1]["image"], batch["image"])


def test_two_simulated_processes_build_halves_of_the_global_batch(sharding):
    config = make_config(**AUGMENTED)
    whole = take(data.train_iterator(config, sharding, start_step=2), 2)
    halves = [
        take(
            data.train_iterator(config, sharding, start_step=2, process_index=i, process_count=2),
            2,
        )
        for i in range(2)
    ]
    for step in range(2):
        for key in ("image", "label"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    assert not np.array_equal(halves[0][0]["label"], halves[1][0]["label"])


def test_an_epoch_visits_every_example_once(sharding):
    # resize == crop and no flip: train geometry is the identity, so images identify examples.
    config = make_config(**{"pp.train": "train[:24]", "pp.resize": 8})
    epoch_images = []
    iterator = data.train_iterator(config, sharding)
    for _ in range(2):
        batches = take(iterator, 3)
        epoch_images.append([img.tobytes() for b in batches for img in b["image"]])
    eval_images = [
        img.tobytes()
        for b in data.eval_iterator(config, sharding, split="train[:24]")
        for img, m in zip(np.asarray(b["image"]), np.asarray(b["mask"]), strict=True)
        if m
    ]
    assert len(eval_images) == 24
    assert sorted(epoch_images[0]) == sorted(epoch_images[1]) == sorted(eval_images)
    assert epoch_images[0] != epoch_images[1]


def test_eval_pads_the_last_batch_and_counts_each_example_once(sharding):
    config = make_config()
    iterator = data.eval_iterator(config, sharding)
    assert len(iterator) == 6  # ceil(355 / 64)
    batches = [as_numpy(b) for b in iterator]
    assert len(batches) == 6
    assert [int(b["mask"].sum()) for b in batches] == [64] * 5 + [35]
    last = batches[-1]
    assert last["label"].dtype == np.int32 and last["mask"].dtype == np.bool_
    assert (last["image"][35:] == -1.0).all() and (last["label"][35:] == 0).all()
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, sources.open_split(config, "test").labels())


@pytest.mark.parametrize("process_count", [2, 3])
def test_eval_hosts_split_rows_disjointly(sharding, process_count):
    config = make_config(batch_eval=48)
    single = [as_numpy(b) for b in data.eval_iterator(config, sharding)]
    per_host = [
        [
            as_numpy(b)
            for b in data.eval_iterator(
                config, sharding, process_index=i, process_count=process_count
            )
        ]
        for i in range(process_count)
    ]
    assert all(len(host) == len(single) == 8 for host in per_host)
    for step, whole in enumerate(single):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([host[step][key] for host in per_host])
            np.testing.assert_array_equal(joined, whole[key])
    assert sum(int(b["mask"].sum()) for host in per_host for b in host) == 355


def test_mixup_mixes_neighbouring_rows(sharding):
    plain = take(data.train_iterator(make_config(), sharding), 1)[0]
    mixed = take(data.train_iterator(make_config(**{"pp.mixup_alpha": 1.0}), sharding), 1)[0]
    checked = 0
    for m in range(4):
        a, b = 2 * m, 2 * m + 1
        label_a, label_b = plain["label"][a].argmax(), plain["label"][b].argmax()
        if label_a == label_b:
            continue
        ratio = mixed["label"][a][label_a]
        assert 0.5 <= ratio <= 1.0
        np.testing.assert_allclose(mixed["label"][b][label_b], ratio, rtol=1e-6)
        np.testing.assert_allclose(
            mixed["image"][a],
            ratio * plain["image"][a] + (1 - ratio) * plain["image"][b],
            atol=1e-5,
        )
        np.testing.assert_allclose(
            mixed["image"][b],
            ratio * plain["image"][b] + (1 - ratio) * plain["image"][a],
            atol=1e-5,
        )
        checked += 1
    assert checked


def test_bad_image_raised_when_its_batch_is_due(tmp_path, sharding):
    for i in range(6):
        os.makedirs(tmp_path / "train" / "c", exist_ok=True)
        Image.new("RGB", (5, 5), (i, i, i)).save(tmp_path / "train" / "c" / f"{i}.png")
    (tmp_path / "train" / "c" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = make_config(dataset=str(tmp_path), batch_eval=2, prefetch=3)
    order = [os.path.basename(p) for p in sources.open_split(config, "train").paths]
    bad_step = order.index("bad.png") // 2
    iterator = data.eval_iterator(config, sharding, split="train")
    for _ in range(bad_step):
        next(iterator)  # prefetching already read the bad batch, but earlier ones come first
    with pytest.raises(data.BadImageError, match=r"bad\.png"):
        next(iterator)


def test_config_errors(sharding):
    with pytest.raises(data.DataError, match=r"pp.crop=12 .*pp.resize=10"):
        data.train_iterator(make_config(**{"pp.crop": 12}), sharding)
    with pytest.raises(data.DataError, match=r"batch=6 .* processes \(4\)"):
        data.train_iterator(make_config(batch=6), sharding, process_index=0, process_count=4)
    with pytest.raises(data.DataError, match=r"per-process batch \(3\) must be even"):
        config = make_config(batch=6, **{"pp.mixup_alpha": 0.2})
        data.train_iterator(config, sharding, process_index=0, process_count=2)


def test_global_arrays_on_a_multi_device_mesh(tmp_path):
    """4 CPU devices in a fresh process: batches are global arrays sharded over the batch axes."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import ml_collections
        from vit_jax import data
        config = ml_collections.ConfigDict(dict(dataset="digits", pp=dict(
            train="train", test="test", resize=8, crop=8), batch=8, batch_eval=12, seed=0))
        mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "model"))
        sharding = NamedSharding(mesh, P(("data", "fsdp")))
        batch = next(data.train_iterator(config, sharding))
        assert batch["image"].shape == (8, 8, 8, 3), batch["image"].shape
        assert batch["image"].sharding.shard_shape((8, 8, 8, 3)) == (4, 8, 8, 3)
        assert len(batch["label"].addressable_shards) == 4
        total = sum(int(b["mask"].sum()) for b in data.eval_iterator(config, sharding))
        assert total == 355, total
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
