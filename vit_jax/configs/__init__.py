"""The trainer's config schema, and the recipes that ship with the package.

`schema` is the one definition of every key with its default and the dataset presets; the
recipes (`default`, `vit`, `mixer`, `augreg`, `transfer`, `distill`) are user-facing configs
built on it, named on the command line as `--config=configs/NAME.py[:ARG]` (or just `NAME`):
`recipe_file` resolves that to the installed file, so the same command works from a checkout,
from an installed wheel and from any directory. A file that exists at the given path wins.
"""

from __future__ import annotations

import difflib
import os

from vit_jax.configs.schema import (
    DATASET_PRESETS,
    get_config,
    image_size,
    with_dataset,
    with_model,
)

RECIPES = ("default", "vit", "mixer", "augreg", "transfer", "distill")


def recipe_file(spec: str) -> str:
    """`--config` value `PATH[:ARG]` with a packaged recipe's name replaced by its file.

    `default`, `default.py` and `configs/default.py` all name the packaged `default` recipe
    unless a file exists at that path. A path that is neither raises FileNotFoundError naming
    the packaged recipes.
    """
    path, sep, arg = spec.partition(":")
    if not path or os.path.exists(path):
        return spec
    name = os.path.normpath(path)
    name = name.removeprefix(f"configs{os.sep}").removesuffix(".py")
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f" (did you mean configs/{close[0]}.py?)" if close else ""
        raise FileNotFoundError(
            f"--config={spec}: no file {path}, and {name!r} is not a packaged recipe{hint}; "
            f"packaged: {', '.join(f'configs/{r}.py' for r in RECIPES)}"
        )
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py") + sep + arg


__all__ = [
    "DATASET_PRESETS",
    "RECIPES",
    "get_config",
    "image_size",
    "recipe_file",
    "with_dataset",
    "with_model",
]
