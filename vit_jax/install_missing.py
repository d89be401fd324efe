"""`python -m vit_jax.install_missing [--dry-run]`: install what vit_jax needs and this
environment lacks, and change nothing that is installed.

For runtimes that ship their own accelerator build of jax and their own TensorFlow (Colab,
Kaggle, cloud notebooks). A plain `pip install vit_jax` resolves our requirements on its own and
may replace them: an upgraded jax that no longer matches the runtime's jaxlib / CUDA / TPU
plugin, or `tensorflow-cpu` unpacked over the runtime's `tensorflow` (both write the same
`tensorflow/` package). Instead, install the package alone and then what is missing:

    pip install --no-deps SOURCE && python -m vit_jax.install_missing

A requirement is kept, in whatever version is installed, when its distribution is installed —
or, for `tensorflow-cpu`, any TensorFlow build; a version older than vit_jax asks for is kept
too, with a warning naming both. The missing ones go to pip with every installed distribution
pinned as a constraint, so pip picks versions of the new packages that fit what is there (or
says which requirement conflicts) and never upgrades, downgrades or replaces anything.

It imports nothing beyond the standard library, pip's own `packaging` and `vit_jax.cli` (the
CLIs' one-line flag errors; itself standard library only), so it runs right after
`pip install --no-deps`, before any of the requirements are there. For the same reason it does
not call `cli.start()`: there is no TensorFlow or absl to set up yet.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

try:  # `packaging` is on most runtimes; pip always carries a copy
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - a bare venv
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

from vit_jax import cli

# Distributions that provide the same importable package as the one we require.
EQUIVALENT = {
    "tensorflow-cpu": (
        "tensorflow-cpu",
        "tensorflow",
        "tensorflow-intel",
        "tensorflow-macos",
        "tf-nightly",
        "tf-nightly-cpu",
    ),
}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution on sys.path (the first one found wins)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in found:
            found[canonical(name)] = dist.version
    return found


def plan(
    requirements: list[str],
    have: dict[str, str],
    requires: Callable[[str], list[str] | None] = metadata.requires,
) -> tuple[list[str], list[str], list[str]]:
    """(to install, kept, warnings) for the package's requirement strings given what is installed.

    Requirements behind an extra of ours or whose environment marker does not hold are left
    out. A present requirement with extras (`etils[epath]`) is passed on when a dependency of
    those extras (read with `requires(name)`) is missing; the constraint keeps its version.
    """
    install, kept, warnings = [], [], []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonical(req.name)
        present = [d for d in EQUIVALENT.get(name, (name,)) if d in have]
        if not present:
            install.append(str(req))
            continue
        dist, version = present[0], have[present[0]]
        kept.append(f"{dist} {version}" + ("" if dist == name else f" (for {req})"))
        if not req.specifier.contains(version, prereleases=True):
            warnings.append(
                f"{dist} {version} is older than vit_jax asks for ({req}); keeping the runtime's"
            )
        elif req.extras and dist == name and _extras_missing(dist, req.extras, have, requires):
            install.append(str(req))
    return install, kept, warnings


def _extras_missing(dist: str, extras: set[str], have: dict[str, str], requires) -> bool:
    """True when a dependency that `dist[extras]` adds is not installed."""
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.marker is None:
            continue
        adds = any(req.marker.evaluate({"extra": extra}) for extra in extras)
        if adds and not req.marker.evaluate({"extra": ""}) and canonical(req.name) not in have:
            return True
    return False


def constraints(have: dict[str, str]) -> str:
    """A pip constraints file pinning every installed distribution to its version."""
    lines = []
    for name, version in sorted(have.items()):
        try:
            Version(version)
        except InvalidVersion:
            continue  # pip cannot pin a legacy version; such a package is rare and not ours
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.install_missing",
        description="Install vit_jax's missing requirements; change nothing installed.",
        verbose=False,
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    have = installed()
    install, kept, warnings = plan(metadata.requires("vit_jax") or [], have)
    print(f"kept ({len(kept)}): {', '.join(kept) or 'none'}")
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"to install ({len(install)}): {' '.join(install) or 'none'}")
    if args.dry_run or not install:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "installed.txt")
        with open(path, "w") as f:
            f.write(constraints(have))
        command = [sys.executable, "-m", "pip", "install", "-q", "-c", path, *install]
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
