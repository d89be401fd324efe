"""`python -m vit_jax.evaluate --checkpoint PATH --config=configs/vit.py:b16,imagenet2012 [--json]`.

Flags: `--checkpoint`, `--model`, `--resolution`, `--verbose` as in every CLI that reads
weights; `--config` (the trainer's config files, `--config.KEY=VALUE` overrides, parsed by
ml_collections as in train).

Runs the trainer's classification evaluator (`vit_jax.evaluators`: resize, central crop, padded
and masked batches) over the config's test split (`pp.test`) and reports top-1 / top-5 accuracy
and loss. PATH is anything `vit_jax.inference.load_model` reads. What the checkpoint records
wins: its model config, its image size (the config's `pp.crop` / `pp.resize` are used only when
the crop agrees) and its classes. The config's model (`config.model`) is used only for an `.npz`
that does not record its model (no JSON sidecar).

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

import argparse
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
    model: str | None = None,
    resolution: int | None = None,
    allow_class_mismatch: bool = False,
    max_pixels: int | None = None,
) -> dict[str, float]:
    """top-1 / top-5 accuracy, loss and example count of `checkpoint` on config's test split.

    `model` (a zoo name) and `resolution` as in `inference.load_model`; without `model` an
    `.npz` that records none is read as the config's model.

    `max_pixels` (None: `image_header.DEFAULT_MAX_PIXELS`) caps an image folder's test images,
    read from their headers before anything is decoded. Raises ValueError (CheckpointError,
    DataError, ClassMismatchError, ImageTooLargeError) for configuration errors found before
    evaluating.
    """
    from absl import logging

    from vit_jax import evaluators, inference, sharding
    from vit_jax.data import image_header, sources

    trained = inference.load_model(
        checkpoint,
        model=model,
        default_model=config.get("model") or config.get("model_name"),
        resolution=resolution,
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
    config = _at_size(config, trained.crop, "--resolution" if resolution else None)
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    param_sh = sharding.tree_shardings(trained.params, mesh)
    params = sharding.put_sharded(trained.params, param_sh)
    evaluator = evaluators.ClassificationEvaluator(trained.model, config, mesh, param_sh)
    batches = evaluator.batches()
    try:
        return evaluator.measure(params, batches)
    except (ValueError, OSError) as e:
        raise EvaluationError(str(e)) from e


def _at_size(config, crop: int, why: str | None):
    """config (resolved, a copy) evaluating at `crop`, its resize scaled alike."""
    from absl import logging

    config = config.copy_and_resolve_references()
    if int(config.pp.crop) != crop:
        logging.warning(
            "evaluating at %s %d, not config.pp.crop=%d",
            why or "the checkpoint's image size",
            crop,
            config.pp.crop,
        )
        config.pp.resize = round(int(config.pp.resize) * crop / int(config.pp.crop))
        config.pp.crop = crop
    return config


class EvaluationError(RuntimeError):
    """The evaluation failed while running (e.g. an unreadable test image)."""


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m vit_jax.evaluate", description=__doc__, weights=True, max_pixels=True
    )
    p.add_argument(
        "--config",
        metavar="FILE[:ARG]",
        help="the trainer's config with the data settings (a file, or a packaged recipe: "
        "configs/NAME.py[:ARG]); --config.KEY=VALUE overrides one of its keys",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="evaluate even when the checkpoint's classes differ from the dataset's",
    )
    return p


def _flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The shared flags (argparse) and the `--config.KEY[=VALUE]` overrides, in order."""
    p = _parser()
    args, rest = p.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        if not rest[i].startswith("--config."):
            p.error(f"unrecognized arguments: {' '.join(rest[i:])}")
        overrides.append(rest[i])
        if "=" not in rest[i] and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            overrides.append(rest[i + 1])  # `--config.KEY VALUE`
            i += 1
        i += 1
    return args, overrides


def _config(spec: str, overrides: list[str]):
    """The config `--config=spec` names with `overrides` applied (absl / ml_collections, as in
    train), locked. Raises what they raise, FileNotFoundError for an unknown recipe."""
    from absl import flags
    from ml_collections import config_flags

    argv = cli.config_argv(["vit_jax.evaluate", f"--config={spec}", *overrides])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config with the data settings.", flag_values=fv, sys_argv=argv
    )
    fv(argv)
    return fv.config


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = _flags(argv)
    except SystemExit as e:  # a usage error (one line, printed) or --help
        return e.code
    if not args.config:
        return cli.fail("--checkpoint and --config are required", cli.EXIT_CONFIG)
    try:
        config = _config(args.config, overrides)
    except Exception as e:  # noqa: BLE001 (flag and config-file errors: one line, no traceback)
        try:
            argv = cli.config_argv(["vit_jax.evaluate", f"--config={args.config}", *overrides])
            message = cli.config_error(argv, e)
        except FileNotFoundError as missing:  # not a file, nor a packaged recipe
            message = str(missing)
        return cli.fail(f"{message} (see python -m vit_jax.evaluate --help)", cli.EXIT_CONFIG)
    checkpoint = args.checkpoint
    try:
        results = evaluate_checkpoint(
            checkpoint,
            config,
            model=args.model,
            resolution=args.resolution,
            allow_class_mismatch=args.allow_class_mismatch,
            max_pixels=args.max_pixels,
        )
    except EvaluationError as e:
        return cli.fail(e, cli.EXIT_RUNTIME)
    except (ValueError, OSError) as e:  # CheckpointError, DataError (ImageTooLargeError), ...
        return cli.fail(e, cli.EXIT_CONFIG)
    if args.json:
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
