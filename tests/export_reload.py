"""Runs exported artifacts with their own runtime only, as a deployment would: never vit_jax.

    python export_reload.py FORMAT ARTIFACT_DIR INPUTS.npz OUTPUTS.npz [ARTIFACT_DIR ...]

FORMAT: stablehlo (jax.export alone), saved_model (TensorFlow alone) or onnx (onnxruntime alone).
INPUTS.npz: `x` float32 [n, res, res, 3] in [-1, 1] (the model's input); for saved_model also
`images_0`, `images_1`, ... uint8 [m, h, w, 3] batches of any size. OUTPUTS.npz: `logits` of x,
`logits_first` of x[:1] (another batch size), `class_names` as the artifact records them (and
`json_class_names` from model.json); for saved_model `logits_i` and `probabilities_i` of each
uint8 batch and `asset_class_names` from assets/class_names.txt. Exits non-zero if vit_jax (or,
for stablehlo and onnx, another framework) got imported.
"""

import json
import sys
from pathlib import Path

import numpy as np

FORBIDDEN = {
    "stablehlo": ("vit_jax", "tensorflow", "onnxruntime", "flax"),
    "saved_model": ("vit_jax", "onnxruntime", "flax"),
    "onnx": ("vit_jax", "jax", "tensorflow", "flax"),
}


def stablehlo(artifact: Path, inputs: dict) -> dict:
    import jax

    exported = jax.export.deserialize(bytearray((artifact / "model.jax_exported").read_bytes()))
    x = inputs["x"]
    return {
        "logits": np.asarray(exported.call(x)),
        "logits_first": np.asarray(exported.call(x[:1])),
        "class_names": np.array(json.loads((artifact / "model.json").read_text())["class_names"]),
    }


def saved_model(artifact: Path, inputs: dict) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(artifact))
    serve, pre = loaded.signatures["serving_default"], loaded.signatures["preprocessed"]
    x = inputs["x"]
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    out = {
        "logits": pre(inputs=tf.constant(x))["logits"].numpy(),
        "logits_first": pre(inputs=tf.constant(x[:1]))["logits"].numpy(),
        "class_names": np.array([n.decode() for n in names]),
        "asset_class_names": np.array(
            (artifact / "assets" / "class_names.txt").read_text().splitlines()
        ),
    }
    i = 0
    while f"images_{i}" in inputs:
        result = serve(images=tf.constant(inputs[f"images_{i}"]))
        out[f"logits_{i}"] = result["logits"].numpy()
        out[f"probabilities_{i}"] = result["probabilities"].numpy()
        i += 1
    return out


def onnx(artifact: Path, inputs: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "images" and model_input.shape[1:] == list(inputs["x"].shape[1:])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    meta = session.get_modelmeta().custom_metadata_map
    x = inputs["x"]
    return {
        "logits": session.run(["logits"], {"images": x})[0],
        "logits_first": session.run(["logits"], {"images": x[:1]})[0],
        "class_names": np.array(json.loads(meta["class_names"])),
    }


def main(argv: list[str]) -> int:
    fmt, jobs = argv[0], argv[1:]
    run = {"stablehlo": stablehlo, "saved_model": saved_model, "onnx": onnx}[fmt]
    for artifact, inputs_path, outputs_path in zip(jobs[::3], jobs[1::3], jobs[2::3], strict=True):
        artifact = Path(artifact)
        with np.load(inputs_path) as f:
            inputs = dict(f)
        out = run(artifact, inputs)
        out["json_class_names"] = np.array(
            json.loads((artifact / "model.json").read_text())["class_names"]
        )
        np.savez(outputs_path, **out)
    imported = sorted(m for m in FORBIDDEN[fmt] if m in sys.modules)
    if imported:
        print(f"imported {imported} while running {fmt} artifacts", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
