"""PRLClassifier: hypernetwork-generated experts, steered by a preference vector.

Zhao et al., "Breaking Long-Tailed Learning Bottlenecks: A Controllable Paradigm
with Hypernetwork-Generated Diverse Experts" (NeurIPS 2024). A hypernetwork maps
a point of the 3-simplex to a classifier head; training draws points near the
three corners and fits each to its expert's loss (:class:`ltlearn.losses.PRLLoss`),
so at predict time a preference over (forward, uniform, backward) picks a head
anywhere between the three experts, without refitting.

The backbone is frozen here, so the generated head works on cached features:
what the paper generates for a network's last layer, this module generates for
a shared linear head, as class-wise logit shifts and a low-rank weight update.
With ``head=TopStage(...)`` on activations cached at a cut, the backbone's top
stage is fine-tuned under the same loss, shared by the experts (the memory-light
arrangement: one top); with ``modulate_top=True`` the hypernetwork also generates
per-channel scales and shifts of the top's last part from the preference, so that
the preferences differ in their features, not only in the head over one embedding.
"""

import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ltlearn._base import TorchHeadClassifier, _decision, _log_proba, _proba
from ltlearn._training import seed_from
from ltlearn.heads import init_linear
from ltlearn.losses import PRLLoss, inverse_prior
from ltlearn.top_stage import TopStage

__all__ = ["PRLClassifier", "PRLNetwork", "PreferenceModulation"]

#: The corners of the preference simplex, in the order of the experts.
EXPERTS = ("forward", "uniform", "backward")


class PRLNetwork(nn.Module):
    """A linear head whose weights and biases are generated from a preference.

    For a point ``r_hat`` of the 3-simplex the generated head is::

        logits(z) = (W + U(r_hat) V) z' + b + r_hat @ S + s(r_hat)

    where ``z'`` is ``z`` after an optional residual adapter, ``W, b`` a shared
    base head, ``V`` a shared ``rank x n_features`` projection, and the
    hypernetwork ``h(r_hat)`` (one hidden tanh layer) outputs the class
    factors ``U(r_hat)`` (``n_classes x rank``) and class-wise logit shifts
    ``s(r_hat)``. ``S`` is fixed: the rows ``log(prior)``, ``0`` and
    ``lam * log(inverse_prior)`` are the logit offsets by which the Bayes-optimal
    forward, uniform and backward experts differ from a balanced model, so at
    initialisation (``U = 0, s = 0``) each corner already is its expert around
    the base head, and training learns how the experts differ beyond that.
    The generator's size is ``hidden_size * n_classes * (rank + 1)``, never
    ``n_features * n_classes`` per expert.

    Parameters
    ----------
    n_features, n_classes : int
    shift_basis : torch.Tensor of shape (3, n_classes)
        ``S`` above.
    rank : int
        Rank of the generated weight update; 0 generates logit shifts only.
    hidden_size : int
        Width of the hypernetwork's hidden layer.
    adapter_size : int or None
        Hidden width of the residual adapter ``z + A2 relu(A1 z)``; None for none.
    generator : torch.Generator
        Source of the random initial weights.

    Examples
    --------
    >>> import torch
    >>> net = PRLNetwork(4, 3, torch.zeros(3, 3), rank=2, hidden_size=8, adapter_size=None,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> net(torch.randn(5, 4), torch.eye(3)).shape  # 3 preferences, 5 rows, 3 classes
    torch.Size([3, 5, 3])
    """

    def __init__(
        self, n_features, n_classes, shift_basis, *, rank, hidden_size, adapter_size, generator
    ):
        super().__init__()
        self.n_classes, self.rank = n_classes, rank
        if adapter_size is None:
            self.adapter = None
        else:
            self.adapter = nn.Sequential(
                init_linear(nn.Linear(n_features, adapter_size), generator),
                nn.ReLU(),
                nn.Linear(adapter_size, n_features),
            )
            # A zero last layer starts the adapter as the identity map.
            nn.init.zeros_(self.adapter[2].weight)
            nn.init.zeros_(self.adapter[2].bias)
        # The base head's problem is convex in its own parameters: start at zero, as
        # make_head("linear") does.
        self.base = nn.Linear(n_features, n_classes)
        nn.init.zeros_(self.base.weight)
        nn.init.zeros_(self.base.bias)
        self.projection = init_linear(nn.Linear(n_features, max(rank, 1), bias=False), generator)
        self.log_r = nn.Parameter(torch.zeros(3))
        self.register_buffer("shift_basis", shift_basis.clone())
        self.hyper = nn.Sequential(init_linear(nn.Linear(3, hidden_size), generator), nn.Tanh())
        self.hyper_out = nn.Linear(hidden_size, n_classes * (rank + 1))
        # Zero output: every generated head starts as base head + r_hat @ S.
        nn.init.zeros_(self.hyper_out.weight)
        nn.init.zeros_(self.hyper_out.bias)

    @property
    def r(self):
        """The learnt positive vector ``r`` that maps preferences to ``r_hat``."""
        return self.log_r.exp()

    def r_hat(self, alpha):
        """``(r * alpha) / (r . alpha)`` for preferences ``alpha`` of shape (..., 3)."""
        weighted = alpha * self.r
        return weighted / weighted.sum(dim=-1, keepdim=True)

    def generate(self, r_hat):
        """Logit shifts (m, n_classes) and factors ``U`` (m, n_classes, rank) of r_hat (m, 3)."""
        out = self.hyper_out(self.hyper(r_hat))
        shift = r_hat @ self.shift_basis + out[:, : self.n_classes]
        factors = out[:, self.n_classes :].view(len(r_hat), self.n_classes, self.rank)
        return shift, factors

    def forward(self, z, r_hat):
        """Logits (m, n_samples, n_classes) of features ``z`` under each of the m ``r_hat``.

        ``z`` is (n_samples, n_features), or (m, n_samples, n_features) when
        each preference has features of its own (a top it modulates).
        """
        if self.adapter is not None:
            z = z + self.adapter(z)
        shift, factors = self.generate(r_hat)
        logits = self.base(z)
        logits = (logits if z.ndim == 3 else logits.unsqueeze(0)) + shift.unsqueeze(1)
        if self.rank:
            logits = logits + self.projection(z) @ factors.transpose(1, 2)
        return logits


class PreferenceModulation(nn.Module):
    """Per-channel scales and shifts of a top stage, generated from a preference.

    A second, small hypernetwork for PRL with a trainable top
    (``modulate_top=True``): for each ``r_hat`` it generates ``(scale,
    shift)`` for the channels of the top's last part, which multiply them by
    ``1 + scale`` and add ``shift`` before a nonlinearity (FiLM, Perez et
    al., AAAI 2018), so that each preference has features of its own, as the
    paper's generated experts own their last layers, rather than only the
    logit offsets that separate the experts on one shared embedding. The
    output layer starts at zero: every preference starts from the pretrained
    top.

    Parameters
    ----------
    n_channels : int
        Channels of the top that are scaled and shifted.
    hidden_size : int
        Width of the hidden tanh layer.
    generator : torch.Generator
        Source of the random initial weights.
    """

    def __init__(self, n_channels, hidden_size, generator):
        super().__init__()
        self.hidden = nn.Sequential(init_linear(nn.Linear(3, hidden_size), generator), nn.Tanh())
        self.out = nn.Linear(hidden_size, 2 * n_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, r_hat):
        """``(scale, shift)``, each (m, n_channels), for preferences ``r_hat`` (m, 3)."""
        return self.out(self.hidden(r_hat)).chunk(2, dim=1)


class _RecalibratedNetwork(nn.Module):
    """A :class:`PRLNetwork` whose balanced logits are calibrated under every preference.

    The logits under ``r_hat`` less ``r_hat @ S`` (the class offsets that
    preference stands for) are the balanced logits; these are divided by
    the temperature and shifted by the class offsets that calibrate the
    uniform corner's on a TopStage's held-out rows, then ``r_hat @ S`` is
    added back, so that each preference still predicts for its prior.
    """

    def __init__(self, network, temperature, bias):
        super().__init__()
        self.network = network
        self.register_buffer("scale", torch.tensor(1.0 / temperature, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, z, r_hat):
        offsets = (r_hat @ self.network.shift_basis).unsqueeze(1)
        return (self.network(z, r_hat) - offsets) * self.scale + self.bias + offsets


class _DirichletTraining(nn.Module):
    """Training view of a :class:`PRLNetwork`: each call uses the next step's draws.

    ``alphas[t, i]`` is expert ``i``'s Dirichlet draw at step ``t``, drawn up
    front from the estimator's ``random_state`` so that a fit is reproducible.
    In eval mode (early stopping's held-out loss) each expert sits at its
    corner, as the preferences that name it predict, and no draw is used up.
    """

    def __init__(self, network, alphas):
        super().__init__()
        self.network = network
        self.register_buffer("alphas", alphas)
        self.step = 0

    def condition(self):
        """The experts' ``r_hat`` (3, 3) for the next step: each row one expert's."""
        if not self.training:
            return torch.eye(3, device=self.alphas.device)
        alpha = self.alphas[self.step % len(self.alphas)]
        self.step += 1
        return self.network.r_hat(alpha)

    def forward(self, z, r_hat=None):
        # Row i of the output holds expert i's logits, as PRLLoss expects. A top modulated
        # by the preferences passes the r_hat its features were computed under.
        return self.network(z, self.condition() if r_hat is None else r_hat)


class PRLClassifier(TorchHeadClassifier):
    """Long-tailed classifier whose head is chosen at predict time by a preference.

    A hypernetwork generates classifier heads from points of the preference
    simplex; it is trained so that the three corners are a forward expert
    (cross-entropy: follows the long-tailed training distribution), a uniform
    expert (Balanced Softmax: balanced classes) and a backward expert (SADE's
    inverse softmax: the inverted distribution), and the points between blend
    them (Zhao et al., NeurIPS 2024; see :class:`PRLNetwork` for the generated
    head and :class:`ltlearn.losses.PRLLoss` for the loss).

    **How predictions are formed.** The preference ``alpha`` (three
    non-negative weights over forward, uniform, backward; scaled to sum to one)
    becomes ``r_hat = (r * alpha) / (r . alpha)`` with the learnt positive
    vector ``r_`` (a corner stays the same corner), the hypernetwork generates
    the head for ``r_hat``, and the head's logits of the normalised features
    are the output of :meth:`decision_function`; :meth:`predict_proba` is their
    softmax and :meth:`predict` their argmax. Nothing else is added: at the
    corners the logits are the experts' own.

    Parameters
    ----------
    preference : {"uniform", "forward", "backward"} or array-like of shape (3,), default="uniform"
        Weights over the (forward, uniform, backward) experts used by
        :meth:`predict`, :meth:`predict_proba`, :meth:`decision_function` and
        :meth:`score`. Read at predict time: ``set_params(preference=...)`` on a
        fitted model takes effect at the next call, without refitting. The
        prediction methods also accept a one-off ``preference=`` argument.
    lam : float, default=2.0
        The paper's lambda: strength of the inverse prior in the backward
        expert's loss ``CE(logits + log(prior) - lam * log(inverse_prior))``.
    mu : float, default=0.3
        Smoothing of the Tchebycheff combination of the expert losses.
    beta : (float, float) or array-like of shape (3, 3), default=(50.0, 1.0)
        Dirichlet concentrations from which each expert's training preferences
        are drawn. A pair ``(own, other)`` gives expert ``i`` concentration
        ``own`` on its own corner and ``other`` on the two others; a 3 x 3 array
        gives row ``i`` to expert ``i`` directly. The default keeps about 96 %
        of each draw on the expert's corner: on a validation split of
        CIFAR-10-LT embeddings, wider draws such as ``(8, 1)`` cost the corners
        2 to 3 points of accuracy, since every expert is then fitted under
        randomly blended logit offsets.
    rank : int, default=0
        Rank of the generated weight update; 0 generates the head's biases
        (class-wise logit shifts) only and shares its weights. On the same
        validation split a rank-8 update raised forward-50 accuracy by up to
        1 point but cost 0.7 (IR 100) to 4 (IR 50) points on the uniform test.
    hidden_size : int, default=64
        Hidden width of the hypernetwork.
    adapter_size : int or None, default=None
        Hidden width of an optional residual adapter on the features.
    head : "linear" or TopStage, default="linear"
        What the generated head reads: the features, or, with a
        :class:`~ltlearn.top_stage.TopStage` and activations cached at a cut,
        the embedding of a copy of the backbone's top stage, fine-tuned with
        the hypernetwork and shared by every preference (``experts`` of the
        TopStage is not used: PRL's experts are points of one generated head).
    modulate_top : bool, default=False
        With a ``TopStage`` head, the hypernetwork also generates per-channel
        scales and shifts of the top's last part from the preference
        (:class:`PreferenceModulation`; for EfficientNet-Lite0, of the head
        convolution's 1,280 channels before their ReLU6), so that each
        preference has features of its own; the top's last part then runs
        once per preference. False shares the top's embedding between the
        preferences, which then differ in the generated head only. Off by
        default: on a validation pool of CIFAR-10-LT at IR 100 (seed 0,
        ``TopStage(train="all", lr=5e-4)``, 2 views) the modulated top scored
        80.48 % (11-set mean with ``adapt()`` 83.68) against 80.88 (83.99)
        for the shared one, and fitted 1.6 times slower.
        Not used without a ``TopStage`` head.
    tail_synthesis : float in [0, 1], default=0.0
        Synthesise features for small classes during training, up to this
        fraction of the largest class's count: each synthetic feature is a
        small class's mean plus the deviation of a random example of one of
        its three nearest larger classes from that class's mean, scaled to the
        small class's own spread (head-to-tail transfer of the covariance; see
        :mod:`ltlearn.synthesis`). A class keeps its total weight in the loss,
        shared by its real and synthetic rows, so ``class_prior_`` still
        counts images. Drawn once per fit from ``random_state``; the rows
        count toward the ``"auto"`` batch size and epochs, so fits take
        longer. 0 synthesises nothing.
        Off by default: on validation splits of CIFAR-10-LT embeddings it
        cost 0.1 to 1.8 points of balanced accuracy (fractions 0.02 to 1).
    normalize : {"l2", "standard"} or None, default="l2"
        Feature normalisation fitted inside the estimator.
    optimizer : {"adam", "adamw", "sgd"}, default="adam"
        See :class:`ltlearn.BalancedSoftmaxClassifier`.
    lr : float or "auto", default="auto"
        Peak learning rate; ``"auto"`` is ``0.1 / sqrt(n_features)``.
    weight_decay : float, default=1e-2
        Weight decay of the weight matrices (not of biases or ``r``).
    max_epochs : int or "auto", default="auto"
        Passes over the training set; ``"auto"`` as in BalancedSoftmaxClassifier.
    batch_size : int or "auto", default="auto"
        Mini-batch size; ``"auto"`` as in BalancedSoftmaxClassifier.
    lr_schedule : {"onecycle", "cosine", "constant"}, default="onecycle"
        Learning-rate schedule over all steps.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of each class's rows, train on the
        others and stop once their loss has not improved for
        ``n_iter_no_change`` epochs, keeping the best epoch; see
        :class:`ltlearn.BalancedSoftmaxClassifier`. The held-out loss is
        :class:`~ltlearn.losses.PRLLoss` of the three experts at their
        corners, each class weighing the same.
    validation_fraction : float in (0, 1), default=0.1
        Share of each class's rows that ``early_stopping`` holds out.
    n_iter_no_change : int, default=5
        Epochs without a lower held-out loss after which ``early_stopping``
        stops training.
    device : str, default="auto"
        Torch device to train on (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        Prediction runs on the CPU.
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
        Decides initial weights, batch order and the Dirichlet draws.
    verbose : bool, default=False
        Show a progress bar over epochs.

    Attributes
    ----------
    calibration_temperature_ : float
        Temperature of the balanced logits from the cross-fitting
        (``calibration_cv``); 1 without it.
    calibration_bias_ : ndarray of shape (n_classes,)
        Class offsets (mean zero) that calibrate the out-of-fold posteriors
        further, after the temperature, each shrunk toward zero by its noise
        (empirical Bayes), so that a few tail rows cannot move it; zeros
        without the cross-fitting. Adapted predictions add them; unadapted
        predictions never do.
    calibration_bias_covariance_ : ndarray of shape (n_classes, n_classes)
        Covariance of the unshrunk offsets, wide where a class has few rows.
        ``adapt``'s test of "no shift" and its intervals allow for it.
    calibration_confusion_ : ndarray of shape (n_classes, n_classes) or None
        Row ``c``: the mean calibrated out-of-fold posterior of training rows
        of class ``c`` (a soft confusion matrix). ``adapt`` checks EM's
        estimate against it and falls back on it when EM's estimate does not
        explain the test rows. None without the cross-fitting, with more than
        100 classes, or when a class had no out-of-fold row.
    calibration_confusion_covariance_ : ndarray of shape (n_classes, n_classes, n_classes) or None
        The out-of-fold posteriors' covariance within each class.
    calibration_confusion_counts_ : ndarray of shape (n_classes,) or None
        Out-of-fold rows per class behind the two above.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``
        Feature names, when ``X`` had string column names.
    class_counts_ : ndarray of shape (n_classes,)
        Training samples per class.
    synthetic_counts_ : ndarray of shape (n_classes,)
        Synthetic training rows per class (``tail_synthesis``).
    class_prior_ : ndarray of shape (n_classes,)
        Training class frequencies (sample-weighted).
    r_ : ndarray of shape (3,)
        The learnt vector ``r``.
    module_ : ltlearn.heads.NormalizedHead
        The fitted normaliser and :class:`PRLNetwork` (with a ``TopStage``
        head: the fine-tuned top stage, then the network), on the CPU in
        eval mode.
    criterion_ : ltlearn.losses.PRLLoss
        The training loss.
    n_iter_ : int
        Epochs the training ran (fewer than ``max_epochs`` when
        ``early_stopping`` stopped it).
    loss_curve_ : list of float
        Mean training loss of each epoch.
    history_ : list of float
        The same list as ``loss_curve_``.
    validation_scores_ : list of float or None
        Under ``early_stopping``, the negated held-out loss before training
        and after each epoch (higher is better, scikit-learn's
        ``neg_log_loss`` convention); None otherwise.
    best_validation_score_ : float or None
        The highest of ``validation_scores_``; None without them.
    best_epoch_ : int
        The epoch whose parameters the model kept (the best one under
        ``early_stopping``, else the last).
    device_ : str
        Device the network was trained on.

    See Also
    --------
    BalancedSoftmaxClassifier : One uniform expert, shifted post hoc by ``test_prior``.

    Examples
    --------
    >>> from ltlearn import PRLClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = PRLClassifier(random_state=0).fit(data.X_train, data.y_train)
    >>> bool(clf.score(data.X_test, data.y_test) > 0.85)
    True
    >>> head_first = clf.predict(data.X_test, preference="forward")
    >>> tail_first = clf.predict(data.X_test, preference="backward")
    >>> bool((head_first == 0).sum() > (tail_first == 0).sum())  # class 0 is the head
    True
    """

    _parameter_constraints: dict = {
        **TorchHeadClassifier._parameter_constraints,
        "preference": [StrOptions(set(EXPERTS)), "array-like"],
        "lam": [Interval(Real, 0, None, closed="left")],
        "mu": [Interval(Real, 0, None, closed="neither")],
        "beta": ["array-like"],
        "rank": [Interval(Integral, 0, None, closed="left")],
        "hidden_size": [Interval(Integral, 1, None, closed="left")],
        "adapter_size": [Interval(Integral, 1, None, closed="left"), None],
        "head": [StrOptions({"linear"}), TopStage],
        "modulate_top": ["boolean"],
        "tail_synthesis": [Interval(Real, 0, 1, closed="both")],
    }

    def __init__(
        self,
        preference="uniform",
        *,
        lam=2.0,
        mu=0.3,
        beta=(50.0, 1.0),
        rank=0,
        hidden_size=64,
        adapter_size=None,
        head="linear",
        modulate_top=False,
        tail_synthesis=0.0,
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
        self.preference = preference
        self.lam = lam
        self.mu = mu
        self.beta = beta
        self.rank = rank
        self.hidden_size = hidden_size
        self.adapter_size = adapter_size
        self.head = head
        self.modulate_top = modulate_top
        self.tail_synthesis = tail_synthesis
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

    # -- training ---------------------------------------------------------------

    def _concentrations(self):
        beta = np.asarray(self.beta, dtype=np.float64)
        if beta.shape == (2,):
            own, other = beta
            beta = np.full((3, 3), other) + np.eye(3) * (own - other)
        if beta.shape != (3, 3) or not np.all(np.isfinite(beta)) or np.any(beta <= 0):
            raise ValueError(
                "beta must be a pair (own, other) or a 3 x 3 array of positive, finite "
                f"Dirichlet concentrations; got {self.beta!r}."
            )
        return beta

    def _shift_basis(self, class_prior):
        log_prior = torch.log(class_prior)
        basis = torch.stack(
            [
                log_prior,
                torch.zeros_like(log_prior),
                self.lam * torch.log(inverse_prior(class_prior)),
            ]
        )
        # Softmax ignores constant offsets; centred rows keep the generated biases small.
        return basis - basis.mean(dim=1, keepdim=True)

    def _make_criterion(self, class_prior, n_steps):
        return PRLLoss(class_prior, lam=self.lam, mu=self.mu)

    def _make_module(self, n_features, n_classes, class_prior, generator, n_steps):
        beta = self._concentrations()
        # Drawn with numpy from the same seed stream: torch's Dirichlet takes no generator.
        rng = np.random.default_rng(seed_from(generator))
        alphas = np.stack([rng.dirichlet(beta[i], size=n_steps) for i in range(3)], axis=1)
        network = PRLNetwork(
            n_features,
            n_classes,
            self._shift_basis(class_prior),
            rank=self.rank,
            hidden_size=self.hidden_size,
            adapter_size=self.adapter_size,
            generator=generator,
        )
        return _DirichletTraining(network, torch.as_tensor(alphas, dtype=torch.float32))

    def _modulates_top(self):
        return self._uses_top() and self.modulate_top

    def _make_modulation(self, n_channels, generator):
        return PreferenceModulation(n_channels, self.hidden_size, generator)

    def _prediction_module(self, trained):
        return trained.network

    _recalibrates_top = True

    def _recalibrated_head(self, head, temperature, bias):
        return _RecalibratedNetwork(head, temperature, bias)

    def _network(self):
        """The fitted :class:`PRLNetwork` (behind the top stage with a TopStage head)."""
        head = self.module_.head
        head = head.head if self._uses_top() else head
        return head.network if isinstance(head, _RecalibratedNetwork) else head

    def _source_logits(self, X):
        # The uniform corner was fitted with softmax(logits + log(prior)) to the labels.
        r_hat = self._r_hats(["uniform"])
        return self._logits(X, r_hat)[0] + np.log(self.class_prior_).astype(np.float32)

    def fit(self, X, y=None, sample_weight=None, *, views=None):
        """Fit the hypernetwork and its experts on features ``X`` and labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), FeatureSplit or h5py.Dataset
            Feature vectors, e.g. frozen embeddings; a split of a feature file
            is streamed (see :class:`~ltlearn.features.FeatureSplit`).
        y : array-like of shape (n_samples,)
            Class labels (numbers or strings); may be omitted for a
            ``FeatureSplit``.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples in every expert's loss.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Augmented views of each row (of each activation map, with a
            ``TopStage`` head); each step sees one view per image (see
            ``BalancedSoftmaxClassifier.fit``).

        Returns
        -------
        self : object
            The fitted classifier.

        Notes
        -----
        For the number of threads torch computes on, and how to limit it,
        see ``BalancedSoftmaxClassifier.fit``.
        """
        self._concentrations()  # a bad beta fails before any training
        super().fit(X, y, sample_weight=sample_weight, views=views)
        self.r_ = self._network().r.detach().numpy().astype(np.float64)
        return self

    # -- preferences ------------------------------------------------------------

    def _check_preference(self, preference):
        """A preference as a (3,) float array summing to one, or a clear error."""
        if isinstance(preference, str):
            if preference not in EXPERTS:
                raise ValueError(
                    f"preference must be one of {list(EXPERTS)} or 3 non-negative weights; "
                    f"got {preference!r}."
                )
            return np.eye(3)[EXPERTS.index(preference)]
        try:
            alpha = np.asarray(preference, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"preference must be a name or 3 non-negative weights; got {preference!r}."
            ) from exc
        if alpha.shape != (3,):
            raise ValueError(
                "preference must hold 3 weights (forward, uniform, backward); "
                f"got shape {alpha.shape}: {preference!r}."
            )
        if not np.all(np.isfinite(alpha)):
            raise ValueError(f"preference must be finite; got {preference!r}.")
        if np.any(alpha < 0):
            raise ValueError(f"preference weights must be non-negative; got {preference!r}.")
        if alpha.sum() == 0:
            raise ValueError(f"preference weights must not all be zero; got {preference!r}.")
        return alpha / alpha.sum()

    def _check_prediction_params(self):
        self._check_preference(self.preference)

    def _r_hats(self, preferences):
        if len(preferences) == 0:
            raise ValueError("preferences is empty; give at least one preference.")
        alphas = np.stack([self._check_preference(p) for p in preferences])
        # The network's own r: fit's calibration on a top's held-out rows reads it before r_.
        weighted = alphas * self._network().r.detach().numpy().astype(np.float64)
        return torch.as_tensor(weighted / weighted.sum(axis=1, keepdims=True), dtype=torch.float32)

    def _scores(self, X, preference=None):
        check_is_fitted(self)
        if preference is None:
            preference = getattr(self, "preference_", self.preference)
        r_hat = self._r_hats([preference])
        X = self._validate(X)
        return self._logits(X, r_hat)[0]

    def preference_for_imbalance(self, imbalance_ratio, direction="forward"):
        """The preference this estimator suggests for a test set of a given imbalance.

        The rule: the forward corner's logits differ from the uniform corner's
        by ``log(prior)`` and the backward corner's by ``lam *
        log(inverse_prior)`` (so the generator is built, see
        :class:`PRLNetwork`). A test set with the training set's class order and
        imbalance ratio ``rho`` has, on an exponential profile, a log-prior of
        ``t * log(prior)`` with ``t = log(rho) / log(rho_train)``, ``rho_train``
        the training imbalance ratio. So a forward test set gets ``r_hat =
        (t, 1 - t, 0)`` and a backward one ``r_hat = (0, 1 - s, s)`` with ``s =
        t / lam``, each capped at its corner, and the returned preference is
        the ``alpha`` that ``r_`` maps to that ``r_hat``.

        Parameters
        ----------
        imbalance_ratio : float
            Ratio of the largest to the smallest class of the test set, >= 1;
            1 means balanced.
        direction : {"forward", "backward"}, default="forward"
            ``"forward"``: the training set's large classes are large in the test
            set too; ``"backward"``: the order is inverted.

        Returns
        -------
        preference : ndarray of shape (3,)
            Weights over (forward, uniform, backward), summing to one; pass it as
            ``preference=``.
        """
        check_is_fitted(self)
        if not (isinstance(imbalance_ratio, Real) and imbalance_ratio >= 1):
            raise ValueError(f"imbalance_ratio must be a number >= 1; got {imbalance_ratio!r}.")
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward'; got {direction!r}.")
        train_ratio = self.class_counts_.max() / max(self.class_counts_.min(), 1)
        t = math.log(imbalance_ratio) / math.log(train_ratio) if train_ratio > 1 else 0.0
        if direction == "forward":
            t = min(t, 1.0)
            r_hat = np.array([t, 1.0 - t, 0.0])
        else:
            s = min(t / self.lam, 1.0) if self.lam > 0 else 0.0
            r_hat = np.array([0.0, 1.0 - s, s])
        alpha = r_hat / self.r_
        return alpha / alpha.sum()

    def preference_for_prior(self, prior):
        """The preference whose generated head suits a test set with class frequencies ``prior``.

        Generalises :meth:`preference_for_imbalance` to any class prior. The
        head at ``r_hat`` shifts the logits by ``r_hat @ S`` (see
        :class:`PRLNetwork`), whose forward and backward rows are the
        Bayes-optimal offsets ``log(prior_train)`` and ``lam *
        log(inverse_prior)`` from a balanced model; so the points ``r_hat =
        (t_f, 1 - t_f - t_b, t_b)`` (``t_f, t_b >= 0``, ``t_f + t_b <= 1``)
        stand for the test priors ``softmax(t_f S_f + t_b S_b)``. The chosen
        point is the one whose prior is closest to ``prior`` in Kullback-Leibler
        divergence (the maximum-likelihood member of that family): classes the
        test set rarely holds weigh little, and a class estimated at zero
        (BBSE clips negative weights) does not dominate the fit. The returned
        preference is the ``alpha`` that ``r_`` maps to that ``r_hat``.

        Parameters
        ----------
        prior : array-like of shape (n_classes,)
            Class frequencies of the test set, in ``classes_`` order (they need
            not sum to one; zeros are treated as very rare classes).

        Returns
        -------
        preference : ndarray of shape (3,)
            Weights over (forward, uniform, backward), summing to one.

        Examples
        --------
        >>> from ltlearn import PRLClassifier
        >>> from ltlearn.datasets import load_long_tailed_digits
        >>> data = load_long_tailed_digits(random_state=0)
        >>> clf = PRLClassifier(random_state=0).fit(data.X_train, data.y_train)
        >>> forward = clf.preference_for_prior(clf.class_prior_)  # the training prior
        >>> bool(forward[0] > 0.9)
        True
        """
        check_is_fitted(self)
        n_classes = len(self.classes_)
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (n_classes,) or not np.all(np.isfinite(prior)) or np.any(prior < 0):
            raise ValueError(
                f"prior must hold {n_classes} finite, non-negative frequencies; got {prior!r}."
            )
        if prior.sum() <= 0:
            raise ValueError("prior must have a positive sum.")
        prior = prior / prior.sum()
        basis = self._network().shift_basis.numpy().astype(np.float64)[[0, 2]]

        def objective(t):
            # Cross-entropy of softmax(t @ basis) under prior: KL up to a constant.
            offsets = t @ basis
            log_model = offsets - logsumexp(offsets)
            return -prior @ log_model, -basis @ (prior - np.exp(log_model))

        result = minimize(
            objective,
            np.zeros(2),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * 2,
            constraints=[
                {"type": "ineq", "fun": lambda t: 1.0 - t.sum(), "jac": lambda t: -np.ones(2)}
            ],
        )
        t_f, t_b = np.clip(result.x, 0.0, 1.0)
        r_hat = np.array([t_f, max(1.0 - t_f - t_b, 0.0), t_b])
        alpha = r_hat / self.r_
        return alpha / alpha.sum()

    _adapted_attributes = (*TorchHeadClassifier._adapted_attributes, "preference_")

    def _balanced_logits(self, X):
        # The head generated for the adapted preference, less the class offsets that
        # preference stands for (see preference_for_prior): what remains of the
        # prior difference is corrected in the logits.
        preference = getattr(self, "preference_", None)
        if preference is None:
            return super()._balanced_logits(X)
        r_hat = self._r_hats([preference])
        offsets = (r_hat @ self._network().shift_basis).numpy()[0]
        return self._logits(X, r_hat)[0].astype(np.float64) - offsets

    def adapt(self, X, *, method="map", validation=None, views=None, significance=0.05, **options):
        """Infer the class prior of unlabeled rows and steer predictions to it, if it shifted.

        Estimates ``test_prior_`` and tests "no shift" as
        :meth:`BalancedSoftmaxClassifier.adapt
        <ltlearn.BalancedSoftmaxClassifier.adapt>` does (from the uniform
        corner's logits). When a shift is detected, maps the estimate to
        ``preference_`` with :meth:`preference_for_prior` and predicts with
        the head generated for that preference, its logits corrected by what
        remains between the estimated prior and the prior the preference
        stands for (PRL's preferences span a two-parameter family of priors;
        a test prior of any other shape is still reached), until the next
        ``adapt``, :meth:`reset_adaptation` or ``fit``. A ``preference=``
        argument to a prediction method still wins for that call.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Unlabeled rows of the test distribution.
        method : {"map", "em", "bbse", "rlls"}, default="map"
            Label-shift estimator; see :mod:`ltlearn.adaptation`.
        validation : (X_val, y_val), default=None
            Held-out labeled rows from the training distribution.
        views : None
            Not used: the prior is estimated from ``X``.
        significance : float in (0, 1) or None, default=0.05
            Level of the test of "no shift"; None adapts whatever it says.
        **options
            Further arguments of :func:`~ltlearn.adaptation.estimate_test_prior`.

        Returns
        -------
        self : object
        """
        super().adapt(
            X,
            method=method,
            validation=validation,
            views=views,
            significance=significance,
            **options,
        )
        if self.shift_detected_:
            self.preference_ = self.preference_for_prior(self.test_prior_)
        return self

    # -- prediction -------------------------------------------------------------

    def decision_function(self, X, preference=None, *, views=None):
        """Logits of the head generated for the preference.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preference : str or array-like of shape (3,), default=None
            Overrides the ``preference`` parameter for this call only.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row: the scores are averaged over the row
            and its views (see ``BalancedSoftmaxClassifier.decision_function``).

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes
        """
        return _decision(self._view_scores(X, views, preference))

    def predict_proba(self, X, preference=None, *, views=None):
        """Class probabilities under the preference: the softmax of its logits.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preference : str or array-like of shape (3,), default=None
            Overrides the ``preference`` parameter for this call only.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row: the scores are averaged over the row
            and its views (see ``BalancedSoftmaxClassifier.decision_function``).

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        return _proba(self._view_scores(X, views, preference))

    def predict_log_proba(self, X, preference=None, *, views=None):
        """Logarithm of :meth:`predict_proba`, computed stably.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preference : str or array-like of shape (3,), default=None
            Overrides the ``preference`` parameter for this call only.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row: the scores are averaged over the row
            and its views (see ``BalancedSoftmaxClassifier.decision_function``).

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return _log_proba(self._view_scores(X, views, preference))

    def predict(self, X, preference=None, *, views=None):
        """Predicted classes under the preference.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preference : str or array-like of shape (3,), default=None
            Overrides the ``preference`` parameter for this call only.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row: the scores are averaged over the row
            and its views (see ``BalancedSoftmaxClassifier.decision_function``).

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        scores = self._view_scores(X, views, preference)
        return self.classes_[np.argmax(scores, axis=1)]

    def decision_function_many(self, X, preferences):
        """Logits under many preferences at once, sharing the work on ``X``.

        The features are normalised and projected once; each preference then
        costs one small hypernetwork pass and an ``(n_samples, rank)`` by
        ``(rank, n_classes)`` product. (With a top it modulates,
        ``modulate_top=True``, the top runs once up to the modulated
        channels, and what follows them once per preference.)

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preferences : sequence of str or array-like of shape (n_preferences, 3)

        Returns
        -------
        scores : ndarray of shape (n_preferences, n_samples, n_classes)
            ``scores[m]`` equals ``decision_function(X, preference=preferences[m])``
            (up to float rounding), also for two classes.
        """
        check_is_fitted(self)
        r_hats = self._r_hats(list(preferences))
        X = self._validate(X)
        return self._logits(X, r_hats)

    def predict_many(self, X, preferences):
        """Predicted classes under many preferences; see :meth:`decision_function_many`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        preferences : sequence of str or array-like of shape (n_preferences, 3)

        Returns
        -------
        y_pred : ndarray of shape (n_preferences, n_samples)
        """
        scores = self.decision_function_many(X, preferences)
        return self.classes_[np.argmax(scores, axis=2)]
