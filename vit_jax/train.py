"""`python -m vit_jax.train --config=configs/vit.py:b16,cifar10 --workdir=DIR [--config.KEY=VALUE]`.

Trains (or fine-tunes) a model as the config says, resuming from the newest checkpoint in DIR.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed on a
cluster JAX detects by itself (TPU pods, SLURM), and run the same command on every host.

Exit codes: 0 done (or nothing to do); 1 the run failed (non-finite loss, a checkpoint that
could not be saved, no checkpoint that restores, an unreadable image, an I/O error); 2 it
cannot run as asked (a bad flag or config value, the workdir held by another trainer, a
restart that changes what the checkpoints depend on). Errors are one `error: ...` line.
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


EXIT_RUN_FAILED = 1  # the run failed: NaN loss, a save, no checkpoint restores, bad data, I/O
EXIT_CONFIG = 2  # it cannot run as asked: bad flag or config value, workdir in use, config change


def _fail(error: BaseException | str, code: int) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(
            _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):
    """Library chatter off the console: Orbax's INFO, and tracebacks of what the trainer reports.

    A failed save makes Orbax and asyncio log the same error once per array, with tracebacks;
    the trainer reports it in one line. Library warnings and errors keep their first line.
    """

    def filter(self, record) -> bool:
        # absl.logging.WARNING is absl's own -1; records carry the standard library's levels.
        if record.name == "asyncio":
            return record.levelno >= logging.logging.WARNING and "never retrieved" not in str(
                record.msg
            )
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno < logging.logging.WARNING:
            return False
        first_line = record.getMessage().split("\n", 1)[0]
        record.msg, record.args, record.exc_info, record.exc_text = first_line, (), None, None
        return True


def _without_closed_loop_callbacks(hook):
    """sys.unraisablehook, minus TensorStore callbacks that reach Orbax's closed event loops.

    After a failed async write each pending array write prints `RuntimeError: Event loop is
    closed` with a traceback; the failure itself is reported once, by the trainer.
    """

    def unraisablehook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        hook(unraisable)

    return unraisablehook


def main(argv: list[str]) -> None:
    # On absl's handler: it prints the records of every logger (asyncio's too).
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_CONFIG)
    if _CONFIG.value is None or not _WORKDIR.value:
        _fail("--config and --workdir are required", EXIT_CONFIG)
    initialize_distributed()
    import jax

    from vit_jax import data, run_lock, trainer
    from vit_jax import workdir as workdir_lib

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
    except (
        trainer.NonFiniteLossError,
        trainer.OtherProcessError,
        workdir_lib.CheckpointSaveError,
        workdir_lib.CheckpointDamagedError,
        data.BadImageError,
    ) as e:
        _fail(e, EXIT_RUN_FAILED)
    except (run_lock.WorkdirLockedError, ValueError, FileNotFoundError) as e:
        _fail(e, EXIT_CONFIG)
    except OSError as e:  # a full disk or a lost mount while writing metrics, events, final.npz
        _fail(e, EXIT_RUN_FAILED)
    if results.get("nothing_to_do"):
        print(f"already at step {results['step']} of {_CONFIG.value.total_steps}: nothing to do")
    elif "test_accuracy" in results:
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
        _fail(message, EXIT_CONFIG)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=parse_flags)
