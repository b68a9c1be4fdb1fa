import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.metrics import (
    SCORERS,
    evaluate_test_agnostic,
    make_shot_scorer,
    per_class_accuracy,
    rank_groups,
    shot_accuracy,
    shot_groups,
)


class AlwaysFirst(ClassifierMixin, BaseEstimator):
    """Predicts class 0 always; classes listed largest first."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.class_counts_ = np.bincount(y)
        return self

    def predict(self, X):
        return np.zeros(len(X), dtype=int)


def test_per_class_accuracy_by_hand():
    acc = per_class_accuracy([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], labels=[0, 1, 2, 3])
    np.testing.assert_allclose(acc, [0.5, 1.0, 2 / 3, np.nan])
    with pytest.raises(ValueError, match=r"not among the 2 known classes: \[7\]"):
        per_class_accuracy([0, 7], [0, 0], labels=[0, 1])


def test_shot_and_rank_groups():
    assert shot_groups([101, 100, 20, 19, 0]).tolist() == ["many", "medium", "medium", "few", "few"]
    assert shot_groups([60, 30, 5], many_threshold=50, few_threshold=10).tolist() == [
        "many",
        "medium",
        "few",
    ]
    with pytest.raises(ValueError, match="few_threshold"):
        shot_groups([1], many_threshold=10, few_threshold=20)
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert rank_groups(counts).tolist() == ["head"] * 3 + ["middle"] * 4 + ["tail"] * 3


def test_shot_accuracy_averages_classes_within_groups():
    y_true = [0, 0, 0, 0, 1, 2, 2]
    y_pred = [0, 0, 0, 0, 0, 2, 0]
    acc = shot_accuracy(y_true, y_pred, class_counts=[500, 50, 5])
    assert acc == {"overall": pytest.approx(5 / 7), "many": 1.0, "medium": 0.0, "few": 0.5}
    assert np.isnan(shot_accuracy([0], [0], class_counts=[50, 50])["many"])


def test_test_agnostic_evaluation_of_a_head_only_classifier():
    y = np.repeat(np.arange(3), 100)
    X = np.zeros((300, 1))
    table = evaluate_test_agnostic(AlwaysFirst().fit(X, y), X, y, imbalance_ratios=[10, 2])
    assert list(table) == ["forward_10", "forward_2", "uniform", "backward_2", "backward_10"]
    assert table["uniform"] == pytest.approx(1 / 3)
    assert table["forward_10"] == pytest.approx(100 / (100 + 31 + 10))
    assert (
        table["forward_10"]
        > table["forward_2"]
        > table["uniform"]
        > table["backward_2"]
        > table["backward_10"]
    )


def test_oracle_prior_helps_on_shifted_sets():
    # Overlapping Gaussian classes: a linear head's logits are calibrated here, so
    # adding the true log-prior of a skewed test set must help on it.
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    y_train = np.repeat([0, 1, 2], [2000, 450, 100])
    y_test = np.repeat([0, 1, 2], 1000)
    X_train = centers[y_train] + rng.normal(size=(len(y_train), 2))
    X_test = centers[y_test] + rng.normal(size=(len(y_test), 2))
    clf = BalancedSoftmaxClassifier(normalize="standard", random_state=0).fit(X_train, y_train)
    plain = evaluate_test_agnostic(clf, X_test, y_test)
    oracle = evaluate_test_agnostic(clf, X_test, y_test, oracle_prior=True)
    assert oracle["forward_50"] > plain["forward_50"] + 0.05
    assert oracle["backward_50"] > plain["backward_50"] + 0.05
    assert oracle["uniform"] == plain["uniform"]
    assert clf.test_prior is None
    with pytest.raises(ValueError, match="test_prior parameter"):
        evaluate_test_agnostic(
            AlwaysFirst().fit(X_train, y_train), X_test, y_test, oracle_prior=True
        )


def test_shot_scorer_in_grid_search(digits):
    few = make_shot_scorer("few", many_threshold=50, few_threshold=20)
    clf = BalancedSoftmaxClassifier(max_epochs=10, device="cpu", random_state=0)
    search = GridSearchCV(
        clf,
        {"tau": [0.0, 1.0]},
        scoring={"balanced_accuracy": SCORERS["balanced_accuracy"], "few": few},
        refit="balanced_accuracy",
        cv=2,
    )
    search.fit(digits.X_train, digits.y_train)
    results = search.cv_results_
    assert results["mean_test_few"][1] > results["mean_test_few"][0]
    assert search.best_params_ == {"tau": 1.0}
    plain = LogisticRegression(max_iter=300).fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match="no class_counts_ attribute"):
        few(plain, digits.X_test, digits.y_test)
