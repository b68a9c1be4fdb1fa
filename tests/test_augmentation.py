"""Training and test-time views, and tail feature synthesis."""

import numpy as np
import pytest
import torch

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier, RIDEClassifier, SADEClassifier
from ltlearn.features import FeatureFile, FeatureWriter
from ltlearn.synthesis import synthesize_tail

FAST = dict(device="cpu", random_state=0)


def _noisy_views(X, k, scale, seed=0):
    rng = np.random.default_rng(seed)
    return X[:, None, :] + scale * rng.standard_normal((len(X), k, X.shape[1]))


@pytest.mark.parametrize("make", [BalancedSoftmaxClassifier, PRLClassifier, SADEClassifier])
def test_views_keep_the_class_prior_per_image(digits, make):
    views = _noisy_views(digits.X_train, 3, 1.0)
    model = make(max_epochs=5, **FAST).fit(digits.X_train, digits.y_train, views=views)
    counts = np.bincount(digits.y_train)
    np.testing.assert_allclose(model.class_prior_, counts / counts.sum())
    np.testing.assert_array_equal(model.class_counts_, counts)


def test_training_on_noisy_views_learns(digits):
    views = _noisy_views(digits.X_train, 2, 2.0)
    model = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train, views=views)
    assert model.score(digits.X_test, digits.y_test) > 0.85


def test_each_step_sees_one_view_per_image(digits):
    # Views that are pure noise: a model trained on them (2 of 3 draws) is
    # markedly worse than one trained on the plain rows, so views are used.
    rng = np.random.default_rng(0)
    junk = rng.standard_normal((len(digits.X_train), 2, digits.X_train.shape[1])) * 16
    plain = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train)
    noisy = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train, views=junk)
    assert noisy.score(digits.X_test, digits.y_test) < plain.score(digits.X_test, digits.y_test)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BalancedSoftmaxClassifier(**FAST),
        lambda: PRLClassifier(max_epochs=5, **FAST),
        lambda: SADEClassifier(max_epochs=5, **FAST),
    ],
)
def test_identical_test_views_predict_as_the_plain_rows(digits, make):
    model = make().fit(digits.X_train, digits.y_train)
    views = np.stack([digits.X_test] * 3, axis=1)
    np.testing.assert_allclose(
        model.predict_proba(digits.X_test, views=views),
        model.predict_proba(digits.X_test),
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        model.predict(digits.X_test, views=views), model.predict(digits.X_test)
    )


def test_test_views_average_the_logits(digits):
    model = BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train)
    views = _noisy_views(digits.X_test, 2, 1.0)
    expected = (
        model.decision_function(digits.X_test)
        + model.decision_function(views[:, 0])
        + model.decision_function(views[:, 1])
    ) / 3
    np.testing.assert_allclose(
        model.decision_function(digits.X_test, views=views), expected, rtol=1e-5, atol=1e-5
    )
    prl = PRLClassifier(max_epochs=5, **FAST).fit(digits.X_train, digits.y_train)
    expected = np.mean(
        [prl.decision_function(V, "forward") for V in (digits.X_test, views[:, 0], views[:, 1])],
        axis=0,
    )
    np.testing.assert_allclose(
        prl.decision_function(digits.X_test, "forward", views=views), expected, rtol=1e-5, atol=1e-5
    )


def test_view_errors_name_the_problem(digits, tmp_path):
    X, y = digits.X_train, digits.y_train
    model = BalancedSoftmaxClassifier(max_epochs=2, **FAST)
    with pytest.raises(
        ValueError, match=r"views passed to fit must have shape \(\d+, n_views, 64\)"
    ):
        model.fit(X, y, views=X[:, None, :10])
    with pytest.raises(ValueError, match="views passed to fit must have shape"):
        model.fit(X, y, views=X)
    bad = np.stack([X, X], axis=1)
    bad[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match="views passed to fit contain NaN"):
        model.fit(X, y, views=bad)
    with pytest.raises(ValueError, match="RIDEClassifier does not train on views of embeddings"):
        RIDEClassifier(max_epochs=2, **FAST).fit(X, y, views=np.stack([X], axis=1))
    model.fit(X, y)
    with pytest.raises(ValueError, match=r"views passed to prediction must have shape \(5,"):
        model.predict(digits.X_test[:5], views=np.stack([digits.X_test[:4]], axis=1))
    path = tmp_path / "f.h5"
    with FeatureWriter(path, classes=[str(c) for c in range(10)], dtype="float32") as w:
        w.append("train", X, y)
    with FeatureFile(path) as f, pytest.raises(ValueError, match="views need X in memory"):
        model.fit(f["train"], views=np.stack([X], axis=1))
    with FeatureFile(path) as f, pytest.raises(ValueError, match="tail_synthesis needs X in"):
        BalancedSoftmaxClassifier(tail_synthesis=0.5, **FAST).fit(f["train"])


def test_no_synthetic_rows_give_the_plain_fit(digits):
    X, y = digits.X_train, digits.y_train
    plain = BalancedSoftmaxClassifier(**FAST).fit(X, y)
    smallest = np.bincount(y).min() / np.bincount(y).max()
    for fraction in (0.0, smallest):  # at `smallest` no class is below the target
        model = BalancedSoftmaxClassifier(tail_synthesis=fraction, **FAST).fit(X, y)
        assert model.synthetic_counts_.sum() == 0
        np.testing.assert_array_equal(
            model.decision_function(digits.X_test), plain.decision_function(digits.X_test)
        )


def test_synthesis_tops_small_classes_up_and_keeps_the_prior_per_image(digits):
    X, y = digits.X_train, digits.y_train
    counts = np.bincount(y)
    model = BalancedSoftmaxClassifier(tail_synthesis=0.5, **FAST).fit(X, y)
    target = int(np.ceil(0.5 * counts.max()))
    np.testing.assert_array_equal(model.synthetic_counts_, np.maximum(target - counts, 0))
    # A class's real and synthetic rows share its weight: the prior still counts images.
    np.testing.assert_allclose(model.class_prior_, counts / counts.sum())
    np.testing.assert_array_equal(model.class_counts_, counts)
    assert model.score(digits.X_test, digits.y_test) > 0.85


def test_synthesised_features_have_the_borrowed_covariance():
    rng = np.random.default_rng(0)
    d = 6
    # Head class: many rows with an anisotropic covariance; tail: a few rows
    # with the same spread in total but rank-deficient sample covariance.
    A = rng.standard_normal((d, d)) * np.linspace(0.2, 2.0, d)
    head = rng.standard_normal((20_000, d)) @ A.T + 5.0
    tail = rng.standard_normal((4, d)) * 0.5 - 5.0
    Z = torch.as_tensor(np.vstack([head, tail]), dtype=torch.float64)
    y = torch.as_tensor([0] * len(head) + [1] * len(tail))
    generator = torch.Generator().manual_seed(0)
    Z_new, y_new = synthesize_tail(Z, y, 2, 0.5, generator)
    assert (y_new == 1).all() and len(y_new) == 10_000 - 4
    new = Z_new.numpy()
    head_cov = np.cov(head, rowvar=False)
    scale2 = np.trace(np.cov(tail, rowvar=False)) / np.trace(head_cov)
    np.testing.assert_allclose(new.mean(axis=0), tail.mean(axis=0), atol=0.05)
    error = np.linalg.norm(np.cov(new, rowvar=False) - scale2 * head_cov)
    assert error < 0.05 * np.linalg.norm(scale2 * head_cov)


def test_synthesis_with_views_moves_every_view_of_the_donor():
    rng = np.random.default_rng(1)
    Z = torch.as_tensor(rng.standard_normal((40, 3, 4)))
    y = torch.as_tensor([0] * 36 + [1] * 4)
    Z_new, y_new = synthesize_tail(Z, y, 2, 1.0, torch.Generator().manual_seed(0))
    assert Z_new.shape == (32, 3, 4)
    # Each synthetic stack is a donor stack shifted (and scaled) alike in every view.
    head_mean = Z[:36, 0].mean(0)
    tail = Z[36:, 0]
    scale = torch.sqrt(
        ((tail - tail.mean(0)) ** 2).sum(1).sum()
        / 3
        / (((Z[:36, 0] - head_mean) ** 2).sum(1).sum() / 35)
    )
    donors = (Z_new - tail.mean(0)) / scale + head_mean
    matches = [(torch.isclose(Z[:36], row).all(dim=(1, 2))).any() for row in donors]
    assert all(matches)


def test_grid_search_splits_views_with_the_rows(digits):
    from sklearn.model_selection import GridSearchCV

    views = _noisy_views(digits.X_train, 2, 1.0)
    search = GridSearchCV(
        BalancedSoftmaxClassifier(max_epochs=3, **FAST), {"tau": [0.5, 1.0]}, cv=2
    ).fit(digits.X_train, digits.y_train, views=views)
    # A fold given all rows' views would fail the shape check in fit.
    assert search.best_score_ > 0.8


@pytest.mark.parametrize("balanced", [False, True])
def test_synthetic_rows_keep_each_class_weight(digits, monkeypatch, balanced):
    import ltlearn._base

    seen = {}
    real_fit_module = ltlearn._base.fit_module

    def spy(module, criterion, X, y, **kw):
        seen["y"], seen["w"] = y.numpy(), kw["sample_weight"].numpy()
        return real_fit_module(module, criterion, X, y, **kw)

    monkeypatch.setattr(ltlearn._base, "fit_module", spy)
    X, y = digits.X_train, digits.y_train
    weights = np.random.default_rng(0).uniform(0.5, 3.0, len(y))
    # Without cross-fitting, the spy's last call is the main fit's.
    params = dict(tail_synthesis=0.5, max_epochs=2, calibration_cv=None, **FAST)
    if balanced:
        params.update(balanced_sampling=True, tau=0.0)
    model = BalancedSoftmaxClassifier(**params).fit(X, y, sample_weight=weights)
    assert model.synthetic_counts_.sum() > 0
    totals = np.bincount(seen["y"], weights=seen["w"])
    real = np.bincount(y, weights=weights)
    if balanced:
        # Classes are drawn equally often; within one, a synthetic row weighs the mean real row.
        mean_real = real / np.bincount(y)
        synthetic = seen["y"][len(y) :]
        np.testing.assert_allclose(seen["w"][len(y) :], mean_real[synthetic], rtol=1e-6)
    else:
        np.testing.assert_allclose(totals, real, rtol=1e-5)
    # The scale of sample_weight does not matter.
    scaled = BalancedSoftmaxClassifier(**params).fit(X, y, sample_weight=10 * weights)
    np.testing.assert_allclose(
        scaled.predict_proba(digits.X_test), model.predict_proba(digits.X_test), atol=1e-4
    )
