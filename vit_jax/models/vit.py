"""Vision Transformer (ViT) in Flax linen, with the published checkpoints' parameter names.

The parameter tree matches the published `.npz` layout (see `vit_jax.checkpoint`): `embedding`,
`cls`, `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`. With `scan=True` the blocks are stacked under
`Transformer/encoderblock` with a leading depth axis (`vit_jax.models.layout` converts). A DeiT
distillation token (`distillation_token=True`) adds `dist` and `head_dist`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import families, precision, resnet

Array = jax.Array
F32 = jnp.float32
Dtype = Any

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def sincos2d_posemb(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sine/cosine position table of shape (1, grid_h * grid_w, width), row-major.

    A quarter of the channels each holds sin(y), cos(y), sin(x), cos(x) at geometrically spaced
    frequencies, as in "Attention is all you need" extended to the patch grid (MoCo v3, big_vision).
    """
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need hidden_size % 4 == 0, got {width}")
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(table[None], jnp.float32)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> GELU -> dropout -> Dense -> dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.dense_kwargs(self.dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        out_dim = x.shape[-1]
        x = dense(self.mlp_dim, name="Dense_0")(x)
        x = nn.gelu(x, approximate=self.gelu_approximate)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, name="Dense_1")(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class ProjectionParams(nn.Module):
    """The `kernel` (D, *features) and `bias` (*features) of a DenseGeneral, without applying it.

    Initialised like `nn.DenseGeneral` (the kernel_init sees the flattened (D, prod(features))
    shape), so a fused projection has the same parameters, names and init as three Dense layers.
    """

    features: tuple[int, ...]
    kernel_init: Any
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        flat = (in_features, int(np.prod(self.features)))
        init = lambda key, shape, dtype: self.kernel_init(key, flat, dtype).reshape(shape)
        kernel = self.param("kernel", init, (in_features, *self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
        return kernel, bias


ATTENTION_IMPLEMENTATIONS = (None, "explicit", "xla", "cudnn")


class MultiHeadAttention(nn.Module):
    """Multi-head attention with the published parameter layout.

    `query`, `key`, `value` kernels are (D, heads, head_dim), `out` is (heads, head_dim, D), the
    layout of `flax.linen.MultiHeadDotProductAttention`. The core is `implementation`:
    `'explicit'` (heads-major matmuls under the precision policy, softmax in float32; the weights
    can be returned and dropped out), `'xla'` / `'cudnn'` (`jax.nn.dot_product_attention`, e.g.
    cuDNN flash attention on GPU), or None: `jax.nn.dot_product_attention` on GPU, explicit
    elsewhere. Attention weights or attention dropout always take the explicit core.
    """

    num_heads: int
    dropout_rate: float = 0.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    fuse_qkv: bool = True  # self-attention: q, k, v in one matmul

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        deterministic: bool,
        return_weights: bool = False,
    ) -> tuple[Array, Array | None]:
        if self.implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        dot = precision.dot_general(self.dtype)
        cast = lambda t: t.astype(self.dtype)
        params = lambda name: ProjectionParams(
            (self.num_heads, head_dim), self.kernel_init, self.param_dtype, name=name
        )(width)

        def project(x: Array, kernel: Array, bias: Array) -> Array:
            """(B, N, D) x (D, ..., H, hd) -> heads-major (..., B, H, N, hd)."""
            y = dot(cast(x), kernel, (((2,), (0,)), ((), ())))  # (B, N, ..., H, hd)
            y = y + cast(bias)
            return jnp.moveaxis(y, (0, 1), (-4, -2))

        with jax.named_scope("qkv"):  # names the ops for profiles
            if inputs_q is inputs_kv and self.fuse_qkv:
                # Self-attention: one matmul against the three kernels side by side (same params).
                kernels, biases = zip(*(params(n) for n in ("query", "key", "value")), strict=True)
                q, k, v = project(inputs_q, jnp.stack(kernels, axis=1), jnp.stack(biases))
            else:
                q = project(inputs_q, *params("query"))
                k = project(inputs_kv, *params("key"))
                v = project(inputs_kv, *params("value"))
        use_dropout = self.dropout_rate > 0.0 and not deterministic
        library = self.implementation in ("xla", "cudnn") or (
            self.implementation is None and jax.default_backend() == "gpu"
        )
        weights = None
        with jax.named_scope("core"):  # names the ops for profiles
            if return_weights or use_dropout or not library:
                # Heads-major operands: the batched matmuls see (B, H) as leading batch
                # dimensions, which XLA:CPU runs without layout copies. Scores and softmax in
                # float32; the 1/sqrt(head_dim) scale on the (smaller) queries.
                q = q * np.asarray(1 / np.sqrt(head_dim), q.dtype)
                scores = dot(q, k, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=F32)
                weights = jax.nn.softmax(scores, axis=-1)
                probs = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=deterministic)
                y = dot(cast(probs), v, (((3,), (2,)), ((0, 1), (0, 1))))  # (B, H, N, hd)
                y = jnp.swapaxes(y, 1, 2)
                weights = weights if return_weights else None
            else:
                bnhd = lambda t: jnp.swapaxes(t, 1, 2)
                y = jax.nn.dot_product_attention(
                    bnhd(q), bnhd(k), bnhd(v), implementation=self.implementation
                )
        out = nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.dense_kwargs(self.dtype),
            kernel_init=self.kernel_init,
            name="out",
        )(y)
        return out, weights


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
    """Stochastic depth: zero whole examples' residual branch with probability `rate`."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """A learned per-channel scale (`scale`, shape (D,)) initialised to `init_value` (CaiT)."""

    init_value: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.constant(self.init_value)
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With `layer_scale_init` set, each branch is scaled per channel before the residual add
    (`LayerScale_1` after attention, `LayerScale_3` after the MLP; timm / DeiT-III / DINOv2), and
    stochastic depth drops the scaled branch.
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    attention_implementation: str | None = None
    stochastic_depth: bool = False
    layer_scale_init: float | None = None
    return_intermediates: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, drop_rate: Array | float, deterministic: bool):
        norm = functools.partial(
            nn.LayerNorm,
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

        def residual(branch, name):
            if self.layer_scale_init is not None:
                branch = LayerScale(self.layer_scale_init, self.param_dtype, name=name)(branch)
            if deterministic or not self.stochastic_depth:
                return branch
            return drop_path(branch, drop_rate, self.make_rng("dropout"))

        y = norm(name="LayerNorm_0")(x)
        y, weights = MultiHeadAttention(
            num_heads=self.num_heads,
            dropout_rate=self.attention_dropout_rate,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, y, deterministic=deterministic, return_weights=self.return_intermediates)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        x = x + residual(y, "LayerScale_1")
        y = norm(name="LayerNorm_2")(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MlpBlock_3",
        )(y, deterministic=deterministic)
        x = x + residual(y, "LayerScale_3")
        aux = {"tokens": x, "attention_weights": weights} if self.return_intermediates else None
        return x, aux


class AddPositionEmbs(nn.Module):
    """Adds learned position embeddings (1, tokens, width), initialised normal(0.02)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (1, x.shape[1], x.shape[2])
        pe = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype
        )
        if pe.shape != shape:  # only reachable through apply() with foreign params
            raise ValueError(f"pos_embedding has shape {pe.shape}, the tokens need {shape}")
        return x + pe.astype(self.dtype)


class Encoder(nn.Module):
    """Position embeddings, dropout, `num_layers` blocks (unrolled or scanned), final LayerNorm."""

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    layer_scale_init: float | None = None
    posemb: str = "learn"
    grid: tuple[int, int] = (0, 0)
    num_prefix_tokens: int = 1
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    attention_implementation: str | None = None
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    return_intermediates: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool):
        if self.posemb == "learn":
            x = AddPositionEmbs(
                dtype=self.dtype, param_dtype=self.param_dtype, name="posembed_input"
            )(x)
        elif self.posemb == "sincos2d":
            table = sincos2d_posemb(*self.grid, x.shape[-1])
            table = jnp.pad(table, ((0, 0), (self.num_prefix_tokens, 0), (0, 0)))
            x = x + table.astype(self.dtype)
        elif self.posemb != "none":
            raise ValueError(f"posemb must be 'learn', 'sincos2d' or 'none', got {self.posemb!r}")
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

        block_kwargs = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            gelu_approximate=self.gelu_approximate,
            layernorm_epsilon=self.layernorm_epsilon,
            attention_implementation=self.attention_implementation,
            stochastic_depth=self.stochastic_depth_rate > 0,
            layer_scale_init=self.layer_scale_init,
            return_intermediates=self.return_intermediates,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        block = Encoder1DBlock
        if self.remat:
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(
                    f"remat_policy {self.remat_policy!r} unknown; one of {sorted(REMAT_POLICIES)}"
                )
            block = nn.remat(
                block,
                prevent_cse=not self.scan,
                static_argnums=(3,),  # (self, x, drop_rate, deterministic)
                policy=REMAT_POLICIES[self.remat_policy],
            )
        # Stochastic depth grows linearly with depth (0 for the first block), as in DeiT / timm.
        rates = np.linspace(0.0, self.stochastic_depth_rate, self.num_layers, dtype=np.float32)
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=self.num_layers,
            )
            x, aux = stack(name="encoderblock", **block_kwargs)(x, jnp.asarray(rates), not train)
        else:
            auxes = []
            for i in range(self.num_layers):
                x, a = block(name=f"encoderblock_{i}", **block_kwargs)(
                    x, float(rates[i]), not train
                )
                auxes.append(a)
            aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else None
        x = nn.LayerNorm(
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="encoder_norm",
        )(x)
        return x, aux


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (big_vision names)."""

    num_heads: int
    mlp_dim: int
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        probe = jnp.tile(probe.astype(self.dtype), (b, 1, 1))
        x, _ = MultiHeadAttention(
            num_heads=self.num_heads,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_0",
        )(probe, x, deterministic=True)
        y = nn.LayerNorm(
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="LayerNorm_0",
        )(x)
        x = x + MlpBlock(
            mlp_dim=self.mlp_dim,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MlpBlock_0",
        )(y, deterministic=True)
        return x[:, 0]


CLASSIFIERS = ("token", "gap", "map", "unpooled", "token_unpooled")


def patch_stride(
    patch_size: tuple[int, int], resnet_num_layers: tuple[int, ...] | None
) -> tuple[int, int]:
    """Input pixels per token: the patch size, times the ResNet stem's downsampling (hybrids).

    The stem's root conv and max-pool divide by 4, every stage after the first by 2 more.
    """
    ph, pw = patch_size
    if resnet_num_layers is None:
        return ph, pw
    f = 4 * 2 ** max(len(resnet_num_layers) - 1, 0)
    return ph * f, pw * f


class VisionTransformer(nn.Module):
    """ViT (and R+ViT hybrids when `resnet` is set).

    `__call__(images, *, train, return_intermediates=False)`: images NHWC in [-1, 1]. Returns
    `(logits, out)`, float32 logits (the representation when `num_classes` is None/0) and a dict
    `out` with `stem` (patch embeddings (B, gh*gw, D)), `encoded` (the final LayerNorm's output)
    and `pre_logits`. `return_intermediates=True` adds the costly per-block `tokens` (every
    block's output, stacked (layers, B, N, D)) and `attention_weights` ((layers, B, heads, N, N)).

    `distillation_token=True` (DeiT, classifier 'token' only) adds a second learned token `dist`
    after `cls` (with its own position-embedding slot) and its own head `head_dist`. The logits
    are then the mean of the two heads' logits, and `out` also holds each head's logits,
    `logits_cls` and `logits_dist` (what distillation training reads).
    """

    num_classes: int | None
    patch_size: tuple[int, int]
    hidden_size: int
    mlp_dim: int
    num_heads: int
    num_layers: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    layer_scale_init: float | None = None
    resnet_num_layers: tuple[int, ...] | None = None
    resnet_width_factor: float = 1.0
    classifier: str = "token"
    representation_size: int | None = None
    posemb: str = "learn"
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    head_bias_init: float = 0.0
    distillation_token: bool = False
    attention_implementation: str | None = None
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stride(self) -> tuple[int, int]:
        """Input pixels per token along (height, width)."""
        return patch_stride(self.patch_size, self.resnet_num_layers)

    @nn.compact
    def __call__(
        self,
        images: Array,
        *,
        train: bool,
        return_intermediates: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if self.distillation_token and self.classifier != "token":
            raise ValueError(
                f"distillation_token needs classifier='token', got {self.classifier!r}"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        sh, sw = self.stride()
        h, w = images.shape[1:3]
        if h % sh or w % sw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the model's patch stride {sh}x{sw}"
                f" (patch size {self.patch_size[0]}x{self.patch_size[1]})"
            )
        x = images.astype(self.dtype)
        if self.resnet_num_layers is not None:
            x = resnet.resnet_stem(
                x,
                num_layers=tuple(self.resnet_num_layers),
                width_factor=self.resnet_width_factor,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        x = nn.Conv(
            self.hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.conv_kwargs(self.dtype),
            name="embedding",
        )(x)
        n, gh, gw, c = x.shape
        x = x.reshape(n, gh * gw, c)
        out = {"stem": x}
        prefix = 0
        if self.classifier in ("token", "token_unpooled"):
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
            tokens = [cls]
            if self.distillation_token:  # DeiT initialises it normal(0.02): distinct from cls
                init = nn.initializers.normal(stddev=0.02)
                tokens.append(self.param("dist", init, (1, 1, c), self.param_dtype))
            prefix = len(tokens)
            tokens = [jnp.tile(t.astype(x.dtype), (n, 1, 1)) for t in tokens]
            x = jnp.concatenate([*tokens, x], axis=1)
        x, aux = Encoder(
            num_layers=self.num_layers,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            stochastic_depth_rate=self.stochastic_depth_rate,
            layer_scale_init=self.layer_scale_init,
            posemb=self.posemb,
            grid=(gh, gw),
            num_prefix_tokens=prefix,
            gelu_approximate=self.gelu_approximate,
            layernorm_epsilon=self.layernorm_epsilon,
            attention_implementation=self.attention_implementation,
            scan=self.scan,
            remat=self.remat,
            remat_policy=self.remat_policy,
            return_intermediates=return_intermediates,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="Transformer",
        )(x, train=train)
        if aux is not None:
            out.update(aux)
        out["encoded"] = x
        if self.classifier == "token":
            x = x[:, :prefix] if self.distillation_token else x[:, 0]  # (B, 2, D): cls, dist
        elif self.classifier == "gap":
            x = jnp.mean(x, axis=1)
        elif self.classifier == "map":
            x = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                gelu_approximate=self.gelu_approximate,
                layernorm_epsilon=self.layernorm_epsilon,
                attention_implementation=self.attention_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="MAPHead_0",
            )(x)
        if self.representation_size is not None:
            x = nn.Dense(
                self.representation_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                **precision.dense_kwargs(self.dtype),
                name="pre_logits",
            )(x)
            x = jnp.tanh(x)
        out["pre_logits"] = x  # (B, 2, D) with a distillation token: cls, dist
        if not self.num_classes:  # a feature extractor: the (mean of the tokens') representation
            x = jnp.mean(x, axis=1) if self.distillation_token else x
            return x.astype(jnp.float32), out
        head = functools.partial(
            nn.Dense,
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.dense_kwargs(self.dtype),
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(self.head_bias_init),
        )
        if self.distillation_token:
            logits_cls = head(name="head")(x[:, 0]).astype(jnp.float32)
            logits_dist = head(name="head_dist")(x[:, 1]).astype(jnp.float32)
            out["logits_cls"], out["logits_dist"] = logits_cls, logits_dist
            return (logits_cls + logits_dist) / 2, out
        return head(name="head")(x).astype(jnp.float32), out


# --- The ViT family: config defaults, builder and layout facts (see `vit_jax.models.families`).

CONFIG_DEFAULTS = dict(
    families.COMMON_DEFAULTS,
    patches=dict(size=None),
    hidden_size=None,
    transformer=dict(
        mlp_dim=None,
        num_heads=None,
        num_layers=None,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_scale_init=None,  # a float: per-channel residual scales (LayerScale) at this value
    ),
    resnet=None,  # or {num_layers: (3, 4, 9), width_factor: 1}
    classifier="token",  # token | gap | map | unpooled | token_unpooled
    representation_size=None,
    posemb="learn",  # learn | sincos2d | none
    distillation_token=False,  # DeiT: a second token `dist` with its own head `head_dist`
    attention_implementation=None,  # None | "xla" | "cudnn" (jax.nn.dot_product_attention)
)

# (path regex, logical axes of the trailing dimensions); `heads` and `mlp` are tensor-parallel.
LOGICAL_AXES: families.LogicalAxes = (
    (r"(query|key|value)/kernel$", ("embed", "heads", "kv")),
    (r"(query|key|value)/bias$", ("heads", "kv")),
    (r"MultiHeadDotProductAttention_\d+/out/kernel$", ("heads", "kv", "embed")),
    (r"MlpBlock_\d+/Dense_0/kernel$", ("embed", "mlp")),
    (r"MlpBlock_\d+/Dense_0/bias$", ("mlp",)),
    (r"MlpBlock_\d+/Dense_1/kernel$", ("mlp", "embed")),
)

# Norm scales and biases (LayerNorm, GroupNorm, LayerScale), all biases, the position
# embeddings and the learned tokens / MAP probe take no weight decay.
NO_DECAY = (
    r"(^|/)bias$",
    r"(^|/)scale$",
    r"(^|/)pos_embedding$",
    r"(^|/)cls$",
    r"(^|/)dist$",
    r"(^|/)probe$",
)


def config_stride(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Input pixels per token of a ViT config (hybrids: times the stem's downsampling)."""
    layers = None if config.resnet is None else tuple(config.resnet.num_layers)
    return patch_stride(families.pair(config.patches.size, "patches.size"), layers)


def config_num_prefix_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens before the patch tokens: the class token, plus DeiT's distillation token."""
    if config.classifier not in ("token", "token_unpooled"):
        return 0
    return 1 + int(bool(config.distillation_token))


def build(config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any):
    """`VisionTransformer` for a complete ViT config; `overrides` replace derived fields."""
    t = config.transformer
    kwargs = dict(
        num_classes=num_classes,
        patch_size=families.pair(config.patches.size, "patches.size"),
        hidden_size=config.hidden_size,
        mlp_dim=t.mlp_dim,
        num_heads=t.num_heads,
        num_layers=t.num_layers,
        dropout_rate=float(t.dropout_rate),
        attention_dropout_rate=float(t.attention_dropout_rate),
        stochastic_depth_rate=float(t.stochastic_depth_rate),
        layer_scale_init=None if t.layer_scale_init is None else float(t.layer_scale_init),
        resnet_num_layers=None if config.resnet is None else tuple(config.resnet.num_layers),
        resnet_width_factor=1.0 if config.resnet is None else float(config.resnet.width_factor),
        classifier=config.classifier,
        representation_size=config.representation_size,
        posemb=config.posemb,
        distillation_token=bool(config.distillation_token),
        attention_implementation=config.attention_implementation,
        gelu_approximate=bool(config.gelu_approximate),
        layernorm_epsilon=float(config.layernorm_epsilon),
        head_bias_init=float(config.head_bias_init),
        scan=bool(config.scan),
        remat=bool(config.remat),
        remat_policy=config.remat_policy,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
    )
    return VisionTransformer(**{**kwargs, **overrides})


FAMILY = families.register_family(
    families.Family(
        name="ViT",
        defaults=CONFIG_DEFAULTS,
        builder=build,
        stride=config_stride,
        num_prefix_tokens=config_num_prefix_tokens,
        scan_block="encoderblock",
        no_decay=NO_DECAY,
        logical_axes=LOGICAL_AXES,
        optional=frozenset(
            {"resnet", "representation_size", "attention_implementation", "layer_scale_init"}
        ),
        templates={"resnet": dict(num_layers=None, width_factor=1)},
    )
)
