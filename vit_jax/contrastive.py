"""Contrastive image-text losses: SigLIP's pairwise sigmoid loss and CLIP's softmax loss (issue 26).

`sigmoid_loss` is the loss of Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"
(Algorithm 1): every image-text pair of the batch is a binary classification, positive for the
matching pair (the diagonal) and negative for all others,

    logits = t * img @ txt.T + b,    labels = 2 * eye(N) - 1,
    loss = -sum(log_sigmoid(labels * logits)) / N.

`t` is the scale itself (positive), not its logarithm: as in big_vision's two-towers model and
transformers' SiglipModel, a model stores the learned `logit_scale` t' = log t (SigLIP's init:
log 10) and `logit_bias` b (init: -10), and calls these losses with `t = exp(logit_scale)`.

`chunked_sigmoid_loss` is the paper's memory-efficient multi-device form, for use inside
`shard_map` over the batch axis: each device keeps its own images and passes the text chunks
around the ring of devices with `ppermute`, so it only ever holds one [n_local, n_local] block of
logits (forward and backward) instead of the global [N, N]. `sharded_sigmoid_loss` wraps it for
global arrays sharded along the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

__all__ = [
    "chunked_sigmoid_loss",
    "sharded_sigmoid_loss",
    "sigmoid_loss",
    "softmax_loss",
]

AxisName = str | tuple[str, ...]


def _check(img_emb, txt_emb) -> None:
    """Both [N, D] with the same N and D; a ValueError names both shapes otherwise."""
    img_shape, txt_shape = jnp.shape(img_emb), jnp.shape(txt_emb)
    if len(img_shape) != 2 or len(txt_shape) != 2:
        raise ValueError(
            f"image and text embeddings must both be [batch, dim], got image {img_shape} "
            f"and text {txt_shape}"
        )
    if img_shape != txt_shape:
        raise ValueError(
            "image and text embeddings must have the same batch size and dimension, got image "
            f"{img_shape} and text {txt_shape}"
        )


def _as_f32(*xs):
    return tuple(jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32)) for x in xs)


def _pair_loss_sum(img, txt, t, b, positives: jax.Array | bool) -> jax.Array:
    """-sum(log_sigmoid(labels * logits)) over one block; `positives`: the diagonal is positive."""
    logits = t * (img @ txt.T) + b
    eye = jnp.eye(img.shape[0], txt.shape[0], dtype=bool)
    labels = jnp.where(eye & positives, 1.0, -1.0).astype(logits.dtype)
    # Each row's sum first (big_vision's per-image loss), then theirs: more exact than one sum.
    return -jnp.sum(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1))


def sigmoid_loss(img_emb: jax.Array, txt_emb: jax.Array, t, b) -> jax.Array:
    """SigLIP's sigmoid loss of L2-normalised embeddings [N, D] (row i of each is a pair).

    `t`: the logit scale itself (exp of a model's `logit_scale`), `b`: the logit bias. Returns
    the sum over all N * N pairs of -log sigmoid(label * (t * <img_i, txt_j> + b)), divided by
    N (the paper's normalisation; equals the mean over images of each image's summed loss).
    Computed in at least float32.
    """
    _check(img_emb, txt_emb)
    img, txt, t, b = _as_f32(img_emb, txt_emb, t, b)
    return _pair_loss_sum(img, txt, t, b, True) / img.shape[0]


def softmax_loss(img_emb: jax.Array, txt_emb: jax.Array, t) -> jax.Array:
    """CLIP's symmetric cross-entropy of L2-normalised embeddings [N, D]; `t` as `sigmoid_loss`.

    The mean of the image->text and text->image softmax cross-entropies of logits
    t * img @ txt.T, the matching pair (the diagonal) being the target.
    """
    _check(img_emb, txt_emb)
    img, txt, t = _as_f32(img_emb, txt_emb, t)
    logits = t * (img @ txt.T)
    i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return (i2t + t2i) / 2


def _ring(axis_name: AxisName):
    """(number of devices on the axis, a function passing an array to the next device)."""
    n = jax.lax.psum(1, axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return n, lambda x: jax.lax.ppermute(x, axis_name, perm)


def _varies(x, axis_name: AxisName) -> bool:
    """Whether `x` (inside shard_map) may differ between the devices along `axis_name`."""
    names = {axis_name} if isinstance(axis_name, str) else set(axis_name)
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax before 0.10
    if vma is None:  # jax 0.10 keeps them in `manual_axis_type`
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return bool(names & set(vma))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_loss_sum(img, txt, t, b, axis_name):
    """This device's images against every device's texts: the summed loss over those blocks."""
    n, send = _ring(axis_name)

    def step(k, carry):
        chunk, total = carry
        # Step k holds the texts of the device k places back on the ring: its own at k = 0.
        total = total + _pair_loss_sum(img, chunk, t, b, k == 0)
        return send(chunk), total

    # The first block (own texts, with the positives) outside the loop: n - 1 sends in all.
    total = _pair_loss_sum(img, txt, t, b, True)
    if n > 1:
        _, total = jax.lax.fori_loop(1, n, step, (send(txt), total))
    return total


def _ring_fwd(img, txt, t, b, axis_name):
    return _ring_loss_sum(img, txt, t, b, axis_name), (img, txt, t, b)


def _ring_bwd(axis_name, residuals, g):
    """Passes each text chunk around the ring again with its gradient, which arrives home last."""
    img, txt, t, b = residuals
    n, send = _ring(axis_name)
    eye = jnp.eye(img.shape[0], txt.shape[0], dtype=bool)

    def block(k, carry):
        chunk, d_chunk, d_img, d_t, d_b = carry
        sims = img @ chunk.T
        labels = jnp.where(eye & (k == 0), 1.0, -1.0).astype(sims.dtype)
        # d/dz of -log sigmoid(y z) = -y sigmoid(-y z).
        d_logits = -g * labels * jax.nn.sigmoid(-labels * (t * sims + b))
        d_img = d_img + t * (d_logits @ chunk)
        d_chunk = d_chunk + t * (d_logits.T @ img)
        d_t = d_t + jnp.sum(d_logits * sims)
        d_b = d_b + jnp.sum(d_logits)
        return chunk, d_chunk, d_img, d_t, d_b

    def step(k, carry):
        chunk, d_chunk, *rest = block(k, carry)
        return (send(chunk), send(d_chunk), *rest)

    zero = jnp.zeros_like(img[0, 0])  # varying over the axis, as the sums it starts
    carry = (txt, jnp.zeros_like(txt), jnp.zeros_like(img), zero, zero)
    if n > 1:
        carry = jax.lax.fori_loop(0, n - 1, step, carry)
    _, d_txt, d_img, d_t, d_b = block(n - 1, carry)
    # The last chunk's gradient is that of the next device's texts: one more send takes it home.
    d_txt = send(d_txt) if n > 1 else d_txt
    # A scale or bias shared by all devices gets the sum of their gradients.
    d_t = d_t if _varies(t, axis_name) else jax.lax.psum(d_t, axis_name)
    d_b = d_b if _varies(b, axis_name) else jax.lax.psum(d_b, axis_name)
    return d_img, d_txt, d_t.astype(t.dtype), d_b.astype(b.dtype)


_ring_loss_sum.defvjp(_ring_fwd, _ring_bwd)


def chunked_sigmoid_loss(
    img_emb: jax.Array, txt_emb: jax.Array, t, b, *, axis_name: AxisName
) -> jax.Array:
    """`sigmoid_loss` of the global batch, inside `shard_map` with the batch split over `axis_name`.

    Each device passes its local img/txt chunks [n_local, D] (the global batch is their
    concatenation in device order along `axis_name`); `t` and `b` as in `sigmoid_loss`. The text
    chunks go around the ring of devices with `ppermute` (n_devices - 1 sends), each device
    computing one [n_local, n_local] block of logits per step, positives only in the block of its
    own texts; the gradient does the same again, sending each text chunk's gradient along with
    it. Per-device memory is that of one block, whatever the number of devices. Returns the loss
    (the same on every device): the block sums psummed over the axis, divided by the global N.
    """
    _check(img_emb, txt_emb)
    img, txt, t, b = _as_f32(img_emb, txt_emb, t, b)
    total = jax.lax.psum(_ring_loss_sum(img, txt, t, b, axis_name), axis_name)
    return total / (img.shape[0] * jax.lax.psum(1, axis_name))


def sharded_sigmoid_loss(
    mesh: Mesh, img_emb: jax.Array, txt_emb: jax.Array, t, b, axis: AxisName = "data"
) -> jax.Array:
    """`sigmoid_loss` of global [N, D] arrays, computed by `chunked_sigmoid_loss` on `mesh`.

    The batch is split over the mesh axis (or axes) `axis`; N must divide by its size. `t` and
    `b` are replicated scalars. Differentiable and usable under `jax.jit`.
    """
    _check(img_emb, txt_emb)
    size = 1
    for name in (axis,) if isinstance(axis, str) else axis:
        size *= mesh.shape[name]
    if img_emb.shape[0] % size:
        raise ValueError(
            f"batch size {img_emb.shape[0]} does not divide over mesh axis {axis!r} of size {size}"
        )
    batch = PartitionSpec(axis)
    fn = jax.shard_map(
        functools.partial(chunked_sigmoid_loss, axis_name=axis),
        mesh=mesh,
        in_specs=(batch, batch, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    return fn(img_emb, txt_emb, jnp.asarray(t), jnp.asarray(b))
