import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ltlearn.exceptions import FeatureFileError
from ltlearn.features import (
    FeatureFile,
    FeatureWriter,
    read_features,
    read_metadata,
    write_features,
)

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.h5"
    X = rng.normal(size=(50, 8))
    y = rng.integers(0, 3, 50)
    ids = [f"img/{i:03d}.jpg" for i in range(50)]
    write_features(
        path,
        {"train": (X, y, ids), "test": (X[:10], y[:10])},
        CLASSES,
        attrs={"backbone": "toy", "preprocessing": "none"},
    )
    return path, X, y, ids


def test_round_trip(small_file):
    path, X, y, ids = small_file
    X_read, y_read = read_features(path, "train")
    assert X_read.dtype == np.float32
    np.testing.assert_allclose(X_read, X.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(y_read, y)
    with FeatureFile(path) as f:
        assert f.classes == CLASSES
        assert set(f.splits) == {"train", "test"}
        assert f.ids("train").tolist() == ids
        assert f.ids("test") is None
        assert (
            f.attrs["backbone"] == "toy" and "created" in f.attrs and "ltlearn_version" in f.attrs
        )
        chunks = list(f.iter_chunks("train", chunk_rows=16))
        assert [len(c[1]) for c in chunks] == [16, 16, 16, 2]
        np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), X_read)
        np.testing.assert_array_equal(f.read("train", start=10, stop=20)[1], y[10:20])
    meta = read_metadata(path)
    assert meta["splits"]["train"] == {
        "n_rows": 50,
        "n_features": 8,
        "dtype": "float16",
        "has_ids": True,
    }
    with h5py.File(path) as f:
        assert f["train/features"].compression == "gzip" and f["train/features"].chunks is not None


def test_float32_storage(tmp_path):
    X = np.array([[1.0 + 1e-6, 2.0]])
    write_features(tmp_path / "f.h5", {"train": (X, [0])}, ["a"], dtype="float32")
    assert read_features(tmp_path / "f.h5")[0][0, 0] == np.float32(1.0 + 1e-6)


def test_reader_ignores_unfinished_rows_and_append_overwrites_them(small_file):
    path = small_file[0]
    with h5py.File(path, "r+") as f:  # a writer that died after writing data, before n_rows
        for name in ("features", "labels", "ids"):
            f["train"][name].resize(60, axis=0)
        f["train/labels"][50:60] = 2
    assert len(read_features(path, "train")[1]) == 50
    with FeatureWriter(path, classes=CLASSES, attrs={"backbone": "toy"}, mode="a") as w:
        assert w.n_rows("train") == 50
        w.append("train", np.zeros((5, 8)), [0] * 5, ids=[f"new/{i}" for i in range(5)])
    X, y = read_features(path, "train")
    assert len(y) == 55 and y[50:].tolist() == [0] * 5
    with FeatureFile(path) as f:
        assert f.ids("train")[-1] == "new/4"


WRITER = """
import sys, time, numpy as np
from ltlearn.features import FeatureWriter
with FeatureWriter(sys.argv[1], classes=["a", "b"], attrs={"backbone": "toy"}, mode="a") as w:
    for block in range(w.n_rows("train") // 100, 50):
        w.append("train", np.full((100, 4), block), np.full(100, block % 2),
                 ids=[f"{block}/{i}" for i in range(100)])
        print(block, flush=True)
        time.sleep(0.02)
"""


def test_killed_writer_resumes_without_missing_or_duplicated_rows(tmp_path):
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    with FeatureFile(path) as f:
        done = f.n_rows("train")
        X, _ = f.read("train")
    assert 500 <= done < 5000 and done % 100 == 0
    np.testing.assert_array_equal(X[::100, 0], np.arange(done // 100))
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, capture_output=True)
    with FeatureFile(path) as f:
        X, y = f.read("train")
        ids = f.ids("train")
    assert len(y) == 5000
    np.testing.assert_array_equal(X[:, 0], np.repeat(np.arange(50), 100))
    assert len(set(ids)) == 5000


def test_writer_refuses_to_overwrite_or_mix_backbones(small_file):
    path = small_file[0]
    with pytest.raises(FileExistsError, match="already exists.*mode='a'"):
        FeatureWriter(path, classes=CLASSES)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_features(path, {"train": (np.zeros((1, 8)), [0])}, CLASSES)
    with pytest.raises(FeatureFileError, match="backbone='toy', this writer has backbone='clip'"):
        FeatureWriter(path, classes=CLASSES, attrs={"backbone": "clip"}, mode="a")
    with pytest.raises(FeatureFileError, match="classes"):
        FeatureWriter(path, classes=["x", "y", "z"], mode="a")
    with (
        FeatureWriter(path, classes=CLASSES, mode="a") as w,
        pytest.raises(ValueError, match="8-d"),
    ):
        w.append("train", np.zeros((1, 4)), [0], ids=["x"])


def test_atomic_overwrite_keeps_the_old_file_when_writing_fails(small_file):
    path, X, y, _ = small_file
    with pytest.raises(ValueError, match="NaN"):
        write_features(path, {"train": (np.full((2, 8), np.nan), [0, 1])}, CLASSES, overwrite=True)
    np.testing.assert_array_equal(read_features(path, "train")[1], y)
    assert not list(path.parent.glob(".*tmp"))
    write_features(path, {"train": (np.zeros((2, 8)), [0, 1])}, CLASSES, overwrite=True)
    assert len(read_features(path, "train")[1]) == 2


def test_bad_appends_are_clear_errors(tmp_path):
    with FeatureWriter(tmp_path / "f.h5", classes=["a", "b"]) as w:
        with pytest.raises(ValueError, match=r"labels must lie in 0..1"):
            w.append("train", np.zeros((2, 3)), [0, 2])
        with pytest.raises(ValueError, match="labels has shape"):
            w.append("train", np.zeros((2, 3)), [0])


def test_missing_foreign_truncated_and_corrupt_files(small_file, tmp_path):
    path = small_file[0]
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_features(tmp_path / "nope.h5")
    with pytest.raises(FeatureFileError, match="has no split 'val'; its splits are"):
        read_features(path, "val")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(FeatureFileError, match="notes.h5.*not an HDF5 file"):
        read_features(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(FeatureFileError, match="foreign.h5.*no '/classes'"):
        read_features(foreign)
    truncated = tmp_path / "truncated.h5"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match="truncated"):
        read_features(truncated)
    lying = tmp_path / "lying.h5"
    shutil.copy(path, lying)
    with h5py.File(lying, "r+") as f:
        f["train"].attrs["n_rows"] = 500
    with pytest.raises(FeatureFileError, match="corrupt: split 'train' claims 500"):
        read_features(lying)
    bad_labels = tmp_path / "bad_labels.h5"
    shutil.copy(path, bad_labels)
    with h5py.File(bad_labels, "r+") as f:
        f["train/labels"][0] = 7
    with pytest.raises(FeatureFileError, match="outside 0..2"):
        read_features(bad_labels)


def test_reads_the_shared_feature_file(cifar_features):
    meta = read_metadata(cifar_features)
    assert meta["classes"][:2] == ["airplane", "automobile"]
    assert meta["splits"]["test"]["n_rows"] == 10000
    with FeatureFile(cifar_features) as f:
        X, y = f.read("test", stop=100)
        assert X.shape == (100, 1280) and X.dtype == np.float32
        assert f.ids("test", stop=1)[0].startswith("test/")
