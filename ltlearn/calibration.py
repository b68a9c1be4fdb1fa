"""Temperature scaling for long-tailed classifiers, with head-to-tail importance weights.

Chen & Su, "Transfer Knowledge from Head to Tail: Uncertainty Calibration under
Long-tailed Distribution" (CVPR 2023): a temperature fitted on a long-tailed
calibration set does not transfer to a balanced test set, because the tail is
barely represented. The paper models each class's features by a Gaussian,
moves each tail class's Gaussian towards its Wasserstein-nearest head classes,
and weighs tail samples by the density ratio of the moved and the original
Gaussian when fitting the temperature. This module implements that weighting
(``weighting="wasserstein"``), plain and class-balanced weights, their product,
and an optional class-wise bias fitted with the same weights.
"""

from numbers import Integral, Real

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, _fit_context
from sklearn.decomposition import PCA
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["LongTailTemperatureScaler", "wasserstein_importance_weights"]

WEIGHTINGS = ("none", "class_balanced", "wasserstein", "class_balanced_wasserstein")


def _class_gaussians(Z, y_index, classes_present, variance_floor):
    """Mean and standard deviation (diagonal) of each present class, floored."""
    floor = variance_floor * Z.var(axis=0).mean()
    means = np.stack([Z[y_index == c].mean(axis=0) for c in classes_present])
    variances = np.stack([Z[y_index == c].var(axis=0) for c in classes_present])
    return means, np.sqrt(np.maximum(variances, floor))


def _log_normal(Z, mean, std):
    """Log density of rows of ``Z`` under a diagonal Gaussian (log space: no overflow)."""
    return -0.5 * np.sum(((Z - mean) / std) ** 2 + 2 * np.log(std) + np.log(2 * np.pi), axis=1)


def wasserstein_importance_weights(
    Z, y_index, head_mask, *, alpha=0.9, clip=(0.3, 5.0), variance_floor=1e-3
):
    """Importance weights of tail samples from head-to-tail Gaussian transfer (Chen & Su 2023).

    For each tail class ``c`` (``head_mask[c]`` False) with diagonal Gaussian
    ``N(mu_c, sigma_c^2)`` of its features: the squared Wasserstein-2 distance
    to each head class ``k``, ``d_ck = ||mu_c - mu_k||^2 + ||sigma_c - sigma_k||^2``;
    attention ``s_c = softmax(-d_c / sqrt(dim))`` over head classes; moved
    statistics ``mu_c* = alpha mu_c + (1 - alpha) sum_k s_ck mu_k`` and the same
    for ``sigma``; and for each sample ``x`` of class ``c`` the weight
    ``N(x; mu_c*, sigma_c*) / N(x; mu_c, sigma_c)``, clipped to ``clip``. Head
    samples weigh 1.

    Parameters
    ----------
    Z : ndarray of shape (n_samples, dim)
        Features of the calibration samples.
    y_index : ndarray of shape (n_samples,)
        Class index of each sample.
    head_mask : ndarray of bool, shape (n_classes,)
        Which classes are head classes.
    alpha : float, default=0.9
        Weight of a tail class's own statistics in the moved ones.
    clip : (float, float), default=(0.3, 5.0)
        Bounds of the density ratio.
    variance_floor : float, default=1e-3
        Smallest per-dimension variance, as a fraction of the mean feature
        variance: classes with one or few samples still get a proper Gaussian.

    Returns
    -------
    weights : ndarray of shape (n_samples,)

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Z = np.vstack([rng.normal(0, 1, (200, 4)), rng.normal(3, 1, (10, 4))])
    >>> y = np.repeat([0, 1], [200, 10])
    >>> w = wasserstein_importance_weights(Z, y, np.array([True, False]))
    >>> bool(np.all(w[:200] == 1) and np.all((w[200:] >= 0.3) & (w[200:] <= 5)))
    True
    """
    weights = np.ones(len(Z))
    present = np.unique(y_index)
    head = present[head_mask[present]]
    tail = present[~head_mask[present]]
    if len(head) == 0 or len(tail) == 0:
        return weights
    means, stds = _class_gaussians(Z, y_index, present, variance_floor)
    row = {c: i for i, c in enumerate(present)}
    head_means = means[[row[k] for k in head]]
    head_stds = stds[[row[k] for k in head]]
    for c in tail:
        mu, sigma = means[row[c]], stds[row[c]]
        distance = ((mu - head_means) ** 2).sum(axis=1) + ((sigma - head_stds) ** 2).sum(axis=1)
        attention = softmax(-distance / np.sqrt(Z.shape[1]))
        mu_moved = alpha * mu + (1 - alpha) * attention @ head_means
        sigma_moved = alpha * sigma + (1 - alpha) * attention @ head_stds
        members = y_index == c
        log_ratio = _log_normal(Z[members], mu_moved, sigma_moved) - _log_normal(
            Z[members], mu, sigma
        )
        weights[members] = np.clip(np.exp(np.minimum(log_ratio, 50.0)), *clip)
    return weights


def _fit_temperature(logits, y_index, weights, bounds, fit_bias, offset=0.0):
    """Minimise the weighted NLL of ``softmax(logits / T + b + offset)``; returns (T, b).

    ``offset`` (e.g. a log prior that the temperature must not scale) may hold
    ``-inf`` for classes a row cannot have.
    """
    n_classes = logits.shape[1]
    onehot = np.eye(n_classes)[y_index]
    weights = weights / weights.sum()

    def loss_and_grad(theta):
        log_t = theta[0]
        bias = np.concatenate([[0.0], theta[1:]]) if fit_bias else 0.0
        scaled = logits * np.exp(-log_t)
        log_p = log_softmax(scaled + bias + offset, axis=1)
        loss = -np.sum(weights * log_p[np.arange(len(y_index)), y_index])
        residual = weights[:, None] * (np.exp(log_p) - onehot)
        grad = [-np.sum(residual * scaled)]
        if fit_bias:
            # The first class's bias stays 0: softmax ignores a common offset.
            grad = np.concatenate([grad, residual.sum(axis=0)[1:]])
        return loss, np.asarray(grad)

    theta0 = np.zeros(n_classes if fit_bias else 1)
    box = [(np.log(bounds[0]), np.log(bounds[1]))] + [(None, None)] * (len(theta0) - 1)
    result = minimize(loss_and_grad, theta0, jac=True, method="L-BFGS-B", bounds=box)
    bias = np.concatenate([[0.0], result.x[1:]]) if fit_bias else np.zeros(n_classes)
    return float(np.exp(result.x[0])), bias - bias.mean()


def _fit_class_bias(logits, y_index, weights, max_iter=50):
    """Mean-zero class offsets ``b`` minimising the NLL of ``softmax(logits + b)``; and covariance.

    ``logits`` may hold ``-inf`` for classes a row cannot have. ``weights``
    count rows (frequency weights, rescaled to sum to the number of rows), so
    the covariance, the inverse observed information restricted to mean-zero
    offsets, is as wide as the rows are few: the tail's offsets come with
    wide bands. Newton's method on a convex objective.
    """
    n_rows, n_classes = logits.shape
    onehot = np.eye(n_classes)[y_index]
    weights = weights * (n_rows / weights.sum())
    # A class no row has gets no information; its offset stays 0 with zero variance.
    seen = (weights @ onehot) > 0
    bias = np.zeros(n_classes)
    centre = np.eye(n_classes) - 1.0 / n_classes
    for _ in range(max_iter):
        p = softmax(logits + bias, axis=1)
        grad = (weights[:, None] * (p - onehot)).sum(axis=0)
        hessian = np.diag(weights @ p) - (weights[:, None] * p).T @ p
        hessian = hessian[np.ix_(seen, seen)]
        step = np.zeros(n_classes)
        step[seen] = np.linalg.lstsq(hessian, grad[seen], rcond=None)[0]
        bias -= step / max(1.0, np.max(np.abs(step)))  # damped: no overshoot from afar
        bias -= bias.mean()
        if np.max(np.abs(step)) < 1e-8:
            break
    p = softmax(logits + bias, axis=1)
    information = np.diag(weights @ p) - (weights[:, None] * p).T @ p
    covariance = centre @ np.linalg.pinv(information, rcond=1e-10, hermitian=True) @ centre
    return bias, covariance


def _shrunk_bias(bias, covariance):
    """Class offsets shrunk toward zero by how far each stands out of its noise.

    Empirical Bayes (Efron & Morris, "Data Analysis Using Stein's Estimator
    and its Generalizations", JASA 1975): offsets drawn around zero with a
    variance ``tau2``, each measured with its own variance ``v_c`` (the
    diagonal of ``covariance``); ``tau2`` is their excess spread by the
    method of moments, and each offset is kept in the share ``tau2 / (tau2 +
    v_c)``. A tail class's offset, measured on a few rows, shrinks most;
    offsets many standard errors wide, as a head regularised too hard leaves,
    stay almost whole, and noise alone vanishes.
    """
    variance = np.clip(np.diag(covariance), 0.0, None)
    spread = max(0.0, float(np.mean(bias**2 - variance)))
    if spread == 0.0 or not np.any(variance):
        return np.zeros_like(bias)
    shrunk = bias * spread / (spread + variance)
    return shrunk - shrunk.mean()


#: Most classes for which ``fit`` keeps the within-class covariances of the
#: held-out posteriors (``n_classes ** 3`` numbers: 4 MB at 100 classes).
MAX_CONFUSION_CLASSES = 100


def _posterior_confusion(posteriors, y_index, n_classes):
    """Mean and covariance of held-out posteriors per true class, and the class counts.

    Row ``c`` of the mean is what the posteriors average to over rows of class
    ``c``: a soft confusion matrix, from which label-shift adaptation checks
    that EM's estimate explains the test rows (see
    :func:`ltlearn.adaptation.estimate_test_prior`). None when a class has no
    held-out row or there are more than :data:`MAX_CONFUSION_CLASSES` classes.
    """
    counts = np.bincount(y_index, minlength=n_classes)
    if n_classes > MAX_CONFUSION_CLASSES or np.any(counts == 0):
        return None
    means = np.stack([posteriors[y_index == c].mean(axis=0) for c in range(n_classes)])
    # Unbiased (a tail of a few rows would otherwise look less noisy than it is);
    # a class of one row has no spread to measure.
    covariances = np.stack(
        [
            np.cov(posteriors[y_index == c], rowvar=False).reshape(n_classes, n_classes)
            if counts[c] > 1
            else np.zeros((n_classes, n_classes))
            for c in range(n_classes)
        ]
    )
    # float32 halves what a pickle holds (4 MB at 100 classes); the test needs no more.
    return means, covariances.astype(np.float32), counts


def _calibrate_balanced_logits(logits, y_index, weights, offset):
    """Calibration of held-out balanced logits, and the confusion of the calibrated posteriors.

    The temperature ``T`` minimises the weighted NLL of ``softmax(logits / T +
    offset)`` (``offset``: the log prior the logits were trained for, which
    ``T`` must not scale, ``-inf`` for a class a row cannot have); then the
    class offsets that calibrate those posteriors further
    (:func:`_fit_class_bias`), shrunk toward zero by their noise
    (:func:`_shrunk_bias`). Returns ``(T, shrunk offsets, the unshrunk
    offsets' covariance, confusion)``, the last from
    :func:`_posterior_confusion` on the posteriors calibrated by both.
    """
    temperature, _ = _fit_temperature(
        logits, y_index, weights, bounds=(0.01, 100.0), fit_bias=False, offset=offset
    )
    with np.errstate(invalid="ignore"):  # -inf offsets stay -inf
        calibrated = logits / temperature + offset
    bias, covariance = _fit_class_bias(calibrated, y_index, weights)
    shrunk = _shrunk_bias(bias, covariance)
    posteriors = softmax(calibrated + shrunk, axis=1)
    confusion = _posterior_confusion(posteriors, y_index, logits.shape[1])
    return temperature, shrunk, covariance, confusion


class LongTailTemperatureScaler(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Temperature scaling of a fitted classifier, weighted for a long-tailed calibration set.

    Fits one temperature ``T`` (and, with ``bias=True``, one bias per class) on
    a calibration set, minimising the importance-weighted negative
    log-likelihood of ``softmax(logits / T + b)``, so that probabilities are
    calibrated on a balanced test set although the calibration set is
    long-tailed. The wrapped classifier is never refitted.

    The weighting follows Chen & Su, "Transfer Knowledge from Head to Tail:
    Uncertainty Calibration under Long-tailed Distribution" (CVPR 2023), see
    :func:`wasserstein_importance_weights`, or the simpler class-balanced
    weights (``1 / class count``), or both multiplied.

    Parameters
    ----------
    estimator : classifier
        A fitted classifier with ``decision_function`` or ``predict_proba``
        (any scikit-learn classifier, ltlearn's own, a ``Pipeline``, or a
        ``FrozenEstimator``; wrap it in ``sklearn.frozen.FrozenEstimator`` to
        ``clone`` or grid-search this meta-estimator). Its logits are
        ``decision_function(X)``, or ``log(predict_proba(X))``.
    weighting : {"class_balanced", "wasserstein", "class_balanced_wasserstein", "none"}, \
default="class_balanced"
        Sample weights of the calibration loss. ``"none"`` is plain temperature
        scaling; ``"class_balanced"`` weighs each sample by ``1 / (n_classes *
        class count)`` (scaled to a mean of one), which makes every class count
        equally, as on a balanced test set; ``"wasserstein"`` is the paper's
        method; ``"class_balanced_wasserstein"`` multiplies the two. The default
        was chosen on a validation split of CIFAR-10-LT embeddings (see
        ``docs/benchmarks.md``): class-balanced weights calibrated best on
        average over plain and logit-adjusted heads at IR 100, 50 and 10.
    bias : bool, default=False
        Also fit a bias per class (temperature plus bias scaling): corrects the
        label shift of a head trained without logit adjustment. Predictions may
        then change; with a temperature alone they never do.
    head_classes : int, float or array-like, default=100
        Which classes are "head" for the Wasserstein transfer: an int ``zeta``
        takes the classes with at least ``zeta`` calibration samples; a float
        in (0, 1] that fraction of the classes, largest first; an array the
        listed class labels.
    alpha : float, default=0.9
        Weight of a tail class's own statistics in its moved Gaussian.
    clip : (float, float), default=(0.3, 5.0)
        Bounds of the density ratios.
    n_components : int or None, default=None
        Fit the class Gaussians in a PCA projection of the features with this
        many components (in high dimensions the density ratios saturate at the
        clip bounds); None uses the features as they are.
    variance_floor : float, default=1e-3
        Smallest per-dimension variance of a class Gaussian, as a fraction of
        the mean feature variance.
    temperature_bounds : (float, float), default=(0.05, 5.0)
        Range of the fitted temperature.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The wrapped classifier's classes.
    n_features_in_ : int
    temperature_ : float
    bias_ : ndarray of shape (n_classes,)
        Class-wise biases added after dividing by the temperature (zeros unless
        ``bias=True``), centred on zero.
    sample_weights_ : ndarray of shape (n_calibration_samples,)
        The weights of the calibration samples in the loss, mean one.
    head_classes_ : ndarray
        Labels of the head classes (used by the Wasserstein weighting).
    calibration_counts_ : ndarray of shape (n_classes,)
        Calibration samples per class (classes absent from the calibration set
        have 0 and do not enter the loss).

    Examples
    --------
    >>> from sklearn.frozen import FrozenEstimator
    >>> from ltlearn import BalancedSoftmaxClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits, train_val_split
    >>> data = load_long_tailed_digits(random_state=0)
    >>> train, cal = train_val_split(data.y_train, val_size=0.3, random_state=0)
    >>> X, y = data.X_train, data.y_train
    >>> clf = BalancedSoftmaxClassifier(random_state=0).fit(X[train], y[train])
    >>> scaler = LongTailTemperatureScaler(FrozenEstimator(clf), head_classes=20)
    >>> scaler = scaler.fit(X[cal], y[cal])
    >>> bool(0.05 <= scaler.temperature_ <= 5.0)
    True
    >>> bool((scaler.predict(data.X_test) == clf.predict(data.X_test)).all())
    True
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["predict"])],
        "weighting": [StrOptions(set(WEIGHTINGS))],
        "bias": ["boolean"],
        "head_classes": [
            Interval(Integral, 1, None, closed="left"),
            Interval(Real, 0, 1, closed="right"),
            "array-like",
        ],
        "alpha": [Interval(Real, 0, 1, closed="both")],
        "clip": [tuple, list],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "variance_floor": [Interval(Real, 0, None, closed="neither")],
        "temperature_bounds": [tuple, list],
    }

    def __init__(
        self,
        estimator,
        *,
        weighting="class_balanced",
        bias=False,
        head_classes=100,
        alpha=0.9,
        clip=(0.3, 5.0),
        n_components=None,
        variance_floor=1e-3,
        temperature_bounds=(0.05, 5.0),
    ):
        self.estimator = estimator
        self.weighting = weighting
        self.bias = bias
        self.head_classes = head_classes
        self.alpha = alpha
        self.clip = clip
        self.n_components = n_components
        self.variance_floor = variance_floor
        self.temperature_bounds = temperature_bounds

    def _estimator_logits(self, X):
        if hasattr(self.estimator, "decision_function"):
            logits = np.asarray(self.estimator.decision_function(X), dtype=np.float64)
            if logits.ndim == 1:  # binary: the score of classes_[1] against classes_[0]
                logits = np.stack([np.zeros_like(logits), logits], axis=1)
        else:
            with np.errstate(divide="ignore"):
                logits = np.log(np.asarray(self.estimator.predict_proba(X), dtype=np.float64))
            # A zero probability stays a (very) unlikely class rather than -inf.
            logits = np.maximum(logits, np.log(np.finfo(np.float64).tiny))
        if not np.all(np.isfinite(logits)):
            raise ValueError(
                f"The logits of {type(self.estimator).__name__} hold NaN or infinite values "
                f"for {int(np.sum(~np.isfinite(logits).all(axis=1)))} rows; cannot calibrate them."
            )
        return logits

    def _head_mask(self, counts):
        spec = self.head_classes
        if isinstance(spec, Integral):
            return counts >= spec
        if isinstance(spec, Real):
            n_head = max(1, int(round(spec * len(counts))))
            mask = np.zeros(len(counts), dtype=bool)
            mask[np.argsort(-counts, kind="stable")[:n_head]] = True
            return mask
        listed = np.asarray(spec)
        unknown = np.setdiff1d(listed, self.classes_)
        if unknown.size:
            raise ValueError(
                f"head_classes lists {unknown.tolist()}, not classes of the estimator "
                f"({self.classes_.tolist()})."
            )
        return np.isin(self.classes_, listed)

    def _check_pair(self, name, low_min):
        pair = getattr(self, name)
        if len(pair) != 2 or not (low_min <= pair[0] < pair[1]):
            raise ValueError(
                f"{name} must be a pair (low, high) with {low_min} <= low < high; got {pair!r}."
            )
        return pair

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y):
        """Fit the temperature (and biases) on a calibration set.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Calibration features, as the wrapped estimator takes them; the class
            Gaussians of the Wasserstein weighting are fitted on them.
        y : array-like of shape (n_samples,)
            Calibration labels, all among the estimator's classes.

        Returns
        -------
        self : object
        """
        clip = self._check_pair("clip", 0)
        bounds = self._check_pair("temperature_bounds", 1e-12)
        check_is_fitted(
            self.estimator,
            msg=(
                f"LongTailTemperatureScaler needs a fitted estimator; this "
                f"{type(self.estimator).__name__} is not fitted. Fit it first (or wrap the fitted "
                "model in sklearn.frozen.FrozenEstimator)."
            ),
        )
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        self.classes_ = np.asarray(self.estimator.classes_)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(
                f"y holds labels the estimator was not fitted on: {unknown.tolist()[:10]}; "
                f"its classes are {self.classes_.tolist()}."
            )
        y_index = np.searchsorted(self.classes_, y)
        logits = self._estimator_logits(X)
        counts = np.bincount(y_index, minlength=len(self.classes_))
        self.calibration_counts_ = counts
        head = self._head_mask(counts)
        self.head_classes_ = self.classes_[head]

        weights = np.ones(len(y))
        if self.weighting in ("class_balanced", "class_balanced_wasserstein"):
            weights /= counts[y_index]
        if self.weighting in ("wasserstein", "class_balanced_wasserstein"):
            Z = X
            if self.n_components is not None:
                Z = PCA(min(self.n_components, *X.shape), random_state=0).fit_transform(X)
            weights *= wasserstein_importance_weights(
                np.asarray(Z, dtype=np.float64),
                y_index,
                head,
                alpha=self.alpha,
                clip=clip,
                variance_floor=self.variance_floor,
            )
        self.sample_weights_ = weights / weights.mean()
        self.temperature_, self.bias_ = _fit_temperature(
            logits, y_index, self.sample_weights_, bounds, self.bias
        )
        return self

    def decision_function(self, X):
        """Calibrated logits: ``logits / temperature_ + bias_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._estimator_logits(X) / self.temperature_ + self.bias_

    def predict_proba(self, X):
        """Calibrated probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X):
        """The most probable class: the estimator's own prediction unless ``bias=True``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        scores = self.decision_function(X)
        return self.classes_[np.argmax(scores, axis=1)]
