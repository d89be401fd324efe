"""A model's options, declared once: typed fields that say where they live in the config.

A family's module takes its options as a few frozen dataclasses (sub-configs, passed through
to the sub-modules as values) and plain fields. Each option is one field, declared with
`option(default, doc, at=...)`: its type (the annotation), its default, what it means and its
'.'-joined path in the ml_collections model config (the reference's names: `patches.size`,
`transformer.mlp_dim`, ...). Everything else is derived from that declaration:

- `Schema.defaults`: the config template (a required option's entry is None until set; the
  entries under a section that is off by default, such as the hybrids' `resnet`, form its
  `templates` entry instead);
- `Schema.optional` / `Schema.optional_types`: the entries that may stay None, and the types
  `--config.model.X=...` overrides of those need (ml_collections types a None-default entry
  only through a placeholder);
- `Schema.values(config)`: the module's fields from a complete config, each converted to its
  declared type (`build` is `Module(**schema.values(config, num_classes=...))`);
- `Schema.properties(cls)`: read-only attributes on the module for every sub-config option
  (`model.hidden_size`), so code that reads an option reads it by name.

    @dataclasses.dataclass(frozen=True)
    class BlockConfig:
        num_heads: int = option(doc="attention heads", at="transformer.num_heads")
        qk_norm: bool = option(False, "norm queries and keys per head", at="transformer.qk_norm")
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from vit_jax.models.family import pair

__all__ = ["REQUIRED", "Options", "Schema", "dtype_option", "option"]

REQUIRED: Any = dataclasses.MISSING  # an option without default: the config must set it


def option(
    default: Any = REQUIRED,
    doc: str = "",
    *,
    at: str,
    convert: Callable[[Any], Any] | None = None,
    store: Callable[[Any], Any] | None = None,
    choices: Iterable[Any] | None = None,
) -> Any:
    """One option: a dataclass field with its doc and its config path `at`.

    The config value is converted to the field's type (`int`, `float`, `bool`, `str`,
    `tuple[int, int]` read as an int or a pair, `tuple[int, ...]`; None where the type allows
    it), or by `convert`; `store` turns the default into its config form (dtypes as names).
    `choices`: the values it may take (None always allowed where the type allows it); any
    other is a ValueError naming the config path when the model is built.
    """
    choices = None if choices is None else tuple(choices)
    metadata = {"at": at, "doc": doc, "convert": convert, "store": store, "choices": choices}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def dtype_option(doc: str, *, at: str) -> Any:
    """A dtype option: float32 by default, named in the config ("bfloat16"), a dtype in the
    module."""
    return option(jnp.float32, doc, at=at, convert=jnp.dtype, store=lambda d: jnp.dtype(d).name)


class Options:
    """Base of a sub-config dataclass: on construction, every option declared with `choices`
    holds one of them (ValueError naming its config path), however the sub-config was made
    (from a config by `Schema.values`, or directly in code)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise ValueError(_not_a_choice(f.metadata["at"], choices, value))


def _not_a_choice(at: str, choices: tuple, value: Any) -> str:
    return f"{at} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"


@dataclasses.dataclass(frozen=True)
class _Declared:
    """One declared option, as found under a module: its place there and in the config."""

    field: dataclasses.Field
    hint: Any  # the annotation, resolved
    group: str | None  # the module field of its sub-config; None: a field of the module itself

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def at(self) -> str:
        return self.field.metadata["at"]

    @property
    def default(self) -> Any:
        return self.field.default

    def stored_default(self) -> Any:
        if self.default is REQUIRED:
            return None
        store = self.field.metadata["store"]
        return store(self.default) if store is not None else self.default

    def convert(self, value: Any) -> Any:
        value = self._typed(value)
        choices = self.field.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(_not_a_choice(self.at, choices, value))
        return value

    def _typed(self, value: Any) -> Any:
        if self.field.metadata["convert"] is not None:
            return self.field.metadata["convert"](value)
        if value is None:
            return None
        base, args = _unwrap(self.hint)
        if base is tuple:
            if args == (int, int):
                return pair(value, self.at)
            return tuple(args[0](v) for v in value)
        if base in (bool, int, float, str):
            return base(value)
        return value


def _unwrap(hint: Any) -> tuple[Any, tuple]:
    """(the type without None, its arguments): `tuple[int, int] | None` -> (tuple, (int, int))."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else Any
    origin = typing.get_origin(hint)
    if origin is None:
        return hint, ()
    return origin, tuple(a for a in typing.get_args(hint) if a is not Ellipsis)


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of `cls`'s own dataclass fields (string annotations evaluated in
    the module that declares the class)."""
    out = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules[klass.__module__])
        for name, hint in vars(klass).get("__annotations__", {}).items():
            if isinstance(hint, str):
                try:
                    hint = eval(hint, namespace)  # noqa: S307 - our own annotations
                except Exception:  # a library's own field (flax's `parent`): not an option
                    hint = Any
            out[name] = hint
    return out


def _declared(cls: type) -> Iterator[_Declared]:
    """Every option of `cls` in declaration order: its own fields, then each sub-config's."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if "at" in f.metadata:
            yield _Declared(f, hint, None)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub = _hints(hint)
            for g in dataclasses.fields(hint):
                if "at" in g.metadata:
                    yield _Declared(g, sub[g.name], f.name)


class Schema:
    """What a module's option declarations say about its config (see the module docstring).

    `base`: config entries that are not module options (`name`, `model_type`); `sections`:
    config sections that are None until set (their entries' defaults are the templates).
    """

    def __init__(self, cls: type, base: Mapping[str, Any] = {}, sections: tuple[str, ...] = ()):
        self.options = tuple(_declared(cls))
        self.groups = {
            f.name: _hints(cls)[f.name]
            for f in dataclasses.fields(cls)
            if any(o.group == f.name for o in self.options)
        }
        self.sections = sections
        self._by_name = {o.name: o for o in self.options}
        defaults: dict[str, Any] = dict(base)
        templates: dict[str, dict[str, Any]] = {}
        for o in self.options:
            head, *rest = o.at.split(".")
            if head in sections:
                defaults[head] = None
                _put(templates.setdefault(head, {}), rest, o.stored_default())
            else:
                _put(defaults, [head, *rest], o.stored_default())
        self.defaults = defaults
        self.templates = templates
        nones = [
            o for o in self.options if o.at.split(".")[0] not in sections and _allows_none(o.hint)
        ]
        leaf = lambda o: o.at.split(".")[-1]  # noqa: E731
        self.optional = frozenset({*sections, *(leaf(o) for o in nones)})
        self.optional_types = {leaf(o): _unwrap(o.hint)[0] for o in nones if o.default is None}

    def values(self, config: ml_collections.ConfigDict, **fields: Any) -> dict[str, Any]:
        """The module's fields for a complete `config`, typed; `fields` add or replace module
        fields or single options (by name: `attention_implementation='xla'`)."""
        plain: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {g: {} for g in self.groups}
        for o in self.options:
            value = _get(config, o.at.split("."), o)
            (plain if o.group is None else grouped[o.group])[o.name] = value
        owner = {o.name: o.group for o in self.options if o.group is not None}
        for key, value in fields.items():
            if key in owner:
                grouped[owner[key]][key] = value
            else:
                plain[key] = value
        for group, cls in self.groups.items():
            if group not in plain:
                plain[group] = cls(**grouped[group])
        return plain

    def value(self, config: Mapping[str, Any], name: str) -> Any:
        """Option `name`'s typed value in `config`, which may be partial or a plain dict (a
        stored or foreign config): an entry it lacks (or holds as None) reads as the declared
        default."""
        o = self._by_name[name]
        node: Any = config
        for key in o.at.split("."):
            node = node.get(key) if hasattr(node, "get") else None
        if node is None:
            return None if o.default is REQUIRED else o.default
        return o.convert(node)

    def properties(self, cls: type) -> None:
        """Read-only attributes `cls.<option>` for every sub-config option."""
        for o in self.options:
            if o.group is None:
                continue
            if hasattr(cls, o.name):
                raise TypeError(f"{cls.__name__}.{o.name} already exists; option names clash")
            getter = lambda self, g=o.group, n=o.name: getattr(getattr(self, g), n)  # noqa: E731
            setattr(cls, o.name, property(getter, doc=o.field.metadata["doc"]))


def _put(node: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get(config: ml_collections.ConfigDict, path: list[str], o: _Declared) -> Any:
    """The converted value at `path`; the declared default inside a section that is off."""
    node: Any = config
    for key in path[:-1]:
        node = node.get(key) if node is not None else None
    if node is None:
        return o.default
    return o.convert(node.get(path[-1]))
