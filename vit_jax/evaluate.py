"""`python -m vit_jax.evaluate --checkpoint PATH --config=configs/vit.py:b16,imagenet2012 [--json]`.

Runs the trainer's eval pipeline (resize, central crop, padded and masked batches) over the
config's test split (`pp.test`) and reports top-1 / top-5 accuracy and loss. PATH is anything
`vit_jax.inference.load_model` reads; the model comes from the checkpoint when it records it,
otherwise from the config (`config.model`).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config with the data settings.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Workdir, checkpoint, .npz or converted file."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def evaluate_checkpoint(checkpoint: str, config) -> dict[str, float]:
    import jax

    from vit_jax import data, inference, sharding, trainer

    try:
        trained = inference.load_model(checkpoint)
    except ValueError:
        trained = inference.load_model(checkpoint, model=config.model_name)
    mesh = sharding.make_mesh(**config.mesh.to_dict())
    param_sh = sharding.tree_shardings(trained.params, mesh)
    params = trainer.put_sharded(trained.params, param_sh)
    batch_sh = sharding.batch_sharding(mesh)
    eval_step = jax.jit(
        trainer.make_eval_step(trained.model),
        in_shardings=(param_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    return trainer.evaluate(eval_step, params, data.eval_iterator(config, batch_sh))


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None or not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint and --config are required")
    try:
        results = evaluate_checkpoint(_CHECKPOINT.value, _CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if _JSON.value:
        print(json.dumps({"checkpoint": _CHECKPOINT.value, **results}))
    else:
        print(
            f"{_CHECKPOINT.value}: top-1 {results['test_accuracy']:.4f}, top-5 "
            f"{results['test_top5_accuracy']:.4f}, loss {results['test_loss']:.4f} "
            f"({results['test_examples']} examples)"
        )


if __name__ == "__main__":
    app.run(main)
