"""Interleaved A/B of train-step variants in one process: small speed differences on a noisy host.

    python benchmarks/ab_step.py --model ViT-Ti_16 --batch 32 --variants explicit,xla [--rounds 10]

Each variant is `ATTENTION[@DTYPE]` (attention core `explicit` | `xla`, dtype `float32` |
`bfloat16`). All variants are compiled first, then timed one step each in turn, round after round,
so drifts in machine load hit every variant alike; prints img/s and the median per-round speed
ratio against the first variant.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from vit_jax import benchmark  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-Ti_16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--variants", default="explicit,xla")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    steps = {}
    for variant in args.variants.split(","):
        attention, _, dtype = variant.partition("@")
        case = benchmark.Case(
            args.model,
            batch=args.batch,
            resolution=args.resolution,
            mode=args.mode,
            dtype=dtype or "float32",
            model_overrides={"attention_implementation": attention},
        )
        _, one_step, compile_s = benchmark.build_step(case)
        for i in range(2):
            jax.block_until_ready(one_step(i))
        steps[variant] = one_step
        print(f"{variant}: compiled in {compile_s:.1f} s", flush=True)
    times = {v: [] for v in steps}
    for r in range(args.rounds):
        for v, one_step in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(one_step(2 + r))
            times[v].append(time.perf_counter() - t)
    base = next(iter(steps))
    for v in steps:
        ratio = statistics.median(a / b for a, b in zip(times[base], times[v], strict=True))
        img_s = args.batch / statistics.median(times[v])
        print(f"{v}: {img_s:.2f} img/s, {ratio:.3f}x the speed of {base}")


if __name__ == "__main__":
    main()
