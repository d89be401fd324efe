"""Two processes on localhost (2 CPU devices each, gloo collectives) train like one with 4."""

import json
import socket
import subprocess

import pytest
import tiny

pytestmark = pytest.mark.slow

CHANGES = dict(
    total_steps=20, progress_every=5, eval_every=20, checkpoint_every=10, write_final_npz=False
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [
        r["test_accuracy"] for r in rows if "test_accuracy" in r
    ]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    single = tiny.run(tiny.train_command(tmp_path / "one", **CHANGES), devices=4)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *tiny.train_command(tmp_path / "two", **CHANGES),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=tiny.ROOT,
            env=tiny.env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "process 1/2, 4 devices" in outs[1][1]
    one_loss, one_acc = _losses(tmp_path / "one")
    two_loss, two_acc = _losses(tmp_path / "two")
    assert len(one_loss) == len(two_loss) == 4
    assert one_loss == pytest.approx(two_loss, abs=1e-5)
    assert one_acc == pytest.approx(two_acc, abs=1e-6)
