"""A training workdir is never corrupted: each fault is injected and its outcome asserted.

Lock (a second trainer refused, a dead holder's lock taken over), config check on restart,
damaged-checkpoint fallback (trainer moves aside, readers only skip), failing saves (async and
sync, and a real full disk where a tmpfs can be mounted), metrics rows once per step,
total_steps edge cases, and the train CLI's exit codes.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from vit_jax import checkpoint, run_config, run_lock, trainer
from vit_jax import workdir as workdir_lib

RUN = dict(total_steps=40, checkpoint_every=20, eval_every=40, progress_every=10)


@pytest.fixture(scope="module")
def run(build_once):
    """A finished tiny run: checkpoints 20 and 40, metrics, config history, final.npz (built
    once per session; tests change only their copies)."""
    return build_once(
        "integrity-run", lambda wd: trainer.train_and_evaluate(tiny.tiny_config(**RUN), str(wd))
    )


def _copy(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def _rows(wd):
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def _snapshot(wd):
    return {str(p.relative_to(wd)): p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_params(a, b):
    pa, pb = workdir_lib.load_trained(a)[0], workdir_lib.load_trained(b)[0]
    for x, y in zip(_leaves(pa), _leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- faults


def truncate_array(step_dir):
    """What a full disk or a crashed copy leaves: the params' array data cut in half."""
    for f in (step_dir / "params").rglob("d/*"):
        if f.is_file() and f.stat().st_size > 1000:
            with f.open("r+b") as fh:
                fh.truncate(f.stat().st_size // 2)


def delete_params(step_dir):
    shutil.rmtree(step_dir / "params")


def truncate_meta(step_dir):
    meta = step_dir / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:81])


FAULTS = {"truncated array": truncate_array, "no params": delete_params, "meta": truncate_meta}


# ----------------------------------------------------------------------------- lock


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    first = run_lock.RunLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / "train.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_lock.WorkdirLockedError) as e:
        run_lock.RunLock(tmp_path).acquire()
    assert str(tmp_path) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert "\n" not in str(e.value)
    first.release()
    assert not (tmp_path / "train.lock").exists()

    # SIGKILL leaves the file (the kernel drops the flock): the next trainer takes over.
    dead = _dead_pid()
    (tmp_path / "train.lock").write_text(json.dumps({"host": "h", "pid": dead, "started": "t"}))
    with caplog.at_level("WARNING"), run_lock.RunLock(tmp_path).held():
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    assert f"pid {dead}" in caplog.text and "no longer running" in caplog.text
    assert not (tmp_path / "train.lock").exists()


def test_lock_without_flock_uses_an_exclusive_file(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    lock_file = tmp_path / "train.lock"
    me = socket.gethostname()
    # A live pid on this host holds it; a pid on another host cannot be checked: both refuse.
    lock_file.write_text(json.dumps({"host": me, "pid": os.getppid(), "started": "t"}))
    with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {os.getppid()}"):
        run_lock.RunLock(tmp_path).acquire()
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(run_lock.WorkdirLockedError, match="remove .*train.lock"):
        run_lock.RunLock(tmp_path).acquire()
    # A dead pid on this host is stale.
    dead = _dead_pid()
    lock_file.write_text(json.dumps({"host": me, "pid": dead, "started": "t"}))
    with caplog.at_level("WARNING"), run_lock.RunLock(tmp_path).held():
        with pytest.raises(run_lock.WorkdirLockedError):
            run_lock.RunLock(tmp_path).acquire()
    assert f"pid {dead}" in caplog.text
    assert not lock_file.exists()


def test_trainer_on_a_locked_workdir_writes_nothing(run, tmp_path):
    wd = _copy(run, tmp_path)
    before = _snapshot(wd)
    with run_lock.RunLock(wd).held():
        with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 60}), str(wd))
        after = _snapshot(wd)
        after.pop("train.lock")
    assert after == before


@pytest.mark.slow
def test_two_trainers_one_refused_the_other_finishes(tmp_path):
    """A second trainer while the first runs (the CLI's exit code 2 for it: the multi-host test)."""
    wd = tmp_path / "run"
    changes = dict(total_steps=60, checkpoint_every=20, eval_every=1000, progress_every=10)
    first = subprocess.Popen(
        tiny.train_command(wd, **changes),
        cwd=tiny.ROOT,
        env=tiny.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (wd / "train.lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(run_lock.WorkdirLockedError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**changes), str(wd))
    first_still_running = first.poll() is None
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert first_still_running, "the first trainer ended before the second one tried"
    message = str(e.value)
    assert str(wd) in message and f"pid {first.pid}" in message
    assert f"host {socket.gethostname()}" in message
    rows = _rows(wd)
    train = [r["step"] for r in rows if "train_loss" in r]
    assert train == [10, 20, 30, 40, 50, 60]  # one writer: each step once
    assert [r["step"] for r in rows if "test_accuracy" in r] == [60]
    assert len(list(wd.glob("events.out.tfevents*"))) == 1
    assert not (wd / "train.lock").exists()


# ----------------------------------------------------------------------------- config


def test_restart_that_changes_shapes_is_refused_and_the_run_untouched(run, tmp_path):
    from vit_jax import inference

    wd = _copy(run, tmp_path)
    before = _snapshot(wd)
    changed = tiny.tiny_config(**{**RUN, "model.hidden_size": 48, "pp.crop": 6, "seed": 3})
    with pytest.raises(run_config.ConfigChangeError) as e:
        trainer.train_and_evaluate(changed, str(wd))
    message = str(e.value)
    assert "\n" not in message and str(wd) in message
    for part in ("model.hidden_size 32 -> 48", "pp.crop 8 -> 6", "seed 0 -> 3"):
        assert part in message
    assert "total_steps" not in message
    assert _snapshot(wd) == before  # config.json byte-identical, nothing else written
    loaded = inference.load_model(str(wd))  # predict's loader still reads the run
    assert loaded.params["head"]["kernel"].shape == (32, 10)


def test_resumable_keys_rule():
    stored = run_config.as_dict(tiny.tiny_config(**RUN))
    new = tiny.tiny_config(**{**RUN, "total_steps": 80, "base_lr": 1e-4, "mesh.data": 2})
    changed = run_config.check_restart("wd", stored, run_config.as_dict(new))
    assert set(changed) == {"total_steps", "base_lr", "mesh.data"}
    # Switching clipping on or off changes the optimizer state's layout; a new value does not.
    off = tiny.tiny_config(**{**RUN, "grad_norm_clip": 0.0})
    with pytest.raises(run_config.ConfigChangeError, match="grad_norm_clip 1.0 -> 0.0"):
        run_config.check_restart("wd", stored, run_config.as_dict(off))
    run_config.check_restart(
        "wd", stored, run_config.as_dict(tiny.tiny_config(**{**RUN, "grad_norm_clip": 2.0}))
    )
    extra = {**run_config.as_dict(tiny.tiny_config(**RUN)), "teacher": {"checkpoint": "t"}}
    with pytest.raises(run_config.ConfigChangeError, match='teacher.checkpoint <unset> -> "t"'):
        run_config.check_restart("wd", stored, extra)


# ----------------------------------------------------------------------------- damaged


@pytest.mark.parametrize("fault", FAULTS)
def test_reader_skips_a_damaged_newest_checkpoint_and_moves_nothing(run, tmp_path, fault, caplog):
    wd = _copy(run, tmp_path)
    FAULTS[fault](wd / "checkpoints" / "40")
    before = _snapshot(wd)
    with caplog.at_level("WARNING"):
        params, meta = workdir_lib.load_trained(wd)
    assert meta["step"] == 20 and params["head"]["kernel"].shape == (32, 10)
    assert "checkpoints/40" in caplog.text
    assert _snapshot(wd) == before


def test_reader_with_no_readable_checkpoint_names_what_it_tried(run, tmp_path):
    wd = _copy(run, tmp_path)
    truncate_array(wd / "checkpoints" / "40")
    truncate_meta(wd / "checkpoints" / "20")
    with pytest.raises(checkpoint.CheckpointError) as e:
        workdir_lib.load_trained(wd)
    message = str(e.value)
    assert "\n" not in message and str(wd) in message
    assert "40: ValueError: OUT_OF_RANGE" in message and "20: JSONDecodeError" in message
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no trainer checkpoint"):
        workdir_lib.load_trained(tmp_path)


def test_damaged_newest_checkpoint_moved_aside_and_run_resumed_bit_exactly(run, tmp_path, caplog):
    """A crash left checkpoint 40 truncated, an unfinished save, metrics logged to 40 and a torn
    last line; the restart changes the checkpoint cadence. It resumes from 20, replaces the rows
    after 20 (each step once, identical to the first run's), records the start and reaches the
    same weights."""
    wd = _copy(run, tmp_path)
    truncate_array(wd / "checkpoints" / "40")
    damaged = _snapshot(wd / "checkpoints" / "40")
    shutil.copytree(wd / "checkpoints" / "20", wd / "checkpoints" / "50.orbax-checkpoint-tmp")
    (wd / "final.npz").unlink()
    with (wd / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "train_lo')
    with caplog.at_level("WARNING"):
        config = tiny.tiny_config(**{**RUN, "checkpoint_every": 10})
        results = trainer.train_and_evaluate(config, str(wd))
    assert results["step"] == 40
    assert "checkpoints/40 cannot be restored: ValueError: OUT_OF_RANGE" in caplog.text
    assert _snapshot(wd / "checkpoints" / "40.damaged") == damaged  # kept, unchanged
    steps = ocp.CheckpointManager(wd / "checkpoints").all_steps()
    assert sorted(steps) == [30, 40]  # Orbax ignores the damaged directory (max_to_keep 2)
    assert not (wd / "checkpoints" / "50.orbax-checkpoint-tmp").exists()  # an unfinished save
    _assert_same_params(wd, run)
    assert (wd / "final.npz").exists()

    rows, ref = _rows(wd), _rows(run)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [10, 20, 30, 40, 40]
    for a, b in zip(rows, ref, strict=True):
        a.pop("img_per_sec_per_device", None), b.pop("img_per_sec_per_device", None)
        assert a == b
    history = [json.loads(x) for x in (wd / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 20]
    assert history[1]["changed"] == {"checkpoint_every": [20, 10]}
    assert history[1]["config"]["checkpoint_every"] == 10
    assert json.loads((wd / "config.json").read_text())["checkpoint_every"] == 10


def test_trainer_with_no_restorable_checkpoint_stops_and_moves_nothing(run, tmp_path):
    wd = _copy(run, tmp_path)
    ckpts = wd / "checkpoints"
    shutil.copytree(ckpts / "20", ckpts / "30")
    truncate_array(ckpts / "40")
    delete_params(ckpts / "30")
    truncate_meta(ckpts / "20")
    before = _snapshot(wd)
    with pytest.raises(workdir_lib.CheckpointDamagedError) as e:
        trainer.train_and_evaluate(tiny.tiny_config(**RUN), str(wd))
    message = str(e.value)
    assert "\n" not in message
    assert "step 40: ValueError: OUT_OF_RANGE" in message
    assert 'step 30: KeyError: Item "params" was not found' in message
    assert "step 20: JSONDecodeError" in message
    assert _snapshot(wd) == before


# ----------------------------------------------------------------------------- saves


def _disk_full(monkeypatch):
    """Orbax's writer of the `meta` item (it runs in the background for async saves) fails."""

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_checkpoint_writer_reports_a_failed_save_once(tmp_path, monkeypatch, async_save):
    mngr = workdir_lib.checkpoint_manager(tmp_path, max_to_keep=1, async_save=async_save)
    writer = workdir_lib.CheckpointWriter(mngr, async_save=async_save)
    tree = {"w": np.arange(1000, dtype=np.float32)}
    state = lambda step: trainer.TrainState(params=tree, opt_state=tree, step=np.int32(step))
    writer.save(1, state(1), {"step": 1})
    writer.wait()
    assert writer.poll() is None
    _disk_full(monkeypatch)
    expected = (
        f"could not save checkpoint 2 to {tmp_path}/checkpoints: No space left on device; "
        "the last complete checkpoint is 1"
    )
    try:
        writer.save(2, state(2), {"step": 2})
    except workdir_lib.CheckpointSaveError as e:
        assert not async_save and str(e) == expected
    else:
        assert async_save  # the failure surfaces later, from the background
        deadline = time.time() + 60
        while writer.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert str(writer.poll()) == expected
    with pytest.raises(workdir_lib.CheckpointSaveError, match="checkpoint 2"):
        writer.save(3, state(3), {"step": 3})  # no further save after a failure
    writer.close()  # the failure was reported: closing does not raise it again
    monkeypatch.undo()
    # max_to_keep=1 did not let the failed save remove the last complete checkpoint.
    assert _complete_looking(tmp_path / "checkpoints") == ["1"]
    assert workdir_lib.load_trained(tmp_path)[1] == {"step": 1}


def test_failed_save_stops_the_run_and_keeps_the_last_complete_checkpoint(
    run, tmp_path, monkeypatch
):
    wd = _copy(run, tmp_path)
    shutil.rmtree(wd / "checkpoints" / "40")
    _disk_full(monkeypatch)
    config = tiny.tiny_config(**{**RUN, "total_steps": 200, "progress_every": 1})
    with pytest.raises(workdir_lib.CheckpointSaveError) as e:
        trainer.train_and_evaluate(config, str(wd))
    assert str(e.value) == (
        f"could not save checkpoint 40 to {wd}/checkpoints: No space left on device; "
        "the last complete checkpoint is 20"
    )
    # Stopped at the step boundary where the failure surfaced; at the latest at the next
    # checkpoint step, whose save first waits for the previous one.
    assert 40 <= max(r["step"] for r in _rows(wd)) <= 60
    assert _complete_looking(wd / "checkpoints") == ["20"]
    monkeypatch.undo()
    assert workdir_lib.load_trained(wd)[1]["step"] == 20
    assert not (wd / "train.lock").exists()


def _complete_looking(ckpts):
    """What is in checkpoints/ besides Orbax's temporaries (the next start removes those)."""
    return sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".orbax-checkpoint-tmp"))


def _mount_tmpfs(path, size):
    path.mkdir(parents=True)
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@pytest.mark.slow
def test_full_disk_stops_the_cli_with_one_line(run, tmp_path):
    """checkpoints/ on a tmpfs with room for half a checkpoint more than the one it holds."""
    wd = tmp_path / "run"
    ckpts = wd / "checkpoints"
    if not _mount_tmpfs(ckpts, "4m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        for name in ("config.json", "config_history.jsonl", "metrics.jsonl"):
            shutil.copy(run / name, wd / name)
        shutil.copytree(run / "checkpoints" / "20", ckpts / "20")
        # metrics.jsonl holds rows to 40; the resumed run replays them.
        used = sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file())
        free = shutil.disk_usage(ckpts).free
        with (ckpts / "filler").open("wb") as f:
            f.write(b"\0" * max(free - used // 2, 0))
        out = tiny.run(tiny.train_command(wd, **{**RUN, "total_steps": 200}))
        assert out.returncode == 1, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: could not save checkpoint 40 to {ckpts}: No space left on device; "
            "the last complete checkpoint is 20"
        ], out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert _complete_looking(ckpts) == ["20", "filler"]
        assert max(r["step"] for r in _rows(wd)) <= 60
        assert workdir_lib.load_trained(wd)[1]["step"] == 20
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


# ----------------------------------------------------------------------------- total_steps


def test_total_steps_below_one_is_an_error_before_anything_is_written(tmp_path):
    for total in (0, -5):
        with pytest.raises(
            trainer.ConfigError, match=f"total_steps must be at least 1, got {total}"
        ):
            trainer.train_and_evaluate(tiny.tiny_config(total_steps=total), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_resume_at_or_past_the_end_does_nothing(run, tmp_path, caplog):
    wd = _copy(run, tmp_path)
    before = _snapshot(wd)
    with caplog.at_level("WARNING"):
        results = trainer.train_and_evaluate(
            tiny.tiny_config(**{**RUN, "total_steps": 30}), str(wd)
        )
    assert results == {"step": 40, "nothing_to_do": True}
    assert "already at step 40 of 30: nothing to do" in caplog.text
    assert _snapshot(wd) == before  # final.npz, config.json, history, metrics untouched


def test_raising_total_steps_continues_and_replaces_final_npz(run, tmp_path):
    from vit_jax import checkpoint

    wd = _copy(run, tmp_path)
    old = checkpoint.load(wd / "final.npz")
    results = trainer.train_and_evaluate(tiny.tiny_config(**{**RUN, "total_steps": 50}), str(wd))
    assert results["step"] == 50
    new, trained = checkpoint.load(wd / "final.npz"), workdir_lib.load_trained(wd)[0]
    assert not np.array_equal(old["head"]["kernel"], new["head"]["kernel"])
    np.testing.assert_array_equal(new["head"]["kernel"], trained["head"]["kernel"])
    assert not list(wd.glob("*.partial"))


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_exit_codes(run, tmp_path):
    bad = tiny.run(tiny.train_command(tmp_path / "bad", total_steps=0))
    assert bad.returncode == 2
    assert [x for x in bad.stderr.splitlines() if x.startswith("error:")] == [
        "error: total_steps must be at least 1, got 0"
    ]
    wd = _copy(run, tmp_path)
    refused = tiny.run(tiny.train_command(wd, **{**RUN, "model.hidden_size": 48}))
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "model.hidden_size 32 -> 48" in errors[0]


@pytest.mark.slow
def test_ctrl_c_while_the_run_starts_is_one_line_exit_130(tmp_path):
    """A real SIGINT from outside while the trainer sets up (data, model: before it takes over
    SIGINT for a clean stop): one error line, exit 130, nothing half-written that a restart
    trips over. (It once ended in a segfault at interpreter shutdown, not 130.)"""
    wd = tmp_path / "run"
    process = subprocess.Popen(
        tiny.train_command(wd, total_steps=50),
        cwd=tiny.ROOT,
        env=tiny.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    lines = []
    for line in process.stderr:  # the mesh line: set-up has begun, the loop not yet
        lines.append(line)
        if line.split(" ", 1)[-1].startswith("mesh {"):
            time.sleep(1.0)  # into the data / model set-up (where the segfault was), ~2 s long
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    lines += err.splitlines(keepends=True)
    assert process.returncode == 130, "".join(lines)[-3000:]
    errors = [x.rstrip() for x in lines if x.startswith("error:")]
    assert errors == [
        "error: interrupted by Ctrl-C; a restart resumes from the start (no checkpoint)"
    ], "".join(lines)[-3000:]
    assert "Traceback" not in "".join(lines) and "Fatal" not in "".join(lines)
    assert not (wd / "train.lock").exists()
    again = tiny.run(tiny.train_command(wd, total_steps=50))
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_multihost_processes_all_stop_on_a_held_lock(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    with run_lock.RunLock(wd).held():
        results = tiny.launch_two_processes(
            tmp_path, "locked", lambda i: tiny.train_command(wd, **RUN)
        )
    for code, out in results:
        assert code == 2, out[-3000:]
        errors = [x for x in out.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0], out[-2000:]
    assert sorted(p.name for p in wd.iterdir()) == []


def test_keys_added_since_a_run_started_resume_at_their_defaults():
    """A config.json written before `objective`, the lion keys, `wd_mults` and LayerScale existed
    resumes when the new config leaves them at their defaults, and is refused otherwise."""
    new = run_config.as_dict(tiny.tiny_config(**RUN))
    old = json.loads(json.dumps(new))
    for key in ("objective", "lion_b1", "lion_b2", "wd_mults"):
        del old[key]
    del old["model"]["transformer"]["layer_scale_init"]
    assert run_config.check_restart("wd", old, new) == {}
    changed = {**new, "objective": "distillation"}
    refused = 'objective "classification" -> "distillation"'
    with pytest.raises(run_config.ConfigChangeError, match=refused):
        run_config.check_restart("wd", old, changed)
    scaled = json.loads(json.dumps(new))
    scaled["model"]["transformer"]["layer_scale_init"] = 1e-5
    with pytest.raises(run_config.ConfigChangeError, match="layer_scale_init null -> 1e-05"):
        run_config.check_restart("wd", old, scaled)
