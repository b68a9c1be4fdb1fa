"""Figures of ltlearn's estimators (needs the ``plot`` extra: matplotlib)."""

import numpy as np

from ltlearn._optional import import_optional
from ltlearn.metrics import evaluate_preferences

__all__ = ["plot_preference_simplex", "simplex_grid"]

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
    (many / medium / few by default). The best point of each panel is marked.

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
        ax.plot(*xy[best], marker="*", color="white", markeredgecolor="black", markersize=12)
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
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
