"""The config a run was started with, and what may change when it is restarted.

A restart resumes a run's checkpoints, so it must run the same model on the same data stream.
The rule is an allow-list: a key may change on restart only when it changes neither the
parameter or optimizer-state layout nor the sequence of training examples. Everything else
(model.*, model_name, num_classes, dataset, class_subset, pp.* but pp.test, batch, seed,
optimizer, momentum, weight_decay, loss, pretrained weights, teacher ...) is refused, with one
line listing each changed key as `old -> new`. Keys that may change:

- where and how long: `total_steps`, and the schedule `base_lr`, `warmup_steps`, `decay_type`;
- `grad_norm_clip` between two positive values (turning it on or off changes the optimizer
  state's layout);
- side jobs: `eval_every`, `progress_every`, `checkpoint_every`, `max_to_keep`,
  `async_checkpointing`, `write_final_npz`, and evaluation: `batch_eval`, `pp.test`,
  `pp.antialias`, `evals.*` (evaluators may also be added or removed: `ADDABLE`);
- devices: `mesh.*`, `accum_steps` (the same global batch, spread differently), `prefetch`;
- where the data is read from: `tfds_data_dir`, `tfds_manual_dir`.

A key the stored config lacks (added to vit_jax after the run started) counts as unchanged when
its new value is today's default for it (`vit_jax.configs`, or the model family's default;
model fields whose absence means an older behaviour, `models.stored_config`, take that).

Each start appends one line to `config_history.jsonl` (step, time, the changes, the full
config); `config.json` holds the latest start's config.
"""

from __future__ import annotations

import datetime
import json
import socket
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from etils import epath

from vit_jax import configs, models
from vit_jax import workdir as workdir_lib
from vit_jax.weights.tree import flatten

__all__ = [
    "ADDABLE",
    "RESUMABLE",
    "as_dict",
    "changes",
    "check_restart",
    "ConfigChangeError",
    "read_stored",
    "record_start",
    "with_current_defaults",
]


_ANY: Callable[[Any, Any], bool] = lambda old, new: True

# key (or "prefix.*") -> when a change of it is allowed.
RESUMABLE: dict[str, Callable[[Any, Any], bool]] = {
    "total_steps": _ANY,
    "base_lr": _ANY,
    "warmup_steps": _ANY,
    "decay_type": _ANY,
    "grad_norm_clip": lambda old, new: bool(old) and bool(new),
    "eval_every": _ANY,
    "progress_every": _ANY,
    "checkpoint_every": _ANY,
    "max_to_keep": _ANY,
    "async_checkpointing": _ANY,
    "write_final_npz": _ANY,
    "batch_eval": _ANY,
    "pp.test": _ANY,
    "pp.antialias": _ANY,
    "evals.*": _ANY,
    "mesh.*": _ANY,
    "accum_steps": _ANY,
    "prefetch": _ANY,
    "tfds_data_dir": _ANY,
    "tfds_manual_dir": _ANY,
}

# Prefixes under which keys may appear or disappear on restart (an evaluator added / dropped).
ADDABLE: tuple[str, ...] = ("evals.",)

_UNSET = object()


class ConfigChangeError(ValueError):
    """A restart changes keys that the run's checkpoints depend on (one line lists them)."""


def as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (what config.json holds)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _rule(key: str) -> Callable[[Any, Any], bool] | None:
    if key in RESUMABLE:
        return RESUMABLE[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        rule = RESUMABLE.get(".".join(parts[:i]) + ".*")
        if rule is not None:
            return rule
    return None


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else json.dumps(value)


def changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every key whose value differs (`_UNSET` where absent)."""
    a, b = flatten(stored, sep="."), flatten(new, sep=".")
    return {
        k: (a.get(k, _UNSET), b.get(k, _UNSET))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    }


def with_current_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """`stored` with the keys added since it was written filled in at today's defaults."""
    full = as_dict(configs.get_config())
    full.update(stored)
    if isinstance(stored.get("model"), Mapping):
        try:
            full["model"] = as_dict(models.stored_config(dict(stored["model"])))
        except (ValueError, TypeError, KeyError):  # not a model we can complete: compare as is
            full["model"] = dict(stored["model"])
    return full


def check_restart(
    workdir: epath.Path, stored: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The allowed changes of a restart; raises `ConfigChangeError` listing the refused ones."""
    changed = changes(with_current_defaults(stored), new)
    refused = []
    for key, (old, value) in changed.items():
        rule = _rule(key)
        unset = old is _UNSET or value is _UNSET
        if rule is None or (unset and not key.startswith(ADDABLE)) or not rule(old, value):
            refused.append(key)
    if refused:
        listed = ", ".join(f"{k} {_show(changed[k][0])} -> {_show(changed[k][1])}" for k in refused)
        raise ConfigChangeError(
            f"{workdir} was trained with another config and its checkpoints depend on it: "
            f"{listed}; restart with the stored values (see {workdir_lib.CONFIG_JSON}), or start "
            f"a new --workdir (--config.pretrained_path={workdir} starts from its weights)"
        )
    return changed


def read_stored(workdir: epath.Path) -> dict[str, Any] | None:
    """The config of the run's latest start, or None when config.json is absent or unreadable."""
    path = workdir / workdir_lib.CONFIG_JSON
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def record_start(
    workdir: epath.Path,
    config: ml_collections.ConfigDict,
    step: int,
    changed: Mapping[str, tuple[Any, Any]],
) -> None:
    """config.json := this start's config (atomically); one line appended to the history."""
    workdir_lib.replace_text(
        workdir / workdir_lib.CONFIG_JSON, config.to_json_best_effort(indent=2)
    )
    row = {
        "start_step": step,
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "changed": {
            k: [None if old is _UNSET else old, None if new is _UNSET else new]
            for k, (old, new) in changed.items()
        },
        "config": as_dict(config),
    }
    with (workdir / workdir_lib.CONFIG_HISTORY_JSONL).open("a") as f:
        f.write(json.dumps(row) + "\n")
