"""A tiny digits run shared by the trainer tests: the config object and the same as CLI flags."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402

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
        f"--config={ROOT}/configs/default.py",
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
