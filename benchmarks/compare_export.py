"""CPU inference side by side: XLA (jit), the exported ONNX model in ONNX Runtime, the exported
SavedModel in TensorFlow, and timm (PyTorch eager), each in its own process.

    python benchmarks/compare_export.py [--timm-python /work/timm-venv/bin/python] [--batch 8]

Writes a random-init `.npz` per model (the weights do not change the timing), exports it with
`python -m vit_jax.export`, times each runtime with `python -m vit_jax.benchmark` (`--mode infer`
or `--artifact`) and timm with benchmarks/timm_bench.py. Prints a Markdown table for
BENCHMARKS.md and the raw JSON records.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [("ViT-Ti_16", "vit_tiny_patch16_224"), ("ViT-B_16", "vit_base_patch16_224")]


def _json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def random_npz(model: str, path: Path) -> None:
    """A random-init ImageNet-shaped checkpoint of `model` at 224, with its sidecar."""
    code = f"""
import jax, numpy as np
from vit_jax import models, weights
model = models.get_model({model!r}, num_classes=1000)
shapes = models.init_shapes(model, (224, 224))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)
meta = dict(model=models.get_config({model!r}).to_dict(), image_size=[224, 224],
            class_names=[f"class_{{i}}" for i in range(1000)])
weights.save(params, meta, {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--timm-python", default="/work/timm-venv/bin/python")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="ViT-Ti_16,ViT-B_16")
    args = p.parse_args()
    bench = [sys.executable, "-m", "vit_jax.benchmark", "--batch", str(args.batch)]
    bench += ["--steps", str(args.steps), "--json"]
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model, timm_name in CASES:
            if model not in args.models.split(","):
                continue
            npz = Path(tmp) / f"{model}.npz"
            random_npz(model, npz)
            row = {
                "xla": _json(
                    [*bench, "--architecture", model, "--mode", "infer", "--resolution", "224"]
                )
            }
            for fmt in ("onnx", "saved_model"):
                out = Path(tmp) / f"{model}_{fmt}"
                export = [sys.executable, "-m", "vit_jax.export", "--checkpoint", str(npz)]
                subprocess.run([*export, "--format", fmt, "--out", str(out)], check=True)
                row[fmt] = _json([*bench, "--artifact", str(out)])
            if os.path.exists(args.timm_python):
                timm = [args.timm_python, "benchmarks/timm_bench.py", "--model", timm_name]
                timm += ["--batch", str(args.batch), "--mode", "infer", "--steps", str(args.steps)]
                row["timm"] = _json(timm)
            records.append(row)
            cells = [
                f"{row[k]['img_per_sec']:.1f}" if k in row else "-"
                for k in ("xla", "onnx", "saved_model", "timm")
            ]
            rows.append(f"| {model} b{args.batch} @224 | " + " | ".join(cells) + " |")
    print("| case (img/s) | XLA jit | ONNX Runtime | TF SavedModel | timm (PyTorch eager) |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(json.dumps(records))


if __name__ == "__main__":
    main()
