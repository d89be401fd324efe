"""Published checkpoints: read and write the `.npz` layout, adapt weights for fine-tuning.

Every published ViT / hybrid / Mixer file is an `np.savez` of a flat dict with '/'-joined keys,
whose tree is exactly our models' parameter tree (see `vit_jax.models`). `load` also accepts the
variants in the wild: `opt/target/`-wrapped optimizer checkpoints, hybrids' GroupNorm parameters
stored as (1, 1, 1, C), big_vision files (`params/` prefix, a root `pos_embedding`, Linen
auto-named block children, scanned `encoderblock` with a leading depth axis). Files are never
unpickled (`allow_pickle=False`). Remote files (`gs://...`) are copied once into a local cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.ndimage
from absl import logging
from etils import epath

from vit_jax import models

CACHE_ENV = "VIT_JAX_CACHE"
AUGREG_INDEX = "gs://vit_models/augreg/index.csv"

# Linen auto-names of a block's children (big_vision, Linen ports) -> the published names.
_LINEN_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names file and keys)."""


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------- files


def cache_dir() -> epath.Path:
    return epath.Path(os.environ.get(CACHE_ENV, os.path.expanduser("~/.cache/vit_jax")))


def _is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def local_copy(path: str | os.PathLike) -> epath.Path:
    """`path` itself when local; a remote file is downloaded once into the cache (with progress)."""
    path = str(path)
    if not _is_remote(path):
        return epath.Path(path.removeprefix("file://"))
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    target = cache_dir() / f"{digest}-{os.path.basename(path)}"
    if target.exists():
        return target
    import tensorflow as tf
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = tf.io.gfile.stat(path).length
    except tf.errors.OpError as e:
        raise FileNotFoundError(f"{path}: cannot be opened ({e.message.splitlines()[0]})") from None
    partial = target.parent / (target.name + ".partial")
    with (
        tf.io.gfile.GFile(path, "rb") as src,
        partial.open("wb") as dst,
        tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar,
    ):
        while chunk := src.read(16 << 20):
            dst.write(chunk)
            bar.update(len(chunk))
    partial.rename(target)
    return target


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat {key: array} of an `.npz` file; one clear error for anything else."""
    local = local_copy(path)
    if not local.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(local):
        with local.open("rb") as f:
            head = f.read(2)
        kind = "a pickle file (never loaded)" if head[:1] == b"\x80" else "not an .npz archive"
        raise CheckpointError(f"{path}: {kind}; expected an np.savez file of '/'-joined keys")
    try:
        with np.load(local, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted .npz ({e})") from None


def _normalise(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Published-layout keys from every variant (prefixes, GroupNorm shapes, big_vision names)."""
    out = {}
    for key, value in flat.items():
        for prefix in ("opt/target/", "params/"):
            key = key.removeprefix(prefix)
        if key == "pos_embedding":  # big_vision keeps it at the root
            key = "Transformer/posembed_input/pos_embedding"
        parts = key.split("/")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("encoderblock") and parts[i + 1] in _LINEN_BLOCK_NAMES:
                parts[i + 1] = _LINEN_BLOCK_NAMES[parts[i + 1]]
        key = "/".join(parts)
        if parts[-2].startswith("gn") and value.ndim == 4:  # (1, 1, 1, C) in older files
            value = value.reshape(-1)
        out[key] = value
    return out


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Parameters (nested dict of numpy arrays, published names) from any published layout."""
    return unflatten(_normalise(read_npz(path)))


def metadata_path(path: str | os.PathLike) -> epath.Path:
    """The JSON sidecar of a weights file (`x.npz` -> `x.json`): model config and class names."""
    p = epath.Path(path)
    return p.parent / (p.stem + ".json")


def load_with_metadata(path: str | os.PathLike):
    """(params, model config dict or None, class names or None) of a weights file.

    Our `.npz` files may carry a JSON sidecar (written by the trainer's `final.npz` and by
    `vit_jax.convert`); a converted Hugging Face directory or timm file is converted on the fly.
    """
    p = epath.Path(str(path))
    if p.is_dir() or str(path).endswith(".safetensors"):
        from vit_jax import convert

        return convert.load_any(str(path))
    params = load(path)
    meta_file = metadata_path(path)
    if not _is_remote(str(path)) and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return params, meta.get("model"), meta.get("class_names")
    return params, None, None


def save_npz(
    params: Mapping[str, Any], path: str | os.PathLike, *, metadata: dict | None = None
) -> epath.Path:
    """Writes `params` in the published flat layout (scanned blocks unstacked); returns the path.

    With `metadata` (e.g. {'model': config dict, 'class_names': [...]}) a JSON sidecar is written
    next to it, so the file can be used without naming its model.
    """
    path = epath.Path(path)
    flat = {k: np.asarray(v) for k, v in flatten(models.unstack_layers(params)).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **flat)
    if metadata is not None:
        metadata_path(path).write_text(json.dumps(metadata, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------- fine-tuning


def _grid(tokens: int, what: str) -> tuple[int, int]:
    side = int(round(np.sqrt(tokens)))
    if side * side != tokens:
        raise CheckpointError(
            f"{what}: {tokens} position embeddings are not a square grid; pass the grid explicitly"
        )
    return side, side


def resample_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """(1, prefix + gh*gw, D) -> (1, prefix + new_gh*new_gw, D): bilinear on the 2-D grid.

    The prefix (class token) rows are kept as they are. Corners map to corners, so a table that
    is linear in the grid coordinates is reproduced exactly; equal grids return the input.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old_grid = old_grid or _grid(grid.shape[0], "stored pos_embedding")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    logging.info("resampling position embeddings from grid %s to %s", old_grid, new_grid)
    grid = grid.reshape(*old_grid, -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid.astype(np.float64), zoom, order=1).astype(posemb.dtype)
    return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def _prefix_tokens(model_config) -> int:
    return 1 if model_config.get("classifier", "token") in ("token", "token_unpooled") else 0


def load_pretrained(
    *,
    pretrained_path: str | os.PathLike | Mapping[str, Any],
    init_params: Mapping[str, Any],
    model_config,
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Pretrained weights fitted to a freshly initialised model, as the reference function.

    The head comes from `init_params` (new class count, zero init); a stored `pre_logits` is
    dropped when the model has no representation layer; position embeddings are resampled to the
    model's grid (`grid`, default: square); scanned / per-layer layouts are converted to match.
    Any other difference is one error listing missing, unexpected and mismatched keys.
    `pretrained_path` may also be an already loaded parameter tree.
    """
    what = "pretrained params" if isinstance(pretrained_path, Mapping) else str(pretrained_path)
    if isinstance(pretrained_path, Mapping):
        loaded = dict(pretrained_path)
    else:
        from vit_jax import workdir

        if workdir.is_trained(str(pretrained_path)):
            loaded = workdir.load_trained(str(pretrained_path))[0]
        else:
            loaded = load_with_metadata(pretrained_path)[0]
    loaded = models.unstack_layers(loaded)
    init_flat = flatten(models.unstack_layers(init_params))
    stored = {k: np.asarray(v) for k, v in flatten(loaded).items()}
    representation = model_config.get("representation_size") if model_config else None
    result, mismatched = {}, []
    for key, init in init_flat.items():
        if key.startswith("head/"):
            result[key] = np.asarray(init)
            continue
        if key not in stored:
            continue
        value = stored[key]
        if key.endswith("posembed_input/pos_embedding") and value.shape != init.shape:
            prefix = _prefix_tokens(model_config)
            tokens = init.shape[1] - prefix
            value = resample_posemb(value, grid or _grid(tokens, "model"), num_prefix_tokens=prefix)
        if value.shape != tuple(init.shape):
            mismatched.append(f"{key}: stored {value.shape}, model {tuple(init.shape)}")
            continue
        result[key] = value.astype(init.dtype)
    missing = sorted(set(init_flat) - set(result) - {m.split(":")[0] for m in mismatched})
    unexpected = sorted(
        k
        for k in set(stored) - set(init_flat)
        if not k.startswith("head/") and not (k.startswith("pre_logits/") and not representation)
    )
    if missing or unexpected or mismatched:
        lines = [f"{what} does not fit the model:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mismatched", mismatched),
        ):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): "
                    + "; ".join(keys[:8])
                    + (" ..." if len(keys) > 8 else "")
                )
        raise CheckpointError("\n".join(lines))
    params = unflatten(result)
    return models.stack_layers(params) if models.is_stacked(init_params) else params


def resolve_pretrained(pretrained_dir: str, model_name: str) -> str:
    """`{pretrained_dir}/{model_name}.npz`, as the reference; AugReg short names (`B_16`) map to
    their best imagenet21k file through the AugReg index (needs network or a local index.csv)."""
    if not pretrained_dir:
        raise CheckpointError("set config.pretrained_path or config.pretrained_dir")
    if model_name in models.AUGREG_NAMES:
        model_name = _best_augreg(pretrained_dir, model_name)
    name = model_name if model_name.endswith(".npz") else f"{model_name}.npz"
    return f"{str(pretrained_dir).rstrip('/')}/{name}"


def _best_augreg(pretrained_dir: str, short: str) -> str:
    """The AugReg file with the best ImageNet-21k upstream accuracy for a short model name."""
    import csv
    import io

    index = epath.Path(pretrained_dir) / "index.csv"
    source = index if index.exists() else AUGREG_INDEX
    try:
        text = local_copy(str(source)).read_text()
    except (OSError, FileNotFoundError) as e:
        raise CheckpointError(
            f"AugReg name {short!r} needs the index {source} (network or a local copy): {e}"
        ) from None
    rows = [
        r
        for r in csv.DictReader(io.StringIO(text))
        if r.get("name") == short and r.get("ds") == "i21k"
    ]
    if not rows:
        raise CheckpointError(f"no i21k AugReg checkpoint named {short!r} in {source}")
    best = max(rows, key=lambda r: float(r.get("final_val") or r.get("best_val") or 0))
    return best["filename"]
