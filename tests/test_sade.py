"""SADEClassifier: its experts' loss, test-time aggregation, and its fallbacks."""

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from ltlearn import SADEClassifier
from ltlearn.losses import DiverseExpertLoss

N_CLASSES, WIDTH = 4, 16
TRAIN_COUNTS = [1000, 300, 100, 30]
FORWARD = [1200, 400, 150, 50]
BACKWARD = FORWARD[::-1]


@pytest.fixture(scope="module")
def draw():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(N_CLASSES, WIDTH))
    means *= 2.0 / np.linalg.norm(means, axis=1, keepdims=True)

    def sample(counts):
        y = np.repeat(np.arange(N_CLASSES), counts)
        return means[y] + 0.8 * rng.normal(size=(len(y), WIDTH)), y

    return sample


@pytest.fixture(scope="module")
def sade(draw):
    return SADEClassifier(device="cpu", random_state=0).fit(*draw(TRAIN_COUNTS))


def views_of(X, n_views=2, seed=0):
    """Stand-ins for augmented views: the rows plus independent noise."""
    rng = np.random.default_rng(seed)
    return X[:, None, :] + 0.5 * rng.normal(size=(len(X), n_views, X.shape[1]))


def test_diverse_expert_loss_matches_hand_computation():
    prior = torch.tensor([0.75, 0.25])
    logits = torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]], [[2.0, -1.0]]])
    target = torch.tensor([1])

    def ce(z, k):
        return float(np.log(np.exp(z).sum()) - z[k])

    log_p, log_inv = np.log([0.75, 0.25]), np.log([0.25, 0.75])
    expected = (
        ce(np.array([1.0, 0.0]), 1)
        + ce(np.array([0.0, 0.5]) + log_p, 1)
        + ce(np.array([2.0, -1.0]) + log_p - 2.0 * log_inv, 1)
    )
    loss = DiverseExpertLoss(prior, lam=2.0)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_experts_specialise_as_their_losses_say(sade, draw):
    X, y = draw([300] * N_CLASSES)
    forward, uniform, backward = sade.expert_decision_function(X).argmax(axis=2)
    head, tail = 0, N_CLASSES - 1
    assert np.sum(forward == head) > np.sum(uniform == head) > np.sum(backward == head)
    assert np.sum(backward == tail) > np.sum(uniform == tail) > np.sum(forward == tail)
    assert np.mean(uniform == y) > 0.8


def test_unadapted_predictions_average_the_experts(sade, draw):
    X, _ = draw([50] * N_CLASSES)
    experts = sade.expert_decision_function(X)
    np.testing.assert_allclose(
        sade.decision_function(X), experts.mean(axis=0), rtol=1e-5, atol=1e-5
    )


def test_aggregation_moves_weight_toward_the_matching_expert(sade, draw):
    X, _ = draw(FORWARD)
    aggregate = dict(method="aggregation")
    forward = copy.copy(sade).adapt(X, views=views_of(X), **aggregate).aggregation_weights_
    X, _ = draw(BACKWARD)
    backward = copy.copy(sade).adapt(X, views=views_of(X), **aggregate).aggregation_weights_
    assert forward.sum() == pytest.approx(1.0)
    assert forward[0] > 1 / 3 > forward[2]
    assert backward[2] > 1 / 3 > backward[0]


def test_aggregated_predictions_use_the_learnt_weights(sade, draw):
    X, _ = draw(FORWARD)
    # One view: paired with X.
    model = copy.copy(sade).adapt(X, views=views_of(X, n_views=1), method="aggregation")
    experts = sade.expert_decision_function(X)
    expected = np.einsum("e,enc->nc", model.aggregation_weights_, experts)
    np.testing.assert_allclose(model.decision_function(X), expected, rtol=1e-5, atol=1e-5)
    assert len(model.aggregation_history_) <= sade.aggregation_epochs


def test_auto_adapt_is_map_on_the_uniform_expert(sade, draw):
    X, _ = draw(FORWARD)
    model = copy.copy(sade).adapt(X)
    assert not hasattr(model, "aggregation_weights_")
    assert model.shift_detected_
    uniform_expert = sade.expert_decision_function(X)[1]
    np.testing.assert_allclose(
        model.decision_function(X),
        uniform_expert / sade.calibration_temperature_
        + sade.calibration_bias_
        + np.log(model.test_prior_),
        rtol=1e-5,
        atol=1e-5,
    )
    noisy = copy.copy(sade).adapt(X, method="aggregation")  # the noise-view fallback
    assert noisy.aggregation_weights_[0] > noisy.aggregation_weights_[2]


def test_adapt_rejects_inconsistent_arguments(sade, draw):
    X, _ = draw([20] * N_CLASSES)
    with pytest.raises(
        ValueError, match=r"views passed to adapt must have shape \(80, n_views, 16\)"
    ):
        copy.copy(sade).adapt(X, views=np.ones((len(X), 2, 3)), method="aggregation")
    with pytest.raises(ValueError, match="'auto' is 'map'"):
        copy.copy(sade).adapt(X, views=views_of(X))
    with pytest.raises(ValueError, match="used by method='aggregation' only"):
        copy.copy(sade).adapt(X, views=views_of(X), method="em")
    with pytest.raises(ValueError, match="takes only X and views"):
        copy.copy(sade).adapt(X, method="aggregation", pseudo_counts=2.0)
    with pytest.raises(ValueError, match=r"views passed to adapt must have shape"):
        copy.copy(sade).adapt(X, views=np.ones((len(X), 0, 16)), method="aggregation")
    with pytest.raises(ValueError, match="'auto', 'aggregation', 'map'"):
        copy.copy(sade).adapt(X, method="aggregate")


def test_aggregation_state_survives_pickle_and_not_clone(sade, draw):
    X, _ = draw(FORWARD)
    model = copy.copy(sade).adapt(X, views=views_of(X), method="aggregation")
    loaded = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(loaded.aggregation_weights_, model.aggregation_weights_)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert not hasattr(clone(model), "aggregation_weights_")
    assert not hasattr(model.reset_adaptation(), "aggregation_weights_")
