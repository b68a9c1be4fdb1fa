"""Adaptation that cannot hurt: calibration, the test of "no shift", intervals, pipelines."""

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler, PRLClassifier, adaptation
from ltlearn.adaptation import (
    EM_CHECK_LEVEL,
    _calibration_covariance,
    _mean_posterior_covariance,
    _moment_pvalue,
    _SourceLogits,
    adapt,
    confusion_prior,
    em_prior,
    estimate_test_prior,
)
from ltlearn.calibration import _fit_class_bias, _posterior_confusion, _shrunk_bias
from ltlearn.datasets import (
    load_long_tailed_digits,
    long_tailed_subset,
    make_long_tailed_embeddings,
)


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


class ExactPosterior(ClassifierMixin, BaseEstimator):
    """Gaussian classes with known means: ``predict_proba`` is the exact posterior."""

    def __init__(self, means=None, noise=1.0, prior=None):
        self.means = means
        self.noise = noise
        self.prior = prior

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(len(self.means))
        return self

    def predict_proba(self, X):
        d2 = ((X[:, None, :] - self.means[None]) ** 2).sum(-1)
        return softmax(-d2 / (2 * self.noise**2) + np.log(self.prior), axis=1)


def draw(means, counts, rng, noise=1.0):
    y = np.repeat(np.arange(len(counts)), counts)
    return means[y] + noise * rng.normal(size=(len(y), means.shape[1])), y


@pytest.fixture(scope="module")
def digits_models():
    """The README's quick start, seeds 0-3: long-tailed digits at IR 10."""
    out = []
    for seed in range(4):
        data = load_long_tailed_digits(imbalance_ratio=10, random_state=seed)
        clf = BalancedSoftmaxClassifier(device="cpu", random_state=0)
        out.append((data, clf.fit(data.X_train, data.y_train)))
    return out


def test_quick_start_adapt_does_not_hurt_on_its_balanced_test_set(digits_models):
    """The issue's case: MAP on raw posteriors lost 1.8 to 9.9 points here."""
    losses, detected = [], []
    for data, clf in digits_models:
        # A regularised head on 350 rows is under-confident: the temperature sharpens it.
        assert clf.calibration_temperature_ < 0.8
        before = clf.score(data.X_test, data.y_test)
        model = copy.copy(clf).adapt(data.X_test)
        losses.append(before - model.score(data.X_test, data.y_test))
        detected.append(model.shift_detected_)
        # Calibrated posteriors: EM's estimate explains the rows, no fallback.
        assert model.test_prior_method_ == "map"
        if not model.shift_detected_:
            np.testing.assert_array_equal(model.predict(data.X_test), clf.predict(data.X_test))
    # Seed 0 still loses a point: its rarest class (8 training rows) is miscalibrated
    # beyond what one temperature corrects, and the test rejects "no shift".
    assert max(losses) <= 0.012 and np.mean(losses) <= 0.005
    assert sum(detected) <= 1


def test_quick_start_adapt_helps_on_a_shifted_test_set(digits_models):
    gains = []
    for data, clf in digits_models:
        rows = long_tailed_subset(data.y_test, 10, random_state=0)
        X, y = data.X_test[rows], data.y_test[rows]
        model = copy.copy(clf).adapt(X)
        assert model.shift_detected_
        gains.append(model.score(X, y) - clf.score(X, y))
    assert np.mean(gains) > 0.01 and min(gains) > -0.005


def test_adapting_to_a_training_like_set_moves_toward_the_training_prior():
    rng = np.random.default_rng(0)
    means = 2.5 * rng.normal(size=(4, 8)) / np.sqrt(8)
    counts = [800, 300, 100, 40]
    X, y = draw(means, counts, rng)
    clf = BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y)
    X_test, y_test = draw(means, counts, rng)
    model = copy.copy(clf).adapt(X_test)
    assert model.shift_detected_
    assert tv(model.test_prior_, clf.class_prior_) < 0.05
    assert model.score(X_test, y_test) > clf.score(X_test, y_test)
    # Drawn like a balanced set instead: no shift from what the model predicts for.
    X_bal, _ = draw(means, [300] * 4, rng)
    assert not copy.copy(clf).adapt(X_bal).shift_detected_


@pytest.mark.parametrize(
    "method, n_rows, draws, highest",
    [
        ("em", 1000, 60, 0.95),
        # MAP pulls 30 rows toward "no shift"; its bands are as wide as the rows alone
        # make them. Narrowed by MAP's pseudo-counts as well, they covered 83 % here.
        ("map", 30, 100, 0.97),
    ],
)
def test_intervals_cover_a_known_prior_at_their_nominal_rate(method, n_rows, draws, highest):
    """Exact posteriors: 90 % bands cover 85 % or more of the drawn sets' class frequencies."""
    rng = np.random.default_rng(1)
    means = 2.0 * rng.normal(size=(5, 6)) / np.sqrt(6)
    source = np.full(5, 0.2)
    clf = ExactPosterior(means, prior=source).fit()
    covered = []
    for _ in range(draws):
        X, y = draw(means, rng.multinomial(n_rows, rng.dirichlet(np.full(5, 2.0))), rng)
        details = estimate_test_prior(
            clf, X, method=method, source_prior=source, return_details=True
        )
        low, high = details.interval
        frequencies = np.bincount(y, minlength=5) / len(y)
        covered.extend((low <= frequencies) & (frequencies <= high))
        assert 0 < details.effective_rows < n_rows
    assert 0.85 <= np.mean(covered) <= highest


def test_class_bias_fit_recovers_offsets_within_their_covariance():
    rng = np.random.default_rng(0)
    truth = np.array([0.5, -0.3, 0.0, 0.2, -0.4])
    spreads = []
    for n in (2000, 8000):
        logits = 1.5 * rng.normal(size=(n, 5))
        y = np.array([rng.choice(5, p=p) for p in softmax(logits + truth, axis=1)])
        bias, covariance = _fit_class_bias(logits, y, np.ones(n))
        assert abs(bias.sum()) < 1e-9
        sd = np.sqrt(np.diag(covariance))
        assert np.all(np.abs(bias - truth) < 4 * sd)
        spreads.append(sd)
    # Four times the rows, half the spread.
    np.testing.assert_allclose(spreads[0] / spreads[1], 2.0, rtol=0.15)


def test_calibration_covariance_is_the_em_prior_s_sensitivity_to_offsets():
    rng = np.random.default_rng(0)
    source = np.array([0.5, 0.3, 0.2])
    proba = softmax(rng.normal(size=(500, 3)) + np.log(source), axis=1)
    prior = em_prior(proba, source, max_iter=100_000, tol=1e-14)
    for k in range(3):
        unit = np.eye(3)[k]
        eps = 1e-4
        moved = [
            em_prior(softmax(np.log(proba) + e * unit, axis=1), source, max_iter=100_000, tol=1e-14)
            for e in (eps, -eps)
        ]
        column = (moved[0] - moved[1]) / (2 * eps)
        expected = np.outer(column, column)
        got = _calibration_covariance(proba, source, prior, np.outer(unit, unit))
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    # A confident classifier's prior barely moves with its offsets.
    confident = softmax(40 * np.eye(3)[rng.integers(0, 3, 500)], axis=1)
    prior = em_prior(confident, source)
    assert np.abs(_calibration_covariance(confident, source, prior, np.eye(3))).max() < 1e-10


def test_the_no_shift_test_allows_for_a_small_tail_s_calibration():
    """Digits seed 0: the rarest class (8 rows) misled the test into adapting a balanced set."""
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    clf = BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(data.X_train, data.y_train)
    sd = np.sqrt(np.diag(clf.calibration_bias_covariance_))
    assert sd[-1] > 0.3 and clf.class_counts_[-1] == 8
    plain = copy.copy(clf)
    plain.calibration_bias_covariance_ = np.zeros((10, 10))  # calibration taken as exact
    assert plain.adapt(data.X_test).shift_pvalue_ < 1e-4
    model = copy.copy(clf).adapt(data.X_test)
    assert model.shift_pvalue_ > 0.05 and not model.shift_detected_


def test_shrunk_bias_drops_noise_and_keeps_offsets_that_stand_out():
    covariance = 0.25 * (np.eye(10) - 1 / 10)
    noise = np.random.default_rng(0).multivariate_normal(np.zeros(10), covariance)
    np.testing.assert_allclose(_shrunk_bias(noise, covariance), 0.0, atol=0.6 * np.abs(noise).max())
    strong = np.linspace(-3, 3, 10)
    shrunk = _shrunk_bias(strong, covariance)
    assert 0.9 < shrunk[0] / strong[0] < 1.0  # 3.44 / (3.44 + 0.225)
    assert not np.any(_shrunk_bias(strong, np.zeros((10, 10))))  # unknown noise: no correction


def test_a_head_one_temperature_cannot_calibrate_is_left_alone_on_a_balanced_set():
    """weight_decay=1 squeezes the logits so that one temperature cannot calibrate them."""
    X, y = make_long_tailed_embeddings(6000, 32, 10, imbalance_ratio=50, noise=2.0, random_state=0)
    X_train, X_pool, y_train, y_pool = train_test_split(
        X, y, test_size=0.5, stratify=y, random_state=0
    )
    clf = BalancedSoftmaxClassifier(random_state=0, weight_decay=1.0, max_epochs=20)
    clf.fit(X_train, y_train)
    balanced = long_tailed_subset(y_pool, 1, random_state=0)
    X_bal, y_bal = X_pool[balanced], y_pool[balanced]
    model = copy.copy(clf).adapt(X_bal)
    assert not model.shift_detected_
    np.testing.assert_array_equal(model.predict(X_bal), clf.predict(X_bal))
    # Without the out-of-fold class offsets, EM reads the head's posteriors as calibrated.
    plain = copy.copy(clf)
    plain.calibration_bias_ = np.zeros(10)
    plain.calibration_bias_covariance_ = np.zeros((10, 10))
    plain.adapt(X_bal)
    assert plain.shift_detected_
    assert plain.score(X_bal, y_bal) < clf.score(X_bal, y_bal) - 0.03


def test_an_em_estimate_the_held_out_posteriors_contradict_gives_way_to_the_confusion():
    """A head that neither temperature nor offsets calibrate, read on 15,000 balanced rows.

    EM's estimate is then biased far from uniform (it gives 93 % to one class);
    the mean posterior shows it, since under label shift it must be ``C^T q``
    whatever the calibration. The confusion's estimate is less wrong, not right:
    the folds' models (3,333 rows) are not calibrated like the final one (5,000).
    """
    X, y = make_long_tailed_embeddings(
        200000, 32, 20, imbalance_ratio=50, noise=2.0, random_state=0
    )
    X_train, X_pool, y_train, y_pool = train_test_split(
        X, y, train_size=5000, stratify=y, random_state=0
    )
    clf = BalancedSoftmaxClassifier(random_state=0, weight_decay=1.0).fit(X_train, y_train)
    C = clf.calibration_confusion_
    assert C.shape == (20, 20) and clf.calibration_confusion_covariance_.shape == (20, 20, 20)
    np.testing.assert_allclose(C.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.calibration_confusion_counts_, clf.class_counts_)
    balanced = long_tailed_subset(y_pool, 1, random_state=0)
    X_bal = X_pool[balanced]
    uniform = np.full(20, 1 / 20)
    details = estimate_test_prior(clf, X_bal, return_details=True)
    assert details.method == "confusion" and details.em_check_pvalue < 0.01
    unchecked = copy.copy(clf)
    unchecked.calibration_confusion_ = None
    em = estimate_test_prior(unchecked, X_bal, return_details=True)
    assert em.method == "map" and np.isnan(em.em_check_pvalue)
    assert tv(details.estimate, uniform) < tv(em.estimate, uniform) - 0.3  # 0.44 against 0.88
    model = copy.copy(clf).adapt(X_bal)
    assert model.test_prior_method_ == "confusion"
    # 35.7 % against 7.9 % (unadapted: 40.5 %).
    assert (
        model.score(X_bal, y_pool[balanced])
        > unchecked.adapt(X_bal).score(X_bal, y_pool[balanced]) + 0.2
    )


def test_confusion_prior_solves_the_mean_posterior_equation():
    rng = np.random.default_rng(0)
    C = rng.dirichlet(np.full(6, 0.3), size=6) + 2 * np.eye(6)
    C /= C.sum(axis=1, keepdims=True)
    q = rng.dirichlet(np.ones(6))
    np.testing.assert_allclose(confusion_prior(C.T @ q, C), q, atol=1e-6)
    q[2] = 0  # an absent class: the estimate stays on the simplex, not below it
    q /= q.sum()
    noisy = C.T @ q + rng.normal(0, 0.01, 6)
    estimate = confusion_prior(noisy, C)
    assert np.all(estimate >= 0) and np.isclose(estimate.sum(), 1.0)
    assert tv(estimate, q) < 0.05


def test_posterior_confusion_is_kept_for_up_to_100_classes():
    rng = np.random.default_rng(0)
    for n_classes, kept in ((100, True), (101, False)):
        y = np.repeat(np.arange(n_classes), 3)
        posteriors = rng.dirichlet(np.ones(n_classes), size=len(y))
        confusion = _posterior_confusion(posteriors, y, n_classes)
        assert (confusion is not None) is kept
    # A class without held-out rows leaves C undefined.
    posteriors = rng.dirichlet(np.ones(4), size=6)
    assert _posterior_confusion(posteriors, np.array([0, 0, 1, 1, 2, 2]), 4) is None
    assert _posterior_confusion(posteriors, np.array([0, 0, 1, 1, 2, 3]), 4) is not None


def test_mean_posterior_covariance_matches_sampling():
    """The covariance of the mean posterior of n rows drawn with class prior q, by simulation."""
    rng = np.random.default_rng(0)
    n_classes, per_class = 4, 4000
    concentrations = 1.0 + 6.0 * np.eye(n_classes)  # class c's posteriors lean toward c
    y = np.repeat(np.arange(n_classes), per_class)
    posteriors = np.concatenate([rng.dirichlet(a, size=per_class) for a in concentrations])
    confusion = _posterior_confusion(posteriors, y, n_classes)
    q, n_rows = np.array([0.5, 0.3, 0.15, 0.05]), 50
    means = []
    for _ in range(4000):
        labels = rng.choice(n_classes, n_rows, p=q)
        means.append(np.mean([rng.dirichlet(concentrations[c]) for c in labels], axis=0))
    simulated = np.cov(np.array(means), rowvar=False)
    model = _mean_posterior_covariance(confusion, n_rows, q)
    # The model adds C's own noise (4,000 rows a class): small beside the sample's.
    np.testing.assert_allclose(model, simulated, atol=0.06 * np.abs(simulated).max())
    np.testing.assert_allclose(confusion[0].T @ q, np.mean(means, axis=0), atol=3e-3)


def test_the_check_of_em_holds_its_level_when_tail_classes_have_few_held_out_rows():
    """A tail of 3 held-out rows among 8 classes: its covariance has rank 2, not 7.

    Test rows drawn from the held-out rows' distribution, at the true prior, must
    pass the check at level 0.01 nearly always (read as exact, the rank-deficient
    covariances made it reject 19 % of these draws).
    """
    rng = np.random.default_rng(0)
    n_classes = 8
    concentrations = 0.5 + 4.0 * np.eye(n_classes)
    counts = np.array([400, 200, 100, 50, 25, 12, 5, 3])
    y = np.repeat(np.arange(n_classes), counts)
    q = np.full(n_classes, 1 / n_classes)
    rejected = []
    for _ in range(100):
        posteriors = np.concatenate(
            [rng.dirichlet(concentrations[c], size=n) for c, n in enumerate(counts)]
        )
        confusion = _posterior_confusion(posteriors, y, n_classes)
        test_counts = rng.multinomial(5000, q)
        test = np.concatenate(
            [rng.dirichlet(concentrations[c], size=n) for c, n in enumerate(test_counts)]
        )
        rejected.append(_moment_pvalue(test.mean(axis=0), confusion, q, len(test)) < EM_CHECK_LEVEL)
    assert np.mean(rejected) <= 0.05


def test_the_check_covariance_adds_a_pseudo_row_only_where_a_class_has_too_few_rows():
    means = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    measured = np.stack([0.01 * np.eye(3)] * 3)
    q = np.array([1.0, 0.0, 0.0])  # rows of class 0 only: between = 0
    widest = np.diag(means[0]) - np.outer(means[0], means[0])
    # One row (fewer than the 3 classes): (0 * measured + widest) / 1.
    covariance = _mean_posterior_covariance((means, measured, np.array([1, 5, 5])), 10, q)
    np.testing.assert_allclose(covariance, widest / 10 + widest)
    # Two rows: (1 * measured + widest) / 2; the noise term divides by n_c again.
    covariance = _mean_posterior_covariance((means, measured, np.array([2, 5, 5])), 10, q)
    mixed = (measured[0] + widest) / 2
    np.testing.assert_allclose(covariance, mixed / 10 + mixed / 2)
    # Three rows or more: the measured covariance as it is.
    covariance = _mean_posterior_covariance((means, measured, np.array([3, 5, 5])), 10, q)
    np.testing.assert_allclose(covariance, measured[0] / 10 + measured[0] / 3)


def test_a_class_the_confusion_estimate_rules_out_keeps_a_finite_band(monkeypatch):
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    clf = BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(data.X_train, data.y_train)
    rows = np.flatnonzero(data.y_test != 3)
    monkeypatch.setattr(adaptation, "EM_CHECK_LEVEL", 1.0)  # the fallback runs whatever EM says
    details = estimate_test_prior(clf, data.X_test[rows], method="em", return_details=True)
    assert details.method == "confusion"
    assert np.all(np.isfinite(details.interval))
    low, high = details.interval
    assert np.all(low <= details.estimate) and np.all(details.estimate <= high)
    assert details.estimate[3] < 0.02 and low[3] == 0.0


def test_prl_adapted_matches_balanced_softmax_adapted_on_any_shift():
    """A prior outside PRL's preference family (one class absent) is still reached."""
    rng = np.random.default_rng(2)
    means = 2.0 * rng.normal(size=(5, 12)) / np.sqrt(12)
    X, y = draw(means, [1000, 400, 150, 60, 25], rng)
    bs = BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y)
    prl = PRLClassifier(device="cpu", random_state=0).fit(X, y)
    X_test, y_test = draw(means, [300, 0, 300, 20, 300], rng)
    a = copy.copy(bs).adapt(X_test)
    b = copy.copy(prl).adapt(X_test)
    assert a.shift_detected_ and b.shift_detected_
    gain_bs = a.score(X_test, y_test) - bs.score(X_test, y_test)
    gain_prl = b.score(X_test, y_test) - prl.score(X_test, y_test)
    assert gain_bs > 0.02
    assert gain_prl > gain_bs - 0.01
    assert abs(a.score(X_test, y_test) - b.score(X_test, y_test)) < 0.01


def test_bcts_predictions_are_the_calibrated_posteriors_shifted():
    rng = np.random.default_rng(3)
    means = 2.0 * rng.normal(size=(3, 6)) / np.sqrt(6)
    X, y = draw(means, [600, 200, 60], rng)
    X_val, y_val = draw(means, [150, 50, 15], rng)
    clf = BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y)
    X_test, _ = draw(means, [50, 100, 300], rng)
    model = copy.copy(clf).adapt(X_test, method="em", validation=(X_val, y_val))
    assert model.shift_detected_
    # By hand: BCTS on the (cross-fitted) source logits, under the validation prior.
    scaler = LongTailTemperatureScaler(_SourceLogits(clf), weighting="none", bias=True)
    scaler.fit(X_val, y_val)
    val_prior = np.bincount(y_val) / len(y_val)
    expected = log_softmax(
        scaler.decision_function(X_test) - np.log(val_prior) + np.log(model.test_prior_), axis=1
    )
    np.testing.assert_allclose(model.predict_log_proba(X_test), expected, atol=1e-4)


def test_adapt_reaches_a_pipeline_s_final_step():
    data = load_long_tailed_digits(random_state=0)
    pipe = make_pipeline(StandardScaler(), BalancedSoftmaxClassifier(random_state=0))
    pipe.fit(data.X_train, data.y_train)
    rows = long_tailed_subset(data.y_test, 10, random_state=0)
    before = pipe.score(data.X_test[rows], data.y_test[rows])
    assert adapt(pipe, data.X_test[rows]) is pipe
    assert pipe[-1].shift_detected_
    assert pipe.score(data.X_test[rows], data.y_test[rows]) > before
    with pytest.raises(TypeError, match="has no adapt"):
        adapt(make_pipeline(StandardScaler(), ExactPosterior()), data.X_test)


def test_clear_errors_and_warnings():
    rng = np.random.default_rng(4)
    means = 2.0 * rng.normal(size=(3, 6)) / np.sqrt(6)
    X, y = draw(means, [300, 100, 30], rng)
    clf = BalancedSoftmaxClassifier(device="cpu", random_state=0, calibration_cv=None).fit(X, y)
    assert clf.calibration_temperature_ == 1.0
    X_val, y_val = draw(means, [30, 30, 30], rng)
    with pytest.raises(ValueError, match="validation's X_val has 4 features"):
        copy.copy(clf).adapt(X, method="em", validation=(X_val[:, :4], y_val))
    bad = X_val.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="validation's X_val contains NaN"):
        copy.copy(clf).adapt(X, method="em", validation=(bad, y_val))
    with pytest.raises(ValueError, match="so RLLS cannot invert"):
        copy.copy(clf).adapt(X, method="rlls", validation=(X_val[:2], y_val[:2]))
    with pytest.warns(UserWarning, match="12 unlabeled rows for 3 classes"):
        copy.copy(clf).adapt(X[:12], method="bbse", validation=(X_val, y_val))
    with pytest.raises(ValueError, match="significance"):
        copy.copy(clf).adapt(X, significance=1.5)
    with pytest.raises(ValueError, match="n_views >= 1"):
        BalancedSoftmaxClassifier(device="cpu").fit(X, y, views=np.empty((len(X), 0, 6)))


def test_em_prior_returns_a_valid_prior_or_raises():
    with pytest.raises(ValueError, match="zero probability to every class"):
        em_prior(np.zeros((5, 3)), [1 / 3] * 3)
    for proba, source in [
        (np.full((4, 3), 1e300), [1e-300, 0.5, 0.5]),
        (np.full((4, 3), 1.7e308), [1 / 3] * 3),
        (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), [0.2, 0.3, 0.5]),
    ]:
        prior = em_prior(proba, source)
        assert np.all(np.isfinite(prior)) and prior.min() >= 0
        assert prior.sum() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    proba=arrays(
        np.float64,
        st.tuples(st.integers(1, 30), st.integers(2, 5)),
        elements=st.floats(0, 1e300, allow_nan=False),
    ),
    data=st.data(),
)
def test_em_prior_on_arbitrary_posteriors(proba, data):
    n_classes = proba.shape[1]
    source = np.asarray(
        data.draw(st.lists(st.floats(1e-300, 1.0), min_size=n_classes, max_size=n_classes))
    )
    pseudo = data.draw(st.sampled_from([0.0, 5.0]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prior = em_prior(proba, source, pseudo_counts=pseudo, max_iter=200)
    except ValueError as exc:
        assert "zero probability" in str(exc)
        return
    assert np.all(np.isfinite(prior)) and np.all(prior >= 0)
    assert prior.sum() == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=3, max_size=3).filter(lambda c: sum(c) > 0),
    significance=st.sampled_from([None, 0.05]),
    method=st.sampled_from(["map", "em"]),
)
def test_adapt_on_arbitrary_unlabeled_sets_gives_valid_state(
    adapt_model, counts, significance, method
):
    clf, means = adapt_model
    rng = np.random.default_rng(sum(counts))
    X, _ = draw(means, counts, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.copy(clf).adapt(X, method=method, significance=significance)
    assert model.test_prior_.sum() == pytest.approx(1.0)
    assert 0 <= model.shift_pvalue_ <= 1
    low, high = model.test_prior_interval_
    assert np.all(low <= model.test_prior_ + 1e-12) and np.all(model.test_prior_ <= high + 1e-12)
    proba = model.predict_proba(X)
    assert np.all(np.isfinite(proba))
    if significance is None:
        assert model.shift_detected_


@pytest.fixture(scope="module")
def adapt_model():
    rng = np.random.default_rng(5)
    means = 2.0 * rng.normal(size=(3, 6)) / np.sqrt(6)
    X, y = draw(means, [300, 100, 30], rng)
    return BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y), means


def test_readme_quick_start_prints_what_it_says(capsys):
    """The README's first snippet runs and prints the numbers the README shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code, shown = re.search(
        r"## Quick start\n\n```python\n(.*?)```.*?```text\n(.*?)```", readme, re.S
    ).groups()
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == shown
