"""Attention maps: `python -m vit_jax.visualize --checkpoint PATH --out DIR [--heads] IMAGE...`.

Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the identity for the
residual path and renormalise rows to sum to 1; multiply the layers' matrices from the first to
the last. The class token's row over the patch tokens, reshaped to the patch grid and scaled to
[0, 1], is the map. Writes `<image>_rollout.png` (map overlaid on the input) and with `--heads`
`<image>_heads.png` (the last layer's class-token attention, one panel per head). DeiT models
(class and distillation token) are read from the class token's row. Register tokens (DINOv2
`-reg4`) are hidden: the maps cover the patch tokens only; `--registers` also writes
`<image>_registers.png`, each register token's own rollout over the patches, one panel each.

Output names keep the inputs' folder structure below their deepest common folder, so
`img/good.png img/dup/good.png` give `OUT/good_rollout.png` and `OUT/dup/good_rollout.png`;
two inputs differing only in their extension keep it (`good.jpg_rollout.png`). An existing file
is never replaced unless `--overwrite` is passed: every output's name is checked before the
first is written, so a refused run writes nothing.

Every image's size is read from its header first: one over `--max-pixels` (default 64 million,
e.g. 8000 x 8000) stops the run before anything is decoded.

Exit status: 0 every map written; 1 an image could not be read or a map not written (one error
line each; the others are still written); 2 a configuration error before any image is decoded
(bad flag, `--out` an existing file, an image over `--max-pixels`, a checkpoint that is missing,
damaged or does not fit the model, a model without a class token, an output that exists without
`--overwrite`).
"""

from __future__ import annotations

import collections
import os
import pathlib
import sys

import numpy as np
from PIL import Image

from vit_jax import cli

__all__ = [
    "attention_rollout",
    "main",
    "output_stems",
    "rollout_overlay",
    "rollout_unsupported",
    "token_grid",
]


def attention_rollout(
    attention_weights: np.ndarray, *, num_prefix_tokens: int = 1, token: int = 0
) -> np.ndarray:
    """Rollout maps from per-layer weights (layers, B, heads, N, N) -> (B, N - prefix).

    Each returned row is the rolled-out attention of sequence position `token` (the class
    token; a register's position for its map) over the patch tokens (those after the
    `num_prefix_tokens` class / distillation / register tokens), normalised to sum to 1.
    """
    w = np.asarray(attention_weights, np.float64).mean(axis=2)  # (layers, B, N, N)
    n = w.shape[-1]
    w = w + np.eye(n)
    w = w / w.sum(-1, keepdims=True)
    rollout = np.broadcast_to(np.eye(n), w.shape[1:]).copy()
    for layer in w:
        rollout = layer @ rollout
    patches = rollout[:, token, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdims=True)


def output_stems(paths: list[str], out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Each input's output stem under `out_dir` (`<stem>_rollout.png` is written), unique per
    input file: its path relative to the inputs' deepest common folder, extension dropped unless
    another input differs from it only in the extension."""

    def key(path: str) -> str:
        if "://" in path:  # gs://bucket/x.png -> /gs/bucket/x.png
            scheme, rest = path.split("://", 1)
            return os.path.normpath(f"/{scheme}/{rest}")
        return os.path.abspath(path)

    keys = {p: key(p) for p in paths}
    unique = list(dict.fromkeys(keys.values()))
    common = os.path.commonpath([os.path.dirname(k) for k in unique])
    relative = {k: os.path.relpath(k, common) for k in unique}
    stems = {k: os.path.splitext(r)[0] for k, r in relative.items()}
    taken = collections.Counter(stems.values())
    stems = {k: relative[k] if taken[s] > 1 else s for k, s in stems.items()}
    return {p: out_dir / stems[k] for p, k in keys.items()}


def _to_grid(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    m = values.reshape(grid)
    m = m - m.min()
    return m / m.max() if m.max() > 0 else m


def _overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """Input image ([-1, 1] float) with a red heat map blended in."""
    h, w = image.shape[:2]
    base = ((image + 1) * 127.5).clip(0, 255).astype(np.uint8)
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    heat_arr = np.asarray(heat_img, np.float32)[..., None] / 255.0
    red = np.zeros_like(base, np.float32)
    red[..., 0] = 255
    out = base * (1 - 0.6 * heat_arr) + red * 0.6 * heat_arr
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def rollout_unsupported(model_config) -> str | None:
    """Why attention rollout cannot be drawn for this model (no class token), None if it can.

    Names the model type, and the classifier only for families that have one (a Mixer has none,
    so none is claimed for it). A family without a classifier setting is drawn when it has
    prefix tokens."""
    from vit_jax import models

    classifier = model_config.get("classifier")
    if models.num_prefix_tokens(model_config) and classifier in ("token", None):
        return None
    got = f"model_type {model_config.get('model_type')!r}"
    got += f" with classifier {classifier!r}" if classifier is not None else " (no class token)"
    return f"attention rollout needs a ViT with a class token (classifier 'token'), got {got}"


def token_grid(trained) -> tuple[int, int]:
    """The patch grid (rows, columns) of the model's input."""
    from vit_jax import models

    stride = models.stride(trained.model_config)
    return trained.crop // stride[0], trained.crop // stride[1]


def rollout_overlay(
    image: np.ndarray,
    rollout: np.ndarray,
    grid: tuple[int, int],
    size: int,
    normalization: dict | None = None,
) -> Image.Image:
    """The map picture: a model input ((h, w, 3), normalised as `normalization` says; default
    [-1, 1]) scaled to size x size with one image's rollout row (`attention_rollout(...)[i]`,
    over the patch grid) blended in red."""
    from vit_jax.data import preprocess

    display = preprocess.to_display_range(image, normalization)
    return _overlay(_enlarged(display, size), _to_grid(rollout, grid))


def _enlarged(image: np.ndarray, size: int) -> np.ndarray:
    picture = Image.fromarray(((image + 1) * 127.5).astype(np.uint8))
    return np.asarray(picture.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1


def _sheet(panels: list[Image.Image], size: int) -> Image.Image:
    sheet = Image.new("RGB", (size * len(panels), size))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * size, 0))
    return sheet


def _num_registers(trained, registers: bool) -> int:
    """How many register maps `--registers` draws (0 without it, or for a model without)."""
    from vit_jax import models

    return int(models.get_config(trained.model_config).num_registers) if registers else 0


def _output_names(stem: pathlib.Path, *, heads: bool, registers: int) -> list[str]:
    """The files written for one image: the rollout, the heads' sheet, the registers' sheet."""
    kinds = ["rollout"] + ["heads"] * heads + ["registers"] * bool(registers)
    return [f"{stem}_{kind}.png" for kind in kinds]


def _maps(
    trained,
    image: np.ndarray,
    stem: pathlib.Path,
    *,
    size: int,
    heads: bool,
    registers: bool = False,
) -> dict:
    """{file name: picture}: the rollout overlay, with `heads` the last layer's head maps, with
    `registers` each register token's rollout (when the model has registers)."""
    from vit_jax import models

    prefix = models.num_prefix_tokens(trained.model_config)
    grid = token_grid(trained)
    weights = trained.intermediates(image[None])["attention_weights"]
    rollout = attention_rollout(weights, num_prefix_tokens=prefix)[0]
    norm = trained.normalization
    n = _num_registers(trained, registers)
    names = iter(_output_names(stem, heads=heads, registers=n))
    images = {next(names): rollout_overlay(image, rollout, grid, size, norm)}
    if heads:
        from vit_jax.data import preprocess

        big = _enlarged(preprocess.to_display_range(image, norm), size)
        last = np.asarray(weights)[-1, 0, :, 0, prefix:]  # (heads, patches)
        images[next(names)] = _sheet([_overlay(big, _to_grid(h, grid)) for h in last], size)
    if n:  # the registers sit right before the patches
        big = _enlarged(image, size)
        rows = [
            attention_rollout(weights, num_prefix_tokens=prefix, token=prefix - n + r)[0]
            for r in range(n)
        ]
        panels = [_overlay(big, _to_grid(row, grid)) for row in rows]
        images[next(names)] = _sheet(panels, size)
    return images


def _taken(outputs: list[str]) -> str | None:
    """Why the run may not write `outputs` without --overwrite (one line), None if none exists."""
    existing = [name for name in outputs if os.path.lexists(name)]
    if not existing:
        return None
    more = f" (and {len(existing) - 1} more of this run's outputs)" if len(existing) > 1 else ""
    return (
        f"{existing[0]} already exists{more}; nothing was written: pass --overwrite to replace "
        "it, or choose another --out"
    )


def _flags(argv: list[str] | None):
    p = cli.ArgumentParser(
        prog="python -m vit_jax.visualize", description=__doc__, weights=True, max_pixels=True
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--heads", action="store_true", help="also the last layer's per-head maps")
    p.add_argument(
        "--registers",
        action="store_true",
        help="also each register token's map (models with registers; hidden otherwise)",
    )
    p.add_argument("--scale", type=int, default=0, help="output size in pixels (default: >= 224)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing files of the same names"
    )
    p.add_argument("images", nargs="+")
    return p.parse_args(argv)


@cli.reports_failures
def main(argv: list[str] | None = None) -> int:
    args = _flags(argv)
    out_dir = pathlib.Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        return cli.fail(f"--out {out_dir}: is an existing file, expected a directory")

    from vit_jax.data import image_header

    try:
        image_header.check_files(args.images, args.max_pixels)
    except (ValueError, OSError) as e:  # ImageTooLargeError
        return cli.fail(e, cli.EXIT_CONFIG)
    trained = cli.load_model(args)
    unsupported = rollout_unsupported(trained.model_config)
    if unsupported:
        return cli.fail(f"{args.checkpoint}: {unsupported}")
    stems = output_stems(args.images, out_dir)
    registers = _num_registers(trained, args.registers)
    outputs = [
        name
        for path in args.images
        for name in _output_names(stems[path], heads=args.heads, registers=registers)
    ]
    taken = None if args.overwrite else _taken(outputs)
    if taken:
        return cli.fail(taken)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return cli.fail(f"--out {out_dir}: cannot be created ({e.strerror or e})")
    size = args.scale or max(224, trained.crop)
    failed = 0
    for path in args.images:
        try:
            image = trained.preprocess_file(path, max_pixels=args.max_pixels)
        except ValueError as e:
            cli.fail(e)
            failed += 1
            continue
        stem = stems[path]
        images = _maps(trained, image, stem, size=size, heads=args.heads, registers=args.registers)
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for name, picture in images.items():
                picture.save(name)
        except OSError as e:
            cli.fail(f"{path}: the map could not be written to {stem.parent} ({e})")
            failed += 1
            continue
        print(" ".join(images))
    return cli.EXIT_RUNTIME if failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
