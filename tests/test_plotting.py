"""The preference-simplex figure and the optional-dependency errors."""

import sys

import numpy as np
import pytest

from ltlearn import PRLClassifier
from ltlearn.metrics import evaluate_preferences, shot_groups
from ltlearn.plotting import plot_preference_simplex, simplex_grid


def test_simplex_grid_covers_the_simplex():
    grid = simplex_grid(4)
    assert len(grid) == 15
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert {tuple(row) for row in np.eye(3)} <= {tuple(row) for row in grid}
    with pytest.raises(ValueError, match="n_steps"):
        simplex_grid(0)


def test_evaluate_preferences_matches_one_by_one(digits):
    clf = PRLClassifier(max_epochs=5, device="cpu", random_state=0)
    clf.fit(digits.X_train, digits.y_train)
    groups = shot_groups(clf.class_counts_, many_threshold=50)
    prefs = [(1, 0, 0), (0.3, 0.4, 0.3)]
    acc = evaluate_preferences(clf, digits.X_test, digits.y_test, prefs, groups=groups)
    for m, p in enumerate(prefs):
        assert acc["uniform"][m] == pytest.approx(
            np.mean(clf.predict(digits.X_test, preference=p) == digits.y_test)
        )


def test_plot_writes_a_png(digits, tmp_path):
    pytest.importorskip("matplotlib")
    clf = PRLClassifier(max_epochs=5, device="cpu", random_state=0)
    clf.fit(digits.X_train, digits.y_train)
    path = tmp_path / "simplex.png"
    figure = plot_preference_simplex(
        clf,
        digits.X_test,
        digits.y_test,
        n_steps=6,
        imbalance_ratio=10,
        groups=shot_groups(clf.class_counts_, many_threshold=50),
        path=path,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 2 * 6  # six panels, each with its colour bar


def test_missing_matplotlib_names_the_extra(digits, monkeypatch):
    # A None entry in sys.modules makes the import fail, as if matplotlib were absent.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'ltlearn\[plot\]'"):
        plot_preference_simplex(None, digits.X_test, digits.y_test)
