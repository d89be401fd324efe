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
# Every run's parameters by name, `{run index}:{path}`.
LEAVES: dict[str, np.ndarray] = {}
MESHES = {
    "single": None,
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data4_model2": dict(data=4, model=2),
    "data2_fsdp2_model2": dict(data=2, fsdp=2, model=2),
}
QKV = "MultiHeadDotProductAttention_1/query/kernel"
MLP = "MlpBlock_3/Dense_0/kernel"
# A scanned model (blocks stacked on a leading axis) trained with AdamW (two sharded moments).
SCAN_ADAMW = {"model.scan": True, "optimizer": "adamw", "weight_decay": 0.1, "base_lr": 0.002}


def run(mesh_shape, steps=3, accum_steps=1, batch=32, memory=False, **changes):
    config = tiny.tiny_config(
        **{
            "accum_steps": accum_steps,
            "batch": batch,
            "base_lr": 0.1,
            "warmup_steps": 0,
            "optimizer": "sgd",
            **changes,
        }
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
    out = {}
    if memory:
        compiled = step.lower(params, opt_state, 0, batch_arrays).compile()
        out["argument_bytes"] = int(compiled.memory_analysis().argument_size_in_bytes)
    losses = []
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, i, batch_arrays)
        losses.append(float(metrics["train_loss"]))
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
    PARAMS[len(PARAMS)] = flat
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        LEAVES[f"{len(PARAMS) - 1}:{sharding.path_str(path)}"] = np.asarray(x)
    specs = sharding.describe(psh)
    block = "encoderblock" if config.model.scan else "encoderblock_0"
    opt_specs = sharding.describe(osh)
    return dict(
        out,
        losses=losses,
        params_index=len(PARAMS) - 1,
        qkv_spec=specs[f"Transformer/{block}/{QKV}"],
        mlp_spec=specs[f"Transformer/{block}/{MLP}"],
        # Every optimizer-state leaf of the query kernel (momentum; AdamW's mu and nu).
        opt_qkv_specs=sorted(str(v) for k, v in opt_specs.items() if k.endswith(QKV)),
    )


def heads_error() -> str:
    """The error of a model whose 2 heads cannot be split over a model axis of 4."""
    config = tiny.tiny_config()
    model = models.get_model(config.model, num_classes=10)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, (8, 8)))
    try:
        trainer.create_state(model, tx, sharding.make_mesh(data=2, model=4), (8, 8), seed=0)
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


if __name__ == "__main__":
    out = {name: run(shape, memory=name in ("data8", "fsdp8")) for name, shape in MESHES.items()}
    # Accumulation: 4 micro-batches of 8 vs one batch of 32, one step, on 8 devices.
    out["accum4"] = run(dict(data=8), steps=3, accum_steps=4)
    out["scan_adamw_single"] = run(None, **SCAN_ADAMW)
    out["scan_adamw_data2_fsdp2_model2"] = run(dict(data=2, fsdp=2, model=2), **SCAN_ADAMW)
    out["heads_error"] = heads_error()
    np.savez(sys.argv[1], *[PARAMS[i] for i in range(len(PARAMS))], **LEAVES)
    print(json.dumps(out))
