"""`python -m vit_jax.train --config=configs/vit.py:b16,cifar10 --workdir=DIR [--config.KEY=VALUE]`.

Trains (or fine-tunes) a model as the config says, resuming from the newest checkpoint in DIR.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed on a
cluster JAX detects by itself (TPU pods, SLURM), and run the same command on every host.

Exit codes: 0 done (or nothing to do); 1 the run failed (non-finite loss, a checkpoint that
could not be saved, no checkpoint that restores, an unreadable image, an I/O error); 2 it
cannot run as asked (a bad flag or config value, the workdir held by another trainer, a
restart that changes what the checkpoints depend on); 130 a second Ctrl-C stopped it before
the step in flight was saved. Errors are one `error: ...` line.

The console: one `HH:MM:SS message` line per event on stderr (a progress bar on a terminal),
then a summary on stdout (test accuracy, steps, wall time, img/s, where final.npz, the
checkpoints and the TensorBoard logs are, the command to try next). `--verbose` adds the
libraries' logs (TensorFlow, JAX, Orbax) in absl's format.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)


EXIT_RUN_FAILED = cli.EXIT_RUNTIME  # the run failed: NaN loss, a save, no checkpoint restores,
# bad data, I/O
EXIT_CONFIG = cli.EXIT_CONFIG  # it cannot run as asked: bad flag or config value, workdir in
# use, config change
EXIT_INTERRUPTED = 130  # a second Ctrl-C (128 + SIGINT, the shell's convention)


def _fail(error: BaseException | str, code: int) -> None:
    sys.exit(cli.fail(error, code))


def initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(
            _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


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
    started = time.perf_counter()
    console = cli.start(_VERBOSE.value, timestamps=True)  # again: absl's app.run reset logging
    sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_CONFIG)
    if _CONFIG.value is None or not _WORKDIR.value:
        _fail("--config and --workdir are required", EXIT_CONFIG)
    initialize_distributed()
    import jax

    from vit_jax import trainer
    from vit_jax import workdir as workdir_lib

    logging.info(
        "JAX %s, process %d/%d, %d devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    wd = workdir_lib.resolve(_WORKDIR.value)
    try:
        results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (Exception, KeyboardInterrupt) as e:
        known = exit_for(e, wd)
        if known is None:
            raise  # a bug: its traceback
        if known[0] == EXIT_INTERRUPTED:
            _interrupted_exit(known[1])
        _fail(known[1], known[0])
    if console is not None:
        console.close_bar()
    if jax.process_index() == 0:
        wall = time.perf_counter() - started
        print(summary(results, wd, _CONFIG.value, wall))


def _interrupted_exit(line: str) -> None:
    """Ctrl-C: the line, then exit at once. The trainer's own cleanup (lock, checkpoint writer)
    already ran on the way out; the interpreter's is skipped, since threads that TensorFlow or
    XLA were starting when the interrupt came can crash it (a segfault instead of exit 130)."""
    print(f"error: {line}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def exit_for(error: BaseException, wd) -> tuple[int, str] | None:
    """(exit code, the one error line) for an exception that ends a run; None for a bug."""
    from vit_jax import data, run_lock, trainer
    from vit_jax import workdir as workdir_lib

    failed = (
        trainer.NonFiniteLossError,
        trainer.OtherProcessError,
        trainer.MetricsWriteError,
        workdir_lib.CheckpointSaveError,
        workdir_lib.CheckpointDamagedError,
        workdir_lib.CheckpointUnreadableError,
        data.BadImageError,
    )
    if isinstance(error, failed):
        return EXIT_RUN_FAILED, str(error)
    if isinstance(error, (run_lock.WorkdirLockedError, ValueError, FileNotFoundError)):
        return EXIT_CONFIG, str(error)
    if isinstance(error, OSError):  # a full disk or a lost mount: final.npz, config files, lock
        if error.filename is None and error.strerror:  # (os.write names no file)
            return EXIT_RUN_FAILED, f"{wd}: {error.strerror}"
        return EXIT_RUN_FAILED, str(error)
    if isinstance(error, trainer.write_error_types()):  # TensorFlow's, from its file system
        path, reason = trainer.write_error_text(error)
        return EXIT_RUN_FAILED, f"{path}: {reason}" if path else reason
    if isinstance(error, KeyboardInterrupt):
        from vit_jax.weights import run

        steps = run.step_dirs(wd / run.CHECKPOINTS)
        resumes = f"from checkpoint {steps[0].name}" if steps else "from the start (no checkpoint)"
        how = (
            "a second Ctrl-C before the step in flight was saved"
            if isinstance(error, trainer.Interrupted)
            else "Ctrl-C"
        )
        return EXIT_INTERRUPTED, f"interrupted by {how}; a restart resumes {resumes}"
    return None


def _best_accuracy(metrics_jsonl) -> tuple[float, int] | None:
    """(best test accuracy, its step) over the run's metrics.jsonl (earlier starts included)."""
    best = None
    try:
        lines = metrics_jsonl.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "test_accuracy" in row and (best is None or row["test_accuracy"] > best[0]):
            best = (float(row["test_accuracy"]), int(row["step"]))
    return best


def summary(results: dict, wd, config, wall_seconds: float) -> str:
    """What the run achieved and where its files are, with the command to try next."""
    from vit_jax import workdir as workdir_lib

    total, step = int(config.total_steps), int(results["step"])
    stopped = step < total
    if results.get("nothing_to_do"):  # the trainer's warning said why
        lines = [f"no steps run: the run is at step {step}, total_steps is {total}"]
    else:
        head = f"stopped at step {step} of {total}" if stopped else f"done: {step} steps"
        lines = [
            f"{head} in {_hms(wall_seconds)} ({results.get('steps_run', 0)} this run, "
            f"{results.get('img_per_sec', 0.0):,.0f} img/s)"
        ]
    best = _best_accuracy(wd / workdir_lib.METRICS_JSONL)
    if "test_accuracy" in results:
        text = f"test accuracy {results['test_accuracy']:.4f} at step {step}"
        if best is not None:
            text += f", best {best[0]:.4f} at step {best[1]}"
        lines.append(text)
    elif best is not None:
        lines.append(f"best test accuracy {best[0]:.4f} at step {best[1]}")
    final = wd / workdir_lib.FINAL_NPZ
    has_final = not stopped and final.exists()
    rows = [
        ("final weights", str(final) if has_final else "none (not written)"),
        ("checkpoints", str(wd / workdir_lib.CHECKPOINTS)),
        ("TensorBoard", f"tensorboard --logdir {wd}"),
        ("metrics", str(wd / workdir_lib.METRICS_JSONL)),
    ]
    lines += [f"  {name + ':':<15}{value}" for name, value in rows]
    if stopped:
        lines.append("next: run the same command again to continue")
    else:
        target = final if has_final else wd
        lines.append(f"next: python -m vit_jax.predict --checkpoint {target} IMAGE...")
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a broken or misspelt `--config` reported as one line (exit 2);
    a packaged recipe's name (`--config=configs/default.py`) resolves to its installed file."""
    try:
        argv = cli.config_argv(argv)
    except FileNotFoundError as e:
        _fail(e, EXIT_CONFIG)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises many kinds
        _fail(cli.config_error(argv, e), EXIT_CONFIG)


if __name__ == "__main__":
    # The start-up every CLI runs first (cli.start), here before absl parses the flags: loading
    # the config file imports jax, which would otherwise load TensorFlow with its banners.
    cli.start()
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=parse_flags)
