"""SADEClassifier: three distribution-aware experts, aggregated on the test set.

Zhang, Hooi, Hong & Feng, "Self-Supervised Aggregation of Diverse Experts for
Test-Agnostic Long-Tailed Recognition" (NeurIPS 2022).

- Training (section 4.1): a forward, a uniform and a backward expert are
  trained jointly, with cross-entropy on the raw, the Balanced-Softmax and the
  inverse-softmax adjusted logits (:class:`ltlearn.losses.DiverseExpertLoss`),
  so that their raw logits suit a long-tailed, a balanced and an inversely
  long-tailed test set.
- Test time (section 4.2): the experts' logits are aggregated as ``sum_k w_k
  logits_k`` with ``w = softmax(v)``, ``v`` starting equal; ``v`` is learnt on
  the unlabeled test set by maximising the cosine similarity of the softmax of
  the aggregated logits of two augmented views of each sample (the paper's
  prediction-stability objective): SGD with learning rate 0.1 and Nesterov
  momentum 0.9, batches of 128, at most 5 epochs, stopping after an epoch in
  which a weight fell below 0.05, as in the authors' test-time configuration.

What changed on frozen features: the backbone is fixed and shared, so the
three experts are linear heads on the same normalised embedding, trained in
one pass of the shared loop; an augmented view is the embedding of an
augmented image, stored by ``ltlearn.features.extract(..., views=K)``.

Without views, :meth:`SADEClassifier.adapt` falls back on MAP label-shift
estimation (:mod:`ltlearn.adaptation`) applied to the uniform expert. Asked
for aggregation without views, it makes the two views of a row from the row
plus independent feature-space noise (``view_noise``; 0.5 was best on a
validation split at IR 100). Both fallbacks are ours, not the paper's; on
CIFAR-10-LT embeddings MAP estimation was the more accurate of the two, and
also more accurate than aggregation over real augmented views (see
``benchmarks/bench_adaptation.py``).
"""

import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import softmax
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn import functional as F

from ltlearn._base import TorchHeadClassifier
from ltlearn._training import fit_module, torch_generator
from ltlearn.adaptation import LABEL_SHIFT_METHODS
from ltlearn.losses import DiverseExpertLoss, inverse_prior
from ltlearn.top_stage import TopStage

__all__ = ["ExpertHeads", "SADEClassifier"]

#: The experts, in the order of the module's outputs and of ``aggregation_weights_``.
EXPERTS = ("forward", "uniform", "backward")


class ExpertHeads(nn.Module):
    """Linear or cosine heads of several experts over the same features, in one product.

    Parameters
    ----------
    n_features, n_classes : int
    bias_init : torch.Tensor of shape (n_experts, n_classes)
        Starting biases of linear heads; the weights start at zero (each
        expert's problem is convex).
    cosine_scale : float, default=None
        Cosine heads without bias instead: ``cosine_scale * cos(z, w_ec)``,
        weights drawn from ``generator`` (``bias_init`` then only gives the
        number of experts).
    generator : torch.Generator, default=None

    Examples
    --------
    >>> import torch
    >>> heads = ExpertHeads(4, 3, torch.zeros(3, 3))
    >>> heads(torch.randn(5, 4)).shape  # experts, rows, classes
    torch.Size([3, 5, 3])
    """

    def __init__(self, n_features, n_classes, bias_init, cosine_scale=None, generator=None):
        super().__init__()
        self.n_experts, self.n_classes = bias_init.shape
        self.cosine_scale = cosine_scale
        self.linear = nn.Linear(n_features, self.n_experts * n_classes, bias=cosine_scale is None)
        if cosine_scale is None:
            nn.init.zeros_(self.linear.weight)
            with torch.no_grad():
                self.linear.bias.copy_(bias_init.reshape(-1))
        else:
            with torch.no_grad():
                # Rows of unit norm, as CosineHead's: a cosine's gradient shrinks as the
                # weight grows, and weight decay would then outweigh it.
                weight = torch.randn(self.linear.weight.shape, generator=generator)
                self.linear.weight.copy_(weight / math.sqrt(n_features))

    def forward(self, z):
        """Logits of shape (n_experts, n_samples, n_classes).

        ``z`` is (n_samples, n_features), shared by the experts, or
        (n_samples, n_experts, n_features), each expert's own features (its
        own top stage).
        """
        weight = self.linear.weight.view(self.n_experts, self.n_classes, -1)
        if self.cosine_scale is not None:
            weight = F.normalize(weight, dim=2)
            z = F.normalize(z, dim=-1)
            if z.ndim == 2:
                return self.cosine_scale * torch.einsum("nd,ecd->enc", z, weight)
            return self.cosine_scale * torch.einsum("ned,ecd->enc", z, weight)
        bias = self.linear.bias.view(self.n_experts, 1, self.n_classes)
        if z.ndim == 3:
            return torch.einsum("ned,ecd->enc", z, weight) + bias
        return self.linear(z).view(len(z), self.n_experts, self.n_classes).transpose(0, 1)


class _ViewAgreement(nn.Module):
    """Aggregated predictions of two random views of each row, for test-time aggregation.

    Its input rows are the experts' logits of every view of a sample, shape
    (n_views, n_experts, n_classes); the output stacks the softmax of the
    aggregated logits of two distinct views, drawn anew at each call.
    """

    def __init__(self, n_experts, generator):
        super().__init__()
        # SADE initialises the raw weights to 1 / n_experts: equal after the softmax.
        self.raw_weights = nn.Parameter(torch.full((n_experts,), 1.0 / n_experts))
        self.generator = generator

    def weights(self):
        return torch.softmax(self.raw_weights, dim=0)

    def forward(self, view_logits):
        n, n_views = view_logits.shape[:2]
        first = torch.randint(n_views, (n,), generator=self.generator)
        second = (first + torch.randint(1, n_views, (n,), generator=self.generator)) % n_views
        rows = torch.arange(n)
        pair = torch.stack([view_logits[rows, first], view_logits[rows, second]])
        aggregated = torch.einsum("e,vbec->vbc", self.weights(), pair)
        return torch.softmax(aggregated, dim=-1)


class _NegativeCosine(nn.Module):
    """Minus the mean cosine similarity of the two predictions of each row (SADE, eq. 6)."""

    def forward(self, predictions, target, sample_weight=None):
        return -F.cosine_similarity(predictions[0], predictions[1], dim=1, eps=1e-6).mean()


class SADEClassifier(TorchHeadClassifier):
    """Forward, uniform and backward experts, aggregated by self-supervision on the test set.

    Trains three experts on fixed features (Zhang et al., NeurIPS 2022; see
    :mod:`ltlearn.sade`): their raw logits suit a test set that follows the
    training distribution, a balanced one and an inverted one. Until
    :meth:`adapt` is called, predictions average the three experts' logits
    with equal weights. ``adapt(X_test)`` (or with ``method="map"``, ``"em"``,
    ``"bbse"``, ``"rlls"``) estimates the test prior and, when it shifted,
    shifts the uniform expert to it. ``adapt(X_test, views=V,
    method="aggregation")`` instead learns the aggregation weights on the
    unlabeled test rows and their augmented views, the paper's test-time
    self-supervised aggregation; on frozen linear heads it was the less
    accurate of the two.

    Parameters
    ----------
    lam : float, default=2.0
        Strength of the inverse prior in the backward expert's loss.
    aggregation_lr : float, default=0.1
        Learning rate of the test-time aggregation (SGD, Nesterov momentum 0.9).
    aggregation_epochs : int, default=5
        Most passes over the unlabeled rows during aggregation.
    aggregation_batch_size : int, default=128
        Rows per aggregation step.
    min_weight : float, default=0.05
        Aggregation stops after an epoch in which an expert's weight fell below it.
    view_noise : float, default=0.5
        For ``adapt(X, method="aggregation")`` without views: the two views of
        a row are the row plus independent Gaussian noise of this standard
        deviation relative to the row's root-mean-square (for activation
        maps, the second view is also mirrored).
    head : "linear" or TopStage, default="linear"
        The experts' heads: linear heads over shared features, or, with a
        :class:`~ltlearn.top_stage.TopStage` and activations cached at a
        cut, each expert its own copy of the backbone's top stage (or its
        last part: ``TopStage(experts="head")``) with a linear layer.
    expert_head : {"linear", "cosine"}, default="linear"
        Each expert's classifier. ``"linear"`` has a bias, which absorbs the
        offsets by which the experts' losses differ: linear experts over
        the same features converge to one model plus offsets, and experts
        with their own tops, started alike, train identically.
        ``"cosine"`` (``cosine_scale * cos(z, w)``, no bias: the normalised
        classifiers of the paper's configurations) cannot absorb them, so
        each loss shapes its expert's weights, and its top.
    cosine_scale : float, default=30.0
        Logit scale of ``"cosine"`` experts.
    normalize : {"l2", "standard"} or None, default="l2"
        Feature normalisation fitted inside the estimator.
    optimizer : {"adam", "adamw", "sgd"}, default="adam"
    lr : float or "auto", default="auto"
        Peak learning rate of training; ``"auto"`` is ``0.1 / sqrt(n_features)``.
    weight_decay : float, default=1e-2
        Weight decay of the experts' weight matrices.
    max_epochs : int or "auto", default="auto"
    batch_size : int or "auto", default="auto"
    lr_schedule : {"onecycle", "cosine", "constant"}, default="onecycle"
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of each class's rows, train on the
        others and stop once their loss (the three experts' loss, each class
        weighing the same) has not improved for ``n_iter_no_change`` epochs,
        keeping the best epoch; see :class:`ltlearn.BalancedSoftmaxClassifier`.
        Not with a ``TopStage`` head, which keeps its own best epoch.
    validation_fraction : float in (0, 1), default=0.1
        Share of each class's rows that ``early_stopping`` holds out.
    n_iter_no_change : int, default=5
        Epochs without a lower held-out loss after which ``early_stopping``
        stops training.
    device : str, default="auto"
        Torch device to train on; prediction and aggregation run on the CPU.
    calibration_cv : int or None, default=3
        Folds of the cross-fitting that calibrates the posteriors which
        :meth:`adapt` reads: ``fit`` also fits this many copies, each on all
        folds but one, and sets ``calibration_temperature_`` from their
        out-of-fold logits, so that label-shift estimation sees calibrated
        probabilities without a validation set (a fit costs about three times
        as long). None skips it (temperature 1). Not done when ``X`` is
        streamed from a feature file. Predictions before ``adapt`` do not
        depend on it.
    random_state : int, RandomState instance or None, default=None
        Decides batch order and the views drawn during aggregation.
    verbose : bool, default=False
        Show a progress bar over training epochs.

    Attributes
    ----------
    calibration_temperature_ : float
        Temperature of the balanced logits from the cross-fitting
        (``calibration_cv``); 1 without it.
    calibration_bias_ : ndarray of shape (n_classes,)
        Class offsets (mean zero) that calibrate the uniform expert's
        out-of-fold posteriors further, after the temperature, each shrunk
        toward zero by its noise; zeros without the cross-fitting. Predictions
        adapted by label shift add them.
    calibration_bias_covariance_ : ndarray of shape (n_classes, n_classes)
        Covariance of the unshrunk offsets; ``adapt``'s test of "no shift"
        and its intervals allow for it.
    calibration_confusion_ : ndarray of shape (n_classes, n_classes) or None
        Row ``c``: the uniform expert's mean calibrated out-of-fold posterior
        over training rows of class ``c``. ``adapt`` checks EM's estimate
        against it and falls back on it when EM's estimate does not explain
        the test rows. None without the cross-fitting, with more than 100
        classes, or when a class had no out-of-fold row.
    calibration_confusion_covariance_ : ndarray of shape (n_classes, n_classes, n_classes) or None
        The out-of-fold posteriors' covariance within each class.
    calibration_confusion_counts_ : ndarray of shape (n_classes,) or None
        Out-of-fold rows per class behind the two above.
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    class_counts_ : ndarray of shape (n_classes,)
        Training samples per class (all rows passed to ``fit``, those that
        ``early_stopping`` held out included).
    class_prior_ : ndarray of shape (n_classes,)
        Training class prior that the forward and backward experts' losses
        build on.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``
        Feature names, when ``X`` had string column names.
    module_ : ltlearn.heads.NormalizedHead
        The fitted normaliser and :class:`ExpertHeads`, on the CPU in eval mode.
    criterion_ : ltlearn.losses.DiverseExpertLoss
        The training loss of the three experts.
    n_iter_ : int
        Epochs the training ran: ``max_epochs``, or fewer when
        ``early_stopping`` stopped it. With a ``TopStage`` head, the linear
        probe's and the fine-tuning's together.
    loss_curve_ : list of float
        Mean training loss of each epoch (with a ``TopStage`` head, the
        probe's, then the fine-tuning's).
    history_ : list of float
        The same list as ``loss_curve_``.
    validation_scores_ : list of float or None
        Held-out scores, higher is better (as ``MLPClassifier``'s), before
        training and after each epoch. Under ``early_stopping``, the negated
        held-out loss; with a ``TopStage`` head, the balanced accuracy on its
        held-out rows of the linear probe and after each fine-tuning epoch.
        None otherwise.
    best_validation_score_ : float or None
        The highest of ``validation_scores_``, that of the kept parameters;
        None without them.
    best_epoch_ : int
        The epoch whose parameters the model kept: under ``early_stopping``
        the best one (0 if none beat the untrained experts), else the last.
        With a ``TopStage`` head, counted in fine-tuning epochs (0: the
        linear probe).
    device_ : str
        Device the model was trained on.
    test_prior_ : ndarray of shape (n_classes,)
        Test prior estimated by :meth:`adapt` with a label-shift method,
        whether or not a shift was detected; absent before.
    test_prior_interval_ : ndarray of shape (2, n_classes)
        Lower and upper bounds of ``test_prior_`` at :meth:`adapt`'s
        ``confidence`` (default 90 %); NaN for ``"bbse"`` and ``"rlls"``.
    test_prior_effective_rows_ : float
        Number of labeled rows that would pin the test prior down as
        precisely as :meth:`adapt`'s unlabeled rows did.
    shift_pvalue_ : float
        p-value of :meth:`adapt`'s test of "no shift".
    shift_detected_ : bool
        Whether that test rejected "no shift" at ``significance``, so that
        predictions follow ``test_prior_``.
    test_prior_method_ : str
        The estimator :meth:`adapt` used: its ``method``, or ``"confusion"``
        where EM's estimate failed the check against
        ``calibration_confusion_``.
    aggregation_weights_ : ndarray of shape (3,)
        Weights of the (forward, uniform, backward) experts learnt by
        :meth:`adapt` with ``method="aggregation"``; absent before.
    aggregation_history_ : list of float
        Mean cosine similarity of the two views' predictions in each
        aggregation epoch.

    Examples
    --------
    >>> import numpy as np
    >>> from ltlearn import SADEClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = SADEClassifier(random_state=0).fit(data.X_train, data.y_train)
    >>> bool(clf.score(data.X_test, data.y_test) > 0.85)
    True
    >>> rows = long_tailed_subset(data.y_test, 10, random_state=0)  # head-heavy test set
    >>> weights = clf.adapt(data.X_test[rows], method="aggregation").aggregation_weights_
    >>> bool(weights[0] > weights[2])  # the forward expert gains
    True
    """

    _parameter_constraints: dict = {
        **TorchHeadClassifier._parameter_constraints,
        "lam": [Interval(Real, 0, None, closed="left")],
        "aggregation_lr": [Interval(Real, 0, None, closed="neither")],
        "aggregation_epochs": [Interval(Integral, 1, None, closed="left")],
        "aggregation_batch_size": [Interval(Integral, 1, None, closed="left")],
        "min_weight": [Interval(Real, 0, 1, closed="left")],
        "view_noise": [Interval(Real, 0, None, closed="neither")],
        "head": [StrOptions({"linear"}), TopStage],
        "expert_head": [StrOptions({"linear", "cosine"})],
        "cosine_scale": [Interval(Real, 0, None, closed="neither")],
    }

    _n_tops = 3

    _adapted_attributes = (
        *TorchHeadClassifier._adapted_attributes,
        "aggregation_weights_",
        "aggregation_history_",
    )

    def __init__(
        self,
        *,
        lam=2.0,
        aggregation_lr=0.1,
        aggregation_epochs=5,
        aggregation_batch_size=128,
        min_weight=0.05,
        view_noise=0.5,
        head="linear",
        expert_head="linear",
        cosine_scale=30.0,
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
        calibration_cv=3,
        random_state=None,
        verbose=False,
    ):
        self.lam = lam
        self.aggregation_lr = aggregation_lr
        self.aggregation_epochs = aggregation_epochs
        self.aggregation_batch_size = aggregation_batch_size
        self.min_weight = min_weight
        self.view_noise = view_noise
        self.head = head
        self.expert_head = expert_head
        self.cosine_scale = cosine_scale
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
        self.calibration_cv = calibration_cv
        self.random_state = random_state
        self.verbose = verbose

    def _make_criterion(self, class_prior, n_steps):
        return DiverseExpertLoss(class_prior, lam=self.lam)

    def _make_module(self, n_features, n_classes, class_prior, generator, n_steps):
        # Each expert starts as the best constant model under its own loss.
        log_prior = torch.log(class_prior)
        bias = torch.stack(
            [
                log_prior,
                torch.zeros_like(log_prior),
                self.lam * torch.log(inverse_prior(class_prior)),
            ]
        )
        cosine = self.expert_head == "cosine"
        return ExpertHeads(
            n_features,
            n_classes,
            bias - bias.mean(dim=1, keepdim=True),
            cosine_scale=self.cosine_scale if cosine else None,
            generator=generator,
        )

    def _source_logits(self, X):
        # The uniform expert was fitted with softmax(logits + log(prior)) to the labels.
        return self._logits(X)[1] + np.log(self.class_prior_).astype(np.float32)

    def _scores(self, X):
        check_is_fitted(self)
        X = self._validate(X)
        weights = getattr(self, "aggregation_weights_", np.full(3, 1.0 / 3.0))
        return np.einsum("e,enc->nc", weights.astype(np.float32), self._logits(X))

    def expert_decision_function(self, X):
        """The raw logits of each expert.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (3, n_samples, n_classes)
            The forward, uniform and backward experts' logits, in that order.
        """
        check_is_fitted(self)
        X = self._validate(X)
        return self._logits(X)

    def _view_logits(self, X, views, rng):
        """Experts' logits of every view of each row: (n, n_views, 3, n_classes)."""
        if views is None:
            axes = tuple(range(1, X.ndim))
            rms = np.sqrt(np.mean(np.square(X, dtype=np.float64), axis=axes, keepdims=True))
            scale = self.view_noise * rms[:, None]
            noise = rng.standard_normal((len(X), 2, *X.shape[1:])) * scale
            pool = (X[:, None] + noise).astype(np.float32)
            if X.ndim == 4:  # activation maps: the second view is mirrored too
                pool[:, 1] = pool[:, 1, ..., ::-1]
        else:
            # Embeddings' views, or maps' views with a TopStage head.
            views = self._check_views(views, len(X), "adapt").astype(np.float32, copy=False)
            # SADE compares two augmented views; with one, it is paired with the plain row.
            pool = views if views.shape[1] >= 2 else np.concatenate([X[:, None], views], axis=1)
        n, n_views = pool.shape[:2]
        logits = self._logits(pool.reshape(n * n_views, *pool.shape[2:]))  # (3, n * n_views, C)
        return torch.from_numpy(logits).view(3, n, n_views, -1).permute(1, 2, 0, 3).contiguous()

    def adapt(self, X, *, views=None, method="auto", validation=None, **options):
        """Learn how to predict for the unlabeled rows ``X`` (transductive).

        With ``method="aggregation"`` (the paper's test-time self-supervised
        aggregation): learns ``aggregation_weights_`` by making the
        aggregated predictions of two augmented views of each row agree (see
        :mod:`ltlearn.sade`). With a label-shift method (``"map"``, ``"em"``,
        ``"bbse"``, ``"rlls"``; see :mod:`ltlearn.adaptation`): estimates
        ``test_prior_`` and, when the test of "no shift" rejects it, predicts
        with the uniform expert's calibrated posteriors shifted to it (see
        ``TorchHeadClassifier.adapt``). ``"auto"`` is ``"map"``: on SADE's
        11 CIFAR-10-LT test sets it was the more accurate (see
        ``benchmarks/bench_adaptation.py``); on frozen linear heads the
        experts differ only by class offsets, so the aggregation can only
        choose an offset, and agreement between views rewards a large one.
        Predictions use the adapted state until the next ``adapt``,
        :meth:`reset_adaptation` or ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Unlabeled rows of the test distribution.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Embeddings of augmented views of each row (``FeatureFile.views``),
            for ``method="aggregation"`` only. Two distinct views are drawn per
            row and step; a single view is paired with the row itself. Without
            views, aggregation uses feature-space noise (``view_noise``).
        method : {"auto", "aggregation", "map", "em", "bbse", "rlls"}, default="auto"
            ``"auto"`` is ``"map"``.
        validation : (X_val, y_val), default=None
            Held-out labeled rows, for the label-shift methods.
        **options
            Further arguments of :func:`~ltlearn.adaptation.estimate_test_prior`.

        Returns
        -------
        self : object
        """
        if method == "auto":
            method = "map"
        if method not in ("aggregation", *LABEL_SHIFT_METHODS):
            raise ValueError(
                "method must be one of ['auto', 'aggregation', "
                f"{', '.join(repr(m) for m in LABEL_SHIFT_METHODS)}]; got {method!r}."
            )
        if method != "aggregation":
            if views is not None:
                raise ValueError(
                    f"views are used by method='aggregation' only, not {method!r} (method='auto' "
                    "is 'map', which was the more accurate on SADE's test sets); pass "
                    "method='aggregation' to aggregate over views."
                )
            return super().adapt(X, method=method, validation=validation, **options)
        if validation is not None or options:
            raise ValueError(
                "method='aggregation' takes only X and views; validation and label-shift "
                f"options ({sorted(options)}) belong to the label-shift methods."
            )
        check_is_fitted(self)
        X = self._validate(X)
        rng = check_random_state(self.random_state)
        pool = self._view_logits(np.asarray(X, dtype=np.float32), views, rng)
        generator = torch_generator(rng)
        agreement = _ViewAgreement(3, generator)

        def low_weight(module):
            return bool(module.weights().min() < self.min_weight)

        history = fit_module(
            agreement,
            _NegativeCosine(),
            pool,
            torch.zeros(len(pool), dtype=torch.int64),
            optimizer="sgd",
            lr=self.aggregation_lr,
            weight_decay=0.0,
            max_epochs=self.aggregation_epochs,
            batch_size=self.aggregation_batch_size,
            lr_schedule="constant",
            generator=generator,
            desc="SADE aggregation",
            stop_when=low_weight,
        )
        self.reset_adaptation()
        self.aggregation_weights_ = softmax(
            agreement.raw_weights.detach().numpy().astype(np.float64)
        )
        self.aggregation_history_ = [-loss for loss in history]
        return self
