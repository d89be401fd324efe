"""Start-up is explicit (issue 24): importing vit_jax changes nothing in the process, and every
CLI parses its flags -- one `error:` line, exit 2 -- before it loads TensorFlow."""

import json
import subprocess
import sys

import pytest
import tiny

from vit_jax import cli

# In a fresh interpreter: the libraries first (they may set what they like: jax sets
# TF_CPP_MIN_LOG_LEVEL), then the process's state, then every vit_jax module, then the state.
IMPORT_ALL = r"""
import importlib, json, logging, os, pkgutil, sys
import absl.logging, flax, jax, ml_collections, optax, orbax.checkpoint, tensorflow as tf
import tensorflow_datasets

hidden = []
tf.config.set_visible_devices = lambda *args, **kwargs: hidden.append(repr(args))

def state():
    fd2 = os.fstat(2)
    return {
        "sys.meta_path": [id(f) for f in sys.meta_path],
        "fd 2": [fd2.st_dev, fd2.st_ino, fd2.st_mode],
        "os.environ": dict(os.environ),
        "root handlers": [id(h) for h in logging.getLogger().handlers],
        "absl handlers": [id(h) for h in logging.getLogger("absl").handlers],
        "root level": logging.getLogger().level,
        "warnings captured": logging.getLogger("py.warnings").handlers != [],
    }

before = state()
import vit_jax
names, failed = [], []
for info in pkgutil.walk_packages(vit_jax.__path__, "vit_jax."):
    names.append(info.name)
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed.append(f"{info.name}: {type(e).__name__}: {e}")
after = state()
changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
print(json.dumps({"modules": names, "failed": failed, "changed": changed, "hidden": hidden}))
"""


def test_importing_every_module_changes_nothing_in_the_process():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=tiny.ROOT,
        env=tiny.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert len(r["modules"]) > 50 and {"vit_jax.cli", "vit_jax.train"} <= set(r["modules"])
    assert not r["failed"], r["failed"]
    assert not r["changed"], r["changed"]
    assert not r["hidden"], "a module hid devices from TensorFlow at import"


# Each CLI's required arguments (None: it has none), with placeholder values: parsing fails, or
# passes, before any of them is opened.
REQUIRED = {
    "vit_jax.train": ["--config=configs/default.py", "--workdir=/nonexistent/run"],
    "vit_jax.predict": ["--checkpoint", "c.npz", "x.png"],
    "vit_jax.evaluate": ["--checkpoint", "c.npz", "--config=configs/default.py"],
    "vit_jax.visualize": ["--checkpoint", "c.npz", "--out", "maps", "x.png"],
    "vit_jax.convert.__main__": ["a.npz", "b.npz"],
    "vit_jax.benchmark": None,
    "vit_jax.probe": ["--checkpoint", "c.npz"],
    "vit_jax.serve": ["--checkpoint", "c.npz"],
    "vit_jax.export": ["--checkpoint", "c.npz", "--format", "onnx", "--out", "out"],
    "vit_jax.models.__main__": None,
    "vit_jax.install_missing": None,
}

# `python -m` a CLI, then report which heavy libraries were loaded when it exited.
RUN_CLI = r"""
import atexit, json, runpy, sys
module, argv = sys.argv[1], sys.argv[2:]
def loaded():
    heavy = ("tensorflow", "jax")
    print(json.dumps([m for m in heavy if m in sys.modules]), file=sys.__stdout__)
atexit.register(loaded)
sys.argv = [module, *argv]
runpy.run_module(module.removesuffix(".__main__"), run_name="__main__", alter_sys=True)
"""

# Parsing these needs jax (not TensorFlow): train's --config loads vit_jax.configs, which builds
# on the model registry; `python -m vit_jax.models` runs the models package first.
NEEDS_JAX_TO_PARSE = {"vit_jax.train", "vit_jax.models.__main__"}


def _run_cli(module: str, argv: list[str]) -> tuple[int, str, str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI, module, *argv],
        cwd=tiny.ROOT,
        env=tiny.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    *stdout, loaded = out.stdout.splitlines()
    return out.returncode, "\n".join(stdout), out.stderr, json.loads(loaded)


def _assert_one_error_line(module, code, stdout, stderr, loaded, *words):
    lines = stderr.strip().splitlines()
    assert code == cli.EXIT_CONFIG, (module, code, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (module, stderr)
    assert all(w in lines[0] for w in words), (module, lines[0])
    assert stdout == "", (module, stdout)
    assert "tensorflow" not in loaded, f"{module} loaded TensorFlow before parsing its flags"
    if module not in NEEDS_JAX_TO_PARSE:
        assert "jax" not in loaded, f"{module} loaded jax before parsing its flags"


def test_the_table_names_every_cli():
    assert set(REQUIRED) == cli.CLI_MODULES


@pytest.mark.parametrize("module", sorted(cli.CLI_MODULES))
def test_an_unknown_flag_is_one_error_line_exit_2(module):
    code, stdout, stderr, loaded = _run_cli(module, [*(REQUIRED[module] or []), "--no-such-flag"])
    _assert_one_error_line(module, code, stdout, stderr, loaded, "no-such-flag")


# The required arguments less one, and the word the error names.
MISSING = {
    "vit_jax.train": (["--config=configs/default.py"], "--workdir"),
    "vit_jax.predict": (["x.png"], "--checkpoint"),
    "vit_jax.evaluate": (["--checkpoint", "c.npz"], "--config"),
    "vit_jax.visualize": (["--checkpoint", "c.npz", "x.png"], "--out"),
    "vit_jax.convert.__main__": (["a.npz"], "dst"),
    "vit_jax.probe": ([], "--checkpoint"),
    "vit_jax.serve": ([], "--checkpoint"),
    "vit_jax.export": (["--checkpoint", "c.npz", "--out", "out"], "--format"),
}


def test_every_cli_with_required_flags_is_checked():
    assert set(MISSING) == {m for m, argv in REQUIRED.items() if argv}


@pytest.mark.parametrize("module", sorted(MISSING))
def test_a_missing_required_flag_is_one_error_line_exit_2(module):
    argv, word = MISSING[module]
    code, stdout, stderr, loaded = _run_cli(module, argv)
    _assert_one_error_line(module, code, stdout, stderr, loaded, word)


def test_start_sets_up_the_console_once_and_keeps_a_user_set_tf_log_level(monkeypatch):
    """start() twice: one console handler; TF_CPP_MIN_LOG_LEVEL the user set stays."""
    import logging

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        first = cli.start(verbose=False)
        second = cli.start(verbose=False)
        ours = [h for h in root.handlers if isinstance(h, cli.ConsoleHandler)]
        assert ours == [second] and first is not second
        assert cli.os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)
