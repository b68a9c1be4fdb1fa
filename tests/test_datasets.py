import numpy as np
import pytest

from ltlearn.datasets import (
    load_long_tailed_digits,
    long_tail_counts,
    long_tailed_subset,
    make_long_tailed_embeddings,
    shifted_test_subsets,
    train_val_split,
)
from ltlearn.features import FeatureFile


def test_exponential_profile_is_the_cifar_lt_protocol():
    assert long_tail_counts(5000, 10, 100).tolist() == [
        5000,
        2997,
        1796,
        1077,
        645,
        387,
        232,
        139,
        83,
        50,
    ]
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5 and np.all(np.diff(counts) <= 0)


def test_step_profile():
    assert (
        long_tail_counts(100, 10, 10, profile="step", step_fraction=0.3).tolist()
        == [100] * 7 + [10] * 3
    )


def test_long_tailed_subset_sizes_order_and_seed():
    y = np.repeat(np.arange(5), 200)
    idx = long_tailed_subset(y, 20, random_state=0)
    assert np.bincount(y[idx]).tolist() == long_tail_counts(200, 5, 20).tolist()
    assert np.array_equal(idx, long_tailed_subset(y, 20, random_state=0))
    assert not np.array_equal(idx, long_tailed_subset(y, 20, random_state=1))
    assert len(np.unique(idx)) == len(idx)
    reordered = long_tailed_subset(y, 20, class_order=[4, 3, 2, 1, 0], random_state=0)
    assert np.bincount(y[reordered])[::-1].tolist() == long_tail_counts(200, 5, 20).tolist()


def test_long_tailed_subset_errors_name_the_class():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="Class 0 has 10 samples .* needs 20"):
        long_tailed_subset(y, 2, n_max=20)
    with pytest.raises(ValueError, match="class_order must list every class"):
        long_tailed_subset(y, 2, class_order=[0, 2])


def test_shifted_test_subsets_follow_sades_protocol():
    y = np.repeat(np.arange(10), 1000)
    sets = shifted_test_subsets(y)
    assert list(sets) == [
        "forward_50",
        "forward_25",
        "forward_10",
        "forward_5",
        "forward_2",
        "uniform",
        "backward_2",
        "backward_5",
        "backward_10",
        "backward_25",
        "backward_50",
    ]
    assert np.bincount(y[sets["forward_50"]]).tolist() == long_tail_counts(1000, 10, 50).tolist()
    assert (
        np.bincount(y[sets["backward_50"]]).tolist()
        == long_tail_counts(1000, 10, 50)[::-1].tolist()
    )
    assert len(sets["uniform"]) == len(y)


def test_train_val_split_keeps_every_class_in_training():
    y = np.array([0] * 50 + [1] * 5 + [2] * 2 + [3])
    with pytest.warns(UserWarning, match=r"single sample .*\[3\]"):
        train, val = train_val_split(y, val_size=0.2, random_state=0)
    assert np.bincount(y[train], minlength=4).tolist() == [40, 4, 1, 1]
    assert np.bincount(y[val], minlength=4).tolist() == [10, 1, 1, 0]
    assert len(np.intersect1d(train, val)) == 0


def test_long_tailed_digits():
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    counts = data.class_counts
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.15)
    assert np.bincount(data.y_test).min() >= 85
    assert data.X_train.shape[1] == 64


def test_synthetic_embeddings_are_deterministic_and_long_tailed(tmp_path):
    X, y = make_long_tailed_embeddings(
        3000, 16, 20, imbalance_ratio=50, random_state=3, block_rows=1000
    )
    X2, y2 = make_long_tailed_embeddings(
        3000, 16, 20, imbalance_ratio=50, random_state=3, block_rows=1000
    )
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    counts = np.bincount(y)
    assert counts.sum() == 3000 and X.dtype == np.float32
    assert counts[0] / counts[-1] == pytest.approx(50, rel=0.1)
    assert np.all(np.diff(counts) <= 0)  # class 0 largest, class 19 smallest
    # Unit class means plus noise of norm about one.
    assert np.linalg.norm(X, axis=1).mean() == pytest.approx(np.sqrt(2), rel=0.1)
    path = make_long_tailed_embeddings(
        3000,
        16,
        20,
        imbalance_ratio=50,
        random_state=3,
        block_rows=1000,
        path=tmp_path / "s.h5",
    )
    with FeatureFile(path) as f:
        X_file, y_file = f.read("train")
    np.testing.assert_array_equal(y_file, y)
    np.testing.assert_allclose(X_file, X, atol=2e-3)  # float16 on disk
