"""PRLClassifier: its loss, its corners against separately trained experts, preferences."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.losses import PRLLoss, inverse_prior
from ltlearn.metrics import per_class_accuracy
from ltlearn.prl import PRLNetwork

FAST = dict(device="cpu", random_state=0)


@pytest.fixture(scope="module")
def fitted(digits):
    return PRLClassifier(**FAST).fit(digits.X_train, digits.y_train)


def test_inverse_prior_swaps_frequencies_by_rank():
    prior = torch.tensor([0.1, 0.6, 0.3])
    np.testing.assert_allclose(inverse_prior(prior).numpy(), [0.6, 0.1, 0.3])


def test_prl_loss_matches_hand_computation():
    prior = torch.tensor([0.75, 0.25])
    logits = torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]], [[2.0, -1.0]]])  # 3 experts, 1 sample
    target = torch.tensor([1])
    lam, mu = 2.0, 0.5
    loss = PRLLoss(prior, lam=lam, mu=mu)

    def ce(z, k):
        return float(np.log(np.exp(z).sum()) - z[k])

    log_p = np.log([0.75, 0.25])
    log_inv = np.log([0.25, 0.75])
    expected = [
        ce(np.array([1.0, 0.0]), 1),
        ce(np.array([0.0, 0.5]) + log_p, 1),
        ce(np.array([2.0, -1.0]) + log_p - lam * log_inv, 1),
    ]
    np.testing.assert_allclose(loss.expert_losses(logits, target).numpy(), expected, rtol=1e-6)
    total = sum(expected) + mu * np.log(np.sum(np.exp(np.array(expected) / mu)))
    assert loss(logits, target).item() == pytest.approx(total, rel=1e-6)


def test_every_corner_starts_as_its_bayes_expert():
    """Before training, corner i of the network is the base head plus expert i's offset."""
    basis = torch.randn(3, 4)
    net = PRLNetwork(
        5, 4, basis, rank=2, hidden_size=8, adapter_size=16, generator=torch.Generator()
    )
    z = torch.randn(7, 5)
    logits = net(z, torch.eye(3))
    base = net.base(z)
    for i in range(3):
        torch.testing.assert_close(logits[i], base + basis[i])


def test_generator_size_does_not_grow_with_features_times_classes():
    # 1000 classes and 1024-d features: the base head holds ~1M weights; the
    # hypernetwork must add a bounded multiple of n_classes, not hidden * d * C.
    net = PRLNetwork(
        1024,
        1000,
        torch.zeros(3, 1000),
        rank=8,
        hidden_size=64,
        adapter_size=None,
        generator=torch.Generator(),
    )
    n_params = sum(p.numel() for p in net.parameters())
    base = 1024 * 1000 + 1000
    assert n_params - base < 64 * 1000 * 10 + 8 * 1024 + 1000


def test_corners_move_accuracy_towards_head_or_tail():
    """On overlapping synthetic classes, forward favours the head and backward the tail."""
    X, y = make_classification(
        n_samples=6000,
        n_features=20,
        n_informative=8,
        n_classes=5,
        n_clusters_per_class=1,
        random_state=0,
    )
    idx = long_tailed_subset(y[:4000], 20, random_state=0)
    clf = PRLClassifier(**FAST).fit(X[idx], y[idx])
    assert clf.class_counts_[0] > 10 * clf.class_counts_[4]
    recall = {
        p: per_class_accuracy(y[4000:], clf.predict(X[4000:], preference=p))
        for p in ("forward", "uniform", "backward")
    }
    assert recall["forward"][0] > recall["uniform"][0] + 0.1
    assert recall["backward"][4] > recall["uniform"][4] + 0.1
    assert recall["uniform"].mean() > 0.6  # five classes: chance is 0.2


def test_corners_match_separately_trained_experts(digits, fitted):
    """Each corner is about as accurate as its expert trained on its own."""
    X, y, Xt, yt = digits.X_train, digits.y_train, digits.X_test, digits.y_test
    forward = BalancedSoftmaxClassifier(tau=0.0, **FAST).fit(X, y)
    uniform = BalancedSoftmaxClassifier(**FAST).fit(X, y)
    # The backward expert's logits model a test prior proportional to inverse_prior ** lam;
    # a uniform expert shifted by that prior is its separately trained equivalent.
    prior = torch.as_tensor(uniform.class_prior_)
    backward_prior = (inverse_prior(prior) ** fitted.lam).numpy()
    backward = clone(uniform).set_params(test_prior=backward_prior).fit(X, y)
    for name, expert in [("forward", forward), ("uniform", uniform), ("backward", backward)]:
        corner = np.mean(fitted.predict(Xt, preference=name) == yt)
        assert corner >= expert.score(Xt, yt) - 0.03, name


def test_predictions_vary_continuously_with_the_preference(digits, fitted):
    ts = np.linspace(0.0, 1.0, 101)
    path = [(1 - t, t, 0.0) for t in ts] + [(0.0, 1 - t, t) for t in ts]
    logits = fitted.decision_function_many(digits.X_test, path)
    steps = np.abs(np.diff(logits, axis=0)).max(axis=(1, 2))
    span = np.abs(logits[0] - logits[100]).max()
    assert steps.max() < 0.1 * span
    # ... and the path really goes somewhere: the corners predict differently.
    assert span > 1.0


def test_set_params_preference_takes_effect_without_refit(digits, fitted):
    clf = pickle.loads(pickle.dumps(fitted))
    module = clf.module_
    uniform = clf.predict_proba(digits.X_test)
    clf.set_params(preference="backward")
    backward = clf.predict_proba(digits.X_test)
    assert clf.module_ is module
    assert not np.allclose(uniform, backward)
    np.testing.assert_allclose(backward, fitted.predict_proba(digits.X_test, preference="backward"))
    np.testing.assert_allclose(
        clf.set_params(preference=[0, 5, 0]).predict_proba(digits.X_test), uniform, atol=1e-6
    )
    assert fitted.preference == "uniform"  # a one-off preference= changes no parameter


def test_many_preferences_at_once_equal_one_by_one(digits, fitted):
    prefs = ["forward", (0.2, 0.5, 0.3), "backward"]
    many = fitted.decision_function_many(digits.X_test, prefs)
    for m, p in enumerate(prefs):
        np.testing.assert_allclose(many[m], fitted.decision_function(digits.X_test, p), atol=1e-5)
    labels = fitted.predict_many(digits.X_test, prefs)
    np.testing.assert_array_equal(labels[2], fitted.predict(digits.X_test, preference="backward"))


@pytest.mark.parametrize(
    "preference, match",
    [
        ((1, 0), "3 weights"),
        ((1, -1, 1), "non-negative"),
        ((0, 0, 0), "not all be zero"),
        ((np.nan, 1, 1), "finite"),
        ("sideways", "must be one of"),
        ("abc", "must be one of"),
    ],
)
def test_invalid_preferences_are_clear_errors(digits, fitted, preference, match):
    with pytest.raises(ValueError, match=match):
        fitted.predict(digits.X_test, preference=preference)


def test_invalid_preference_parameter_is_reported_at_fit(digits):
    with pytest.raises(ValueError, match="preference"):
        PRLClassifier(preference="sideways").fit(digits.X_train, digits.y_train)


def test_bad_beta_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="beta must be"):
        PRLClassifier(beta=(1.0, -1.0)).fit(digits.X_train, digits.y_train)


def test_same_random_state_same_model(digits):
    a = PRLClassifier(max_epochs=3, **FAST).fit(digits.X_train, digits.y_train)
    b = PRLClassifier(max_epochs=3, **FAST).fit(digits.X_train, digits.y_train)
    c = PRLClassifier(max_epochs=3, device="cpu", random_state=1).fit(
        digits.X_train, digits.y_train
    )
    np.testing.assert_array_equal(
        a.decision_function(digits.X_test), b.decision_function(digits.X_test)
    )
    assert not np.array_equal(
        a.decision_function(digits.X_test), c.decision_function(digits.X_test)
    )


def test_preference_rule_for_test_imbalance(fitted):
    train_ratio = fitted.class_counts_.max() / fitted.class_counts_.min()

    def r_hat(alpha):
        weighted = alpha * fitted.r_
        return weighted / weighted.sum()

    np.testing.assert_allclose(r_hat(fitted.preference_for_imbalance(1)), [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(
        r_hat(fitted.preference_for_imbalance(train_ratio)), [1, 0, 0], atol=1e-12
    )
    half = fitted.preference_for_imbalance(np.sqrt(train_ratio), "backward")
    np.testing.assert_allclose(r_hat(half), [0, 1 - 0.5 / fitted.lam, 0.5 / fitted.lam])
    with pytest.raises(ValueError, match="imbalance_ratio"):
        fitted.preference_for_imbalance(0.5)
    with pytest.raises(ValueError, match="direction"):
        fitted.preference_for_imbalance(2, "sideways")


def test_pipeline_grid_search_and_pickle(digits):
    pipe = make_pipeline(StandardScaler(), PRLClassifier(max_epochs=5, **FAST))
    search = GridSearchCV(
        pipe,
        {
            "prlclassifier__mu": [0.1, 1.0],
            "prlclassifier__beta": [(8.0, 1.0), (2.0, 1.0)],
            "prlclassifier__lam": [1.0, 2.0],
        },
        scoring="balanced_accuracy",
        cv=2,
        n_jobs=2,
    ).fit(digits.X_train, digits.y_train)
    restored = pickle.loads(pickle.dumps(search.best_estimator_))
    np.testing.assert_array_equal(
        restored.predict(digits.X_test), search.best_estimator_.predict(digits.X_test)
    )
    assert search.score(digits.X_test, digits.y_test) > 0.7


def test_string_labels(digits):
    names = np.array([f"digit {k}" for k in range(10)])
    clf = PRLClassifier(max_epochs=5, **FAST).fit(digits.X_train, names[digits.y_train])
    assert set(clf.predict(digits.X_test, preference="backward")) <= set(names)
