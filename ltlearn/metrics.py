"""Accuracy by class, by shot group and over shifted test distributions, and scorers.

The many / medium / few split follows the usual long-tailed protocol (Liu et
al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019):
classes with more than 100 training samples are "many-shot", fewer than 20
"few-shot", the rest "medium". The thresholds are arguments of every function
that uses them.
"""

import copy
from numbers import Integral, Real

import numpy as np
from sklearn.metrics import get_scorer
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ltlearn.datasets import TEST_DISTRIBUTIONS, shifted_test_subsets

__all__ = [
    "SCORERS",
    "adaptive_calibration_error",
    "brier_score",
    "classwise_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "group_accuracy",
    "make_shot_scorer",
    "per_class_accuracy",
    "rank_groups",
    "shot_accuracy",
    "shot_groups",
    "evaluate_preferences",
    "evaluate_test_agnostic",
]

SHOT_GROUPS = ("many", "medium", "few")


def _label_positions(y, labels, what):
    """Positions of ``y`` in ``labels``; unknown labels are an error."""
    y = np.asarray(y)
    labels = np.asarray(labels)
    sorter = np.argsort(labels, kind="stable")
    pos = np.searchsorted(labels, y, sorter=sorter)
    pos = np.clip(pos, 0, len(labels) - 1)
    known = labels[sorter[pos]] == y
    if not np.all(known):
        unseen = np.unique(y[~known])[:10].tolist()
        raise ValueError(
            f"{what} contains labels that are not among the {len(labels)} known classes: "
            f"{unseen}. Pass labels= with every class, in the order of class_counts."
        )
    return sorter[pos]


@validate_params(
    {"y_true": ["array-like"], "y_pred": ["array-like"], "labels": ["array-like", None]},
    prefer_skip_nested_validation=True,
)
def per_class_accuracy(y_true, y_pred, *, labels=None):
    """Accuracy (recall) of each class.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    labels : array-like of shape (n_classes,), default=None
        Classes to report, in order; by default the sorted labels of ``y_true``.

    Returns
    -------
    accuracy : ndarray of shape (n_classes,)
        Fraction of each class's samples predicted correctly; NaN for a class
        absent from ``y_true``.

    Examples
    --------
    >>> per_class_accuracy([0, 0, 1, 1], [0, 1, 1, 1]).tolist()
    [0.5, 1.0]
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}.")
    labels = np.unique(y_true) if labels is None else np.asarray(labels)
    true_pos = _label_positions(y_true, labels, "y_true")
    correct = np.bincount(true_pos, weights=y_true == y_pred, minlength=len(labels))
    total = np.bincount(true_pos, minlength=len(labels))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / total, np.nan)


@validate_params(
    {
        "class_counts": ["array-like"],
        "many_threshold": [Interval(Real, 0, None, closed="left")],
        "few_threshold": [Interval(Real, 0, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def shot_groups(class_counts, *, many_threshold=100, few_threshold=20):
    """Name the shot group of each class from its number of training samples.

    Parameters
    ----------
    class_counts : array-like of shape (n_classes,)
        Training samples per class.
    many_threshold : float, default=100
        Classes with more samples than this are ``"many"``.
    few_threshold : float, default=20
        Classes with fewer samples than this are ``"few"``; the rest ``"medium"``.

    Returns
    -------
    groups : ndarray of str, shape (n_classes,)

    Examples
    --------
    >>> shot_groups([500, 100, 20, 19]).tolist()
    ['many', 'medium', 'medium', 'few']
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold={few_threshold} is above many_threshold={many_threshold}; "
            "a class cannot be both."
        )
    counts = np.asarray(class_counts)
    return np.where(
        counts > many_threshold, "many", np.where(counts < few_threshold, "few", "medium")
    )


@validate_params(
    {
        "class_counts": ["array-like"],
        "n_head": [Interval(Integral, 0, None, closed="left"), None],
        "n_tail": [Interval(Integral, 0, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def rank_groups(class_counts, *, n_head=None, n_tail=None):
    """Head / middle / tail classes by rank of training size.

    For data sets with few classes (CIFAR-10) the count thresholds of
    :func:`shot_groups` say little; ranking does: the ``n_head`` largest
    classes are ``"head"``, the ``n_tail`` smallest ``"tail"``.

    Parameters
    ----------
    class_counts : array-like of shape (n_classes,)
        Training samples per class.
    n_head, n_tail : int, default=None
        Sizes of the head and tail groups; by default ``n_classes * 3 // 10``
        each, at least one (3 of CIFAR-10's 10 classes).

    Returns
    -------
    groups : ndarray of str, shape (n_classes,)

    Examples
    --------
    >>> rank_groups([50, 5000, 900, 300]).tolist()
    ['tail', 'head', 'middle', 'middle']
    """
    counts = np.asarray(class_counts)
    n_classes = len(counts)
    default = max(1, n_classes * 3 // 10)
    n_head = default if n_head is None else n_head
    n_tail = default if n_tail is None else n_tail
    if n_head + n_tail > n_classes:
        raise ValueError(f"n_head + n_tail = {n_head + n_tail} exceeds the {n_classes} classes.")
    rank = np.empty(n_classes, dtype=np.intp)
    rank[np.argsort(-counts, kind="stable")] = np.arange(n_classes)
    return np.where(rank < n_head, "head", np.where(rank >= n_classes - n_tail, "tail", "middle"))


def group_accuracy(y_true, y_pred, groups, *, labels=None):
    """Overall accuracy, and mean per-class accuracy within each group of classes.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    groups : array-like of shape (n_classes,)
        Group name of each class, e.g. from :func:`shot_groups`.
    labels : array-like of shape (n_classes,), default=None
        The classes ``groups`` refers to, in order; by default ``0 .. n_classes - 1``.

    Returns
    -------
    accuracy : dict
        ``"overall"`` (fraction of samples correct), then one entry per group
        in order of first appearance; NaN for a group none of whose classes
        occur in ``y_true``.

    Examples
    --------
    >>> group_accuracy([0, 1, 2, 2], [0, 1, 1, 2], ["head", "tail", "tail"])
    {'overall': 0.75, 'head': 1.0, 'tail': 0.75}
    """
    groups = np.asarray(groups)
    labels = np.arange(len(groups)) if labels is None else np.asarray(labels)
    if len(labels) != len(groups):
        raise ValueError(f"groups has {len(groups)} entries but labels has {len(labels)}.")
    per_class = per_class_accuracy(y_true, y_pred, labels=labels)
    result = {"overall": float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))}
    for name in dict.fromkeys(groups.tolist()):
        values = per_class[(groups == name) & ~np.isnan(per_class)]
        result[name] = float(values.mean()) if values.size else float("nan")
    return result


def shot_accuracy(
    y_true, y_pred, class_counts, *, labels=None, many_threshold=100, few_threshold=20
):
    """Overall, many-shot, medium-shot and few-shot accuracy.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    class_counts : array-like of shape (n_classes,)
        Training samples per class (a fitted ltlearn classifier's ``class_counts_``).
    labels : array-like of shape (n_classes,), default=None
        Classes of ``class_counts``, in order (``classes_``); by default
        ``0 .. n_classes - 1``.
    many_threshold, few_threshold : float, default=100, 20
        See :func:`shot_groups`.

    Returns
    -------
    accuracy : dict
        Keys ``"overall"``, ``"many"``, ``"medium"``, ``"few"``; a group's
        accuracy is the mean of its classes' accuracies (NaN if it is empty).

    Examples
    --------
    >>> shot_accuracy([0, 1, 2, 2], [0, 1, 1, 2], class_counts=[500, 50, 5])
    {'overall': 0.75, 'many': 1.0, 'medium': 1.0, 'few': 0.5}
    """
    groups = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    found = group_accuracy(y_true, y_pred, groups, labels=labels)
    return {"overall": found["overall"], **{g: found.get(g, float("nan")) for g in SHOT_GROUPS}}


def _final_estimator(estimator):
    return estimator[-1] if hasattr(estimator, "steps") else estimator


def _training_order(estimator):
    """Classes of a fitted classifier from its largest to its smallest training class."""
    final = _final_estimator(estimator)
    classes = np.asarray(final.classes_)
    counts = getattr(final, "class_counts_", None)
    if counts is None:
        return classes
    return classes[np.argsort(-np.asarray(counts), kind="stable")]


def evaluate_test_agnostic(
    estimator,
    X,
    y,
    *,
    imbalance_ratios=TEST_DISTRIBUTIONS,
    class_order=None,
    oracle_prior=False,
    adapt=None,
    n_unlabeled=None,
    views=None,
    random_state=0,
):
    """Accuracy of a fitted classifier over SADE's 11 shifted test distributions.

    From a balanced test set, draws the forward long-tailed sets, the uniform
    set and the backward sets of :func:`ltlearn.datasets.shifted_test_subsets`
    and scores the classifier on each; with ``adapt``, a copy of the
    classifier is first adapted to each test set's unlabeled features.

    Parameters
    ----------
    estimator : fitted classifier
        Any scikit-learn classifier (or pipeline ending in one).
    X : array-like of shape (n_samples, n_features)
        Balanced test features.
    y : array-like of shape (n_samples,)
        Test labels.
    imbalance_ratios : array-like of float, default=(50, 25, 10, 5, 2)
        Ratios of the forward and backward sets.
    class_order : array-like, default=None
        Classes from largest to smallest in training; by default read from the
        estimator's ``class_counts_`` (ltlearn estimators), else ``classes_``.
    oracle_prior : bool, default=False
        Give the estimator each test set's true class frequencies through its
        ``test_prior`` parameter (post-hoc logit adjustment with a known prior,
        the strongest one-line competitor of a test-agnostic method).
    adapt : str or dict, default=None
        Call ``adapt`` on a copy of the estimator (an ltlearn estimator, or a
        pipeline ending in one) with each test set's features before scoring
        it: a method name (``"map"``, ``"em"``, ``"aggregation"``, ...) or a
        dict of ``adapt``'s keyword arguments, e.g. ``{"method": "bbse",
        "validation": (X_val, y_val)}``. Transductive: the labels are never
        shown to ``adapt``.
    n_unlabeled : int, default=None
        Rows of each test set given to ``adapt`` (drawn without replacement);
        None gives all of them. Accuracy is always measured on the whole set.
    views : array-like of shape (n_samples, n_views, n_features), default=None
        Augmented views of the rows of ``X``, handed to ``adapt`` with their rows.
    random_state : int, RandomState instance or None, default=0
        Decides the samples of each test set and of ``n_unlabeled``.

    Returns
    -------
    accuracy : dict of str to float
        ``{"forward_50": ..., ..., "uniform": ..., ..., "backward_50": ...}``.

    Examples
    --------
    >>> from ltlearn import BalancedSoftmaxClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = BalancedSoftmaxClassifier(random_state=0).fit(data.X_train, data.y_train)
    >>> table = evaluate_test_agnostic(clf, data.X_test, data.y_test, imbalance_ratios=[10])
    >>> list(table)
    ['forward_10', 'uniform', 'backward_10']
    >>> adapted = evaluate_test_agnostic(clf, data.X_test, data.y_test, imbalance_ratios=[10],
    ...                                  adapt="map")
    >>> bool(adapted["forward_10"] >= table["forward_10"])
    True
    """
    y = np.asarray(y)
    final = _final_estimator(estimator)
    _label_positions(y, final.classes_, "y")
    order = _training_order(estimator) if class_order is None else class_order
    rng = check_random_state(random_state)
    subsets = shifted_test_subsets(
        y, imbalance_ratios=imbalance_ratios, class_order=order, random_state=rng
    )
    if adapt is not None:
        if oracle_prior:
            raise ValueError("Pass oracle_prior=True or adapt=..., not both.")
        return _evaluate_adapted(estimator, X, y, subsets, adapt, n_unlabeled, views, rng)
    if not oracle_prior:
        y_pred = estimator.predict(X)
        return {name: float(np.mean(y_pred[idx] == y[idx])) for name, idx in subsets.items()}
    if "test_prior" not in final.get_params():
        raise ValueError(
            f"oracle_prior=True needs an estimator with a test_prior parameter; "
            f"{type(final).__name__} has none."
        )
    classes = np.asarray(final.classes_)
    X = np.asarray(X)
    result = {}
    for name, idx in subsets.items():
        prior = np.bincount(_label_positions(y[idx], classes, "y"), minlength=len(classes))
        model = shifted = copy.copy(final).set_params(test_prior=prior / prior.sum())
        if hasattr(estimator, "steps"):
            model = copy.copy(estimator)
            model.steps = [*estimator.steps[:-1], (estimator.steps[-1][0], shifted)]
        result[name] = float(np.mean(model.predict(X[idx]) == y[idx]))
    return result


def _evaluate_adapted(estimator, X, y, subsets, adapt, n_unlabeled, views, rng):
    options = {"method": adapt} if isinstance(adapt, str) else dict(adapt)
    final = _final_estimator(estimator)
    if not hasattr(final, "adapt"):
        raise ValueError(
            f"adapt= needs an estimator with an adapt method (an ltlearn classifier); "
            f"{type(final).__name__} has none."
        )
    if n_unlabeled is not None and not (isinstance(n_unlabeled, Integral) and n_unlabeled >= 1):
        raise ValueError(f"n_unlabeled must be a positive int or None; got {n_unlabeled!r}.")
    if views is not None:
        views = np.asarray(views)
        if views.ndim != 3 or len(views) != len(X):
            raise ValueError(
                f"views must have shape ({len(X)}, n_views, n_features); got {views.shape}."
            )
    if hasattr(estimator, "steps"):
        # The final step adapts on features as the pipeline hands them to it.
        steps = estimator[:-1]
        X = steps.transform(X)
        if views is not None:
            n, k = views.shape[:2]
            views = np.asarray(steps.transform(views.reshape(n * k, -1))).reshape(n, k, -1)
        if options.get("validation") is not None:
            X_val, y_val = options["validation"]
            options["validation"] = (steps.transform(X_val), y_val)
    X = np.asarray(X)
    result = {}
    for name, idx in subsets.items():
        rows = idx
        if n_unlabeled is not None and n_unlabeled < len(idx):
            rows = np.sort(rng.choice(idx, n_unlabeled, replace=False))
        model = copy.copy(final)
        if views is not None:
            model.adapt(X[rows], views=views[rows], **options)
        else:
            model.adapt(X[rows], **options)
        result[name] = float(np.mean(model.predict(X[idx]) == y[idx]))
    return result


@validate_params(
    {
        "group": [StrOptions(set(SHOT_GROUPS))],
        "many_threshold": [Interval(Real, 0, None, closed="left")],
        "few_threshold": [Interval(Real, 0, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def evaluate_preferences(
    estimator, X, y, preferences, *, groups=None, imbalance_ratio=50, random_state=0
):
    """Accuracy of a preference-steered classifier at many preferences at once.

    For each preference: accuracy on the forward and backward long-tailed test
    sets of ratio ``imbalance_ratio`` drawn from the balanced ``(X, y)`` (in the
    training class order), on ``(X, y)`` itself, and mean per-class accuracy in
    each group of classes. Logits are computed once per preference for all of
    ``X`` (``decision_function_many``), so a grid of preferences is cheap.

    Parameters
    ----------
    estimator : PRLClassifier
        Fitted; any estimator with ``decision_function_many`` and ``class_counts_``.
    X, y : array-like
        A balanced test set.
    preferences : array-like of shape (n_preferences, 3) or list of str
    groups : array-like of shape (n_classes,), default=None
        Group name of each class; by default :func:`shot_groups` of the
        estimator's training counts (use :func:`rank_groups` on data sets with
        few classes).
    imbalance_ratio : float, default=50
        Ratio of the shifted test sets.
    random_state : int, default=0
        Decides which test samples the shifted sets keep.

    Returns
    -------
    accuracy : dict of str to ndarray of shape (n_preferences,)
        Keys ``forward_<ratio>``, ``uniform``, ``backward_<ratio>``, then the
        group names.

    Examples
    --------
    >>> from ltlearn import PRLClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = PRLClassifier(random_state=0).fit(data.X_train, data.y_train)
    >>> groups = shot_groups(clf.class_counts_, many_threshold=50)
    >>> acc = evaluate_preferences(clf, data.X_test, data.y_test, ["forward", "backward"],
    ...                            groups=groups, imbalance_ratio=10)
    >>> list(acc)
    ['forward_10', 'uniform', 'backward_10', 'many', 'medium', 'few']
    >>> bool(acc["forward_10"][0] > acc["forward_10"][1])
    True
    """
    y = np.asarray(y)
    classes = np.asarray(estimator.classes_)
    positions = _label_positions(y, classes, "y")
    subsets = shifted_test_subsets(
        y,
        imbalance_ratios=[imbalance_ratio],
        class_order=_training_order(estimator),
        random_state=random_state,
    )
    if groups is None:
        groups = shot_groups(estimator.class_counts_)
    groups = np.asarray(groups)
    predicted = np.argmax(estimator.decision_function_many(X, preferences), axis=2)
    correct = predicted == positions
    result = {name: correct[:, idx].mean(axis=1) for name, idx in subsets.items()}
    per_class = np.stack(
        [correct[:, positions == c].mean(axis=1) for c in range(len(classes))], axis=1
    )
    for name in dict.fromkeys(groups.tolist()):
        result[name] = per_class[:, groups == name].mean(axis=1)
    return result


def make_shot_scorer(group="few", *, many_threshold=100, few_threshold=20):
    """A scorer of the accuracy on one shot group, for ``GridSearchCV(scoring=...)``.

    The groups come from the training class counts of the estimator being
    scored (its ``class_counts_``, or that of a pipeline's last step), so in
    cross-validation they are those of each training fold.

    Parameters
    ----------
    group : {"many", "medium", "few"}, default="few"
        Group whose mean per-class accuracy is the score.
    many_threshold, few_threshold : float, default=100, 20
        See :func:`shot_groups`.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``; NaN when no class of the group
        occurs in ``y``.

    Examples
    --------
    >>> from ltlearn import BalancedSoftmaxClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = BalancedSoftmaxClassifier(random_state=0).fit(data.X_train, data.y_train)
    >>> few = make_shot_scorer("few", many_threshold=50, few_threshold=20)
    >>> 0.0 <= few(clf, data.X_test, data.y_test) <= 1.0
    True
    """

    def scorer(estimator, X, y):
        final = _final_estimator(estimator)
        counts = getattr(final, "class_counts_", None)
        if counts is None:
            raise ValueError(
                f"The {group}-shot scorer needs the training class counts, but "
                f"{type(final).__name__} has no class_counts_ attribute (ltlearn estimators have)."
            )
        scores = shot_accuracy(
            y,
            estimator.predict(X),
            counts,
            labels=final.classes_,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
        )
        return scores[group]

    scorer.__name__ = f"{group}_shot_accuracy"
    return scorer


#: Scorers for ``GridSearchCV(scoring=SCORERS, refit="balanced_accuracy")``.
#: Balanced accuracy (mean per-class recall) on a long-tailed validation fold
#: estimates accuracy on a uniform test set.
SCORERS = {
    "balanced_accuracy": get_scorer("balanced_accuracy"),
    "accuracy": get_scorer("accuracy"),
    **{f"{g}_shot_accuracy": make_shot_scorer(g) for g in SHOT_GROUPS},
}


# -- calibration ---------------------------------------------------------------


def _check_probabilities(y_true, y_prob, labels):
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (n_samples, n_classes); got shape {y_prob.shape}.")
    if not np.all(np.isfinite(y_prob)) or np.any(y_prob < 0):
        raise ValueError("y_prob must hold finite, non-negative probabilities.")
    labels = np.arange(y_prob.shape[1]) if labels is None else np.asarray(labels)
    if len(labels) != y_prob.shape[1]:
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns but labels has {len(labels)}.")
    y_index = _label_positions(np.asarray(y_true), labels, "y_true")
    if len(y_index) != len(y_prob):
        raise ValueError(f"y_true has {len(y_index)} samples but y_prob has {len(y_prob)}.")
    return y_index, y_prob


def _binned_gaps(confidence, correct, n_bins, strategy):
    """(fraction of samples, |accuracy - confidence|) of each non-empty bin."""
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # Right-closed bins (a, b]; a confidence of exactly 0 joins the first bin.
        bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        members = [bins == b for b in range(n_bins)]
    else:  # equal mass: the same number of samples (up to one) in each bin
        order = np.argsort(confidence, kind="stable")
        members = []
        for part in np.array_split(order, n_bins):
            mask = np.zeros(len(confidence), dtype=bool)
            mask[part] = True
            members.append(mask)
    n = len(confidence)
    return np.array(
        [(m.sum() / n, abs(correct[m].mean() - confidence[m].mean())) for m in members if m.any()]
    ).reshape(-1, 2)


def expected_calibration_error(y_true, y_prob, *, n_bins=15, strategy="uniform", labels=None):
    """Expected calibration error of the top-label confidence.

    ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over bins of the predicted
    class's probability (Guo et al., "On Calibration of Modern Neural
    Networks", ICML 2017).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    y_prob : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns in the order of ``labels``.
    n_bins : int, default=15
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width bins, or equal-mass bins (adaptive ECE; Nixon et al., 2019).
    labels : array-like of shape (n_classes,), default=None
        Class of each column; by default ``0 .. n_classes - 1``.

    Returns
    -------
    ece : float

    Examples
    --------
    >>> expected_calibration_error([0, 1], [[0.8, 0.2], [0.4, 0.6]], n_bins=10)
    0.3
    """
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    correct = (y_prob.argmax(axis=1) == y_index).astype(float)
    gaps = _binned_gaps(y_prob.max(axis=1), correct, n_bins, strategy)
    return float(np.sum(gaps[:, 0] * gaps[:, 1]))


def adaptive_calibration_error(y_true, y_prob, *, n_bins=15, labels=None):
    """ECE over equal-mass bins; see :func:`expected_calibration_error`.

    Examples
    --------
    >>> round(adaptive_calibration_error([0, 1, 1, 0], [[0.9, 0.1], [0.3, 0.7],
    ...                                                 [0.6, 0.4], [0.8, 0.2]], n_bins=2), 3)
    0.15
    """
    return expected_calibration_error(
        y_true, y_prob, n_bins=n_bins, strategy="quantile", labels=labels
    )


def maximum_calibration_error(y_true, y_prob, *, n_bins=15, labels=None):
    """Largest ``|accuracy - confidence|`` over the non-empty equal-width bins.

    Examples
    --------
    >>> maximum_calibration_error([0, 1], [[0.8, 0.2], [0.4, 0.6]], n_bins=10)
    0.4
    """
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    correct = (y_prob.argmax(axis=1) == y_index).astype(float)
    gaps = _binned_gaps(y_prob.max(axis=1), correct, n_bins, "uniform")
    return float(gaps[:, 1].max())


def classwise_calibration_error(y_true, y_prob, *, n_bins=15, labels=None):
    """Class-wise ECE: the mean over classes of the ECE of each class's probability.

    For class ``c`` the bins are over ``p_c`` for every sample and the accuracy
    is the frequency of ``y == c`` (Kull et al., "Beyond temperature scaling",
    NeurIPS 2019).

    Examples
    --------
    >>> classwise_calibration_error([0, 1], [[1.0, 0.0], [0.0, 1.0]])
    0.0
    """
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    errors = []
    for c in range(y_prob.shape[1]):
        gaps = _binned_gaps(y_prob[:, c], (y_index == c).astype(float), n_bins, "uniform")
        errors.append(np.sum(gaps[:, 0] * gaps[:, 1]))
    return float(np.mean(errors))


def negative_log_likelihood(y_true, y_prob, *, labels=None):
    """Mean ``-log p(y_true)``, probabilities floored at 1e-12.

    Examples
    --------
    >>> round(negative_log_likelihood([0, 1], [[0.5, 0.5], [0.5, 0.5]]), 4)
    0.6931
    """
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    return float(-np.mean(np.log(np.maximum(y_prob[np.arange(len(y_index)), y_index], 1e-12))))


def brier_score(y_true, y_prob, *, labels=None):
    """Multi-class Brier score: mean over samples of ``sum_c (p_c - [y == c])^2``.

    Examples
    --------
    >>> brier_score([0, 1], [[1.0, 0.0], [0.5, 0.5]])
    0.25
    """
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    onehot = np.eye(y_prob.shape[1])[y_index]
    return float(np.mean(np.sum((y_prob - onehot) ** 2, axis=1)))
