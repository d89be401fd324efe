"""Side-by-side: vit_jax's benchmark CLI vs timm, alternating runs, medians and ratios.

    python benchmarks/compare_timm.py --timm-python /work/timm-venv/bin/python [--rounds 2]

Each measurement is its own process (timm and TensorFlow never share one). Rows: ViT-Ti/16
batch 32 and ViT-B/16 batch 16 at 224, train (SGD momentum) and inference; columns per dtype
(`--dtypes float32,bfloat16`: timm under `torch.autocast`, ours under the precision policy).
Prints a Markdown table for BENCHMARKS.md and the raw JSON records.
"""

import argparse
import json
import statistics
import subprocess
import sys

CASES = [
    ("ViT-Ti_16", "vit_tiny_patch16_224", 32),
    ("ViT-B_16", "vit_base_patch16_224", 16),
]


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours(model, batch, mode, dtype="float32", steps=5, extra=()):
    return _run(
        [
            sys.executable,
            "-m",
            "vit_jax.benchmark",
            "--architecture",
            model,
            "--batch",
            str(batch),
            "--mode",
            mode,
            "--dtype",
            dtype,
            "--steps",
            str(steps),
            "--json",
            *extra,
        ]
    )


def timm(python, model, batch, mode, dtype="float32", steps=5):
    return _run(
        [
            python,
            "benchmarks/timm_bench.py",
            "--model",
            model,
            "--batch",
            str(batch),
            "--mode",
            mode,
            "--dtype",
            dtype,
            "--steps",
            str(steps),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--timm-python", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="ViT-Ti_16,ViT-B_16")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--dtypes", default="float32,bfloat16", help="timm: autocast; ours: policy")
    p.add_argument("--ours-args", default="", help="extra flags for vit_jax.benchmark")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    records, rows = [], []
    med = lambda rs: statistics.median(x["img_per_sec"] for x in rs)
    for name, timm_name, batch in CASES:
        if name not in args.models.split(","):
            continue
        for mode in args.modes.split(","):
            cells, ours_by_dtype = [], {}
            for dtype in dtypes:
                a, b = [], []
                for _ in range(args.rounds):  # alternate so drifts in machine load hit both
                    a.append(ours(name, batch, mode, dtype, args.steps, args.ours_args.split()))
                    b.append(timm(args.timm_python, timm_name, batch, mode, dtype, args.steps))
                records += a + b
                ours_by_dtype[dtype] = a
                mfu = statistics.median(x["mfu"] for x in a)
                cells.append(
                    f"{med(b):.2f} | {med(a):.2f} | **{med(a) / med(b):.2f}x** | {mfu:.0%}"
                )
            gain = ""
            if {"float32", "bfloat16"} <= set(dtypes):
                gain = f" {med(ours_by_dtype['bfloat16']) / med(ours_by_dtype['float32']):.2f}x |"
            rows.append(f"| {name} b{batch} {mode} | " + " | ".join(cells) + " |" + gain)
    header = "| case | " + " | ".join(f"timm {d} | vit_jax {d} | ratio | MFU" for d in dtypes)
    print(header + (" | vit_jax bf16/fp32 |" if len(dtypes) == 2 else " |"))
    print("|---|" + "---:|" * (4 * len(dtypes) + (len(dtypes) == 2)))
    print("\n".join(rows))
    print(json.dumps(records))


if __name__ == "__main__":
    main()
