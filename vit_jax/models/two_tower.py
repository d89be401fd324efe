"""SigLIP's two towers: our ViT for images, `TextTransformer` for text, a sigmoid-loss head.

Parameters: `img` (the image tower, a ViT without a classifier head: its pooled output, the MAP
head's for SigLIP, is the image embedding), `txt` (`vit_jax.models.text`), `logit_scale` (1,)
(log of the temperature; big_vision's `t`) and `logit_bias` (1,) (big_vision's `b`), as
transformers' `SiglipModel` names them. Embeddings are L2-normalised and

    logits_per_image = exp(logit_scale) * img_emb @ txt_emb.T + logit_bias     # [images, texts]

as in transformers (`logits_per_text` is its transpose). Either input may be left out (encode
images or texts alone, e.g. zero-shot class embeddings); the logits need both.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import vit
from vit_jax.models.text import TextConfig, TextTransformer

__all__ = ["TwoTower", "build", "l2_normalize"]

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """`x / ||x||` over the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TwoTower(nn.Module):
    """`(images=None, tokens=None, *, mask=None, train=False) -> dict`.

    `img`: an image model with our contract, `(images, train=) -> (pooled, out)` (a ViT built
    with `num_classes=None`); `txt`: a `TextTransformer`. The dict holds `img_emb` [B_img, P],
    `txt_emb` [B_txt, P] (both L2-normalised), and, given both inputs, `logits_per_image`
    [B_img, B_txt]. The init values are SigLIP's (temperature 10, bias -10).
    """

    img: nn.Module
    txt: nn.Module
    logit_scale_init: float = float(np.log(10.0))
    logit_bias_init: float = -10.0

    @nn.compact
    def __call__(
        self,
        images: Array | None = None,
        tokens: Array | None = None,
        *,
        mask: Array | None = None,
        train: bool = False,
    ) -> dict[str, Array]:
        scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (1,))
        bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (1,))
        out: dict[str, Array] = {}
        if images is not None:
            pooled, _ = self.img(images, train=train)
            out["img_emb"] = l2_normalize(pooled.astype(jnp.float32))
        if tokens is not None:
            pooled, _ = self.txt(tokens, mask, train=train)
            out["txt_emb"] = l2_normalize(pooled.astype(jnp.float32))
        if images is not None and tokens is not None:
            similarity = out["img_emb"] @ out["txt_emb"].T
            out["logits_per_image"] = similarity * jnp.exp(scale) + bias
        return out


def build(image_config: Any, text_config: TextConfig, **image_overrides: Any) -> TwoTower:
    """A `TwoTower` of a complete ViT config (`vit_jax.models.get_config(...)`, e.g. a
    converted SigLIP tower's) without a classifier head, and a text tower. `image_overrides`
    replace the ViT's module fields; its `dtype` / `param_dtype`, when given, the text tower's
    too."""
    image = vit.build(image_config, num_classes=None, **image_overrides)
    dtypes = {k: v for k, v in image_overrides.items() if k in ("dtype", "param_dtype")}
    return TwoTower(img=image, txt=TextTransformer(text_config, **dtypes))
