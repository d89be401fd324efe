"""`python -m vit_jax.benchmark`: img/s, step time, compile time, MFU and memory of a model.

Measures the trainer's real train step (SGD momentum, donated state, the same `jax.jit`) or the
inference function, on random data already on the device, after warm-up; reports medians. MFU is
the model's FLOPs per second (XLA's cost analysis of the compiled step) over a matmul peak of the
same dtype measured on the spot (a 2048^3 matmul on this device).

    python -m vit_jax.benchmark --architecture ViT-B_16 --batch 16 --mode train --json

`--artifact DIR` times an exported model instead (`python -m vit_jax.export`), with the runtime a
deployment would use: ONNX Runtime (CPU) for `onnx`, TensorFlow for `saved_model` (its
`preprocessed` signature: the model alone, as the XLA path), `jax.export` for `stablehlo` --
inference on random inputs at the artifact's resolution, so it lines up with `--mode infer`:

    python -m vit_jax.benchmark --artifact exported/vit_onnx --batch 8 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_jax import cli

if TYPE_CHECKING:
    import ml_collections

# jax, TensorFlow and the trainer are imported inside the functions: `python -m vit_jax.benchmark`
# parses its flags and starts its console (`cli.start`) before anything loads them.

KEYS = ("img_per_sec", "step_time_s", "compile_time_s", "mfu", "peak_memory_bytes")


def matmul_peak_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a size^3 matmul in the dot form the models use for `dtype`.

    That is the precision policy's product (`vit_jax.models.precision.dot_general`): float32
    operands for float32, 16-bit operands with float32 accumulation for bfloat16.
    """
    import jax
    import jax.numpy as jnp

    from vit_jax.models import precision

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    dot = precision.dot_general(dtype)
    f = jax.jit(lambda x, y: dot(x, y, (((1,), (0,)), ((), ()))))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _peak_memory(compiled) -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    m = compiled.memory_analysis()  # CPU: what the executable needs
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The trainer's config (`vit_jax.configs`) with the reference fine-tuning recipe (SGD
    momentum 0.9, grad clip 1) at lr 0.01 with a short warmup; `overrides` set any key. A
    ConfigDict value (a model's config) replaces the key's sub-config, a dict is merged into it."""
    import ml_collections

    from vit_jax import configs

    c = configs.get_config()
    c.update(dict(base_lr=0.01, warmup_steps=10, total_steps=1000))
    for key, value in overrides.items():
        if isinstance(value, ml_collections.ConfigDict):
            c[key] = value  # whole: `update` would merge, and cannot merge typed placeholders
        else:
            c.update({key: value})
    return c


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration to time: a zoo model (`model_overrides` replace its config entries,
    e.g. `{"scan": True}`), the global batch, the square input size, `train` (a full optimizer
    step) or `infer` (the forward pass), the compute dtype and the head size."""

    model_name: str
    batch: int
    resolution: int
    mode: str = "train"
    dtype: str = "float32"
    num_classes: int = 1000
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def build_step(
    case: Case, *, compile: bool = True
) -> tuple[Any, Callable[[int], Any] | None, float]:
    """(compiled step, `one_step(i)` running it on a fixed batch, seconds to lower + compile).

    With `compile=False`: (the lowered step, None, seconds to lower), e.g. for its cost analysis.
    """
    import jax

    from vit_jax import models, optim, sharding, trainer

    if case.mode not in ("train", "infer"):
        raise ValueError(f"--mode must be 'train' or 'infer', got {case.mode!r}")
    model = models.get_model(
        case.model_name, num_classes=case.num_classes, dtype=case.dtype, **case.model_overrides
    )
    mesh = sharding.make_mesh()
    size = (case.resolution, case.resolution)
    config = train_config()
    tx = optim.make_optimizer(
        config,
        trainer.abstract_params(model, size),
        no_decay=models.no_decay_patterns(config.model),
    )
    state, shardings = trainer.create_state(model, tx, mesh, size, seed=0)
    params = state.params
    bsh = sharding.batch_sharding(mesh)
    images, labels = _random_batch(case.batch, size, case.num_classes, bsh)
    t0 = time.perf_counter()
    if case.mode == "train":
        fn = trainer.TrainStep(model, tx, config, mesh, shardings)
        batch_in = {"image": images, "label": labels}
        lowered = fn.lower(state, batch_in)
        if not compile:
            return lowered, None, time.perf_counter() - t0
        compiled = lowered.compile()
        held = [state]

        def one_step(i):
            del i  # the state counts its steps
            held[0], metrics = compiled(held[0], batch_in, {})
            return metrics["train_loss"]

        return compiled, one_step, time.perf_counter() - t0

    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])
    lowered = fn.lower(params, images)
    if not compile:
        return lowered, None, time.perf_counter() - t0
    compiled = lowered.compile()
    return compiled, lambda i: compiled(params, images), time.perf_counter() - t0


def _random_batch(batch: int, size: tuple[int, int], num_classes: int, sharding) -> tuple:
    """(images in [-1, 1], one-hot labels) of a fixed seed, placed with `sharding`."""
    import jax

    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(-1, 1, (batch, *size, 3)).astype(np.float32), sharding)
    labels = jax.device_put(
        np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch)], sharding
    )
    return images, labels


def _median_step_time(one_step: Callable[[int], Any], warmup: int, steps: int) -> float:
    """Median wall time of `steps` calls after `warmup` untimed ones (each run to completion)."""
    import jax

    for i in range(warmup):
        jax.block_until_ready(one_step(i))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(one_step(warmup + i))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(
    case: Case, *, steps: int = 10, warmup: int = 2, measure_peak: bool = True
) -> dict[str, Any]:
    """Benchmarks one configuration; returns the JSON record.

    Long: the record's fields are listed here, in one place.
    """
    import jax

    from vit_jax.models import precision

    compiled, one_step, compile_time = build_step(case)
    step_time = _median_step_time(one_step, warmup, steps)
    flops = _flops(compiled)
    overrides = case.model_overrides
    if overrides.get("scan") or overrides.get("remat"):
        # XLA's cost analysis counts a scanned loop body once (and remat recomputes): model FLOPs
        # come from the plain, unrolled step, lowered but not compiled.
        plain = {**overrides, "scan": False, "remat": False}
        lowered, _, _ = build_step(dataclasses.replace(case, model_overrides=plain), compile=False)
        flops = _flops(lowered)
    peak = matmul_peak_flops(case.dtype) if measure_peak else float("nan")
    return {
        "img_per_sec": case.batch / step_time,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        "mfu": flops / step_time / peak if flops else float("nan"),
        "peak_memory_bytes": _peak_memory(compiled),
        "model_flops_per_image": flops / case.batch,
        "matmul_peak_flops": peak,
        "model": case.model_name,
        "mode": case.mode,
        "batch": case.batch,
        "resolution": case.resolution,
        "dtype": case.dtype,
        "precision": precision.describe(case.dtype),
        "attention": overrides.get("attention_implementation") or "auto",
        "steps": steps,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }


def _artifact_runner(path: Path, meta: dict, x: np.ndarray) -> tuple[Callable[[int], Any], str]:
    """(`one_step(i)`: the artifact's logits of `x`, 'runtime version') for `meta['format']`."""
    fmt = meta.get("format")
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        return lambda i: session.run(["logits"], {"images": x})[0], f"onnxruntime {ort.__version__}"
    if fmt == "saved_model":
        import tensorflow as tf

        fn = tf.saved_model.load(str(path)).signatures["preprocessed"]
        inputs = tf.constant(x)
        return lambda i: fn(inputs=inputs)["logits"].numpy(), f"tensorflow {tf.__version__}"
    if fmt == "stablehlo":
        import jax

        exported = jax.export.deserialize(bytearray((path / "model.jax_exported").read_bytes()))
        call = jax.jit(exported.call)
        device_x = jax.device_put(x)
        return lambda i: call(device_x), f"jax.export (jax {jax.__version__})"
    raise ValueError(f"{path / 'model.json'}: unknown format {fmt!r}")


def run_artifact(path: str, *, batch: int, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Benchmarks inference of an exported model directory; returns the JSON record
    (`load_time_s`: loading it and the first call, the counterpart of `compile_time_s`)."""
    import jax

    root = Path(path)
    try:
        meta = json.loads((root / "model.json").read_text())
        res = int(meta["resolution"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not an exported model (python -m vit_jax.export): no readable model.json "
            f"({type(e).__name__}: {e})"
        ) from None
    x = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    t0 = time.perf_counter()
    one_step, runtime = _artifact_runner(root, meta, x)
    jax.block_until_ready(one_step(0))
    load_time = time.perf_counter() - t0
    step_time = _median_step_time(one_step, warmup, steps)
    return {
        "img_per_sec": batch / step_time,
        "step_time_s": step_time,
        "load_time_s": load_time,
        "artifact": str(path),
        "format": meta["format"],
        "runtime": runtime,
        "model": (meta.get("model") or {}).get("name"),
        "mode": "infer",
        "batch": batch,
        "resolution": res,
        "steps": steps,
        "cpu_count": os.cpu_count(),
    }


def _flags(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m vit_jax.benchmark", description=__doc__)
    p.add_argument(
        "--architecture",
        default="ViT-B_16",
        metavar="NAME",
        help="zoo name of the model to build and time, random weights (e.g. ViT-Ti_16)",
    )
    cli.add_deprecated_alias(p, "--model", "--architecture")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224, help="input size")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scan", action="store_true", help="scan over layers (faster compile)")
    p.add_argument("--remat", action="store_true")
    p.add_argument(
        "--attention",
        choices=("explicit", "xla", "cudnn"),
        help="attention core: explicit matmuls (default off GPU) or jax.nn.dot_product_attention",
    )
    p.add_argument(
        "--artifact",
        help="an exported model directory (python -m vit_jax.export) to time instead "
        "(inference; --architecture, --mode, --dtype and the model flags do not apply)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _print_artifact(r: dict[str, Any]) -> None:
    print(
        f"{r['artifact']} ({r['format']}, {r['runtime']}) inference batch {r['batch']} "
        f"@{r['resolution']} on {r['cpu_count']} CPUs:\n"
        f"  {r['img_per_sec']:.2f} img/s, step {r['step_time_s'] * 1e3:.1f} ms (median of "
        f"{r['steps']}), load + first call {r['load_time_s']:.1f} s"
    )


def _print_run(r: dict[str, Any]) -> None:
    print(
        f"{r['model']} {r['mode']} batch {r['batch']} @{r['resolution']} {r['dtype']} on "
        f"{r['device_count']}x {r['device_kind']} (jax {r['jax_version']}):\n"
        f"  precision: {r['precision']}; attention: {r['attention']}\n"
        f"  {r['img_per_sec']:.2f} img/s, step {r['step_time_s'] * 1e3:.1f} ms (median of "
        f"{r['steps']}), compile {r['compile_time_s']:.1f} s\n"
        f"  {r['model_flops_per_image'] / 1e9:.2f} GFLOP/image, MFU {r['mfu']:.1%} of a "
        f"{r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s {r['dtype']} matmul peak, "
        f"memory {r['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    try:
        if args.artifact:
            r = run_artifact(args.artifact, batch=args.batch, steps=args.steps, warmup=args.warmup)
        else:
            r = run(_case(args), steps=args.steps, warmup=args.warmup)
    except ValueError as e:
        return cli.fail(e, cli.EXIT_CONFIG)
    if args.json:
        print(json.dumps(r))
    else:
        (_print_artifact if args.artifact else _print_run)(r)
    return cli.EXIT_OK


def _case(args: argparse.Namespace) -> Case:
    overrides: dict[str, Any] = {"scan": True} if args.scan else {}
    if args.remat:
        overrides["remat"] = True
    if args.attention:
        overrides["attention_implementation"] = args.attention
    return Case(
        args.architecture,
        batch=args.batch,
        resolution=args.resolution,
        mode=args.mode,
        dtype=args.dtype,
        model_overrides=overrides,
    )


if __name__ == "__main__":
    sys.exit(cli.run(main))
