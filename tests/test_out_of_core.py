"""Fitting from feature files larger than memory: streamed blocks against in-memory arrays."""

import hashlib

import h5py
import numpy as np
import pytest

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier, RIDEClassifier
from ltlearn.features import FeatureFile, FeatureSplit, FeatureWriter, read_features

FAST = dict(device="cpu", random_state=0)


def _write(path, data, chunk_rows):
    with FeatureWriter(
        path, classes=[str(c) for c in range(10)], dtype="float32", chunk_rows=chunk_rows
    ) as w:
        w.append("train", data.X_train, data.y_train)
        w.append("test", data.X_test, data.y_test)
    return path


@pytest.fixture(scope="module")
def one_block(digits, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ooc") / "one.h5", digits, chunk_rows=4096)


@pytest.fixture(scope="module")
def many_blocks(digits, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ooc") / "many.h5", digits, chunk_rows=32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BalancedSoftmaxClassifier(**FAST),
        lambda: BalancedSoftmaxClassifier(balanced_sampling=True, tau=0.0, **FAST),
        lambda: PRLClassifier(max_epochs=5, **FAST),
    ],
)
def test_one_block_trains_exactly_as_in_memory(one_block, make):
    """All rows in one block: the same batches in the same order as the in-memory fit."""
    X, y = read_features(one_block, "train")
    X_test, _ = read_features(one_block, "test")
    in_memory = make().fit(X, y)
    with FeatureFile(one_block) as f:
        split = f["train"]
        assert len(split.chunk_slices()) == 1
        streamed = make().fit(split)  # y from the file
    np.testing.assert_allclose(
        streamed.decision_function(X_test), in_memory.decision_function(X_test), atol=1e-5
    )
    assert streamed.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(streamed.classes_, in_memory.classes_)


def test_many_blocks_reach_the_in_memory_accuracy(many_blocks):
    X, y = read_features(many_blocks, "train")
    X_test, y_test = read_features(many_blocks, "test")
    in_memory = BalancedSoftmaxClassifier(**FAST).fit(X, y).score(X_test, y_test)
    with FeatureFile(many_blocks) as f:
        split = FeatureSplit(f, "train", block_chunks=3, prefetch=1)
        assert len(split.chunk_slices()) > 3 * split.block_chunks
        streamed = BalancedSoftmaxClassifier(**FAST).fit(split, y)
        # Shuffled by chunk and within blocks: other batches, the same accuracy within noise.
        assert streamed.score(X_test, y_test) == pytest.approx(in_memory, abs=0.03)
        # The standardisation statistics of one streaming pass are the in-memory ones.
        standard = BalancedSoftmaxClassifier(normalize="standard", max_epochs=1, **FAST)
        norm = standard.fit(split).module_.normalizer
    ref = BalancedSoftmaxClassifier(normalize="standard", max_epochs=1, **FAST).fit(X, y)
    np.testing.assert_allclose(norm.shift, ref.module_.normalizer.shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.inv_std, ref.module_.normalizer.inv_std, rtol=1e-5)


def test_blocks_visit_every_row_once_in_the_order_given(many_blocks):
    with FeatureFile(many_blocks) as f:
        split = FeatureSplit(f, "train", block_chunks=2, prefetch=2)
        X, _ = f.read("train")
        n_chunks = len(split.chunk_slices())
        order = np.random.default_rng(0).permutation(n_chunks)
        blocks = list(split.blocks(order))
    rows = np.concatenate([r for r, _ in blocks])
    assert sorted(rows.tolist()) == list(range(len(X)))
    assert max(len(r) for r, _ in blocks) <= 2 * 32
    first = split.chunk_slices()[order[0]]
    np.testing.assert_array_equal(blocks[0][0][:32], np.arange(*first))
    for r, block in blocks:
        np.testing.assert_array_equal(block, X[r])


def test_a_read_only_file_is_never_written(many_blocks):
    before = hashlib.sha256(many_blocks.read_bytes()).hexdigest()
    with h5py.File(many_blocks, "r") as f:
        y = f["train/labels"][()]
        model = BalancedSoftmaxClassifier(max_epochs=2, **FAST).fit(f["train/features"], y)
        assert model.n_features_in_ == 64
        assert model.predict(f["test/features"]).shape == (f["test/features"].shape[0],)
    assert hashlib.sha256(many_blocks.read_bytes()).hexdigest() == before


def test_streaming_errors_name_the_problem(many_blocks, tmp_path):
    with FeatureFile(many_blocks) as f:
        with pytest.raises(ValueError, match="RIDEClassifier needs X in memory"):
            RIDEClassifier(**FAST).fit(f["train"])
        with pytest.raises(ValueError, match="y has 3 labels"):
            BalancedSoftmaxClassifier(**FAST).fit(f["train"], [0, 1, 2])
    with h5py.File(many_blocks, "r") as f:
        with pytest.raises(ValueError, match="y is needed"):
            BalancedSoftmaxClassifier(**FAST).fit(f["train/features"])
    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as f:
        X = np.ones((100, 4), np.float32)
        X[57, 2] = np.nan
        f.create_dataset("X", data=X, chunks=(10, 4))
        with pytest.raises(ValueError, match=r"NaN or infinite features in rows \[57\]"):
            BalancedSoftmaxClassifier(**FAST).fit(f["X"], np.arange(100) % 2)
    with pytest.raises(TypeError, match="FeatureSplit reads a FeatureFile or an h5py.Dataset"):
        FeatureSplit(np.ones((3, 2)))
