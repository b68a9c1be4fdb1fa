"""Tail feature synthesis by head-to-tail transfer.

A tail class with a few dozen examples pins down its mean but not the shape of
its spread: its sample covariance has rank below its example count. Head
classes nearby in feature space have the same backbone-induced variations
(pose, crop, colour) measured on thousands of examples. Following the
distribution-calibration idea of Yang, Liu and Xu, "Free Lunch for Few-shot
Learning: Distribution Calibration" (ICLR 2021), Section 3.2, which borrows the
statistics of the nearest base classes, and the head-to-tail transfer of Chen
and Su, "Transfer Knowledge from Head to Tail: Uncertainty Calibration under
Long-tailed Distribution" (CVPR 2023; :mod:`ltlearn.calibration` uses it for
calibration, here it serves training), a synthetic tail feature is the tail
class's mean plus the deviation of a random example of one of its nearest
well-populated classes from that class's mean, scaled so that the tail keeps
its own total variance:

    z_syn = mu_t + s * (z_h - mu_h),   s = sqrt(tr Sigma_t / tr Sigma_h).

The synthetic features thus have the donor's full covariance shape (s^2
Sigma_h), estimated on the donor's many examples, without forming a
covariance matrix: the cost is one gather per synthetic row at any width.
"""

import math

import numpy as np
import torch

#: Donor classes per tail class: the nearest class means, by Euclidean distance.
N_NEIGHBORS = 3


def synthesize_tail(Z, y, n_classes, fraction, generator, *, n_neighbors=N_NEIGHBORS):
    """Synthetic rows topping each small class up to ``fraction`` of the largest.

    Parameters
    ----------
    Z : torch.Tensor of shape (n_samples, n_features) or (n_samples, n_views, n_features)
        Normalised training features; with views, a synthetic row transfers
        every view of its donor row (the class means come from the first view,
        the plain image).
    y : torch.Tensor of shape (n_samples,)
        Class indices in ``range(n_classes)``.
    n_classes : int
    fraction : float in [0, 1]
        Classes with fewer than ``ceil(fraction * largest count)`` rows get
        synthetic rows up to that count; the classes at or above it are the
        donors.
    generator : torch.Generator
        Draws donors and donor rows.
    n_neighbors : int, default=N_NEIGHBORS

    Returns
    -------
    Z_synthetic : torch.Tensor of shape (n_synthetic, ...) like ``Z``
    y_synthetic : torch.Tensor of shape (n_synthetic,)

    Examples
    --------
    >>> import torch
    >>> from ltlearn.synthesis import synthesize_tail
    >>> Z = torch.cat([torch.randn(90, 4), torch.randn(10, 4) + 5])
    >>> y = torch.tensor([0] * 90 + [1] * 10)
    >>> Z_new, y_new = synthesize_tail(Z, y, 2, 0.5, torch.Generator().manual_seed(0))
    >>> Z_new.shape, y_new.unique().tolist()  # class 1 topped up to 45 rows
    (torch.Size([35, 4]), [1])
    """
    counts = torch.bincount(y, minlength=n_classes)
    target = math.ceil(fraction * int(counts.max()))
    short = torch.nonzero((counts > 0) & (counts < target)).flatten().tolist()
    empty = (Z[:0], y[:0])
    if not short:
        return empty
    plain = Z[:, 0] if Z.ndim == 3 else Z
    means = torch.zeros(n_classes, plain.shape[1], dtype=plain.dtype)
    means.index_add_(0, y, plain)
    means /= counts.clamp(min=1).unsqueeze(1).to(plain.dtype)
    # Total variance (trace of the covariance) of each class, unbiased.
    spread = torch.zeros(n_classes, dtype=plain.dtype)
    spread.index_add_(0, y, ((plain - means[y]) ** 2).sum(dim=1))
    spread /= (counts - 1).clamp(min=1).to(plain.dtype)
    donors = torch.nonzero(counts >= target).flatten()
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    parts, labels = [], []
    for c in short:
        need = target - int(counts[c])
        distance = torch.cdist(means[c : c + 1], means[donors])[0]
        nearest = donors[torch.argsort(distance)[:n_neighbors]]
        h = nearest[torch.randint(len(nearest), (need,), generator=generator)]
        offset = (torch.rand(need, generator=generator) * counts[h]).long()
        rows = order[starts[h] + offset]
        # A class of one row has no spread to keep: it takes its donors' as is.
        scale = torch.ones(need, dtype=plain.dtype)
        if counts[c] > 1:
            scale = torch.sqrt(spread[c] / spread[h].clamp(min=np.finfo(np.float32).tiny))
        shape = (need,) + (1,) * (Z.ndim - 1)
        deviation = Z[rows] - means[h].unsqueeze(1) if Z.ndim == 3 else Z[rows] - means[h]
        parts.append(means[c] + scale.reshape(shape) * deviation)
        labels.append(torch.full((need,), c, dtype=y.dtype))
    return torch.cat(parts), torch.cat(labels)
