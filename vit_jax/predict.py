"""`python -m vit_jax.predict --checkpoint PATH [--model NAME] [--top-k 5] [--json] IMAGE...`.

Classifies images with a training workdir, an Orbax checkpoint, a published `.npz` or a converted
PyTorch file. Prints the top-k class names with probabilities for each image; `--json` prints one
object per image per line. Only the answer goes to stdout; warnings and errors go to stderr
(`--verbose`: with the libraries' logs). The model, input size and class names are the ones
the checkpoint records (a workdir's config.json may since have changed).

Every image's size is read from its header first: one over `--max-pixels` (default 64 million,
e.g. 8000 x 8000) stops the run before anything is decoded, so a decompression bomb (a small file
that decodes to gigabytes) costs nothing.

Exit status: 0 all images classified; 1 an image could not be read (one error line for it; the
others still get their answer); 2 a configuration error before any image is decoded (bad flag,
missing or damaged checkpoint, a checkpoint that does not fit the model, unknown model name, an
image over `--max-pixels`).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from vit_jax import cli

__all__ = ["answer", "main", "top_k", "top_k_size"]


def top_k(logits: np.ndarray, k: int, class_names: list[str]) -> list[dict]:
    """The k most probable classes of one logits row: [{"label", "index", "probability"}]."""
    import jax

    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {
            "label": class_names[i] if i < len(class_names) else str(i),
            "index": int(i),
            "probability": float(probs[i]),
        }
        for i in order
    ]


def top_k_size(requested: int, class_names: list[str]) -> int:
    """How many classes an answer lists: `requested`, at most the number of classes."""
    return max(1, min(requested, len(class_names) or requested))


def answer(image: str, logits: np.ndarray, k: int, class_names: list[str]) -> dict:
    """One image's `--json` object, `{"image", "top_k"}` (the server answers the same)."""
    return {"image": image, "top_k": top_k(logits, k, class_names)}


def _flags(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m vit_jax.predict", description=__doc__, weights=True, max_pixels=True
    )
    p.add_argument("--top-k", type=cli.positive_int, default=5)
    p.add_argument("--batch", type=cli.positive_int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("images", nargs="+")
    return p.parse_args(argv)


@cli.reports_failures
def main(argv: list[str] | None = None) -> int:
    from vit_jax.data import image_header

    args = _flags(argv)
    try:
        image_header.check_files(args.images, args.max_pixels)
    except image_header.ImageTooLargeError as e:
        raise cli.Failure(e) from None
    trained = cli.load_model(args)
    failed = 0
    k = top_k_size(args.top_k, trained.class_names)
    good: list[tuple[str, np.ndarray]] = []
    results: dict[str, dict] = {}
    for path in args.images:
        try:
            good.append((path, trained.preprocess_file(path, max_pixels=args.max_pixels)))
        except ValueError as e:
            failed += 1
            results[path] = {"image": path, "error": str(e)}
    for start in range(0, len(good), args.batch):
        chunk = good[start : start + args.batch]
        logits = trained.logits(np.stack([x for _, x in chunk]))
        for (path, _), row in zip(chunk, logits, strict=True):
            results[path] = answer(path, row, k, trained.class_names)
    for path in args.images:
        r = results[path]
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
        else:
            best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            print(f"{path}: {best}")
    return cli.EXIT_RUNTIME if failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
