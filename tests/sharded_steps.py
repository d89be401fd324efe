"""Runs a few train steps of a tiny model on several meshes; prints JSON (run by test_train.py).

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py OUT.npz
"""

import json
import sys

import jax
import numpy as np
import tiny

from vit_jax import models, optim, sharding, trainer

PARAMS: dict[int, np.ndarray] = {}
MESHES = {
    "single": None,
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data4_model2": dict(data=4, model=2),
}


def run(mesh_shape, steps=3, accum_steps=1, batch=32):
    config = tiny.tiny_config(
        accum_steps=accum_steps, batch=batch, base_lr=0.1, warmup_steps=0, optimizer="sgd"
    )
    devices = jax.devices()[:1] if mesh_shape is None else None
    mesh = sharding.make_mesh(**(mesh_shape or {}), devices=devices)
    model = models.get_model(config.model, num_classes=10)
    size = (8, 8)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, size))
    params, opt_state, psh, osh = trainer.create_state(model, tx, mesh, size, seed=0)
    bsh = sharding.batch_sharding(mesh)
    step = trainer.TrainStep(model, tx, config, mesh, psh, osh)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, 8, 8, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    batch_arrays = jax.device_put({"image": images, "label": labels}, bsh)
    memory = step.lower(params, opt_state, 0, batch_arrays).compile().memory_analysis()
    losses = []
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, i, batch_arrays)
        losses.append(float(metrics["train_loss"]))
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
    PARAMS[len(PARAMS)] = flat
    specs = sharding.describe(psh)
    return dict(
        losses=losses,
        params_index=len(PARAMS) - 1,
        argument_bytes=int(memory.argument_size_in_bytes),
        qkv_spec=specs["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"],
        mlp_spec=specs["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"],
    )


if __name__ == "__main__":
    out = {name: run(shape) for name, shape in MESHES.items()}
    # Accumulation: 4 micro-batches of 8 vs one batch of 32, one step, on 8 devices.
    out["accum4"] = run(dict(data=8), steps=3, accum_steps=4)
    np.savez(sys.argv[1], *[PARAMS[i] for i in range(len(PARAMS))])
    print(json.dumps(out))
