"""Attention maps: `python -m vit_jax.visualize --checkpoint PATH --out DIR [--heads] IMAGE...`.

Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the identity for the
residual path and renormalise rows to sum to 1; multiply the layers' matrices from the first to
the last. The class token's row over the patch tokens, reshaped to the patch grid and scaled to
[0, 1], is the map. Writes `<image>_rollout.png` (map overlaid on the input) and with `--heads`
`<image>_heads.png` (the last layer's class-token attention, one panel per head).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image


def attention_rollout(attention_weights: np.ndarray, *, num_prefix_tokens: int = 1) -> np.ndarray:
    """Rollout maps from per-layer weights (layers, B, heads, N, N) -> (B, N - prefix).

    Each returned row is the class token's rolled-out attention over the patch tokens,
    normalised to sum to 1 over the patches.
    """
    w = np.asarray(attention_weights, np.float64).mean(axis=2)  # (layers, B, N, N)
    n = w.shape[-1]
    w = w + np.eye(n)
    w = w / w.sum(-1, keepdims=True)
    rollout = np.broadcast_to(np.eye(n), w.shape[1:]).copy()
    for layer in w:
        rollout = layer @ rollout
    patches = rollout[:, 0, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdims=True)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vit_jax.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", help="zoo name, for files that don't record their model")
    p.add_argument("--resolution", type=int)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--heads", action="store_true", help="also the last layer's per-head maps")
    p.add_argument("--scale", type=int, default=0, help="output size in pixels (default: >= 224)")
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)

    import pathlib

    from vit_jax import inference

    try:
        trained = inference.load_model(
            args.checkpoint, model=args.model, resolution=args.resolution
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classifier = trained.model_config.get("classifier", "token")
    if trained.model_config.get("model_type") == "Mixer" or classifier not in ("token",):
        print(
            f"error: attention rollout needs a ViT with a class token (classifier 'token'), "
            f"got {trained.model_config.get('model_type')} / {classifier!r}",
            file=sys.stderr,
        )
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stride = trained.model.stride()
    grid = (trained.crop // stride[0], trained.crop // stride[1])
    size = args.scale or max(224, trained.crop)
    failed = 0
    for path in args.images:
        try:
            image = inference.preprocess_file(path, resize=trained.resize, crop=trained.crop)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        out = trained.intermediates(image[None])
        heat = _to_grid(attention_rollout(out["attention_weights"])[0], grid)
        big = (
            np.asarray(
                Image.fromarray(((image + 1) * 127.5).astype(np.uint8)).resize(
                    (size, size), Image.BILINEAR
                ),
                np.float32,
            )
            / 127.5
            - 1
        )
        stem = out_dir / pathlib.Path(path).stem
        _overlay(big, heat).save(f"{stem}_rollout.png")
        written = [f"{stem}_rollout.png"]
        if args.heads:
            last = np.asarray(out["attention_weights"])[-1, 0, :, 0, 1:]  # (heads, patches)
            panels = [_overlay(big, _to_grid(h, grid)) for h in last]
            sheet = Image.new("RGB", (size * len(panels), size))
            for i, panel in enumerate(panels):
                sheet.paste(panel, (i * size, 0))
            sheet.save(f"{stem}_heads.png")
            written.append(f"{stem}_heads.png")
        print(" ".join(written))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
