"""Training losses for long-tailed classification.

Every loss takes ``(logits, target, sample_weight=None)`` and returns a scalar;
class priors live in buffers so that a loss moves to the training device with
``.to(device)``.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DiverseExpertLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "PRLLoss",
    "RIDELoss",
    "SHIKELoss",
    "effective_number_weights",
    "inverse_prior",
]


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


def effective_number_weights(class_counts, beta=0.9999):
    """Class weights ``(1 - beta) / (1 - beta ** n_c)``, scaled to average one.

    The "effective number of samples" weights of Cui et al., "Class-Balanced
    Loss Based on Effective Number of Samples" (CVPR 2019), which LDAM's
    deferred re-weighting uses.

    Parameters
    ----------
    class_counts : array-like of shape (n_classes,)
    beta : float, default=0.9999

    Returns
    -------
    weights : torch.Tensor of shape (n_classes,)

    Examples
    --------
    >>> effective_number_weights([100, 1], beta=0.5)  # (0.5 / 1.0, 0.5 / 0.5), mean one
    tensor([0.6667, 1.3333])
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - beta**counts)
    return (weights * len(weights) / weights.sum()).float()


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss with deferred re-weighting (LDAM-DRW).

    Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
    Margin Loss" (NeurIPS 2019), equations 10-11 and Algorithm 1: the target
    class's logit is lowered by ``scale * m_y`` with margins ``m_c ∝ n_c **
    (-1/4)`` (the largest ``max_margin``), on logits that are ``scale`` times a
    cosine similarity (a cosine head); after ``drw_start`` of the training
    steps the samples are re-weighted by :func:`effective_number_weights`.

    Parameters
    ----------
    class_counts : array-like of shape (n_classes,)
        Training samples per class.
    max_margin : float, default=0.5
        Margin of the rarest class, in cosine units.
    scale : float, default=30.0
        The factor the logits carry (the cosine head's scale).
    drw_start : float, default=0.8
        Fraction of the training steps after which the class re-weighting
        starts; 1 or more never re-weights.
    n_steps : int, default=None
        Optimizer steps of the whole fit, counted by this loss's calls in
        training mode, so it must be called once per step (a loss over
        several experts passes all their logits in one call, as
        :class:`RIDELoss` does); None never re-weights.
    beta : float, default=0.9999
        Of the effective-number weights.

    Examples
    --------
    >>> import torch
    >>> loss = LDAMLoss([100, 1], max_margin=0.5, scale=1.0)
    >>> # Class 1 (the rarer) gets the full margin: CE of [0, -0.5] for target 1.
    >>> round(loss(torch.zeros(1, 2), torch.tensor([1])).item(), 4)
    0.9741
    """

    def __init__(
        self, class_counts, *, max_margin=0.5, scale=30.0, drw_start=0.8, n_steps=None, beta=0.9999
    ):
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
        margins = counts ** (-0.25)
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("class_weights", effective_number_weights(counts, beta))
        self.scale = scale
        self.reweight_from = None if n_steps is None else int(drw_start * n_steps)
        self.steps = 0

    def forward(self, logits, target, sample_weight=None):
        adjusted = logits - self.scale * self.margins * F.one_hot(target, logits.shape[-1])
        losses = F.cross_entropy(adjusted, target, reduction="none")
        if self.training:
            self.steps += 1
        if self.reweight_from is not None and self.steps > self.reweight_from:
            weight = self.class_weights[target]
            sample_weight = weight if sample_weight is None else weight * sample_weight
        return weighted_mean(losses, sample_weight)


class RIDELoss(nn.Module):
    """Each expert's long-tail loss plus RIDE's distribution-aware diversity loss.

    Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware
    Experts" (ICLR 2021), section 3.2 and equation 4: for experts ``i`` with
    logits ``z_i`` and their mean ``z`` (held fixed),

        L = sum_i [ base(z_i, y) + diversity * T^2 * KL(softmax(z / T) || softmax(z_i / T)) ]

    A negative ``diversity`` makes the experts diverge from their mean. The
    temperature ``T`` is ``temperature`` until ``drw_start`` of the training
    steps, and then per class, ``T_c = temperature * w_c`` with ``w_c ∝ C p_c r
    + 1 - r`` (``r = reweight_factor``, largest one), so that the experts are
    pushed apart less on tail classes: the reference code switches to the
    per-class temperature at the epoch where LDAM's re-weighting starts.

    With ``diversity=0`` the reference code trains ``base(z, y)``, the base
    loss of the mean logits, in each expert's term; here each expert keeps
    its own loss. On CIFAR-10-LT embeddings (IR 100, seeds 0 and 1, both
    of :class:`ltlearn.RIDEClassifier`'s losses) the reference's form moved
    the accuracy with every expert by -0.2 to +0.5 point (+0.2 on average)
    and that of the routed prediction, the default, by -1.9 to +0.4 (-0.7
    on average): an expert trained only inside the mean is no classifier on
    its own, so a partial mean is a poor place for the router to stop.

    The base loss is called once per call of this loss, on every expert's
    logits at once (rows stacked), so that a base loss that counts its calls
    as optimizer steps (:class:`LDAMLoss`) counts each step once.

    Parameters
    ----------
    base : torch.nn.Module
        The per-expert long-tail loss, called as ``base(logits, target,
        sample_weight)`` with a weighted mean over the rows.
    class_prior : torch.Tensor of shape (n_classes,)
        Training class frequencies.
    diversity : float, default=-0.2
        Weight of the diversity term. -0.2 is the reference code's default
        and its ImageNet-LT and iNaturalist setting; its CIFAR setting is -0.45.
    temperature : float, default=1.0
    reweight_factor : float, default=0.05
    drw_start : float, default=0.8
        Fraction of the training steps after which the temperature becomes
        per class.
    n_steps : int, default=None
        Optimizer steps of the whole fit, counted by this loss's calls in
        training mode; None keeps one temperature throughout.

    Examples
    --------
    >>> import torch
    >>> base = LogitAdjustedLoss(torch.tensor([0.5, 0.5]), tau=0.0)
    >>> loss = RIDELoss(base, torch.tensor([0.5, 0.5]))
    >>> same = torch.zeros(3, 4, 2)  # identical experts: no divergence, 3 x log 2
    >>> round(loss(same, torch.tensor([0, 1, 0, 1])).item(), 4)
    2.0794
    """

    def __init__(
        self,
        base,
        class_prior,
        *,
        diversity=-0.2,
        temperature=1.0,
        reweight_factor=0.05,
        drw_start=0.8,
        n_steps=None,
    ):
        super().__init__()
        self.base = base
        self.diversity = diversity
        self.temperature = temperature
        n_classes = len(class_prior)
        weights = n_classes * class_prior * reweight_factor + 1.0 - reweight_factor
        self.register_buffer("class_temperatures", temperature * weights / weights.max())
        self.reweight_from = None if n_steps is None else int(drw_start * n_steps)
        self.steps = 0

    def forward(self, logits, target, sample_weight=None):
        if self.training:
            self.steps += 1
        n_experts = len(logits)
        # One call over the stacked experts: its weighted mean is the experts' mean loss.
        weights = None if sample_weight is None else sample_weight.repeat(n_experts)
        total = n_experts * self.base(logits.flatten(0, 1), target.repeat(n_experts), weights)
        if not self.diversity:
            return total
        t = self.temperature
        if self.reweight_from is not None and self.steps > self.reweight_from:
            t = self.class_temperatures
        log_mean = F.log_softmax(logits.mean(dim=0).detach() / t, dim=-1)
        t_mean = t.mean() if torch.is_tensor(t) else t
        for z in logits:
            kl = (log_mean.exp() * (log_mean - F.log_softmax(z / t, dim=-1))).sum(dim=-1)
            total = total + self.diversity * t_mean**2 * weighted_mean(kl, sample_weight)
        return total


class SHIKELoss(nn.Module):
    """SHIKE's training loss: each expert's base loss, mutual distillation, knowledge transfer.

    Jin, Li, Lu, Cheung & Wang, "Long-Tailed Visual Recognition via
    Self-Heterogeneous Integration with Knowledge Excavation" (CVPR 2023),
    section 3.3. For experts ``i`` with logits ``z_i`` (shape
    ``(n_experts, n, C)``):

    - mutual knowledge distillation: ``sum_{i != j} KL(softmax(z_j) ||
      softmax(z_i))``, each expert pulled toward each other one;
    - dynamic knowledge transfer on the non-target classes: the "grand
      teacher" takes, for each non-target class, the largest logit of any
      expert, except at the hardest negative (the non-target class with the
      largest mean logit), which gets the mean logit instead, so that the
      consensus hardest negative is suppressed; every expert's distribution
      over the non-target classes is pulled toward the teacher's
      (``KL(teacher || expert)``).

        L = sum_i base(z_i, y) + distillation * L_MKD + transfer * L_DKT

    Both kinds of targets (the other experts, the teacher) are held fixed
    in each step, as distillation targets are; the reference code lets
    gradients flow into them too. Its element-wise mean reductions amount to
    weights of ``1 / C`` and ``10 / C`` per sample (0.01 and 0.1 on
    CIFAR-100). The teacher's target class is masked out, as in the paper's
    equation 8; the reference code leaves the teacher's target logit at 0.
    That gives the teacher a target probability ``q`` which the masked
    student cannot match: the non-target distribution the student is pulled
    toward is the same, and the difference is an extra gradient ``transfer
    * q * t_j`` lowering each non-target logit ``j`` (``t_j``: the masked
    teacher's probability of class ``j``). ``q`` depends on where
    the logits sit relative to 0, which a softmax classifier leaves free
    (a head's biases can shift all logits at no cost), so the masked form
    is kept.

    Parameters
    ----------
    base : torch.nn.Module
        Per-expert loss, called as ``base(logits, target, sample_weight)``.
    distillation : float, default=0.01
    transfer : float, default=0.1

    Examples
    --------
    >>> import torch
    >>> loss = SHIKELoss(LogitAdjustedLoss(torch.tensor([0.5, 0.5]), tau=0.0))
    >>> same = torch.zeros(2, 3, 2)  # agreeing experts: only 2 x log 2 of cross-entropy
    >>> round(loss(same, torch.tensor([0, 1, 0])).item(), 4)
    1.3863
    """

    def __init__(self, base, *, distillation=0.01, transfer=0.1):
        super().__init__()
        self.base = base
        self.distillation = distillation
        self.transfer = transfer

    @staticmethod
    def teacher_logits(logits, target):
        """The grand teacher's non-target logits, the target masked out (a large negative)."""
        is_target = F.one_hot(target, logits.shape[-1]).bool()
        mean = logits.mean(dim=0)
        hardest = mean.masked_fill(is_target, float("-inf")).argmax(dim=-1)
        teacher = logits.max(dim=0).values
        rows = torch.arange(len(target), device=logits.device)
        teacher[rows, hardest] = mean[rows, hardest]
        return teacher.masked_fill(is_target, -1e9)

    def forward(self, logits, target, sample_weight=None):
        total = sum(self.base(z, target, sample_weight) for z in logits)
        n_experts = len(logits)
        if self.distillation and n_experts > 1:
            log_p = F.log_softmax(logits, dim=-1)
            fixed = log_p.detach()
            for i in range(n_experts):
                for j in range(n_experts):
                    if i != j:
                        kl = (fixed[j].exp() * (fixed[j] - log_p[i])).sum(dim=-1)
                        total = total + self.distillation * weighted_mean(kl, sample_weight)
        if self.transfer:
            is_target = F.one_hot(target, logits.shape[-1]).bool()
            teacher = F.log_softmax(self.teacher_logits(logits.detach(), target), dim=-1)
            for z in logits:
                student = F.log_softmax(z.masked_fill(is_target, -1e9), dim=-1)
                kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
                total = total + self.transfer * weighted_mean(kl, sample_weight)
        return total
