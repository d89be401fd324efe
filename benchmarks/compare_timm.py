"""Side-by-side: vit_jax's benchmark CLI vs timm, alternating runs, medians and ratios.

    python benchmarks/compare_timm.py --timm-python /work/timm-venv/bin/python [--rounds 2]

Each measurement is its own process (timm and TensorFlow never share one). Rows: ViT-Ti/16
batch 32 and ViT-B/16 batch 16 at 224, train (SGD momentum) and inference, fp32, plus our bf16
train. Prints a Markdown table for BENCHMARKS.md and the raw JSON records.
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
    args = p.parse_args()
    records, rows = [], []
    for name, timm_name, batch in CASES:
        if name not in args.models.split(","):
            continue
        for mode in ("train", "infer"):
            a, b, c = [], [], []
            for _ in range(args.rounds):  # alternate so drifts in machine load hit both
                r = ours(name, batch, mode, steps=args.steps)
                a.append(r)
                b.append(timm(args.timm_python, timm_name, batch, mode, steps=args.steps))
                if mode == "train":
                    c.append(ours(name, batch, mode, "bfloat16", steps=args.steps))
            records += a + b + c
            med = lambda rs: statistics.median(x["img_per_sec"] for x in rs)
            mfu = statistics.median(x["mfu"] for x in a)
            bf16 = f"{med(c):.2f} ({med(c) / med(a):.2f}x)" if c else "-"
            rows.append(
                f"| {name} b{batch} {mode} | {med(b):.2f} | {med(a):.2f} | "
                f"{med(a) / med(b):.2f}x | {mfu:.0%} | {bf16} | "
                f"{statistics.median(x['compile_time_s'] for x in a):.1f} |"
            )
    print(
        "| case | timm img/s | vit_jax fp32 img/s | ratio | vit_jax MFU | vit_jax bf16 img/s "
        "| compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(json.dumps(records))


if __name__ == "__main__":
    main()
