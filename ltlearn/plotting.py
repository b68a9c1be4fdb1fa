"""Figures of ltlearn's estimators (needs the ``plot`` extra: matplotlib)."""

import numpy as np

from ltlearn._optional import import_optional
from ltlearn.metrics import (
    _check_probabilities,
    evaluate_preferences,
    expected_calibration_error,
    maximum_calibration_error,
)

__all__ = ["plot_preference_simplex", "plot_reliability_diagram", "simplex_grid"]

# Corners of the drawn triangle: forward bottom left, uniform top, backward bottom right.
_CORNERS = np.array([[0.0, 0.0], [0.5, np.sqrt(3) / 2], [1.0, 0.0]])


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


def plot_preference_simplex(
    estimator, X, y, *, n_steps=20, groups=None, imbalance_ratio=50, random_state=0, path=None
):
    """Accuracy over the preference simplex, one triangle per test set or class group.

    Each panel is the (forward, uniform, backward) simplex with the forward
    corner bottom left, uniform on top and backward bottom right; colour is
    accuracy on the forward / backward long-tailed test sets of ratio
    ``imbalance_ratio``, the balanced set ``(X, y)``, and each group of classes
    (many / medium / few by default). The best point of each panel is marked
    with a star: chosen on that very test set, it is an oracle, and may differ
    from the preference that :meth:`~ltlearn.PRLClassifier.preference_for_imbalance`
    suggests without labels.

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
    """
    plt = import_optional("matplotlib.pyplot", "plot")
    tri = import_optional("matplotlib.tri", "plot")
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
    xy = points @ _CORNERS
    mesh = tri.Triangulation(xy[:, 0], xy[:, 1])
    n_panels = len(accuracy)
    n_cols = 3
    n_rows = -(-n_panels // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, accuracy.items(), strict=False):
        shading = ax.tripcolor(mesh, 100 * values, shading="gouraud", cmap="viridis")
        best = int(np.nanargmax(values))
        ax.plot(
            *xy[best],
            marker="*",
            color="white",
            markeredgecolor="black",
            markersize=12,
            linestyle="none",
            label="best point of the panel, chosen on this test set (hindsight)",
        )
        figure.colorbar(shading, ax=ax, label="accuracy (%)", shrink=0.8)
        ax.set_title(f"{name.replace('_', ' ')} (best {100 * values[best]:.1f} %)")
        for (cx, cy), label in zip(_CORNERS, ("forward", "uniform", "backward"), strict=True):
            # Below the bottom corners, above the top one: never over the colours.
            ax.annotate(
                label,
                (cx, cy + (0.02 if cy else -0.02)),
                ha="center",
                va="bottom" if cy else "top",
                fontsize=9,
            )
        ax.set_aspect("equal")
        ax.axis("off")
    for ax in list(axes.flat)[n_panels:]:
        ax.remove()
    figure.suptitle(f"{type(estimator).__name__}: accuracy over the preference simplex")
    # One legend for the star; it is an oracle, unlike preference_for_imbalance's rule.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_reliability_diagram(
    y_true, y_prob, *, n_bins=15, labels=None, title=None, path=None, axes=None
):
    """Reliability diagram: accuracy against confidence, and the confidence histogram.

    The top panel shows, for equal-width bins of the top-label confidence, the
    accuracy of the samples in each bin as bars, the diagonal of perfect
    calibration, and the gap between accuracy and confidence shaded; the bottom
    panel shows how many samples fall in each bin. ECE and MCE are in the title.

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
    """
    plt = import_optional("matplotlib.pyplot", "plot")
    y_index, y_prob = _check_probabilities(y_true, y_prob, labels)
    confidence = y_prob.max(axis=1)
    correct = y_prob.argmax(axis=1) == y_index
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    filled = counts > 0
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins)[filled] / counts[filled]
    mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins)[filled] / counts[filled]
    centres = (edges[:-1] + edges[1:])[filled] / 2
    width = 1.0 / n_bins
    if axes is None:
        figure, axes = plt.subplots(
            2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    top, bottom = axes
    figure = top.figure
    top.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    bottom_edge = np.minimum(accuracy, mean_conf)
    # Hatched outline only: a filled gap over the accuracy bar (underconfident bins)
    # would mix into a colour the legend does not show.
    top.bar(
        centres,
        np.abs(mean_conf - accuracy),
        bottom=bottom_edge,
        width=width,
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    ece = expected_calibration_error(y_index, y_prob, n_bins=n_bins)
    mce = maximum_calibration_error(y_index, y_prob, n_bins=n_bins)
    summary = f"ECE {100 * ece:.2f} %, MCE {100 * mce:.2f} %"
    top.set_title(summary if title is None else f"{title}\n{summary}", fontsize=10)
    bottom.bar((edges[:-1] + edges[1:]) / 2, counts, width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("samples")
    if path is not None:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    return figure
