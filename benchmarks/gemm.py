"""Bare GEMMs of ViT-B/16's MLP shape, forward and both backward products, XLA:CPU vs PyTorch.

    python benchmarks/gemm.py [--torch-python /work/timm-venv/bin/python] [--rounds 2]

Forms: float32; the precision policy's bf16 x bf16 -> f32 (`preferred_element_type`); the
bf16 x bf16 -> bf16 form Flax's `nn.Dense(dtype=bfloat16)` emits by itself; PyTorch float32
and bfloat16.

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
for dt in (torch.float32, torch.bfloat16):
    a, w, dy = a.to(dt), w.to(dt), dy.to(dt)
    print(f"torch {{torch.__version__}} {{dt}}: forward {{t(lambda: a @ w):.0f}}, dy.wT "
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


FORMS = {  # name: (operand dtype, accumulation/result dtype)
    "float32": (jnp.float32, None),
    "bf16->f32 (policy)": (jnp.bfloat16, jnp.float32),
    "bf16->bf16 (Flax default)": (jnp.bfloat16, None),
}


def jax_rates(form: str) -> str:
    dtype, out = FORMS[form]
    rng = np.random.default_rng(0)
    a, w, dy = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((M, K), (K, N), (M, N)))
    mm = lambda x, y: jnp.matmul(x, y, preferred_element_type=out)
    fwd = _rate(jax.jit(lambda a, w: mm(a, w)), a, w)
    dx = _rate(jax.jit(lambda dy, w: mm(dy, w.T)), dy, w)
    try:
        dw = f"{_rate(jax.jit(lambda a, dy: mm(a.T, dy)), a, dy):.0f}"
    except jax.errors.JaxRuntimeError as e:  # XLA:CPU's own dot has no bf16 -> f32 kernel
        dw = f"fails ({str(e).splitlines()[0][-60:]})"
    return f"jax {jax.__version__} {form}: forward {fwd:.0f}, dy.wT {dx:.0f}, aT.dy {dw} GFLOP/s"


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
        for form in FORMS:
            print(jax_rates(form))


if __name__ == "__main__":
    main()
