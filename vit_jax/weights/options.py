"""Which of our ViT's options a foreign format can express: one capability table per format.

An option (`OPTIONS`) is a part of our model config a format may lack: a distillation token,
LayerScale, a representation layer, register tokens, query/key norms, a SwiGLU MLP, RMSNorm.
A format's `Capabilities` lists, one `Can` row per option it expresses, the key-table feature
the option turns on, its own name for it (a config key or a state-dict key) and the value its
writer records; every option of a model that has no row is refused, all in one line naming the
option and the format (`problems`). Besides the rows, a `Capabilities` says which `posemb`
values (and, for RoPE, which coordinate normalisations) and which left-out biases (`BIASES`,
`transformer.key_bias=False` ...) the format expresses; everything else is refused the same
way. The same table answers the writers (`features`, `their_config`) and the readers
(`our_config`), so "can format F express option X" is answered here once.

    TIMM = Capabilities(
        "timm VisionTransformer",
        classifiers=("token", "gap", "map"),
        rows=(Can("num_registers", "registers", "reg_tokens", lambda f: num_registers(f.config)),
              ...),
    )
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from vit_jax.models import vit
from vit_jax.weights.errors import ConversionError

__all__ = [
    "BIASES",
    "LAYER_SCALE_KEY",
    "OPTIONS",
    "Can",
    "Capabilities",
    "Option",
    "check",
    "features",
    "layer_scale",
    "missing_biases",
    "num_registers",
    "our_config",
    "problems",
    "qk_norm",
    "rms_norm",
    "swiglu",
    "their_config",
]

LAYER_SCALE_KEY = "Transformer/encoderblock_0/LayerScale_1/scale"


def _value(config: Any, name: str) -> Any:
    """Our ViT option `name` in a (possibly partial, stored or foreign) model config: its
    declared default where the config lacks it (`models.vit.SCHEMA`)."""
    return vit.SCHEMA.value(config, name)


def num_registers(config: Any) -> int:
    """Register tokens of a model config (`num_registers`)."""
    return _value(config, "num_registers")


def qk_norm(config: Any) -> bool:
    """Whether queries and keys are normalised (`transformer.qk_norm`)."""
    return _value(config, "qk_norm")


def swiglu(config: Any) -> bool:
    """Whether the MLP is SwiGLU (`transformer.mlp_type == 'swiglu'`)."""
    return _value(config, "mlp_type") == "swiglu"


def rms_norm(config: Any) -> bool:
    """Whether the model's norms are RMSNorms (`transformer.norm == 'rmsnorm'`)."""
    return _value(config, "norm") == "rmsnorm"


def layer_scale(config: Any, flat: Mapping[str, Any] = ()) -> bool:
    """Whether the model has LayerScale: by its config (`transformer.layer_scale_init`) or by
    its parameters (`LayerScale_1`)."""
    return _value(config, "layer_scale_init") is not None or LAYER_SCALE_KEY in flat


# The blocks' biases a model may leave out (`transformer.<name>` False), as refusals name them.
BIASES = {
    "query_bias": "query",
    "key_bias": "key",
    "value_bias": "value",
    "attention_out_bias": "attention output",
    "mlp_bias": "MLP",
}


def missing_biases(config: Any) -> list[str]:
    """The `BIASES` a model config turns off (an absent field: the bias is there)."""
    return [name for name in BIASES if not _value(config, name)]


class Option(NamedTuple):
    """One option of our ViT: where it lives in our config, whether a model has it, and the
    words that name it in a refusal."""

    field: str  # our model-config field, '.'-joined
    on: Callable[[Any, Mapping[str, Any]], bool]  # (config, flat params) -> has it
    says: Callable[[Any], str]  # config -> the words naming it
    value: Any = True  # our field's value when a reader finds the option (None: the reader's)


# In the order a refusal lists them (after the architecture: `problems`).
OPTIONS: dict[str, Option] = {
    "distillation_token": Option(
        "distillation_token",
        lambda c, f: bool(c.get("distillation_token")),
        lambda c: "a distillation token",
    ),
    "layer_scale": Option(
        "transformer.layer_scale_init",
        layer_scale,
        lambda c: f"LayerScale ({LAYER_SCALE_KEY})",
        None,
    ),
    "representation": Option(
        "representation_size",
        lambda c, f: bool(c.get("representation_size")),
        lambda c: "a representation layer (pre_logits)",
        None,
    ),
    "num_registers": Option(
        "num_registers",
        lambda c, f: bool(num_registers(c)),
        lambda c: f"{num_registers(c)} register tokens (num_registers)",
        None,
    ),
    "qk_norm": Option(
        "transformer.qk_norm",
        lambda c, f: qk_norm(c),
        lambda c: "query/key norms (transformer.qk_norm)",
    ),
    "swiglu": Option(
        "transformer.mlp_type",
        lambda c, f: swiglu(c),
        lambda c: "a SwiGLU MLP (transformer.mlp_type='swiglu')",
        "swiglu",
    ),
    "rms_norm": Option(
        "transformer.norm",
        lambda c, f: rms_norm(c),
        lambda c: "RMSNorm (transformer.norm='rmsnorm')",
        "rmsnorm",
    ),
}


class Can(NamedTuple):
    """A row of a capability table: the format expresses `option` (an `OPTIONS` name).

    `feature`: the key-table rows (`when=`) the option turns on, `off`: those it turns on when
    absent; `theirs`: the format's name for it — the config key its writer sets to `write(facts)`
    and its reader looks up, or the state-dict key whose presence shows it; `alone`: only
    without a classifier head (transformers' pooler is our `pre_logits`); `required`: the
    format always has it, so a model without it is refused.
    """

    option: str
    feature: str | None = None
    theirs: str = ""
    write: Callable[[Any], Any] | None = None
    off: str | None = None
    alone: bool = False
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one format can express of our ViT: classifiers, position embeddings, biases it can
    leave out, a classifier head, non-square images, and one `Can` row per option."""

    target: str  # the format as refusals name it: "timm VisionTransformer"
    classifiers: tuple[str, ...] = ("token",)
    rows: tuple[Can, ...] = ()
    head: bool = True  # it has a classifier head
    square: bool = False  # it takes square images and patches only
    posembs: tuple[str, ...] = ("learn",)  # `posemb` values it expresses
    rope_coords: tuple[str, ...] = ()  # posemb 'rope': `rope_normalize_coords` it expresses
    bias_free: tuple[str, ...] = ()  # the `BIASES` it can leave out

    def row(self, option: str) -> Can | None:
        """The row of `option`, or None when the format cannot express it."""
        return next((r for r in self.rows if r.option == option), None)

    @property
    def short(self) -> str:
        return self.target.split()[-1]


def problems(can: Capabilities, config: Any, flat: Mapping[str, Any]) -> list[str]:
    """What `can.target` cannot express about the model (`config`, its flat parameters)."""
    if config.get("model_type", "ViT") != "ViT":
        return [f"model_type {config.model_type!r} (only ViT converts)"]
    out = []  # the architecture first: no format here has a ResNet stem or a fixed table
    if config.get("resnet") is not None:
        out.append("a ResNet stem (hybrid models)")
    posemb = config.get("posemb", "learn")
    if posemb not in can.posembs:
        if can.posembs == ("learn",):
            out.append(f"posemb {config.posemb!r} (learned position embeddings only)")
        else:
            out.append(f"posemb {posemb!r} (supported: {', '.join(can.posembs)})")
    elif posemb == "rope":
        coords = config.get("rope_normalize_coords", "separate")
        if coords not in can.rope_coords:
            out.append(
                f"RoPE coordinates rope_normalize_coords={coords!r} "
                f"(supported: {', '.join(can.rope_coords)})"
            )
    for name in missing_biases(config):
        if name not in can.bias_free:
            out.append(f"no {BIASES[name]} bias (transformer.{name}=False)")
    if config.classifier not in can.classifiers:
        supported = ", ".join(can.classifiers)
        out.append(f"classifier {config.classifier!r} (supported: {supported})")
    head = flat.get("head/kernel")
    for name, option in OPTIONS.items():
        row = can.row(name)
        if option.on(config, flat):
            if row is None:
                out.append(option.says(config))
            elif row.alone and head is not None:
                out.append(f"{option.says(config)} followed by a head")
        elif row is not None and row.required:
            words = option.says(config).split(" (")[0].removeprefix("a ")
            out.append(f"no {words} ({can.short} always has it)")
    if head is not None and not can.head:
        out.append(
            f"a classifier ({can.short} has no classifier; convert without head/kernel "
            f"{tuple(head.shape)})"
        )
    return out


def check(can: Capabilities, config: Any, flat: Mapping[str, Any], more: Iterable[str] = ()):
    """Raises one line naming every option of the model `can.target` cannot express."""
    found = [*problems(can, config, flat), *more]
    if found:
        raise ConversionError(
            f"{can.target} cannot express {config.get('name') or 'this model'}: " + "; ".join(found)
        )


def features(can: Capabilities, config: Any, flat: Mapping[str, Any]) -> set[str]:
    """The key-table features of a model the format expresses (after `check`)."""
    out = set()
    for row in can.rows:
        feature = row.feature if OPTIONS[row.option].on(config, flat) else row.off
        if feature is not None:
            out.add(feature)
    return out


def their_config(can: Capabilities, facts: Any) -> dict[str, Any]:
    """The format's config entries for the options the model has (`Can.theirs: write(f)`)."""
    out = {}
    for row in can.rows:
        if row.theirs and row.write is not None:
            if OPTIONS[row.option].on(facts.config, facts.flat) or row.required:
                out[row.theirs] = row.write(facts)
    return out


def our_config(
    can: Capabilities, features: Iterable[str], values: Mapping[str, Any] = {}
) -> dict[str, Any]:
    """Our model-config fields (nested) for the options a reader found: those whose key-table
    `feature` it found in the file, and those the format always has. The value is the reader's
    (`values`, by option name), else the option's own (`Option.value`, e.g. True)."""
    out: dict[str, Any] = {}
    features = set(features)
    for row in can.rows:
        if not (row.required or row.feature in features):
            continue
        option = OPTIONS[row.option]
        value = values.get(row.option, option.value)
        if value is None:
            continue
        *parents, leaf = option.field.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
