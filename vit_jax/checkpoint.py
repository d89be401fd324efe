"""Published checkpoints: read and write the `.npz` layout, adapt weights for fine-tuning.

Every published ViT / hybrid / Mixer file is an `np.savez` of a flat dict with '/'-joined keys
whose tree is exactly our models' parameter tree (see `vit_jax.models`). `load` also reads the
variants in the wild and returns them in that one layout:

- `opt/target/...` (old Flax optimizer checkpoints; the optimizer state beside it is ignored);
- hybrids' GroupNorm `scale`/`bias` stored as (1, 1, 1, C);
- big_vision files: `params/...`, a root `pos_embedding` without the class-token slot (big_vision
  adds `cls` after the position embeddings, so the slot we insert is zero: the same function),
  Linen auto-named block children (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
  `MlpBlock_0`), `MAPHead_0`, and scanned `encoderblock` with a leading depth axis (kept scanned;
  `load_pretrained` and `vit_jax.models.unstack_layers` convert).

Files are never unpickled (`allow_pickle=False`); remote files (`gs://`, `https://`, anything
`tf.io.gfile` opens) are copied once into a local cache (`$VIT_JAX_CACHE`, default
`~/.cache/vit_jax`) with a progress bar.

A weights file may carry a JSON sidecar (`x.npz` -> `x.json`, written by the trainer and by
`vit_jax.convert`): `{"model": <model config dict>, "class_names": [...], "image_size": [h, w]}`,
so predict / evaluate / fine-tuning can rebuild the model without being told its name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
import urllib.request
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.ndimage
from absl import logging
from etils import epath

from vit_jax import models

CACHE_ENV = "VIT_JAX_CACHE"
AUGREG_DIR = "gs://vit_models/augreg"
AUGREG_INDEX = f"{AUGREG_DIR}/index.csv"

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Linen auto-names of a ViT block's children (big_vision, Linen ports) -> the published names.
_LINEN_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUPNORM = re.compile(r"^gn(\d+|_root|_proj)$")
_HEADS = ("head", "head_dist")  # always taken from the model being fine-tuned


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names file and keys)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def mismatch_report(
    head: str,
    *,
    missing: list[str] = (),
    mismatched: list[str] = (),
    unexpected: list[str] = (),
    limit: int = 8,
) -> str:
    """The one-line report of parameters that do not fit: `head`, then each non-empty group.

    `head` names the file and what it should hold; entries name the key and its shape(s), e.g.
    `x.npz does not fit ViT-B_16: missing (1) [cls (1, 1, 768)]; mismatched (1) [embedding/
    kernel: stored (...), model (...)]`. Every loader and converter reports through this one.
    """
    groups = []
    for title, keys in (
        ("missing", missing),
        ("mismatched", mismatched),
        ("unexpected", unexpected),
    ):
        if keys:
            shown = "; ".join(keys[:limit])
            more = f"; ... and {len(keys) - limit} more" if len(keys) > limit else ""
            groups.append(f"{title} ({len(keys)}) [{shown}{more}]")
    return f"{head}: {'; '.join(groups)}"


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: str = "", *, sep: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x} (keys joined by `sep`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}{sep}", sep=sep))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix is an error."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"key {key!r} nests under the array {'/'.join(parents[: i + 1])!r}"
                )
        if leaf in node:
            raise CheckpointError(f"key {key!r} is both an array and a group of arrays")
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------- files


def cache_dir() -> epath.Path:
    """Where remote checkpoints are cached: `$VIT_JAX_CACHE`, default `~/.cache/vit_jax`."""
    return epath.Path(os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/vit_jax"))


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs other than `file://` (gs://, https://, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


def _open_remote(url: str) -> tuple[Any, int | None]:
    """(binary stream, size in bytes or None) of a remote file."""
    if url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http(s) only)
        except OSError as e:
            raise CheckpointNotFoundError(f"{url}: cannot be downloaded ({e})") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length else None
    import tensorflow as tf

    try:
        size = tf.io.gfile.stat(url).length
        return tf.io.gfile.GFile(url, "rb"), size
    except tf.errors.OpError as e:
        message = e.message.strip().splitlines()[0] if e.message else type(e).__name__
        raise CheckpointNotFoundError(f"{url}: cannot be opened ({message})") from None


def local_copy(path: str | os.PathLike) -> epath.Path:
    """`path` itself when local; a remote file is downloaded once into `cache_dir()`.

    The download shows size, speed and ETA, goes to a `.partial` file first and is renamed when
    complete, so an interrupted download is never mistaken for a cached file.
    """
    path = str(path)
    if not is_remote(path):
        return epath.Path(os.path.expanduser(path.removeprefix("file://")))
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    target = cache_dir() / f"{digest}-{os.path.basename(path.rstrip('/'))}"
    if target.exists():
        logging.info("%s: using cached copy %s", path, target)
        return target
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f"{target.name}.{os.getpid()}.partial"  # hosts may race
    src, size = _open_remote(path)
    start = time.perf_counter()
    try:
        with (
            src,
            partial.open("wb") as dst,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=os.path.basename(path),
            ) as bar,
        ):
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        if size is not None and partial.stat().length != size:
            raise CheckpointError(
                f"{path}: download incomplete ({partial.stat().length} of {size} bytes)"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(target)
    logging.info("%s: cached as %s (%.1f s)", path, target, time.perf_counter() - start)
    return target


def _describe_non_npz(head: bytes) -> str:
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return "a pickle file (never loaded: pickles can run code)"
    if head[:6] == b"\x93NUMPY":
        return "a single .npy array, not an .npz archive"
    if len(head) >= 9 and head[8:9] == b"{":
        return "a safetensors file (convert it: python -m vit_jax.convert SRC DST.npz)"
    if head[:2] == b"PK":
        return "a truncated or corrupted .npz archive (no zip directory)"
    return "not an .npz archive"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat {key: array} of an `np.savez` file; one clear error for anything else."""
    local = local_copy(path)
    if not local.exists():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
    if local.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected an .npz file")
    if not zipfile.is_zipfile(local):
        with local.open("rb") as f:
            head = f.read(16)
        raise CheckpointError(
            f"{path}: {_describe_non_npz(head)}; expected an np.savez file of '/'-joined keys"
        )
    try:
        with zipfile.ZipFile(local) as z:
            names = z.namelist()
        foreign = [n for n in names if not n.endswith(".npy")]
        if foreign:
            hint = (
                " (a PyTorch checkpoint? see vit_jax.convert)"
                if any(n.endswith(".pkl") for n in foreign)
                else ""
            )
            raise CheckpointError(
                f"{path}: a zip archive holding {foreign[0]!r}, not an np.savez file{hint}"
            )
        with np.load(local, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files}
    except CheckpointError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"{path}: holds pickled object arrays (never loaded)") from None
        raise CheckpointError(f"{path}: truncated or corrupted .npz ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted .npz ({e})") from None
    if not flat:
        raise CheckpointError(f"{path}: the archive holds no arrays")
    return flat


def _select_subtree(flat: dict[str, np.ndarray], prefix: str, path: str) -> dict[str, np.ndarray]:
    """The entries under `prefix` (prefix removed); the rest (optimizer state) is ignored."""
    if not any(k.startswith(prefix) for k in flat):
        return flat
    rest = [k for k in flat if not k.startswith(prefix)]
    if rest:
        logging.info(
            "%s: ignoring %d entries outside %s (e.g. %s)", path, len(rest), prefix, rest[0]
        )
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def normalise(flat: Mapping[str, np.ndarray], path: str = "checkpoint") -> dict[str, np.ndarray]:
    """Published-layout keys and shapes from every variant (see the module docstring)."""
    flat = dict(flat)
    for prefix in ("opt/target/", "params/"):
        flat = _select_subtree(flat, prefix, path)
    if "pos_embedding" in flat:  # big_vision: at the root, without the class-token slot
        if POSEMB_KEY in flat:
            raise CheckpointError(f"{path}: holds both 'pos_embedding' and {POSEMB_KEY!r}")
        posemb = flat.pop("pos_embedding")
        prefix = sum(k in flat for k in ("cls", "dist"))
        if prefix:  # big_vision adds the class token after the position embeddings
            posemb = np.concatenate(
                [np.zeros((1, prefix, posemb.shape[-1]), posemb.dtype), posemb], axis=1
            )
        flat[POSEMB_KEY] = posemb
    linen_blocks = _linen_blocks(flat)
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        parts = key.split("/")
        for i in range(len(parts) - 1):
            if "/".join(parts[: i + 1]) + "/" in linen_blocks:
                parts[i + 1] = _LINEN_BLOCK_NAMES.get(parts[i + 1], parts[i + 1])
        if (
            len(parts) > 1
            and _GROUPNORM.match(parts[-2])
            and parts[-1] in ("scale", "bias")
            and value.ndim == 4
            and value.shape[:3] == (1, 1, 1)
        ):
            value = value.reshape(-1)  # (1, 1, 1, C) in files written before flax 0.3.6
        new_key = "/".join(parts)
        if new_key in out:
            raise CheckpointError(f"{path}: {key!r} and another key both mean {new_key!r}")
        out[new_key] = value
    return out


def _linen_blocks(flat: Mapping[str, Any]) -> set[str]:
    """Prefixes `.../encoderblock[_i]/` whose children carry Linen auto-names."""
    found = set()
    for key in flat:
        m = re.match(r"^(.*?encoderblock(?:_\d+)?/)MultiHeadDotProductAttention_0/", key)
        if m:
            found.add(m.group(1))
    return found


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Parameters (nested dict of numpy arrays, published names) from any published layout."""
    return unflatten(normalise(read_npz(path), str(path)))


def metadata_path(path: str | os.PathLike) -> epath.Path:
    """The JSON sidecar of a weights file (`x.npz` -> `x.json`)."""
    p = epath.Path(path)
    return p.parent / f"{p.stem}.json"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a local weights file as a dict ({} when there is none)."""
    if is_remote(path):
        return {}
    meta_file = metadata_path(path)
    if not meta_file.exists():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object")
    return meta


def _is_pytorch(path: str | os.PathLike) -> bool:
    p = str(path)
    return p.endswith((".safetensors", ".bin", ".pth", ".pt")) or (
        not is_remote(p) and epath.Path(p).is_dir()
    )


def load_with_metadata(path: str | os.PathLike):
    """(params, model config dict or None, class names or None) of a weights file.

    `.npz` files use their JSON sidecar when present; a Hugging Face directory, a timm
    `.safetensors` / weights-only `.bin` file is converted on the fly (`vit_jax.convert`).
    """
    if _is_pytorch(path):
        from vit_jax import convert

        return convert.load_any(str(path))
    params = load(path)
    meta = read_metadata(path)
    return params, meta.get("model"), meta.get("class_names")


def save_npz(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes `params` in the published flat layout (scanned blocks unstacked); returns the path.

    The file appears complete or not at all (written aside, then renamed). An existing file is
    an error unless `overwrite` (then it is replaced in one step, never left half-written).

    The reference code, timm's `.npz` loader and `load` read it; `load(path)` returns `params`
    bit for bit (bfloat16 leaves are stored as float32, losslessly, since `.npz` readers don't
    know bfloat16). With `metadata` (e.g. {'model': config dict, 'class_names': [...],
    'image_size': [h, w]}) a JSON sidecar is written next to it.
    """
    path = epath.Path(path)
    flat = {}
    for key, value in flatten(models.unstack_layers(params)).items():
        array = np.asarray(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype.name == "bfloat16"
        ):
            raise CheckpointError(
                f"{path}: parameter {key!r} is not a numeric array ({array.dtype})"
            )
        if array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        flat[key] = array
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f"{path.name}.partial"
    with partial.open("wb") as f:
        np.savez(f, **flat)
    partial.replace(path)
    if metadata is not None:
        metadata_path(path).write_text(json.dumps(metadata, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


# ----------------------------------------------------------------------------- fine-tuning


def resample_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """(1, prefix + gh*gw, D) -> (1, prefix + new_gh*new_gw, D): bilinear on the 2-D grid.

    The prefix (class / distillation token) rows are kept as they are. As in the reference
    (`scipy.ndimage.zoom`, order 1), corners map to corners, so a table linear in the grid
    coordinates is reproduced exactly; equal grids return the input unchanged. `old_grid`
    defaults to the square grid.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    tokens = grid.shape[0]
    if old_grid is None:
        side = int(round(np.sqrt(tokens)))
        if side * side != tokens:
            raise CheckpointError(
                f"stored pos_embedding: {tokens} grid tokens are not a square grid; "
                "its (rows, cols) are needed (an image_size in the file's JSON sidecar)"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != tokens:
        raise CheckpointError(f"stored pos_embedding: {tokens} grid tokens, not grid {old_grid}")
    if old_grid == new_grid:
        return posemb
    logging.info("resampling position embeddings from grid %s to %s", old_grid, new_grid)
    grid = grid.reshape(*old_grid, -1).astype(np.float64)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1).astype(posemb.dtype)
    assert grid.shape[:2] == new_grid, (grid.shape, new_grid)
    return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def token_grid(model_config, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of patch tokens a ViT config makes of images of `image_size`."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    sh, sw = models.get_model(model_config, num_classes=None).stride()
    if h % sh or w % sw:
        raise CheckpointError(f"image size {h}x{w} is not divisible by the patch stride {sh}x{sw}")
    return h // sh, w // sw


def _target_grid(tokens: int, model_config, image_size) -> tuple[int, int]:
    if image_size is not None:
        grid = token_grid(model_config, image_size)
        if grid[0] * grid[1] != tokens:
            raise CheckpointError(
                f"image_size {image_size} gives a {grid} token grid, but the model's "
                f"pos_embedding holds {tokens} grid tokens"
            )
        return grid
    side = int(round(np.sqrt(tokens)))
    if side * side != tokens:
        raise CheckpointError(
            f"the model's {tokens} grid tokens are not a square grid: pass image_size=(h, w) "
            "to load_pretrained so the position embeddings can be resampled"
        )
    return side, side


def _read_pretrained(path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, metadata) from a tree, a trainer workdir, a converted PyTorch file or an .npz."""
    if isinstance(path, Mapping):
        return dict(path), {}
    path = str(path)
    if not is_remote(path):
        from vit_jax import workdir

        if workdir.is_trained(path):
            return workdir.load_trained(path)
        if not epath.Path(path).exists() and epath.Path(f"{path}.npz").exists():
            path = f"{path}.npz"
    if _is_pytorch(path):
        from vit_jax import convert

        converted = convert.load(path)
        meta = {"model": converted.model_config.to_dict(), "image_size": converted.image_size}
        return converted.params, meta
    return load(path), read_metadata(path)


def _stored_grid(what: str, meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """The stored position embeddings' grid from the sidecar's image size (None: assume square)."""
    if not (meta.get("image_size") and meta.get("model")):
        return None
    try:
        return token_grid(meta["model"], tuple(meta["image_size"]))
    except (ValueError, TypeError) as e:
        logging.warning("%s: ignoring the sidecar's model/image_size (%s)", what, e)
        return None


def _check_architecture_facts(what: str, meta: Mapping[str, Any], model_config) -> None:
    """Warns when the stored model computed its GELU / LayerNorm differently from `model_config`."""
    stored = meta.get("model") or {}
    for field in ("gelu_approximate", "layernorm_epsilon"):
        if field in stored and model_config is not None and field in model_config:
            if stored[field] != model_config[field]:
                logging.warning(
                    "%s was trained with %s=%s, the model uses %s: outputs differ slightly "
                    "until fine-tuned (set model.%s=%s to match)",
                    what,
                    field,
                    stored[field],
                    model_config[field],
                    field,
                    stored[field],
                )


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def load_pretrained(
    *,
    pretrained_path: str | os.PathLike | Mapping[str, Any],
    init_params: Mapping[str, Any],
    model_config,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Pretrained weights fitted to a freshly initialised model, as the reference function.

    - the head (`head`, `head_dist`) comes from `init_params` (new class count, zero init);
    - a stored `pre_logits` is dropped when `model_config.representation_size` is None and kept
      (it must fit) otherwise;
    - position embeddings are resampled bilinearly on the 2-D grid (prefix tokens apart) when
      the grid differs. The model's grid comes from `image_size` (needed for non-square grids;
      square by default), the stored grid from the file's JSON sidecar `image_size` (square by
      default);
    - scanned / per-layer layouts are converted to match `init_params`;
    - anything else that differs is one error listing missing, unexpected and mismatched keys
      (with both shapes). Nothing is loaded partially.

    `pretrained_path`: an `.npz` (any published layout), a trainer workdir, a Hugging Face
    directory or timm file (converted on the fly), or an already loaded parameter tree.
    Returns host numpy arrays in `init_params`' dtypes.
    """
    what = "pretrained params" if isinstance(pretrained_path, Mapping) else str(pretrained_path)
    loaded, meta = _read_pretrained(pretrained_path)
    _check_architecture_facts(what, meta, model_config)
    stored = {k: np.asarray(v) for k, v in flatten(models.unstack_layers(loaded)).items()}
    init_flat = flatten(models.unstack_layers(init_params))
    representation = model_config.get("representation_size") if model_config else None
    prefix = sum(k in init_flat for k in ("cls", "dist"))

    result, mismatched = {}, []
    for key, init in init_flat.items():
        if key.split("/")[0] in _HEADS:
            result[key] = np.asarray(init)
            continue
        if key not in stored:
            continue
        value = stored[key]
        if key.endswith("posembed_input/pos_embedding") and _shape(value) != _shape(init):
            try:
                old_grid = _stored_grid(what, meta)
                if value.ndim == 3 and value.shape[-1] == init.shape[-1]:
                    new_grid = _target_grid(init.shape[1] - prefix, model_config, image_size)
                    value = resample_posemb(
                        value, new_grid, num_prefix_tokens=prefix, old_grid=old_grid
                    )
            except CheckpointError as e:
                mismatched.append(f"{key}: {e}")
                continue
        if _shape(value) != _shape(init):
            mismatched.append(f"{key}: stored {_shape(value)}, model {_shape(init)}")
            continue
        result[key] = value.astype(init.dtype)

    bad = {m.split(":")[0] for m in mismatched}
    missing = [f"{k} {_shape(v)}" for k, v in init_flat.items() if k not in result and k not in bad]
    unexpected = []
    for key, value in stored.items():
        top = key.split("/")[0]
        if key in init_flat or top in _HEADS:
            continue
        if top == "pre_logits" and not representation:
            continue
        unexpected.append(f"{key} {_shape(value)}")
    if any(k.startswith("pre_logits/") for k in stored) and not representation:
        logging.info("%s: dropping the stored pre_logits (representation_size is None)", what)
    if missing or unexpected or mismatched:
        name = (model_config or {}).get("name") or "the model"
        raise CheckpointError(
            mismatch_report(
                f"{what} does not fit {name}",
                missing=missing,
                mismatched=mismatched,
                unexpected=unexpected,
            )
        )
    params = unflatten(result)
    return models.stack_layers(params) if models.is_stacked(init_params) else params


# ----------------------------------------------------------------------------- names


def resolve_pretrained(pretrained_dir: str, model_name: str) -> str:
    """`{pretrained_dir}/{model_name}.npz`, as the reference.

    AugReg short names (`B_16`, `R26_S_32`, ...) map to their ImageNet-21k checkpoint with the
    best final validation accuracy, looked up in `{pretrained_dir}/index.csv` (or, when a local
    directory has none, the published `gs://vit_models/augreg/index.csv`, which needs network).
    """
    if not pretrained_dir:
        raise CheckpointError("set config.pretrained_path or config.pretrained_dir")
    if model_name in models.AUGREG_NAMES:
        model_name = best_augreg_filename(pretrained_dir, model_name)
    name = model_name if model_name.endswith(".npz") else f"{model_name}.npz"
    return f"{str(pretrained_dir).rstrip('/')}/{name}"


def best_augreg_filename(pretrained_dir: str, short_name: str) -> str:
    """The AugReg i21k file name (without `.npz`) with the best `final_val` for a short name."""
    index = f"{str(pretrained_dir).rstrip('/')}/index.csv"
    if not is_remote(index) and not epath.Path(index).exists():
        index = AUGREG_INDEX
    try:
        text = local_copy(index).read_text()
    except (OSError, CheckpointError) as e:
        raise CheckpointError(
            f"AugReg name {short_name!r} needs the index {index} (network, or a copy of "
            f"{AUGREG_INDEX} in the pretrained_dir): {e}"
        ) from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"filename", "ds", "final_val"} <= set(rows[0]):
        raise CheckpointError(f"{index}: expected columns filename, ds, final_val")
    rows = [r for r in rows if r["ds"] == "i21k" and r["filename"].split("-")[0] == short_name]
    if not rows:
        raise CheckpointError(f"{index}: no i21k AugReg checkpoint for {short_name!r}")
    best = max(rows, key=lambda r: float(r["final_val"]) if r["final_val"] else -np.inf)
    logging.info("AugReg %s -> %s (final_val %s)", short_name, best["filename"], best["final_val"])
    return best["filename"]
