"""Figures of ltlearn's estimators (needs the ``plot`` extra: matplotlib).

The figures are display objects in scikit-learn's pattern
(:class:`sklearn.metrics.CalibrationDisplay`): ``from_estimator`` or
``from_predictions`` computes the values and draws them, ``plot(ax=...)``
draws them again elsewhere, and the display keeps the values it drew and the
``ax_`` and ``figure_`` it drew them on. Computing needs no matplotlib;
drawing imports it and, when it is missing, says which extra installs it.

- :class:`ReliabilityDisplay`: reliability diagram, with one curve per group
  of classes (many / medium / few);
- :class:`PerClassAccuracyDisplay`: accuracy of each class against its number
  of training samples;
- :class:`ShiftedTestSetsDisplay`: accuracy over SADE's shifted test sets;
- :class:`PreferenceSimplexDisplay`: a :class:`~ltlearn.PRLClassifier`'s
  accuracy over its preference simplex.

:func:`plot_reliability_diagram` and :func:`plot_preference_simplex` are the
same figures as one function call that returns the figure.
"""

import itertools

import numpy as np
from sklearn.utils import Bunch

from ltlearn._optional import import_optional
from ltlearn.datasets import TEST_DISTRIBUTIONS, shifted_test_subsets
from ltlearn.metrics import (
    SHOT_GROUPS,
    _check_probabilities,
    _final_estimator,
    _label_positions,
    evaluate_preferences,
    evaluate_test_agnostic,
    expected_calibration_error,
    maximum_calibration_error,
    per_class_accuracy,
    shot_groups,
)

__all__ = [
    "PerClassAccuracyDisplay",
    "PreferenceSimplexDisplay",
    "ReliabilityDisplay",
    "ShiftedTestSetsDisplay",
    "plot_preference_simplex",
    "plot_reliability_diagram",
    "simplex_grid",
]

# Corners of the drawn triangle: forward bottom left, uniform top, backward bottom right.
_CORNERS = np.array([[0.0, 0.0], [0.5, np.sqrt(3) / 2], [1.0, 0.0]])

# Colours of the group curves in a reliability diagram: not the blue of its bars nor the
# red of its gaps.
_GROUP_COLOURS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _pyplot():
    return import_optional("matplotlib.pyplot", "plot")


def _estimator_name(estimator):
    return type(_final_estimator(estimator)).__name__


def _class_counts_of(estimator, class_counts):
    """``class_counts``, else the training counts an ltlearn estimator keeps, else None."""
    if class_counts is not None:
        return np.asarray(class_counts)
    counts = getattr(_final_estimator(estimator), "class_counts_", None)
    return None if counts is None else np.asarray(counts)


def _class_groups(groups, class_counts, n_classes, many_threshold, few_threshold):
    """Group name of each class, from ``groups`` or from the shot thresholds, or None."""
    if groups is not None and class_counts is not None:
        raise ValueError(
            "Pass groups= (a group name per class) or class_counts= (groups from the shot "
            "thresholds), not both."
        )
    if groups is None and class_counts is None:
        return None
    if groups is None:
        groups = shot_groups(
            class_counts, many_threshold=many_threshold, few_threshold=few_threshold
        )
    groups = np.asarray(groups)
    if groups.shape != (n_classes,):
        raise ValueError(f"groups must have one entry per class ({n_classes}); got {len(groups)}.")
    return groups


def _ordered_groups(groups):
    """Group names present in ``groups``: many / medium / few first, then as they appear."""
    present = dict.fromkeys(groups.tolist())
    return [g for g in SHOT_GROUPS if g in present] + [g for g in present if g not in SHOT_GROUPS]


def _reliability_bins(y_index, y_prob, n_bins):
    """Accuracy, mean confidence (NaN where empty) and count of each equal-width bin."""
    confidence = y_prob.max(axis=1)
    correct = y_prob.argmax(axis=1) == y_index
    edges = np.linspace(0, 1, n_bins + 1)
    # Right-closed bins, as expected_calibration_error bins them.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    return accuracy, mean_confidence, counts


def simplex_grid(n_steps=10):
    """All points of the 3-simplex whose coordinates are multiples of ``1 / n_steps``.

    Parameters
    ----------
    n_steps : int, default=10
        Divisions per edge; the grid has ``(n_steps + 1) * (n_steps + 2) / 2`` points.

    Returns
    -------
    points : ndarray of shape (n_points, 3)
        Rows sum to one; the three corners are included.

    Examples
    --------
    >>> simplex_grid(1)
    array([[0., 0., 1.],
           [0., 1., 0.],
           [1., 0., 0.]])
    >>> len(simplex_grid(20))
    231
    """
    if not (isinstance(n_steps, (int, np.integer)) and n_steps >= 1):
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}.")
    points = [(i, j, n_steps - i - j) for i in range(n_steps + 1) for j in range(n_steps + 1 - i)]
    return np.array(points, dtype=np.float64) / n_steps


class ReliabilityDisplay:
    """Reliability diagram: accuracy against top-label confidence, per group of classes too.

    Bars give, for equal-width bins of the top-label confidence, the accuracy
    of the test rows in each bin, with the gap to their mean confidence
    hatched and the diagonal of perfect calibration; ECE and MCE are in the
    title. With class groups (many / medium / few by default when the
    training counts are known), a line per group gives the same curve for the
    rows whose true class is in the group: on long-tailed data the tail
    classes' rows are typically the over-confident ones. A histogram of the
    rows per bin goes below.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`; the
    constructor takes values already computed.

    Parameters
    ----------
    bin_edges : ndarray of shape (n_bins + 1,)
        Edges of the confidence bins.
    accuracy, confidence : ndarray of shape (n_bins,)
        Accuracy and mean top-label confidence of the rows in each bin (NaN
        for an empty bin).
    counts : ndarray of shape (n_bins,)
        Rows in each bin.
    ece, mce : float
        Expected and maximum calibration error.
    group_curves : dict of str to Bunch, default=None
        Per group of classes, a Bunch with ``accuracy``, ``confidence`` and
        ``counts`` as above, for the rows of that group's classes.
    name : str, default=None
        Shown above the ECE / MCE line.

    Attributes
    ----------
    ax_ : matplotlib Axes
        The reliability diagram.
    hist_ax_ : matplotlib Axes or None
        The histogram of rows per bin, when one was drawn.
    figure_ : matplotlib Figure

    See Also
    --------
    plot_reliability_diagram : The same figure, without groups, in one call.
    ltlearn.metrics.expected_calibration_error : The ECE in the title.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltlearn.plotting import ReliabilityDisplay
    >>> y_true = [0, 0, 0, 0, 1, 1, 2]
    >>> y_prob = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.9, 0.1, 0.0],
    ...           [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.6, 0.1, 0.3]]
    >>> display = ReliabilityDisplay.from_predictions(
    ...     y_true, y_prob, n_bins=5, class_counts=[500, 50, 5], name="toy")
    >>> display.counts.tolist()
    [0, 0, 2, 3, 2]
    >>> {group: curve.counts.sum().item() for group, curve in display.group_curves.items()}
    {'many': 4, 'medium': 2, 'few': 1}
    >>> display.group_curves["few"].accuracy.tolist()  # its one row is predicted class 0
    [nan, nan, 0.0, nan, nan]
    >>> display.ax_.get_title().splitlines()
    ['toy', 'ECE 17.14 %, MCE 26.67 %']
    """

    def __init__(
        self, bin_edges, accuracy, confidence, counts, *, ece, mce, group_curves=None, name=None
    ):
        self.bin_edges = bin_edges
        self.accuracy = accuracy
        self.confidence = confidence
        self.counts = counts
        self.ece = ece
        self.mce = mce
        self.group_curves = group_curves
        self.name = name

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        n_bins=15,
        groups=None,
        class_counts=None,
        many_threshold=100,
        few_threshold=20,
        name=None,
        ax=None,
        hist_ax=None,
    ):
        """Reliability diagram of a fitted classifier's ``predict_proba`` on ``(X, y)``.

        Parameters
        ----------
        estimator : fitted classifier
            Any classifier with ``predict_proba`` and ``classes_`` (or a
            pipeline ending in one).
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        n_bins : int, default=15
            Equal-width confidence bins.
        groups : array-like of shape (n_classes,), default=None
            Group name of each class (e.g. :func:`ltlearn.metrics.rank_groups`),
            in ``classes_`` order.
        class_counts : array-like of shape (n_classes,), default=None
            Training rows per class, grouped by the shot thresholds; by default
            the estimator's ``class_counts_`` when it has one (ltlearn
            estimators) and ``groups`` is not given. Without either, no group
            curves.
        many_threshold, few_threshold : float, default=100, 20
            See :func:`ltlearn.metrics.shot_groups`.
        name : str, default=None
            Title; by default the name of the estimator's class.
        ax, hist_ax : matplotlib Axes, default=None
            See :meth:`plot`.

        Returns
        -------
        display : ReliabilityDisplay
        """
        _pyplot()  # before predicting: say at once when matplotlib is missing
        if groups is None:
            class_counts = _class_counts_of(estimator, class_counts)
        return cls.from_predictions(
            y,
            estimator.predict_proba(X),
            n_bins=n_bins,
            labels=estimator.classes_,
            groups=groups,
            class_counts=class_counts,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
            name=_estimator_name(estimator) if name is None else name,
            ax=ax,
            hist_ax=hist_ax,
        )

    @classmethod
    def from_predictions(
        cls,
        y_true,
        y_prob,
        *,
        n_bins=15,
        labels=None,
        groups=None,
        class_counts=None,
        many_threshold=100,
        few_threshold=20,
        name=None,
        ax=None,
        hist_ax=None,
    ):
        """Reliability diagram of predicted probabilities.

        Parameters
        ----------
        y_true : array-like of shape (n_samples,)
        y_prob : array-like of shape (n_samples, n_classes)
        n_bins : int, default=15
            Equal-width confidence bins.
        labels : array-like of shape (n_classes,), default=None
            Class of each column of ``y_prob``; by default ``0 .. n_classes - 1``.
        groups : array-like of shape (n_classes,), default=None
            Group name of each class, in the order of ``labels``.
        class_counts : array-like of shape (n_classes,), default=None
            Training rows per class, grouped by the shot thresholds. Pass this
            or ``groups``; with neither, no group curves.
        many_threshold, few_threshold : float, default=100, 20
            See :func:`ltlearn.metrics.shot_groups`.
        name : str, default=None
            Title.
        ax, hist_ax : matplotlib Axes, default=None
            See :meth:`plot`.

        Returns
        -------
        display : ReliabilityDisplay
        """
        _pyplot()
        if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
            raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}.")
        y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
        n_classes = y_prob.shape[1]
        class_groups = _class_groups(groups, class_counts, n_classes, many_threshold, few_threshold)
        group_curves = None
        if class_groups is not None:
            row_groups = class_groups[y_index]
            group_curves = {}
            for group in _ordered_groups(class_groups):
                rows = row_groups == group
                if rows.any():
                    accuracy, confidence, counts = _reliability_bins(
                        y_index[rows], y_prob[rows], n_bins
                    )
                    group_curves[group] = Bunch(
                        accuracy=accuracy, confidence=confidence, counts=counts
                    )
        accuracy, confidence, counts = _reliability_bins(y_index, y_prob, n_bins)
        display = cls(
            np.linspace(0, 1, n_bins + 1),
            accuracy,
            confidence,
            counts,
            ece=expected_calibration_error(y_index, y_prob, n_bins=n_bins),
            mce=maximum_calibration_error(y_index, y_prob, n_bins=n_bins),
            group_curves=group_curves,
            name=name,
        )
        return display.plot(ax=ax, hist_ax=hist_ax)

    def plot(self, *, ax=None, hist_ax=None, name=None):
        """Draw the diagram.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw the reliability diagram, its legend in the upper
            left corner (move it with ``display.ax_.legend(loc=...)``). None
            makes a new figure with the diagram above, the histogram of rows
            per bin below and, with group curves, the legend beside them.
        hist_ax : matplotlib Axes, default=None
            Where to draw the histogram; with ``ax`` given and no
            ``hist_ax``, no histogram is drawn.
        name : str, default=None
            Title; by default ``self.name``.

        Returns
        -------
        display : ReliabilityDisplay
            ``self``, with ``ax_``, ``hist_ax_`` and ``figure_``.
        """
        plt = _pyplot()
        new_figure = ax is None
        if new_figure:
            if hist_ax is not None:
                raise ValueError("hist_ax needs ax: pass both, or neither for a new figure.")
            _, (ax, hist_ax) = plt.subplots(
                2,
                1,
                figsize=(7.5 if self.group_curves else 4.5, 5.5),
                sharex=True,
                gridspec_kw={"height_ratios": [3, 1]},
            )
        name = self.name if name is None else name
        centres = (self.bin_edges[:-1] + self.bin_edges[1:]) / 2
        width = np.diff(self.bin_edges)
        filled = self.counts > 0
        accuracy, confidence = self.accuracy[filled], self.confidence[filled]
        ax.bar(
            centres[filled],
            accuracy,
            width=width[filled],
            edgecolor="black",
            color="tab:blue",
            alpha=0.4 if self.group_curves else 1.0,
            label="accuracy, all rows",
        )
        # Hatched outline only: a filled gap over the accuracy bar (underconfident bins)
        # would mix into a colour the legend does not show.
        ax.bar(
            centres[filled],
            np.abs(confidence - accuracy),
            bottom=np.minimum(accuracy, confidence),
            width=width[filled],
            facecolor="none",
            edgecolor="tab:red",
            hatch="//",
            label="gap to mean confidence",
        )
        for (group, curve), colour in zip(
            (self.group_curves or {}).items(), itertools.cycle(_GROUP_COLOURS), strict=False
        ):
            rows = curve.counts > 0
            ax.plot(
                curve.confidence[rows],
                curve.accuracy[rows],
                marker="o",
                markersize=4,
                color=colour,
                label=f"{group} classes ({int(curve.counts.sum())} rows)",
            )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if self.group_curves and new_figure:
            # Beside the diagram, in the room made for it: six entries would cover the curves
            # of an underconfident model. On given axes that room may hold another panel.
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        else:
            ax.legend(loc="upper left", fontsize=8)
        summary = f"ECE {100 * self.ece:.2f} %, MCE {100 * self.mce:.2f} %"
        ax.set_title(summary if name is None else f"{name}\n{summary}", fontsize=10)
        if hist_ax is not None:
            hist_ax.bar(centres, self.counts, width=width, color="gray", edgecolor="black")
            hist_ax.set_xlabel("confidence (top-label probability)")
            hist_ax.set_ylabel("rows")
        else:
            ax.set_xlabel("confidence (top-label probability)")
        if new_figure:
            ax.figure.tight_layout()
        self.ax_, self.hist_ax_, self.figure_ = ax, hist_ax, ax.figure
        return self


class PerClassAccuracyDisplay:
    """Accuracy of each class against its number of training samples.

    One point per class, on a logarithmic axis of training-set size, joined
    from the rarest class to the most frequent; a dashed segment per group of
    classes (many / medium / few by default) at the group's mean per-class
    accuracy, spanning its classes, with the group's name along the top. Draw
    several estimators on one ``ax`` to compare where each gains.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`; the
    constructor takes values already computed.

    Parameters
    ----------
    class_counts : ndarray of shape (n_classes,)
        Training samples per class.
    accuracy : ndarray of shape (n_classes,)
        Accuracy (recall) of each class; NaN for a class absent from the test rows.
    labels : ndarray of shape (n_classes,), default=None
        The classes.
    groups : ndarray of shape (n_classes,), default=None
        Group name of each class.
    name : str, default=None
        Legend label.

    Attributes
    ----------
    group_accuracy : dict of str to float
        Mean per-class accuracy of each group (empty without groups).
    line_ : matplotlib Line2D
        The per-class curve.
    ax_ : matplotlib Axes
    figure_ : matplotlib Figure

    See Also
    --------
    ltlearn.metrics.per_class_accuracy : The values drawn.
    ltlearn.metrics.shot_accuracy : The group means, as numbers.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltlearn import BalancedSoftmaxClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> from ltlearn.plotting import PerClassAccuracyDisplay
    >>> display = PerClassAccuracyDisplay.from_predictions(
    ...     [0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 0, 0], class_counts=[500, 50, 5])
    >>> display.accuracy.tolist()
    [1.0, 0.5, 0.0]
    >>> display.group_accuracy
    {'many': 1.0, 'medium': 0.5, 'few': 0.0}
    """

    def __init__(self, class_counts, accuracy, *, labels=None, groups=None, name=None):
        self.class_counts = np.asarray(class_counts)
        self.accuracy = np.asarray(accuracy, dtype=np.float64)
        self.labels = labels
        self.groups = groups
        self.name = name
        if self.class_counts.shape != self.accuracy.shape:
            raise ValueError(
                f"class_counts has shape {self.class_counts.shape} but accuracy has shape "
                f"{self.accuracy.shape}: one of each per class."
            )
        if np.any(self.class_counts <= 0):
            raise ValueError(
                "class_counts must be positive: a class without training samples has no "
                "place on the logarithmic axis of training-set sizes."
            )
        self.group_accuracy = {}
        if groups is not None:
            groups = np.asarray(groups)
            for group in _ordered_groups(groups):
                values = self.accuracy[(groups == group) & ~np.isnan(self.accuracy)]
                self.group_accuracy[group] = float(values.mean()) if values.size else np.nan

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        class_counts=None,
        groups=None,
        many_threshold=100,
        few_threshold=20,
        name=None,
        ax=None,
        **kwargs,
    ):
        """Per-class accuracy of a fitted classifier on ``(X, y)``.

        Parameters
        ----------
        estimator : fitted classifier
            An ltlearn estimator (or a pipeline ending in one), whose
            ``class_counts_`` gives the training counts; any scikit-learn
            classifier with ``class_counts``.
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        class_counts : array-like of shape (n_classes,), default=None
            Training samples per class, in ``classes_`` order; by default the
            estimator's ``class_counts_``.
        groups : array-like of shape (n_classes,), default=None
            Group name of each class; by default the shot groups of the
            training counts.
        many_threshold, few_threshold : float, default=100, 20
            See :func:`ltlearn.metrics.shot_groups`.
        name : str, default=None
            Legend label; by default the name of the estimator's class.
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot` for the per-class curve.

        Returns
        -------
        display : PerClassAccuracyDisplay
        """
        _pyplot()
        counts = _class_counts_of(estimator, class_counts)
        if counts is None:
            raise ValueError(
                f"{_estimator_name(estimator)} has no class_counts_: pass class_counts= "
                "(training samples per class, in classes_ order)."
            )
        return cls.from_predictions(
            y,
            estimator.predict(X),
            class_counts=counts,
            labels=estimator.classes_,
            groups=groups,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
            name=_estimator_name(estimator) if name is None else name,
            ax=ax,
            **kwargs,
        )

    @classmethod
    def from_predictions(
        cls,
        y_true,
        y_pred,
        *,
        class_counts,
        labels=None,
        groups=None,
        many_threshold=100,
        few_threshold=20,
        name=None,
        ax=None,
        **kwargs,
    ):
        """Per-class accuracy of predicted labels.

        Parameters
        ----------
        y_true, y_pred : array-like of shape (n_samples,)
        class_counts : array-like of shape (n_classes,)
            Training samples per class.
        labels : array-like of shape (n_classes,), default=None
            The classes of ``class_counts``, in order; by default ``0 .. n_classes - 1``.
        groups : array-like of shape (n_classes,), default=None
            Group name of each class; by default the shot groups of ``class_counts``.
        many_threshold, few_threshold : float, default=100, 20
            See :func:`ltlearn.metrics.shot_groups`.
        name : str, default=None
            Legend label.
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot` for the per-class curve.

        Returns
        -------
        display : PerClassAccuracyDisplay
        """
        _pyplot()
        class_counts = np.asarray(class_counts)
        labels = np.arange(len(class_counts)) if labels is None else np.asarray(labels)
        if len(labels) != len(class_counts):
            raise ValueError(
                f"class_counts has {len(class_counts)} entries but labels has {len(labels)}."
            )
        if groups is None:
            groups = shot_groups(
                class_counts, many_threshold=many_threshold, few_threshold=few_threshold
            )
        groups = _class_groups(groups, None, len(labels), many_threshold, few_threshold)
        accuracy = per_class_accuracy(y_true, y_pred, labels=labels)
        display = cls(class_counts, accuracy, labels=labels, groups=groups, name=name)
        return display.plot(ax=ax, **kwargs)

    def plot(self, *, ax=None, name=None, **kwargs):
        """Draw per-class accuracy against training-set size.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        name : str, default=None
            Legend label; by default ``self.name``.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot` for the per-class curve.

        Returns
        -------
        display : PerClassAccuracyDisplay
            ``self``, with ``line_``, ``ax_`` and ``figure_``.
        """
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
        name = self.name if name is None else name
        order = np.argsort(self.class_counts, kind="stable")
        (self.line_,) = ax.plot(
            self.class_counts[order],
            100 * self.accuracy[order],
            **{"marker": "o", "label": name, **kwargs},
        )
        if self.group_accuracy:
            groups = np.asarray(self.groups)
            for group, value in self.group_accuracy.items():
                counts = self.class_counts[groups == group]
                # A little wider than its classes, so that a one-class group shows too.
                ax.hlines(
                    100 * value,
                    counts.min() / 1.15,
                    counts.max() * 1.15,
                    colors=self.line_.get_color(),
                    linestyles="--",
                    linewidth=1.5,
                )
                # Named once along the top edge: displays drawn on the same axes share the
                # groups, and names beside each segment would pile up.
                if group not in {text.get_text() for text in ax.texts}:
                    ax.annotate(
                        group,
                        (np.sqrt(counts.min() * counts.max()), 1),
                        xycoords=ax.get_xaxis_transform(),
                        xytext=(0, -3),
                        textcoords="offset points",
                        ha="center",
                        va="top",
                        fontsize=8,
                        color="dimgray",
                    )
        ax.margins(y=0.1)  # room for the group names along the top
        ax.set_xscale("log")
        # Round numbers (10, 20, 50, 100 ...) read better than powers of ten on a short range.
        ticker = import_optional("matplotlib.ticker", "plot")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("training samples of the class")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.grid(alpha=0.3, which="both")
        if name is not None:
            ax.legend(loc="lower right", fontsize=8)  # the frequent classes, right, sit high
        self.ax_, self.figure_ = ax, ax.figure
        return self


def _short_name(test_set):
    return test_set.replace("forward_", "F").replace("backward_", "B")


class ShiftedTestSetsDisplay:
    """Accuracy over SADE's shifted test sets, from forward long-tailed to backward.

    The test-agnostic protocol (Zhang et al., NeurIPS 2022) draws, from a
    balanced test set, forward long-tailed sets (F50: the training order,
    imbalance ratio 50), the uniform set and backward sets (B50: the order
    reversed). One line per way of predicting: draw several on one ``ax``
    (as trained, adapted with ``adapt``, told the true prior) to compare them.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`; the
    constructor takes values already computed.

    Parameters
    ----------
    accuracy : dict of str to float
        Accuracy on each test set, as :func:`ltlearn.metrics.evaluate_test_agnostic`
        returns it: ``{"forward_50": ..., "uniform": ..., "backward_50": ...}``.
    name : str, default=None
        Legend label.

    Attributes
    ----------
    line_ : matplotlib Line2D
    ax_ : matplotlib Axes
    figure_ : matplotlib Figure

    See Also
    --------
    ltlearn.metrics.evaluate_test_agnostic : The values drawn.
    ltlearn.datasets.shifted_test_subsets : The test sets.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from ltlearn.plotting import ShiftedTestSetsDisplay
    >>> y_true = np.repeat([0, 1, 2], 100)  # a balanced test set
    >>> y_pred = np.zeros_like(y_true)  # always the largest training class
    >>> display = ShiftedTestSetsDisplay.from_predictions(
    ...     y_true, y_pred, class_order=[0, 1, 2], imbalance_ratios=[10], name="always 0")
    >>> {test_set: round(value, 2) for test_set, value in display.accuracy.items()}
    {'forward_10': 0.71, 'uniform': 0.33, 'backward_10': 0.07}
    >>> [tick.get_text() for tick in display.ax_.get_xticklabels()]
    ['F10', 'uniform', 'B10']
    """

    def __init__(self, accuracy, *, name=None):
        self.accuracy = dict(accuracy)
        self.name = name

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        imbalance_ratios=TEST_DISTRIBUTIONS,
        adapt=None,
        oracle_prior=False,
        n_unlabeled=None,
        random_state=0,
        name=None,
        ax=None,
        **kwargs,
    ):
        """Accuracy of a fitted classifier over the shifted test sets drawn from ``(X, y)``.

        Parameters
        ----------
        estimator : fitted classifier
            Any scikit-learn classifier (or pipeline ending in one); ``adapt``
            and ``oracle_prior`` need an ltlearn estimator.
        X : array-like of shape (n_samples, n_features)
            Balanced test features.
        y : array-like of shape (n_samples,)
        imbalance_ratios : array-like of float, default=(50, 25, 10, 5, 2)
            Ratios of the forward and backward sets.
        adapt : str or dict, default=None
            Adapt a copy of the estimator to each test set's unlabeled rows
            first; see :func:`ltlearn.metrics.evaluate_test_agnostic`.
        oracle_prior : bool, default=False
            Give the estimator each test set's true class prior.
        n_unlabeled : int, default=None
            Rows of each test set given to ``adapt``; all by default.
        random_state : int, RandomState instance or None, default=0
            Decides the rows of each test set.
        name : str, default=None
            Legend label; by default the name of the estimator's class.
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ShiftedTestSetsDisplay
        """
        _pyplot()
        accuracy = evaluate_test_agnostic(
            estimator,
            X,
            y,
            imbalance_ratios=imbalance_ratios,
            oracle_prior=oracle_prior,
            adapt=adapt,
            n_unlabeled=n_unlabeled,
            random_state=random_state,
        )
        display = cls(accuracy, name=_estimator_name(estimator) if name is None else name)
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_predictions(
        cls,
        y_true,
        y_pred,
        *,
        class_order,
        imbalance_ratios=TEST_DISTRIBUTIONS,
        random_state=0,
        name=None,
        ax=None,
        **kwargs,
    ):
        """Accuracy of predictions on a balanced test set, over the shifted sets drawn from it.

        Parameters
        ----------
        y_true, y_pred : array-like of shape (n_samples,)
            Labels and predictions of the balanced test set.
        class_order : array-like of shape (n_classes,)
            The classes from the largest to the smallest in training: the
            order of the forward sets.
        imbalance_ratios : array-like of float, default=(50, 25, 10, 5, 2)
            Ratios of the forward and backward sets.
        random_state : int, RandomState instance or None, default=0
            Decides the rows of each test set; the same value draws the same
            sets as :meth:`from_estimator`.
        name : str, default=None
            Legend label.
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ShiftedTestSetsDisplay
        """
        _pyplot()
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        if y_true.shape != y_pred.shape:
            raise ValueError(
                f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}."
            )
        _label_positions(y_true, np.asarray(class_order), "y_true")
        subsets = shifted_test_subsets(
            y_true,
            imbalance_ratios=imbalance_ratios,
            class_order=class_order,
            random_state=random_state,
        )
        accuracy = {
            test_set: float(np.mean(y_pred[rows] == y_true[rows]))
            for test_set, rows in subsets.items()
        }
        return cls(accuracy, name=name).plot(ax=ax, **kwargs)

    def plot(self, *, ax=None, name=None, **kwargs):
        """Draw accuracy against the test sets.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw; by default a new figure.
        name : str, default=None
            Legend label; by default ``self.name``.
        **kwargs
            Passed to :meth:`~matplotlib.axes.Axes.plot`.

        Returns
        -------
        display : ShiftedTestSetsDisplay
            ``self``, with ``line_``, ``ax_`` and ``figure_``.
        """
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
        name = self.name if name is None else name
        positions = np.arange(len(self.accuracy))
        values = 100 * np.array(list(self.accuracy.values()))
        (self.line_,) = ax.plot(positions, values, **{"marker": "o", "label": name, **kwargs})
        ax.set_xticks(positions, [_short_name(test_set) for test_set in self.accuracy])
        ax.set_xlabel("test set (F: head classes frequent, B: tail classes frequent)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if name is not None:
            ax.legend(fontsize=8)
        self.ax_, self.figure_ = ax, ax.figure
        return self


class PreferenceSimplexDisplay:
    """Accuracy over the preference simplex, one triangle per test set or class group.

    Each panel is the (forward, uniform, backward) simplex with the forward
    corner bottom left, uniform on top and backward bottom right; colour is
    accuracy on the forward / backward long-tailed test sets of ratio
    ``imbalance_ratio``, the balanced test set, and each group of classes
    (many / medium / few by default). The best point of each panel is marked
    with a star: chosen on that very test set, it is an oracle, and may differ
    from the preference that :meth:`~ltlearn.PRLClassifier.preference_for_imbalance`
    suggests without labels.

    Build it with :meth:`from_estimator`; the constructor takes values
    already computed.

    Parameters
    ----------
    points : ndarray of shape (n_points, 3)
        Preferences (forward, uniform, backward), e.g. :func:`simplex_grid`.
    accuracy : dict of str to ndarray of shape (n_points,)
        Accuracy at each point, one entry per panel, as
        :func:`ltlearn.metrics.evaluate_preferences` returns it.
    name : str, default=None
        In the figure's title.

    Attributes
    ----------
    axes_ : ndarray of matplotlib Axes
        One per panel.
    figure_ : matplotlib Figure

    See Also
    --------
    plot_preference_simplex : The same figure in one call, saved to a file.
    ltlearn.metrics.evaluate_preferences : The values drawn.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltlearn.plotting import PreferenceSimplexDisplay, simplex_grid
    >>> points = simplex_grid(4)
    >>> accuracy = {"uniform": 0.8 - 0.1 * points[:, 2], "few": 0.5 + 0.3 * points[:, 2]}
    >>> display = PreferenceSimplexDisplay(points, accuracy, name="toy").plot()
    >>> [ax.get_title() for ax in display.axes_]
    ['uniform (best 80.0 %)', 'few (best 80.0 %)']
    """

    def __init__(self, points, accuracy, *, name=None):
        self.points = np.asarray(points)
        self.accuracy = dict(accuracy)
        self.name = name

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        n_steps=20,
        groups=None,
        imbalance_ratio=50,
        random_state=0,
        name=None,
        ax=None,
    ):
        """Accuracy of a fitted :class:`~ltlearn.PRLClassifier` over its preference simplex.

        Parameters
        ----------
        estimator : PRLClassifier
            Fitted.
        X, y : array-like
            A balanced test set.
        n_steps : int, default=20
            Resolution of the grid, see :func:`simplex_grid`.
        groups : array-like of shape (n_classes,), default=None
            Class groups, see :func:`ltlearn.metrics.evaluate_preferences`.
        imbalance_ratio : float, default=50
            Ratio of the shifted test sets.
        random_state : int, default=0
            Decides which test samples the shifted sets keep.
        name : str, default=None
            In the title; by default the name of the estimator's class.
        ax : array-like of matplotlib Axes, default=None
            See :meth:`plot`.

        Returns
        -------
        display : PreferenceSimplexDisplay
        """
        _pyplot()
        points = simplex_grid(n_steps)
        accuracy = evaluate_preferences(
            estimator,
            X,
            y,
            points,
            groups=groups,
            imbalance_ratio=imbalance_ratio,
            random_state=random_state,
        )
        display = cls(points, accuracy, name=type(estimator).__name__ if name is None else name)
        return display.plot(ax=ax)

    def plot(self, *, ax=None):
        """Draw one triangle per panel, with a colour bar each.

        Parameters
        ----------
        ax : array-like of matplotlib Axes, default=None
            One Axes per panel (``len(self.accuracy)``). None makes a new
            figure, three panels a row, titled, with a legend for the star.

        Returns
        -------
        display : PreferenceSimplexDisplay
            ``self``, with ``axes_`` and ``figure_``.
        """
        plt = _pyplot()
        tri = import_optional("matplotlib.tri", "plot")
        n_panels = len(self.accuracy)
        if ax is None:
            n_cols = 3
            n_rows = -(-n_panels // n_cols)
            figure, grid = plt.subplots(
                n_rows, n_cols, figsize=(4 * n_cols, 3.6 * n_rows), squeeze=False
            )
            for unused in grid.flat[n_panels:]:
                unused.remove()
            axes = grid.flat[:n_panels]
        else:
            axes = np.ravel(ax)
            if len(axes) != n_panels:
                raise ValueError(
                    f"ax must hold one Axes per panel ({n_panels}: {', '.join(self.accuracy)}); "
                    f"got {len(axes)}."
                )
            figure = axes[0].figure
        xy = self.points @ _CORNERS
        mesh = tri.Triangulation(xy[:, 0], xy[:, 1])
        for panel, (name, values) in zip(axes, self.accuracy.items(), strict=True):
            shading = panel.tripcolor(mesh, 100 * values, shading="gouraud", cmap="viridis")
            best = int(np.nanargmax(values))
            panel.plot(
                *xy[best],
                marker="*",
                color="white",
                markeredgecolor="black",
                markersize=12,
                linestyle="none",
                label="best point of the panel, chosen on this test set (hindsight)",
            )
            panel.figure.colorbar(shading, ax=panel, label="accuracy (%)", shrink=0.8, pad=0.12)
            panel.set_title(f"{name.replace('_', ' ')} (best {100 * values[best]:.1f} %)")
            for (cx, cy), label in zip(_CORNERS, ("forward", "uniform", "backward"), strict=True):
                # Below the bottom corners, above the top one: never over the colours.
                panel.annotate(
                    label,
                    (cx, cy + (0.02 if cy else -0.02)),
                    ha="center",
                    va="bottom" if cy else "top",
                    fontsize=9,
                )
            panel.set_aspect("equal")
            panel.axis("off")
        if ax is None:
            figure.suptitle(f"{self.name}: accuracy over the preference simplex")
            # One legend for the star; it is an oracle, unlike preference_for_imbalance's rule.
            handles, labels = axes[0].get_legend_handles_labels()
            figure.legend(handles, labels, loc="lower center", fontsize=8, frameon=False)
            figure.tight_layout(rect=(0, 0.04, 1, 1))
        self.axes_, self.figure_ = np.asarray(axes), figure
        return self


def plot_preference_simplex(
    estimator, X, y, *, n_steps=20, groups=None, imbalance_ratio=50, random_state=0, path=None
):
    """Accuracy over the preference simplex, one triangle per test set or class group.

    The figure of :class:`PreferenceSimplexDisplay`, in one call.

    Parameters
    ----------
    estimator : PRLClassifier
        Fitted.
    X, y : array-like
        A balanced test set.
    n_steps : int, default=20
        Resolution of the grid, see :func:`simplex_grid`.
    groups : array-like of shape (n_classes,), default=None
        Class groups, see :func:`ltlearn.metrics.evaluate_preferences`.
    imbalance_ratio : float, default=50
        Ratio of the shifted test sets.
    random_state : int, default=0
        Decides which test samples the shifted sets keep.
    path : str or path-like, default=None
        Where to save the figure (PNG, PDF, SVG ... by extension).

    Returns
    -------
    figure : matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltlearn import PRLClassifier
    >>> from ltlearn.datasets import load_long_tailed_digits
    >>> data = load_long_tailed_digits(random_state=0)
    >>> clf = PRLClassifier(max_epochs=5, calibration_cv=None, random_state=0)
    >>> clf = clf.fit(data.X_train, data.y_train)
    >>> figure = plot_preference_simplex(clf, data.X_test, data.y_test, n_steps=10,
    ...                                  imbalance_ratio=10)
    >>> figure.axes[0].get_title()  # doctest: +ELLIPSIS
    'forward 10 (best ... %)'
    """
    display = PreferenceSimplexDisplay.from_estimator(
        estimator,
        X,
        y,
        n_steps=n_steps,
        groups=groups,
        imbalance_ratio=imbalance_ratio,
        random_state=random_state,
    )
    if path is not None:
        display.figure_.savefig(path, dpi=120)
    return display.figure_


def plot_reliability_diagram(
    y_true, y_prob, *, n_bins=15, labels=None, title=None, path=None, axes=None
):
    """Reliability diagram: accuracy against confidence, and the confidence histogram.

    The figure of :class:`ReliabilityDisplay` without class groups, in one
    call: the top panel shows, for equal-width bins of the top-label
    confidence, the accuracy of the samples in each bin as bars, the diagonal
    of perfect calibration, and the gap between accuracy and confidence
    hatched; the bottom panel shows how many samples fall in each bin. ECE and
    MCE are in the title.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    y_prob : array-like of shape (n_samples, n_classes)
    n_bins : int, default=15
    labels : array-like of shape (n_classes,), default=None
        Class of each column of ``y_prob``; by default ``0 .. n_classes - 1``.
    title : str, default=None
        Title above the ECE / MCE line.
    path : str or path-like, default=None
        Where to save the figure.
    axes : pair of matplotlib Axes, default=None
        Draw into these (reliability, histogram) instead of a new figure.

    Returns
    -------
    figure : matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> figure = plot_reliability_diagram([0, 1, 1], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> figure.axes[0].get_title()
    'ECE 30.00 %, MCE 60.00 %'
    """
    ax, hist_ax = (None, None) if axes is None else axes
    display = ReliabilityDisplay.from_predictions(
        y_true, y_prob, n_bins=n_bins, labels=labels, name=title, ax=ax, hist_ax=hist_ax
    )
    if path is not None:
        display.figure_.tight_layout()
        display.figure_.savefig(path, dpi=120)
    return display.figure_
