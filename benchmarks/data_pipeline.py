"""Input-pipeline throughput: images/s that `vit_jax.data.train_iterator` delivers on this host.

    python benchmarks/data_pipeline.py [--batch 64] [--seconds 10]

Cases (global arrays on the local devices, as the trainer gets them):
  digits@32        the embedded default, upscaled to 32 (configs/default.py uses 16)
  cifar-like@224   tfds cifar10 path (PNG-encoded 32x32 records held in memory), mocked by
                   tfds.testing.mock_data so no download is needed; resize 224 + random crop + flip
  cifar-like@224+  the same with inception crop, RandAugment 2x15 and mixup
  jpeg-folder@224  a folder of 500x375 JPEGs written to a temp dir; inception crop + flip
  *-eval           the matching eval pipeline (resize + central crop)
Compare with the train step's images/s (ViT-B/16 at 224: the pipeline should be >= 3x faster).
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from PIL import Image  # noqa: E402

from vit_jax import data  # noqa: E402


def make_config(dataset: str, batch: int, **pp) -> ml_collections.ConfigDict:
    defaults = dict(
        train="train",
        test="test",
        resize=224,
        crop=224,
        inception_crop=False,
        flip=True,
        mixup_alpha=0.0,
        randaugment_layers=0,
        randaugment_magnitude=15,
    )
    defaults.update(pp)
    return ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            tfds_data_dir=None,
            tfds_manual_dir=None,
            class_subset=None,
            pp=defaults,
            batch=batch,
            batch_eval=batch,
            seed=0,
            skip_bad_images=False,
            prefetch=2,
        )
    )


def write_jpeg_folder(root: str, count: int) -> None:
    """`count` photo-like 500x375 JPEGs in 4 classes, under root/train and root/test."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(count):
            folder = os.path.join(root, split, f"class_{i % 4}")
            os.makedirs(folder, exist_ok=True)
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC))
            noise = rng.integers(-12, 13, image.shape)
            image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def images_per_second(iterator, batch: int, seconds: float) -> float:
    jax.block_until_ready(next(iterator))  # tracing and start-up excluded
    jax.block_until_ready(next(iterator))
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(next(iterator))
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per case")
    parser.add_argument("--jpegs", type=int, default=256, help="files per split in the folder")
    args = parser.parse_args()
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))
    heavy = dict(inception_crop=True, randaugment_layers=2, mixup_alpha=0.2)
    print(f"{os.cpu_count()} CPUs, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"{'case':<20} {'images/s':>10}")

    def report(name: str, config: ml_collections.ConfigDict, train: bool = True) -> None:
        if train:
            iterator = data.train_iterator(config, sharding)
        else:
            iterator = _repeat_eval(config, sharding)
        print(
            f"{name:<20} {images_per_second(iterator, args.batch, args.seconds):>10.0f}", flush=True
        )

    digits = make_config("digits", args.batch, resize=36, crop=32, flip=False)
    report("digits@32", digits)
    report("digits@32-eval", digits, train=False)
    with tfds.testing.mock_data(num_examples=2000):
        report("cifar-like@224", make_config("cifar10", args.batch))
        report("cifar-like@224+", make_config("cifar10", args.batch, **heavy))
        report("cifar-like@224-eval", make_config("cifar10", args.batch), train=False)
    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, args.jpegs)
        folder = make_config(root, args.batch, resize=256, inception_crop=True)
        report("jpeg-folder@224", folder)
        report("jpeg-folder@224-eval", folder, train=False)


def _repeat_eval(config, sharding):
    while True:
        yield from data.eval_iterator(config, sharding)


if __name__ == "__main__":
    main()
