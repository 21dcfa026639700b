"""Image augmentation in JAX, run on the device inside the jitted training step.

:func:`augment_images` is what ``config.data.augment = "crop_flip"`` plugs into
:func:`tna_jax.training.fit`: ``augment(key, images) -> images`` for one batch of one run,
called with a key derived from the run's data key, the epoch and the step, so every seed has
its own augmentations and a resumed run repeats them exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["random_crop_flip", "augment_images", "default_padding"]


def default_padding(height: int, width: int) -> int:
    """Crop padding for an image size: 1/8 of the shorter side, at least 1 (4 for 32x32, 1 for 8x8).

    Args:
      height, width: the image size in pixels.

    Returns:
      ``max(1, min(height, width) // 8)``.

    Examples:
      >>> default_padding(32, 32), default_padding(8, 8), default_padding(28, 64)
      (4, 1, 3)
    """
    return max(1, min(int(height), int(width)) // 8)


@functools.partial(jax.jit, static_argnames=("padding", "flip"))
def random_crop_flip(key: jax.Array, images: jax.Array, *, padding: int | None = None,
                     flip: bool = True) -> jax.Array:
    """Random translation by zero-padded cropping, then a random horizontal flip, per image.

    Each image of the ``(B, H, W, C)`` batch is zero-padded by `padding` pixels on every side
    and an ``H x W`` window at a uniformly random offset in ``[0, 2 * padding]^2`` is cut out
    (torchvision's ``RandomCrop(H, padding)``; on standardised inputs zero is the mean
    colour); with `flip` it is then mirrored left-right with probability 1/2.

    Args:
      key: a PRNG key.
      images: ``(B, H, W, C)`` array.
      padding: pixels of zero padding (default :func:`default_padding`); 0 disables cropping.
      flip: also flip horizontally.

    Returns:
      An array of the same shape and dtype.

    Raises:
      ValueError: `images` is not 4-D, or `padding` is negative.

    Examples:
      >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
      >>> y = random_crop_flip(jax.random.key(0), x, padding=1)
      >>> y.shape, bool(jnp.all(random_crop_flip(jax.random.key(0), x, padding=0, flip=False) == x))
      ((2, 4, 4, 1), True)
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, H, W, C) batch; got shape {images.shape}.")
    b, h, w, c = images.shape
    padding = default_padding(h, w) if padding is None else int(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}.")
    crop_key, flip_key = jax.random.split(key)
    out = images
    if padding:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)
        out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (b,))
        out = jnp.where(mirrored[:, None, None, None], out[:, :, ::-1, :], out)
    return out


def augment_images(key: jax.Array, images: jax.Array) -> jax.Array:
    """``config.data.augment = "crop_flip"``: :func:`random_crop_flip` with the default padding.

    Args:
      key: a PRNG key (one per batch, run and step).
      images: a ``(B, H, W, C)`` batch.

    Returns:
      The augmented batch, same shape and dtype.

    Examples:
      >>> augment_images(jax.random.key(1), jnp.ones((3, 8, 8, 1))).shape
      (3, 8, 8, 1)
    """
    return random_crop_flip(key, images)
