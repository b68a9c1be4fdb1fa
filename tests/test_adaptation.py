"""Label-shift estimation and transductive adaptation of the estimators."""

import copy
import pickle

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn._training import fit_module
from ltlearn.adaptation import bbse_prior, em_prior, estimate_test_prior, rlls_prior
from ltlearn.datasets import shifted_test_subsets
from ltlearn.losses import LogitAdjustedLoss, inverse_prior
from ltlearn.metrics import evaluate_test_agnostic

N_CLASSES, WIDTH = 4, 16
TRAIN_COUNTS = [1000, 300, 100, 30]


class Blobs:
    """Gaussian classes with unit covariance: exact posteriors are known."""

    def __init__(self, seed=0, separation=2.0, noise=0.8):
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(N_CLASSES, WIDTH))
        self.means = separation * means / np.linalg.norm(means, axis=1, keepdims=True)
        self.noise = noise
        self.rng = rng

    def draw(self, counts):
        y = np.repeat(np.arange(N_CLASSES), counts)
        X = self.means[y] + self.noise * self.rng.normal(size=(len(y), WIDTH))
        return X, y

    def posterior(self, X, prior):
        log_density = np.stack(
            [multivariate_normal(m, self.noise**2 * np.eye(WIDTH)).logpdf(X) for m in self.means],
            axis=1,
        )
        return softmax(log_density + np.log(prior), axis=1)


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


@pytest.fixture(scope="module")
def blobs():
    return Blobs()


@pytest.fixture(scope="module")
def train(blobs):
    return blobs.draw(TRAIN_COUNTS)


@pytest.fixture(scope="module")
def bs(train):
    return BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(*train)


@pytest.fixture(scope="module")
def prl(train):
    return PRLClassifier(device="cpu", random_state=0).fit(*train)


FORWARD = [1200, 400, 150, 50]
BACKWARD = FORWARD[::-1]


def test_em_recovers_prior_from_exact_posteriors(blobs):
    """With exact posteriors, EM's error is sampling noise only: a few thousand rows suffice."""
    source = np.full(N_CLASSES, 0.25)
    for counts in (FORWARD, BACKWARD):
        X, _ = blobs.draw(counts)
        truth = np.array(counts) / sum(counts)
        estimate = em_prior(blobs.posterior(X, source), source)
        assert tv(estimate, truth) < 0.03


def test_em_is_invariant_to_the_source_prior_it_is_told(blobs):
    """Posteriors under prior p, declared as p, give the same estimate as under uniform."""
    X, _ = blobs.draw(FORWARD)
    p = np.array(TRAIN_COUNTS) / sum(TRAIN_COUNTS)
    uniform = np.full(N_CLASSES, 0.25)
    a = em_prior(blobs.posterior(X, p), p, tol=1e-10)
    b = em_prior(blobs.posterior(X, uniform), uniform, tol=1e-10)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_map_pseudo_counts_interpolate_between_em_and_uniform():
    proba = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert em_prior(proba, [0.5, 0.5], pseudo_counts=0.0).tolist() == [0.75, 0.25]
    # Confident posteriors: counts (3, 1) plus a pseudo-counts each.
    np.testing.assert_allclose(em_prior(proba, [0.5, 0.5], pseudo_counts=6.0), [9 / 16, 7 / 16])
    assert tv(em_prior(proba, [0.5, 0.5], pseudo_counts=1e6), [0.5, 0.5]) < 1e-5


def test_map_trusts_a_sample_more_as_it_grows(bs, blobs):
    truth = np.array(FORWARD) / sum(FORWARD)
    X, _ = blobs.draw(FORWARD)
    errors = []
    for n in (20, 200, len(X)):
        rows = np.random.default_rng(0).choice(len(X), n, replace=False)
        errors.append(tv(estimate_test_prior(bs, X[rows], method="map"), truth))
    assert errors[0] > errors[1] > errors[2]


SHIFTS = ([100, 300, 600, 1200], [400, 400, 400, 400], [1500, 100, 300, 100])


@pytest.mark.parametrize("method", ["em", "map", "bbse", "rlls"])
def test_methods_recover_a_shifted_prior(bs, blobs, method):
    validation = blobs.draw([250] * N_CLASSES)
    train = np.array(TRAIN_COUNTS) / sum(TRAIN_COUNTS)
    for counts in SHIFTS:
        truth = np.array(counts) / sum(counts)
        assert tv(truth, train) > 0.15  # a real shift, which "no adaptation" would miss
        X, _ = blobs.draw(counts)
        estimate = estimate_test_prior(bs, X, method=method, validation=validation)
        assert tv(estimate, truth) < 0.05, (method, counts, estimate)


def test_calibration_needs_validation_rows_of_every_class(bs, blobs):
    X, _ = blobs.draw(BACKWARD)
    validation = blobs.draw([100, 30, 10, 0])
    with pytest.raises(ValueError, match=r"classes \[3\] have no validation rows"):
        estimate_test_prior(bs, X, method="em", validation=validation)
    estimate = estimate_test_prior(bs, X, method="em", validation=validation, calibrate=False)
    assert estimate[3] > 0.3
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        estimate_test_prior(bs, X, method="bbse", validation=(X[:3], [0, 1]))


def test_em_warns_when_it_stops_before_converging(blobs):
    X, _ = blobs.draw(FORWARD)
    proba = blobs.posterior(X, np.full(N_CLASSES, 0.25))
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        em_prior(proba, np.full(N_CLASSES, 0.25), max_iter=2)


def test_bbse_solves_the_confusion_system_by_hand():
    # Two classes, 3 of 4 validation rows right in each: C = [[3, 1], [1, 3]] / 8.
    y_val = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred_val = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred_target = np.array([0] * 7 + [1] * 3)
    # 0.75 q + 0.25 (1 - q) = 0.7  =>  q = 0.9.
    np.testing.assert_allclose(bbse_prior(y_val, pred_val, pred_target, 2), [0.9, 0.1])
    np.testing.assert_allclose(
        rlls_prior(y_val, pred_val, pred_target, 2, regularization=0.0), [0.9, 0.1], atol=1e-5
    )


def test_rlls_regularization_pulls_toward_the_validation_prior():
    y_val = np.repeat([0, 1, 2], [300, 200, 100])
    pred_val = y_val.copy()
    pred_target = np.repeat([0, 1, 2], [10, 10, 80])
    source = np.array([0.5, 1 / 3, 1 / 6])
    free = rlls_prior(y_val, pred_val, pred_target, 3, regularization=0.0)
    strong = rlls_prior(y_val, pred_val, pred_target, 3, regularization=10.0)
    np.testing.assert_allclose(free, [0.1, 0.1, 0.8], atol=1e-4)
    assert tv(strong, source) < tv(free, source)


def test_singular_confusion_matrix_is_a_clear_error():
    y_val = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"singular.*classes \[2\] have no validation rows"):
        bbse_prior(y_val, y_val, np.array([0, 1]), 3)
    with pytest.raises(ValueError, match=r"classes \[1\] are never predicted"):
        rlls_prior(y_val, np.zeros(4, dtype=int), np.array([0, 1]), 2)


def test_empty_sets_are_clear_errors(bs, blobs):
    with pytest.raises(ValueError, match="at least one unlabeled row"):
        em_prior(np.empty((0, 2)), [0.5, 0.5])
    with pytest.raises(ValueError, match="unlabeled set is empty"):
        bbse_prior([0, 1], [0, 1], [], 2)
    with pytest.raises(ValueError, match="X holds no rows"):
        estimate_test_prior(bs, np.empty((0, WIDTH)))
    with pytest.raises(ValueError, match="validation holds no rows"):
        estimate_test_prior(bs, blobs.draw(FORWARD)[0], validation=(np.empty((0, WIDTH)), []))


def test_methods_needing_labels_say_so(bs, blobs):
    with pytest.raises(ValueError, match=r"needs validation=\(X_val, y_val\)"):
        estimate_test_prior(bs, blobs.draw(FORWARD)[0], method="bbse")
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_test_prior(bs, blobs.draw(FORWARD)[0], method="saerens")


def test_ltlearn_estimators_refuse_a_source_prior(bs, blobs):
    with pytest.raises(ValueError, match="source_prior is for other classifiers"):
        estimate_test_prior(bs, blobs.draw(FORWARD)[0], source_prior=[0.25] * 4)


def test_scikit_learn_classifiers_need_their_source_prior(train, blobs):
    lr = LogisticRegression(max_iter=1000).fit(*train)
    X, _ = blobs.draw(BACKWARD)
    with pytest.raises(ValueError, match="pass source_prior="):
        estimate_test_prior(lr, X)
    source = np.array(TRAIN_COUNTS) / sum(TRAIN_COUNTS)
    estimate = estimate_test_prior(lr, X, method="em", source_prior=source)
    assert tv(estimate, np.array(BACKWARD) / sum(BACKWARD)) < 0.1


def test_pipelines_are_adapted_through_their_final_step(train, blobs):
    pipe = make_pipeline(StandardScaler(), BalancedSoftmaxClassifier(device="cpu", random_state=0))
    pipe.fit(*train)
    X, _ = blobs.draw(FORWARD)
    estimate = estimate_test_prior(pipe, X)
    assert tv(estimate, np.array(FORWARD) / sum(FORWARD)) < 0.1


def test_adapt_shifts_logits_by_exactly_the_stored_prior(bs, blobs):
    X, _ = blobs.draw(FORWARD)
    model = copy.copy(bs)
    raw = model.decision_function(X)
    model.adapt(X)
    assert model.shift_detected_
    # tau=1: the trained adjustment is log(prior), so the raw logits are the balanced
    # ones; adapted, they are divided by the cross-fitted temperature, given the
    # cross-fitted class offsets and shifted by log(q).
    expected = (
        raw / model.calibration_temperature_ + model.calibration_bias_ + np.log(model.test_prior_)
    )
    np.testing.assert_allclose(model.decision_function(X), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.predict(X), bs.classes_[np.argmax(expected, axis=1)])
    # The prediction of one row does not depend on the batch around it.
    np.testing.assert_array_equal(model.predict(X[:5]), model.predict(X)[:5])


def test_adapt_wins_over_test_prior_until_reset_or_refit(bs, blobs, train):
    X, _ = blobs.draw(BACKWARD)
    model = clone(bs).set_params(test_prior="train").fit(*train)
    train_scores = model.decision_function(X)
    model.adapt(X)
    adapted = model.decision_function(X)
    assert not np.allclose(adapted, train_scores)
    assert model.reset_adaptation() is model
    assert not hasattr(model, "test_prior_")
    np.testing.assert_allclose(model.decision_function(X), train_scores)
    model.adapt(X).fit(*train)
    assert not hasattr(model, "test_prior_")


def test_adapted_state_survives_pickle_and_not_clone(bs, blobs):
    X, _ = blobs.draw(FORWARD)
    model = copy.copy(bs).adapt(X)
    loaded = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(loaded.test_prior_, model.test_prior_)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    fresh = clone(model)
    assert not hasattr(fresh, "test_prior_")
    with pytest.raises(NotFittedError):
        fresh.predict(X)


def test_adapt_rejects_bad_input(bs, blobs):
    model = copy.copy(bs)
    with pytest.raises(ValueError, match="X holds no rows"):
        model.adapt(np.empty((0, WIDTH)))
    with pytest.raises(ValueError, match=f"expecting {WIDTH} features"):
        model.adapt(np.ones((5, WIDTH + 1)))
    with pytest.raises(NotFittedError):
        clone(bs).adapt(np.ones((5, WIDTH)))
    with pytest.raises(TypeError, match="pseudo_count"):
        model.adapt(np.ones((5, WIDTH)), pseudo_count=3)
    with pytest.raises(ValueError, match="views are used by SADEClassifier"):
        model.adapt(np.ones((5, WIDTH)), views=np.ones((5, 2, WIDTH)))


def test_prl_adapt_maps_the_prior_to_a_preference(prl, blobs):
    X, _ = blobs.draw(FORWARD)
    model = copy.copy(prl).adapt(X)
    np.testing.assert_allclose(model.preference_, prl.preference_for_prior(model.test_prior_))
    # The preference's head, less the offsets it stands for, calibrated, plus log(q).
    pref = model.preference_
    weighted = pref * prl.r_ / (pref * prl.r_).sum()
    offsets = weighted @ prl.module_.head.shift_basis.numpy()
    balanced = prl.decision_function(X, preference=pref) - offsets
    expected = (
        balanced / prl.calibration_temperature_ + prl.calibration_bias_ + np.log(model.test_prior_)
    )
    np.testing.assert_allclose(model.decision_function(X), expected, atol=1e-4)
    # An explicit preference still wins for one call.
    np.testing.assert_array_equal(
        model.predict(X, preference="uniform"), prl.predict(X, preference="uniform")
    )
    assert model.preference_[0] > model.preference_[2]  # a forward test set


def test_preference_for_prior_inverts_the_shift_basis(prl):
    def r_hat(alpha):
        weighted = alpha * prl.r_
        return weighted / weighted.sum()

    prior = torch.as_tensor(prl.class_prior_)
    np.testing.assert_allclose(
        r_hat(prl.preference_for_prior(prl.class_prior_)), [1, 0, 0], atol=1e-4
    )
    uniform = np.full(N_CLASSES, 0.25)
    np.testing.assert_allclose(r_hat(prl.preference_for_prior(uniform)), [0, 1, 0], atol=1e-4)
    # The backward corner's offset is lam * log(inverse prior): the inverse prior is half way.
    inverse = inverse_prior(prior).numpy()
    np.testing.assert_allclose(r_hat(prl.preference_for_prior(inverse)), [0, 0.5, 0.5], atol=1e-3)
    with pytest.raises(ValueError, match="non-negative frequencies"):
        prl.preference_for_prior([1.0, -1.0, 0.0, 0.0])


def test_evaluate_test_agnostic_adapts_a_copy_to_each_test_set(bs, blobs):
    X, y = blobs.draw([300] * N_CLASSES)
    table = evaluate_test_agnostic(bs, X, y, imbalance_ratios=[10], adapt="map")
    assert not hasattr(bs, "test_prior_")
    subsets = shifted_test_subsets(y, imbalance_ratios=[10], random_state=0)
    for name, idx in subsets.items():
        model = copy.copy(bs).adapt(X[idx], method="map")
        assert table[name] == pytest.approx(np.mean(model.predict(X[idx]) == y[idx]))
    plain = evaluate_test_agnostic(bs, X, y, imbalance_ratios=[10])
    assert table["forward_10"] > plain["forward_10"]
    sampled = evaluate_test_agnostic(
        bs, X, y, imbalance_ratios=[10], adapt={"method": "em"}, n_unlabeled=50
    )
    assert list(sampled) == list(table)
    with pytest.raises(ValueError, match="not both"):
        evaluate_test_agnostic(bs, X, y, adapt="map", oracle_prior=True)


def test_evaluate_test_agnostic_adapts_pipelines_on_transformed_features(train, blobs):
    """Validation rows reach the final step through the pipeline, like X does."""
    X_train, y_train = train
    pipe = make_pipeline(
        FunctionTransformer(lambda Z: 5 * Z + 3),
        BalancedSoftmaxClassifier(device="cpu", random_state=0),
    ).fit(X_train, y_train)
    X, y = blobs.draw([300] * N_CLASSES)
    validation = blobs.draw([250] * N_CLASSES)
    options = {"method": "bbse", "validation": validation}
    table = evaluate_test_agnostic(pipe, X, y, imbalance_ratios=[10], adapt=options)
    final, Z = pipe[-1], pipe[:-1].transform(X)
    Z_val = pipe[:-1].transform(validation[0])
    for name, idx in shifted_test_subsets(y, imbalance_ratios=[10], random_state=0).items():
        model = copy.copy(final).adapt(Z[idx], method="bbse", validation=(Z_val, validation[1]))
        assert table[name] == pytest.approx(np.mean(model.predict(Z[idx]) == y[idx]))


def test_adapted_shift_for_a_partly_adjusted_loss(train, blobs):
    """tau=0.5: predictions are the training-prior logits shifted by log(q / p)."""
    model = BalancedSoftmaxClassifier(tau=0.5, device="cpu", random_state=0).fit(*train)
    X, _ = blobs.draw(BACKWARD)
    source = model.decision_function(X) + 0.5 * np.log(model.class_prior_)
    model.adapt(X)
    balanced = (source - np.log(model.class_prior_)) / model.calibration_temperature_
    expected = balanced + model.calibration_bias_ + np.log(model.test_prior_)
    shift = model.decision_function(X) - expected  # a constant per row: softmax ignores it
    np.testing.assert_allclose(shift - shift[:, :1], 0, atol=1e-4)


def test_fit_module_stops_when_asked():
    module = torch.nn.Linear(2, 2)
    history = fit_module(
        module,
        LogitAdjustedLoss(torch.tensor([0.5, 0.5]), tau=0.0),
        torch.randn(8, 2),
        torch.tensor([0, 1] * 4),
        max_epochs=10,
        generator=torch.Generator().manual_seed(0),
        stop_when=lambda m: True,
    )
    assert len(history) == 1
