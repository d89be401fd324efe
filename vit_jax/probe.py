"""`python -m vit_jax.probe --checkpoint PATH [--dataset digits] [--method knn,linear] [--json]`.

Frozen features of any checkpoint (anything `vit_jax.inference.load_model` reads: a training
workdir, a published or converted `.npz`, a transformers dir, a timm file) on the train and test
splits of any dataset the trainer reads (digits, an image folder, a tfds name), extracted with
the trainer's eval preprocessing (resize, central crop), and the test accuracy of two probes:

- `knn`: k-nearest neighbours by cosine similarity among the train features. Votes are weighted
  by exp(similarity / T) as in DINO's k-NN evaluation (k=20, T=0.07 by default);
  `--knn-temperature 0` gives a plain majority vote (a tie goes to the smallest class index).
- `linear`: ridge regression onto one-hot targets, closed form, with an unpenalised bias (the
  features and targets are centred). The regularisation is lambda = alpha * (mean eigenvalue of
  the train features' scatter matrix), alpha chosen from `ALPHAS` by the accuracy on a held-out
  fifth of train (every 5th example), then refitted on all of train.

Features (`--features`): `pooled` is the model's representation before the head
(`out['pre_logits']`: class token, GAP or MAP output; a DeiT distillation model's two tokens
averaged); `tokens` is the per-token output (`out['encoded']`) whose patch tokens' mean (class /
distillation tokens excluded) the probes use. `--out FILE.npz` saves train/test features and
labels (tokens: all of them, [N, tokens, width]); an existing file is never overwritten.
When the checkpoint's head predicts the dataset's classes, its own test accuracy is reported
too (`head`), for comparison.

Exit status: 0 probed; 1 a failure while reading the data (e.g. an unreadable image) or writing
`--out`; 2 a configuration error before any work (bad or missing flag, a checkpoint that is
missing or does not fit its model, an unknown dataset, an `--out` path that exists).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax import cli
from vit_jax import features as feature_lib
from vit_jax.features import FEATURES, Features, knn_predict

__all__ = [
    "ALPHAS",
    "METHODS",
    "Features",
    "ProbeRuntimeError",
    "extract",
    "knn_predict",
    "main",
    "probe_config",
    "probe_inputs",
    "ridge_fit",
    "ridge_path",
    "ridge_probe",
    "run_probe",
]

METHODS = ("knn", "linear")
# Ridge strengths relative to the mean eigenvalue of the centred train scatter matrix.
ALPHAS: tuple[float, ...] = tuple(10.0**e for e in range(-6, 3))
HELD_OUT_EVERY = 5  # train examples i with i % 5 == 4 choose alpha
PP_KEYS = ("train", "test", "resize", "crop")


class ProbeRuntimeError(RuntimeError):
    """Reading the data failed while extracting features (e.g. an unreadable image)."""


# ----------------------------------------------------------------------------- configuration


def probe_config(
    dataset: str = "digits",
    pp: dict[str, str] | None = None,
    *,
    batch: int = 256,
    data_dir: str | None = None,
):
    """The trainer config whose data layer reads `dataset` for probing.

    Splits default to `train` and the dataset's test split (a reference preset's, e.g.
    ImageNet's `validation`); `pp` overrides `train`, `test`, `resize`, `crop`.
    """
    from vit_jax import configs

    config = configs.get_config()
    preset = configs.DATASET_PRESETS.get(dataset, {})
    config.dataset = dataset
    config.pp.train, config.pp.test = "train", preset.get("test", "test")
    config.pp.flip = False
    config.batch_eval = int(batch)
    if data_dir:
        config.tfds_data_dir = data_dir
    for key, value in (pp or {}).items():
        if key not in PP_KEYS:
            raise ValueError(f"--pp {key}=...: unknown key; known: {', '.join(PP_KEYS)}")
        config.pp[key] = int(value) if key in ("resize", "crop") else str(value)
    return config


# ----------------------------------------------------------------------------- features


def extract(trained, config, split: str, *, features: str = "pooled") -> Features:
    """Features of every example of `split` (config's dataset, eval preprocessing at the
    checkpoint's resize / crop), in split order; batched and jitted (`config.batch_eval`).

    Raises ProbeRuntimeError when reading the data fails mid-way.
    """
    import jax

    from vit_jax import data, sharding

    if features not in FEATURES:
        raise ValueError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    param_sh = sharding.tree_shardings(trained.params, mesh)
    params = sharding.put_sharded(trained.params, param_sh)
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        feature_lib.feature_step(trained.model, features),
        in_shardings=(param_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    batches = data.eval_iterator(config, batch_sh, split=split)  # config errors: raised here
    try:
        return feature_lib.extract(step, params, batches, split)
    except (ValueError, OSError) as e:  # BadImageError, a file gone mid-way
        raise ProbeRuntimeError(f"{split}: {e}") from e


def probe_inputs(feats: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """[N, D] inputs of the probes: pooled features as they are; tokens: the patch tokens' mean."""
    if feats.ndim == 2:
        return feats
    return feats[:, num_prefix_tokens:].mean(axis=1)


# ----------------------------------------------------------------------------- probes


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(W [D, C], b [C]) minimising |(x - mean) W + mean_y - y|^2 + lam |W|^2 (float64).

    The bias is unpenalised: x and y are centred, b = mean_y - mean_x W.
    """
    return ridge_path(x, y, [lam])[0]


def ridge_path(
    x: np.ndarray, y: np.ndarray, lams: Sequence[float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`ridge_fit` for each of `lams`, sharing one eigendecomposition of the scatter matrix:
    W = V diag(1 / (e + lam)) V^T xc^T y for xc^T xc = V diag(e) V^T."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    xc = x - mean_x
    eigenvalues, vectors = np.linalg.eigh(xc.T @ xc)
    projected = vectors.T @ (xc.T @ (y - mean_y))
    fits = []
    for lam in lams:
        w = vectors @ (projected / (np.maximum(eigenvalues, 0.0) + lam)[:, None])
        fits.append((w, mean_y - mean_x @ w))
    return fits


def _scale(x: np.ndarray) -> float:
    """Mean eigenvalue of the centred scatter matrix: trace / D (alpha's unit)."""
    xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
    return float(np.sum(xc * xc) / max(x.shape[1], 1)) or 1.0


def ridge_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    alphas: Sequence[float] = ALPHAS,
) -> dict[str, Any]:
    """Ridge probe: alpha chosen on every `HELD_OUT_EVERY`-th train example, refit on all.

    Returns {'predictions', 'alpha', 'lambda', 'heldout_accuracy'}; ties between alphas go to
    the larger (more regularised) one.
    """
    onehot = np.eye(num_classes)[train_labels]
    held = np.arange(len(train_labels)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    fit_x, fit_y = train_features[~held], onehot[~held]
    best = (-1.0, 0.0)
    if held.any() and (~held).any():
        alphas = sorted(alphas)
        fits = ridge_path(fit_x, fit_y, [a * _scale(fit_x) for a in alphas])
        for alpha, (w, b) in zip(alphas, fits, strict=True):
            acc = float(np.mean(np.argmax(train_features[held] @ w + b, -1) == train_labels[held]))
            if acc >= best[0]:
                best = (acc, alpha)
    else:  # too few examples to hold any out: the middle of the grid
        best = (float("nan"), sorted(alphas)[len(alphas) // 2])
    lam = best[1] * _scale(train_features)
    w, b = ridge_fit(train_features, onehot, lam)
    return {
        "predictions": np.argmax(test_features @ w + b, axis=-1),
        "alpha": best[1],
        "lambda": lam,
        "heldout_accuracy": best[0],
    }


def run_probe(
    trained,
    config,
    *,
    methods: Sequence[str] = METHODS,
    k: int = 20,
    temperature: float = 0.07,
    features: str = "pooled",
    out: str | None = None,
) -> dict[str, Any]:
    """Extracts train/test features of `trained` (an `inference.TrainedModel`) on config's
    dataset, runs the probes in `methods`, optionally saves the features; returns the results.
    """
    from absl import logging

    from vit_jax import models
    from vit_jax.data import sources

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--method takes {', '.join(METHODS)} (comma-separated), got {methods}")
    class_names = [str(c) for c in _open_splits(config).class_names]
    num_classes = len(class_names)
    splits = {}
    for name in ("train", "test"):
        start = time.monotonic()
        splits[name] = extract(trained, config, config.pp[name], features=features)
        f = splits[name].features
        logging.info(
            "%s features: %d examples of %s, shape %s, %.1f s",
            name,
            len(f),
            config.pp[name],
            "x".join(map(str, f.shape[1:])),
            time.monotonic() - start,
        )
    prefix = models.num_prefix_tokens(trained.model_config)
    x_train = probe_inputs(splits["train"].features, prefix)
    x_test = probe_inputs(splits["test"].features, prefix)
    y_train, y_test = splits["train"].labels, splits["test"].labels
    results: dict[str, Any] = {
        "dataset": sources.dataset_name(config),
        "train_split": str(config.pp.train),
        "test_split": str(config.pp.test),
        "num_train": len(y_train),
        "num_test": len(y_test),
        "features": features,
        "dim": int(x_train.shape[-1]),
        "image_size": int(config.pp.crop),
    }
    results.update(_probes(methods, x_train, y_train, x_test, y_test, k, temperature, num_classes))
    if trained.model.num_classes == num_classes and trained.recorded_class_names in (
        None,
        class_names,
    ):
        results["head"] = {"accuracy": splits["test"].head_correct / max(len(y_test), 1)}
    if out:
        _save(out, splits, class_names, results)
        logging.info("features saved to %s", out)
    return results


def _open_splits(config):
    """config's train split, after checking that train and test exist and are not empty (an
    unknown or empty split fails before any work)."""
    from vit_jax.data import sources

    splits = {name: sources.open_split(config, config.pp[name]) for name in ("train", "test")}
    for name, split in splits.items():
        if len(split) == 0:
            raise ValueError(
                f"{sources.dataset_name(config)} split {config.pp[name]!r} (--pp {name}=...) "
                "has no examples; a probe needs at least one to "
                + ("fit" if name == "train" else "measure")
            )
    return splits["train"]


def _probes(methods, x_train, y_train, x_test, y_test, k, temperature, num_classes) -> dict:
    """{'knn': {...}, 'linear': {...}}: each probe in `methods`, with its test accuracy."""
    from absl import logging

    results: dict[str, Any] = {}
    if "knn" in methods:
        pred = knn_predict(
            x_train, y_train, x_test, k=k, temperature=temperature, num_classes=num_classes
        )
        acc = float(np.mean(pred == y_test))
        results["knn"] = {"k": min(k, len(y_train)), "temperature": temperature, "accuracy": acc}
        logging.info("k-NN (k=%d, T=%g): test accuracy %.4f", k, temperature, acc)
    if "linear" in methods:
        ridge = ridge_probe(x_train, y_train, x_test, num_classes)
        acc = float(np.mean(ridge.pop("predictions") == y_test))
        results["linear"] = {"method": "ridge", **ridge, "accuracy": acc}
        logging.info(
            "linear (ridge, alpha=%g chosen on held-out train): test accuracy %.4f",
            ridge["alpha"],
            acc,
        )
    return results


def _save(path: str, splits: dict[str, Features], class_names: list[str], results: dict) -> None:
    """Writes the features as .npz; 'xb' never overwrites (a file that appeared meanwhile)."""
    try:
        with open(path, "xb") as f:
            np.savez(
                f,
                train_features=splits["train"].features,
                train_labels=splits["train"].labels,
                test_features=splits["test"].features,
                test_labels=splits["test"].labels,
                class_names=np.array(class_names),
                meta=np.array(json.dumps(results)),
            )
    except OSError as e:
        raise ProbeRuntimeError(f"--out {path}: cannot write ({e.strerror or e})") from e


# ----------------------------------------------------------------------------- CLI


def _parse_pp(values: list[str]) -> dict[str, str]:
    pp = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or key not in PP_KEYS or not value:
            raise ValueError(f"--pp {item!r}: expected KEY=VALUE with KEY in {', '.join(PP_KEYS)}")
        if key in ("resize", "crop") and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"--pp {item!r}: {key} must be a positive integer")
        pp[key] = value
    return pp


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m vit_jax.probe", description=__doc__, weights=True)
    p.add_argument("--dataset", default="digits", help="digits, an image folder or a tfds name")
    p.add_argument("--data-dir", help="tfds data dir (config.tfds_data_dir)")
    p.add_argument(
        "--pp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="split / preprocessing override: train=SPLIT, test=SPLIT, resize=N, crop=N "
        "(crop runs the model at that size); repeatable",
    )
    p.add_argument("--method", default="knn,linear", help="comma-separated: knn, linear")
    p.add_argument("--k", type=cli.positive_int, default=20, help="neighbours of the k-NN probe")
    p.add_argument(
        "--knn-temperature",
        type=float,
        default=0.07,
        help="vote weight exp(sim / T) as in DINO; 0: plain majority vote",
    )
    p.add_argument("--features", choices=FEATURES, default="pooled")
    p.add_argument("--batch", type=cli.positive_int, default=256, help="images per forward pass")
    p.add_argument("--out", help="save features and labels to this .npz (never overwritten)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def _as_evaluated(config, trained, pp: dict[str, str]) -> None:
    """config.pp as `trained` was evaluated: its crop, resize (unless `--pp resize=`), antialias
    and input normalisation."""
    config.pp.crop = trained.crop
    config.pp.resize = int(pp.get("resize", trained.resize))
    config.pp.antialias = trained.antialias
    if trained.normalization:
        config.pp.mean = tuple(trained.normalization["mean"])
        config.pp.std = tuple(trained.normalization["std"])


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--method takes {', '.join(METHODS)} (comma-separated), got {args.method!r}")
    if args.knn_temperature < 0:
        p.error(f"--knn-temperature must be at least 0, got {args.knn_temperature:g}")
    if args.out and os.path.exists(args.out):
        return cli.fail(f"--out {args.out} exists; choose another path (never overwritten)")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        return cli.fail(f"--out {args.out}: no such directory")
    try:
        pp = _parse_pp(args.pp)
    except ValueError as e:
        p.error(str(e))
    if args.resolution and "crop" in pp and int(pp["crop"]) != args.resolution:
        p.error(f"--resolution {args.resolution} and --pp crop={pp['crop']} disagree")

    from absl import logging

    from vit_jax import inference

    try:
        config = probe_config(args.dataset, pp, batch=args.batch, data_dir=args.data_dir)
        resolution = args.resolution or (int(pp["crop"]) if "crop" in pp else None)
        trained = inference.load_model(args.checkpoint, model=args.model, resolution=resolution)
        _as_evaluated(config, trained, pp)
        logging.info(
            "model %s from %s: %dx%d input, eval resize %d",
            trained.model_config.get("name") or "?",
            args.checkpoint,
            trained.crop,
            trained.crop,
            config.pp.resize,
        )
        results = run_probe(
            trained,
            config,
            methods=methods,
            k=args.k,
            temperature=args.knn_temperature,
            features=args.features,
            out=args.out,
        )
    except ProbeRuntimeError as e:
        return cli.fail(e, cli.EXIT_RUNTIME)
    except (ValueError, OSError) as e:  # CheckpointError, DataError, bad split names
        return cli.fail(e, cli.EXIT_CONFIG)
    results = {"checkpoint": args.checkpoint, **results}
    if args.json:
        print(json.dumps(results))
    else:
        print(_summary(results))
    return cli.EXIT_OK


def _summary(r: dict[str, Any]) -> str:
    parts = []
    if "knn" in r:
        parts.append(f"k-NN (k={r['knn']['k']}) {r['knn']['accuracy']:.4f}")
    if "linear" in r:
        parts.append(
            f"linear (ridge, alpha={r['linear']['alpha']:g}) {r['linear']['accuracy']:.4f}"
        )
    if "head" in r:
        parts.append(f"own head {r['head']['accuracy']:.4f}")
    return (
        f"{r['checkpoint']}: {', '.join(parts)} ({r['num_test']} test / {r['num_train']} train "
        f"examples of {r['dataset']}, {r['dim']}-dim {r['features']} features)"
    )


if __name__ == "__main__":
    sys.exit(cli.run(main))
