"""Base class of ltlearn's torch-backed classifiers.

A subclass supplies its training loss (``_make_criterion``), its trainable
module (``_make_module``, by default the head named by its ``head`` parameter),
its logits for the training prior (``_source_logits``, which label-shift
adaptation reads) and, if it needs one, a shift of the predicted logits
(``_logit_shift``); validation, the normaliser, the training loop, prediction,
transductive adaptation and pickling live here.
"""

import io
import math
import warnings
from abc import abstractmethod
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from ltlearn._optimizers import OPTIMIZERS
from ltlearn._training import (
    LR_SCHEDULES,
    StreamedInputs,
    fit_module,
    resolve_device,
    seed_from,
    torch_generator,
)
from ltlearn.exceptions import DeviceWarning
from ltlearn.heads import NORMALIZERS, NormalizedHead, make_head, make_normalizer
from ltlearn.synthesis import synthesize_tail
from ltlearn.top_stage import CHUNK as TOP_CHUNK
from ltlearn.top_stage import TopStage, _through, fit_top_stage

# Rows per forward pass at predict time: bounds the memory of the logits and
# activations without paying per-call overhead on ordinary sizes.
_PREDICT_CHUNK = 65536


def _float_tensor(X):
    """A float32 CPU tensor over ``X``, sharing memory where the dtype allows.

    float64 values beyond float32's range would become infinite: a ValueError.
    """
    if X.dtype == np.float64 and X.size:
        peak, limit = float(np.max(np.abs(X))), float(np.finfo(np.float32).max)
        if peak > limit:
            raise ValueError(
                f"X holds values beyond the float32 range (largest magnitude {peak:.3g} > "
                f"{limit:.3g}); ltlearn trains and predicts in float32. "
                "Rescale the features, e.g. divide them by their largest magnitude."
            )
    X = np.ascontiguousarray(X, dtype=np.float32)
    with warnings.catch_warnings():
        # Read-only inputs (memory maps) are only read here, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


def _as_feature_split(X):
    """``X`` as a FeatureSplit when it is one or an h5py data set (streamed), else None."""
    module = type(X).__module__
    if not (module.startswith("h5py") or module.startswith("ltlearn.features")):
        return None  # no need to import h5py for arrays
    from ltlearn.features.io import FeatureSplit

    if isinstance(X, FeatureSplit):
        return X
    import h5py

    return FeatureSplit(X) if isinstance(X, h5py.Dataset) else None


def _resolve_schedule(lr, batch_size, max_epochs, n_samples, n_features):
    """Resolve ``"auto"`` learning rate, batch size and epochs for a training set.

    Adam moves every weight by about ``lr`` per step, so the logits of
    normalised features move with the feature width; ``"auto"`` learning rates
    of ``0.1 / sqrt(n_features)`` (2.8e-3 at 1280 features, where the defaults
    were validated; 1.3e-2 at 64) keep that pace across widths.
    ``"auto"`` batches hold 1024 rows, fewer on small sets so that an epoch
    still has about ten steps; ``"auto"`` epochs are 20, more on small sets so
    that a fit has at least 250 optimizer steps.
    """
    if lr == "auto":
        lr = 0.1 / math.sqrt(n_features)
    if batch_size == "auto":
        batch_size = min(1024, max(16, n_samples // 10))
    if max_epochs == "auto":
        max_epochs = max(20, math.ceil(250 / math.ceil(n_samples / batch_size)))
    return lr, batch_size, max_epochs


def _check_known_labels(estimator, y):
    """Raise if ``y`` holds labels that ``estimator`` never saw in fit."""
    unseen = np.setdiff1d(np.unique(np.asarray(y)), estimator.classes_)
    if unseen.size:
        shown = ", ".join(repr(v) for v in unseen[:10].tolist())
        raise ValueError(
            f"y contains {unseen.size} label(s) never seen during fit: {shown}. "
            f"{type(estimator).__name__} was fitted on classes {estimator.classes_.tolist()}."
        )


def _decision(scores):
    """``decision_function`` output of ``(n_samples, n_classes)`` logits."""
    return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores


def _proba(scores):
    return softmax(scores.astype(np.float64), axis=-1)


def _log_proba(scores):
    scores = scores.astype(np.float64)
    return scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)


class TorchHeadClassifier(ClassifierMixin, BaseEstimator):
    """Shared machinery of classifiers that train a torch head on fixed features."""

    _parameter_constraints: dict = {
        "normalize": [StrOptions(set(NORMALIZERS)), None],
        "optimizer": [StrOptions(set(OPTIMIZERS))],
        "lr": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "lr_schedule": [StrOptions(set(LR_SCHEDULES))],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "calibration_cv": [Interval(Integral, 2, None, closed="left"), None],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
    }

    @abstractmethod
    def _make_criterion(self, class_prior, n_steps):
        """The training loss, given the training class prior (a float tensor).

        ``n_steps`` is the number of optimizer steps ahead, for losses that
        change during training (deferred re-weighting).
        """

    def _fit_second_stage(self, trained, Z, y, train, generator):
        """A later training stage on the normalised features ``Z``; returns the module to keep.

        ``train(module, criterion, balanced_sampling=..., rows=..., **settings)``
        runs the shared loop with this estimator's settings (overrides
        allowed), on all rows or on ``rows``; ``generator`` continues the fit's
        random stream.
        """
        return trained

    def _make_normalizer(self, X):
        """The input normaliser, fitted on the training features ``X`` (a float tensor)."""
        return make_normalizer(self.normalize, X)

    def _initial_bias(self, class_prior):
        """Starting output bias of the head (a tensor), or None for zeros."""
        return None

    def _make_module(self, n_features, n_classes, class_prior, generator, n_steps):
        """The module to train; ``n_steps`` is the number of optimizer steps ahead.

        With a :class:`~ltlearn.top_stage.TopStage` it is the linear layer on
        the top's embeddings.
        """
        return make_head(
            "linear" if self._uses_top() else self.head,
            n_features,
            n_classes,
            hidden_size=self.hidden_size,
            cosine_scale=self.cosine_scale,
            bias_init=self._initial_bias(class_prior),
            generator=generator,
        )

    def _prediction_module(self, trained):
        """The part of the trained module that maps normalised features to logits."""
        return trained

    def _logit_shift(self):
        """An array added to the logits at predict time, or None."""
        return None

    #: Whether a :class:`~ltlearn.top_stage.TopStage` fit can correct the model's logits
    #: (``_recalibrated_head``); multi-expert models keep their experts' logits.
    _recalibrates_top = False

    def _recalibrated_head(self, head, temperature, bias):
        """``head`` made to output logits whose balanced part is divided by ``temperature``
        and shifted by ``bias`` (``_recalibrates_top`` estimators)."""
        raise NotImplementedError

    def _check_prediction_params(self):
        """Validate parameters read at predict time; ``fit`` calls it before training."""

    @abstractmethod
    def _source_logits(self, X):
        """Logits of validated ``X`` whose softmax is the posterior under ``class_prior_``."""

    #: Attributes that :meth:`adapt` sets and :meth:`reset_adaptation` removes.
    _adapted_attributes = (
        "test_prior_",
        "test_prior_interval_",
        "test_prior_effective_rows_",
        "shift_pvalue_",
        "shift_detected_",
        "test_prior_method_",
        "_adapted_logits_",
    )

    def _balanced_logits(self, X):
        """Logits of validated ``X`` whose softmax is the posterior under a uniform prior.

        Adapted predictions are these, calibrated, plus the log of the
        adapted prior.
        """
        return self._source_logits(X).astype(np.float64) - np.log(self.class_prior_)

    def adapt(self, X, *, method="map", validation=None, views=None, significance=0.05, **options):
        """Infer the class prior of unlabeled rows and predict for it from now on, if it shifted.

        A transductive step: estimates the class frequencies of ``X`` (the
        unlabeled test features, or a sample of them) with
        :func:`ltlearn.adaptation.estimate_test_prior`, from posteriors
        calibrated by the temperature cross-fitted in ``fit``
        (``calibration_cv``), and tests whether they differ from the prior
        the model predicts for today (uniform for a balanced model). Only
        when the test rejects "no shift" at ``significance`` do predictions
        change: every prediction method then returns the calibrated
        posteriors for ``test_prior_``, until the next ``adapt``,
        :meth:`reset_adaptation` or ``fit``. Predictions never change with the
        batch passed to ``predict``; only ``adapt`` changes them. The adapted
        prior takes precedence over the ``test_prior`` parameter. ``clone``
        gives an unadapted copy; pickles keep the adapted state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Unlabeled rows of the test distribution.
        method : {"map", "em", "bbse", "rlls"}, default="map"
            Label-shift estimator; see :mod:`ltlearn.adaptation`. ``"map"``
            needs no labeled data and shrinks small samples toward "no shift".
        validation : (X_val, y_val), default=None
            Held-out labeled rows from the training distribution: needed by
            ``"bbse"`` and ``"rlls"``; ``"em"`` and ``"map"`` recalibrate the
            posteriors on them (BCTS), and the adapted predictions are the
            recalibrated posteriors shifted to the estimated prior.
        views : None
            Augmented views are used by :class:`~ltlearn.SADEClassifier`'s
            aggregation only; label-shift estimation reads ``X``.
        significance : float in (0, 1) or None, default=0.05
            Level of the test of "no shift" that decides
            whether predictions change; None adapts whatever the test says.
        **options
            Further arguments of :func:`~ltlearn.adaptation.estimate_test_prior`
            (``pseudo_counts``, ``regularization``, ``calibrate``,
            ``confidence``, ...).

        Returns
        -------
        self : object
            The estimator, adapted when a shift was detected.

        Notes
        -----
        After ``adapt``, the estimator holds ``test_prior_`` (the estimate,
        whether or not a shift was detected), ``test_prior_interval_`` (shape
        (2, n_classes), lower and upper bounds at ``confidence``, default 90
        %; NaN for ``"bbse"`` and ``"rlls"``), ``test_prior_effective_rows_``
        (the number of labeled rows that would pin the prior down as
        precisely), ``shift_pvalue_``, ``shift_detected_`` and
        ``test_prior_method_`` (``method``, or ``"confusion"`` where EM's
        estimate failed the check against ``fit``'s held-out posteriors; see
        :func:`~ltlearn.adaptation.estimate_test_prior`).
        """
        from ltlearn.adaptation import estimate_test_prior

        if views is not None:
            raise ValueError(
                f"{type(self).__name__}.adapt estimates the test prior from X alone; views are "
                "used by SADEClassifier's test-time aggregation."
            )
        if "return_details" in options:
            raise TypeError("adapt() always keeps the details; return_details is not an option.")
        check_is_fitted(self)
        self.reset_adaptation()
        details = estimate_test_prior(
            self,
            X,
            method=method,
            validation=validation,
            significance=significance,
            return_details=True,
            **options,
        )
        self.test_prior_ = details.estimate
        self.test_prior_interval_ = details.interval
        self.test_prior_effective_rows_ = details.effective_rows
        self.shift_pvalue_ = details.pvalue
        self.shift_detected_ = details.shift_detected
        self.test_prior_method_ = details.method
        if details.shift_detected:
            with np.errstate(divide="ignore"):  # an estimated zero rules its class out
                log_prior = np.log(details.prior)
            # Adapted logits: scale * balanced logits + this offset.
            self._adapted_logits_ = (details.scale, details.offset + log_prior)
        return self

    def reset_adaptation(self):
        """Forget what :meth:`adapt` learnt: predictions return to the unadapted model.

        Returns
        -------
        self : object
        """
        for name in self._adapted_attributes:
            self.__dict__.pop(name, None)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    #: Whether ``fit`` can stream ``X`` from a feature file, and train on augmented
    #: views of embeddings: estimators whose later training stages revisit chosen rows
    #: of plain features in memory set this to False (with a TopStage head, the views
    #: train the top and the later stages read the plain rows through it).
    _streamable = True

    def _check_views(self, views, n_rows, where):
        """``views`` as a float array of shape (n_rows, n_views, *row), or an error.

        A row is ``(n_features_in_,)``, or the activation map's shape
        (``row_shape_``) for a trainable top.
        """
        try:
            views = np.asarray(views)
            if views.dtype not in (np.float32, np.float64):
                views = views.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"views passed to {where} must be a numeric array.") from exc
        row = tuple(self.row_shape_) if self._uses_top() else (self.n_features_in_,)
        if (
            views.ndim != 2 + len(row)
            or views.shape[0] != n_rows
            or views.shape[1] < 1
            or views.shape[2:] != row
        ):
            raise ValueError(
                f"views passed to {where} must have shape ({n_rows}, n_views, "
                f"{', '.join(map(str, row))}) with n_views >= 1 (the rows of X, then their "
                f"views, e.g. FeatureFile.views(split)); got shape {views.shape}."
            )
        if not np.all(np.isfinite(views)):
            raise ValueError(f"views passed to {where} contain NaN or infinite values.")
        return views

    #: How many tops a :class:`~ltlearn.top_stage.TopStage` head builds: one per expert.
    _n_tops = 1

    def _uses_top(self):
        return isinstance(getattr(self, "head", None), TopStage)

    def _modulates_top(self):
        """Whether a TopStage's top is scaled and shifted per condition (``_make_modulation``)."""
        return False

    def _validate(self, X, y=None, *, reset=False):
        """``validate_data`` for this estimator's input: activation maps for a trainable top."""
        top = self._uses_top()
        shape = getattr(X, "shape", None)
        if top and not reset and shape is not None and tuple(shape[1:]) != self.row_shape_:
            raise ValueError(
                f"X has rows of shape {tuple(shape[1:])}, but {type(self).__name__} was fitted "
                f"on activations of shape {self.row_shape_} (head=TopStage(...))."
            )
        checked = validate_data(
            self,
            X,
            "no_validation" if y is None else y,
            reset=reset,
            dtype=[np.float32, np.float64],
            allow_nd=top,
        )
        X = checked if y is None else checked[0]
        if top:
            if reset and X.ndim < 3:
                raise ValueError(
                    f"head=TopStage(...) trains on activations cached at a cut, of shape "
                    f"(n_samples, C, H, W) or (n_samples, tokens, D), as FeatureFile.read returns "
                    f"those of extract(..., cut=...); got X of shape {X.shape}."
                )
            if reset:
                self.row_shape_ = X.shape[1:]
            elif X.shape[1:] != self.row_shape_:
                raise ValueError(
                    f"X has rows of shape {X.shape[1:]}, but {type(self).__name__} was fitted "
                    f"on activations of shape {self.row_shape_} (head=TopStage(...))."
                )
        elif reset:
            self.__dict__.pop("row_shape_", None)
        return checked

    def _fit_top_stage(self, X, y_t, w_t, prior, generator, device, views=None):
        """Fit a :class:`~ltlearn.top_stage.TopStage` head; see :func:`.fit_top_stage`.

        Returns the trained module, the criterion and the held-out rows.
        """
        module, criterion, held, record = fit_top_stage(
            self, X, y_t, w_t, prior, generator, device, views
        )
        if type(self)._fit_second_stage is not TorchHeadClassifier._fit_second_stage:
            # The later stage trains on the fitted top's embeddings, as on an embedding file.
            rows = torch.as_tensor(np.setdiff1d(np.arange(len(X)), held))
            X_t = X if _as_feature_split(X) is not None else _float_tensor(X)
            Z = _through(module.to(device).embed, X_t, rows, device)
            module.cpu()
            schedule = _resolve_schedule(
                self.lr, self.batch_size, self.max_epochs, len(rows), Z.shape[-1]
            )
            train = self._trainer(Z, y_t[rows], w_t[rows], schedule, device, generator)
            module.head = self._fit_second_stage(module.head, Z, y_t[rows], train, generator)
        module.head = self._prediction_module(module.head)
        # Balanced accuracy on the held-out rows (higher is better), the probe's first;
        # None when nothing was validated: no fine-tuning, or no rows held out.
        self.validation_scores_ = record["validation_scores"]
        self.best_validation_score_ = (
            None if self.validation_scores_ is None else max(self.validation_scores_)
        )
        self.best_epoch_ = record["best_epoch"]
        self.history_ = self.loss_curve_ = record["history"]
        self.n_iter_ = len(self.history_)
        return module, criterion, held

    def _early_stopping_split(self, y_index, generator):
        """Rows to train on and rows held out for early stopping, as tensors (stratified)."""
        from ltlearn.datasets import train_val_split

        seed = seed_from(generator)
        with warnings.catch_warnings():
            # A class of one row stays in training; the other classes' losses choose the epoch.
            warnings.filterwarnings("ignore", message=".*single sample")
            fit_rows, held = train_val_split(
                y_index, val_size=self.validation_fraction, random_state=seed
            )
        if not len(held):
            raise ValueError(
                "early_stopping holds out rows of the classes that have two or more, but every "
                "class has a single row; set early_stopping=False."
            )
        return torch.as_tensor(fit_rows), torch.as_tensor(held)

    def _balanced_loss(self, criterion, Z, y, sample_weight, device):
        """``loss(module)``: ``criterion`` on held-out rows, each class weighing the same.

        Within a class the rows weigh as ``sample_weight`` says; class weights
        cancel. Early stopping keeps the epoch a balanced test set would prefer.
        """
        totals = torch.zeros(len(self.classes_)).index_add_(0, y, sample_weight)
        if not totals.sum() > 0:
            raise ValueError(
                "The rows early_stopping held out all weigh zero (sample_weight), so they "
                "cannot choose an epoch; set early_stopping=False or give them weight."
            )
        weights = (sample_weight / totals.clamp_min(1e-12)[y]).to(device)
        Z, y = Z.to(device), y.to(device)

        def loss(module):
            # Eval mode: losses that count training steps (LDAM's, RIDE's) must not count
            # these calls, and PRL's training module evaluates its corners.
            module.eval()
            criterion.eval()
            with torch.no_grad():
                out = torch.cat(
                    [module(Z[i : i + _PREDICT_CHUNK]) for i in range(0, len(Z), _PREDICT_CHUNK)],
                    dim=-2,
                )
                value = float(criterion(out, y, weights))
            criterion.train()
            return value

        return loss

    def _held_out_calibration(self, X, y_index):
        """Temperature and class bias of the balanced logits, fitted on held-out rows.

        The held-out rows are a top's validation part; see :meth:`_cross_fitted_calibration`.
        """
        from ltlearn.calibration import _calibrate_balanced_logits

        if len(np.unique(y_index)) < 2:
            return None
        logits = self._balanced_logits(X)
        offset = np.broadcast_to(np.log(self.class_prior_), logits.shape)
        return _calibrate_balanced_logits(logits, y_index, np.ones(len(y_index)), offset)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None, *, views=None):
        """Fit the head on features ``X`` and labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), FeatureSplit or h5py.Dataset
            Feature vectors, e.g. frozen embeddings. A split of a feature
            file (``FeatureFile(path)["train"]``) or an h5py data set is
            streamed from disk in shuffled blocks (out-of-core fitting):
            memory holds a few blocks, not the file.
        y : array-like of shape (n_samples,)
            Class labels (numbers or strings); may be omitted when ``X`` is a
            ``FeatureSplit``, whose labels are used.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the samples in the loss; the class prior
            used by the loss is computed from the weighted class totals.
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Embeddings of augmented views of each row's image (from
            ``extract(..., views=K)``, read with ``FeatureFile.views``). Each
            training step then sees one view of each sampled image, drawn
            uniformly from the plain row and its views: an epoch still has
            one row per image, and the class prior counts images, not views.
            With ``head=TopStage(...)``, activations of the views at the same
            cut, of shape ``(n_samples, n_views, *X.shape[1:])``; the
            fine-tuning epochs draw each row's map from the plain one, its
            mirror image and its views (the linear probe reads the plain maps).

        Returns
        -------
        self : object
            The fitted classifier.

        Notes
        -----
        On the CPU, torch computes on as many threads as the machine has
        cores. ``GridSearchCV(n_jobs=k)``, ``cross_validate(n_jobs=k)`` and
        the like, with joblib's default ``"loky"`` backend, already give each
        worker ``cores // k`` of them: joblib sets ``OMP_NUM_THREADS`` in its
        workers, and torch follows it. Elsewhere (in one process, or under
        joblib's ``"threading"`` backend), limit them with threadpoolctl,
        which sets the OpenMP runtime torch computes with, for the thread
        that enters it: ``with threadpool_limits(limits=2): clf.fit(X, y)``
        (likewise around ``predict``), or process-wide with
        ``torch.set_num_threads``.
        """
        device = resolve_device(self.device)
        self.reset_adaptation()
        split = _as_feature_split(X)
        if split is None:
            if y is None:
                raise ValueError(
                    f"{type(self).__name__} requires y to be passed, but the target y is None "
                    "(only a FeatureSplit of a feature file brings its own labels)."
                )
            X, y = self._validate(X, y, reset=True)
        elif self.early_stopping and not self._uses_top():
            raise ValueError(
                "early_stopping needs X in memory: it holds out rows of each class. Read the "
                "split first, e.g. X, y = FeatureFile(path).read(split), or fit the streamed "
                f"split with early_stopping=False; got {split!r}."
            )
        else:
            X, y = split, self._streamed_labels(split, y)
        if self.early_stopping and self._uses_top():
            raise ValueError(
                "early_stopping does not apply to head=TopStage(...): the TopStage holds out "
                "its own rows (TopStage(validation_fraction=...)) and keeps its best "
                "fine-tuning epoch. Set early_stopping=False."
            )
        if views is not None:
            if split is not None:
                raise ValueError(
                    "views need X in memory; read the split and its views first, e.g. "
                    "X, y, views = FeatureFile(path).read_with_views(split)."
                )
            # With a top, views train the top; the later stages read the plain rows'
            # embeddings through it.
            if not self._streamable and not self._uses_top():
                raise ValueError(
                    f"{type(self).__name__} does not train on views of embeddings: its later "
                    "training stages revisit chosen rows of the plain features. With "
                    "head=TopStage(...) on activations, views train the experts' tops."
                )
            views = self._check_views(views, len(X), "fit")
        if self._uses_top() and getattr(self, "tail_synthesis", 0):
            raise ValueError("tail_synthesis is not available with head=TopStage(...).")
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; "
                f"y holds 1 class ({self.classes_.tolist()[0]!r})."
            )
        # A bad test_prior or preference fails now, not after training.
        self._check_prediction_params()
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float32, ensure_non_negative=True
        )
        loss_weight = sample_weight
        class_weight = getattr(self, "class_weight", None)
        if class_weight is not None:
            # On top of the logit adjustment: class_prior_ below counts the classes
            # without them, and the cross-fitted calibration never sees them.
            per_class = compute_class_weight(class_weight, classes=self.classes_, y=y)
            loss_weight = (sample_weight * per_class[y_index]).astype(np.float32)
        self.class_counts_ = np.bincount(y_index, minlength=n_classes)
        weighted_totals = np.bincount(y_index, weights=sample_weight, minlength=n_classes)
        # Estimators whose loss needs the long-tailed prior have no such parameter.
        balanced_sampling = getattr(self, "balanced_sampling", False)
        if balanced_sampling:
            # Balanced batches show the loss a uniform label distribution.
            weighted_totals = np.ones(n_classes)
        # A class whose samples all weigh zero still needs a finite log-prior.
        weighted_totals = np.maximum(weighted_totals, 1e-12 * weighted_totals.sum())
        self.class_prior_ = weighted_totals / weighted_totals.sum()

        generator = torch_generator(check_random_state(self.random_state))
        y_t = torch.as_tensor(y_index, dtype=torch.int64)
        w_t = torch.from_numpy(loss_weight)
        if self._uses_top():
            prior = torch.as_tensor(self.class_prior_, dtype=torch.float32)
            module, criterion, held = self._fit_top_stage(
                X, y_t, w_t, prior, generator, device, views
            )
            self.module_ = NormalizedHead(torch.nn.Identity(), module).eval()
            self.criterion_ = criterion
            self.device_ = str(device)
            recalibrate = self.head.recalibrate and self._recalibrates_top
            calibrate = getattr(self, "calibration_cv", None) is not None
            calibration = (
                self._held_out_calibration(
                    X.take(held) if split is not None else X[held], y_index[held]
                )
                if len(held) and (calibrate or recalibrate)
                else None
            )
            if recalibrate and calibration is not None:
                temperature, bias, covariance, confusion = calibration
                module.head = self._recalibrated_head(module.head, temperature, bias)
                calibration = 1.0, np.zeros_like(bias), covariance, confusion
            self._set_calibration(calibration if calibrate else None)
            return self
        fit_rows = held = None
        if self.early_stopping:
            fit_rows, held = self._early_stopping_split(y_index, generator)
        if split is None:
            X_t = _float_tensor(X)
            # Fitted on the rows it trains on: the held-out rows stay out of everything learnt.
            normalizer = self._make_normalizer(X_t if fit_rows is None else X_t[fit_rows])
            with torch.no_grad():
                Z = normalizer(X_t)
                if views is not None:
                    # The normaliser is fitted on the plain rows and applied to every view.
                    Z_views = normalizer(_float_tensor(views.reshape(-1, views.shape[2])))
                    Z = torch.cat([Z.unsqueeze(1), Z_views.reshape(len(Z), views.shape[1], -1)], 1)
        else:
            normalizer = self._make_normalizer(split)
            Z = StreamedInputs(split, normalizer)
        if held is not None:
            # Views of the held-out images train nothing; their loss reads the plain rows.
            held_out = (Z[held] if views is None else Z[held, 0], y_t[held], w_t[held])
            Z, y_t, w_t = Z[fit_rows], y_t[fit_rows], w_t[fit_rows]
        if getattr(self, "tail_synthesis", 0):
            if split is not None:
                raise ValueError(
                    "tail_synthesis needs X in memory; read the split first, e.g. "
                    "X, y = FeatureFile(path).read(split)."
                )
            Z_new, y_new = synthesize_tail(Z, y_t, n_classes, self.tail_synthesis, generator)
            self.synthetic_counts_ = np.bincount(y_new.numpy(), minlength=n_classes)
            # A synthetic row weighs what its class's real rows weigh on average.
            # (The real rows: all of them, or those left after early stopping's hold-out.)
            real_counts = np.bincount(y_t.numpy(), minlength=n_classes)
            real = np.bincount(y_t.numpy(), weights=w_t.numpy(), minlength=n_classes)
            mean_weight = real / np.maximum(real_counts, 1)
            w_new = torch.as_tensor(mean_weight, dtype=torch.float32)[y_new]
            Z, y_t, w_t = torch.cat([Z, Z_new]), torch.cat([y_t, y_new]), torch.cat([w_t, w_new])
            if not balanced_sampling:
                # A class keeps its total weight, shared by its real and synthetic rows,
                # so that class_prior_ (and the loss's adjustment) still counts images.
                # Balanced batches draw every class equally often whatever its rows.
                share = real_counts / (real_counts + self.synthetic_counts_)
                w_t = w_t * torch.as_tensor(share, dtype=torch.float32)[y_t]
        elif hasattr(self, "tail_synthesis"):
            self.synthetic_counts_ = np.zeros(n_classes, dtype=np.int64)
        n_rows = len(y_t)
        lr, batch_size, max_epochs = _resolve_schedule(
            self.lr, self.batch_size, self.max_epochs, n_rows, X.shape[1]
        )
        prior = torch.as_tensor(self.class_prior_, dtype=torch.float32)
        n_steps = max_epochs * math.ceil(n_rows / min(batch_size, n_rows))
        criterion = self._make_criterion(prior, n_steps)
        module = self._make_module(X.shape[1], n_classes, prior, generator, n_steps)
        validation = None if held is None else self._balanced_loss(criterion, *held_out, device)

        train = self._trainer(
            Z, y_t, w_t, (lr, batch_size, max_epochs), device, generator, views=views is not None
        )
        record = {}
        stopping = validation is not None
        self.history_ = self.loss_curve_ = train(
            module,
            criterion,
            validation=validation,
            n_iter_no_change=self.n_iter_no_change if stopping else None,
            record=record,
        )
        self.n_iter_ = len(self.history_)
        # Scores, higher is better, as scikit-learn's (neg_log_loss): the negated held-out loss.
        self.validation_scores_ = [-s for s in record["validation_scores"]] if stopping else None
        self.best_validation_score_ = max(self.validation_scores_) if stopping else None
        self.best_epoch_ = record["best_epoch"] if stopping else self.n_iter_
        module = self._fit_second_stage(module, Z, y_t, train, generator)
        self.module_ = NormalizedHead(normalizer, self._prediction_module(module)).eval()
        self.criterion_ = criterion
        self.device_ = str(device)
        self._set_calibration(
            None
            if split is not None or getattr(self, "calibration_cv", None) is None
            else self._cross_fitted_calibration(X, y, sample_weight, views)
        )
        return self

    def _trainer(self, Z, y_t, w_t, schedule, device, generator, views=False):
        """``train(module, criterion, ...)``: the shared loop on these rows with this estimator's
        settings, so that every stage trains alike; see :meth:`_fit_second_stage`.

        ``schedule`` is the resolved ``(lr, batch_size, max_epochs)``; ``rows``
        restricts a call to a subset (e.g. to hold some rows out), and keyword
        settings override the estimator's.
        """
        lr, batch_size, max_epochs = schedule
        balanced = getattr(self, "balanced_sampling", False)

        def train(module, criterion, *, balanced_sampling=balanced, desc=None, rows=None, **kw):
            settings = dict(
                optimizer=self.optimizer,
                lr=lr,
                weight_decay=self.weight_decay,
                max_epochs=max_epochs,
                batch_size=batch_size,
                lr_schedule=self.lr_schedule,
            )
            settings.update(kw)
            inputs, targets, weights = Z, y_t, w_t
            if rows is not None:
                rows = torch.as_tensor(rows)
                inputs, targets, weights = Z[rows], y_t[rows], w_t[rows]
            return fit_module(
                module,
                criterion,
                inputs,
                targets,
                sample_weight=weights,
                balanced_sampling=balanced_sampling,
                device=device,
                generator=generator,
                verbose=self.verbose,
                desc=desc or type(self).__name__,
                views=views,
                **settings,
            )

        return train

    def _set_calibration(self, calibration):
        """Store ``(temperature, class bias, its covariance, confusion)``; None: unknown."""
        n_classes = len(self.classes_)
        if calibration is None:
            calibration = 1.0, np.zeros(n_classes), np.zeros((n_classes, n_classes)), None
        (
            self.calibration_temperature_,
            self.calibration_bias_,
            self.calibration_bias_covariance_,
            confusion,
        ) = calibration
        (
            self.calibration_confusion_,
            self.calibration_confusion_covariance_,
            self.calibration_confusion_counts_,
        ) = (None, None, None) if confusion is None else confusion

    def _cross_fitted_calibration(self, X, y, sample_weight, views):
        """Temperature of the balanced logits and the class bias left, from out-of-fold predictions.

        Each of ``calibration_cv`` folds is predicted by a copy of this
        estimator fitted on the other folds; the temperature ``T`` minimises
        the weighted negative log-likelihood of ``softmax(f / T + log p)``
        over all out-of-fold rows, ``f`` being the balanced logits and ``p``
        the fold model's class prior (which the temperature must not scale).
        Label-shift estimation reads posteriors calibrated this way: a head
        regularised for accuracy is under-confident on small sets, which EM
        turns into a prior biased toward the tail.

        The class offsets that would calibrate the out-of-fold posteriors
        further come next (see :func:`~ltlearn.calibration._fit_class_bias`),
        shrunk toward zero by their noise (:func:`~ltlearn.calibration._shrunk_bias`),
        with the covariance of the unshrunk ones. Adaptation adds the offsets to
        the calibrated logits; its test of "no shift" and its intervals allow
        for their covariance.
        """
        from sklearn.model_selection import StratifiedKFold

        from ltlearn.calibration import _calibrate_balanced_logits

        counts = self.class_counts_
        n_splits = min(self.calibration_cv, int(counts.max()))
        if n_splits < 2:
            return None
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # Classes with fewer rows than folds are left out of some training folds.
            warnings.filterwarnings("ignore", message="The least populated class")
            splits = list(folds.split(X, y))
        n_classes = len(self.classes_)
        logits, offsets, targets, weights = [], [], [], []
        for train, held in splits:
            if len(np.unique(y[train])) < 2:
                continue
            fold = clone(self).set_params(calibration_cv=None, verbose=False)
            fold.fit(
                X[train],
                y[train],
                sample_weight[train],
                views=None if views is None else views[train],
            )
            held = held[np.isin(y[held], fold.classes_)]
            if not held.size:
                continue
            columns = np.searchsorted(self.classes_, fold.classes_)
            balanced = np.zeros((len(held), n_classes))
            balanced[:, columns] = fold._balanced_logits(X[held])
            # A class the fold never saw cannot be predicted by it.
            offset = np.full(n_classes, -np.inf)
            offset[columns] = np.log(fold.class_prior_)
            logits.append(balanced)
            offsets.append(np.broadcast_to(offset, balanced.shape))
            targets.append(np.searchsorted(self.classes_, y[held]))
            weights.append(sample_weight[held].astype(np.float64))
        if not logits or np.concatenate(weights).sum() <= 0:
            return None
        return _calibrate_balanced_logits(
            np.concatenate(logits),
            np.concatenate(targets),
            np.concatenate(weights),
            np.concatenate(offsets),
        )

    def _streamed_labels(self, split, y):
        """``y`` for rows streamed from ``split``, checked; the split's labels when None."""
        top = self._uses_top()
        if top and len(split.shape) < 3:
            raise ValueError(
                "head=TopStage(...) trains on activations cached at a cut, but the "
                f"{split.name} holds embeddings of shape {split.shape}; extract with "
                "extract(..., cut=...) for a trainable top, or fit the embeddings with "
                "head='linear'."
            )
        if not top and len(split.shape) > 2:
            raise ValueError(
                f"The {split.name} holds activations cached at a cut, rows of shape "
                f"{split.shape[1:]}; fit them with head=TopStage(...), or extract embeddings "
                "(extract without cut=) for this head."
            )
        if not self._streamable and not top:
            raise ValueError(
                f"{type(self).__name__} needs X in memory: its later training stages revisit "
                f"chosen rows. Read the split first, e.g. X, y = FeatureFile(path).read(split); "
                f"got {split!r}."
            )
        if y is None:
            if split.labels is None:
                raise ValueError(f"y is needed: {split.name} comes without labels.")
            y = split.labels
        y = column_or_1d(y, warn=True)
        if len(y) != split.shape[0]:
            raise ValueError(f"y has {len(y)} labels; {split!r} has {split.shape[0]} rows.")
        self.n_features_in_ = split.shape[1]
        self.__dict__.pop("feature_names_in_", None)
        if top:
            self.row_shape_ = split.shape[1:]
        return y

    def _logits(self, X, *args):
        """Raw logits of validated ``X`` as a float32 array, computed on the CPU.

        ``args`` go to the module after the features; rows are on axis -2.
        """
        X_t = _float_tensor(X)
        chunk = TOP_CHUNK if self._uses_top() else _PREDICT_CHUNK
        with torch.inference_mode():
            parts = [self.module_(X_t[i : i + chunk], *args) for i in range(0, len(X_t), chunk)]
        logits = torch.cat(parts, dim=-2).numpy()
        if not np.all(np.isfinite(logits)):
            # Only unnormalised features of extreme magnitude get here (normalize=None).
            bad = np.flatnonzero(~np.isfinite(logits).reshape(-1, logits.shape[-1]).all(axis=1))
            raise ValueError(
                f"The logits of {bad.size} row(s) overflowed float32 (e.g. rows "
                f"{bad[:5].tolist()}): their features are too large for a model fitted with "
                f"normalize={self.normalize!r}. Rescale X, or fit with normalize='l2'."
            )
        return logits

    def _scores(self, X):
        check_is_fitted(self)
        X = self._validate(X)
        scores = self._logits(X)
        shift = self._logit_shift()
        return scores if shift is None else scores + shift.astype(np.float32)

    def _view_scores(self, X, views, *args):
        """``_scores`` of ``X``, averaged with those of its test-time ``views`` when given.

        The logits are averaged (the geometric mean of the views'
        probabilities, renormalised): on validation it was as accurate as
        averaging probabilities and keeps ``decision_function`` linear in
        the views.
        """
        adapted = getattr(self, "_adapted_logits_", None)
        if adapted is not None and all(a is None for a in args):
            # Adapted: the calibrated balanced logits plus the adapted offset.
            check_is_fitted(self)
            X = self._validate(X)
            views = None if views is None else self._check_views(views, len(X), "prediction")
            score = self._balanced_logits
            scale, offset = adapted
            args = ()
            scores = score(X)
        else:
            score = self._scores
            scale, offset = 1.0, None
            scores = score(X, *args)
        if views is not None:
            views = self._check_views(views, len(scores), "prediction")
            total = scores.astype(np.float64)
            for v in range(views.shape[1]):
                total += score(views[:, v], *args)
            scores = total / (views.shape[1] + 1)
        if offset is not None:
            scores = scale * scores + offset
        return scores.astype(np.float32)

    def decision_function(self, X, *, views=None):
        """Class scores: the logits, shifted as the estimator's parameters say.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time augmentation: embeddings of augmented views of each
            row's image; the scores are averaged over the row and its views.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes
            For two classes, the score of ``classes_[1]`` minus that of ``classes_[0]``.
        """
        return _decision(self._view_scores(X, views))

    def predict_proba(self, X, *, views=None):
        """Class probabilities: the softmax of the (shifted) logits.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row, as in :meth:`decision_function`.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns follow ``classes_``.
        """
        return _proba(self._view_scores(X, views))

    def predict_log_proba(self, X, *, views=None):
        """Logarithm of :meth:`predict_proba`, computed stably.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row, as in :meth:`decision_function`.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return _log_proba(self._view_scores(X, views))

    def predict(self, X, *, views=None):
        """Predict the class of each row of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        views : array-like of shape (n_samples, n_views, n_features), default=None
            Test-time views of each row, as in :meth:`decision_function`.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        scores = self._view_scores(X, views)
        return self.classes_[np.argmax(scores, axis=1)]

    def score(self, X, y, sample_weight=None):
        """Accuracy on ``(X, y)``; labels unseen during fit are an error.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        _check_known_labels(self, y)
        return super().score(X, y, sample_weight=sample_weight)

    # Modules are pickled through torch.save and loaded with map_location="cpu",
    # so a model whose tensors were saved on a GPU loads on a machine without one.
    def __getstate__(self):
        # object.__getstate__ hands out the live __dict__: copy before replacing entries.
        state = dict(super().__getstate__())
        tensors = {k: v for k, v in state.items() if isinstance(v, (torch.nn.Module, torch.Tensor))}
        if tensors:
            # torch.save records each tensor's device, which __setstate__ maps to the CPU.
            buffer = io.BytesIO()
            torch.save(tensors, buffer)
            state = {k: v for k, v in state.items() if k not in tensors}
            state["_torch_state"] = buffer.getvalue()
        return state

    def __setstate__(self, state):
        state = dict(state)
        payload = state.pop("_torch_state", None)
        if payload is not None:
            locations = set()

            def to_cpu(storage, location):
                locations.add(location)
                return storage

            state.update(torch.load(io.BytesIO(payload), map_location=to_cpu, weights_only=False))
            if locations - {"cpu"}:
                warnings.warn(
                    f"This {type(self).__name__} was pickled with tensors on "
                    f"{sorted(locations - {'cpu'})}; they were loaded on the CPU.",
                    DeviceWarning,
                    stacklevel=2,
                )
        super().__setstate__(state)
