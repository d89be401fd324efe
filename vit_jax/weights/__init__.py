"""The weights layer: every checkpoint format read and written through one door each way.

    params, metadata = weights.open(path)            # any format below
    params = weights.fit(params, metadata, model_config, target, ...)   # to a model
    weights.save(params, metadata, dst)              # the format dst names

Formats (`format_of`): a trainer run (`run`: a workdir, its `checkpoints/` or one step
directory; `vit_jax.weights.run`), our / the published `.npz` in every variant in the wild
(`npz`, with a JSON sidecar; `vit_jax.weights.npz`), a Hugging Face transformers directory
(`hf`) and a timm state dict (`timm`: `.safetensors`, or weights-only `.bin` / `.pth` / `.pt`
read without unpickling; or a timm hub folder, whose `config.json` names an `architecture`).
Remote files are cached locally (`vit_jax.weights.cache`).

`metadata` is a dict: `format`, `model` (a model config dict, or None when the file does not say),
`class_names`, `image_size` ([h, w] the position embeddings were made for), `normalization`
(`{'mean', 'std'}` of the input, `vit_jax.weights.normalization`), for a run's checkpoints and
`final.npz` `eval_preprocessing` (`{'resize', 'crop', 'antialias'}` the run was evaluated with; kept
by `save` into `.npz` sidecars) and, for a run, `step`. Modules: `errors` and `tree` (leaves),
`files` (no odd file opened, no destination clobbered), `cache`, `npz`, `run`, `pytorch` (file
readers/writers), `table` (the key engine: key tables run both ways), `options` (capability
tables: which of our options a format expresses), `codec` (one write path and one read path for
every PyTorch format), `hf` and `timm` (their tables and what the tables cannot say), `facts`,
`fit`, `names`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from vit_jax import models
from vit_jax.weights import files, hf, hf_common, normalization, npz, run, timm
from vit_jax.weights.cache import is_remote
from vit_jax.weights.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConversionError,
    mismatch_report,
)
from vit_jax.weights.facts import Converted
from vit_jax.weights.files import DestinationExistsError
from vit_jax.weights.fit import fit, resample_posemb, token_grid
from vit_jax.weights.tree import flatten, unflatten

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConversionError",
    "DestinationExistsError",
    "FORMATS",
    "check_destination",
    "fit",
    "flatten",
    "format_of",
    "format_to_write",
    "mismatch_report",
    "open",
    "resample_posemb",
    "save",
    "token_grid",
    "unflatten",
]

FORMATS = ("run", "npz", "hf", "timm")
TORCH_FILES = (".safetensors", ".bin", ".pth", ".pt")
_RUN_MARKERS = (run.CHECKPOINTS, run.METRICS_JSONL)


def format_of(path: str | os.PathLike) -> str:
    """Which reader `path` needs: 'run', 'npz', 'hf' or 'timm' (decided here and only here)."""
    p = str(path)
    if p.endswith(TORCH_FILES):
        return "timm"
    if p.endswith(".npz") or is_remote(p):
        return "npz"
    local = epath.Path(p)
    if not local.is_dir():
        return "npz"
    if run.is_trained(local) or any((local / m).exists() for m in _RUN_MARKERS):
        return "run"
    if timm.is_hub_dir(local):
        return "timm"
    return "hf"


def _metadata(fmt: str, converted: Converted) -> dict[str, Any]:
    return {"format": fmt, **converted.metadata()}


def _square_image_size(params: Mapping[str, Any], config: Any) -> list[int] | None:
    """The square image size the stored tokens were made for: the position table's rows after
    the family's prefix tokens (or, without one, the rows of the family's `tokens_param`)."""
    flat = flatten(models.unstack_layers(params))
    posemb = flat.get(npz.POSEMB_KEY)
    if posemb is not None:
        tokens = posemb.shape[1] - models.num_posemb_prefix_tokens(config)
    else:
        key = models.get_family(config.model_type).tokens_param
        kernel = None if key is None else flat.get(key)
        tokens = None if kernel is None else kernel.shape[0]
    if not tokens or math.isqrt(tokens) ** 2 != tokens:
        return None
    sh, sw = models.stride(config)
    side = math.isqrt(tokens)
    return [side * sh, side * sw]


def _open_npz(
    path: str, model: Any, default_model: Any, image_size: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    if not is_remote(path) and not epath.Path(path).exists() and epath.Path(f"{path}.npz").exists():
        path = f"{path}.npz"
    params = npz.load(path)
    meta: dict[str, Any] = {"format": "npz", **npz.read_metadata(path)}
    if model is None and not meta.get("model"):
        model = default_model
    if model is not None:
        meta["model"] = models.get_config(model).to_dict()
    if meta.get("model"):  # complete, checked, read as the version that wrote it did
        meta["model"] = models.stored_config(meta["model"]).to_dict()
    size = image_size or meta.get("image_size")
    if not size and meta.get("model"):
        size = _square_image_size(params, models.get_config(meta["model"]))
    meta["image_size"] = _pair(size)
    meta.setdefault("class_names", None)
    if meta["image_size"] and meta.get("model") and npz.is_big_vision(path):
        meta["model"] = _native_grid(meta["model"], meta["image_size"])
    return params, meta


def _native_grid(model: dict[str, Any], image_size: list[int]) -> dict[str, Any]:
    """A big_vision file's model records its learned table's native grid, so it runs at any
    size divisible by the patch, resampled as big_vision's `resample_posemb` does."""
    config = models.get_config(model)
    if config.get("posemb") != "learn" or config.get("posemb_grid") is not None:
        return model
    grid = models.token_grid(config, tuple(image_size))
    return models.get_config(
        config, posemb_grid=grid, posemb_resample="linear_align_corners"
    ).to_dict()


def _pair(size: Any) -> list[int] | None:
    if not size:
        return None
    if isinstance(size, int):
        return [size, size]
    return [int(size[0]), int(size[-1])]


def open(  # noqa: A001 - the weights layer's one reader, as `open` reads a file
    path: str | os.PathLike,
    *,
    model: Any = None,
    default_model: Any = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, metadata) of any supported checkpoint (see the module docstring).

    `model` (a zoo name or config) overrides what an `.npz` records; `default_model` is used
    only when it records nothing. For a timm file `model` / `num_heads` supply the head count
    and `image_size` what the file lacks. A run records its model: `model` must not be given.
    Raises `CheckpointNotFoundError` when nothing is at `path`, `CheckpointError` naming the
    file (and key) for anything that cannot be read.
    """
    params, meta = _open(path, model, default_model, num_heads, image_size)
    where = f"{path}: normalization"
    meta["normalization"] = normalization.checked(meta.get("normalization"), where)
    return params, meta


def _open(path, model, default_model, num_heads, image_size):
    fmt = format_of(path)
    if fmt == "run":
        if model is not None:
            raise CheckpointError(f"{path}: a trainer run records its model; do not pass one")
        params, meta = run.load_trained(path)
        meta = {"format": "run", "class_names": None, "image_size": None, **meta}
        if meta.get("model"):  # read as the version that wrote it did
            meta["model"] = models.stored_config(meta["model"]).to_dict()
        meta["image_size"] = _pair(meta["image_size"])
        return params, meta
    if fmt == "hf":
        params, meta = _unpack("hf", hf.from_hf(path))
        meta["normalization"] = normalization.read_hf(path)
        return params, meta
    if fmt == "timm":
        path = timm.weights_file(path)  # a timm hub folder: its weights file
        converted = timm.from_timm(path, model=model, num_heads=num_heads, image_size=image_size)
        params, meta = _unpack("timm", converted)
        recorded = npz.read_metadata(path).get("normalization")
        meta["normalization"] = recorded or normalization.read_timm_hub(path)
        return params, meta
    return _open_npz(str(path), model, default_model, image_size)


def _unpack(fmt: str, converted: Converted) -> tuple[dict[str, Any], dict[str, Any]]:
    return converted.params, _metadata(fmt, converted)


def format_to_write(path: str) -> str:
    """The format `save` writes at `path`: 'npz', 'timm' or 'hf' (decided here and only here:
    `format_of` is its counterpart for reading)."""
    if path.endswith(TORCH_FILES) and not path.endswith(".safetensors"):
        raise ConversionError(f"{path}: write timm state dicts as .safetensors (never pickles)")
    return "timm" if path.endswith(".safetensors") else "npz" if path.endswith(".npz") else "hf"


def check_destination(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raises `files.DestinationExistsError` where `save(..., path, overwrite=overwrite)` would
    refuse `path` (so a caller can refuse before reading anything)."""
    p = str(path)
    if format_to_write(p) == "hf":
        files.check_dir(p, overwrite=overwrite, replaceable=hf_common.replaceable)
    else:
        files.check_files(p, [npz.metadata_path(p).name], overwrite=overwrite)


def save(
    params: Mapping[str, Any],
    metadata: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    source: str = "params",
    overwrite: bool = False,
    layout: str = "vit_jax",
) -> tuple[epath.Path, str]:
    """Writes `params` in the format `path` names; returns (path, 'npz' | 'hf' | 'timm').

    `.npz`: ours, with the JSON sidecar from `metadata`; `.safetensors`: a timm state dict;
    anything else: a transformers directory. `metadata` needs `model` (a config dict) for the
    PyTorch formats. `source` names where the parameters came from in error messages.
    `layout='big_vision'` writes an `.npz` as a big_vision image tower (`params/img/...`,
    `npz.save_big_vision`).

    What is written appears complete or not at all (staged beside `path`, `weights.files`).
    An existing destination (a file, its sidecar, a folder that is not empty) is refused
    with `files.DestinationExistsError` unless `overwrite`; then it is replaced whole (a
    folder only when it is a transformers model folder).
    """
    p = str(path)
    kind = format_to_write(p)
    keys = ("model", "class_names", "image_size", "normalization", "eval_preprocessing")
    sidecar = {k: metadata.get(k) for k in keys if metadata.get(k) is not None}
    if layout not in ("vit_jax", "big_vision") or (layout == "big_vision" and kind != "npz"):
        raise ConversionError(f"{p}: layout {layout!r}; big_vision is an .npz layout")
    if kind == "npz" and layout == "big_vision":
        return npz.save_big_vision(params, p, metadata=sidecar, overwrite=overwrite), kind
    if kind == "npz":
        return npz.save_npz(params, p, metadata=sidecar, overwrite=overwrite), kind
    if not metadata.get("model"):
        raise ConversionError(f"{source}: the model config is needed to write {p}")
    config = models.get_config(metadata["model"])
    writer = hf.to_hf if kind == "hf" else timm.to_timm
    written = writer(
        params,
        config,
        p,
        class_names=metadata.get("class_names"),
        image_size=metadata.get("image_size"),
        source=source,
        normalization=metadata.get("normalization"),
        overwrite=overwrite,
    )
    return written, kind
