"""Torch modules that ltlearn's estimators train on frozen features.

A fitted estimator holds ``module_ = NormalizedHead(normaliser, head)``: the
normaliser is fitted once from the training features (it has no trainable
parameters), and the head maps normalised features to one logit per class.
Parameters are initialised from an explicit :class:`torch.Generator` so that
``random_state`` alone decides a fit, whatever torch's global seed is.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "CosineHead",
    "GroupedL2Normalizer",
    "L2Normalizer",
    "MLPHead",
    "NormalizedHead",
    "Standardizer",
    "init_linear",
    "make_head",
    "make_normalizer",
]

HEADS = ("linear", "cosine", "mlp")
NORMALIZERS = ("l2", "standard")


def init_linear(layer, generator):
    """Re-draw an ``nn.Linear``'s parameters as torch does by default, from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class L2Normalizer(nn.Module):
    """Scale each row to L2 norm ``sqrt(n_features)``.

    The factor ``sqrt(n_features)`` gives features a root-mean-square of one,
    the scale at which a fixed learning rate and weight decay suit every
    embedding width (512-d CLIP and 1280-d EfficientNet alike).

    Parameters
    ----------
    n_features : int
        Width of the input rows.

    Examples
    --------
    >>> import torch
    >>> L2Normalizer(4)(torch.tensor([[0.0, 3.0, 0.0, 4.0]]))
    tensor([[0.0000, 1.2000, 0.0000, 1.6000]])
    """

    def __init__(self, n_features):
        super().__init__()
        self.scale = math.sqrt(n_features)

    def prepare(self, x):
        """``(x, factor)``: the rows, extreme ones rescaled, and each row's multiplier.

        Row norms are computed in float32, whose squares overflow beyond about
        1e19 and underflow below 1e-19: a row of 1e20 or 1e-30 times a feature
        vector would come out unnormalised. Rows whose norm falls outside
        (1e-12, 1e18) are divided by their largest magnitude first (the
        normalisation ignores a row's scale), which costs a copy only then.
        """
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        extreme = ((norm < 1e-12) | (norm > 1e18)).squeeze(1)
        if extreme.any():
            rows = extreme.nonzero().squeeze(1)
            part = x.index_select(0, rows)
            peak = part.abs().amax(dim=1, keepdim=True)
            part = part / torch.where(peak > 0, peak, torch.ones_like(peak))
            x = x.index_copy(0, rows, part)
            norm = norm.index_copy(0, rows, torch.linalg.vector_norm(part, dim=1, keepdim=True))
        # All-zero rows stay zero.
        return x, self.scale / norm.clamp_min(1e-12)

    def forward(self, x):
        # One multiply by a per-row factor: F.normalize(x) * scale would make two
        # full passes over x, which dominates prediction time on wide embeddings.
        x, factor = self.prepare(x)
        return x * factor


class GroupedL2Normalizer(nn.Module):
    """:class:`L2Normalizer` applied to each group of columns on its own.

    For rows that hold several layers side by side (multi-depth features):
    one normalisation over the whole row would let the widest or largest
    layer set the scale of all of them.

    Parameters
    ----------
    widths : sequence of int
        Widths of the column groups, in order.

    Examples
    --------
    >>> import torch
    >>> GroupedL2Normalizer([2, 2])(torch.tensor([[3.0, 4.0, 0.0, 10.0]]))
    tensor([[0.8485, 1.1314, 0.0000, 1.4142]])
    """

    def __init__(self, widths):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.parts = nn.ModuleList(L2Normalizer(w) for w in self.widths)

    def forward(self, x):
        pieces = torch.split(x, self.widths, dim=1)
        return torch.cat([part(piece) for part, piece in zip(self.parts, pieces, strict=True)], 1)


class Standardizer(nn.Module):
    """Subtract the training mean and divide by the training standard deviation.

    Parameters
    ----------
    mean, std : torch.Tensor of shape (n_features,)
        Column statistics; zero deviations are replaced by one.

    Examples
    --------
    >>> import torch
    >>> Standardizer.from_data(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))(torch.tensor([[2.0, 1.0]]))
    tensor([[1., 0.]])
    """

    def __init__(self, mean, std):
        super().__init__()
        # Constant features would divide by zero; like StandardScaler, leave them unscaled.
        mean, std = mean.double(), std.double()
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        # Stored as x * inv_std + shift, a single fused pass (addcmul). Computed
        # in float64: a mean or deviation near float32's limit would round to inf.
        self.register_buffer("inv_std", (1.0 / std).float())
        self.register_buffer("shift", (-mean / std).float())

    @classmethod
    def from_data(cls, X):
        """Fit mean and standard deviation on a 2-D float tensor, or in one pass over blocks.

        ``X`` may also be anything whose ``blocks()`` yields ``(rows, array)``
        pairs (a :class:`~ltlearn.features.FeatureSplit`): the statistics are
        then accumulated block by block, in float64.
        """
        if isinstance(X, torch.Tensor):
            X64 = X.double()
            return cls(X64.mean(0), X64.std(0, unbiased=False))
        count, mean, m2 = 0, 0.0, 0.0
        for _, block in X.blocks():
            block = torch.from_numpy(block).double()
            n, block_mean = len(block), block.mean(0)
            # Chan et al.'s pairwise update: no catastrophic cancellation of E[x^2] - E[x]^2.
            delta = block_mean - mean
            m2 = m2 + ((block - block_mean) ** 2).sum(0) + delta**2 * count * n / (count + n)
            mean = mean + delta * n / (count + n)
            count += n
        return cls(mean, (m2 / count).sqrt())

    def forward(self, x):
        return torch.addcmul(self.shift, x, self.inv_std)


class CosineHead(nn.Module):
    """Cosine-similarity classifier: ``scale * cos(x, w_c)`` for each class ``c``.

    Normalising both features and class weights removes the norm bias that head
    classes acquire on long-tailed data (Gidaris & Komodakis, CVPR 2018).
    """

    def __init__(self, n_features, n_classes, scale, generator):
        super().__init__()
        self.scale = scale
        weight = torch.randn(n_classes, n_features, generator=generator) / math.sqrt(n_features)
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class MLPHead(nn.Sequential):
    """One hidden ReLU layer: ``Linear -> ReLU -> Linear``.

    Parameters
    ----------
    n_features, n_classes, hidden_size : int
    generator : torch.Generator
        Source of the random initial weights.

    Examples
    --------
    >>> import torch
    >>> MLPHead(3, 2, 8, torch.Generator().manual_seed(0))(torch.ones(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, n_features, n_classes, hidden_size, generator):
        super().__init__(
            nn.Linear(n_features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, n_classes)
        )
        for layer in (self[0], self[2]):
            init_linear(layer, generator)


class NormalizedHead(nn.Module):
    """A fitted normaliser followed by a head: the module a fitted estimator predicts with.

    Parameters
    ----------
    normalizer : torch.nn.Module
        From :func:`make_normalizer`.
    head : torch.nn.Module
        From :func:`make_head`.

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(6, 4)
    >>> module = NormalizedHead(make_normalizer("l2", X), make_head("linear", 4, 3))
    >>> module(X).shape
    torch.Size([6, 3])
    """

    def __init__(self, normalizer, head):
        super().__init__()
        self.normalizer = normalizer
        self.head = head

    def forward(self, x, *args):
        """Logits of raw features ``x``; ``args`` go to the head after the features."""
        if isinstance(self.normalizer, L2Normalizer) and isinstance(self.head, nn.Linear):
            # A row scale commutes with a linear map: scaling the (n, n_classes)
            # logits instead of the (n, n_features) input saves a full write of
            # x and doubles prediction throughput.
            x, factor = self.normalizer.prepare(x)
            logits = F.linear(x, self.head.weight)
            return torch.addcmul(self.head.bias, logits, factor)
        return self.head(self.normalizer(x), *args)


def make_head(
    kind,
    n_features,
    n_classes,
    *,
    hidden_size=512,
    cosine_scale=16.0,
    bias_init=None,
    generator=None,
):
    """Build a classification head.

    Parameters
    ----------
    kind : {"linear", "cosine", "mlp"}
        ``"linear"`` is a zero-initialised affine map (the problem is convex, so
        no random start is needed); ``"cosine"`` a :class:`CosineHead`;
        ``"mlp"`` an :class:`MLPHead`.
    n_features, n_classes : int
        Input width and number of logits.
    hidden_size : int, default=512
        Width of the hidden layer of ``"mlp"``.
    cosine_scale : float, default=16.0
        Logit scale of ``"cosine"``.
    bias_init : torch.Tensor of shape (n_classes,), optional
        Initial output bias of ``"linear"`` and ``"mlp"`` (``"cosine"`` has
        none). Starting at the log-prior the loss expects saves the many small
        steps that would otherwise be spent learning class frequencies.
    generator : torch.Generator, optional
        Source of the random initial weights.

    Returns
    -------
    head : torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> head = make_head("linear", 4, 3)
    >>> head(torch.ones(2, 4)).shape
    torch.Size([2, 3])
    """
    if kind == "cosine":
        return CosineHead(n_features, n_classes, cosine_scale, generator)
    if kind == "linear":
        head = output = nn.Linear(n_features, n_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif kind == "mlp":
        head = MLPHead(n_features, n_classes, hidden_size, generator)
        output = head[2]
    else:
        raise ValueError(f"Unknown head {kind!r}; expected one of {HEADS}.")
    if bias_init is not None:
        with torch.no_grad():
            output.bias.copy_(bias_init)
    return head


def make_normalizer(kind, X, widths=None):
    """Build the input normaliser fitted on training features ``X`` (a float tensor).

    Parameters
    ----------
    kind : {"l2", "standard"} or None
        ``"l2"``: :class:`L2Normalizer`; ``"standard"``: :class:`Standardizer`
        fitted on ``X``; None: identity.
    X : torch.Tensor of shape (n_samples, n_features)
        Training features.
    widths : sequence of int, default=None
        Column groups (several layers side by side): ``"l2"`` then normalises
        each group on its own (:class:`GroupedL2Normalizer`).

    Returns
    -------
    normalizer : torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> norm = make_normalizer("l2", torch.ones(2, 4))
    >>> norm(torch.full((1, 4), 3.0))
    tensor([[1., 1., 1., 1.]])
    """
    if kind is None:
        return nn.Identity()
    if kind == "l2":
        if widths is not None and len(widths) > 1:
            return GroupedL2Normalizer(widths)
        return L2Normalizer(X.shape[1])
    if kind == "standard":
        return Standardizer.from_data(X)
    raise ValueError(f"Unknown normalize={kind!r}; expected one of {NORMALIZERS} or None.")
