"""Checkpoint faults that are not damage, and disk errors as one line.

A checkpoint that cannot be read now (permission denied, a dangling link, a FIFO) stops the
trainer with one line and changes nothing; only wrong bytes (here: a file the checkpoint lists,
missing) set it aside, with the command that puts it back and the steps that will be replayed.
A full disk while writing metrics or a checkpoint is one `error:` line naming the last complete
checkpoint; readers on a damaged newest checkpoint print no asyncio tracebacks.
"""

import errno
import os
import re
import shutil
import subprocess
import sys
import threading

import orbax.checkpoint as ocp
import pytest
import tiny

from vit_jax import trainer
from vit_jax import workdir as workdir_lib
from vit_jax.weights import run as run_lib

RUN = dict(total_steps=40, checkpoint_every=20, eval_every=40, progress_every=10)


@pytest.fixture(scope="module")
def run(build_once):
    """The finished tiny run of test_workdir_integrity (the same build, shared): checkpoints 20
    and 40. Tests change only their copies."""
    return build_once(
        "integrity-run", lambda wd: trainer.train_and_evaluate(tiny.tiny_config(**RUN), str(wd))
    )


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def _snapshot(wd):
    """Every path under `wd` (links as links) with the bytes of each file."""
    out = {}
    for p in sorted(wd.rglob("*")):
        key = str(p.relative_to(wd))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file():
            out[key] = p.read_bytes()
        else:
            out[key] = "dir" if p.is_dir() else "other"
    return out


def _one_line(message: str) -> str:
    assert "\n" not in message
    return message


UNREADABLE_TAIL = "; nothing was moved or changed: fix that and run the same command again"


# ----------------------------------------------------------------------------- the rule


def test_unreadable_cause_separates_access_errors_from_damage(tmp_path):
    step = tmp_path / "60"
    step.mkdir()
    denied = PermissionError(errno.EACCES, "Permission denied", str(step / "meta" / "metadata"))
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = denied
    assert run_lib.unreadable_cause(wrapped, step) == f"{step}/meta/metadata: Permission denied"
    io_error = OSError(errno.EIO, "Input/output error")
    assert run_lib.unreadable_cause(io_error, step) == f"{step}: Input/output error"
    ts = ValueError(
        'PERMISSION_DENIED: Error reading "a/.zarray" in OCDBT database at local file '
        f'"{step}/params/": Failed to open: "{step}/params/manifest.ocdbt": Permission denied '
        "[os_error_code='13'] [tensorstore_spec='{\\\"path\\\":\\\"/x/\\\"}']"
    )
    assert run_lib.unreadable_cause(ts, step) == f"{step}/params/manifest.ocdbt: Permission denied"
    remote = ValueError('UNAVAILABLE: Error reading "gs://b/run/checkpoints/60/params/d/1"')
    assert (
        run_lib.unreadable_cause(remote, step)
        == "gs://b/run/checkpoints/60/params/d/1: unavailable"
    )
    assert run_lib.unreadable_cause(MemoryError(), step) == "out of memory"
    # Damage: wrong or missing bytes of a step folder that is there.
    for damaged in (
        ValueError('OUT_OF_RANGE: Error reading byte range of local file "/x/d/1"'),
        ValueError("DATA_LOSS: checksum mismatch"),
        ValueError("NOT_FOUND: Metadata at \"a/.zarray\" does not exist [os_error_code='2']"),
        FileNotFoundError(f"File {step}/meta/metadata not found."),
        KeyError('Item "params" was not found'),
        ValueError("Expecting value: line 1 column 82 (char 81)"),
    ):
        assert run_lib.unreadable_cause(damaged, step) is None, damaged
    # ... but the step folder itself gone is not.
    gone = tmp_path / "80"
    assert run_lib.unreadable_cause(FileNotFoundError("x"), gone) == f"{gone} does not exist"


# ----------------------------------------------------------------------------- unreadable now


def test_permission_denied_on_a_file_stops_the_trainer_and_changes_nothing(
    run, tmp_path, monkeypatch
):
    """The file cannot be opened (root ignores chmod: `os.open` refuses it instead)."""
    wd = _copy(run, tmp_path)
    manifest = wd / "checkpoints" / "40" / "params" / "manifest.ocdbt"
    real_open = os.open

    def open_denied(path, flags, *args, **kwargs):
        if os.fspath(path) == str(manifest):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_denied)
    before = _snapshot(wd)
    expected = f"cannot read checkpoint 40: {manifest}: Permission denied{UNREADABLE_TAIL}"
    with pytest.raises(workdir_lib.CheckpointUnreadableError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
    assert _one_line(str(e.value)) == expected
    assert _snapshot(wd) == before
    with pytest.raises(workdir_lib.CheckpointUnreadableError) as e:  # readers: no older one
        workdir_lib.load_trained(wd)
    assert str(e.value) == expected
    monkeypatch.undo()  # readable again: the run continues from 40
    assert workdir_lib.load_trained(wd)[1]["step"] == 40


def test_permission_error_while_orbax_reads_is_not_damage(run, tmp_path, monkeypatch):
    """A file that turns unreadable after the check, as Orbax reads it."""
    wd = _copy(run, tmp_path)
    real_restore = ocp.JsonCheckpointHandler.restore

    def restore(self, directory, *args, **kwargs):
        if directory.name == "meta" and directory.parent.name == "40":
            path = str(directory / "metadata")
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_restore(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "restore", restore)
    before = _snapshot(wd)
    with pytest.raises(workdir_lib.CheckpointUnreadableError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
    meta = wd / "checkpoints" / "40" / "meta" / "metadata"
    assert _one_line(str(e.value)) == (
        f"cannot read checkpoint 40: {meta}: Permission denied{UNREADABLE_TAIL}"
    )
    assert _snapshot(wd) == before


def test_dangling_link_for_the_step_folder_stops_the_trainer_and_changes_nothing(run, tmp_path):
    wd = _copy(run, tmp_path)
    step = wd / "checkpoints" / "40"
    shutil.rmtree(step)
    step.symlink_to(tmp_path / "unmounted" / "40")
    before = _snapshot(wd)
    expected = (
        f"cannot read checkpoint 40: {step} is a link to {tmp_path}/unmounted/40, which does not "
        f"exist{UNREADABLE_TAIL}"
    )
    with pytest.raises(workdir_lib.CheckpointUnreadableError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
    assert _one_line(str(e.value)) == expected
    assert _snapshot(wd) == before and step.is_symlink()
    with pytest.raises(workdir_lib.CheckpointUnreadableError) as e:  # not checkpoint 20 instead
        workdir_lib.load_trained(wd)
    assert str(e.value) == expected


class _FifoWatch:
    """Notices a reader blocked opening `fifo` (then opens it for writing, so the reader gets
    end-of-file: a regression fails instead of hanging)."""

    def __init__(self, fifo):
        self.fifo, self.opened, self.done = str(fifo), False, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while not self.done.wait(0.05):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no reader
            except OSError:
                continue
            self.opened = True
            os.close(fd)

    def stop(self) -> bool:
        self.done.set()
        self.thread.join()
        return self.opened


@pytest.mark.timeout(180)
def test_fifo_in_a_step_folder_is_refused_and_never_opened(run, tmp_path):
    wd = _copy(run, tmp_path)
    meta = wd / "checkpoints" / "40" / "meta" / "metadata"
    meta.unlink()
    os.mkfifo(meta)
    before = _snapshot(wd)
    expected = (
        f"cannot read checkpoint 40: {meta} is a FIFO (named pipe), not a regular file (not opened)"
        f"{UNREADABLE_TAIL}"
    )
    watch = _FifoWatch(meta)
    try:
        with pytest.raises(workdir_lib.CheckpointUnreadableError) as reader:
            workdir_lib.load_trained(wd)
        with pytest.raises(workdir_lib.CheckpointUnreadableError) as training:
            trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
    finally:
        opened = watch.stop()
    assert not opened, "the FIFO was opened"
    assert str(reader.value) == _one_line(str(training.value)) == expected
    assert _snapshot(wd) == before


# ----------------------------------------------------------------------------- damage


def test_a_missing_file_the_checkpoint_lists_is_damage_and_can_be_put_back(run, tmp_path, caplog):
    wd = _copy(run, tmp_path)
    ckpts = wd / "checkpoints"
    (ckpts / "40" / "params" / "manifest.ocdbt").unlink()
    damaged = _snapshot(ckpts / "40")
    with caplog.at_level("INFO"):
        results = trainer.train_and_evaluate(tiny.tiny_config(**RUN), str(wd))
    assert results["step"] == 40
    assert f"checkpoint {ckpts}/40 cannot be restored: ValueError: NOT_FOUND" in caplog.text
    command = f"mv {ckpts}/40.damaged {ckpts}/40"
    assert (
        f"moved the damaged checkpoint 40 aside to {ckpts}/40.damaged; to put it back (no "
        f"trainer running): {command}"
    ) in caplog.messages
    assert "resuming from step 20: steps 21-40 will be replayed" in caplog.messages
    assert _snapshot(ckpts / "40.damaged") == damaged
    shutil.rmtree(ckpts / "40")  # the replayed one: the command puts the set-aside one back
    subprocess.run(command, shell=True, check=True)
    assert _snapshot(ckpts / "40") == damaged and not (ckpts / "40.damaged").exists()


# ----------------------------------------------------------------------------- full disks


def _error_lines(stderr: str) -> list[str]:
    """Error lines, ours (`error: ...`) and libraries' (`HH:MM:SS error: ...`) alike."""
    return [line for line in stderr.splitlines() if re.match(r"([\d:]+ )?error:", line)]


def _train_cli(wd, setup: str, **changes) -> subprocess.CompletedProcess:
    """`python -m vit_jax.train` as its __main__ runs it, after `setup` (Python code: the fault)."""
    code = (
        "import sys\n"
        "from vit_jax import cli\n"
        "cli.quiet_libraries()\n"
        f"{setup}\n"
        "from absl import app, flags\n"
        "from vit_jax import train\n"
        "flags.mark_flags_as_required(['workdir'])\n"
        "app.run(train.main, flags_parser=train.parse_flags)\n"
    )
    argv = tiny.train_command(wd, **changes)[3:]  # --config=..., --workdir=..., overrides
    return tiny.run([sys.executable, "-c", code, *argv], timeout=300)


def test_a_full_disk_under_the_tensorboard_writer_is_one_line_exit_1(run, tmp_path):
    """TensorFlow's ResourceExhaustedError from the events file's flush (a full disk between
    checkpoints) is one `error:` line naming the file and the last complete checkpoint."""
    wd = _copy(run, tmp_path)
    events = wd / "events.out.tfevents.test.v2"
    setup = f"""
import tensorflow as tf
from clu.metric_writers import SummaryWriter
real = SummaryWriter.write_scalars
def write_scalars(self, step, scalars):
    if step >= 50:
        raise tf.errors.ResourceExhaustedError(None, None, (
            "{{{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost/replica:0/task:0"
            "/device:CPU:0}}}} {events}; No space left on device\\n\\tFailed to flush 4 events to "
            "{events}\\n\\tCould not flush events file. [Op:FlushSummaryWriter] name: "))
    return real(self, step, scalars)
SummaryWriter.write_scalars = write_scalars
"""
    out = _train_cli(wd, setup, **{**RUN, "total_steps": 60})
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _error_lines(out.stderr)
    assert errors == [
        f"error: could not write {events}: No space left on device; the last complete "
        "checkpoint is 40"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_a_full_disk_under_metrics_jsonl_names_the_file_and_the_last_checkpoint(
    run, tmp_path, monkeypatch
):
    wd = _copy(run, tmp_path)
    path_type = type(workdir_lib.resolve(wd))  # the trainer's epath class
    real_open = path_type.open

    def open_full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(path_type, "open", open_full)
    with pytest.raises(trainer.MetricsWriteError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
    assert _one_line(str(e.value)) == (
        f"could not write {wd}/metrics.jsonl: No space left on device; the last complete "
        "checkpoint is 40"
    )
    assert not (wd / "train.lock").exists()


def test_a_failed_save_prints_only_our_error_line(run, tmp_path):
    """Every file write over 64 KiB fails (RLIMIT_FSIZE, as a full disk does): Orbax's own
    error lines about the failed save are not shown, ours is (exit 1)."""
    wd = _copy(run, tmp_path)
    shutil.rmtree(wd / "checkpoints" / "40")
    limit = "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))"
    out = _train_cli(wd, limit, **{**RUN, "total_steps": 100})
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _error_lines(out.stderr)
    assert len(errors) == 1, out.stderr[-3000:]
    # Which save first passes the limit depends on how Orbax packs the files (40 or 60 here).
    ours = re.fullmatch(
        rf"error: could not save checkpoint (\d+) to {wd}/checkpoints: File too large; the last "
        r"complete checkpoint is (\d+)",
        errors[0],
    )
    assert ours and int(ours[2]) == int(ours[1]) - 20, errors
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- readers


def test_readers_on_a_truncated_newest_checkpoint_print_no_asyncio_tracebacks(run, tmp_path):
    """The answer comes from the previous checkpoint; nothing is moved; no `Event loop is
    closed` (TensorStore reads of the failed restore calling back into Orbax's closed loop: about
    half of all loads printed dozens, so ten loads in one process, then the predict CLI)."""
    from PIL import Image

    wd = _copy(run, tmp_path)
    for f in (wd / "checkpoints" / "40" / "params").rglob("d/*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = _snapshot(wd)
    loads = tiny.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from vit_jax import weights\n"
            "for _ in range(10):\n"
            "    assert weights.open(sys.argv[1])[1]['step'] == 20\n",
            str(wd),
        ],
        timeout=300,
    )
    assert loads.returncode == 0, loads.stderr[-3000:]
    assert "Event loop is closed" not in loads.stderr, loads.stderr[-3000:]
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8)).save(image)
    predict = tiny.run(
        [sys.executable, "-m", "vit_jax.predict", "--checkpoint", str(wd), str(image)],
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "Event loop is closed" not in predict.stderr and "Traceback" not in predict.stderr
    assert re.search(rf"skipping checkpoint {wd}/checkpoints/40: it is damaged", predict.stderr)
    assert _snapshot(wd) == before
