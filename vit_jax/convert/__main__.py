"""`python -m vit_jax.convert SRC DST`: converts between our .npz, transformers and timm.

Examples:
    python -m vit_jax.convert hf_model_dir/ vit.npz            # transformers -> ours (+ vit.json)
    python -m vit_jax.convert ViT-B_16.npz hf_dir/ --model ViT-B_16
    python -m vit_jax.convert runs/x/final.npz model.safetensors   # ours -> timm (+ model.json)

DST is written whole or not at all (in a staging folder beside it, renamed into place). An
existing DST (a file or its JSON sidecar, a folder that is not empty) is refused unless
--overwrite; that replaces it whole (a folder only when it is a transformers model folder), so
no file of the old model (a shard, an index, a sidecar) is left beside the new one.

Exit status: 0 converted; 2 a configuration error (bad flag, unreadable or unfit source, a
sharded index naming files outside the model folder, a FIFO or device where a file belongs, an
existing DST without --overwrite); 1 the destination could not be written. Errors are one
`error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from vit_jax import cli


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}") from None
    return h, w


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.convert",
        description="Convert ViT weights between our .npz (published layout + JSON sidecar), "
        "Hugging Face transformers directories and timm .safetensors state dicts. The format "
        "of each side follows from its name: a directory is transformers, .safetensors / .bin "
        "/ .pth is timm, .npz is ours.",
    )
    parser.add_argument("src", help="transformers dir, timm .safetensors/.bin/.pth, or .npz")
    parser.add_argument("dst", help="transformers dir, timm .safetensors, or .npz")
    parser.add_argument("--model", help=cli.MODEL_HELP + " (an .npz without sidecar, a timm file)")
    parser.add_argument(
        "--resolution",
        type=_size,
        metavar="H[xW]",
        help="input size the weights were made for, for a file that records none (a timm file); "
        "HxW for a non-square grid",
    )
    cli.add_deprecated_alias(parser, "--image-size", "--resolution", type=_size)
    parser.add_argument(
        "--num-heads",
        type=int,
        help="attention heads of a timm state dict whose model is not in the zoo (the other "
        "CLIs read such a file once converted; with a zoo model, --model says it)",
    )
    parser.add_argument(
        "--layout",
        choices=("vit_jax", "big_vision"),
        default="vit_jax",
        help="the .npz layout to write: ours (the published one) or big_vision's (SigLIP towers)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST whole (a transformers folder: every file of it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from vit_jax import convert
    from vit_jax.weights.errors import CheckpointError
    from vit_jax.weights.files import DestinationExistsError

    try:
        params, meta, out, kind = convert.convert(
            args.src,
            args.dst,
            model=args.model,
            num_heads=args.num_heads,
            image_size=args.resolution,
            layout=args.layout,
            overwrite=args.overwrite,
        )
    except DestinationExistsError as e:
        return cli.fail(e.for_cli("--overwrite"), cli.EXIT_CONFIG)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        return cli.fail(e, cli.EXIT_CONFIG)
    except OSError as e:  # the destination cannot be written (permissions, full disk)
        return cli.fail(f"{args.dst}: cannot be written ({e})", cli.EXIT_RUNTIME)
    names = {"hf": "transformers", "timm": "timm", "npz": "vit_jax .npz"}
    print(f"wrote {out} ({names[kind]}): {convert.describe(params, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
