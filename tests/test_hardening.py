"""Hostile inputs: extreme magnitudes, foreign or unfinished files, bad parameters.

Each test pins down a failure that a hostile-input run found; the property-based
test at the end feeds every public estimator small random shapes and extreme
values and requires a fit with finite probabilities, or a ValueError / TypeError.
"""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltlearn import (
    BalancedSoftmaxClassifier,
    DecoupledClassifier,
    PRLClassifier,
    RIDEClassifier,
    SADEClassifier,
    SHIKEClassifier,
)
from ltlearn.exceptions import FeatureFileError, TrainingDivergedError
from ltlearn.features import FeatureFile, FeatureWriter, read_features, write_features

FAST = dict(device="cpu", random_state=0)


@pytest.fixture(scope="module")
def fitted(digits):
    return {
        "bs": BalancedSoftmaxClassifier(**FAST).fit(digits.X_train, digits.y_train),
        "prl": PRLClassifier(**FAST).fit(digits.X_train, digits.y_train),
        "sade": SADEClassifier(**FAST).fit(digits.X_train, digits.y_train),
    }


@pytest.mark.parametrize("name", ["bs", "prl", "sade"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30, 1e-40])
def test_l2_models_ignore_the_scale_of_a_row(fitted, digits, name, scale):
    model = fitted[name]
    X = digits.X_test.astype(np.float32)
    np.testing.assert_array_equal(model.predict(X * np.float32(scale)), model.predict(X))
    assert np.all(np.isfinite(model.predict_proba(X * np.float32(scale))))


def test_fit_on_rescaled_data_is_the_same_fit(digits):
    X, y = digits.X_train.astype(np.float32), digits.y_train
    plain = BalancedSoftmaxClassifier(**FAST).fit(X, y)
    scaled = BalancedSoftmaxClassifier(**FAST).fit(X * np.float32(1e20), y)
    np.testing.assert_array_equal(
        scaled.predict(digits.X_test * 1e20), plain.predict(digits.X_test)
    )


def test_values_beyond_float32_are_refused_not_turned_into_nan(fitted, digits):
    with pytest.raises(ValueError, match="beyond the float32 range"):
        fitted["bs"].predict_proba(digits.X_test * 1e39)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        BalancedSoftmaxClassifier(**FAST).fit(digits.X_train * 1e39, digits.y_train)


def test_standardisation_near_the_float32_limit_stays_finite():
    rng = np.random.default_rng(0)
    top = np.finfo(np.float32).max
    X = (rng.choice([-1, 1], (120, 6)) * top * rng.uniform(0.9, 1.0, (120, 6))).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)
    for head in ("linear", "mlp"):
        model = BalancedSoftmaxClassifier(normalize="standard", head=head, **FAST).fit(X, y)
        assert np.all(np.isfinite(model.predict_proba(X)))
        assert model.score(X, y) > 0.9


def test_unnormalised_overflow_is_an_error_not_nan(digits):
    model = BalancedSoftmaxClassifier(normalize=None, **FAST).fit(digits.X_train, digits.y_train)
    weights = model.module_.head.weight.detach().numpy()
    # Finite features aligned with the heaviest class's weights: that logit exceeds 3.4e38.
    heaviest = np.argmax(np.abs(weights).sum(axis=1))
    X = np.float32(3e38) * np.sign(weights[heaviest])[None, :]
    assert np.abs(weights[heaviest]).sum() > 1.2
    with pytest.raises(ValueError, match="overflowed float32"):
        model.predict_proba(X)
    with pytest.raises(TrainingDivergedError, match="diverged"):
        BalancedSoftmaxClassifier(normalize=None, lr=1e30, **FAST).fit(
            digits.X_train, digits.y_train
        )


def test_parameters_read_at_predict_time_are_checked_by_fit(digits):
    with pytest.raises(ValueError, match="test_prior has shape"):
        BalancedSoftmaxClassifier(test_prior=[1, 2], **FAST).fit(digits.X_train, digits.y_train)
    with pytest.raises(ValueError, match="preference must hold 3 weights"):
        PRLClassifier(preference=(1, 2), **FAST).fit(digits.X_train, digits.y_train)


def test_empty_preference_list_is_a_clear_error(fitted, digits):
    with pytest.raises(ValueError, match="preferences is empty"):
        fitted["prl"].predict_many(digits.X_test, [])


def test_float16_overflow_is_refused_naming_the_rows(tmp_path):
    X = np.ones((4, 3))
    X[2, 1] = 1e5
    with pytest.raises(ValueError, match=r"beyond the float16 range .* rows \[2\].*float32"):
        write_features(tmp_path / "f.h5", {"train": (X, [0, 1, 0, 1])}, classes=["a", "b"])
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    write_features(tmp_path / "f.h5", {"train": (X, [0, 1, 0, 1])}, ["a", "b"], dtype="float32")
    assert read_features(tmp_path / "f.h5")[0][2, 1] == 1e5


def test_an_unfinished_file_says_it_can_be_resumed(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, classes=["a", "b"], attrs={"backbone": "toy"}) as writer:
        writer.record_progress("train", items_done=0)
    with pytest.raises(FeatureFileError, match="holds no rows yet.*Run the same extract again"):
        FeatureFile(path)
    with FeatureWriter(path, classes=["a", "b"], attrs={"backbone": "toy"}, mode="a") as writer:
        writer.append("train", np.ones((2, 3)), [0, 1])
    assert read_features(path)[0].shape == (2, 3)


def test_a_killed_overwrite_leaves_no_temporary_file_for_long(tmp_path):
    path = tmp_path / "f.h5"
    code = (
        "import os, numpy as np\n"
        "from ltlearn.features import FeatureWriter\n"
        f"w = FeatureWriter({str(path)!r}, classes=['a'], mode='w')\n"
        "w.append('train', np.ones((3, 2)), [0, 0, 0])\n"
        "os._exit(1)\n"  # dies without closing, as a kill would
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    assert len(list(tmp_path.glob(".f.h5.*.tmp"))) == 1
    write_features(path, {"train": (np.ones((2, 2)), [0, 0])}, classes=["a"])
    assert not list(tmp_path.glob(".f.h5.*.tmp"))
    assert os.path.exists(path)


def test_fractional_float_labels_in_a_foreign_file_are_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "classes", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype()
        )
        f.create_dataset("train/features", data=np.ones((3, 2)))
        f.create_dataset("train/labels", data=np.array([0.0, 1.0, 1.0]))
    assert read_features(path)[1].tolist() == [0, 1, 1]
    with h5py.File(path, "a") as f:
        f["train/labels"][1] = 0.5
    with pytest.raises(FeatureFileError, match="not whole numbers"):
        read_features(path)


ESTIMATORS = {
    "balanced_softmax_l2": lambda: BalancedSoftmaxClassifier(max_epochs=3, **FAST),
    "balanced_softmax_standard_mlp": lambda: BalancedSoftmaxClassifier(
        normalize="standard", head="mlp", hidden_size=8, max_epochs=3, **FAST
    ),
    "balanced_softmax_cosine": lambda: BalancedSoftmaxClassifier(
        head="cosine", max_epochs=3, **FAST
    ),
    "prl": lambda: PRLClassifier(max_epochs=3, **FAST),
    "sade": lambda: SADEClassifier(max_epochs=3, **FAST),
    "ride": lambda: RIDEClassifier(adapter_size=4, max_epochs=3, **FAST),
    "decoupled_lws": lambda: DecoupledClassifier("lws", max_epochs=3, **FAST),
    "shike": lambda: SHIKEClassifier(adapter_size=4, max_epochs=3, **FAST),
}

magnitudes = st.sampled_from([1.0, 1e-40, 1e-30, 1e-8, 1e8, 1e20, 1e30, 1e38, 3e38])


@st.composite
def problems(draw):
    n_samples = draw(st.integers(2, 24))
    n_features = draw(st.integers(1, 5))
    n_classes = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_classes
    X = rng.standard_normal((n_samples, n_features))
    # Each row and each column at its own extreme scale, some rows all zero.
    X *= np.array([draw(magnitudes) for _ in range(n_samples)])[:, None]
    if draw(st.booleans()):
        X[draw(st.integers(0, n_samples - 1))] = 0.0
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return X.astype(dtype), y


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_estimators_fit_or_refuse_clearly_never_nan(name, problem):
    X, y = problem
    model = ESTIMATORS[name]()
    try:
        model.fit(X, y)
        proba = model.predict_proba(X)
    except (ValueError, TypeError) as exc:
        assert str(exc)  # an error that says something
        return
    assert proba.shape == (len(X), len(np.unique(y)))
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
