"""`python -m vit_jax.export --checkpoint PATH --format FORMAT --out DIR`: a model to deploy.

Reads anything `vit_jax.inference.load_model` reads (a training workdir, an Orbax checkpoint, a
published or our `.npz`, a Hugging Face directory, a timm file) and writes into the new directory
DIR an artifact that runs without vit_jax, plus `model.json` (what goes in and out, class names,
resolution, the eval preprocessing, the model config):

- `stablehlo`: `model.jax_exported`, a serialized `jax.export.Exported` with a symbolic batch
  size; `jax.export.deserialize(bytes).call(images)` with float32 [batch, res, res, 3] in [-1, 1]
  returns the logits. Lowered for the `--platforms` given (default cpu, cuda, tpu).
- `saved_model`: a TF SavedModel (jax2tf). `serving_default(images)` takes uint8
  [batch, height, width, 3] of any size and does the eval preprocessing inside (the ops of
  `vit_jax.data.preprocess`: bilinear resize, antialiased unless `--no-antialias`, central crop,
  [-1, 1]), returning `logits` and `probabilities`; `preprocessed(inputs)` takes the model's
  float32 input; `class_names()` returns them, also in `assets/class_names.txt`.
- `onnx`: `model.onnx` (jax2onnx; ONNX opset 23, `--opset 20`-`22` for older runtimes), input
  `images` float32 [batch, res, res, 3] (NHWC) in [-1, 1], output `logits`; class names (a JSON
  list) and `model.json`'s content in its `metadata_props` (`class_names`, `vit_jax`). Needs
  `pip install 'vit_jax[export]'`.

The model's parameters are constants inside each artifact. DIR appears whole or not at all: it
is built in a staging folder beside it (`.DIR.vit_jax-staging-HOST-PID-XXXXXXXX`, removed on
failure; one left by a killed export is removed by the next export to DIR) and renamed into
place. An existing DIR that is not empty is refused unless `--overwrite` and it holds an earlier
export (its `model.json`); that is replaced whole. Exit status: 0 written; 1 the conversion
failed; 2 a configuration error before any work (bad flag, unknown format, DIR exists and is not
empty, a checkpoint that is missing or does not fit, the onnx converter not installed). Errors
are one `error: ...` line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vit_jax import cli

__all__ = [
    "FORMATS",
    "METADATA_JSON",
    "ExportError",
    "describe",
    "export",
    "export_onnx",
    "export_saved_model",
    "export_stablehlo",
    "main",
]

FORMATS = ("stablehlo", "saved_model", "onnx")
METADATA_JSON = "model.json"
STABLEHLO_FILE = "model.jax_exported"
ONNX_FILE = "model.onnx"
# ONNX opsets the onnx export writes: the graph uses Gelu (an ONNX op from opset 20); 23 is
# jax2onnx 0.12's newest.
ONNX_OPSETS = range(20, 24)
ONNX_OPSET = 23
CLASS_NAMES_ASSET = "class_names.txt"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_INSTALL_HINT = "the onnx format needs jax2onnx and onnx: pip install 'vit_jax[export]'"


class ExportError(ValueError):
    """A model that cannot be exported in the asked format (names the format and why)."""


def describe(trained: Any, fmt: str, *, antialias: bool = True, platforms=None) -> dict:
    """`model.json`: what the artifact of `fmt` takes and returns, classes, preprocessing."""
    import jax

    from vit_jax.data import preprocess

    res = int(trained.crop)
    norm = preprocess.normalization(**(trained.normalization or {}))
    model_input = {
        "name": "images" if fmt == "onnx" else "inputs",
        "shape": ["batch", res, res, 3],
        "dtype": "float32",
        "range": [-1.0, 1.0] if norm == preprocess.DEFAULT_NORMALIZATION else None,
        "normalization": {k: list(v) for k, v in norm.items()},  # (pixel / 255 - mean) / std
        "layout": "NHWC",
    }
    if fmt == "saved_model":
        inputs = {
            "name": "images",
            "shape": ["batch", "height", "width", 3],
            "dtype": "uint8",
            "range": [0, 255],
            "layout": "NHWC",
        }
        outputs = ["logits", "probabilities"]
    else:
        inputs, outputs = model_input, ["logits"]
    meta = {
        "format": fmt,
        "input": inputs,
        "outputs": {name: {"shape": ["batch", len(trained.class_names)]} for name in outputs},
        "class_names": list(trained.class_names),
        "resolution": res,
        "preprocessing": {
            "resize": int(trained.resize),
            "crop": res,
            "method": "bilinear",
            "antialias": bool(antialias),
            "value_range": model_input["range"],
            "normalization": model_input["normalization"],
            "applied_inside": fmt == "saved_model",
        },
        "model": trained.model_config.to_dict(),
        "vit_jax_version": _version("vit_jax"),
        "jax_version": jax.__version__,
    }
    if fmt == "saved_model":
        meta["model_input"] = model_input  # the `preprocessed` signature's input
    if platforms and fmt != "onnx":
        meta["platforms"] = list(platforms)
    return meta


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _logits_fn(trained: Any) -> Callable:
    """images float32 [b, res, res, 3] -> float32 logits; the parameters closed over."""
    import jax.numpy as jnp

    params = trained.params

    def logits(images):
        out = trained.model.apply({"params": params}, images, train=False)[0]
        return out.astype(jnp.float32)

    return logits


def export_stablehlo(trained: Any, out: Path, *, platforms: Sequence[str]) -> list[str]:
    """Writes `model.jax_exported` (batch size symbolic); returns the file names written."""
    import jax
    import jax.numpy as jnp

    res = int(trained.crop)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    exported = jax.export.export(jax.jit(_logits_fn(trained)), platforms=tuple(platforms))(spec)
    (out / STABLEHLO_FILE).write_bytes(exported.serialize())
    return [STABLEHLO_FILE]


def export_saved_model(
    trained: Any, out: Path, *, antialias: bool = True, platforms: Sequence[str]
) -> list[str]:
    """Writes a SavedModel into `out` (signatures `serving_default`, `preprocessed`,
    `class_names`); the parameters are its variables, the forward pass one XlaCallModule op."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    from vit_jax.data import preprocess

    res, resize = int(trained.crop), int(trained.resize)
    names = list(trained.class_names)
    apply = trained.model.apply
    forward = jax2tf.convert(
        lambda p, x: apply({"params": p}, x, train=False)[0].astype("float32"),
        polymorphic_shapes=[None, f"(b, {res}, {res}, 3)"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), trained.params)
    with tempfile.TemporaryDirectory() as tmp, _stablehlo_readable_by_tensorflow():
        asset = Path(tmp) / CLASS_NAMES_ASSET
        asset.write_text("".join(f"{n}\n" for n in names))
        module.class_names_file = tf.saved_model.Asset(str(asset))

        @tf.function(
            input_signature=[tf.TensorSpec([None, res, res, 3], tf.float32)], autograph=False
        )
        def preprocessed(inputs):
            logits = forward(module.params, inputs)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], autograph=False
        )
        def serving_default(images):
            image = preprocess.eval_image(images, resize_to=resize, crop=res, antialias=antialias)
            return preprocessed(preprocess.to_model_range(image, trained.normalization))

        @tf.function(input_signature=[], autograph=False)
        def class_names():
            return {"class_names": tf.constant(names, dtype=tf.string)}

        module.serving_default, module.preprocessed = serving_default, preprocessed
        module.class_names = class_names
        signatures = {
            "serving_default": serving_default,
            "preprocessed": preprocessed,
            "class_names": class_names,
        }
        tf.saved_model.save(module, str(out), signatures=signatures)
    return ["saved_model.pb", "variables/", f"assets/{CLASS_NAMES_ASSET}"]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(version).split("."))


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow():
    """While jax2tf converts: StableHLO serialized for the StableHLO version TensorFlow's
    XlaCallModule reads, when that is older than the one jax writes.

    jax.export targets a StableHLO release about four weeks old (jax 0.12: 1.18.0); TensorFlow's
    runtime deserializes up to its own (TF 2.21: 1.13.7), so a SavedModel from jax 0.12 fails
    at its first call (`unregistered operation 'vhlo.custom_call_v2'`). jax has no public
    setting for the target, so its private serializer is swapped for one that targets TF's
    version, only in this block and only when the two differ; the portable-artifact format
    itself is StableHLO's stable one (https://openxla.org/stablehlo/compatibility).
    """
    try:
        from jax._src import xla_bridge
        from jax._src.export import _export
        from jax._src.lib import _jax
        from jax._src.lib.mlir.dialects import hlo
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

        ours = hlo.get_version_from_compatibility_requirement(
            hlo.StablehloCompatibilityRequirement.WEEK_4
        )
        theirs = tf_stablehlo.get_current_version()
        original = _export._module_to_bytecode
    except (ImportError, AttributeError):  # another jax / TF layout: serialize as jax does
        yield
        return
    if _version_tuple(ours) <= _version_tuple(theirs):
        yield
        return

    def to_bytecode(module):
        serialize_with_sdy = xla_bridge.get_backend().serialize_with_sdy
        return _jax.mlir.serialize_portable_artifact(module, theirs, serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


@contextlib.contextmanager
def _levels_kept(*names: str):
    """The named loggers (`""`: the root) with their levels restored on exit, whatever a
    converter sets within (TensorFlow's SavedModel writer leaves absl's at WARNING)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    try:
        yield loggers
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@contextlib.contextmanager
def _quiet_onnx_converter():
    """jax2onnx prints conversion notes to stdout and warns about plugins for libraries we do not
    use (and onnx_ir about shape-only helper values): within, those are dropped."""
    with _levels_kept("jax2onnx", "onnx_ir") as loggers:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _check_onnx_installed() -> None:
    try:
        with _quiet_onnx_converter():
            import jax2onnx  # noqa: F401
            import onnx  # noqa: F401
    except ImportError:
        raise ExportError(ONNX_INSTALL_HINT) from None


def export_onnx(trained: Any, out: Path, *, meta: dict, opset: int = ONNX_OPSET) -> list[str]:
    """Writes `model.onnx` (dynamic batch `batch`, ONNX `opset`), `meta` and the class names in
    its metadata_props."""
    _check_onnx_installed()
    import onnx
    from jax2onnx import to_onnx

    res = int(trained.crop)
    with _quiet_onnx_converter():
        proto = to_onnx(
            _logits_fn(trained),
            [("batch", res, res, 3)],
            model_name="vit_jax",
            opset=opset,
            input_names=["images"],
            output_names=["logits"],
        )
    onnx.helper.set_model_props(
        proto, {"class_names": json.dumps(meta["class_names"]), "vit_jax": json.dumps(meta)}
    )
    path = out / ONNX_FILE
    try:
        large = proto.ByteSize() > 2**31 - 2**26  # protobuf's 2 GiB limit, with room
    except ValueError:
        large = True
    onnx.save_model(proto, str(path), save_as_external_data=large, location=ONNX_FILE + ".data")
    return [ONNX_FILE] + ([ONNX_FILE + ".data"] if large else [])


def export(
    trained: Any,
    fmt: str,
    out: str | os.PathLike,
    *,
    antialias: bool = True,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    opset: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Exports `trained` (a `vit_jax.inference.TrainedModel`) as `fmt` into the new directory
    `out`; returns `model.json`'s content (with `files`: what was written). `opset`: the ONNX
    opset of an onnx export (`ONNX_OPSETS`, default `ONNX_OPSET`).

    The artifact is built in a staging folder beside `out` and renamed into place
    (`vit_jax.weights.files.staged_dir`), so a failed export leaves nothing behind and one that
    was killed is cleaned up by the next export to `out`. Raises ExportError for an unknown
    format, an opset that is not available, or an `out` that exists and is not empty, unless
    `overwrite` and `out` is an earlier export (it holds `model.json`): that is replaced whole.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    opset = _onnx_opset(fmt, opset)
    out = Path(out)
    check_out(out, overwrite=overwrite)
    if fmt == "onnx":
        _check_onnx_installed()
    meta = describe(trained, fmt, antialias=antialias, platforms=platforms)
    if fmt == "onnx":
        meta["opset"] = opset
    from vit_jax.weights import files

    try:
        with files.staged_dir(out, overwrite=overwrite, replaceable=_earlier_export) as staging:
            with _levels_kept("", "absl", "tensorflow"):  # the caller's logging stays as it was
                if fmt == "stablehlo":
                    written = export_stablehlo(trained, staging, platforms=platforms)
                elif fmt == "saved_model":
                    written = export_saved_model(
                        trained, staging, antialias=antialias, platforms=platforms
                    )
                else:
                    written = export_onnx(trained, staging, meta=meta, opset=opset)
            meta["files"] = [*written, METADATA_JSON]
            (staging / METADATA_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    except files.DestinationExistsError as e:  # `out` changed while the export ran
        raise ExportError(_out_problem(e)) from None
    return meta


def _onnx_opset(fmt: str, opset: int | None) -> int | None:
    """The opset an export of `fmt` writes (None: not onnx); refuses one it cannot write."""
    if fmt != "onnx":
        if opset is not None:
            raise ExportError(f"--opset {opset}: an opset applies to --format onnx only")
        return None
    if opset is None:
        return ONNX_OPSET
    if opset not in ONNX_OPSETS:
        raise ExportError(
            f"--opset {opset}: the onnx export writes opsets {ONNX_OPSETS[0]} to "
            f"{ONNX_OPSETS[-1]} (the graph uses Gelu, an ONNX op from opset 20)"
        )
    return opset


def _earlier_export(out: Path) -> str | None:
    """Why `--overwrite` must not replace the folder `out`; None for an earlier export (its
    `model.json` names one of FORMATS), the only folder it replaces."""
    meta = out / METADATA_JSON
    try:
        fmt = meta.is_file() and json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt not in FORMATS:
        return f"is not an earlier export (no {METADATA_JSON} naming a format); not replaced"
    return None


def _out_problem(e: Any) -> str:
    """The one line for a `DestinationExistsError` about `--out`."""
    hint = "; give a new or empty directory"
    hint += ", or pass --overwrite to replace it" if e.overwritable else ""
    return f"--out {e.path} {e.reason}{hint}"


def check_out(out: Path, *, overwrite: bool = False) -> None:
    """Refuses an `out` that is a file or a non-empty directory, unless `overwrite` and it is
    an earlier export (nothing else is ever replaced)."""
    from vit_jax.weights import files  # here: `--help` and flag errors need no jax

    try:
        files.check_dir(out, overwrite=overwrite, replaceable=_earlier_export)
    except files.DestinationExistsError as e:
        raise ExportError(_out_problem(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m vit_jax.export", description=__doc__, weights=True)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out whole when it holds an earlier export (its model.json)",
    )
    p.add_argument(
        "--no-antialias",
        dest="antialias",
        action="store_false",
        default=None,
        help="saved_model: plain bilinear downscaling (the reference pipeline's) in serving "
        "(default: as the run was evaluated, `pp.antialias`; antialiased for weights files)",
    )
    p.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help="stablehlo / saved_model: platforms to lower for (comma-separated)",
    )
    p.add_argument(
        "--opset",
        type=int,
        help=f"onnx: the ONNX opset, {ONNX_OPSETS[0]}-{ONNX_OPSETS[-1]} (default {ONNX_OPSET})",
    )
    return p


@cli.reports_failures
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
    out = Path(args.out)
    try:
        check_out(out, overwrite=args.overwrite)
        _onnx_opset(args.format, args.opset)
        if args.format == "onnx":
            _check_onnx_installed()
    except ExportError as e:
        return cli.fail(e, cli.EXIT_CONFIG)
    trained = cli.load_model(args)
    try:
        antialias = trained.antialias if args.antialias is None else args.antialias
        meta = export(
            trained,
            args.format,
            out,
            antialias=antialias,
            platforms=platforms,
            opset=args.opset,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        return cli.fail(e, cli.EXIT_CONFIG)
    except Exception as e:  # a converter's failure: one line, not a traceback
        return cli.fail(f"{args.format} export of {args.checkpoint} failed: {e}", cli.EXIT_RUNTIME)
    shape = meta["input"]["shape"]
    print(
        f"wrote {out} ({args.format}: {', '.join(meta['files'])}; input {meta['input']['dtype']}"
        f" [{', '.join(map(str, shape))}], {len(meta['class_names'])} classes)"
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
