"""LongTailTemperatureScaler, its weights, and the calibration metrics."""

import numpy as np
import pytest
import sklearn
from scipy.special import softmax
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler, PRLClassifier
from ltlearn.calibration import wasserstein_importance_weights
from ltlearn.datasets import train_val_split
from ltlearn.metrics import (
    adaptive_calibration_error,
    brier_score,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)

SKLEARN_HAS_TEMPERATURE = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)


@pytest.fixture(scope="module")
def split(digits):
    train, cal = train_val_split(digits.y_train, val_size=0.4, random_state=0)
    X, y = digits.X_train, digits.y_train
    return X[train], y[train], X[cal], y[cal]


@pytest.fixture(scope="module")
def model(split):
    X, y, _, _ = split
    return BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y)


# -- metrics against hand-computed values ---------------------------------------


def test_ece_and_mce_by_hand():
    y = [0, 0, 1, 1]
    p = [[0.95, 0.05], [0.85, 0.15], [0.7, 0.3], [0.2, 0.8]]
    # Bins of width 0.5: (0.5, 1] holds all four; confidences .95 .85 .7 .8, accuracy 3/4.
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(abs(0.75 - 0.825))
    # Ten bins: 0.95 right, 0.85 right, 0.7 wrong, 0.8 right, each alone.
    expected = (0.05 + 0.15 + 0.7 + 0.2) / 4
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)
    assert maximum_calibration_error(y, p, n_bins=10) == pytest.approx(0.7)
    assert adaptive_calibration_error(y, p, n_bins=4) == pytest.approx(expected)


def test_nll_brier_and_classwise_by_hand():
    y = np.array([0, 1])
    p = np.array([[0.75, 0.25], [0.5, 0.5]])
    assert negative_log_likelihood(y, p) == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)
    assert brier_score(y, p) == pytest.approx((2 * 0.25**2 + 2 * 0.5**2) / 2)
    # Class 0, bins (0, .5] and (.5, 1]: p=.75 alone (frequency of y == 0: 1), p=.5 alone (0).
    class0 = 0.5 * abs(1 - 0.75) + 0.5 * abs(0 - 0.5)
    # Class 1: p=.25 and p=.5 share (0, .5]: frequency 1/2, mean probability .375.
    class1 = 1.0 * abs(0.5 - 0.375)
    assert classwise_calibration_error(y, p, n_bins=2) == pytest.approx((class0 + class1) / 2)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        expected_calibration_error([0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="samples"):
        brier_score([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="finite"):
        negative_log_likelihood([0], [[np.nan, 1.0]])


# -- weights ---------------------------------------------------------------------


def test_wasserstein_weights_by_hand():
    """One dimension, one head and one tail class: the density ratio in closed form."""
    Z = np.array([[-1.0], [1.0], [-1.0], [1.0], [4.0], [6.0]])
    y = np.array([0, 0, 0, 0, 1, 1])
    weights = wasserstein_importance_weights(
        Z, y, np.array([True, False]), alpha=0.5, clip=(0, 100)
    )
    mu_t, sigma_t = 5.0, 1.0  # tail: mean 5, std 1; head: mean 0, std 1
    mu_m, sigma_m = 0.5 * 5.0 + 0.5 * 0.0, 1.0

    def log_n(x, mu, s):
        return -0.5 * ((x - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)

    expected = np.exp(
        log_n(np.array([4.0, 6.0]), mu_m, sigma_m) - log_n(np.array([4.0, 6.0]), mu_t, sigma_t)
    )
    np.testing.assert_allclose(weights[:4], 1.0)
    np.testing.assert_allclose(weights[4:], expected)


def test_wasserstein_weights_do_not_overflow_in_high_dimensions():
    rng = np.random.default_rng(0)
    Z = np.vstack([rng.normal(0, 1, (300, 1280)), rng.normal(0.3, 2, (5, 1280))])
    y = np.repeat([0, 1], [300, 5])
    weights = wasserstein_importance_weights(Z, y, np.array([True, False]))
    assert np.all(np.isfinite(weights))
    assert np.all((weights[300:] >= 0.3) & (weights[300:] <= 5.0))


# -- the meta-estimator ------------------------------------------------------------


def test_temperature_only_never_changes_predictions(model, split, digits):
    _, _, Xc, yc = split
    for weighting in ("none", "class_balanced", "wasserstein", "class_balanced_wasserstein"):
        scaler = LongTailTemperatureScaler(model, weighting=weighting, head_classes=20)
        scaler.fit(Xc, yc)
        np.testing.assert_array_equal(scaler.predict(digits.X_test), model.predict(digits.X_test))
        assert 0.05 <= scaler.temperature_ <= 5.0
        assert scaler.sample_weights_.mean() == pytest.approx(1.0)
        np.testing.assert_allclose(scaler.bias_, 0.0)


def test_the_temperature_minimises_the_weighted_nll(model, split):
    _, _, Xc, yc = split
    scaler = LongTailTemperatureScaler(model, weighting="class_balanced").fit(Xc, yc)
    logits = model.decision_function(Xc)
    w = scaler.sample_weights_

    def nll(t):
        return -np.sum(w * np.log(softmax(logits / t, axis=1)[np.arange(len(yc)), yc]))

    t = scaler.temperature_
    assert nll(t) <= min(nll(0.97 * t), nll(1.03 * t)) + 1e-9


def test_class_balanced_weights_make_classes_count_equally(model, split):
    _, _, Xc, yc = split
    scaler = LongTailTemperatureScaler(model, weighting="class_balanced").fit(Xc, yc)
    totals = np.bincount(yc, weights=scaler.sample_weights_)
    np.testing.assert_allclose(totals, totals[0])


def test_on_a_balanced_calibration_set_the_weightings_agree(digits, model):
    # The digits test set is balanced (about 90 per class): every class is head.
    plain = LongTailTemperatureScaler(model, weighting="none").fit(digits.X_test, digits.y_test)
    paper = LongTailTemperatureScaler(model, weighting="wasserstein", head_classes=50)
    paper.fit(digits.X_test, digits.y_test)
    assert len(paper.head_classes_) == 10
    assert paper.temperature_ == pytest.approx(plain.temperature_, rel=1e-6)
    balanced = LongTailTemperatureScaler(model, weighting="class_balanced")
    assert balanced.fit(digits.X_test, digits.y_test).temperature_ == pytest.approx(
        plain.temperature_, rel=0.05
    )


@pytest.mark.skipif(not SKLEARN_HAS_TEMPERATURE, reason="needs scikit-learn >= 1.8")
def test_plain_mode_agrees_with_scikit_learn(model, split):
    _, _, Xc, yc = split
    ours = LongTailTemperatureScaler(model, weighting="none").fit(Xc, yc)
    theirs = CalibratedClassifierCV(FrozenEstimator(model), method="temperature").fit(Xc, yc)
    np.testing.assert_allclose(ours.predict_proba(Xc), theirs.predict_proba(Xc), atol=2e-3)


def test_bias_mode_corrects_the_label_shift_of_a_plain_head(split, digits):
    X, y, Xc, yc = split
    plain = BalancedSoftmaxClassifier(tau=0.0, device="cpu", random_state=0).fit(X, y)
    shifted = LongTailTemperatureScaler(plain, weighting="class_balanced", bias=True).fit(Xc, yc)
    assert shifted.bias_.sum() == pytest.approx(0.0, abs=1e-9)
    # Rare classes gain: the bias undoes the training prior the plain head learnt.
    assert shifted.bias_[-1] > shifted.bias_[0]
    assert shifted.score(digits.X_test, digits.y_test) >= plain.score(digits.X_test, digits.y_test)


def test_works_on_scikit_learn_and_prl_models(split, digits):
    X, y, Xc, yc = split
    lr = LogisticRegression(max_iter=500).fit(X, y)
    scaler = LongTailTemperatureScaler(
        lr, weighting="wasserstein", head_classes=0.3, n_components=8
    )
    proba = scaler.fit(Xc, yc).predict_proba(digits.X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    prl = PRLClassifier(max_epochs=5, device="cpu", random_state=0, preference="backward").fit(X, y)
    scaler = LongTailTemperatureScaler(prl).fit(Xc, yc)
    np.testing.assert_array_equal(scaler.predict(digits.X_test), prl.predict(digits.X_test))


def test_grid_search_over_a_frozen_estimator(model, split):
    _, _, Xc, yc = split
    search = GridSearchCV(
        LongTailTemperatureScaler(FrozenEstimator(model)),
        {"weighting": ["none", "class_balanced"]},
        scoring="neg_log_loss",
        cv=2,
    ).fit(Xc, yc)
    assert search.best_estimator_.temperature_ > 0
    assert clone(search.best_estimator_).estimator is not None


def test_head_classes_specifications(model, split):
    _, _, Xc, yc = split
    counts = np.bincount(yc)
    by_count = LongTailTemperatureScaler(model, head_classes=20).fit(Xc, yc)
    np.testing.assert_array_equal(by_count.head_classes_, np.flatnonzero(counts >= 20))
    by_fraction = LongTailTemperatureScaler(model, head_classes=0.2).fit(Xc, yc)
    np.testing.assert_array_equal(np.sort(by_fraction.head_classes_), np.argsort(-counts)[:2])
    listed = LongTailTemperatureScaler(model, head_classes=[3, 5]).fit(Xc, yc)
    np.testing.assert_array_equal(listed.head_classes_, [3, 5])
    with pytest.raises(ValueError, match="head_classes lists"):
        LongTailTemperatureScaler(model, head_classes=[3, 42]).fit(Xc, yc)


def test_bad_input_is_a_clear_error(model, split):
    X, y, Xc, yc = split
    with pytest.raises(NotFittedError, match="needs a fitted estimator"):
        LongTailTemperatureScaler(BalancedSoftmaxClassifier()).fit(Xc, yc)
    with pytest.raises(ValueError, match="not fitted on"):
        LongTailTemperatureScaler(model).fit(Xc, np.where(yc == 0, 99, yc))
    with pytest.raises(ValueError, match="NaN"):
        bad = Xc.copy()
        bad[0, 0] = np.nan
        LongTailTemperatureScaler(model).fit(bad, yc)
    with pytest.raises(ValueError, match="temperature_bounds"):
        LongTailTemperatureScaler(model, temperature_bounds=(5, 1)).fit(Xc, yc)


def test_missing_classes_and_singletons_are_fine(model, split, digits):
    """A class absent from the calibration set is simply not in the loss; one sample is floored."""
    _, _, Xc, yc = split
    keep = (yc != 9) | (np.arange(len(yc)) == np.flatnonzero(yc == 9)[0])
    keep &= yc != 8
    scaler = LongTailTemperatureScaler(
        model, weighting="class_balanced_wasserstein", head_classes=20
    )
    scaler.fit(Xc[keep], yc[keep])
    assert scaler.calibration_counts_[8] == 0 and scaler.calibration_counts_[9] == 1
    assert np.all(np.isfinite(scaler.sample_weights_))
    assert scaler.predict_proba(digits.X_test).shape == (len(digits.X_test), 10)


def test_reliability_diagram_is_written(model, split, tmp_path):
    pytest.importorskip("matplotlib")
    from ltlearn.plotting import plot_reliability_diagram

    _, _, Xc, yc = split
    path = tmp_path / "reliability.png"
    figure = plot_reliability_diagram(yc, model.predict_proba(Xc), title="digits", path=path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "ECE" in figure.axes[0].get_title()
