"""Plots a workdir's metrics.jsonl (train loss, test accuracy) to a PNG.

python benchmarks/plot_run.py runs/default docs/default_run.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(workdir: str, out: str) -> None:
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    train = [r for r in rows if "train_loss" in r]
    test = [r for r in rows if "test_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in train], [r["train_loss"] for r in train])
    a.set(title="train loss", xlabel="step", yscale="log")
    b.plot([r["step"] for r in test], [100 * r["test_accuracy"] for r in test], "o-")
    b.set(title="test accuracy (%)", xlabel="step", ylim=(0, 100))
    for r in test[-1:]:
        b.annotate(
            f"{100 * r['test_accuracy']:.1f}%",
            (r["step"], 100 * r["test_accuracy"]),
            textcoords="offset points",
            xytext=(-30, -15),
        )
    fig.suptitle(f"python -m vit_jax.train --config=configs/default.py ({workdir})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:3])
