"""Training losses for long-tailed classification.

Every loss takes ``(logits, target, sample_weight=None)`` and returns a scalar;
class priors live in buffers so that a loss moves to the training device with
``.to(device)``.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DiverseExpertLoss", "LogitAdjustedLoss", "PRLLoss", "inverse_prior"]


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


def inverse_prior(class_prior):
    """The class frequencies handed out in reversed order of size.

    The most frequent class receives the frequency of the rarest one and so on:
    the "inversely long-tailed" distribution of SADE (Zhang et al.,
    "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed
    Recognition", NeurIPS 2022). Ties keep their input order.

    Parameters
    ----------
    class_prior : torch.Tensor of shape (n_classes,)

    Returns
    -------
    inverse : torch.Tensor of shape (n_classes,)

    Examples
    --------
    >>> import torch
    >>> inverse_prior(torch.tensor([0.2, 0.7, 0.1]))
    tensor([0.2000, 0.1000, 0.7000])
    """
    order = torch.argsort(class_prior, descending=True, stable=True)
    inverse = torch.empty_like(class_prior)
    inverse[order] = class_prior[order.flip(0)]
    return inverse


class DiverseExpertLoss(nn.Module):
    """The three distribution-aware expert losses of SADE, summed.

    Zhang et al., "Self-Supervised Aggregation of Diverse Experts for
    Test-Agnostic Long-Tailed Recognition" (NeurIPS 2022), section 4.1. Expert
    ``i`` is trained with cross-entropy on ``logits_i + adjustment_i``:

    - forward expert: no adjustment (the long-tailed training prior);
    - uniform expert: ``log(prior)`` (Balanced Softmax);
    - backward expert: ``log(prior) - lam * log(inverse_prior(prior))``
      (the inverse softmax loss).

    So the raw logits of the three experts model the training distribution, a
    balanced one and an inversely long-tailed one.

    Parameters
    ----------
    class_prior : torch.Tensor of shape (n_classes,)
        Training class frequencies, positive, summing to one.
    lam : float, default=2.0
        Strength of the inverse prior in the backward expert.

    Examples
    --------
    >>> import torch
    >>> loss = DiverseExpertLoss(torch.tensor([0.5, 0.5]))
    >>> # Zero logits and a balanced prior: every expert's loss is log 2.
    >>> round(loss(torch.zeros(3, 1, 2), torch.tensor([0])).item(), 4)
    2.0794
    """

    def __init__(self, class_prior, lam=2.0):
        super().__init__()
        log_prior = torch.log(class_prior)
        self.register_buffer(
            "adjustments",
            torch.stack(
                [
                    torch.zeros_like(log_prior),
                    log_prior,
                    log_prior - lam * torch.log(inverse_prior(class_prior)),
                ]
            ),
        )

    def expert_losses(self, logits, target, sample_weight=None):
        """Loss of each expert, a tensor of shape (3,).

        ``logits`` has shape (3, n_samples, n_classes): one slice per expert.
        """
        adjusted = logits + self.adjustments[:, None, :]
        losses = F.cross_entropy(
            adjusted.flatten(0, 1), target.repeat(len(adjusted)), reduction="none"
        ).view(len(adjusted), -1)
        if sample_weight is None:
            return losses.mean(dim=1)
        return (losses * sample_weight).sum(dim=1) / sample_weight.sum().clamp_min(1e-12)

    def forward(self, logits, target, sample_weight=None):
        return self.expert_losses(logits, target, sample_weight).sum()


class PRLLoss(DiverseExpertLoss):
    """Three distribution-aware expert losses, combined by smooth Tchebycheff scalarisation.

    Implements the training objective of Zhao et al., "Breaking Long-Tailed
    Learning Bottlenecks: A Controllable Paradigm with Hypernetwork-Generated
    Diverse Experts" (NeurIPS 2024). The expert losses ``L_i`` are those of
    :class:`DiverseExpertLoss` (forward, uniform and backward experts), combined
    as ``sum_i L_i + mu * log(sum_i exp(L_i / mu))``, the smooth Tchebycheff
    scalarisation of Lin et al., "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization" (ICML 2024): the second term pulls hardest on
    the worst expert, which keeps every expert trained.

    Parameters
    ----------
    class_prior : torch.Tensor of shape (n_classes,)
        Training class frequencies, positive, summing to one.
    lam : float, default=2.0
        Strength of the inverse prior in the backward expert.
    mu : float, default=0.3
        Smoothing of the Tchebycheff term; small values approach the maximum.

    Examples
    --------
    >>> import torch
    >>> loss = PRLLoss(torch.tensor([0.5, 0.5]), mu=1.0)
    >>> # Zero logits: every expert's loss is log 2, so 3 log 2 + log(3 * 2).
    >>> round(loss(torch.zeros(3, 1, 2), torch.tensor([0])).item(), 4)
    3.8712
    """

    def __init__(self, class_prior, lam=2.0, mu=0.3):
        super().__init__(class_prior, lam=lam)
        self.mu = mu

    def forward(self, logits, target, sample_weight=None):
        losses = self.expert_losses(logits, target, sample_weight)
        return losses.sum() + self.mu * torch.logsumexp(losses / self.mu, dim=0)
