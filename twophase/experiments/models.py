"""The models and losses of Hrycej et al., "A Convexity-dependent Two-Phase Training Algorithm
for Deep Neural Networks" (KDIR 2025), in Flax nnx.

Model zoo (:data:`MODEL_NAMES`); every model maps float32 images ``(B, H, W, C)`` to float32
logits ``(B, num_classes)``:

- ``vit-mlp``: ViT encoder (3 layers, 4 heads, width 64, pre-layer-norm) with a 256-unit gelu MLP
  in every layer.
- ``vit-nomlp``: the same encoder without the MLP blocks.
- ``vit-nomlp-wkewq``: also with symmetric similarity: one matrix ``W_k = W_q`` shared by keys
  and queries.
- ``vit-nomlp-wkewq-wvwo``: also without the value and output matrices ``W_v``, ``W_o``: each
  head returns the attention-weighted sum of its own slice of the (normalised) input tokens.
- ``vgg5-max-relu``: VGG-style CNN with five weight layers (four 3x3 convolutions in two blocks,
  each block followed by 2x2 max pooling, then one dense layer), ReLU.
- ``mlp``: flatten, hidden dense layers (default one of 64 tanh units), dense output.

The ViTs read the image as a grid of non-overlapping patches, embedded linearly, plus a learned
position embedding; the tokens are mean-pooled after a final layer norm and fed to a linear head.
The patch size rule is :func:`default_patch_size`.

Losses follow the paper: mean squared error on one-hot targets (:func:`mse_loss`), with
cross-entropy (:func:`cross_entropy_loss`) available for comparison.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from twophase.experiments.datasets import one_hot

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "VGG",
    "ViT",
    "accuracy",
    "conv3x3_im2col",
    "count_params",
    "cross_entropy_loss",
    "default_patch_size",
    "make_model",
    "mse_loss",
    "overdetermination",
]

MODEL_NAMES = (
    "vit-mlp",
    "vit-nomlp",
    "vit-nomlp-wkewq",
    "vit-nomlp-wkewq-wvwo",
    "vgg5-max-relu",
    "mlp",
)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; valid choices: {', '.join(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------
# Vision transformer.


def default_patch_size(height: int, width: int, max_grid: int = 8) -> int:
    """The smallest patch size ``p >= 2`` dividing both image sides such that the patch grid has
    at most ``max_grid`` patches per side.

    Examples: 8x8 -> 2 (4x4 patches), 28x28 -> 4 (7x7 patches), 32x32 -> 4 (8x8 patches).

    Raises:
      ValueError: no such ``p`` exists (pass ``patch_size`` explicitly).
    """
    for p in range(2, math.gcd(height, width) + 1):
        if height % p == 0 and width % p == 0 and max(height, width) // p <= max_grid:
            return p
    raise ValueError(
        f"No patch size >= 2 divides a {height}x{width} image into at most {max_grid} patches "
        "per side; pass `patch_size` explicitly."
    )


def _patchify(images: jax.Array, patch: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, (H/p)*(W/p), p*p*C)`` non-overlapping patches, row-major."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``(B, T, D)`` -> ``(B, heads, T, D/heads)``."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    """``(B, heads, T, D/heads)`` -> ``(B, T, D)``."""
    b, h, t, k = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * k)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with the paper's two simplifications as switches.

    Args:
      width: token width ``D`` (divisible by ``num_heads``).
      num_heads: number of heads; each works on ``D / num_heads`` features.
      shared_qk: one matrix for keys and queries (``W_k = W_q``), i.e. a symmetric similarity
        ``x_i^T W W^T x_j`` (the paper's ``wkewq``).
      value_output: keep ``W_v`` and ``W_o``. If False (the paper's ``wvwo`` removed), each head
        returns the attention-weighted sum of its own ``D / num_heads`` slice of the input.
    """

    def __init__(
        self, width: int, num_heads: int, *, shared_qk: bool, value_output: bool, rngs: nnx.Rngs
    ):
        if width % num_heads:
            raise ValueError(f"`width` ({width}) must be divisible by `num_heads` ({num_heads}).")
        self.num_heads = num_heads
        self.query = nnx.Linear(width, width, rngs=rngs)
        self.key = None if shared_qk else nnx.Linear(width, width, rngs=rngs)
        self.value = nnx.Linear(width, width, rngs=rngs) if value_output else None
        self.out = nnx.Linear(width, width, rngs=rngs) if value_output else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        q = _split_heads(self.query(x), self.num_heads)
        k = q if self.key is None else _split_heads(self.key(x), self.num_heads)
        v = _split_heads(x if self.value is None else self.value(x), self.num_heads)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        mixed = _merge_heads(jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v))
        return mixed if self.out is None else self.out(mixed)


class EncoderLayer(nnx.Module):
    """Pre-norm encoder layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` if ``mlp_dim``."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        mlp_dim: int | None,
        shared_qk: bool,
        value_output: bool,
        rngs: nnx.Rngs,
    ):
        self.attn_norm = nnx.LayerNorm(width, rngs=rngs)
        self.attn = SelfAttention(
            width, num_heads, shared_qk=shared_qk, value_output=value_output, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs) if mlp_dim else None
        self.mlp_in = nnx.Linear(width, mlp_dim, rngs=rngs) if mlp_dim else None
        self.mlp_out = nnx.Linear(mlp_dim, width, rngs=rngs) if mlp_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        x = x + self.attn(self.attn_norm(x))
        if self.mlp_in is None:
            return x
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class ViT(nnx.Module):
    """Vision transformer encoder classifier (paper defaults: 3 layers, 4 heads, width 64).

    Args:
      image_shape: ``(H, W, C)``.
      num_classes: number of outputs.
      num_layers, num_heads, width: encoder size.
      mlp_dim: hidden units of the per-layer gelu MLP; ``None`` or 0 removes the MLP.
      shared_qk, value_output: see :class:`SelfAttention`.
      patch_size: defaults to :func:`default_patch_size`.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        num_layers: int = 3,
        num_heads: int = 4,
        width: int = 64,
        mlp_dim: int | None = 256,
        shared_qk: bool = False,
        value_output: bool = True,
        patch_size: int | None = None,
    ):
        h, w, c = image_shape
        self.patch_size = patch_size or default_patch_size(h, w)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"`patch_size` {self.patch_size} does not divide a {h}x{w} image.")
        num_patches = (h // self.patch_size) * (w // self.patch_size)
        self.embed = nnx.Linear(self.patch_size**2 * c, width, rngs=rngs)
        self.position = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (num_patches, width), dtype=jnp.float32)
        )
        self.layers = nnx.List(
            EncoderLayer(
                width,
                num_heads,
                mlp_dim=mlp_dim,
                shared_qk=shared_qk,
                value_output=value_output,
                rngs=rngs,
            )
            for _ in range(num_layers)
        )
        self.final_norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """float32 ``(B, H, W, C)`` -> logits ``(B, num_classes)``."""
        x = self.embed(_patchify(images, self.patch_size)) + self.position[...]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_norm(x).mean(axis=1))


_VIT_VARIANTS = {
    "vit-mlp": {},
    "vit-nomlp": {"mlp_dim": None},
    "vit-nomlp-wkewq": {"mlp_dim": None, "shared_qk": True},
    "vit-nomlp-wkewq-wvwo": {"mlp_dim": None, "shared_qk": True, "value_output": False},
}


# ----------------------------------------------------------------------------------------------
# CNN and MLP.


class VGG(nnx.Module):
    """VGG-style CNN: blocks of 3x3 same-padded ReLU convolutions, each block followed by 2x2 max
    pooling, then one dense layer. The default ``blocks=((32, 32), (64, 64))`` gives the paper's
    ``vgg5-max-relu``: five weight layers.

    A block's pooling is skipped when the feature map is already smaller than 4x4, so tiny
    inputs keep at least a 2x2 map (8x8 -> 4x4 -> 2x2; 28x28 -> 7x7; 32x32 -> 8x8).

    Args:
      image_shape: ``(H, W, C)``.
      num_classes: number of outputs.
      blocks: output channels of the convolutions, one tuple per pooling block.
      conv_impl: ``"lax"`` (``nnx.Conv``), ``"im2col"`` (:func:`conv3x3_im2col`: the same
        function with the same parameters, fast inside loops on CPU) or ``None``: ``"im2col"``
        on the CPU backend, ``"lax"`` elsewhere.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        blocks: Sequence[Sequence[int]] = ((32, 32), (64, 64)),
        conv_impl: str | None = None,
    ):
        if conv_impl is None:
            conv_impl = "im2col" if jax.default_backend() == "cpu" else "lax"
        if conv_impl not in ("im2col", "lax"):
            raise ValueError(f"`conv_impl` must be 'im2col', 'lax' or None, got {conv_impl!r}.")
        self.conv_impl = conv_impl
        h, w, channels = image_shape
        convs, pool_after = [], []
        for block in blocks:
            for features in block:
                convs.append(nnx.Conv(channels, features, kernel_size=(3, 3), rngs=rngs))
                channels = features
            pool = min(h, w) >= 4
            pool_after.append(pool)
            h, w = (h // 2, w // 2) if pool else (h, w)
        self.pool_after = tuple(pool_after)
        self.block_sizes = tuple(len(b) for b in blocks)
        self.convs = nnx.List(convs)
        self.dense = nnx.Linear(h * w * channels, num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """float32 ``(B, H, W, C)`` -> logits ``(B, num_classes)``."""
        x, convs = images, iter(self.convs)
        for size, pool in zip(self.block_sizes, self.pool_after, strict=True):
            for _ in range(size):
                conv = next(convs)
                if self.conv_impl == "im2col":
                    x = conv3x3_im2col(x, conv.kernel[...], conv.bias[...])
                else:
                    x = conv(x)
                x = jax.nn.relu(x)
            if pool:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.dense(x.reshape(x.shape[0], -1))


def conv3x3_im2col(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3, stride-1, zero-padded ("SAME") convolution as one matrix product.

    The nine shifted copies of the padded input are concatenated along the channels
    (``(B, H, W, 9 C)``, "im2col") and multiplied by the kernel reshaped to ``(9 C, F)``:
    the same function as ``nnx.Conv(C, F, (3, 3))`` with this ``kernel`` (HWIO, ``(3, 3, C,
    F)``) and ``bias`` (``(F,)``), whose gradient needs no convolution. Why: XLA on CPU runs
    convolutions inside loop bodies (``lax.scan`` epochs, the line search's ``while_loop``)
    with a slow generic kernel, 30x-90x slower than outside a loop for the backward pass
    (jax-ml/jax#12868); measured here, a value-and-gradient of the VGG inside a scan took
    6.3 s against 0.11 s unrolled. Costs 9x the input's memory for the patches.

    Args:
      x: ``(B, H, W, C)``.
      kernel: ``(3, 3, C, F)``.
      bias: ``(F,)``.

    Returns:
      ``(B, H, W, F)``, ``x``'s dtype promoted with the kernel's.
    """
    height, width, channels = x.shape[1:]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)],
        axis=-1,
    )
    return patches @ kernel.reshape(9 * channels, -1) + bias


class MLP(nnx.Module):
    """Flatten, ``hidden`` dense layers with ``activation``, then a dense output layer.

    Args:
      image_shape: ``(H, W, C)``.
      num_classes: number of outputs.
      hidden: widths of the hidden layers (default one layer of 64).
      activation: ``"tanh"``, ``"relu"`` or ``"gelu"``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        hidden: Sequence[int] = (64,),
        activation: str = "tanh",
    ):
        self.activation = _activation(activation)
        sizes = (math.prod(image_shape), *hidden, num_classes)
        self.layers = nnx.List(
            nnx.Linear(n_in, n_out, rngs=rngs) for n_in, n_out in itertools.pairwise(sizes)
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """float32 ``(B, H, W, C)`` -> logits ``(B, num_classes)``."""
        x = images.reshape(images.shape[0], -1)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


# ----------------------------------------------------------------------------------------------
# Factory and bookkeeping.


def make_model(
    name: str, *, image_shape: Sequence[int], num_classes: int, rngs: nnx.Rngs, **kwargs
) -> nnx.Module:
    """Builds one of :data:`MODEL_NAMES` for ``image_shape = (H, W, C)`` images.

    ``kwargs`` override the architecture (e.g. ``num_layers``, ``width``, ``patch_size`` for the
    ViTs; ``blocks`` for ``vgg5-max-relu``; ``hidden``, ``activation`` for ``mlp``).

    Raises:
      ValueError: unknown ``name`` (the message lists the valid choices).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}.")
    image_shape = tuple(int(s) for s in image_shape)
    if name in _VIT_VARIANTS:
        options = {**_VIT_VARIANTS[name], **kwargs}
        return ViT(image_shape, num_classes, rngs=rngs, **options)
    cls = VGG if name == "vgg5-max-relu" else MLP
    return cls(image_shape, num_classes, rngs=rngs, **kwargs)


def count_params(model: nnx.Module) -> int:
    """Number ``P`` of trainable scalars (all ``nnx.Param`` leaves) in ``model``."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def overdetermination(num_train: int, num_outputs: int, num_params: int) -> float:
    """The paper's overdetermination ratio ``Q = K * M / P``: ``K`` training examples times ``M``
    outputs (constraints of the MSE fit) over ``P`` parameters. ``Q > 1``: overdetermined.
    """
    return num_train * num_outputs / num_params


# ----------------------------------------------------------------------------------------------
# Losses and metrics.


def mse_loss(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """The paper's loss: squared error to one-hot targets, averaged over examples AND outputs,
    ``mean_{n, m} (logits[n, m] - onehot(labels)[n, m])**2`` (so it is ``M`` times smaller than
    the per-example sum of squares).

    Args:
      logits: float ``(B, M)`` network outputs (no softmax).
      labels: int ``(B,)`` class labels.
      num_classes: ``M``.

    Returns:
      scalar of the logits' dtype.
    """
    targets = one_hot(labels, num_classes).astype(logits.dtype)
    return jnp.mean(jnp.square(logits - targets))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, averaged over examples: float ``(B, M)``, int ``(B,)`` -> scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Share of examples whose arg-max output is the label: ``(B, M)``, ``(B,)`` -> scalar."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
