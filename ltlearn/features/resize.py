"""PIL's bicubic resize of 8-bit images, as two matrix products on batches of tensors.

Extraction used to resize every image with PIL in the loader's worker
processes and ship float32 arrays of 3 x 224 x 224 to the main process: on a
2-core machine that competed with the inference engine for the cores, and on a
GPU the workers could not keep up. Here the workers only decode, ship the
small uint8 image, and the resize runs on the batch where the model runs.

The result matches ``Image.resize(size, Image.Resampling.BICUBIC)`` on RGB
images: the same separable kernel (``a = -0.5``, support 2, widened by the
scale when shrinking), the same coefficients rounded to 22 fractional bits
as PIL's 8-bit path rounds them, a horizontal pass first, and rounding and
clipping to 0..255 after each pass, as PIL stores its intermediate image in
8 bits. Sums run in float32, so a pixel whose exact value lies within about
1e-5 of a rounding boundary can come out one level off (measured: a handful
of pixels per million).
"""

from functools import lru_cache

import numpy as np
import torch
from torch import nn

__all__ = ["ResizeNormalize", "pil_bicubic_matrix"]

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
    for out in range(out_size):
        center = (out + 0.5) * scale
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = np.array([_bicubic((x - center + 0.5) / filter_scale) for x in range(start, stop)])
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        # PIL rounds each coefficient half away from zero to its fixed-point grid.
        grid = taps * 2**_PRECISION_BITS
        fixed = np.where(taps < 0, np.ceil(grid - 0.5), np.floor(grid + 0.5))
        matrix[out, start:stop] = fixed / 2**_PRECISION_BITS
    return matrix.astype(np.float32)


class ResizeNormalize(nn.Module):
    """uint8 images (n, 3, H, W) -> float (n, 3, size, size): bicubic resize, then ``x * scale + shift``.

    Parameters
    ----------
    size : (int, int)
        Output height and width.
    scale, shift : sequence of 3 floats
        Per-channel affine map of the resized 0..255 pixel values.

    Examples
    --------
    >>> import torch
    >>> images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    >>> out = ResizeNormalize((8, 8), scale=[1 / 255] * 3, shift=[0.0] * 3)(images)
    >>> out.shape, round(float(out.max()), 4)
    (torch.Size([2, 3, 8, 8]), 0.7843)
    """

    def __init__(self, size, scale, shift):
        super().__init__()
        self.size = tuple(size)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images):
        height, width = images.shape[-2:]
        rows = torch.from_numpy(pil_bicubic_matrix(height, self.size[0])).to(images.device)
        cols = torch.from_numpy(pil_bicubic_matrix(width, self.size[1])).to(images.device)
        x = images.float()
        if width != self.size[1]:
            x = (x @ cols.T).add_(0.5).floor_().clamp_(0.0, 255.0)
        if height != self.size[0]:
            x = (rows @ x).add_(0.5).floor_().clamp_(0.0, 255.0)
        return x * self.scale + self.shift
