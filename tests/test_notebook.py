"""The Colab tour executes end to end (small settings), so it cannot rot."""

import json
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tour_notebook_executes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIT_JAX_TOUR_STEPS", "30")
    monkeypatch.setenv("VIT_JAX_TOUR_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("VIT_JAX_TOUR_DOWNLOAD", "0")  # tests stay offline
    monkeypatch.setenv("VIT_JAX_REPO", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "colabs/vit_jax.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "colabs")}},
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "ViT-B_16" in outputs and "86,567,656" in outputs
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # The tour's "correct: N of 8" against an independent count: the same test digits written
    # as PNG files, labelled from the split here, classified by the `predict` CLI.
    found = re.findall(r"correct: (\d+) of (\d+)", outputs)
    assert len(found) == 1, f"expected one 'correct: N of M' line in the outputs, got {found}"
    correct, total = map(int, found[0])
    assert total == 8
    assert correct == _predict_cli_correct(tmp_path / "run", tmp_path / "digits", capsys)


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
