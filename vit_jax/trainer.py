"""Training: a `TrainState`, one jitted step, evaluators, metrics, Orbax checkpoints.

Data flow: config -> the workdir's lock and the restart check (`run_lock`, `run_config`; before
anything is written) -> mesh -> dataset info -> model -> `jax.eval_shape` of init (a
`TrainState`: params, optimizer state, step) -> its one sharding tree from `vit_jax.sharding`
rules -> `jax.jit(init, out_shardings=...)` -> the newest checkpoint that restores, else
pretrained weights, into those shardings -> loop (`_Loop`): data iterator (global batches sharded
over ('data', 'fsdp')), the objective (`objectives.build`) and the evaluators
(`evaluators.build_all`, `config.evals`), both known here only by their protocols, step (one
`jax.jit`, donated state, its metrics summed on the devices) -> at check steps only (progress,
eval, checkpoint, last): the sums read (a non-finite loss stops the run), the stop / failed-save
flags agreed across hosts, progress / evaluators / checkpoint (a failed save stops the run) ->
final checkpoint and `final.npz`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from vit_jax import data, evaluators, models, objectives, optim, run_config, run_lock, sharding
from vit_jax import workdir as workdir_lib
from vit_jax.configs import image_size
from vit_jax.data import preprocess
from vit_jax.sharding import put_sharded, to_host

__all__ = [
    "abstract_params",
    "ConfigError",
    "create_state",
    "Interrupted",
    "load_pretrained_params",
    "make_train_step",
    "MetricsLog",
    "MetricsWriteError",
    "NonFiniteLossError",
    "OtherProcessError",
    "resolve_num_classes",
    "StopRequest",
    "train_and_evaluate",
    "TrainState",
    "TrainStep",
]


Params = Any
# Checkpoint meta: the train metric sums since the last progress row (`metric_sums`), so the
# first progress row after a resume averages the same steps as without a stop. UNREPORTED is
# what checkpoints written before 2026-12-06 hold instead: one row per step.
TRAIN_SUMS = "train_metric_sums"
UNREPORTED = "unreported_train_metrics"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A config value the trainer cannot run with (the message names the key and the value)."""


class OtherProcessError(RuntimeError):
    """Process 0 stopped before training with an error (its own log has the details)."""


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C before the stop the first one asked for: the run ends at once, without
    saving the step in flight; the newest complete checkpoint is where a restart resumes."""


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """What a training step updates and a checkpoint keeps, as one pytree.

    `params` and `opt_state` are saved under the same names as the checkpoint's Orbax items
    (`vit_jax.workdir`); `step` (int32 scalar) is the number of steps done, which is the data
    position the next step trains on (the checkpoint's `meta.data_step`) and what the step's
    random numbers and learning rate are a function of. One sharding tree of the same shape
    (`create_state`) places it.
    """

    params: Params
    opt_state: Any
    step: Any


def abstract_params(model: nn.Module, image_size: tuple[int, int]) -> Params:
    return models.init_shapes(model, image_size)


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    image_size: tuple[int, int],
    seed: int,
) -> tuple[TrainState, TrainState]:
    """(state at step 0, its shardings: a `TrainState` of `NamedSharding`s), created already
    sharded (parameters and optimizer state by the family's rules, the step replicated)."""

    def init(rng):
        images = jnp.zeros((1, *image_size, 3), jnp.float32)
        params = model.init(rng, images, train=False)["params"]
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

    rng = jax.random.key(seed)
    shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


# ----------------------------------------------------------------------------- steps


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    objective: objectives.Objective | None = None,
) -> Callable:
    """`(state, batch, frozen) -> (state, metrics)`, not jitted.

    `objective` defaults to classification of `model`'s logits; `frozen` is the objective's
    frozen inputs (`objective.frozen`). Random numbers come from `fold_in(seed, state.step)`, so
    they don't depend on the device count or on a restart. A non-finite loss leaves params and
    optimizer state unchanged (the host stops); the step counts on.
    """
    if objective is None:
        objective = objectives.build_classification(config, model)
    accum = int(config.accum_steps)
    schedule = optim.learning_rate_schedule(config)
    base_rng = jax.random.key(config.seed)
    grad_fn = jax.value_and_grad(objective.loss)

    def step_fn(state: TrainState, batch, frozen):
        params, step = state.params, state.step
        rng = jax.random.fold_in(base_rng, step)
        images, labels = batch["image"], batch["label"]
        if accum == 1:
            loss, grads = grad_fn(params, images, labels, rng, frozen)
        else:
            # Micro-batch i takes examples i, i+accum, ...: every micro-batch spans all devices.
            split = lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1)
            micro = (split(images), split(labels), jnp.arange(accum))

            def body(carry, xs):
                loss_sum, grad_sum = carry
                im, lb, i = xs
                loss, grads = grad_fn(params, im, lb, jax.random.fold_in(rng, i), frozen)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(body, (0.0, zeros), micro)
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        metrics = {"train_loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step)}
        new_state = TrainState(
            params=keep(new_params, params),
            opt_state=keep(new_opt_state, state.opt_state),
            step=step + 1,
        )
        return new_state, metrics

    return step_fn


class TrainStep:
    """The jitted, sharded, state-donating train step: `step(state, batch) -> (state, metrics)`.

    `shardings` is the state's sharding tree (`create_state`); `objective` (default:
    classification) is built outside, with its frozen inputs on the mesh. The loop calls
    `accumulate`, the same step with its metrics added to on-device sums (`metric_sums`), so
    nothing has to be read between reports.
    """

    def __init__(self, model, tx, config, mesh, shardings: TrainState, objective=None):
        self.objective = objective or objectives.build_classification(config, model)
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.objective.frozen)
        rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        step_fn = make_train_step(model, tx, config, self.objective)
        self.jitted = jax.jit(
            step_fn,
            in_shardings=(shardings, batch_sh, frozen_sh),
            out_shardings=(shardings, rep),
            donate_argnums=(0,),
        )

        def accumulating(state: TrainState, batch, frozen, sums):
            done = state.step + 1  # the step number once this step is done
            state, metrics = step_fn(state, batch, frozen)
            return state, add_metrics(sums, done, metrics), done

        self.accumulating = jax.jit(
            accumulating,
            in_shardings=(shardings, batch_sh, frozen_sh, rep),
            out_shardings=(shardings, rep, rep),
            donate_argnums=(0, 3),
        )

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        return self.jitted(state, batch, self.objective.frozen)

    def accumulate(self, state: TrainState, batch, sums: dict) -> tuple[TrainState, dict, Any]:
        """(state, `sums` plus this step's metrics, the step's number as a device scalar to wait
        on); `state` and `sums` are donated. Nothing is read to the host."""
        return self.accumulating(state, batch, self.objective.frozen, sums)

    def lower(self, state: TrainState, batch):
        return self.jitted.lower(state, batch, self.objective.frozen)


# The on-device sums of the train metrics since the last progress row (`TrainStep.accumulate`):
# the means a progress row reports are sums / steps, so nothing is read between reports.
# `bad_step` is the first step whose loss was not finite (-1: none), `bad_loss` that loss.
_MEANS = ("train_loss", "grad_norm")


def metric_sums(
    steps: int = 0, train_loss: float = 0.0, grad_norm: float = 0.0, learning_rate: float = 0.0
) -> dict[str, np.ndarray]:
    """Host values of the metric sums (all zero: a fresh progress window)."""
    return {
        "steps": np.int32(steps),
        "train_loss": np.float32(train_loss),
        "grad_norm": np.float32(grad_norm),
        "learning_rate": np.float32(learning_rate),
        "bad_step": np.int32(-1),
        "bad_loss": np.float32(0.0),
    }


def add_metrics(sums: dict, step, metrics: dict) -> dict:
    """`sums` plus one step's metrics (in the graph; float32 sums, added in step order, so a run
    resumed from the checkpointed sums adds bit-for-bit what a straight run adds)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss = f32(metrics["train_loss"])
    first_bad = ~jnp.isfinite(loss) & (sums["bad_step"] < 0)
    return {
        "steps": sums["steps"] + 1,
        "train_loss": sums["train_loss"] + loss,
        "grad_norm": sums["grad_norm"] + f32(metrics["grad_norm"]),
        "learning_rate": f32(metrics["learning_rate"]),
        "bad_step": jnp.where(first_bad, jnp.asarray(step, jnp.int32), sums["bad_step"]),
        "bad_loss": jnp.where(first_bad, loss, sums["bad_loss"]),
    }


# ----------------------------------------------------------------------------- bookkeeping


class MetricsWriteError(RuntimeError):
    """metrics.jsonl or the TensorBoard events file could not be written (a full disk, an I/O
    error); the message names the file, the reason and the last complete checkpoint."""


def write_error_types() -> tuple[type[Exception], ...]:
    """What a failed file write raises: OSError, and TensorFlow's errors of its file system (the
    TensorBoard writer is TensorFlow's: a full disk is its ResourceExhaustedError)."""
    import tensorflow as tf  # already loaded: clu's SummaryWriter and the data pipeline use it

    e = tf.errors
    return (
        OSError,
        e.ResourceExhaustedError,
        e.UnavailableError,
        e.FailedPreconditionError,
        e.DataLossError,
        e.PermissionDeniedError,
        e.NotFoundError,
        e.AbortedError,
        e.UnknownError,
    )


def write_error_text(error: BaseException) -> tuple[str | None, str]:
    """(the file, if the error names it; the reason) of a failed write, each on one line."""
    if isinstance(error, OSError):
        return error.filename, error.strerror or str(error)
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text.strip())  # TF's {{function_node ...}} prefix
    first = text.splitlines()[0].strip() if text else type(error).__name__
    named = re.fullmatch(r"(\S+); (.+)", first)  # "PATH; No space left on device"
    return (named.group(1), named.group(2)) if named else (None, first)


class MetricsLog:
    """Metrics to TensorBoard (clu) and, one JSON object per line, to metrics.jsonl.

    Process 0 writes both; the console gets the trainer's own lines, not clu's echo of every
    write (no clu LoggingWriter). A failed write (full disk, I/O error) raises
    `MetricsWriteError`, naming the file and `last_checkpoint()` (`the last complete checkpoint
    is 40`); after one, nothing more is written.
    """

    def __init__(
        self,
        workdir: epath.Path,
        last_checkpoint: Callable[[], str] = lambda: "see the checkpoints folder",
    ):
        self.is_main = jax.process_index() == 0
        writers = [metric_writers.SummaryWriter(str(workdir))] if self.is_main else []
        self.writer = metric_writers.MultiWriter(writers)
        self.workdir, self.path = workdir, workdir / workdir_lib.METRICS_JSONL
        self.last_checkpoint = last_checkpoint
        self.failed = False

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.failed:
            return
        with self._reporting_failures():
            self.writer.write_scalars(step, metrics)
        if self.is_main:
            with self._reporting_failures(), self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        """Flushes and closes; a failure is `MetricsWriteError` (once: not after a failed write)."""
        if self.failed:
            with contextlib.suppress(Exception):
                self.writer.close()
            return
        with self._reporting_failures():
            self.writer.flush()
            self.writer.close()

    def close_on_exit(self, exc_type, exc, tb) -> bool:
        """`close` as an ExitStack exit callback: its failure is raised only when no other
        error is already on its way out (that one is the one to report)."""
        try:
            self.close()
        except MetricsWriteError:
            if exc_type is None:
                raise
        return False

    @contextlib.contextmanager
    def _reporting_failures(self):
        try:
            yield
        except write_error_types() as e:
            self.failed = True
            path, reason = write_error_text(e)
            what = path or f"the TensorBoard events file in {self.workdir}"
            raise MetricsWriteError(
                f"could not write {what}: {reason}; {self.last_checkpoint()}"
            ) from None


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, save, exit cleanly. With several
    processes the stop is agreed at the loop's next check step (`agree`), so it lands on the same
    step everywhere; with one, after the step in flight. A second SIGINT before then raises
    `Interrupted` (a user who will not wait for a slow step, eval or save); a repeated SIGTERM
    changes nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested:
            raise Interrupted()
        again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
        logging.warning("received signal %d: saving a checkpoint after this step%s", signum, again)
        self.requested = True

    def poll(self, save_failed: bool = False) -> tuple[bool, bool]:
        """This process's (stop requested, a checkpoint save failed): no communication, so the
        loop asks after every step. With several processes only `agree`'s answer may stop a run."""
        return self.requested, save_failed

    @staticmethod
    def agree(stop: bool, save_failed: bool) -> tuple[bool, bool]:
        """(a stop was requested, a checkpoint save failed), each on any process: one all-gather
        of two flags when there are several processes, so every process must call it at the same
        steps (the loop's check steps); then a stop lands on the same step everywhere."""
        if jax.process_count() == 1:
            return stop, save_failed
        flags = multihost_utils.process_allgather(np.asarray([stop, save_failed]))
        flags = np.asarray(flags).reshape(-1, 2)
        return bool(np.any(flags[:, 0])), bool(np.any(flags[:, 1]))

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_num_classes(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> int:
    return int(config.num_classes) if config.num_classes > 0 else info.num_classes


def load_pretrained_params(config: ml_collections.ConfigDict, init_params: Params) -> Params:
    """Host params from `pretrained_path` (or `pretrained_dir` + model name), fit to the model
    (`weights.open` + `weights.fit`: new head, resampled position table). Warns when the weights
    were trained on inputs normalised otherwise than `config.pp.mean` / `std` say."""
    from vit_jax import weights  # heavy optional paths (PyTorch formats) load lazily
    from vit_jax.weights import names

    path = config.pretrained_path or names.resolve_pretrained(
        config.pretrained_dir, config.model_name
    )
    logging.info("loading pretrained weights from %s", path)
    params, meta = weights.open(path)
    ours = preprocess.normalization(config.pp.get("mean"), config.pp.get("std"))
    theirs = preprocess.normalization(**meta["normalization"])
    if ours != theirs:
        logging.warning(
            "%s was trained on inputs normalised with mean %s / std %s, this run uses %s / %s: "
            "set config.pp.mean and config.pp.std to match",
            path,
            theirs["mean"],
            theirs["std"],
            ours["mean"],
            ours["std"],
        )
    return weights.fit(
        params,
        meta,
        config.model,
        init_params,
        image_size=image_size(config),
        new_head=True,
        what=str(path),
    )


# ----------------------------------------------------------------------------- loop


_AGREED_ERRORS: tuple[type[Exception], ...] = (
    run_lock.WorkdirLockedError,
    run_config.ConfigChangeError,
)


def _on_process_0(fn: Callable[[], Any]) -> Any:
    """Runs `fn` on process 0; its error is raised on every process, so all stop together.

    A lock or config refusal is raised with the same type and message everywhere (one line, the
    same exit code); any other error of process 0 as `OtherProcessError` on the others.
    """
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
    if jax.process_count() > 1:
        buf = np.zeros(4096, np.int32)
        if error is not None:
            text = str(error).encode()[: buf.size - 2]
            kind = type(error)
            buf[0] = _AGREED_ERRORS.index(kind) + 1 if kind in _AGREED_ERRORS else 255
            buf[1] = len(text)
            buf[2 : 2 + len(text)] = np.frombuffer(text, np.uint8)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        if buf[0] and error is None:
            text = bytes(buf[2 : 2 + buf[1]].astype(np.uint8)).decode(errors="replace")
            if buf[0] == 255:
                error = OtherProcessError(f"process 0 stopped: {text}")
            else:
                error = _AGREED_ERRORS[int(buf[0]) - 1](text)
    if error is not None:
        raise error
    return result


def _check_restart(config: ml_collections.ConfigDict, wd: epath.Path) -> dict[str, Any]:
    """Allowed config changes against the run's stored config ({} for a run not yet saved)."""
    if not workdir_lib.step_dirs(wd / workdir_lib.CHECKPOINTS):
        return {}  # fresh, or stopped before its first checkpoint: the new config is the config
    stored = run_config.read_stored(wd)
    if stored is None:
        logging.warning(
            "%s has checkpoints but no readable %s: the config cannot be compared",
            wd,
            workdir_lib.CONFIG_JSON,
        )
        return {}
    return run_config.check_restart(wd, stored, run_config.as_dict(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from the newest checkpoint in `workdir`) and returns the final metrics.

    Holds the workdir's lock for the whole run; refuses a restart whose config changes what the
    checkpoints depend on (`run_config`) before anything is written.
    """
    total = int(config.total_steps)
    if total < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total}")
    wd = workdir_lib.resolve(workdir)
    lock = run_lock.RunLock(wd)

    def take_lock() -> None:
        wd.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    _on_process_0(take_lock)
    try:
        changed = _on_process_0(lambda: _check_restart(config, wd)) or {}
        return _train(config, wd, changed)
    finally:
        lock.release()


@dataclasses.dataclass
class _Run:
    """The model and its sharded training state, as the run holds them between steps."""

    model: nn.Module
    tx: optax.GradientTransformation
    state: TrainState
    shardings: TrainState
    num_classes: int
    image_size: tuple[int, int]


def _train(
    config: ml_collections.ConfigDict, wd: epath.Path, changed: dict[str, Any]
) -> dict[str, float]:
    """config -> mesh -> data -> model -> state -> restore -> loop -> end (see the module doc)."""
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    info = data.get_info(config)
    run = _init_state(config, mesh, info)
    is_main = jax.process_index() == 0
    if is_main:
        for name in workdir_lib.remove_temporaries(wd):
            logging.info("removed %s, left by an unfinished save", name)
    with contextlib.ExitStack() as cleanup:
        writer = _open_checkpoints(config, wd, cleanup)
        start_step, sums = _restore(config, writer, run)
        meta = functools.partial(_meta, config, info, run)
        total = int(config.total_steps)
        if start_step >= total:
            final = wd / workdir_lib.FINAL_NPZ
            if start_step == total and config.write_final_npz and not final.exists():
                _write_final_npz(wd, run.state.params, meta(start_step))
            logging.warning("already at step %d of %d: nothing to do", start_step, total)
            return {"step": start_step, "nothing_to_do": True}
        if is_main:
            _record_start(config, wd, changed, start_step)
        loop = _Loop(config, wd, mesh, run, writer, meta, start_step, cleanup)
        return loop.run(sums)


def _init_state(config: ml_collections.ConfigDict, mesh, info: data.DatasetInfo) -> _Run:
    """The model the config names and its optimizer state, initialised already sharded."""
    num_classes = resolve_num_classes(config, info)
    model = models.get_model(config.model, num_classes=num_classes)
    size = image_size(config)
    tx = optim.make_optimizer(
        config, abstract_params(model, size), no_decay=models.no_decay_patterns(config.model)
    )
    state, shardings = create_state(model, tx, mesh, size, config.seed)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    logging.info(
        "model %s: %s parameters, %d classes", config.model_name, f"{n_params:,}", num_classes
    )
    return _Run(model, tx, state, shardings, num_classes, size)


def _open_checkpoints(
    config: ml_collections.ConfigDict, wd: epath.Path, cleanup: contextlib.ExitStack
) -> workdir_lib.CheckpointWriter:
    """The run's checkpoint writer, closed (pending saves finished) when `cleanup` exits."""
    mngr = workdir_lib.checkpoint_manager(
        wd, max_to_keep=config.max_to_keep, async_save=config.async_checkpointing
    )
    writer = workdir_lib.CheckpointWriter(mngr, async_save=bool(config.async_checkpointing))

    def close_writer(exc_type, exc, tb) -> bool:
        try:
            writer.close()
        except workdir_lib.CheckpointSaveError:
            if exc_type is None:
                raise  # otherwise the error already propagating is the one to report
        return False

    cleanup.push(close_writer)
    return writer


def _restore(
    config: ml_collections.ConfigDict, writer: workdir_lib.CheckpointWriter, run: _Run
) -> tuple[int, dict[str, np.ndarray]]:
    """Loads the newest checkpoint that restores (else pretrained weights) into `run.state`;
    the data step to start from (0 for a fresh run) and the host train metric sums of the
    checkpoint's steps after its last progress row (`metric_sums`; so the next row averages the
    same steps as without a stop)."""
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        run.state,
        run.shardings,
    )
    restored = workdir_lib.restore_newest(writer.mngr, abstract)
    if restored is not None:
        run.state, restored_meta, latest = restored
        start_step = int(restored_meta["data_step"])
        logging.info("resumed from %s at step %d", writer.directory / str(latest), start_step)
        return start_step, _restored_sums(restored_meta)
    if config.pretrained_path or config.pretrained_dir:
        host = load_pretrained_params(config, to_host(run.state.params))
        run.state = run.state.replace(params=put_sharded(host, run.shardings.params))
    return 0, metric_sums()


def _restored_sums(meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The metric sums a checkpoint's meta records (its per-step rows before 2026-12-06, none
    before 2026-11-29)."""
    if TRAIN_SUMS in meta:
        return metric_sums(**meta[TRAIN_SUMS])
    rows = meta.get(UNREPORTED, [])
    sums = {k: np.float32(0.0) for k in _MEANS}
    for row in rows:
        sums = {k: np.float32(sums[k] + np.float32(row[k])) for k in _MEANS}
    lr = rows[-1]["learning_rate"] if rows else 0.0
    return metric_sums(len(rows), **{k: float(v) for k, v in sums.items()}, learning_rate=lr)


def _meta(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, run: _Run, step: int
) -> dict[str, Any]:
    """What a checkpoint and final.npz record about the run at `step`."""
    return {
        "step": step,
        "data_step": step,
        "seed": int(config.seed),
        "model_name": config.model_name,
        "model": config.model.to_dict(),
        "num_classes": run.num_classes,
        "class_names": list(info.class_names)[: run.num_classes],
        "dataset": str(config.dataset),
        "image_size": list(run.image_size),
        "normalization": preprocess.normalization(config.pp.get("mean"), config.pp.get("std")),
        "eval_preprocessing": preprocess.eval_geometry(config.pp),
    }


def _record_start(
    config: ml_collections.ConfigDict, wd: epath.Path, changed: dict[str, Any], start_step: int
) -> None:
    """Process 0: the allowed config changes logged, the start recorded, metrics cut back."""
    for key, (old, new) in changed.items():
        logging.warning("restart with a changed %s: %s -> %s", key, old, new)
    run_config.record_start(wd, config, start_step, changed)
    dropped = workdir_lib.truncate_metrics(wd, start_step)
    if dropped:
        logging.info("dropped %d metrics rows after step %d (replayed now)", dropped, start_step)


# Steps the host may dispatch ahead of the devices: enough that a slow batch or a log line never
# leaves the devices idle, few enough that the batches of queued steps stay a small memory cost.
STEPS_IN_FLIGHT = 4


class _Loop:
    """The training loop and its side jobs: progress, eval, checkpoints, stop requests.

    Only check steps read anything from the devices: progress, eval and checkpoint steps and the
    last step (`is_check_step`). Between them the host dispatches steps (at most
    `STEPS_IN_FLIGHT` ahead), the data iterator places the next batches
    (`config.prefetch` ahead) while they run, and the train metrics are summed on the devices.
    At a check step the sums are read (a non-finite loss since the last check stops the run,
    before anything is saved) and, with several processes, the stop / failed-save flags are
    agreed (`StopRequest.agree`): the only cross-host collective of the loop.
    """

    # The context the steps between check steps run in (a seam for tests: e.g.
    # `jax.transfer_guard_device_to_host("disallow")` proves they read nothing).
    between_checks = staticmethod(contextlib.nullcontext)

    def __init__(self, config, wd, mesh, run: _Run, writer, meta, start_step: int, cleanup):
        self.config, self.training, self.writer, self.meta = config, run, writer, meta
        self.wd, self.total = wd, int(config.total_steps)
        self.start_step = self.saved_step = start_step
        self.batch_sh = sharding.batch_sharding(mesh)
        self.train_iter = data.train_iterator(config, self.batch_sh, start_step=start_step)
        objective = objectives.build(config, run.model, mesh)
        self.train_step = TrainStep(run.model, run.tx, config, mesh, run.shardings, objective)
        self.evaluators = evaluators.build_all(config, run.model, mesh, run.shardings.params)
        self.log = MetricsLog(wd, self.last_complete)
        cleanup.push(self.log.close_on_exit)
        self.stop = StopRequest()
        cleanup.callback(self.stop.restore_handlers)
        self.per_device = config.batch / jax.device_count()
        self.sums_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), metric_sums())
        self.intervals = [
            int(config.progress_every),
            int(config.eval_every),
            int(config.checkpoint_every),
        ]

    def is_check_step(self, step: int) -> bool:
        """Whether the loop reads the devices after `step` (the same on every process)."""
        return step == self.total or any(step % every == 0 for every in self.intervals)

    def save(self, step: int, sums: dict[str, float]) -> None:
        """Checkpoint `step`, with the host metric sums of its steps since the last progress row."""
        unreported = {"steps": int(sums["steps"])}
        unreported.update({k: float(sums[k]) for k in (*_MEANS, "learning_rate")})
        meta = {**self.meta(step), TRAIN_SUMS: unreported}
        self.writer.save(step, self.training.state, meta)
        self.saved_step = step
        where = self.writer.directory / str(step)
        if self.writer.async_save:
            logging.info("step %d: saving checkpoint %s in the background", step, where)
        else:
            logging.info("step %d: saved checkpoint %s", step, where)

    def _newest_checkpoint(self) -> str | None:
        """The newest checkpoint on disk, after any pending save finished (or failed)."""
        try:
            self.writer.wait()
        except workdir_lib.CheckpointSaveError:
            pass
        steps = workdir_lib.step_dirs(self.writer.directory)
        return steps[0].name if steps else None

    def last_good(self) -> str:
        newest = self._newest_checkpoint()
        return f"step {newest}" if newest else "none written yet"

    def last_complete(self) -> str:
        """As a failed save says it (`CheckpointSaveError`)."""
        newest = self._newest_checkpoint()
        return (
            f"the last complete checkpoint is {newest}"
            if newest
            else "no complete checkpoint was written"
        )

    def run_eval(self, step: int) -> dict[str, float]:
        """Every evaluator of `config.evals` on the current parameters; one metrics row."""
        results: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics = evaluator.run(self.training.state.params)
            logging.info("step %d: %s", step, evaluator.describe(metrics))
            results.update(metrics)
        self.log.write(step, evaluators.logged(results))
        return results

    def report(self, step: int, host: dict[str, float], steps_per_sec: float) -> None:
        host["img_per_sec_per_device"] = steps_per_sec * self.per_device
        self.log.write(step, host)
        eta = (self.total - step) / max(steps_per_sec, 1e-9)
        img_per_sec = steps_per_sec * self.config.batch
        postfix = f"loss {host['train_loss']:.4f}, lr {host['learning_rate']:.2e}"
        postfix = f"{postfix}, {img_per_sec:.0f} img/s"
        logging.info(
            "step %d/%d: loss %.4f, lr %.2e, %.2f steps/s, %.0f img/s, ETA %s",
            step,
            self.total,
            host["train_loss"],
            host["learning_rate"],
            steps_per_sec,
            img_per_sec,
            _hms(eta),
            # A console may draw a bar instead (it shows steps/s and ETA itself).
            extra={
                "progress": (step, self.total),
                "postfix": f"{postfix}, {img_per_sec:.0f} img/s",
            },
        )

    def run(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Steps from `start_step` to `total_steps` (or a stop request); the final metrics.
        `sums`: the restored checkpoint's metric sums of the steps not yet in a progress row."""
        n = jax.device_count()
        logging.info(
            "training steps %d-%d, batch %d over %d device%s",
            self.start_step + 1,
            self.total,
            self.config.batch,
            n,
            "" if n == 1 else "s",
            extra={"progress": (self.start_step, self.total)},
        )
        loop_start = time.perf_counter()
        try:
            step, results = self._steps(sums)
        except _NonFiniteLoss as e:
            raise NonFiniteLossError(
                f"training loss is {e.loss} at step {e.step}, the first non-finite loss of steps "
                f"{e.first}-{e.last}; stopping (last good checkpoint: {self.last_good()}). "
                "Restart with a lower base_lr or more warmup_steps; switching grad_norm_clip on "
                "needs a new workdir."
            ) from None
        self.writer.wait()
        train_seconds = time.perf_counter() - loop_start
        if step == self.total and self.config.write_final_npz:
            _write_final_npz(self.wd, self.training.state.params, self.meta(step))
        steps_run = step - self.start_step
        return {
            "step": step,
            **results,
            "steps_run": steps_run,
            "train_seconds": train_seconds,
            "img_per_sec": steps_run * self.config.batch / max(train_seconds, 1e-9),
        }

    def _steps(self, sums: dict[str, np.ndarray]) -> tuple[int, dict[str, float]]:
        """The loop proper: (the last step run, the last eval's results)."""
        config, total, single = self.config, self.total, jax.process_count() == 1
        results: dict[str, float] = {}
        step = self.start_step
        device_sums = put_sharded(sums, self.sums_sharding)
        window = _Window(step)
        in_flight: collections.deque = collections.deque()
        while step < total:
            with self.between_checks():  # nothing is read from the devices in here
                while True:
                    step, device_sums = self._dispatch(step, device_sums, in_flight)
                    check = self.is_check_step(step)
                    stop_requested, save_failed = self._poll()
                    if check or (single and (stop_requested or save_failed)):
                        break  # (one process acts at once: nobody to agree with)
            host = window.check(step, device_sums)  # a non-finite loss stops here
            if check:
                stop_requested, save_failed = self.stop.agree(stop_requested, save_failed)
            if save_failed:
                raise self.writer.poll() or workdir_lib.CheckpointSaveError(
                    f"a checkpoint save failed on another process (step {step}); see its log"
                )
            done = step == total
            stopping = stop_requested and not done
            if host["steps"] and (step % config.progress_every == 0 or done or stopping):
                self.report(step, *window.flush(step, host))
                host = metric_sums()
                device_sums = put_sharded(host, self.sums_sharding)
            if step % config.eval_every == 0 or done:
                results = self.run_eval(step)
            if step % config.checkpoint_every == 0 or done or stopping:
                self.save(step, host)
            if stopping:
                self.writer.wait()
                logging.warning("stopped at step %d on request; checkpoint saved", step)
                break
        return step, results

    def _dispatch(self, step: int, sums: dict, in_flight: collections.deque) -> tuple[int, dict]:
        """Starts the next step (its batch already on the devices); waits only for the step
        `STEPS_IN_FLIGHT` back to finish, never reads a value."""
        run = self.training
        batch = next(self.train_iter)
        run.state, sums, done = self.train_step.accumulate(run.state, batch, sums)
        in_flight.append(done)
        if len(in_flight) > STEPS_IN_FLIGHT:
            in_flight.popleft().block_until_ready()
        return step + 1, sums

    def _poll(self) -> tuple[bool, bool]:
        """This process's (stop requested, checkpoint save failed); once per step."""
        return self.stop.poll(self.writer.poll() is not None)


class _NonFiniteLoss(Exception):
    """A NaN/Inf training loss at `step`, the first of steps `first`-`last` (the interval the
    check at `last` covers); the loop turns it into `NonFiniteLossError`."""

    def __init__(self, step: int, loss: float, first: int, last: int):
        super().__init__(step, loss, first, last)
        self.step, self.loss, self.first, self.last = step, loss, first, last


class _Window:
    """The host's side of the on-device metric sums: reads them at check steps, turns them into
    a progress row (means since the last row, steps/s).

    A NaN/Inf loss since the last check raises `_NonFiniteLoss`; each such step itself left the
    state unchanged (the step's guard), so the checkpoints written before are good.
    """

    def __init__(self, step: int):
        self.start_time, self.start_step = time.perf_counter(), step
        self.checked_step = step

    def check(self, step: int, sums: dict) -> dict[str, float]:
        """The sums as host numbers (the one device read of the interval)."""
        host = {k: v.item() for k, v in to_host(sums).items()}
        first, self.checked_step = self.checked_step + 1, step
        if host["bad_step"] >= 0:
            raise _NonFiniteLoss(host["bad_step"], host["bad_loss"], first, step)
        return host

    def flush(self, step: int, host: dict[str, float]) -> tuple[dict[str, float], float]:
        """Mean loss / grad norm and the last learning rate since the last flush; steps/s."""
        now = time.perf_counter()
        steps_per_sec = (step - self.start_step) / max(now - self.start_time, 1e-9)
        self.start_time, self.start_step = now, step
        n = max(host["steps"], 1)
        out = {k: host[k] / n for k in _MEANS}
        out["learning_rate"] = host["learning_rate"]
        return out, steps_per_sec


def _write_final_npz(wd: epath.Path, params: Params, meta: dict[str, Any]) -> None:
    """final.npz in the published layout, with a JSON sidecar naming the model and classes."""
    from vit_jax import checkpoint

    host = to_host(params)
    if jax.process_index() == 0:
        checkpoint.save_npz(host, wd / workdir_lib.FINAL_NPZ, metadata=meta, overwrite=True)
        logging.info("wrote %s", wd / workdir_lib.FINAL_NPZ)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
