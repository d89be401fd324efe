"""The weights layer's errors and its one mismatch report (a leaf: imports nothing of vit_jax)."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError", "ConversionError", "mismatch_report"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names file and keys)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class ConversionError(CheckpointError):
    """A PyTorch checkpoint or config that cannot be converted (names the file, key or field)."""


def mismatch_report(
    head: str,
    *,
    missing: list[str] = (),
    mismatched: list[str] = (),
    unexpected: list[str] = (),
    limit: int = 8,
) -> str:
    """The one-line report of parameters that do not fit: `head`, then each non-empty group.

    `head` names the file and what it should hold; entries name the key and its shape(s), e.g.
    `x.npz does not fit ViT-B_16: missing (1) [cls (1, 1, 768)]; mismatched (1) [embedding/
    kernel: stored (...), model (...)]`. Every loader and converter reports through this one.
    """
    groups = []
    for title, keys in (
        ("missing", missing),
        ("mismatched", mismatched),
        ("unexpected", unexpected),
    ):
        if keys:
            shown = "; ".join(keys[:limit])
            more = f"; ... and {len(keys) - limit} more" if len(keys) > limit else ""
            groups.append(f"{title} ({len(keys)}) [{shown}{more}]")
    return f"{head}: {'; '.join(groups)}"


# ----------------------------------------------------------------------------- trees
