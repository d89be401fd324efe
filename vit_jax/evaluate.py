"""`python -m vit_jax.evaluate --checkpoint PATH --config=configs/vit.py:b16,imagenet2012 [--json]`.

Runs the trainer's eval pipeline (resize, central crop, padded and masked batches) over the
config's test split (`pp.test`) and reports top-1 / top-5 accuracy and loss. PATH is anything
`vit_jax.inference.load_model` reads. What the checkpoint records wins: its model config, its
image size (the config's `pp.crop` / `pp.resize` are used only when the crop agrees) and its
classes. The config's model (`config.model`) is used only for an `.npz` that does not record
its model (no JSON sidecar).

The checkpoint's classes must be the test split's: a different count, or recorded class names
that differ from the dataset's, is an error unless `--allow-class-mismatch` is passed.

An image-folder dataset's test files are checked from their headers before evaluating: one over
`--max-pixels` (default 64 million, e.g. 8000 x 8000) is an error, never decoded.

Exit status: 0 evaluated; 1 the evaluation failed while reading the test set (e.g. a corrupt
image); 2 a configuration error before evaluating (bad or missing flag, a config file that does
not load, a checkpoint that is missing, damaged or does not fit the model, an unknown model or
dataset, classes that differ from the dataset's, a test image over `--max-pixels`).
"""

from __future__ import annotations

import json
import sys

from vit_jax import cli


class ClassMismatchError(ValueError):
    """The checkpoint's classes are not the dataset's."""


def check_classes(
    checkpoint: str, num_classes: int | None, recorded: list[str] | None, dataset: str, names
) -> None:
    """Raises ClassMismatchError (one line) unless the checkpoint classifies `names`."""
    names = [str(n) for n in names]
    hint = "; pass --allow-class-mismatch to evaluate anyway"
    if not num_classes:
        raise ClassMismatchError(f"{checkpoint}: the model has no classification head")
    if num_classes != len(names):
        raise ClassMismatchError(
            f"{checkpoint}: the checkpoint predicts {num_classes} classes, the test split of "
            f"{dataset} has {len(names)}{hint}"
        )
    if recorded and list(recorded) != names:
        i = next(i for i, (a, b) in enumerate(zip(recorded, names, strict=True)) if a != b)
        raise ClassMismatchError(
            f"{checkpoint}: class {i} is {recorded[i]!r} in the checkpoint, {names[i]!r} in "
            f"{dataset}{hint}"
        )


def _image_files(split) -> list[str]:
    """The files of a split read from image files (an image folder), else []."""
    from vit_jax.data import splits

    base = split
    while isinstance(base, splits.ClassSubsetSplit):
        base = base.base
    if not isinstance(base, splits.FileSplit):
        return []
    return [split.name_of(i) for i in range(len(split))]


def evaluate_checkpoint(
    checkpoint: str,
    config,
    *,
    allow_class_mismatch: bool = False,
    max_pixels: int | None = None,
) -> dict[str, float]:
    """top-1 / top-5 accuracy, loss and example count of `checkpoint` on config's test split.

    `max_pixels` (None: `image_header.DEFAULT_MAX_PIXELS`) caps an image folder's test images,
    read from their headers before anything is decoded. Raises ValueError (CheckpointError,
    DataError, ClassMismatchError, ImageTooLargeError) for configuration errors found before
    evaluating.
    """
    import jax
    from absl import logging

    from vit_jax import data, inference, sharding, trainer
    from vit_jax.data import image_header, sources

    trained = inference.load_model(
        checkpoint, default_model=config.get("model") or config.get("model_name")
    )
    split = sources.open_split(config, config.pp.test)
    image_header.check_files(_image_files(split), max_pixels or image_header.DEFAULT_MAX_PIXELS)
    try:
        check_classes(
            checkpoint,
            trained.model.num_classes,
            trained.recorded_class_names,
            sources.dataset_name(config),
            split.class_names,
        )
    except ClassMismatchError as e:
        if not allow_class_mismatch:
            raise
        logging.warning("%s (evaluating anyway: --allow-class-mismatch)", e)
    config = config.copy_and_resolve_references()
    if int(config.pp.crop) != trained.crop:
        logging.warning(
            "evaluating at the checkpoint's image size %d, not config.pp.crop=%d",
            trained.crop,
            config.pp.crop,
        )
        config.pp.resize = round(int(config.pp.resize) * trained.crop / int(config.pp.crop))
        config.pp.crop = trained.crop
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    param_sh = sharding.tree_shardings(trained.params, mesh)
    params = sharding.put_sharded(trained.params, param_sh)
    batch_sh = sharding.batch_sharding(mesh)
    eval_step = jax.jit(
        trainer.make_eval_step(trained.model),
        in_shardings=(param_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    batches = data.eval_iterator(config, batch_sh)
    try:
        return trainer.evaluate(eval_step, params, batches)
    except (ValueError, OSError) as e:
        raise EvaluationError(str(e)) from e


class EvaluationError(RuntimeError):
    """The evaluation failed while running (e.g. an unreadable test image)."""


def _flags(argv: list[str]):
    """Parses argv into a fresh FlagValues (so main can run more than once in a process)."""
    from absl import flags
    from ml_collections import config_flags

    from vit_jax.data import image_header

    argv = cli.config_argv(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config with the data settings.", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string(
        "checkpoint", None, "Workdir, checkpoint, .npz or converted file.", flag_values=fv
    )
    flags.DEFINE_bool("json", False, "Print one JSON object.", flag_values=fv)
    flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP, flag_values=fv)
    flags.DEFINE_bool(
        "allow-class-mismatch",
        False,
        "Evaluate even when the checkpoint's classes differ from the dataset's.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max-pixels",
        image_header.DEFAULT_MAX_PIXELS,
        "Largest test image (image folders), read from its header before decoding.",
        lower_bound=1,
        flag_values=fv,
    )
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
        return None
    rest = fv(argv)
    if len(rest) > 1:
        raise ValueError(f"unexpected argument {rest[1]!r}")
    return fv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else ["vit_jax.evaluate", *argv]
    try:
        fv = _flags(argv)
        if fv is None:  # --help
            return cli.EXIT_OK
        config = fv.config
    except Exception as e:  # noqa: BLE001 (flag and config-file errors: one line, no traceback)
        try:
            message = cli.config_error(cli.config_argv(argv), e)
        except FileNotFoundError as missing:  # not a file, nor a packaged recipe
            message = str(missing)
        return cli.fail(f"{message} (see python -m vit_jax.evaluate --help)", cli.EXIT_CONFIG)
    checkpoint = fv.checkpoint
    if config is None or not checkpoint:
        return cli.fail("--checkpoint and --config are required", cli.EXIT_CONFIG)
    try:
        results = evaluate_checkpoint(
            checkpoint,
            config,
            allow_class_mismatch=fv["allow-class-mismatch"].value,
            max_pixels=fv["max-pixels"].value,
        )
    except EvaluationError as e:
        return cli.fail(e, cli.EXIT_RUNTIME)
    except (ValueError, OSError) as e:  # CheckpointError, DataError (ImageTooLargeError), ...
        return cli.fail(e, cli.EXIT_CONFIG)
    if fv.json:
        print(json.dumps({"checkpoint": checkpoint, **results}))
    else:
        print(
            f"{checkpoint}: top-1 {results['test_accuracy']:.4f}, top-5 "
            f"{results['test_top5_accuracy']:.4f}, loss {results['test_loss']:.4f} "
            f"({results['test_examples']} examples)"
        )
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
