"""Training losses for long-tailed classification.

Every loss takes ``(logits, target, sample_weight=None)`` and returns a scalar;
class priors live in buffers so that a loss moves to the training device with
``.to(device)``.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LogitAdjustedLoss"]


def weighted_mean(values, sample_weight):
    """Mean of per-sample ``values``, weighted when ``sample_weight`` is given."""
    if sample_weight is None:
        return values.mean()
    return (values * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + tau * log(prior)``.

    With ``tau=1`` this is the Balanced Softmax loss of Ren et al., "Balanced
    Meta-Softmax for Long-Tailed Visual Recognition" (NeurIPS 2020); for general
    ``tau`` it is the logit-adjusted loss of Menon et al., "Long-tail learning
    via logit adjustment" (ICLR 2021). ``tau=0`` is plain cross-entropy. The
    adjustment lets the raw logits model the class-balanced posterior, so the
    un-adjusted logits are the right scores for a uniform test distribution.

    Parameters
    ----------
    class_prior : torch.Tensor of shape (n_classes,)
        Training class frequencies, positive, summing to one.
    tau : float, default=1.0
        Strength of the adjustment.

    Examples
    --------
    >>> import torch
    >>> loss = LogitAdjustedLoss(torch.tensor([0.9, 0.1]))
    >>> round(loss(torch.zeros(1, 2), torch.tensor([1])).item(), 4)  # -log(0.1)
    2.3026
    """

    def __init__(self, class_prior, tau=1.0):
        super().__init__()
        self.register_buffer("adjustment", tau * torch.log(class_prior))

    def forward(self, logits, target, sample_weight=None):
        losses = F.cross_entropy(logits + self.adjustment, target, reduction="none")
        return weighted_mean(losses, sample_weight)
