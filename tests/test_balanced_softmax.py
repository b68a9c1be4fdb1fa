import io
import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils._param_validation import InvalidParameterError

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.exceptions import DeviceError, DeviceWarning
from ltlearn.features import read_features
from ltlearn.metrics import shot_accuracy

FAST = {"max_epochs": 5, "device": "cpu", "random_state": 0}


def test_beats_chance_and_plain_cross_entropy_on_the_tail(digits):
    bs = BalancedSoftmaxClassifier(random_state=0).fit(digits.X_train, digits.y_train)
    ce = BalancedSoftmaxClassifier(tau=0, random_state=0).fit(digits.X_train, digits.y_train)
    assert bs.score(digits.X_test, digits.y_test) > 0.85
    few_bs = shot_accuracy(
        digits.y_test, bs.predict(digits.X_test), bs.class_counts_, few_threshold=20
    )
    few_ce = shot_accuracy(
        digits.y_test, ce.predict(digits.X_test), ce.class_counts_, few_threshold=20
    )
    assert few_bs["few"] > few_ce["few"] + 0.05


@pytest.mark.parametrize("head", ["cosine", "mlp"])
@pytest.mark.parametrize("normalize", ["standard", None])
def test_other_heads_and_normalisations_learn(digits, head, normalize):
    clf = BalancedSoftmaxClassifier(head=head, normalize=normalize, random_state=0)
    X = digits.X_train / 16.0
    clf.fit(X, digits.y_train)
    assert clf.score(digits.X_test / 16.0, digits.y_test) > 0.8


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_other_optimizers_learn(digits, optimizer):
    clf = BalancedSoftmaxClassifier(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    clf.set_params(random_state=0, lr_schedule="cosine").fit(digits.X_train, digits.y_train)
    assert clf.score(digits.X_test, digits.y_test) > 0.8


def test_fitted_attributes_and_string_labels(digits):
    names = np.array(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, names[digits.y_train])
    assert sorted(clf.classes_) == sorted(names)
    assert clf.n_features_in_ == 64
    assert clf.class_counts_.sum() == len(digits.y_train)
    assert clf.predict(digits.X_test[:3]).dtype.kind == "U"
    assert len(clf.history_) == 5
    assert clf.device_ == "cpu"
    proba = clf.predict_proba(digits.X_test)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(digits.X_test)), proba, rtol=1e-6)


def test_test_prior_shifts_logits_as_documented(digits):
    clf = BalancedSoftmaxClassifier(tau=0.5, **FAST).fit(digits.X_train, digits.y_train)
    raw = clf.decision_function(digits.X_test)
    log_p = np.log(clf.class_prior_)
    q = np.linspace(1, 3, 10)
    shifted = clf.set_params(test_prior=q).decision_function(digits.X_test)
    np.testing.assert_allclose(
        shifted - raw,
        np.tile(-0.5 * log_p + np.log(q / q.sum()), (len(raw), 1)),
        rtol=1e-5,
        atol=1e-5,
    )
    uniform = clf.set_params(test_prior="uniform").decision_function(digits.X_test)
    np.testing.assert_allclose(uniform - raw, np.tile(-0.5 * log_p, (len(raw), 1)), atol=1e-5)
    train = clf.set_params(test_prior="train").decision_function(digits.X_test)
    np.testing.assert_allclose(train - raw, np.tile(0.5 * log_p, (len(raw), 1)), atol=1e-5)
    # Changing tau after fitting does not change what the fitted model's logits mean.
    clf.set_params(tau=1.0)
    np.testing.assert_array_equal(clf.decision_function(digits.X_test), train)


def test_test_prior_moves_predictions_towards_the_prior(digits):
    clf = BalancedSoftmaxClassifier(random_state=0).fit(digits.X_train, digits.y_train)
    head_heavy = clf.set_params(test_prior="train").predict(digits.X_test)
    clf.set_params(test_prior=None)
    assert np.mean(head_heavy == 0) > np.mean(clf.predict(digits.X_test) == 0)
    only_zero_or_one = np.zeros(10)
    only_zero_or_one[:2] = 1
    assert set(clf.set_params(test_prior=only_zero_or_one).predict(digits.X_test)) <= {0, 1}


@pytest.mark.parametrize(
    "prior, match",
    [
        ([0.5, 0.5], r"shape \(2,\) but the model has 10 classes"),
        ([-1] + [1] * 9, "non-negative"),
        ([np.nan] * 10, "finite"),
        ([0] * 10, "positive sum"),
    ],
)
def test_invalid_test_prior_is_a_clear_error(digits, prior, match):
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match=match):
        clf.set_params(test_prior=prior).predict(digits.X_test)


def test_repeated_fits_with_a_seed_are_identical(digits):
    a = BalancedSoftmaxClassifier(head="mlp", **FAST).fit(digits.X_train, digits.y_train)
    b = clone(a).fit(digits.X_train, digits.y_train)
    for pa, pb in zip(a.module_.parameters(), b.module_.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = clone(a).set_params(random_state=1).fit(digits.X_train, digits.y_train)
    assert not torch.equal(a.module_.head[0].weight, c.module_.head[0].weight)


def test_sample_weight_sets_the_class_prior(digits):
    w = np.where(digits.y_train == 9, 10.0, 1.0)
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train, sample_weight=w)
    totals = np.bincount(digits.y_train, weights=w)
    np.testing.assert_allclose(clf.class_prior_, totals / totals.sum())
    with pytest.raises(ValueError, match="at least one non-zero"):
        clf.fit(digits.X_train, digits.y_train, sample_weight=np.zeros(len(w)))


def test_balanced_sampling_uses_a_uniform_prior(digits):
    clf = BalancedSoftmaxClassifier(balanced_sampling=True, random_state=0)
    clf.fit(digits.X_train, digits.y_train)
    np.testing.assert_allclose(clf.class_prior_, 0.1)
    assert clf.score(digits.X_test, digits.y_test) > 0.8


def test_pipeline_and_parallel_grid_search(digits):
    pipe = make_pipeline(FunctionTransformer(lambda X: X / 16.0), BalancedSoftmaxClassifier(**FAST))
    search = GridSearchCV(
        pipe,
        {"balancedsoftmaxclassifier__tau": [0.0, 1.0]},
        scoring="balanced_accuracy",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
        n_jobs=2,
    )
    search.fit(digits.X_train, digits.y_train)
    assert search.best_params_["balancedsoftmaxclassifier__tau"] == 1.0
    assert search.score(digits.X_test, digits.y_test) > 0.7


def test_pickle_and_joblib_round_trips(digits, tmp_path):
    clf = BalancedSoftmaxClassifier(head="mlp", **FAST).fit(digits.X_train, digits.y_train)
    expected = clf.predict_proba(digits.X_test)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(digits.X_test), expected)
    joblib.dump(clf, tmp_path / "clf.joblib")
    np.testing.assert_array_equal(
        joblib.load(tmp_path / "clf.joblib").predict_proba(digits.X_test), expected
    )
    assert next(restored.module_.parameters()).device.type == "cpu"
    assert not restored.module_.training


def test_a_pickle_made_on_a_gpu_loads_on_a_cpu(digits, monkeypatch):
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train)
    expected = clf.predict(digits.X_test)
    with monkeypatch.context() as m:
        # Tag every tensor as living on cuda:0, as a pickle made on a GPU machine does.
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        payload = pickle.dumps(clf)
        naive = io.BytesIO()
        torch.save(clf.module_, naive)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(io.BytesIO(naive.getvalue()), weights_only=False)
    with pytest.warns(DeviceWarning, match="cuda:0"):
        restored = pickle.loads(payload)
    np.testing.assert_array_equal(restored.predict(digits.X_test), expected)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1], "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), [0, 1], "infinity"),
        (np.arange(4.0), [0, 1, 0, 1], "Expected 2D array"),
        (np.zeros((4, 2, 2)), [0, 1, 0, 1], "3"),
        (np.zeros((4, 2)), [0, 1, 0], "inconsistent numbers of samples"),
        (np.zeros((4, 2)), ["a", "a", "a", "a"], "at least 2 classes"),
        (np.zeros((4, 2)), [0.5, 1.5, 2.5, 3.5], "Unknown label type"),
    ],
)
def test_bad_training_input_is_a_clear_error(X, y, match):
    with pytest.raises(ValueError, match=match):
        BalancedSoftmaxClassifier(**FAST).fit(X, y)


def test_a_class_with_one_sample_is_fitted(digits):
    keep = np.r_[np.flatnonzero(digits.y_train != 9), np.flatnonzero(digits.y_train == 9)[:1]]
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train[keep], digits.y_train[keep])
    assert clf.class_counts_[9] == 1
    assert np.isfinite(clf.decision_function(digits.X_test)).all()


def test_unseen_labels_at_scoring_are_an_error(digits):
    clf = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match=r"never seen during fit: 42"):
        clf.score(digits.X_test[:2], [0, 42])


@pytest.mark.parametrize(
    "params", [{"tau": -1.0}, {"tau": float("nan")}, {"lr": 0}, {"head": "resnet"}]
)
def test_invalid_parameters_are_named(digits, params):
    with pytest.raises(InvalidParameterError, match=next(iter(params))):
        BalancedSoftmaxClassifier(**params).fit(digits.X_train, digits.y_train)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(digits, device):
    with pytest.raises(DeviceError, match="no CUDA GPU.*device='cpu'"):
        BalancedSoftmaxClassifier(device=device).fit(digits.X_train, digits.y_train)


def test_unknown_device_is_a_clear_error(digits):
    with pytest.raises(DeviceError, match="not a torch device"):
        BalancedSoftmaxClassifier(device="gpu0").fit(digits.X_train, digits.y_train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_gpu_and_predicts_on_cpu(digits):
    clf = BalancedSoftmaxClassifier(device="cuda", random_state=0).fit(
        digits.X_train, digits.y_train
    )
    assert clf.device_.startswith("cuda")
    assert next(clf.module_.parameters()).device.type == "cpu"
    assert clf.score(digits.X_test, digits.y_test) > 0.85


def test_matches_tuned_logistic_regression_on_real_embeddings(cifar_features):
    """CIFAR-10-LT at IR 100: tuned LogisticRegression + post-hoc LA scores 75.8 % here."""
    X_pool, y_pool = read_features(cifar_features, "train")
    X_test, y_test = read_features(cifar_features, "test")
    keep = long_tailed_subset(y_pool, 100, random_state=0)
    clf = BalancedSoftmaxClassifier(random_state=0).fit(X_pool[keep], y_pool[keep])
    assert clf.class_counts_.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert clf.score(X_test, y_test) > 0.745
