"""The converter engine: one key table per PyTorch format, run in both directions.

A format is a `Table`: rows of (our key, their key, named transform, our shape), plus a block
template whose keys hold `{i}` and are repeated for every encoder layer. `Table.at(...)` fixes
the table for one model — its layer count, its dimensions by name (`D` width, `H` heads, `hd`
head width, `M` MLP width, `ph`/`pw` patch, `T` tokens, `N` classes, `R` representation) and the
optional parts it has (`features`: rows tagged `when=` a name not in it are dropped) — and the
resulting `KeyMap` converts either way over `pytorch.Reader`, so a missing, misshapen or left-over
key on either side is reported, all of them in one error.

    TABLE = Table(rows=(Row("embedding/kernel", "patch_embed.proj.weight", CONV, "ph pw 3 D"),
                        ...),
                  block=(Row("Transformer/encoderblock_{i}/LayerNorm_0/scale",
                             "blocks.{i}.norm1.weight", IDENTITY, "D"), ...))
    flat = TABLE.at(layers=12, dims=dims, features={"head"}).to_ours(state, source=..., what=...)

Transforms are named pairs (to ours, to theirs) with the shape rule between them: `IDENTITY`,
`CONV` (OIHW <-> HWIO), `DENSE` ((out, in) <-> (in, out)), `HEADS_IN` (q/k/v kernels,
(H*hd, D) <-> (D, H, hd)), `HEADS_OUT` (attention output, (D, H*hd) <-> (H, hd, D)), `HEADS_BIAS`
((H*hd,) <-> (H, hd)), `UNBATCHED` ((1, N, D) <-> (N, D): an `nn.Embedding` position table).
A row with several of our keys is *fused*: their array is the concatenation of the transformed
parts along the first axis (timm's `attn.qkv`, torch `nn.MultiheadAttention`'s `in_proj_weight`),
split again when reading. Adding a parameter to a format is one row; `pair` writes the (weight,
bias) rows of one layer in one call. Which of our options a format can express is its capability
table's (`weights.options`); `weights.codec` runs both tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError

__all__ = [
    "ATTENTION",
    "BLOCK",
    "CONV",
    "DENSE",
    "HEADS_BIAS",
    "HEADS_IN",
    "HEADS_OUT",
    "IDENTITY",
    "KeyMap",
    "MAP",
    "MAP_ATTENTION",
    "Row",
    "Table",
    "Transform",
    "UNBATCHED",
    "pair",
]

Shape = tuple[int, ...]

# Our names that every table uses: an encoder block ({i}: the layer), its self-attention, the
# MAP head and its attention.
BLOCK = "Transformer/encoderblock_{i}/"
ATTENTION = f"{BLOCK}MultiHeadDotProductAttention_1/"
MAP = "MAPHead_0/"
MAP_ATTENTION = f"{MAP}MultiHeadDotProductAttention_0/"


class Transform(NamedTuple):
    """A named layout change between our array and theirs, both ways, with its shape rule."""

    name: str
    theirs_shape: Callable[[Shape], Shape]  # our shape -> their shape
    to_ours: Callable[[np.ndarray, Shape], np.ndarray]  # (their array, our shape) -> ours
    to_theirs: Callable[[np.ndarray], np.ndarray]  # our array -> theirs


IDENTITY = Transform("identity", lambda s: s, lambda a, s: a, lambda a: a)
CONV = Transform(
    "conv OIHW<->HWIO",
    lambda s: (s[3], s[2], s[0], s[1]),
    lambda a, s: pt.conv_from_torch(a),
    pt.conv_to_torch,
)
DENSE = Transform(
    "dense (out, in)<->(in, out)",
    lambda s: s[::-1],
    lambda a, s: pt.dense_from_torch(a),
    pt.dense_to_torch,
)
HEADS_IN = Transform(
    "q/k/v kernel (H*hd, D)<->(D, H, hd)",
    lambda s: (s[1] * s[2], s[0]),
    lambda a, s: pt.qkv_from_torch(a, s[1]),
    pt.qkv_to_torch,
)
HEADS_OUT = Transform(
    "out kernel (D, H*hd)<->(H, hd, D)",
    lambda s: (s[2], s[0] * s[1]),
    lambda a, s: pt.out_from_torch(a, s[0]),
    pt.out_to_torch,
)
UNBATCHED = Transform(
    "leading unit axis (1, *s)<->s",
    lambda s: s[1:],
    lambda a, s: a.reshape(s),
    lambda a: a.reshape(a.shape[1:]),
)
HEADS_BIAS = Transform(
    "head bias (H*hd,)<->(H, hd)",
    lambda s: (s[0] * s[1],),
    lambda a, s: a.reshape(s),
    lambda a: a.reshape(-1),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter of a format (several of ours when fused into one of theirs).

    `shape` is our shape in dimension names and integers ("D H hd", "1 1 D"); `when` names the
    feature the row belongs to (absent unless the feature is on); `optional`: their file may
    omit it (timm `bias=False`), which reads as zeros.
    """

    ours: str | tuple[str, ...]
    theirs: str
    transform: Transform
    shape: str
    when: str | None = None
    optional: bool = False


def pair(
    ours: str, theirs: str, transform: Transform = IDENTITY, shape: str = "D", **kw
) -> tuple[Row, Row]:
    """The (weight, bias) rows of one layer: our `scale` (a norm, `IDENTITY`) or `kernel` and
    `bias`, their `.weight` and `.bias`; a q/k/v projection's bias is (H, hd) per head."""
    first = "scale" if transform is IDENTITY else "kernel"
    heads = transform is HEADS_IN
    return (
        Row(f"{ours}/{first}", f"{theirs}.weight", transform, shape, **kw),
        Row(
            f"{ours}/bias",
            f"{theirs}.bias",
            HEADS_BIAS if heads else IDENTITY,
            "H hd" if heads else shape.split()[-1],
            **kw,
        ),
    )


class Entry(NamedTuple):
    """A row for one model: keys with the layer filled in, shapes resolved."""

    ours: tuple[str, ...]
    theirs: str
    transform: Transform
    ours_shape: Shape
    theirs_shape: Shape  # of the whole (fused) array
    optional: bool
    zeros: bool  # not in their file at all: ours are zeros


@dataclasses.dataclass(frozen=True)
class Table:
    """A format's key table: `rows` once per model, `block` once per encoder layer ({i})."""

    rows: tuple[Row, ...]
    block: tuple[Row, ...] = ()

    def at(
        self,
        *,
        layers: int,
        dims: Mapping[str, int],
        features: Iterable[str] = (),
        zeros: Iterable[str] = (),
    ) -> KeyMap:
        """The table for one model. `zeros`: features whose parameters their file leaves out
        and ours holds as zeros (a transformers ViT with `qkv_bias: false`)."""
        on, off = set(features), set(zeros)
        entries = []
        expanded = [*self.rows, *(r for i in range(layers) for r in _layer(self.block, i))]
        for row in expanded:
            if row.when is not None and row.when not in on | off:
                continue
            ours = (row.ours,) if isinstance(row.ours, str) else tuple(row.ours)
            shape = _shape(row.shape, dims, row)
            part = row.transform.theirs_shape(shape)
            theirs = (part[0] * len(ours), *part[1:]) if len(ours) > 1 else part
            zero = row.when in off
            entries.append(
                Entry(ours, row.theirs, row.transform, shape, theirs, row.optional, zero)
            )
        return KeyMap(tuple(entries))

    def detect(self, state: Mapping[str, object], features: Iterable[str]) -> set[str]:
        """Those of `features` whose first row (in layer 0 for block rows) is in their `state`:
        the optional parts a file holds, read off its keys."""
        rows = [*self.rows, *_layer(self.block, 0)]
        first = {}
        for row in rows:
            first.setdefault(row.when, row.theirs)
        return {f for f in features if first.get(f) in state}


def _layer(block: Sequence[Row], i: int) -> list[Row]:
    def fill(key: str) -> str:
        return key.replace("{i}", str(i))

    return [
        dataclasses.replace(
            r,
            ours=fill(r.ours) if isinstance(r.ours, str) else tuple(fill(k) for k in r.ours),
            theirs=fill(r.theirs),
        )
        for r in block
    ]


def _shape(spec: str, dims: Mapping[str, int], row: Row) -> Shape:
    out = []
    for name in spec.split():
        if name.isdigit():
            out.append(int(name))
        elif name in dims:
            out.append(int(dims[name]))
        else:
            raise KeyError(f"row {row.ours!r}: dimension {name!r} not given (have {sorted(dims)})")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """A table fixed for one model: converts a flat dict of either side into the other."""

    entries: tuple[Entry, ...]

    def ours_keys(self) -> list[str]:
        return [k for e in self.entries for k in e.ours]

    def theirs_keys(self) -> list[str]:
        return [e.theirs for e in self.entries if not e.zeros]

    def to_ours(
        self,
        state: Mapping[str, np.ndarray],
        *,
        source: str,
        what: str,
        ignore: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Our flat '/'-keyed dict from their state dict; one `ConversionError` lists every
        missing, misshapen or unused key. `ignore`: {reason: keys} deliberately left unused."""
        r = pt.Reader(source, state)
        for why, keys in (ignore or {}).items():
            r.skip(keys, why)
        flat: dict[str, np.ndarray] = {}
        for e in self.entries:
            if e.zeros or (e.optional and e.theirs not in r):
                parts = [np.zeros(e.ours_shape, np.float32) for _ in e.ours]
            else:
                whole = r.take(e.theirs, e.theirs_shape)
                split = np.split(whole, len(e.ours)) if len(e.ours) > 1 else [whole]
                parts = [e.transform.to_ours(p, e.ours_shape) for p in split]
            flat.update(zip(e.ours, parts, strict=True))
        r.finish(what)
        return flat

    def to_theirs(
        self, flat: Mapping[str, np.ndarray], *, source: str, what: str
    ) -> dict[str, np.ndarray]:
        """Their state dict from our flat dict; one `ConversionError` lists every problem."""
        r = pt.Reader(source, flat)
        state: dict[str, np.ndarray] = {}
        for e in self.entries:
            parts = [e.transform.to_theirs(r.take(k, e.ours_shape)) for k in e.ours]
            if e.zeros:  # not a parameter of theirs: only zeros can be left out
                if any(p.any() for p in parts):
                    raise ConversionError(f"{source}: {what} cannot hold nonzero {e.ours[0]}")
                continue
            state[e.theirs] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        r.finish(what)
        return state
