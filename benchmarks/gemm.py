"""Bare GEMMs of ViT-B/16's MLP shape, forward and both backward products, XLA:CPU vs PyTorch.

    python benchmarks/gemm.py [--torch-python /work/timm-venv/bin/python] [--rounds 2]

Shape: (B·N, D) · (D, 4D) with B·N = 16·197 = 3152, D = 768. Products: forward `a·w`, input
gradient `dy·wᵀ`, weight gradient `aᵀ·dy`. PyTorch runs in its own process (its own venv, no
TensorFlow imported); rounds alternate the two. Prints GFLOP/s, medians of 5 after a warm-up.
"""

import argparse
import os
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

M, K, N = 3152, 768, 3072
GFLOP = 2 * M * K * N / 1e9

TORCH = f"""
import statistics, time, torch
a, w, dy = torch.randn({M}, {K}), torch.randn({K}, {N}), torch.randn({M}, {N})
def t(f):
    f(); ts = []
    for _ in range(5):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return {GFLOP} / statistics.median(ts)
print(f"torch {{torch.__version__}}: forward {{t(lambda: a @ w):.0f}}, dy.wT "
      f"{{t(lambda: dy @ w.T):.0f}}, aT.dy {{t(lambda: a.T @ dy):.0f}} GFLOP/s")
"""


def _rate(f, *args) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return GFLOP / float(np.median(times))


def jax_rates() -> str:
    rng = np.random.default_rng(0)
    a, w, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((M, K), (K, N), (M, N)))
    fwd = _rate(jax.jit(lambda a, w: a @ w), a, w)
    dx = _rate(jax.jit(lambda dy, w: dy @ w.T), dy, w)
    dw = _rate(jax.jit(lambda a, dy: a.T @ dy), a, dy)
    return f"jax {jax.__version__}: forward {fwd:.0f}, dy.wT {dx:.0f}, aT.dy {dw:.0f} GFLOP/s"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--torch-python", default="")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.rounds):
        if args.torch_python:
            out = subprocess.run(
                [args.torch_python, "-c", TORCH], capture_output=True, text=True, check=True
            )
            print(out.stdout.strip())
        print(jax_rates())


if __name__ == "__main__":
    main()
