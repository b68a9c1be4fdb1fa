"""PIL's bicubic resize of 8-bit images as two matrix products, inside the model's graph.

Extraction used to resize and normalise every image in the loader's worker
processes and ship 3 x 224 x 224 float32 arrays (602 KB) to the main process:
on a 2-core machine that work competed with the inference engine for the cores
(the pipeline ran at 0.5 to 0.7 of the engine's bare speed), and on a GPU the
workers could not keep up (7 % of the bare forward pass). Now the workers only
decode and ship the small uint8 image; :class:`ResizeNormalize` runs as the
first layers of the exported model or on the GPU. From 32 x 32 its cost does
not show; its dense float64 products cost more from large images: from
256 x 256 to 224 x 224, 0.64 s per 32 images on 2 CPU cores, against 1.48 s
for EfficientNet-Lite0 itself (measured with onnxruntime).

It reproduces ``Image.resize(size, Image.Resampling.BICUBIC)`` followed by an
affine normalisation: the same separable kernel (``a = -0.5``, support 2,
widened by the scale when shrinking), the coefficients rounded to 22 fraction
bits as PIL's 8-bit path rounds them, the horizontal pass first, and rounding
and clipping to 0..255 after each pass, since PIL keeps its intermediate image
in 8 bits. The sums run in float64, in which every product of a pixel and a
fixed-point coefficient and every partial sum is exact: the resized pixels are
the integers of PIL's fixed-point arithmetic whatever the order of the sums,
so onnxruntime, torch on the CPU and CUDA all give the same ones, and
:func:`resize_uint8` (the same arithmetic on one image, for the loader's
workers) gives them too. That is what keeps an image's embedding independent
of the other images in its batch. (Pillow builds that run the vertical pass
first for some shapes differ from it by a level on some pixels; the embedding
does not depend on which build is installed.)
"""

from functools import lru_cache

import numpy as np
import torch
from torch import nn

__all__ = ["ResizeNormalize", "pil_bicubic_matrix", "resize_uint8"]

# PIL's 8-bit resampling keeps its coefficients in fixed point with 22 fraction bits.
_PRECISION_BITS = 22


def _bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def pil_bicubic_matrix(in_size, out_size):
    """The (out_size, in_size) matrix of PIL's bicubic resampling along one axis.

    Row ``i`` holds the weights of the input pixels that make output pixel
    ``i``, rounded as PIL's 8-bit path rounds them.

    Parameters
    ----------
    in_size, out_size : int

    Returns
    -------
    matrix : ndarray of shape (out_size, in_size), float32

    Examples
    --------
    >>> m = pil_bicubic_matrix(4, 8)
    >>> m.shape, bool(np.allclose(m.sum(axis=1), 1.0, atol=1e-6))
    ((8, 4), True)
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    # PIL multiplies by the inverse scale and sums the taps in order: the same
    # floating-point steps give the same coefficients after rounding.
    inverse = 1.0 / filter_scale
    for out in range(out_size):
        center = (out + 0.5) * scale
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) * inverse) for x in range(start, stop)]
        total = 0.0
        for tap in taps:
            total += tap
        taps = np.array(taps)
        if total != 0.0:
            taps = taps / total
        # PIL rounds each coefficient half away from zero onto its fixed-point grid.
        grid = taps * 2**_PRECISION_BITS
        fixed = np.where(taps < 0, np.ceil(grid - 0.5), np.floor(grid + 0.5))
        matrix[out, start:stop] = fixed / 2**_PRECISION_BITS
    return matrix.astype(np.float32)


@lru_cache(maxsize=64)
def _band(in_size, out_size):
    """The nonzero band of :func:`pil_bicubic_matrix`: input indices and integer weights.

    Returns ``(index, weight)``, both int64 tensors of shape (out_size, taps):
    output pixel ``i`` is ``sum(weight[i] * pixel[index[i]])`` in units of
    ``2 ** -22``; padding taps have weight 0.
    """
    matrix = pil_bicubic_matrix(in_size, out_size).astype(np.float64) * 2**_PRECISION_BITS
    nonzero = matrix != 0
    first = nonzero.argmax(axis=1)
    last = in_size - 1 - nonzero[:, ::-1].argmax(axis=1)
    span = first[:, None] + np.arange(int((last - first).max()) + 1)
    index = span.clip(max=in_size - 1)
    weight = np.where(span <= last[:, None], np.take_along_axis(matrix, index, axis=1), 0.0)
    return torch.from_numpy(index), torch.from_numpy(weight.astype(np.int64))


def _resize_last_axis(pixels, out_size):
    index, weight = _band(pixels.shape[-1], out_size)
    # PIL's fixed-point sum: half a unit added, then an arithmetic shift (a floor).
    total = (pixels[..., index] * weight).sum(dim=-1) + (1 << (_PRECISION_BITS - 1))
    return torch.clamp(total >> _PRECISION_BITS, 0, 255)


def resize_uint8(images, out_size):
    """uint8 images (..., 3, H, W) resized to ``out_size`` as :class:`ResizeNormalize` resizes them.

    The same fixed-point arithmetic in integers, over the band of nonzero
    coefficients only: cheap enough for the loader's worker processes, and
    equal, pixel for pixel, to the resize inside the model's graph.

    Parameters
    ----------
    images : uint8 tensor of shape (..., 3, H, W)
    out_size : (int, int)
        Output height and width.

    Returns
    -------
    resized : uint8 tensor of shape (..., 3, out_size[0], out_size[1])

    Examples
    --------
    >>> import torch
    >>> images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    >>> module = ResizeNormalize((5, 7), (9, 4), scale=[1.0] * 3, shift=[0.0] * 3)
    >>> bool((resize_uint8(images, (9, 4)).float() == module(images)).all())
    True
    """
    out_h, out_w = out_size
    x = images.to(torch.int64)
    if x.shape[-1] != out_w:
        x = _resize_last_axis(x, out_w)
    if x.shape[-2] != out_h:
        x = _resize_last_axis(x.transpose(-1, -2), out_h).transpose(-1, -2)
    return x.to(torch.uint8)


class ResizeNormalize(nn.Module):
    """uint8 images (n, 3, H, W) to float (n, 3, h, w): PIL-exact bicubic resize, then affine.

    The output is ``resized * scale + shift`` per channel, on the 0..255 scale
    of the resized pixels.

    Parameters
    ----------
    in_size, out_size : (int, int)
        Input and output height and width.
    scale, shift : sequence of 3 floats
        Per-channel affine map of the resized pixel values.

    Examples
    --------
    >>> import torch
    >>> images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    >>> out = ResizeNormalize((4, 4), (8, 8), scale=[1 / 255] * 3, shift=[0.0] * 3)(images)
    >>> out.shape, round(float(out.max()), 4)
    (torch.Size([2, 3, 8, 8]), 0.7843)
    """

    def __init__(self, in_size, out_size, scale, shift):
        super().__init__()
        (in_h, in_w), (out_h, out_w) = in_size, out_size
        # A pass that keeps its size is skipped, as PIL skips it.
        self.resize_rows, self.resize_cols = in_h != out_h, in_w != out_w
        # float64: exact sums (see the module docstring), the same on every engine and device.
        rows = pil_bicubic_matrix(in_h, out_h).astype(np.float64)
        cols_t = pil_bicubic_matrix(in_w, out_w).T.astype(np.float64)
        self.register_buffer("rows", torch.from_numpy(rows))
        self.register_buffer("cols_t", torch.from_numpy(cols_t.copy()))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images):
        x = images.double()
        if self.resize_cols:
            x = torch.clamp(torch.floor(torch.matmul(x, self.cols_t) + 0.5), 0.0, 255.0)
        if self.resize_rows:
            x = torch.clamp(torch.floor(torch.matmul(self.rows, x) + 0.5), 0.0, 255.0)
        return x.float() * self.scale + self.shift
