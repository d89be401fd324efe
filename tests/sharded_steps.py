"""Runs a few train steps of a tiny model on several meshes; prints JSON (run by test_train.py).

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py OUT.npz
"""

import json
import sys
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tiny

from vit_jax import checkpoint, models, objectives, optim, sharding, trainer

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
# Other model kinds, each tiny, compared on one device vs data=2 x fsdp=2 x model=2.
TINY = dict(hidden_size=32, transformer=dict(mlp_dim=64, num_heads=2, num_layers=1))
KINDS = {
    # R+ViT: a 1-stage ResNet stem (32 channels: GroupNorm's 32 groups) under 1x1 patches.
    "hybrid": dict(TINY, patches=dict(size=(1, 1)), resnet=dict(num_layers=(1,), width_factor=0.5)),
    # Token- and channel-mixing MLPs tensor-parallel over `model`.
    "mixer": dict(
        model_type="Mixer",
        patches=dict(size=(2, 2)),
        hidden_dim=32,
        num_blocks=2,
        tokens_mlp_dim=16,
        channels_mlp_dim=64,
    ),
    # Multi-head attention pooling: the probe's attention and MLP sharded as the blocks'.
    "map": dict(TINY, patches=dict(size=(4, 4)), classifier="map"),
}
KIND_MESH = dict(data=2, fsdp=2, model=2)


def run(
    mesh_shape, steps=3, accum_steps=1, batch=32, memory=False, model=None, teacher=None, **changes
):
    """`steps` SGD steps (unless `changes` say otherwise) of the tiny ViT, or of `model` (a model
    config), on `mesh_shape` (None: one device); with `teacher` (a checkpoint path), distilled."""
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
    if model is not None:
        config.model = models.get_config(model)
    if teacher is not None:
        _distill(config, teacher)
    devices = jax.devices()[:1] if mesh_shape is None else None
    mesh = sharding.make_mesh(**(mesh_shape or {}), devices=devices)
    model = models.get_model(config.model, num_classes=10)
    size = (8, 8)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, size))
    state, shardings = trainer.create_state(model, tx, mesh, size, seed=0)
    bsh = sharding.batch_sharding(mesh)
    objective = objectives.build(config, model, mesh)
    step = trainer.TrainStep(model, tx, config, mesh, shardings, objective)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, 8, 8, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    batch_arrays = jax.device_put({"image": images, "label": labels}, bsh)
    out = {}
    if memory:
        compiled = step.lower(state, batch_arrays).compile()
        out["argument_bytes"] = int(compiled.memory_analysis().argument_size_in_bytes)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch_arrays)
        losses.append(float(metrics["train_loss"]))
    params = state.params
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
    PARAMS[len(PARAMS)] = flat
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        LEAVES[f"{len(PARAMS) - 1}:{sharding.path_str(path)}"] = np.asarray(x)
    specs = sharding.describe(shardings.params)
    block = "encoderblock" if config.model.get("scan") else "encoderblock_0"
    opt_specs = sharding.describe(shardings.opt_state)
    return dict(
        out,
        losses=losses,
        params_index=len(PARAMS) - 1,
        specs=specs,
        frozen_specs=sharding.describe(jax.tree.map(lambda x: x.sharding, objective.frozen)),
        qkv_spec=specs.get(f"Transformer/{block}/{QKV}"),
        mlp_spec=specs.get(f"Transformer/{block}/{MLP}"),
        # Every optimizer-state leaf of the query kernel (momentum; AdamW's mu and nu).
        opt_qkv_specs=sorted(str(v) for k, v in opt_specs.items() if k.endswith(QKV)),
    )


def _distill(config: ml_collections.ConfigDict, teacher: str) -> None:
    """Makes `config` distil (soft, T=2, alpha=0.5) from the `.npz` teacher at `teacher`."""
    config.objective = "distillation"
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=teacher, model="", dtype=""))
    config.alpha, config.temperature, config.distill_type = 0.5, 2.0, "soft"


def write_teacher(directory: Path) -> str:
    """A random (non-zero head) 2-layer ViT teacher for 8x8 digits, as a final.npz; its path."""
    config = models.get_config(
        dict(TINY, patches=dict(size=(4, 4)), transformer=dict(TINY["transformer"], num_layers=2))
    )
    shapes = models.init_shapes(models.get_model(config, num_classes=10), 8)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), shapes)
    meta = dict(model=config.to_dict(), class_names=[str(i) for i in range(10)], image_size=[8, 8])
    return str(checkpoint.save_npz(params, directory / "teacher.npz", metadata=meta))


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
    for kind, model in KINDS.items():
        out[f"{kind}_single"] = run(None, model=model)
        out[f"{kind}_mesh"] = run(KIND_MESH, model=model)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = write_teacher(Path(tmp))
        out["distill_single"] = run(None, teacher=teacher)
        out["distill_mesh"] = run(KIND_MESH, teacher=teacher)
    out["heads_error"] = heads_error()
    np.savez(sys.argv[1], *[PARAMS[i] for i in range(len(PARAMS))], **LEAVES)
    print(json.dumps(out))
