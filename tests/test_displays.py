"""Display objects of ltlearn.plotting: the values they hold, what they draw, their errors."""

import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.metrics import (
    evaluate_preferences,
    evaluate_test_agnostic,
    expected_calibration_error,
    maximum_calibration_error,
    per_class_accuracy,
    rank_groups,
    shot_accuracy,
    shot_groups,
)
from ltlearn.plotting import (
    PerClassAccuracyDisplay,
    PreferenceSimplexDisplay,
    ReliabilityDisplay,
    ShiftedTestSetsDisplay,
    plot_reliability_diagram,
    simplex_grid,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")

# Digits' classes hold 87 to 8 training rows: many > 50, few < 20 gives three groups.
MANY = 50


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def clf(digits):
    model = BalancedSoftmaxClassifier(max_epochs=5, calibration_cv=None, random_state=0)
    return model.fit(digits.X_train, digits.y_train)


@pytest.fixture(scope="module")
def prl(digits):
    model = PRLClassifier(max_epochs=5, calibration_cv=None, random_state=0)
    return model.fit(digits.X_train, digits.y_train)


# -- ReliabilityDisplay ----------------------------------------------------------------


def test_reliability_values_match_the_metrics_and_a_direct_count(clf, digits):
    y_prob = clf.predict_proba(digits.X_test)
    display = ReliabilityDisplay.from_predictions(digits.y_test, y_prob, n_bins=10)
    confidence = y_prob.max(axis=1)
    correct = y_prob.argmax(axis=1) == digits.y_test
    # Bin (0.6, 0.7], counted by hand.
    rows = (confidence > 0.6) & (confidence <= 0.7)
    assert display.counts[6] == rows.sum() > 0
    assert display.accuracy[6] == pytest.approx(correct[rows].mean())
    assert display.confidence[6] == pytest.approx(confidence[rows].mean())
    assert display.counts.sum() == len(digits.y_test)
    assert np.all(np.isnan(display.accuracy[display.counts == 0]))
    assert display.ece == pytest.approx(
        expected_calibration_error(digits.y_test, y_prob, n_bins=10)
    )
    assert display.mce == pytest.approx(maximum_calibration_error(digits.y_test, y_prob, n_bins=10))
    np.testing.assert_allclose(display.bin_edges, np.linspace(0, 1, 11))
    assert display.group_curves is None


def test_reliability_group_curves_hold_the_rows_of_their_classes(clf, digits):
    y_prob = clf.predict_proba(digits.X_test)
    display = ReliabilityDisplay.from_predictions(
        digits.y_test, y_prob, class_counts=clf.class_counts_, many_threshold=MANY
    )
    groups = shot_groups(clf.class_counts_, many_threshold=MANY)
    assert list(display.group_curves) == ["many", "medium", "few"]
    few = np.isin(digits.y_test, np.flatnonzero(groups == "few"))
    curve = display.group_curves["few"]
    assert curve.counts.sum() == few.sum()
    alone = ReliabilityDisplay.from_predictions(digits.y_test[few], y_prob[few])
    np.testing.assert_array_equal(curve.counts, alone.counts)
    np.testing.assert_allclose(curve.accuracy, alone.accuracy, equal_nan=True)
    # The three groups split the rows.
    total = sum(c.counts for c in display.group_curves.values())
    np.testing.assert_array_equal(total, display.counts)


def test_reliability_from_estimator_reads_classes_and_training_counts(clf, digits):
    display = ReliabilityDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, many_threshold=MANY
    )
    direct = ReliabilityDisplay.from_predictions(
        digits.y_test,
        clf.predict_proba(digits.X_test),
        class_counts=clf.class_counts_,
        many_threshold=MANY,
    )
    np.testing.assert_array_equal(display.counts, direct.counts)
    assert display.ece == direct.ece
    assert list(display.group_curves) == ["many", "medium", "few"]
    assert display.name == "BalancedSoftmaxClassifier"
    assert display.ax_.get_title().startswith("BalancedSoftmaxClassifier\nECE ")
    # Explicit groups replace the shot groups.
    ranked = ReliabilityDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, groups=rank_groups(clf.class_counts_)
    )
    assert list(ranked.group_curves) == ["head", "middle", "tail"]


def test_reliability_draws_bars_group_lines_and_histogram(clf, digits):
    display = ReliabilityDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, many_threshold=MANY
    )
    assert display.figure_ is display.ax_.figure is display.hist_ax_.figure
    labels = [text.get_text() for text in display.ax_.get_legend().get_texts()]
    assert labels[:3] == [
        f"{group} classes ({int(curve.counts.sum())} rows)"
        for group, curve in display.group_curves.items()
    ]
    histogram = [patch.get_height() for patch in display.hist_ax_.patches]
    assert histogram == display.counts.tolist()
    # Drawn again on given axes, without a histogram.
    figure, ax = plt.subplots()
    assert display.plot(ax=ax, name="again") is display
    assert display.ax_ is ax and display.hist_ax_ is None and display.figure_ is figure
    assert display.ax_.get_title().startswith("again\n")


def test_reliability_legend_goes_beside_the_group_curves_only_on_its_own_figure(clf, digits):
    def legend_right_of_axes(display):
        display.figure_.canvas.draw()
        legend = display.ax_.get_legend().get_window_extent()
        return legend.x0 > display.ax_.get_window_extent().x1

    display = ReliabilityDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, many_threshold=MANY
    )
    assert legend_right_of_axes(display)
    # On given axes (a panel among others) it stays inside, where the caller can move it.
    _, axes = plt.subplots(1, 2)
    assert not legend_right_of_axes(display.plot(ax=axes[0]))


def test_plot_reliability_diagram_is_the_display_without_groups(clf, digits, tmp_path):
    y_prob = clf.predict_proba(digits.X_test)
    path = tmp_path / "reliability.png"
    figure = plot_reliability_diagram(digits.y_test, y_prob, title="digits", path=path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    top, bottom = figure.axes
    ece = 100 * expected_calibration_error(digits.y_test, y_prob)
    assert top.get_title().startswith(f"digits\nECE {ece:.2f} %")
    assert len(top.get_legend().get_texts()) == 3  # accuracy, gap, diagonal: no groups
    figure, axes = plt.subplots(2, 1)
    assert plot_reliability_diagram(digits.y_test, y_prob, axes=axes) is figure


def test_reliability_errors(clf, digits):
    y_prob = clf.predict_proba(digits.X_test)
    with pytest.raises(ValueError, match="not both"):
        ReliabilityDisplay.from_predictions(
            digits.y_test, y_prob, groups=["a"] * 10, class_counts=clf.class_counts_
        )
    with pytest.raises(ValueError, match=r"one entry per class \(10\); got 3"):
        ReliabilityDisplay.from_predictions(digits.y_test, y_prob, groups=["a", "b", "c"])
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        ReliabilityDisplay.from_predictions(digits.y_test, y_prob, n_bins=0)
    display = ReliabilityDisplay.from_predictions(digits.y_test, y_prob)
    with pytest.raises(ValueError, match="hist_ax needs ax"):
        display.plot(hist_ax=display.hist_ax_)


# -- PerClassAccuracyDisplay -----------------------------------------------------------


def test_per_class_accuracy_values_and_group_means(clf, digits):
    y_pred = clf.predict(digits.X_test)
    display = PerClassAccuracyDisplay.from_predictions(
        digits.y_test, y_pred, class_counts=clf.class_counts_, many_threshold=MANY
    )
    np.testing.assert_allclose(display.accuracy, per_class_accuracy(digits.y_test, y_pred))
    expected = shot_accuracy(digits.y_test, y_pred, clf.class_counts_, many_threshold=MANY)
    assert display.group_accuracy == pytest.approx(
        {g: expected[g] for g in ("many", "medium", "few")}
    )
    # The curve runs from the rarest class to the most frequent.
    x, y = display.line_.get_data()
    order = np.argsort(clf.class_counts_, kind="stable")
    np.testing.assert_array_equal(x, clf.class_counts_[order])
    np.testing.assert_allclose(y, 100 * display.accuracy[order])
    assert display.ax_.get_xscale() == "log"


def test_per_class_accuracy_from_estimator_and_two_on_one_axes(clf, digits):
    display = PerClassAccuracyDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, many_threshold=MANY
    )
    np.testing.assert_array_equal(display.class_counts, clf.class_counts_)
    np.testing.assert_array_equal(display.labels, clf.classes_)
    other = LogisticRegression(max_iter=200).fit(digits.X_train, digits.y_train)
    second = PerClassAccuracyDisplay.from_estimator(
        other,
        digits.X_test,
        digits.y_test,
        class_counts=clf.class_counts_,
        many_threshold=MANY,
        ax=display.ax_,
        color="tab:red",
    )
    assert second.ax_ is display.ax_
    legend = [text.get_text() for text in display.ax_.get_legend().get_texts()]
    assert legend == ["BalancedSoftmaxClassifier", "LogisticRegression"]
    # Each display's group means are drawn in its curve's colour.
    segments = display.ax_.collections
    assert len(segments) == 6
    assert matplotlib.colors.same_color(segments[-1].get_colors()[0], "tab:red")
    # The groups are named once, whatever the number of displays.
    assert [text.get_text() for text in display.ax_.texts] == ["many", "medium", "few"]


def test_per_class_accuracy_errors(digits):
    other = LogisticRegression(max_iter=200).fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match="LogisticRegression has no class_counts_"):
        PerClassAccuracyDisplay.from_estimator(other, digits.X_test, digits.y_test)
    with pytest.raises(ValueError, match="class_counts must be positive"):
        PerClassAccuracyDisplay.from_predictions([0, 1], [0, 1], class_counts=[3, 0])
    with pytest.raises(ValueError, match="class_counts has 2 entries but labels has 3"):
        PerClassAccuracyDisplay.from_predictions(
            [0, 1], [0, 1], class_counts=[3, 1], labels=[0, 1, 2]
        )


# -- ShiftedTestSetsDisplay -------------------------------------------------------------


def test_shifted_test_sets_match_evaluate_test_agnostic(clf, digits):
    display = ShiftedTestSetsDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, imbalance_ratios=[10, 2], random_state=3
    )
    expected = evaluate_test_agnostic(
        clf, digits.X_test, digits.y_test, imbalance_ratios=[10, 2], random_state=3
    )
    assert display.accuracy == expected
    ticks = [tick.get_text() for tick in display.ax_.get_xticklabels()]
    assert ticks == ["F10", "F2", "uniform", "B2", "B10"]
    np.testing.assert_allclose(display.line_.get_ydata(), 100 * np.array(list(expected.values())))
    # The same sets from the predictions alone, given the training order of the classes.
    order = clf.classes_[np.argsort(-clf.class_counts_, kind="stable")]
    from_predictions = ShiftedTestSetsDisplay.from_predictions(
        digits.y_test,
        clf.predict(digits.X_test),
        class_order=order,
        imbalance_ratios=[10, 2],
        random_state=3,
    )
    assert from_predictions.accuracy == expected


def test_shifted_test_sets_several_ways_on_one_axes(clf, digits):
    options = {"imbalance_ratios": [10], "random_state": 0}
    trained = ShiftedTestSetsDisplay.from_estimator(
        clf, digits.X_test, digits.y_test, name="as trained", **options
    )
    oracle = ShiftedTestSetsDisplay.from_estimator(
        clf,
        digits.X_test,
        digits.y_test,
        oracle_prior=True,
        name="true prior",
        ax=trained.ax_,
        **options,
    )
    assert oracle.accuracy == evaluate_test_agnostic(
        clf, digits.X_test, digits.y_test, oracle_prior=True, **options
    )
    assert len(trained.ax_.lines) == 2
    legend = [text.get_text() for text in trained.ax_.get_legend().get_texts()]
    assert legend == ["as trained", "true prior"]


def test_shifted_test_sets_errors(digits):
    with pytest.raises(ValueError, match="y_true has shape"):
        ShiftedTestSetsDisplay.from_predictions([0, 1, 1], [0, 1], class_order=[0, 1])
    with pytest.raises(ValueError, match=r"labels that are not among the 2 known classes: \[2\]"):
        ShiftedTestSetsDisplay.from_predictions([0, 1, 2], [0, 1, 2], class_order=[0, 1])


# -- PreferenceSimplexDisplay -----------------------------------------------------------


def test_preference_simplex_values_and_panels(prl, digits):
    groups = rank_groups(prl.class_counts_)
    display = PreferenceSimplexDisplay.from_estimator(
        prl, digits.X_test, digits.y_test, n_steps=4, groups=groups, imbalance_ratio=10
    )
    np.testing.assert_array_equal(display.points, simplex_grid(4))
    expected = evaluate_preferences(
        prl, digits.X_test, digits.y_test, simplex_grid(4), groups=groups, imbalance_ratio=10
    )
    assert list(display.accuracy) == list(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(display.accuracy[name], values)
    assert len(display.axes_) == 6
    best = 100 * expected["tail"].max()
    assert display.axes_[5].get_title() == f"tail (best {best:.1f} %)"
    assert display.figure_.get_suptitle() == ("PRLClassifier: accuracy over the preference simplex")
    # Drawn again into given axes, one per panel.
    figure, axes = plt.subplots(2, 3)
    assert display.plot(ax=axes).figure_ is figure
    with pytest.raises(ValueError, match=r"one Axes per panel \(6: forward_10, .*\); got 2"):
        display.plot(ax=axes[0, :2])


# -- without matplotlib -----------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: ReliabilityDisplay.from_estimator(None, None, None),
        lambda: ReliabilityDisplay.from_predictions(None, None),
        lambda: PerClassAccuracyDisplay.from_estimator(None, None, None),
        lambda: PerClassAccuracyDisplay.from_predictions(None, None, class_counts=None),
        lambda: ShiftedTestSetsDisplay.from_estimator(None, None, None),
        lambda: ShiftedTestSetsDisplay.from_predictions(None, None, class_order=None),
        lambda: PreferenceSimplexDisplay.from_estimator(None, None, None),
        lambda: ShiftedTestSetsDisplay({"uniform": 0.5}).plot(),
    ],
)
def test_missing_matplotlib_is_named_before_anything_is_computed(build, monkeypatch):
    # None in sys.modules makes the import fail, as if matplotlib were absent; the None
    # arguments show that nothing is computed before the check.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'ltlearn\[plot\]'"):
        build()
