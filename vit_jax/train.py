"""`python -m vit_jax.train --config=configs/vit.py:b16,cifar10 --workdir=DIR [--config.KEY=VALUE]`.

Trains (or fine-tunes) a model as the config says, resuming from the newest checkpoint in DIR.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed on a
cluster JAX detects by itself (TPU pods, SLURM), and run the same command on every host.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(
            _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):
    """Keeps Orbax's per-save INFO chatter out of the console (warnings still show)."""

    def filter(self, record) -> bool:
        # absl.logging.WARNING is absl's own -1; records carry the standard library's levels.
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    # On the `absl` logger itself: every library that logs through absl creates its records there.
    logging.get_absl_logger().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    initialize_distributed()
    import jax

    from vit_jax import trainer

    logging.info(
        "JAX %s, process %d/%d, %d devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    try:
        results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (trainer.NonFiniteLossError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if "test_accuracy" in results:
        print(
            f"step {results['step']}: test accuracy {results['test_accuracy']:.4f} "
            f"(top-5 {results['test_top5_accuracy']:.4f}, loss {results['test_loss']:.4f})"
        )


def _bad_override(argv: list[str]) -> str | None:
    """For a `--config.a.b=v` naming no field: which one, and the valid keys at that level."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not config_arg:
        return None
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_vit_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config.") :].split("=", 1)[0].split(".")
        node, where = config, "config"
        for key in keys:
            if not hasattr(node, "keys") or key not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"unknown config key {where}.{key}{hint}; valid keys: {', '.join(valid)}"
            node, where = node[key], f"{where}.{key}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a misspelt `--config.KEY` reported as one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises many kinds
        try:
            message = _bad_override(argv) or str(e)
        except Exception:  # noqa: BLE001 - the config file itself is broken: report the original
            message = str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=parse_flags)
