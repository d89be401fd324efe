"""`python -m vit_jax.models`: the zoo with parameter counts, each counted as published.

Classifiers are counted with a 1000-class head at 224x224; the backbones published without a
head (SigLIP image towers, DINOv2) as feature extractors (`num_classes=None`) at their native
resolution. The `head` and `resolution` columns say what each row counts; `--num-classes` and
`--resolution` count every row alike instead.
"""

from __future__ import annotations

import json

from vit_jax import cli

__all__ = ["FEATURE_EXTRACTORS", "counted_as", "main"]

# Zoo name prefixes of the models whose published weights have no classifier head.
FEATURE_EXTRACTORS = ("SigLIP-", "DINOv2-", "DINOv3-")

FOOTNOTE = (
    "head: classes of the counted head (none: a feature extractor, num_classes=None, as SigLIP "
    "and DINOv2 are published); resolution: the input counted (a fixed posemb_grid keeps the "
    "count the same at any resolution)"
)


def counted_as(
    name: str, num_classes: int | None = None, resolution: int | None = None
) -> tuple[int | None, int]:
    """(num_classes, resolution) a zoo model is counted with: as published unless given.

    `num_classes` 0 counts no head. The native resolution is the stored position grid times
    the patch stride (`posemb_grid`: SigLIP, DINOv2, DeiT-III), else `DEFAULT_RESOLUTION`.
    """
    from vit_jax.models import zoo

    if num_classes is None:
        num_classes = None if name.startswith(FEATURE_EXTRACTORS) else 1000
    if resolution is None:
        config = zoo.get_config(name)
        resolution = zoo.DEFAULT_RESOLUTION
        if config.get("posemb_grid") is not None:
            resolution = zoo.position_table_grid(config, resolution)[0] * zoo.stride(config)[0]
    return num_classes or None, resolution


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m vit_jax.models", description=__doc__)
    parser.add_argument(
        "--num-classes",
        type=int,
        help="head size for every row (0: no head; default: as published)",
    )
    parser.add_argument(
        "--resolution", type=int, help="input size for every row (default: each model's native)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    args = parser.parse_args(argv)
    if (args.num_classes or 0) < 0 or (args.resolution is not None and args.resolution < 1):
        parser.error("--num-classes must be at least 0 and --resolution at least 1")

    from vit_jax.models import zoo

    if not args.json:
        print(f"{'model':<22} {'parameters':>13}  {'head':>4}  {'patch':>5}  resolution")
    for name in zoo.list_models():
        num_classes, resolution = counted_as(name, args.num_classes, args.resolution)
        count = zoo.count_params(name, num_classes=num_classes, image_size=resolution)
        patch = "x".join(str(p) for p in zoo.get_config(name).patches.size)
        if args.json:
            row = dict(
                model=name,
                parameters=count,
                num_classes=num_classes,
                patch=patch,
                resolution=resolution,
            )
            print(json.dumps(row))
        else:
            head = "none" if num_classes is None else str(num_classes)
            print(f"{name:<22} {count:>13,}  {head:>4}  {patch:>5}  {resolution}")
    if not args.json:
        print(f"\n{FOOTNOTE}")
    return cli.EXIT_OK


if __name__ == "__main__":
    import sys

    sys.exit(cli.run(main))
