"""The Colab tour executes end to end (small settings), so it cannot rot: here in the test
environment, and from a built wheel in fresh environments outside the repository, the way a
Colab runtime runs it (its install cell, through the Colab branch)."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import tiny
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
ROOT = tiny.ROOT
NOTEBOOK = ROOT / "colabs" / "vit_jax.ipynb"


def _execute(nb, cwd: Path, kernel_name: str = "python3") -> str:
    NotebookClient(
        nb, timeout=900, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def _tour_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VIT_JAX_TOUR_STEPS", "30")
    monkeypatch.setenv("VIT_JAX_TOUR_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("VIT_JAX_TOUR_DOWNLOAD", "0")  # tests stay offline
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _correct(outputs: str) -> int:
    found = re.findall(r"correct: (\d+) of (\d+)", outputs)
    assert len(found) == 1, f"expected one 'correct: N of M' line in the outputs, got {found}"
    correct, total = map(int, found[0])
    assert total == 8
    return correct


def test_tour_notebook_executes(tmp_path, monkeypatch, capsys):
    """In this environment (vit_jax importable: the install cell installs nothing)."""
    _tour_env(monkeypatch, tmp_path)
    outputs = _execute(nbformat.read(NOTEBOOK, as_version=4), ROOT / "colabs")
    assert "ViT-B_16" in outputs and "86,567,656" in outputs
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # The tour's "correct: N of 8" against an independent count: the same test digits written
    # as PNG files, labelled from the split here, classified by the `predict` CLI.
    assert _correct(outputs) == _predict_cli_correct(tmp_path / "run", tmp_path / "digits", capsys)


def _predict_cli_correct(workdir, root, capsys) -> int:
    """Top-1 hits of `vit_jax.predict` on the tour's digits (indices 0, 45, ..., 315)."""
    import tensorflow as tf
    from PIL import Image

    from vit_jax import predict
    from vit_jax.data import digits

    root.mkdir()
    split = digits.open_split("test")
    files, labels = [], []
    for i in range(0, 355, 45):
        image, label = split.load(tf.constant(i, tf.int64))
        files.append(str(root / f"{i}.png"))
        Image.fromarray(image.numpy()).save(files[-1])
        labels.append(int(label))
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(workdir), "--top-k", "1", "--json", *files]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    return sum(r["top_k"][0]["index"] == lb for r, lb in zip(rows, labels, strict=True))


# --- From a wheel, in fresh environments outside the repository -------------------------------


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    """A command with PYTHONPATH cleared and, unless told, run outside the checkout (nothing of
    it leaks in: `python -c` puts the working directory on sys.path); fails loudly."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | kwargs.pop("env", {})
    kwargs.setdefault("cwd", tempfile.gettempdir())
    out = subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{command}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def wheel(build_once) -> Path:
    """vit_jax's wheel, built from this checkout once per test session."""

    def build(out: Path) -> None:
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)])

    (found,) = build_once("wheel", build).glob("vit_jax-*.whl")
    return found


def _fresh_python(where: Path, *packages: str) -> Path:
    """A new virtual environment (this interpreter's version, nothing of ours) with `packages`."""
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(where)])
    python = where / "bin" / "python"
    if packages:
        _run([str(python), "-m", "pip", "install", "-q", *packages])
    return python


def _versions(python: Path, *names: str) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    return json.loads(_run([str(python), "-c", code, *names]).stdout)


def _standin_colab_kernel(tmp_path, python: Path, upload: Path, monkeypatch) -> str:
    """A Jupyter kernel of `python` that starts as Colab's does, with `google.colab` imported:
    a stand-in whose `files.upload()` "uploads" `upload` into the working directory."""
    package = tmp_path / "standin" / "google" / "colab"
    package.mkdir(parents=True)  # `google` stays a namespace package (google.protobuf)
    (package / "__init__.py").write_text("")
    (package / "output.py").write_text("")  # jax's debugger imports it when on Colab
    (package / "files.py").write_text(
        "import os, shutil\n"
        "def upload():\n"
        "    source = os.environ['VIT_JAX_STANDIN_UPLOAD']\n"
        "    name = os.path.basename(source)\n"
        "    shutil.copy(source, name)\n"
        "    with open(name, 'rb') as f:\n"
        "        return {name: f.read()}\n"
    )
    kernels = tmp_path / "jupyter" / "kernels" / "colab-standin"
    kernels.mkdir(parents=True)
    launch = (
        "import google.colab, runpy; runpy.run_module('ipykernel_launcher', run_name='__main__')"
    )
    spec = {
        "argv": [str(python), "-c", launch, "-f", "{connection_file}"],
        "display_name": "Colab stand-in",
        "language": "python",
        "env": {"PYTHONPATH": str(tmp_path / "standin"), "VIT_JAX_STANDIN_UPLOAD": str(upload)},
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return "colab-standin"


def test_tour_runs_from_the_wheel_through_the_colab_branch_and_so_does_the_train_cli(
    tmp_path, wheel, monkeypatch
):
    """A runtime with a Jupyter kernel and matplotlib and no vit_jax, jax or TensorFlow: the
    install cell asks Colab for the wheel, installs it and the missing requirements, and the
    tour runs on the installed package alone; then the train CLI runs a packaged recipe from a
    directory that has no configs/ (the README's command, from a wheel)."""
    python = _fresh_python(tmp_path / "runtime", "ipykernel", "matplotlib")
    assert _versions(python, "vit_jax", "jax") == {"vit_jax": None, "jax": None}
    kernel = _standin_colab_kernel(tmp_path, python, wheel, monkeypatch)
    _tour_env(monkeypatch, tmp_path)
    content = tmp_path / "content"  # Colab's working directory: the upload lands here
    content.mkdir()
    outputs = _execute(nbformat.read(NOTEBOOK, as_version=4), content, kernel)
    site = _run([str(python), "-c", "import vit_jax, os; print(os.path.dirname(vit_jax.__file__))"])
    installed = Path(site.stdout.strip())
    assert installed.is_relative_to(tmp_path / "runtime") and installed.name == "vit_jax"
    assert f"vit_jax from {installed}" in outputs
    assert (content / wheel.name).exists()  # it came through Colab's upload
    assert re.search(r"JAX \S+ on \[CpuDevice", outputs)
    assert "ViT-B_16" in outputs and "86,567,656" in outputs
    assert 0 <= _correct(outputs) <= 8 and (tmp_path / "run" / "metrics.jsonl").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _run(
        [str(python), "-m", "vit_jax.train", "--config=configs/default.py",
         f"--workdir={tmp_path / 'cli'}", *tiny.flags(total_steps=20, eval_every=20,
                                                       checkpoint_every=20)],
        cwd=elsewhere, timeout=600,
    )  # fmt: skip
    assert "done: 20 steps" in run.stdout and (tmp_path / "cli" / "final.npz").exists()


def _previous_release(python: Path, name: str, newest: str) -> str:
    """The release of `name` just before `newest` that pip offers this interpreter."""
    out = _run([str(python), "-m", "pip", "index", "versions", name]).stdout
    versions = re.search(r"Available versions: (.+)", out).group(1).split(", ")
    return versions[versions.index(newest) + 1]


def test_install_cell_keeps_the_runtime_jax_and_tensorflow(tmp_path, wheel):
    """A runtime that already has its own TensorFlow (the full `tensorflow` build, an older
    release than we ask for) and an older jax, as Colab has: the install cell installs vit_jax
    and what is missing, and leaves both exactly as they were (no tensorflow-cpu beside them)."""
    import jax

    python = _fresh_python(tmp_path / "runtime")
    older_jax = _previous_release(python, "jax", jax.__version__)
    _run([str(python), "-m", "pip", "install", "-q", "tensorflow==2.20.0",
          f"jax=={older_jax}", f"jaxlib=={older_jax}"])  # fmt: skip
    names = ("tensorflow", "tensorflow-cpu", "jax", "jaxlib", "numpy")
    before = _versions(python, *names)
    assert before["tensorflow"] == "2.20.0" and before["tensorflow-cpu"] is None
    content = tmp_path / "content"  # the wheel lies in the working directory (not Colab)
    content.mkdir()
    (content / wheel.name).write_bytes(wheel.read_bytes())
    cell = "".join(nbformat.read(NOTEBOOK, as_version=4).cells[1].source)
    out = _run([str(python), "-c", cell], cwd=content, timeout=900)
    assert _versions(python, *names) == before
    assert _versions(python, "vit_jax", "flax")["vit_jax"] is not None
    assert "tensorflow 2.20.0 (for tensorflow-cpu>=2.21)" in out.stdout
    assert f"jax {older_jax}" in out.stdout and f"JAX {older_jax} on" in out.stdout
    assert "warning: tensorflow 2.20.0 is older than vit_jax asks for" in out.stderr
    check = "import tensorflow as tf, vit_jax.data; print(tf.__version__)"
    assert _run([str(python), "-c", check], cwd=content).stdout.strip() == "2.20.0"
