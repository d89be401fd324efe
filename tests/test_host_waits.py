"""The training loop never waits on the host between check steps (issue #28).

Between check steps (progress, eval and checkpoint steps and the last step) the loop reads nothing
from the devices and, with several processes, makes no cross-host collective: the train metrics
are summed on the devices, a non-finite loss is found at the next check, and a stop request is
agreed there. Run as a script (`python tests/test_host_waits.py child OUT TRAIN_FLAGS...`) this
file is one process of the two-process test: `vit_jax.train` with its collectives counted.
"""

import contextlib
import json
import os
import re
import runpy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny


def _count_device_reads():
    """A context in which every read of a `jax.Array`'s value raises, as
    `jax.transfer_guard_device_to_host("disallow")` does on an accelerator. On XLA:CPU that guard
    never fires (reads are zero-copy, jax-ml/jax#16602), so the tests add this stand-in: every
    host read (`np.asarray`, `float`, `.item()`, `jax.device_get`) goes through `_value`."""
    import jax
    from jax._src import array

    @contextlib.contextmanager
    def guard():
        original = array.ArrayImpl._value

        def refuse(self):
            raise RuntimeError(f"device-to-host read of a {self.dtype}{list(self.shape)} array")

        array.ArrayImpl._value = property(refuse)
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                yield
        finally:
            array.ArrayImpl._value = original

    return guard


def _count_steps(monkeypatch, trainer) -> list[int]:
    """[steps dispatched]: TrainStep.accumulate counted, the step itself unchanged."""
    count = [0]
    original = trainer.TrainStep.accumulate

    def accumulate(self, *args):
        count[0] += 1
        return original(self, *args)

    monkeypatch.setattr(trainer.TrainStep, "accumulate", accumulate)
    return count


def _rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_steps_between_checks_read_nothing_from_the_devices(tmp_path, monkeypatch):
    """The real loop, with every step between two check steps run under the transfer guard (and
    the CPU stand-in): it trains to the end, and the progress rows are the means they were."""
    from vit_jax import trainer

    guard = _count_device_reads()
    entered, inside, count = [0], [], _count_steps(monkeypatch, trainer)

    @contextlib.contextmanager
    def between_checks():
        entered[0] += 1
        before = count[0]
        with guard():
            yield
        inside.append(count[0] - before)

    monkeypatch.setattr(trainer._Loop, "between_checks", staticmethod(between_checks))
    config = tiny.tiny_config(
        total_steps=12, progress_every=6, eval_every=12, checkpoint_every=12, warmup_steps=2
    )
    out = trainer.train_and_evaluate(config, str(tmp_path))
    assert out["step"] == 12
    # Two intervals of six steps, every one of them dispatched inside the guard.
    assert entered[0] == 2 and inside == [6, 6], (entered, inside)
    rows = [r for r in _rows(tmp_path) if "train_loss" in r]
    assert [r["step"] for r in rows] == [6, 12]
    assert all(np.isfinite(r["train_loss"]) and r["grad_norm"] > 0 for r in rows)

    # The stand-in really refuses a read (so the run above read nothing in there).
    import jax.numpy as jnp

    x = jnp.arange(3.0) + 1
    with pytest.raises(RuntimeError, match="device-to-host read"), guard():
        float(x[0])


def test_nan_mid_interval_stops_at_the_next_check_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    """A NaN batch at step 11 (checks at 8, 16, 24): the run stops at the check of step 16 with
    one error line naming the step and the interval, checkpoint 8 kept, nothing of 9-16 saved."""
    from vit_jax import data, train, trainer
    from vit_jax import workdir as workdir_lib

    original = data.train_iterator

    def poisoned(*args, **kwargs):
        step = kwargs.get("start_step", 0)
        for batch in original(*args, **kwargs):
            step += 1
            if step == 11:
                batch = {**batch, "image": batch["image"] * float("nan")}
            yield batch

    monkeypatch.setattr(data, "train_iterator", poisoned)
    count = _count_steps(monkeypatch, trainer)
    config = tiny.tiny_config(
        total_steps=24,
        progress_every=8,
        eval_every=24,
        checkpoint_every=8,
        async_checkpointing=False,
    )
    with pytest.raises(trainer.NonFiniteLossError) as raised:
        trainer.train_and_evaluate(config, str(tmp_path))
    error = raised.value
    assert train.exit_for(error, tmp_path) == (1, str(error))
    assert "\n" not in str(error)
    assert re.match(
        r"training loss is nan at step 11, the first non-finite loss of steps 9-16; stopping "
        r"\(last good checkpoint: step 8\)\.",
        str(error),
    ), str(error)
    assert count[0] == 16  # found at the first check after it, no later
    assert _checkpoints(tmp_path) == [8]
    assert [r["step"] for r in _rows(tmp_path)] == [8]
    params, meta = workdir_lib.load_trained(tmp_path)
    assert meta["step"] == 8
    import jax

    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_checkpoint_sums_of_an_older_run_are_read():
    """A checkpoint written before the sums (one row per step) resumes with the same sums."""
    from vit_jax import trainer

    rows = [
        {"train_loss": 2.5, "grad_norm": 1.0, "learning_rate": 0.1},
        {"train_loss": 1.5, "grad_norm": 3.0, "learning_rate": 0.2},
    ]
    sums = trainer._restored_sums({trainer.UNREPORTED: rows})
    assert sums["steps"] == 2 and sums["train_loss"] == 4.0 and sums["grad_norm"] == 4.0
    assert sums["learning_rate"] == np.float32(0.2) and sums["bad_step"] == -1
    saved = {"steps": 3, "train_loss": 6.0, "grad_norm": 2.0, "learning_rate": 0.5}
    sums = trainer._restored_sums({trainer.TRAIN_SUMS: saved})
    assert {k: float(sums[k]) for k in saved} == saved
    assert trainer._restored_sums({})["steps"] == 0


# ------------------------------------------------------------------ two processes

CHANGES = {
    "total_steps": 12,
    "progress_every": 4,
    "eval_every": 12,
    "checkpoint_every": 12,
    "batch": 16,
}
SIGTERM_AT = 6  # process 1 only, mid-interval: both must stop at the next check, step 8


@pytest.mark.slow
def test_two_processes_make_no_collective_between_checks_and_stop_on_the_same_step(tmp_path):
    workdir = tmp_path / "w"
    child = lambda i: [
        sys.executable,
        __file__,
        "child",
        str(tmp_path / f"collectives{i}.json"),
        *tiny.train_command(workdir, **CHANGES)[3:],
    ]
    (rc0, log0), (rc1, log1) = tiny.launch_two_processes(tmp_path, "w", child, timeout=300)
    assert rc0 == 0, log0[-3000:]
    assert rc1 == 0, log1[-3000:]
    assert "received signal 15" in log1 and "received signal" not in log0
    steps = [re.findall(r"stopped at step (\d+) on request", log) for log in (log0, log1)]
    assert steps == [["8"], ["8"]], steps
    assert _checkpoints(workdir) == [8]
    for i in range(2):
        record = json.loads((tmp_path / f"collectives{i}.json").read_text())
        assert record["steps"] == 8, record
        # [steps dispatched when the collective was called] for those called in the loop.
        in_loop = [s for name, s in record["calls"] if s > 0]
        per_step = {s: in_loop.count(s) for s in range(1, 9)}
        assert all(per_step[s] == 0 for s in (1, 2, 3, 5, 6, 7)), (i, record)
        # The stop and failed-save flags: one all-gather at each check step.
        agreed = [s for name, s in record["calls"] if name == "process_allgather" and s > 0]
        assert agreed[:2] == [4, 8], (i, record)


def _child(out: str) -> None:
    """One process of the two-process test: `vit_jax.train` with every `multihost_utils`
    collective recorded as (name, steps dispatched so far); process 1 sends itself SIGTERM as it
    dispatches step SIGTERM_AT."""
    from jax.experimental import multihost_utils

    from vit_jax import trainer

    calls, steps = [], [0]
    for name in ("process_allgather", "broadcast_one_to_all", "sync_global_devices"):
        original = getattr(multihost_utils, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, steps[0]))
            return _original(*args, **kwargs)

        setattr(multihost_utils, name, counted)
    accumulate = trainer.TrainStep.accumulate

    def counted_step(self, *args):
        import jax

        steps[0] += 1
        if steps[0] == SIGTERM_AT and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return accumulate(self, *args)

    trainer.TrainStep.accumulate = counted_step
    try:
        runpy.run_module("vit_jax.train", run_name="__main__", alter_sys=True)
    finally:
        Path(out).write_text(json.dumps({"steps": steps[0], "calls": calls}))


if __name__ == "__main__" and sys.argv[1] == "child":
    out = sys.argv[2]
    del sys.argv[1:3]
    _child(out)
