"""DecoupledClassifier: an instance-balanced head, then the classifier re-balanced.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition" (ICLR 2020), section 4. Stage 1 trains a linear head with plain
cross-entropy on instance-balanced batches; stage 2 re-balances the classifier
alone, one of three ways:

- ``"crt"``, classifier re-training: a new linear head trained with
  class-balanced sampling (each class drawn equally often);
- ``"tau_norm"``: the stage-1 weights rescaled, ``w_c / ||w_c|| ** tau``,
  which shrinks the large norms that head classes acquire; ``tau`` chosen on a
  held-out fifth of the training rows (balanced accuracy), as the paper
  chooses it on a validation set;
- ``"lws"``, learnable weight scaling: the stage-1 head kept and one scale per
  class learnt with class-balanced sampling, ``f_c (w_c . z)``.

What changed on frozen features: the paper's stage 1 is where the backbone is
learnt; here the representation is the frozen embedding, so stage 1 only fits
the instance-balanced head that stage 2's tau-normalisation and LWS start from.
That head has no bias, where the paper's linear classifier has one (and its
LWS scales ``w_c . z + b_c``): a bias learnt on instance-balanced batches
carries the training prior past the re-balancing of the weights, which
tau-normalisation and LWS act on; with one, they fell 12 points below cRT on
a validation split. cRT's re-trained head has a bias, as in the paper.
"""

from numbers import Real

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ltlearn._base import TorchHeadClassifier
from ltlearn._training import seed_from
from ltlearn.datasets import train_val_split
from ltlearn.heads import make_head
from ltlearn.losses import LogitAdjustedLoss

__all__ = ["DecoupledClassifier", "ScaledHead", "TauNormalizedHead"]

METHODS = ("crt", "tau_norm", "lws")
TAU_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2))


def _unbiased_linear(n_features, n_classes):
    # No bias: see the module docstring. Zero start: the problem is convex.
    head = nn.Linear(n_features, n_classes, bias=False)
    nn.init.zeros_(head.weight)
    return head


class TauNormalizedHead(nn.Module):
    """A bias-free linear head with class weights ``w_c / ||w_c|| ** tau``.

    Parameters
    ----------
    head : torch.nn.Linear
        Without bias.
    tau : float

    Examples
    --------
    >>> import torch
    >>> head = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    >>> TauNormalizedHead(head, 1.0)(torch.tensor([[1.0, 0.0]]))  # unit-norm rows
    tensor([[0.6000, 0.0000]])
    """

    def __init__(self, head, tau):
        super().__init__()
        self.tau = float(tau)
        norms = torch.linalg.vector_norm(head.weight.detach(), dim=1, keepdim=True)
        self.register_buffer("weight", head.weight.detach() / norms.clamp_min(1e-12) ** self.tau)

    def forward(self, z):
        return nn.functional.linear(z, self.weight)


class ScaledHead(nn.Module):
    """A fixed bias-free linear head whose logits a learnt per-class scale multiplies (LWS).

    Parameters
    ----------
    head : torch.nn.Linear
        Without bias; kept fixed.
    """

    def __init__(self, head):
        super().__init__()
        self.register_buffer("weight", head.weight.detach().clone())
        self.scale = nn.Parameter(torch.ones(len(self.weight)))

    def forward(self, z):
        return nn.functional.linear(z, self.weight) * self.scale


class DecoupledClassifier(TorchHeadClassifier):
    """Decoupled classifier learning on fixed features: cRT, tau-normalisation or LWS.

    See :mod:`ltlearn.decoupled` for the two stages (Kang et al., ICLR 2020).

    Parameters
    ----------
    method : {"lws", "crt", "tau_norm"}, default="lws"
        How stage 2 re-balances the classifier.
    tau : float or "auto", default="auto"
        Exponent of ``"tau_norm"``. ``"auto"`` picks it from 0, 0.1, ..., 2 by
        the balanced accuracy, on a held-out fifth of the training rows, of a
        stage-1 head fitted on the other four fifths; the final head is then
        fitted on all rows.
    normalize, optimizer, lr, weight_decay, max_epochs, batch_size, lr_schedule, device, \
random_state, verbose
        As in :class:`ltlearn.BalancedSoftmaxClassifier`; both stages use them.
    early_stopping, validation_fraction, n_iter_no_change
        As in :class:`ltlearn.BalancedSoftmaxClassifier`, for stage 1: the
        held-out rows train no stage, and stage 2 (and the choice of
        ``tau="auto"``) runs its full epochs on the other rows.

    Attributes
    ----------
    classes_, n_features_in_, class_counts_, class_prior_, device_
        As in :class:`ltlearn.BalancedSoftmaxClassifier`.
    n_iter_, loss_curve_, validation_scores_, best_validation_score_, best_epoch_
        As in :class:`ltlearn.BalancedSoftmaxClassifier`, for stage 1.
    module_ : ltlearn.heads.NormalizedHead
        The normaliser and the stage-2 head (:class:`TauNormalizedHead`,
        :class:`ScaledHead`, or a re-trained ``torch.nn.Linear``).
    criterion_ : ltlearn.losses.LogitAdjustedLoss
        Stage 1's plain cross-entropy.
    history_ : list of float
        Mean loss of each epoch of stage 1: the same list as ``loss_curve_``.
    second_stage_history_ : list of float
        Mean loss of each epoch of stage 2 (empty for ``"tau_norm"``).
    tau_ : float
        The exponent used (``"tau_norm"`` only).

    Examples
    --------
    >>> from ltlearn import DecoupledClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = DecoupledClassifier(method="crt", random_state=0).fit(data.X_train, data.y_train)
    >>> bool(clf.score(data.X_test, data.y_test) > 0.85)
    True
    """

    _streamable = False  # the second stage revisits rows in memory

    _parameter_constraints: dict = {
        **TorchHeadClassifier._parameter_constraints,
        "method": [StrOptions(set(METHODS))],
        "tau": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
    }

    def __init__(
        self,
        method="lws",
        *,
        tau="auto",
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
        self.method = method
        self.tau = tau
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

    def _make_criterion(self, class_prior, n_steps):
        return LogitAdjustedLoss(class_prior, tau=0.0)

    def _make_module(self, n_features, n_classes, class_prior, generator, n_steps):
        return _unbiased_linear(n_features, n_classes)

    def _fit_second_stage(self, trained, Z, y, train, generator):
        prior = torch.as_tensor(self.class_prior_, dtype=torch.float32)
        balanced = LogitAdjustedLoss(prior, tau=0.0)
        self.second_stage_history_ = []
        if self.method == "tau_norm":
            auto = self.tau == "auto"
            self.tau_ = self._choose_tau(Z, y, prior, train, generator) if auto else self.tau
            return TauNormalizedHead(trained, self.tau_)
        if self.method == "lws":
            head = ScaledHead(trained)
        else:
            head = make_head("linear", Z.shape[1], len(prior))  # cRT: a new head, with bias
        self.second_stage_history_ = train(head, balanced, balanced_sampling=True, desc="stage 2")
        return head

    def _choose_tau(self, Z, y, prior, train, generator):
        # The rows it trains on: early_stopping may have held some out already.
        if int(torch.bincount(y).max()) < 2:
            raise ValueError(
                "DecoupledClassifier(method='tau_norm', tau='auto') chooses tau on rows held "
                "out of each class, but every class has a single training row, so none can be "
                "held out. Pass tau explicitly (e.g. tau=1.0), or use method='crt' or 'lws'."
            )
        rng = np.random.RandomState(seed_from(generator))
        fit_rows, held = train_val_split(y.numpy(), val_size=0.2, random_state=rng)
        head = _unbiased_linear(Z.shape[1], len(prior))
        train(head, LogitAdjustedLoss(prior, tau=0.0), rows=fit_rows, desc="tau selection")
        scores = []
        with torch.no_grad():
            for tau in TAU_GRID:
                pred = TauNormalizedHead(head, tau)(Z[held]).argmax(dim=1).numpy()
                scores.append(balanced_accuracy_score(y.numpy()[held], pred))
        return float(TAU_GRID[int(np.argmax(scores))])

    def _source_logits(self, X):
        # Stage 2 re-balanced the classifier: its logits model the balanced posterior.
        return self._logits(X) + np.log(self.class_prior_).astype(np.float32)
