"""The chunked sigmoid loss on 4 and 8 simulated devices vs one device (run by test_contrastive.py).

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/contrastive_devices.py OUT.npz

Writes, for every case `{mesh}_{case}`, the loss and its gradients (w.r.t. the image and text
embeddings, t and b) from `sharded_sigmoid_loss` (`ring_*`) and from `sigmoid_loss` on one
device (`one_*`); `{mesh}_hlo_shapes`: the array shapes of the compiled sharded gradient;
`{mesh}_error`: the message of a batch that does not divide over the devices.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import contrastive

# (global batch, embedding dim, t, b): SigLIP's init, then a trained-like scale and bias.
CASES = {"init": (24, 7, 10.0, -10.0), "trained": (48, 16, 30.0, -5.0)}
NAMES = ("loss", "img", "txt", "t", "b")
# name: (mesh shape, axis names); the batch is split over all the axes (as vit_jax's data, fsdp).
MESHES = {"4": ((4,), ("data",)), "8": ((8,), ("data",)), "data4_fsdp2": ((4, 2), ("data", "fsdp"))}


def embeddings(n, d, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = rng.normal(size=(n, d))
        out.append(jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32))
    # Make the positives stand out, as in training, so both label kinds carry weight.
    out[1] = out[1] + 0.8 * out[0]
    out[1] = out[1] / jnp.linalg.norm(out[1], axis=1, keepdims=True)
    return out


def main(out_path):
    results = {}
    value_and_grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    one = value_and_grad(contrastive.sigmoid_loss)
    for mesh_name, (shape, axes) in MESHES.items():
        devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
        mesh = jax.sharding.Mesh(devices, axes)
        axis = axes[0] if len(axes) == 1 else axes
        ring = value_and_grad(
            lambda *a, mesh=mesh, axis=axis: contrastive.sharded_sigmoid_loss(mesh, *a, axis=axis)
        )
        for case, (n, d, t, b) in CASES.items():
            img, txt = embeddings(n, d, seed=devices.size)
            args = (img, txt, jnp.float32(t), jnp.float32(b))
            for kind, fn in (("one", one), ("ring", ring)):
                loss, grads = fn(*args)
                for name, value in zip(NAMES, (loss, *grads), strict=True):
                    results[f"{mesh_name}_{case}_{kind}_{name}"] = np.asarray(value)
            if case == "init":
                hlo = ring.lower(*args).compile().as_text()
                shapes = sorted(set(re.findall(r"f32\[[0-9,]*\]", hlo)))
                results[f"{mesh_name}_hlo_shapes"] = np.array(shapes)
        try:
            img, txt = embeddings(devices.size + 2, 4, seed=0)
            contrastive.sharded_sigmoid_loss(mesh, img, txt, 10.0, -10.0, axis=axis)
            results[f"{mesh_name}_error"] = np.array("no error")
        except ValueError as e:
            results[f"{mesh_name}_error"] = np.array(str(e))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
