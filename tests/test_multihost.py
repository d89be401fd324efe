"""Two processes on localhost (2 CPU devices each, gloo collectives) train like one with 4.

The mesh is FSDP over all 4 devices, so each process holds only half of most parameters:
final.npz is written from a gather across processes (`sharding.to_host`), checkpoints are written
and restored by both processes, and a SIGTERM that reaches one process must stop both at the
same step (`StopRequest.poll` agrees across hosts).
"""

import json
import re
import sys

import numpy as np
import pytest
import tiny

pytestmark = pytest.mark.slow

CHANGES = {
    "total_steps": 20,
    "progress_every": 5,
    "eval_every": 20,
    "checkpoint_every": 10,
    "mesh.data": 1,
    "mesh.fsdp": 4,
}
STOPPER = str(tiny.ROOT / "tests" / "multihost_sigterm.py")


def _train(workdir):
    return lambda i: tiny.train_command(workdir, **CHANGES)


def _metrics(workdir) -> tuple[dict[int, float], dict[int, float]]:
    """({step: train loss}, {step: test accuracy}) of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    acc = {r["step"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}
    return loss, acc


def _assert_same_npz(a, b) -> None:
    """Equal weights to 1e-5, but for the attention key bias (see below)."""
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            assert x[key].shape == y[key].shape, key
            if key.endswith("key/bias"):
                # q.(k + b) = q.k + q.b shifts every logit of a query's row alike, so softmax
                # makes the key bias's gradient exactly zero: what AdamW gets is rounding noise,
                # which it scales to steps of ~lr. The bias stays tiny in every layout.
                assert np.abs(x[key]).max() < 1e-3 and np.abs(y[key]).max() < 1e-3, key
                continue
            np.testing.assert_allclose(x[key], y[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.fixture(scope="session")
def one_process(build_once):
    """The same run in 1 process with 4 devices (built once, whichever xdist worker asks)."""

    def build(workdir):
        out = tiny.run(tiny.train_command(workdir, **CHANGES), devices=4)
        assert out.returncode == 0, out.stderr[-3000:]

    return build_once("multihost-one-process", build)


def test_two_processes_match_one_with_four_devices_through_a_sigterm_to_one_and_a_resume(
    tmp_path, one_process
):
    two = tmp_path / "two"
    # Process 1 alone gets SIGTERM, as it takes its 5th batch; process 0 hears of it only from
    # process 1. Both finish step 5 (a report, not a checkpoint step), save it and exit 0.
    stopper = lambda i: [sys.executable, STOPPER, "1", "4", *_train(two)(i)[3:]]
    (rc0, log0), (rc1, log1) = tiny.launch_two_processes(tmp_path, "stop", stopper, timeout=180)
    assert rc0 == 0, log0[-3000:]
    assert rc1 == 0, log1[-3000:]
    assert "process 1/2, 4 devices" in log1
    assert "received signal 15" in log1 and "received signal" not in log0
    steps = [re.findall(r"stopped at step (\d+) on request", log) for log in (log0, log1)]
    assert steps == [["5"], ["5"]], steps
    saved = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [5]
    assert not (two / "final.npz").exists()

    # Restarted, both processes restore their shards of step 5 and the run ends as if it had
    # gone straight through in one process with 4 devices.
    (rc0, log0), (rc1, log1) = tiny.launch_two_processes(tmp_path, "resume", _train(two))
    assert rc0 == 0, log0[-3000:]
    assert rc1 == 0, log1[-3000:]
    for log in (log0, log1):
        assert re.search(r"resumed from \S+ at step 5\b", log), log[-3000:]
    one_loss, one_acc = _metrics(one_process)
    two_loss, two_acc = _metrics(two)
    assert sorted(one_loss) == sorted(two_loss) == [5, 10, 15, 20]
    assert list(one_loss.values()) == pytest.approx(list(two_loss.values()), abs=1e-5)
    assert list(one_acc.values()) == pytest.approx(list(two_acc.values()), abs=1e-6)
    # Gathered from both processes' shards by process 0: the weights of the one-process run.
    _assert_same_npz(one_process / "final.npz", two / "final.npz")
