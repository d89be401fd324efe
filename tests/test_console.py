"""What a person sees on the console: the default run and predict, as subprocesses (issue 16).

One tiny training run (the default config, 20 steps), two predict runs on its final.npz, and
one (side by side with the training) that sets TF_CPP_MIN_LOG_LEVEL itself. Otherwise
TF_CPP_MIN_LOG_LEVEL is removed from the subprocesses' environment, as in a fresh shell (JAX
sets it in this process when it is imported).
"""

import collections
import io
import json
import logging
import re
import subprocess

import numpy as np
import pytest
import tiny
from PIL import Image

from vit_jax import cli

# A user's shell: neither variable set (tiny.env pins JAX_PLATFORMS=cpu, which skips the probing
# of other backends whose logs these tests look for).
FRESH_SHELL = {"TF_CPP_MIN_LOG_LEVEL": None, "JAX_PLATFORMS": None}
RUN = {"total_steps": 20, "eval_every": 10, "checkpoint_every": 10, "progress_every": 5}

# What the libraries printed before (issue 16): TensorFlow's C++ banners, JAX probing for a TPU,
# absl's long prefix, clu's echo of every scalar write, Orbax's INFO.
BANNERS = {
    "oneDNN banner": re.compile(r"oneDNN custom operations"),
    "absl C++ pre-init notice": re.compile(r"All log messages before absl::InitializeLog"),
    "TPU probing": re.compile(r"Unable to initialize backend|libtpu"),
    "absl prefix": re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]"),
    "clu echo": re.compile(r"\[\d+\] \w+=|grad_norm="),
    "Orbax INFO": re.compile(r"\[process=\d+\]|orbax", re.IGNORECASE),
}
TIME = re.compile(r"^\d\d:\d\d:\d\d ")


def _banners(text: str) -> list[str]:
    return [
        f"{name}: {line}"
        for line in text.splitlines()
        for name, pattern in BANNERS.items()
        if pattern.search(line)
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images):
    """The training run; side by side, predict with the user's TF_CPP_MIN_LOG_LEVEL=0 (on a
    checkpoint that does not exist: TensorFlow loads, and prints, before it is opened)."""
    wd = tmp_path_factory.mktemp("console") / "run"
    user = _predict(wd / "none.npz", images, env_changes={"TF_CPP_MIN_LOG_LEVEL": "0"})
    out = tiny.run(tiny.train_command(wd, **RUN), env_changes=FRESH_SHELL)
    _, user_stderr = user.communicate(timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, out, (user.returncode, user_stderr)


def test_default_run_prints_each_event_once_without_library_banners(trained):
    wd, out, _ = trained
    stderr = out.stderr.splitlines()
    assert not _banners(out.stderr + out.stdout), _banners(out.stderr + out.stdout)
    # One short line per event: `HH:MM:SS message`, nothing else on stderr.
    assert stderr and all(TIME.match(line) for line in stderr), out.stderr
    lines = [TIME.sub("", line) for line in stderr + out.stdout.splitlines() if line.strip()]
    twice = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not twice, twice
    messages = [TIME.sub("", line) for line in stderr]
    progress = r"step {}/20: loss [\d.]+, lr [\d.e+-]+, [\d.]+ steps/s, \d+ img/s, ETA \d:\d\d:\d\d"
    for step in (5, 10, 15, 20):
        assert any(re.fullmatch(progress.format(step), m) for m in messages), messages
    for step in (10, 20):
        assert any(m.startswith(f"step {step}: test accuracy 0.") for m in messages)
        assert any(
            m.startswith(f"step {step}: saving checkpoint {wd}/checkpoints/{step}")
            for m in messages
        )
    assert f"wrote {wd}/final.npz" in messages


def test_the_run_ends_with_a_summary_naming_its_files_and_the_next_command(trained):
    wd, out, _ = trained
    summary = out.stdout
    assert re.search(
        r"^done: 20 steps in \d:\d\d:\d\d \(20 this run, [\d,]+ img/s\)$", summary, re.M
    )
    final = re.search(
        r"^test accuracy (0\.\d{4}) at step 20, best (0\.\d{4}) at step (10|20)$", summary, re.M
    )
    assert final and float(final[2]) >= float(final[1]), summary
    assert f"final weights: {wd}/final.npz" in summary
    assert f"checkpoints:   {wd}/checkpoints" in summary
    assert f"TensorBoard:   tensorboard --logdir {wd}" in summary
    assert f"next: python -m vit_jax.predict --checkpoint {wd}/final.npz IMAGE..." in summary
    # The accuracy reported is the one evaluated (metrics.jsonl), and clu still writes
    # TensorBoard events and metrics.jsonl although it no longer echoes to the console.
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10, 15, 20]
    evals = {r["step"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}
    assert sorted(evals) == [10, 20] and f"{evals[20]:.4f}" == final[1]
    assert f"{max(evals.values()):.4f}" == final[2]
    assert list(wd.glob("events.out.tfevents.*"))


def _predict(checkpoint, images, *flags, env_changes=FRESH_SHELL) -> subprocess.Popen:
    cmd = [tiny.sys.executable, "-m", "vit_jax.predict", "--checkpoint", str(checkpoint)]
    return subprocess.Popen(
        [*cmd, *flags, *images],
        cwd=tiny.ROOT,
        env=tiny.env(changes=env_changes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def predicted(trained, images):
    """predict --json (one missing image) and --verbose side by side, on the checkpoint the
    summary names."""
    wd, out, _ = trained
    checkpoint = re.search(
        r"^next: python -m vit_jax.predict --checkpoint (\S+)", out.stdout, re.M
    )[1]
    procs = {
        "json": _predict(checkpoint, [*images, f"{wd}/missing.png"], "--json"),
        "verbose": _predict(checkpoint, images, "--verbose"),
    }
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[name] = (p.returncode, stdout, stderr)
    return results


def test_predict_json_stdout_is_json_lines_only(predicted, images, trained):
    code, stdout, stderr = predicted["json"]
    assert code == cli.EXIT_RUNTIME, stderr  # the missing image
    rows = [json.loads(line) for line in stdout.splitlines()]  # nothing else on stdout
    assert [r["image"] for r in rows] == [*images, f"{trained[0]}/missing.png"]
    assert all(len(r["top_k"]) == 5 for r in rows[:2]) and "error" in rows[2]
    assert not _banners(stderr), stderr


def test_verbose_brings_the_library_logs_back(predicted):
    code, stdout, stderr = predicted["verbose"]
    assert code == 0, stderr
    assert BANNERS["oneDNN banner"].search(stderr) and BANNERS["TPU probing"].search(stderr)
    assert any(BANNERS["absl prefix"].match(line) for line in stderr.splitlines()), stderr
    assert len(stdout.splitlines()) == 2 and not _banners(stdout)  # the answer stays clean


def test_a_user_set_tf_log_level_is_not_overridden(trained):
    code, stderr = trained[2]
    assert BANNERS["oneDNN banner"].search(stderr), stderr  # TF_CPP_MIN_LOG_LEVEL=0: all of it
    assert code == cli.EXIT_CONFIG and stderr.splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------- in-process


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(message: str, level=logging.INFO, **extra) -> logging.LogRecord:
    record = logging.LogRecord("absl", level, cli.__file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_console_draws_a_progress_bar_on_a_terminal_and_lines_otherwise():
    events = [
        _record("training steps 1-20", progress=(0, 20)),
        _record("step 10/20: loss 2.0, ETA 0:00:01", progress=(10, 20)),
        _record("step 10: test accuracy 0.5"),
        _record("disk almost full", logging.WARNING),
        _record("step 20/20: loss 1.0, ETA 0:00:00", progress=(20, 20)),
    ]
    pipe, terminal = io.StringIO(), _Terminal()
    for stream in (pipe, terminal):
        handler = cli.ConsoleHandler(stream, timestamps=False)
        for record in events:
            handler.emit(record)
        handler.close()
    assert pipe.getvalue().splitlines() == [
        "training steps 1-20",
        "step 10/20: loss 2.0, ETA 0:00:01",
        "step 10: test accuracy 0.5",
        "warning: disk almost full",
        "step 20/20: loss 1.0, ETA 0:00:00",
    ]
    drawn = terminal.getvalue()
    assert "20/20" in drawn and "100%" in drawn and "loss 1.0" in drawn  # the bar, finished
    assert "step 10: test accuracy 0.5\n" in drawn and "warning: disk almost full\n" in drawn


def test_library_info_is_dropped_and_library_warnings_keep_their_first_line():
    keep = cli._LibraryFilter()
    ours = _record("ours")
    library = logging.LogRecord(
        "jax", logging.INFO, "/site-packages/jax/x.py", 1, "probe", (), None
    )
    warning = logging.LogRecord(
        "absl", logging.ERROR, "/site-packages/orbax/y.py", 1, "save failed\nTraceback...", (), None
    )
    assert keep.filter(ours) and not keep.filter(library)
    assert keep.filter(warning) and warning.getMessage() == "save failed"


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["--verbose"], True),
        (["--verbose=true"], True),
        (["--verbose", "--noverbose"], False),
        (["x.png"], False),
        (["--", "--verbose"], False),
    ],
)
def test_wants_verbose(argv, verbose):
    assert cli.wants_verbose(argv) is verbose
