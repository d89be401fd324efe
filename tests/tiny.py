"""A tiny digits run shared by the trainer tests: the config object and the same as CLI flags."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from vit_jax.configs import default

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = {
    "model.hidden_size": 32,
    "model.transformer.mlp_dim": 64,
    "model.transformer.num_heads": 2,
    "model.transformer.num_layers": 2,
    "pp.resize": 8,
    "pp.crop": 8,
    "batch": 32,
    "batch_eval": 128,
    "total_steps": 40,
    "warmup_steps": 5,
    "eval_every": 20,
    "progress_every": 10,
    "checkpoint_every": 20,
}


def assert_same_tree(actual, expected, *, dtypes: bool = False) -> None:
    """Two parameter trees with the same keys and bit-identical arrays (and dtypes, if asked)."""
    import numpy as np

    from vit_jax.weights.tree import flatten

    a, e = flatten(actual), flatten(expected)
    assert sorted(a) == sorted(e)
    for key in e:
        if dtypes:
            assert np.asarray(a[key]).dtype == np.asarray(e[key]).dtype, key
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(e[key]), err_msg=key)


def error_line(capsys) -> str:
    """stderr of an in-process CLI run: exactly one line, an `error:` (returned)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


def tiny_config(**changes):
    config = default.get_config()
    for key, value in {**OVERRIDES, **changes}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def flags(**changes) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **changes}.items()]


def train_command(workdir, **changes) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vit_jax.train",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *flags(**changes),
    ]


def env(devices: int = 1, changes: dict[str, str | None] | None = None) -> dict[str, str]:
    """This environment for a CLI subprocess; `changes` sets variables (None: removes one)."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPUs, even where an accelerator is
    e["PYTHONPATH"] = str(ROOT)
    for key, value in (changes or {}).items():
        if value is None:
            e.pop(key, None)
        else:
            e[key] = value
    return e


def run(
    cmd, devices: int = 1, timeout: int = 600, cwd=ROOT, env_changes=None, **kwargs
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env(devices, env_changes),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


# Enough for most test digits to be classified correctly (~20 s on 2 cores).
GOOD = {
    "pp.resize": 16,
    "pp.crop": 16,
    "total_steps": 200,
    "eval_every": 200,
    "checkpoint_every": 200,
    "progress_every": 50,
    "batch": 64,
}


ADDRESS_IN_USE = re.compile(r"address already in use|failed to add port|failed to bind", re.I)


def launch_two_processes(tmp_path, name: str, argv, timeout: float = 300) -> list[tuple[int, str]]:
    """Runs processes 0 and 1 of `argv(i)` as one 2-process run: [(exit code, output)].

    Each process writes to its own file (no pipe that fills while the other is read). The
    coordinator port is held, bound, until just before process 0 starts; if another program took
    it in that moment (process 0 cannot listen), the run is retried on a new port. When one
    process fails, the other gets 30 s to notice, then is killed, as is any still running at
    `timeout`.
    """
    for attempt in range(3):
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        logs = [tmp_path / f"{name}.{attempt}.process{i}.log" for i in range(2)]
        procs = []
        for i, log in enumerate(logs):
            if i == 0:
                held.close()
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *argv(i),
                            f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2",
                            f"--process_id={i}",
                        ],
                        cwd=ROOT,
                        env=env(devices=2),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline, grace, killed = time.monotonic() + timeout, None, set()
        while any(p.poll() is None for p in procs):
            if grace is None and any(p.returncode not in (None, 0) for p in procs):
                grace = time.monotonic() + 30
            if time.monotonic() > min(deadline, grace or deadline):
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                        killed.add(i)
                break
            time.sleep(0.1)
        results = [
            (p.returncode, log.read_text() + ("\n[killed: still running]" if i in killed else ""))
            for i, (p, log) in enumerate(zip(procs, logs, strict=True))
        ]
        if results[0][0] != 0 and ADDRESS_IN_USE.search(results[0][1]):
            continue
        return results
    raise AssertionError(f"no free coordinator port in 3 tries:\n{results[0][1][-3000:]}")
