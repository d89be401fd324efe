"""The published `.npz` format: read every variant in the wild, write ours, JSON sidecars.

Every published ViT / hybrid / Mixer file is an `np.savez` of a flat dict with '/'-joined keys
whose tree is exactly our models' parameter tree (see `vit_jax.models`). `load` also reads the
variants in the wild and returns them in that one layout:

- `opt/target/...` (old Flax optimizer checkpoints; the optimizer state beside it is ignored);
- hybrids' GroupNorm `scale`/`bias` stored as (1, 1, 1, C);
- big_vision files: `params/...`, a root `pos_embedding` without the class-token slot (big_vision
  adds `cls` after the position embeddings, so the slot we insert is zero: the same function),
  Linen auto-named block children (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
  `MlpBlock_0`), `MAPHead_0`, and scanned `encoderblock` with a leading depth axis (kept scanned;
  `load_pretrained` and `vit_jax.models.unstack_layers` convert);
- big_vision two-tower files (SigLIP): `params/img/...` is the image tower (`img/pos_embedding`
  (1, N, D) without a class slot, `img/MAPHead_0`, the `img/head` projection as our `head`); the
  text tower `params/txt/...` and the scalars `t`, `b` are left out with one log line.
  `save_big_vision` writes an image tower back in that layout (`params/img/`, root
  `pos_embedding`, Linen block names, blocks scanned), bit for bit what `load` read.

Files are never unpickled (`allow_pickle=False`); remote files (`gs://`, `https://`, anything
`tf.io.gfile` opens) are copied once into a local cache (`$VIT_JAX_CACHE`, default
`~/.cache/vit_jax`) with a progress bar.

A weights file may carry a JSON sidecar (`x.npz` -> `x.json`, written by the trainer and by
`vit_jax.convert`): `{"model": <model config dict>, "class_names": [...], "image_size": [h, w]}`,
so predict / evaluate / fine-tuning can rebuild the model without being told its name.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax import models
from vit_jax.weights import files
from vit_jax.weights.cache import is_remote, local_copy
from vit_jax.weights.errors import CheckpointError, CheckpointNotFoundError
from vit_jax.weights.tree import flatten, unflatten

__all__ = [
    "BIG_VISION_IMAGE",
    "POSEMB_KEY",
    "big_vision_layout",
    "is_big_vision",
    "load",
    "metadata_path",
    "normalise",
    "read_metadata",
    "read_npz",
    "save_big_vision",
    "save_npz",
]

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
BIG_VISION_IMAGE = "img/"
# Linen auto-names of a ViT block's children (big_vision, Linen ports) -> the published names.
_LINEN_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUPNORM = re.compile(r"^gn(\d+|_root|_proj)$")


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
    files.check_regular(local)
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


def _select_image_tower(flat: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """A big_vision two-tower file (SigLIP, LiT): the image tower `img/` (the text tower
    `txt/` and the scalars `t` / `b` are left out, with one log line)."""
    if not any(k.startswith(BIG_VISION_IMAGE) for k in flat):
        return flat
    rest = sorted(k for k in flat if not k.startswith(BIG_VISION_IMAGE))
    if rest:
        towers = sorted({k.split("/")[0] for k in rest})
        logging.info(
            "%s: reading the image tower %s; leaving out %d entries (%s)",
            path,
            BIG_VISION_IMAGE,
            len(rest),
            ", ".join(f"{t}/" if any(k.startswith(f"{t}/") for k in rest) else t for t in towers),
        )
    return {
        k[len(BIG_VISION_IMAGE) :]: v for k, v in flat.items() if k.startswith(BIG_VISION_IMAGE)
    }


def normalise(flat: Mapping[str, np.ndarray], path: str = "checkpoint") -> dict[str, np.ndarray]:
    """Published-layout keys and shapes from every variant (see the module docstring)."""
    flat = dict(flat)
    for prefix in ("opt/target/", "params/"):
        flat = _select_subtree(flat, prefix, path)
    flat = _select_image_tower(flat, path)
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


def is_big_vision(path: str | os.PathLike) -> bool:
    """Whether a local `.npz` is in big_vision's layout (`params/...`, or a root
    `pos_embedding`): its position table is then resampled as big_vision does (scipy order 1)."""
    local = local_copy(path)
    try:
        with zipfile.ZipFile(local) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.startswith("params/") or n == "pos_embedding.npy" for n in names)


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
    files.check_regular(meta_file)
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object")
    return meta


def save_npz(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes `params` in the published flat layout (scanned blocks unstacked); returns the path.

    The file and its sidecar appear complete or not at all (written in a staging folder beside
    them, then renamed; `weights.files.staged_files`). An existing file or sidecar is an error
    unless `overwrite`: then both are replaced (an old sidecar is removed when `metadata` is
    None, since it would describe the new weights), never left half-written.

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
    sidecar = metadata_path(path).name
    with files.staged_files(path, [sidecar], overwrite=overwrite) as staging:
        with (staging / path.name).open("wb") as f:
            np.savez(f, **flat)
        if metadata is not None:
            text = json.dumps(metadata, indent=2, default=_json_default)
            (staging / sidecar).write_text(text)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


# ----------------------------------------------------------------------------- big_vision

_TO_LINEN = {v: k for k, v in _LINEN_BLOCK_NAMES.items()}
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.*)$")
# (parameter-name test, what) for what big_vision's ViT has no parameter for
_NOT_BIG_VISION = (
    (lambda part: part.startswith("LayerScale_"), "LayerScale"),
    (lambda part: part == "registers", "register tokens"),
    (lambda part: part in ("query_norm", "key_norm"), "query/key norms"),
    (lambda part: part in ("dist", "head_dist"), "a distillation token"),
)


def big_vision_layout(params: Mapping[str, Any], *, scan: bool = True) -> dict[str, np.ndarray]:
    """Our ViT parameters as a big_vision image tower's flat dict (`params/img/...`).

    The position table moves to `pos_embedding` at the tower's root without class-token slots
    (which must be zero: big_vision adds the class token after the position embeddings), block
    children take Linen's names (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`) and, with `scan`, the blocks are stacked into one `encoderblock` with a
    leading depth axis. Parameters big_vision's ViT lacks are an error naming them.
    """
    flat = {k: np.asarray(v) for k, v in flatten(models.unstack_layers(params)).items()}
    for test, what in _NOT_BIG_VISION:
        found = [k for k in flat if any(test(part) for part in k.split("/"))]
        if found:
            raise CheckpointError(f"big_vision's ViT has no {what}: {found[0]}")
    out: dict[str, np.ndarray] = {}
    blocks: dict[str, dict[int, np.ndarray]] = {}
    for key, value in flat.items():
        if key == POSEMB_KEY:
            prefix = int("cls" in flat)
            if prefix and value[:, :prefix].any():
                raise CheckpointError(
                    f"{POSEMB_KEY}: a nonzero class-token slot, which big_vision's "
                    "pos_embedding (patches only) cannot hold"
                )
            out["pos_embedding"] = value[:, prefix:]
            continue
        m = _BLOCK.match(key)
        if not m:
            out[key] = value
            continue
        child, _, rest = m.group(2).partition("/")
        name = f"{_TO_LINEN.get(child, child)}/{rest}"
        if scan:
            blocks.setdefault(name, {})[int(m.group(1))] = value
        else:
            out[f"Transformer/encoderblock_{m.group(1)}/{name}"] = value
    for name, layers in blocks.items():
        out[f"Transformer/encoderblock/{name}"] = np.stack([layers[i] for i in sorted(layers)])
    return {f"params/{BIG_VISION_IMAGE}{k}": v for k, v in out.items()}


def save_big_vision(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    scan: bool = True,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes an image tower as a big_vision `.npz` (`big_vision_layout`); `load` reads it back
    bit for bit. Atomic and never overwriting unless asked, as `save_npz`."""
    return save_npz(
        big_vision_layout(params, scan=scan), path, metadata=metadata, overwrite=overwrite
    )
