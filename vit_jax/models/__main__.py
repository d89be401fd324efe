"""`python -m vit_jax.models`: the zoo with parameter counts (1000 classes, 224x224)."""

from __future__ import annotations

import argparse
import json

from vit_jax.models import zoo

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vit_jax.models", description=__doc__)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=zoo.DEFAULT_RESOLUTION)
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args(argv)
    if not args.json:
        print(f"{'model':<22} {'parameters':>13}  {'patch':>6}  resolution")
    for name in zoo.list_models():
        config = zoo.get_config(name)
        count = zoo.count_params(name, num_classes=args.num_classes, image_size=args.resolution)
        patch = "x".join(str(p) for p in config.patches.size)
        if args.json:
            row = dict(model=name, parameters=count, patch=patch, resolution=args.resolution)
            print(json.dumps(row))
        else:
            print(f"{name:<22} {count:>13,}  {patch:>6}  {args.resolution}")


if __name__ == "__main__":
    main()
