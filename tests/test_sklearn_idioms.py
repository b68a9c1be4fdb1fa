"""scikit-learn idioms on every torch estimator: n_iter_, loss_curve_, early stopping,
class_weight and thread limits."""

import math

import numpy as np
import pytest
import torch
from sklearn.utils._param_validation import InvalidParameterError
from threadpoolctl import threadpool_limits

import ltlearn._base
from ltlearn import (
    BalancedSoftmaxClassifier,
    DecoupledClassifier,
    PRLClassifier,
    RIDEClassifier,
    SADEClassifier,
    SHIKEClassifier,
)
from ltlearn._training import fit_module
from ltlearn.datasets import make_long_tailed_embeddings
from ltlearn.features import FeatureFile
from ltlearn.losses import LogitAdjustedLoss
from ltlearn.prl import PRLNetwork, _DirichletTraining
from ltlearn.top_stage import TopStage

FAST = dict(device="cpu", random_state=0)
ESTIMATORS = [
    lambda **kw: BalancedSoftmaxClassifier(calibration_cv=None, **kw),
    lambda **kw: PRLClassifier(calibration_cv=None, **kw),
    lambda **kw: SADEClassifier(calibration_cv=None, **kw),
    lambda **kw: RIDEClassifier(n_experts=2, **kw),
    lambda **kw: DecoupledClassifier("crt", **kw),
    lambda **kw: DecoupledClassifier("tau_norm", **kw),
    lambda **kw: SHIKEClassifier(feature_groups=[8, 8], n_experts=2, **kw),
]


@pytest.fixture(scope="module")
def data():
    # 10 classes of 60 down to 6 rows: small enough for many fits.
    X, y = make_long_tailed_embeddings(300, 16, 10, imbalance_ratio=10, random_state=0)
    return X, y


def held_out_rows(y, fraction):
    """How many rows early stopping holds out: train_val_split's rule per class."""
    counts = np.bincount(y)
    return sum(min(max(round(fraction * n), 1), n - 1) for n in counts if n >= 2)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_n_iter_and_loss_curve_without_early_stopping(data, make):
    X, y = data
    clf = make(max_epochs=4, **FAST).fit(X, y)
    assert clf.n_iter_ == 4
    assert clf.loss_curve_ is clf.history_
    assert len(clf.loss_curve_) == 4
    assert all(math.isfinite(loss) for loss in clf.loss_curve_)
    assert clf.validation_scores_ is None
    assert clf.best_validation_score_ is None
    assert clf.best_epoch_ == 4


@pytest.mark.parametrize("make", ESTIMATORS)
def test_early_stopping_keeps_the_best_epoch(data, make):
    X, y = data
    clf = make(max_epochs=40, early_stopping=True, n_iter_no_change=2, lr=0.05, **FAST)
    clf.fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ + 1  # before training, then after each epoch
    assert len(clf.loss_curve_) == clf.n_iter_
    assert clf.best_validation_score_ == max(scores) == scores[clf.best_epoch_]
    # Stopped: n_iter_no_change epochs in a row found no lower held-out loss.
    assert clf.n_iter_ < 40
    assert clf.n_iter_ == clf.best_epoch_ + 2
    assert max(scores[clf.best_epoch_ + 1 :]) <= clf.best_validation_score_
    assert all(score < 0 for score in scores)  # negated cross-entropies
    assert clf.score(X, y) > 0.5


def test_fit_module_restores_the_best_parameters_after_its_patience():
    torch.manual_seed(0)
    X, y = torch.randn(64, 4), torch.arange(64) % 2
    module = torch.nn.Linear(4, 2)
    calls, record = [], {}

    def validation(module):
        # A loss that improves for 3 epochs, then only worsens.
        calls.append(module.weight.detach().clone())
        return [5.0, 4.0, 3.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0][len(calls) - 1]

    history = fit_module(
        module,
        LogitAdjustedLoss(torch.tensor([0.5, 0.5])),
        X,
        y,
        lr=0.1,
        max_epochs=8,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
        validation=validation,
        n_iter_no_change=2,
        record=record,
    )
    assert len(history) == 5  # the best at epoch 3, then 2 epochs without a new best
    assert record == {"validation_scores": [5.0, 4.0, 3.0, 2.0, 6.0, 7.0], "best_epoch": 3}
    torch.testing.assert_close(module.weight, calls[3])


def test_held_out_losses_do_not_count_as_training_steps(data):
    # LDAM's deferred re-weighting and RIDE's temperatures count the training steps.
    X, y = data
    clf = RIDEClassifier(
        loss="ldam_drw", n_experts=2, max_epochs=6, batch_size=32, early_stopping=True, **FAST
    ).fit(X, y)
    n_train = len(y) - held_out_rows(y, 0.1)
    steps = clf.n_iter_ * math.ceil(n_train / 32)
    assert clf.criterion_.steps == steps
    assert clf.criterion_.base.steps == steps


def test_prl_validation_reads_the_corners_without_using_up_draws():
    network = PRLNetwork(
        4,
        3,
        torch.zeros(3, 3),
        rank=0,
        hidden_size=8,
        adapter_size=None,
        generator=torch.Generator().manual_seed(0),
    )
    training = _DirichletTraining(network, torch.full((5, 3, 3), 1.0 / 3.0)).eval()
    z = torch.randn(6, 4)
    torch.testing.assert_close(training(z), network(z, torch.eye(3)))
    assert training.step == 0


def test_early_stopping_with_views(data):
    X, y = data
    views = X[:, None] + 0.05 * np.random.default_rng(0).standard_normal((len(X), 2, X.shape[1]))
    clf = BalancedSoftmaxClassifier(
        max_epochs=5, early_stopping=True, calibration_cv=None, **FAST
    ).fit(X, y, views=views)
    assert len(clf.validation_scores_) == clf.n_iter_ + 1
    assert clf.score(X, y) > 0.5


def test_early_stopping_parameters_are_validated(data):
    X, y = data
    with pytest.raises(InvalidParameterError, match="'validation_fraction' parameter"):
        BalancedSoftmaxClassifier(early_stopping=True, validation_fraction=0.0).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'n_iter_no_change' parameter"):
        RIDEClassifier(early_stopping=True, n_iter_no_change=0).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'early_stopping' parameter"):
        SADEClassifier(early_stopping="yes").fit(X, y)


def test_early_stopping_needs_rows_to_hold_out():
    X, y = np.random.default_rng(0).standard_normal((3, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="every class has a single row; set early_stopping"):
        BalancedSoftmaxClassifier(early_stopping=True, calibration_cv=None, **FAST).fit(X, y)


def test_early_stopping_is_refused_on_streamed_features(tmp_path):
    path = make_long_tailed_embeddings(200, 8, 4, random_state=0, path=tmp_path / "f.h5")
    clf = BalancedSoftmaxClassifier(early_stopping=True, **FAST)
    with (
        FeatureFile(path) as f,
        pytest.raises(ValueError, match="early_stopping needs X in memory"),
    ):
        clf.fit(f["train"])


def test_early_stopping_is_refused_with_a_top_stage():
    top = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    X = np.random.default_rng(0).standard_normal((40, 4, 3, 3)).astype(np.float32)
    y = np.arange(40) % 2
    clf = BalancedSoftmaxClassifier(head=TopStage(top=top, epochs=1), early_stopping=True, **FAST)
    with pytest.raises(ValueError, match=r"TopStage\(validation_fraction=...\)"):
        clf.fit(X, y)
    # Without it, the TopStage's own hold-out fills the same attributes.
    clf.set_params(early_stopping=False, max_epochs=3, head__epochs=2).fit(X, y)
    assert clf.n_iter_ == 5  # 3 epochs of linear probe, 2 of fine-tuning
    assert clf.loss_curve_ is clf.history_ and len(clf.loss_curve_) == 5
    assert len(clf.validation_scores_) == 3
    assert all(0 <= score <= 1 for score in clf.validation_scores_)  # balanced accuracies
    assert clf.best_validation_score_ == max(clf.validation_scores_)


def test_class_weight_leaves_the_prior_and_moves_predictions(data):
    X, y = data
    plain = BalancedSoftmaxClassifier(max_epochs=10, calibration_cv=None, **FAST).fit(X, y)
    tail = int(np.argmin(np.bincount(y)))
    heavy = BalancedSoftmaxClassifier(
        max_epochs=10, calibration_cv=None, class_weight={tail: 20.0}, **FAST
    ).fit(X, y)
    # The adjustment's prior counts the classes without their weights.
    np.testing.assert_array_equal(heavy.class_prior_, plain.class_prior_)
    assert (heavy.predict(X) == tail).sum() > (plain.predict(X) == tail).sum()


def test_class_weight_balanced_is_the_scikit_learn_formula(data):
    X, y = data
    counts = np.bincount(y)
    formula = {c: len(y) / (len(counts) * n) for c, n in enumerate(counts)}
    params = dict(max_epochs=3, calibration_cv=None, **FAST)
    balanced = BalancedSoftmaxClassifier(class_weight="balanced", **params).fit(X, y)
    explicit = BalancedSoftmaxClassifier(class_weight=formula, **params).fit(X, y)
    np.testing.assert_allclose(
        balanced.decision_function(X), explicit.decision_function(X), rtol=1e-5, atol=1e-6
    )


def test_threadpoolctl_limits_the_threads_torch_trains_on(data, monkeypatch):
    """The documented way to limit torch's threads (see the fit docstring)."""
    X, y = data
    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_module(*args, **kwargs)

    monkeypatch.setattr(ltlearn._base, "fit_module", recording)
    before = torch.get_num_threads()
    with threadpool_limits(limits=1):
        BalancedSoftmaxClassifier(max_epochs=1, calibration_cv=None, **FAST).fit(X, y)
    assert seen == [1]
    assert torch.get_num_threads() == before
