"""Train and eval iterators: index arithmetic -> tf.data graph -> sharded global jax.Arrays.

Training order. Global batch B, split of N examples. Row r of the batch of step k is global
position p = k*B + r, i.e. epoch p // N, offset p % N; the example is
`index_shuffle(offset, seed=(config.seed, epoch))`, a stateless per-epoch permutation, and its
augmentation is seeded by (config.seed, p). So the batch of step k is a pure function of
(seed, k, dataset), whatever the number of processes: each process computes only the positions of
its own rows, and resuming at step k starts the index arithmetic there (nothing is read and
thrown away). Mixup mixes neighbouring rows (2m, 2m+1) with ratios drawn from (seed, k), so it
also never crosses a process boundary.

Eval order. Step s holds positions s*B_eval + r in split order; positions >= N are padding
(zero image, label 0, mask False), so every example is counted exactly once.

Placement. Each process builds its rows as numpy, turns them into global arrays with
`jax.make_array_from_process_local_data` and keeps `config.prefetch` batches ahead on device.
"""

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from vit_jax.data import preprocess, randaugment, sources
from vit_jax.data.errors import BadImageError, DataError
from vit_jax.data.splits import Split

__all__ = [
    "BatchIterator",
    "eval_dataset",
    "eval_iterator",
    "Preprocessing",
    "process_rows",
    "Rows",
    "train_dataset",
    "train_index",
    "train_iterator",
]


# Distinct purposes folded into config.seed so the random streams never coincide.
_SHUFFLE, _AUGMENT, _MIXUP = 0, 1, 2
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The `config.pp` fields that shape examples."""

    resize: int
    crop: int
    inception_crop: bool = False
    flip: bool = False
    mixup_alpha: float = 0.0
    randaugment_layers: int = 0
    randaugment_magnitude: int = 10
    antialias: bool = True  # eval resize only; see preprocess.resize
    normalization: Any = None  # {'mean', 'std'}; None: the published [-1, 1]

    @classmethod
    def from_config(cls, pp: ml_collections.ConfigDict) -> "Preprocessing":
        crop = int(pp.crop)
        result = cls(
            resize=int(pp.get("resize", crop) or crop),
            crop=crop,
            inception_crop=bool(pp.get("inception_crop", False)),
            flip=bool(pp.get("flip", False)),
            mixup_alpha=float(pp.get("mixup_alpha", 0.0) or 0.0),
            randaugment_layers=int(pp.get("randaugment_layers", 0) or 0),
            randaugment_magnitude=int(pp.get("randaugment_magnitude", 10)),
            antialias=bool(pp.get("antialias", True)),
            normalization=preprocess.normalization(pp.get("mean"), pp.get("std")),
        )
        if result.crop <= 0 or result.crop > result.resize:
            raise DataError(
                f"config.pp.crop={result.crop} must be positive and <= config.pp.resize="
                f"{result.resize} (images are resized to pp.resize, then cropped)"
            )
        if not 0 <= result.randaugment_magnitude <= randaugment.MAX_MAGNITUDE:
            raise DataError(
                f"config.pp.randaugment_magnitude={result.randaugment_magnitude} is outside "
                f"0..{randaugment.MAX_MAGNITUDE} (10 = the RandAugment paper's maximum)"
            )
        if result.mixup_alpha < 0 or result.randaugment_layers < 0:
            raise DataError(
                f"config.pp.mixup_alpha={result.mixup_alpha} and config.pp.randaugment_layers="
                f"{result.randaugment_layers} must be >= 0"
            )
        return result


@dataclasses.dataclass(frozen=True)
class Rows:
    """The rows [start, start + size) of a global batch of `total` rows this process builds."""

    start: int
    size: int
    total: int
    simulated: bool  # process_index/count given differ from JAX's: yield local rows only


def process_rows(
    sharding: jax.sharding.Sharding,
    global_batch: int,
    example_shape: tuple[int, ...],
    process_index: int | None,
    process_count: int | None,
    what: str,
) -> Rows:
    """Which rows of the global batch this process fills (the rows its devices hold)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in 0..{process_count - 1}")
    if global_batch <= 0 or global_batch % process_count:
        raise DataError(
            f"config.{what}={global_batch} must be a positive multiple of the number of "
            f"processes ({process_count})"
        )
    local = global_batch // process_count
    shape = (global_batch, *example_shape)
    batch_sharding = _batch_sharding(sharding)
    try:
        batch_sharding.shard_shape(shape)
    except ValueError as e:
        raise DataError(
            f"config.{what}={global_batch} does not split evenly over the batch axes of "
            f"the mesh: {e}"
        ) from e
    simulated = process_index != jax.process_index() or process_count != jax.process_count()
    if simulated:
        return Rows(process_index * local, local, global_batch, True)
    starts, stops = [], []
    for device, index in batch_sharding.devices_indices_map(shape).items():
        if device.process_index == process_index:
            rows = index[0]
            starts.append(rows.start or 0)
            stops.append(global_batch if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    if stop - start != local:
        raise DataError(
            f"this process's devices hold rows {start}..{stop} of config.{what}={global_batch}, "
            f"not a contiguous block of {local}; use a mesh whose batch axes put each "
            "process's devices next to each other"
        )
    return Rows(start, local, global_batch, False)


def _batch_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of dim 0 only, usable for arrays of any rank."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec):
        return NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))
    return sharding


def _seed(config_seed: int, purpose: int, value: tf.Tensor) -> tf.Tensor:
    base = tf.constant([config_seed, purpose], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64))


def train_index(position: tf.Tensor | int, num_examples: int, seed: int) -> tf.Tensor:
    """Example index (int64 scalar) at global training position `position`."""
    position = tf.cast(position, tf.int64)
    return tf.random.experimental.index_shuffle(
        position % num_examples,
        _seed(seed, _SHUFFLE, position // num_examples),
        tf.constant(num_examples - 1, tf.int64),
    )


def _positions(step: int, rows: Rows) -> np.ndarray:
    """Global positions of this process's rows at `step`."""
    return step * rows.total + rows.start + np.arange(rows.size, dtype=np.int64)


def train_dataset(
    split: Split,
    pp: Preprocessing,
    rows: Rows,
    *,
    seed: int,
    start_step: int,
    num_classes: int,
) -> tf.data.Dataset:
    """Infinite local batches {'image' f32 [b,H,W,3], 'label' f32 [b,C]} from `start_step` on."""
    n = len(split)
    if n == 0:
        raise DataError(f"{split.description} has no examples to train on")
    if pp.mixup_alpha > 0 and rows.size % 2:
        raise DataError(
            f"mixup pairs neighbouring rows, so the per-process batch ({rows.size}) must be even"
        )

    def example(counter: tf.Tensor) -> dict[str, tf.Tensor]:
        step = counter // rows.size
        position = step * rows.total + rows.start + counter % rows.size
        image, label = split.load(train_index(position, n, seed))
        augment_seed = _seed(seed, _AUGMENT, position)
        geometry_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(augment_seed))
        image = preprocess.train_image(
            image,
            geometry_seed,
            resize_to=pp.resize,
            crop=pp.crop,
            use_inception_crop=pp.inception_crop,
            flip=pp.flip,
        )
        if pp.randaugment_layers:
            image = randaugment.randaugment(
                image, ra_seed, pp.randaugment_layers, pp.randaugment_magnitude
            )
        return {
            "image": preprocess.to_model_range(image, pp.normalization),
            "label": tf.one_hot(label, num_classes, dtype=tf.float32),
            "step": step,
        }

    ds = tf.data.Dataset.range(start_step * rows.size, _FOREVER)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(rows.size, drop_remainder=True)

    def mix(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ratios = preprocess.mixup_ratios(
            rows.total // 2, pp.mixup_alpha, _seed(seed, _MIXUP, batch["step"][0])
        )
        ratios = ratios[rows.start // 2 : (rows.start + rows.size) // 2]
        images, labels = preprocess.mixup_pairs(batch["image"], batch["label"], ratios)
        return {"image": images, "label": labels, "step": batch["step"]}

    if pp.mixup_alpha > 0:
        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda b: {"image": b["image"], "label": b["label"]})
    return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def eval_dataset(split: Split, pp: Preprocessing, rows: Rows) -> tuple[tf.data.Dataset, int]:
    """(finite local batches {'image', 'label' i32, 'mask' bool}, number of batches)."""
    n = len(split)
    num_steps = max(1, math.ceil(n / rows.total))

    def example(counter: tf.Tensor) -> dict[str, tf.Tensor]:
        position = (counter // rows.size) * rows.total + rows.start + counter % rows.size
        valid = position < n

        def real() -> tuple[tf.Tensor, tf.Tensor]:
            image, label = split.load(position)
            image = preprocess.eval_image(
                image, resize_to=pp.resize, crop=pp.crop, antialias=pp.antialias
            )
            return image, label

        def padding() -> tuple[tf.Tensor, tf.Tensor]:
            return tf.zeros([pp.crop, pp.crop, 3], tf.uint8), tf.constant(0, tf.int64)

        image, label = tf.cond(valid, real, padding)
        return {
            "image": preprocess.to_model_range(image, pp.normalization),
            "label": tf.cast(label, tf.int32),
            "mask": valid,
        }

    ds = tf.data.Dataset.range(num_steps * rows.size)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(rows.size, drop_remainder=True)
    return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE), num_steps


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options


class BatchIterator(Iterator[dict[str, jax.Array]]):
    """Global batches placed on device, `prefetch` ahead; `.step` is the next step it yields.

    A decode error in a batch is re-raised, when that batch is due, as a `BadImageError`
    naming the file (found by re-reading that batch's examples one by one).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        place: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
        start_step: int,
        num_steps: int | None,
        indices_of_step: Callable[[int], np.ndarray],
        split: Split,
        prefetch: int,
    ):
        self.step = start_step
        self._next_to_read = start_step
        self._end = None if num_steps is None else start_step + num_steps
        self._local = dataset.as_numpy_iterator()
        self._place = place
        self._indices_of_step = indices_of_step
        self._split = split
        self._prefetch = max(0, prefetch)
        self._queue: collections.deque = collections.deque()
        self._error: Exception | None = None

    def __len__(self) -> int:
        if self._end is None:
            raise TypeError("the training iterator is infinite")
        return self._end - self.step

    def __iter__(self) -> "BatchIterator":
        return self

    def _read_one(self) -> bool:
        if self._error is not None or (self._end is not None and self._next_to_read >= self._end):
            return False
        try:
            local = next(self._local)
        except StopIteration:
            self._end = self._next_to_read
            return False
        except tf.errors.OpError as e:
            self._error = self._diagnose(self._next_to_read, e)
            return False
        self._queue.append(self._place(local))
        self._next_to_read += 1
        return True

    def _diagnose(self, step: int, error: tf.errors.OpError) -> Exception:
        indices = [int(i) for i in self._indices_of_step(step)]
        found = self._split.find_unreadable(indices)
        if found is None:
            return error
        index, reason = found
        path = self._split.name_of(index)
        return BadImageError(
            f"cannot decode image {path} ({reason}); replace or delete it, or set "
            "config.skip_bad_images=True to skip unreadable files (they are counted and logged)",
            path,
        )

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) <= self._prefetch and self._read_one():
            pass
        if not self._queue:
            if self._error is not None:
                raise self._error
            raise StopIteration
        self.step += 1
        return self._queue.popleft()


def _placer(
    sharding: jax.sharding.Sharding, rows: Rows
) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    batch_sharding = _batch_sharding(sharding)

    def place(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if rows.simulated:
            return {k: jax.device_put(v, batch_sharding) for k, v in local.items()}
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, v, (rows.total, *v.shape[1:]))
            for k, v in local.items()
        }

    return place


def train_iterator(
    config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Infinite training batches {'image' f32 [B,H,W,3] in [-1,1], 'label' f32 [B,C]} as global
    arrays sharded like `sharding` on dim 0, starting at `start_step` (B = config.batch).

    With process_index/count other than JAX's (tests simulating hosts) the arrays hold only that
    process's rows.
    """
    pp = Preprocessing.from_config(config.pp)
    split = sources.open_split(config, config.pp.train)
    rows = process_rows(
        sharding, int(config.batch), (pp.crop, pp.crop, 3), process_index, process_count, "batch"
    )
    seed = int(config.get("seed", 0))
    num_classes = len(split.class_names)
    dataset = train_dataset(
        split, pp, rows, seed=seed, start_step=start_step, num_classes=num_classes
    )
    logging.info(
        "train data: %s, %d examples, rows %d..%d of batch %d, from step %d",
        split.description,
        len(split),
        rows.start,
        rows.start + rows.size,
        rows.total,
        start_step,
    )

    def indices_of_step(step: int) -> np.ndarray:
        return np.array([int(train_index(p, len(split), seed)) for p in _positions(step, rows)])

    return BatchIterator(
        dataset,
        place=_placer(sharding, rows),
        start_step=start_step,
        num_steps=None,
        indices_of_step=indices_of_step,
        split=split,
        prefetch=int(config.get("prefetch", 2)),
    )


def eval_iterator(
    config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding,
    *,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Finite eval batches {'image' f32 [B,H,W,3], 'label' i32 [B], 'mask' bool [B]} of `split`
    (default config.pp.test), B = config.batch_eval; `len()` gives the batches still to come.

    The last batch is padded with mask=False rows: summing over mask counts every example once.
    """
    pp = Preprocessing.from_config(config.pp)
    spec = config.pp.test if split is None else split
    data = sources.open_split(config, spec)
    rows = process_rows(
        sharding,
        int(config.batch_eval),
        (pp.crop, pp.crop, 3),
        process_index,
        process_count,
        "batch_eval",
    )
    dataset, num_steps = eval_dataset(data, pp, rows)

    def indices_of_step(step: int) -> np.ndarray:
        positions = _positions(step, rows)
        return positions[positions < len(data)]

    return BatchIterator(
        dataset,
        place=_placer(sharding, rows),
        start_step=0,
        num_steps=num_steps,
        indices_of_step=indices_of_step,
        split=data,
        prefetch=int(config.get("prefetch", 2)),
    )
