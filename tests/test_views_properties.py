"""Property-based checks of augmented views in fit and predict (issue 27)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltlearn import BalancedSoftmaxClassifier

FAST = dict(max_epochs=2, device="cpu", random_state=0, calibration_cv=None)


@settings(max_examples=15, deadline=None)
@given(
    n_rows=st.integers(4, 30),
    n_views=st.integers(1, 3),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_views_of_any_shape_fit_and_predict(n_rows, n_views, width, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, width))
    y = np.arange(n_rows) % 2
    views = X[:, None, :] + 0.1 * rng.normal(size=(n_rows, n_views, width))
    model = BalancedSoftmaxClassifier(**FAST).fit(X, y, views=views)
    proba = model.predict_proba(X, views=views)
    assert proba.shape == (n_rows, 2) and np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    # Views identical to the rows predict as the rows do.
    same = np.repeat(X[:, None, :], n_views, axis=1)
    np.testing.assert_allclose(
        model.decision_function(X, views=same), model.decision_function(X), atol=1e-5
    )


@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from(["no views", "wrong rows", "wrong width", "2-d", "nan"]),
    seed=st.integers(0, 2**16),
)
def test_malformed_views_are_clear_errors(shape, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(12, 3))
    y = np.arange(12) % 3
    views = {
        "no views": np.empty((12, 0, 3)),
        "wrong rows": rng.normal(size=(11, 2, 3)),
        "wrong width": rng.normal(size=(12, 2, 4)),
        "2-d": rng.normal(size=(12, 3)),
        "nan": np.full((12, 2, 3), np.nan),
    }[shape]
    with pytest.raises(ValueError, match="views"):
        BalancedSoftmaxClassifier(**FAST).fit(X, y, views=views)
    model = BalancedSoftmaxClassifier(**FAST).fit(X, y)
    with pytest.raises(ValueError, match="views"):
        model.predict(X, views=views)
