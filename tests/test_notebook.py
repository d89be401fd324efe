"""The Colab tour executes end to end (small settings), so it cannot rot."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tour_notebook_executes(tmp_path, monkeypatch):
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
    assert "correct:" in outputs
    assert (tmp_path / "run" / "metrics.jsonl").exists()
