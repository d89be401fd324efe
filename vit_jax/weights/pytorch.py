"""PyTorch weight files and tensor layouts, shared by the Hugging Face and timm converters.

Files: `.safetensors` (read and written with `safetensors.numpy`, no PyTorch needed) and, for
reading only, PyTorch `.bin` / `.pth` through `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers. Nothing is ever unpickled otherwise.

Layouts: PyTorch `Linear` weights are (out, in), ours (in, out); `Conv2d` weights are OIHW,
ours HWIO; attention projections are (heads * head_dim, D) in PyTorch, (D, heads, head_dim)
(query/key/value) and (heads, head_dim, D) (out) in ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax.weights import files
from vit_jax.weights.errors import CheckpointNotFoundError, ConversionError, mismatch_report

__all__ = [
    "conv_from_torch",
    "conv_to_torch",
    "dense_from_torch",
    "dump_safetensors",
    "dense_to_torch",
    "out_from_torch",
    "out_to_torch",
    "pair",
    "qkv_from_torch",
    "qkv_to_torch",
    "read_safetensors",
    "read_state_dict",
    "read_torch_bin",
    "Reader",
    "write_safetensors",
]


# ----------------------------------------------------------------------------- files


def _float32(array: np.ndarray) -> np.ndarray:
    """Half-precision floats become float32 (lossless); everything else stays as it is."""
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return array.astype(np.float32) if array.dtype != np.float32 else array
    return array


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a `.safetensors` file (floats as float32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = epath.Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file")
    files.check_regular(path)
    try:
        state = load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: _float32(v) for k, v in state.items()}


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a PyTorch `.bin` / `.pth` state dict, loaded with `weights_only=True`.

    A checkpoint dict holding the state dict under `state_dict` / `model` is unwrapped.
    """
    import pickle

    import torch

    path = epath.Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file")
    files.check_regular(path)
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: refused or unreadable as a weights-only PyTorch state dict ({first})"
        ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "module"):
            if isinstance(state.get(key), Mapping):
                logging.info("%s: using the state dict under %r", path, key)
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        out[str(key)] = value.numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` or weights-only PyTorch file as {name: numpy array}."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_bin(path)


def dump_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> epath.Path:
    """Writes {name: array} as safetensors straight to `path` (metadata `format: pt`, which
    transformers expects); the writers call it inside a staging folder (`weights.files`)."""
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()},
        os.fspath(path),
        metadata={"format": "pt"},
    )
    files.ordinary_mode(path)  # safetensors creates it owner-only
    return epath.Path(path)


def write_safetensors(
    state: Mapping[str, np.ndarray], path: str | os.PathLike, *, overwrite: bool = False
) -> epath.Path:
    """Writes {name: array} as a safetensors file that appears complete or not at all; an
    existing file is refused unless `overwrite` (`weights.files.staged_files`)."""
    path = epath.Path(path)
    with files.staged_files(path, overwrite=overwrite) as staging:
        dump_safetensors(state, staging / path.name)
    return path


# ----------------------------------------------------------------------------- layouts


def conv_from_torch(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def dense_from_torch(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out)."""
    return np.ascontiguousarray(w.T)


def dense_to_torch(k: np.ndarray) -> np.ndarray:
    """(in, out) -> (out, in)."""
    return np.ascontiguousarray(k.T)


def qkv_from_torch(w: np.ndarray, num_heads: int) -> np.ndarray:
    """(heads * head_dim, D) -> (D, heads, head_dim)."""
    return np.ascontiguousarray(w.T.reshape(w.shape[1], num_heads, -1))


def qkv_to_torch(k: np.ndarray) -> np.ndarray:
    """(D, heads, head_dim) -> (heads * head_dim, D)."""
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def out_from_torch(w: np.ndarray, num_heads: int) -> np.ndarray:
    """(D, heads * head_dim) -> (heads, head_dim, D)."""
    return np.ascontiguousarray(w.T.reshape(num_heads, -1, w.shape[0]))


def out_to_torch(k: np.ndarray) -> np.ndarray:
    """(heads, head_dim, D) -> (D, heads * head_dim)."""
    return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


# ----------------------------------------------------------------------------- key accounting


class Reader:
    """Takes named arrays out of a flat dict, checking shapes; `finish` reports every problem.

    A missing or misshapen entry is recorded and replaced by zeros of the expected shape, so a
    conversion runs to the end and `finish()` raises one error listing everything wrong:
    missing keys, keys of the wrong shape (both shapes) and keys nothing used.
    """

    def __init__(self, source: str, state: Mapping[str, Any]):
        self.source = source
        self.state = dict(state)
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The array at `key`, which must have `shape` (None entries match any size)."""
        self.used.add(key)
        if key not in self.state:
            self.missing.append(f"{key} {_fmt(shape)}")
            return np.zeros([s or 1 for s in shape], np.float32)
        value = np.asarray(self.state[key])
        if len(value.shape) != len(shape) or any(
            s is not None and s != v for s, v in zip(shape, value.shape, strict=False)
        ):
            self.mismatched.append(f"{key}: found {tuple(value.shape)}, expected {_fmt(shape)}")
            return np.zeros([s or 1 for s in shape], np.float32)
        return value

    def optional(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Like `take`, but None (and no complaint) when the key is absent."""
        return self.take(key, shape) if key in self.state else None

    def skip(self, keys: Iterable[str], why: str) -> None:
        """Marks present keys as deliberately unused (logged with the reason)."""
        present = [k for k in keys if k in self.state]
        if present:
            logging.warning("%s: ignoring %s (%s)", self.source, ", ".join(present), why)
            self.used.update(present)

    def finish(self, what: str) -> None:
        """Raises one ConversionError when anything was missing, misshapen or left over."""
        unexpected = [
            f"{k} {tuple(np.shape(v))}" for k, v in self.state.items() if k not in self.used
        ]
        if not (self.missing or self.mismatched or unexpected):
            return
        raise ConversionError(
            mismatch_report(
                f"{self.source}: does not hold {what}",
                missing=self.missing,
                mismatched=self.mismatched,
                unexpected=unexpected,
            )
        )


def _fmt(shape: tuple[int | None, ...]) -> str:
    return (
        "("
        + ", ".join("?" if s is None else str(s) for s in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def pair(value: Any, what: str) -> tuple[int, int]:
    """An int or an (h, w) pair as (h, w)."""
    if isinstance(value, int | np.integer):
        return int(value), int(value)
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ConversionError(f"{what} must be an int or a pair (h, w), got {value!r}")
