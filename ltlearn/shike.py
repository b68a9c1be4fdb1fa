"""SHIKEClassifier: experts that fuse a shallower layer with the deepest one, and teach each other.

Jin, Li, Lu, Cheung & Wang, "Long-Tailed Visual Recognition via
Self-Heterogeneous Integration with Knowledge Excavation" (CVPR 2023).

- Depth-wise knowledge fusion (section 3.2): expert ``i`` reads the deepest
  features ``d`` through its own branch and one shallower layer ``s_i`` (the
  experts take the shallower layers in turn), and multiplies the two
  element-wise: ``h_i = D_i(d) * M_i(s_i)``, then a linear head. Here
  ``D_i(d) = d + B_i relu(A_i d)`` (a residual adapter, standing in for the
  expert's own last network stage) and ``M_i(s) = 1 + W_i s`` (the alignment of
  the shallow layer to the deep width, zero at the start so that every expert
  starts from the deep features).
- Dynamic knowledge transfer and mutual distillation (section 3.3):
  :class:`ltlearn.losses.SHIKELoss`, on plain cross-entropy as in the paper.
- Decoupled re-balancing (the paper's last epochs): the experts' features are
  frozen and new heads trained with Balanced Softmax; predictions average
  their logits. The reference code gives it 20 of 200 epochs; here it runs
  as many epochs as the first stage. It fits linear heads from a random
  start on fixed features, the problem a :class:`ltlearn.BalancedSoftmaxClassifier`
  fit solves, and that needs the same schedule (at least 250 optimizer steps
  with ``"auto"`` epochs); the reference's 20 epochs are about 1,700 steps
  on CIFAR-100-LT, more than this whole first stage.

What changed on frozen features: the layers are the backbone's pooled
outputs at several depths, stored side by side by
``extract(..., layers=[...])``; the estimator is told their widths
(``feature_groups``). The paper fuses feature maps before pooling; pooled
vectors are all a frozen backbone's file keeps, so the fusion acts on them.
"""

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ltlearn._base import TorchHeadClassifier
from ltlearn.heads import init_linear, make_normalizer
from ltlearn.losses import LogitAdjustedLoss, SHIKELoss

__all__ = ["SHIKEClassifier", "SHIKENetwork"]

#: Most weights the experts' alignment layers (shallow width x deep width each)
#: may hold: 2**25 is 134 MB in float32, about 540 MB with gradients and Adam's state.
MAX_FUSION_PARAMETERS = 2**25


def _expert_heads(n_experts, n_classes, n_features, generator):
    """One linear head per expert: weights (n_experts, C, d), flat biases."""
    bound = 1.0 / math.sqrt(n_features)
    weight = torch.empty(n_experts, n_classes, n_features).uniform_(
        -bound, bound, generator=generator
    )
    # Flat, so that the optimizer's rule "weight decay on matrices only" spares it.
    return nn.Parameter(weight), nn.Parameter(torch.zeros(n_experts * n_classes))


class SHIKENetwork(nn.Module):
    """Experts on multi-depth features: ``head_i(D_i(deep) * M_i(shallow_i))``.

    Parameters
    ----------
    widths : sequence of int
        Widths of the column groups, the deepest last. With one group, each
        expert's "shallow" input is the deep features themselves.
    n_classes, n_experts : int
    adapter_size : int or None
        Hidden width of each expert's residual adapter on the deep features;
        None for none.
    generator : torch.Generator

    Examples
    --------
    >>> import torch
    >>> net = SHIKENetwork([3, 5], 4, 2, adapter_size=8,
    ...                    generator=torch.Generator().manual_seed(0))
    >>> net(torch.randn(6, 8)).shape  # experts, rows, classes
    torch.Size([2, 6, 4])
    """

    def __init__(self, widths, n_classes, n_experts, *, adapter_size, generator):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.n_experts = n_experts
        deep = self.widths[-1]
        shallow = self.widths[:-1] or self.widths
        self.sources = [i % len(shallow) for i in range(n_experts)]
        self.align = nn.ModuleList()
        for i in range(n_experts):
            layer = nn.Linear(shallow[self.sources[i]], deep)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            self.align.append(layer)
        self.adapters = None
        if adapter_size is not None:
            self.adapters = nn.ModuleList()
            for _ in range(n_experts):
                adapter = nn.Sequential(
                    init_linear(nn.Linear(deep, adapter_size), generator),
                    nn.ReLU(),
                    nn.Linear(adapter_size, deep),
                )
                nn.init.zeros_(adapter[2].weight)
                nn.init.zeros_(adapter[2].bias)
                self.adapters.append(adapter)
        self.weight, self.bias = _expert_heads(n_experts, n_classes, deep, generator)

    def features(self, x):
        """Each expert's fused features, shape (n_experts, n_samples, deep width)."""
        groups = torch.split(x, self.widths, dim=1)
        deep = groups[-1]
        shallow = groups[:-1] or groups
        fused = []
        for i in range(self.n_experts):
            d = deep if self.adapters is None else deep + self.adapters[i](deep)
            fused.append(d * (1.0 + self.align[i](shallow[self.sources[i]])))
        return torch.stack(fused)

    def forward(self, x):
        """Logits of shape (n_experts, n_samples, n_classes)."""
        bias = self.bias.view(self.n_experts, 1, -1)
        return torch.baddbmm(bias, self.features(x), self.weight.transpose(1, 2))


class RetrainedHeads(nn.Module):
    """New expert heads on the frozen fused features of a trained :class:`SHIKENetwork`."""

    def __init__(self, network, n_classes, generator):
        super().__init__()
        self.network = network
        n_features = network.weight.shape[-1]
        self.weight, self.bias = _expert_heads(network.n_experts, n_classes, n_features, generator)

    def forward(self, x):
        with torch.no_grad():
            feats = self.network.features(x)
        bias = self.bias.view(len(self.weight), 1, -1)
        return torch.baddbmm(bias, feats, self.weight.transpose(1, 2))


class _MeanLogits(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x):
        return self.experts(x).mean(dim=0)


def _check_widths(feature_groups, n_features):
    """Group widths from ``feature_groups`` (ints or ``(name, width)`` pairs)."""
    if feature_groups is None:
        return [n_features]
    try:
        widths = [int(g[1]) if isinstance(g, (tuple, list)) else int(g) for g in feature_groups]
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(
            "feature_groups must be widths or (name, width) pairs, as "
            f"FeatureFile.feature_groups gives them; got {feature_groups!r}."
        ) from exc
    if not widths or min(widths) < 1 or sum(widths) != n_features:
        raise ValueError(
            f"feature_groups {list(feature_groups)!r} give widths {widths} adding up to "
            f"{sum(widths)}; X has {n_features} features. Read X and feature_groups from the "
            "same file (FeatureFile.read, FeatureFile.feature_groups)."
        )
    return widths


def _check_fusion_size(widths, n_experts, feature_groups):
    """Refuse alignment layers too large to train (a d x d layer per expert without groups)."""
    shallow = widths[:-1] or widths
    n_weights = sum(shallow[i % len(shallow)] for i in range(n_experts)) * widths[-1]
    if n_weights > MAX_FUSION_PARAMETERS:
        where = (
            f"feature_groups=None fuses the {widths[-1]}-wide X with itself"
            if feature_groups is None
            else f"feature_groups widths {widths}"
        )
        raise ValueError(
            f"SHIKEClassifier's alignment layers would hold {n_weights:,} weights "
            f"({where}: a shallow-width x {widths[-1]} layer for each of {n_experts} experts), "
            f"more than ltlearn.shike.MAX_FUSION_PARAMETERS = {MAX_FUSION_PARAMETERS:,}. Pass "
            "feature_groups with narrower shallow layers (extract(..., layers=[...]) and "
            "FeatureFile.feature_groups), fewer n_experts, or reduce X's width (e.g. PCA) first."
        )


class SHIKEClassifier(TorchHeadClassifier):
    """Self-heterogeneous experts over several depths (Jin et al., CVPR 2023).

    See :mod:`ltlearn.shike` for the method and what changed on frozen
    features. The features are several layers of the backbone side by side,
    the deepest last, as ``extract(..., layers=[...])`` stores them; pass their
    widths as ``feature_groups``.

    Parameters
    ----------
    feature_groups : sequence of int or of (str, int), default=None
        Widths of the column groups of ``X`` in order, the deepest last
        (``FeatureFile(path).feature_groups`` can be passed as it is). None
        treats ``X`` as one group: each expert fuses the embedding with
        itself, through a d x d layer. Alignment layers of more than
        ``MAX_FUSION_PARAMETERS`` (2**25) weights in all are refused (d above
        about 3,300 with 3 experts and no groups).
    n_experts : int, default=3
    distillation : float or "auto", default="auto"
        Weight of mutual distillation between experts; ``"auto"`` is
        ``1 / n_classes``, the weight that the reference code's element-wise
        mean reduction amounts to.
    transfer : float or "auto", default="auto"
        Weight of dynamic knowledge transfer (the grand teacher's
        non-target distribution, hardest negative suppressed); ``"auto"`` is
        ``10 / n_classes``, as in the reference code. On CIFAR-10-LT (IR
        100, a balanced validation set of training images) these gave 77.3 %
        against 77.0 % for no distillation and no transfer.
    adapter_size : int or None, default=None
        Hidden width of a residual adapter on the deepest features in front
        of each expert; None for none. On CIFAR-10-LT embeddings (IR 100, a
        balanced validation set of training images) 64 cost 1.3 points and half
        as much time again.
    normalize : {"l2", "standard"} or None, default="l2"
        ``"l2"`` normalises each column group on its own.
    optimizer, lr, weight_decay, max_epochs, batch_size, lr_schedule, device, \
random_state, verbose
        As in :class:`ltlearn.BalancedSoftmaxClassifier`; both stages use them.
    early_stopping, validation_fraction, n_iter_no_change
        As in :class:`ltlearn.BalancedSoftmaxClassifier`, for the experts'
        training: the held-out rows train no stage, and the re-balancing runs
        its full epochs on the other rows.

    Attributes
    ----------
    classes_, n_features_in_, class_counts_, class_prior_, device_
        As in :class:`ltlearn.BalancedSoftmaxClassifier`.
    n_iter_, loss_curve_, history_, validation_scores_, best_validation_score_, best_epoch_
        As in :class:`ltlearn.BalancedSoftmaxClassifier`, for the experts' training
        (before the re-balancing).
    feature_widths_ : list of int
        Widths of the column groups.
    module_ : ltlearn.heads.NormalizedHead
        The normaliser, the experts and their re-trained heads.
    criterion_ : ltlearn.losses.SHIKELoss
    second_stage_history_ : list of float
        Mean loss of each epoch of the re-balancing stage.

    Examples
    --------
    >>> import numpy as np
    >>> from ltlearn import SHIKEClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> X_train, X_test = data.X_train, data.X_test
    >>> # Two "depths" of 32 columns each, as a multi-depth feature file would hold them.
    >>> clf = SHIKEClassifier(feature_groups=[32, 32], random_state=0).fit(X_train, data.y_train)
    >>> bool(clf.score(X_test, data.y_test) > 0.85)
    True
    """

    _streamable = False  # the second stage revisits rows in memory

    _parameter_constraints: dict = {
        **TorchHeadClassifier._parameter_constraints,
        "feature_groups": ["array-like", None],
        "n_experts": [Interval(Integral, 1, None, closed="left")],
        "distillation": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "transfer": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "adapter_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        *,
        feature_groups=None,
        n_experts=3,
        distillation="auto",
        transfer="auto",
        adapter_size=None,
        normalize="l2",
        optimizer="adam",
        lr="auto",
        weight_decay=1e-2,
        max_epochs="auto",
        batch_size="auto",
        lr_schedule="onecycle",
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=5,
        device="auto",
        random_state=None,
        verbose=False,
    ):
        self.feature_groups = feature_groups
        self.n_experts = n_experts
        self.distillation = distillation
        self.transfer = transfer
        self.adapter_size = adapter_size
        self.normalize = normalize
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr_schedule = lr_schedule
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _make_normalizer(self, X):
        self.feature_widths_ = _check_widths(self.feature_groups, X.shape[1])
        _check_fusion_size(self.feature_widths_, self.n_experts, self.feature_groups)
        return make_normalizer(self.normalize, X, self.feature_widths_)

    def _make_criterion(self, class_prior, n_steps):
        n_classes = len(class_prior)
        distillation = 1.0 / n_classes if self.distillation == "auto" else self.distillation
        transfer = 10.0 / n_classes if self.transfer == "auto" else self.transfer
        # Plain cross-entropy, as the paper trains its experts before re-balancing.
        return SHIKELoss(
            LogitAdjustedLoss(class_prior, tau=0.0), distillation=distillation, transfer=transfer
        )

    def _make_module(self, n_features, n_classes, class_prior, generator, n_steps):
        return SHIKENetwork(
            self.feature_widths_,
            n_classes,
            self.n_experts,
            adapter_size=self.adapter_size,
            generator=generator,
        )

    def _fit_second_stage(self, trained, Z, y, train, generator):
        for p in trained.parameters():
            p.requires_grad_(False)
        heads = RetrainedHeads(trained, len(self.classes_), generator)
        prior = torch.as_tensor(self.class_prior_, dtype=torch.float32)
        balanced = _PerExpert(LogitAdjustedLoss(prior, tau=1.0))
        self.second_stage_history_ = train(heads, balanced, desc="SHIKE re-balancing")
        for p in trained.parameters():
            p.requires_grad_(True)
        return _MeanLogits(heads)

    def _source_logits(self, X):
        # The re-trained heads learn the balanced posterior (Balanced Softmax).
        return self._logits(X) + np.log(self.class_prior_).astype(np.float32)


class _PerExpert(nn.Module):
    """A loss summed over the experts' logits (n_experts, n, C)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, logits, target, sample_weight=None):
        return sum(self.base(z, target, sample_weight) for z in logits)
