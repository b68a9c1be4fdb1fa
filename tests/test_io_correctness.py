"""Issue 27, feature files: merged files, overwrites, empty splits, damage, concurrent writers."""

import json
import os
import shutil
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.cli import main
from ltlearn.datasets import make_long_tailed_embeddings
from ltlearn.exceptions import FeatureFileError
from ltlearn.features import (
    FeatureFile,
    FeatureSplit,
    FeatureWriter,
    merge,
    read_features,
    write_features,
)
from ltlearn.features.io import _remove_stale_temporaries

CLASSES = ["a", "b", "c"]
FAST = dict(device="cpu", random_state=0, max_epochs=1)


def _shard(
    path, rows, *, width=4, seed=0, views=0, ids=True, groups=None, attrs=None, **writer_params
):
    """A shard file as extract(shard=...) writes it; returns its features, labels, views."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, width)).astype(np.float32)
    y = rng.integers(0, len(CLASSES), rows)
    V = rng.normal(size=(rows, views, width)).astype(np.float32) if views else None
    attrs = {"backbone": "toy", "shard": f"{seed}/9", **(attrs or {})}
    writer_params = {"dtype": "float32", **writer_params}
    with FeatureWriter(path, classes=CLASSES, attrs=attrs, **writer_params) as w:
        if groups is not None:
            w.set_feature_groups(groups)
        if rows:
            w.append(
                "train",
                X,
                y,
                ids=[f"{seed}/{i}" for i in range(rows)] if ids else None,
                views=V,
                progress={"skipped": [f"{seed}/bad.jpg"]},
            )
    return X, y, V


@pytest.fixture
def shards(tmp_path):
    paths = [tmp_path / f"s{i}.h5" for i in range(2)]
    data = [_shard(p, 5 + i, seed=i) for i, p in enumerate(paths)]
    return paths, data


# Item 3: a merged file whose shard is missing read back as zeros.


def test_a_merged_file_with_a_missing_shard_is_an_error_naming_it(shards, tmp_path):
    paths, data = shards
    merged = merge(paths, tmp_path / "m.h5")
    np.testing.assert_array_equal(read_features(merged)[1], np.concatenate([y for _, y, _ in data]))
    paths[1].rename(tmp_path / "elsewhere.h5")
    with pytest.raises(FeatureFileError, match=r"shard '.*s1\.h5', which is missing"):
        FeatureFile(merged)
    with pytest.raises(FeatureFileError, match=r"s1\.h5"):
        read_features(merged)
    # A streamed fit straight from the h5py data set checks its sources too.
    with h5py.File(merged, "r") as f, pytest.raises(FeatureFileError, match=r"s1\.h5"):
        BalancedSoftmaxClassifier(**FAST).fit(f["train/features"], np.arange(11) % 3)


def test_a_merged_file_whose_shard_lost_rows_is_an_error(shards, tmp_path):
    paths, _ = shards
    merged = merge(paths, tmp_path / "m.h5")
    write_features(paths[0], {"train": (np.ones((2, 4)), [0, 1])}, CLASSES, overwrite=True)
    with pytest.raises(FeatureFileError, match=r"s0\.h5.*does not hold"):
        FeatureFile(merged)


def test_a_merged_file_moved_with_its_shards_still_reads(shards, tmp_path):
    """HDF5 finds shards beside the merged file; the check must look there too."""
    paths, data = shards
    merge(paths, tmp_path / "m.h5")
    moved = shutil.move(tmp_path, tmp_path.with_name(tmp_path.name + "_moved"))
    X, _ = read_features(os.path.join(moved, "m.h5"))
    np.testing.assert_array_equal(X, np.concatenate([X for X, _, _ in data]))


def test_rows_a_merged_file_cannot_find_read_as_invalid_not_as_zeros(shards, tmp_path):
    paths, _ = shards
    merged = merge(paths, tmp_path / "m.h5")
    with h5py.File(merged, "r") as f:
        assert np.isnan(f["train/features"].fillvalue)
        assert f["train/labels"].fillvalue == -1


# Item 4: merging into one of the shards destroyed it.


def test_merge_refuses_to_write_over_one_of_its_shards(shards, tmp_path, capsys):
    paths, data = shards
    before = read_features(paths[0])
    with pytest.raises(ValueError, match=r"merge into '.*s0\.h5': it is shard"):
        merge([paths[0]], paths[0], overwrite=True)
    with pytest.raises(ValueError, match="it is shard"):
        merge(paths, paths[1], overwrite=True)
    link = tmp_path / "link.h5"
    link.symlink_to(paths[0])
    with pytest.raises(ValueError, match="it is shard"):
        merge(paths, link, overwrite=True)
    with pytest.raises(ValueError, match="are the same file"):
        merge([paths[0], link], tmp_path / "m.h5")
    args = ["merge", "--overwrite", str(paths[0]), str(paths[0]), str(paths[1])]
    assert main(args) == 1
    assert "it is shard" in capsys.readouterr().err
    for got, expected in zip(read_features(paths[0]), before, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.tmp"))


def test_merge_refuses_to_write_over_a_file_a_shard_refers_to(shards, tmp_path):
    paths, _ = shards
    inner = merge(paths, tmp_path / "inner.h5")
    with pytest.raises(ValueError, match=r"holds rows referred to by shard '.*inner\.h5'"):
        merge([inner], paths[0], overwrite=True)
    assert len(read_features(inner)[1]) == 11


# Item 5: merge dropped views; it must keep layer groups and provenance too.


def test_merge_keeps_views_feature_groups_provenance_and_skipped_ids(tmp_path):
    groups = [("model.layer1", 3), ("embedding", 2)]
    attrs = {"weights": "w.pt", "layers": json.dumps(["model.layer1"])}
    paths = [tmp_path / f"s{i}.h5" for i in range(3)]
    data = [
        _shard(p, rows, width=5, seed=i, views=2, groups=groups, attrs=attrs)
        for i, (p, rows) in enumerate(zip(paths, [4, 1, 3], strict=True))
    ]
    merged = merge(paths, tmp_path / "m.h5")
    with FeatureFile(merged) as f:
        assert f.feature_groups == groups
        assert f.attrs["backbone"] == "toy" and f.attrs["weights"] == "w.pt"
        assert f.attrs["layers"] == attrs["layers"] and "shard" not in f.attrs
        assert "created" in f.attrs and list(f.attrs["merged_from"]) == ["s0.h5", "s1.h5", "s2.h5"]
        np.testing.assert_array_equal(f.views("train"), np.concatenate([d[2] for d in data]))
        embedding = np.concatenate([d[0][:, 3:] for d in data])
        np.testing.assert_array_equal(f.read("train", groups=["embedding"])[0], embedding)
        ids = [f"{i}/{r}" for i, n in enumerate([4, 1, 3]) for r in range(n)]
        assert f.ids("train").tolist() == ids
        skipped = list(f._file["train"].attrs["skipped"])
        assert skipped == ["0/bad.jpg", "1/bad.jpg", "2/bad.jpg"]
        assert f._file["train/views"].is_virtual


# Merge errors that surfaced numpy or h5py internals.


def test_merge_errors_name_the_shards(tmp_path):
    _shard(tmp_path / "four.h5", 3, width=4)
    _shard(tmp_path / "six.h5", 3, width=6, seed=1)
    widths = r"'/train/features'.*\(4,\).*four\.h5.*\(6,\).*six\.h5"
    with pytest.raises(FeatureFileError, match=widths):
        merge([tmp_path / "four.h5", tmp_path / "six.h5"], tmp_path / "m.h5")
    _shard(tmp_path / "no_ids.h5", 3, seed=2, ids=False)
    with pytest.raises(FeatureFileError, match=r"'/train/ids'.*none in \[.*no_ids\.h5'\]"):
        merge([tmp_path / "four.h5", tmp_path / "no_ids.h5"], tmp_path / "m.h5")
    _shard(tmp_path / "views.h5", 3, seed=3, views=2)
    with pytest.raises(FeatureFileError, match=r"'/train/views'.*views\.h5"):
        merge([tmp_path / "four.h5", tmp_path / "views.h5"], tmp_path / "m.h5")
    _shard(tmp_path / "half.h5", 3, seed=4, dtype="float16")
    with pytest.raises(FeatureFileError, match=r"float16.*half\.h5"):
        merge([tmp_path / "four.h5", tmp_path / "half.h5"], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.tmp"))
    # Shards without ids at all are fine: so is the merged file.
    _shard(tmp_path / "no_ids_too.h5", 2, seed=5, ids=False)
    merged = merge([tmp_path / "no_ids.h5", tmp_path / "no_ids_too.h5"], tmp_path / "m.h5")
    with FeatureFile(merged) as f:
        assert f.ids("train") is None and f.n_rows("train") == 5


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    unfinished=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    width=st.integers(1, 5),
    n_views=st.integers(0, 2),
    grouped=st.booleans(),
    chunk_rows=st.integers(1, 4),
)
def test_merged_reads_equal_the_concatenated_shard_reads(
    tmp_path_factory, sizes, unfinished, width, n_views, grouped, chunk_rows
):
    folder = tmp_path_factory.mktemp("merge")
    groups = [("early", 1), ("embedding", width)] if grouped else None
    paths = [folder / f"s{i}.h5" for i in range(len(sizes))]
    for i, (path, rows) in enumerate(zip(paths, sizes, strict=True)):
        _shard(
            path,
            rows,
            width=width + grouped,
            seed=i,
            views=n_views,
            groups=groups,
            chunk_rows=chunk_rows,
        )
        with h5py.File(path, "r+") as f:  # rows of a writer that stopped: never merged
            for dataset in f["train"].values():
                dataset.resize(rows + unfinished[i], axis=0)
    merged = merge(paths, folder / "m.h5")
    shards = [FeatureFile(p) for p in paths]
    with FeatureFile(merged) as f:
        for read in (
            lambda g: g.read("train")[0],
            lambda g: g.read("train")[1],
            lambda g: g.ids("train"),
            lambda g: g.views("train"),
        ):
            parts = [read(s) for s in shards]
            expected = None if parts[0] is None else np.concatenate(parts)
            got = read(f)
            assert (got is None) == (expected is None)
            if got is not None:
                np.testing.assert_array_equal(got, expected)
        assert f.feature_groups == groups
        # A middle slice crosses shard boundaries like any other.
        X = np.concatenate([s.read("train")[0] for s in shards])
        np.testing.assert_array_equal(f.read("train", start=2, stop=7)[0], X[2:7])
        np.testing.assert_array_equal(np.asarray(f["train"]), X)
    for s in shards:
        s.close()


# Item 6: one overwrite rule for every writer.


def test_synthetic_embeddings_refuse_an_existing_file_without_overwrite(tmp_path):
    path = tmp_path / "s.h5"
    write_features(path, {"train": (np.ones((2, 3)), [0, 1])}, CLASSES)
    with pytest.raises(FileExistsError, match=r"s\.h5' already exists; pass overwrite=True"):
        make_long_tailed_embeddings(30, 3, 3, path=path)
    assert len(read_features(path)[1]) == 2
    make_long_tailed_embeddings(30, 3, 3, path=path, overwrite=True)
    assert len(read_features(path)[1]) == 30


@pytest.mark.parametrize(
    "write",
    [
        lambda p: make_long_tailed_embeddings(30, 3, 3, path=p, overwrite=True),
        lambda p: write_features(p, {"train": (np.ones((2, 3)), [0, 1])}, CLASSES, overwrite=True),
        lambda p: FeatureWriter(p, classes=CLASSES, mode="w"),
        lambda p: merge([p.parent / "s.h5"], p, overwrite=True),
    ],
)
def test_a_directory_as_output_is_refused_and_leaves_nothing(tmp_path, write):
    write_features(tmp_path / "s.h5", {"train": (np.ones((2, 3)), [0, 1])}, CLASSES)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"out' is a directory.*out/features\.h5"):
        write(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.h5"]
    assert not list(folder.iterdir())


def test_synthetic_embedding_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="n_samples=5 is less than n_classes=10"):
        make_long_tailed_embeddings(5, 4, 10)
    for noise in (1e40, np.inf, np.nan):
        with pytest.raises(ValueError, match=r"'noise' parameter .* range \[0.0, 1000"):
            make_long_tailed_embeddings(50, 4, 3, noise=noise)
    X, _ = make_long_tailed_embeddings(50, 1, 3, noise=1000, random_state=0)
    assert np.all(np.isfinite(X.astype(np.float16)))  # even as float16 in a file
    X, y = make_long_tailed_embeddings(3, 4, 3, random_state=0)
    assert sorted(y.tolist()) == [0, 1, 2]


# Empty splits and empty appends.


def test_appending_zero_rows_writes_nothing_but_records_progress(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, classes=CLASSES) as w:
        w.append("train", np.zeros((0, 4)), [], ids=[], progress={"items_done": 3})
        assert w.n_rows("train") == 0 and w.progress("train") == {"items_done": 3}
        w.append("train", np.ones((2, 4)), [0, 1], ids=["x", "y"])
        w.append("train", np.zeros((0, 4)), np.zeros(0, int), ids=[], views=np.zeros((0, 2, 4)))
        assert w.n_rows("train") == 2
    assert len(read_features(path)[1]) == 2


def test_fitting_a_split_without_rows_says_so(tmp_path):
    path = tmp_path / "f.h5"
    write_features(path, {"train": (np.ones((4, 3)), [0, 1, 2, 0])}, CLASSES)
    with h5py.File(path, "r+") as f:  # a writer killed before its first rows were complete
        f["train"].attrs["n_rows"] = 0
    with FeatureFile(path) as f:
        assert f.read("train")[0].shape == (0, 3)
        with pytest.raises(ValueError, match=r"split 'train' of '.*f\.h5' has no rows"):
            BalancedSoftmaxClassifier(**FAST).fit(f["train"])
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("X", shape=(0, 3), dtype=np.float32)
        with pytest.raises(ValueError, match="data set '/X' of .* has no rows"):
            BalancedSoftmaxClassifier(**FAST).fit(f["X"], np.zeros(0, int))
        with pytest.raises(ValueError, match="has no rows"):
            FeatureSplit(f["X"])


# Temporary files and damaged files.


def test_a_temporary_file_with_an_impossible_pid_is_removed(tmp_path):
    path = tmp_path / "f.h5"
    stale = tmp_path / f".f.h5.{'9' * 20}.tmp"
    stale.write_bytes(b"left by a writer that died")
    _remove_stale_temporaries(path)
    assert not stale.exists()
    stale.write_bytes(b"again")
    write_features(path, {"train": (np.ones((2, 3)), [0, 1])}, CLASSES)
    write_features(path, {"train": (np.ones((2, 3)), [0, 1])}, CLASSES, overwrite=True)
    assert not stale.exists()


FLIP_BYTES = """
import sys
from ltlearn.exceptions import FeatureFileError
from ltlearn.features import FeatureFile

data = open(sys.argv[1], "rb").read()
for position in range(0, int(sys.argv[3]), 11):
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    open(sys.argv[2], "wb").write(damaged)
    try:
        with FeatureFile(sys.argv[2]) as f:
            for split in f.splits:
                f.read(split), f.ids(split), list(f[split].blocks())
        outcome = "ok"
    except FeatureFileError:
        outcome = "FeatureFileError"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(position, outcome, flush=True)
"""


def test_a_damaged_file_raises_feature_file_errors_only(tmp_path):
    """Flip one byte at a time through the file's metadata: a FeatureFileError or a clean read.

    HDF5 itself may crash on some damage, so the flips run in a child process
    and only the outcomes it printed are judged.
    """
    rng = np.random.default_rng(0)
    path = tmp_path / "f.h5"
    ids = [f"img/{i}.jpg" for i in range(200)]
    write_features(
        path, {"train": (rng.normal(size=(200, 8)), rng.integers(0, 3, 200), ids)}, CLASSES
    )
    result = subprocess.run(
        # The first 8,000 bytes hold the file's structure: superblock, object headers, heaps.
        [sys.executable, "-c", FLIP_BYTES, str(path), str(tmp_path / "damaged.h5"), "8000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcomes = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert len(outcomes) > 100, result.stderr[-2000:]
    other = {
        pos: outcome
        for pos, outcome in outcomes.items()
        if outcome not in ("ok", "FeatureFileError")
    }
    assert not other


# Two writers of one file.


def test_a_second_writer_of_a_file_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, classes=CLASSES) as first:
        first.append("train", np.ones((2, 3)), [0, 1])
        for mode in ("a", "w"):
            with pytest.raises(
                FeatureFileError, match=r"f\.h5' is being written by another writer"
            ):
                FeatureWriter(path, classes=CLASSES, mode=mode)
        with pytest.raises(FeatureFileError, match="another writer"):
            write_features(path, {"train": (np.ones((1, 3)), [0])}, CLASSES, overwrite=True)
    assert not (tmp_path / ".f.h5.lock").exists()
    with FeatureWriter(path, classes=CLASSES, mode="a") as again:
        again.append("train", np.ones((1, 3)), [2])
    assert read_features(path)[1].tolist() == [0, 1, 2]
    # A refused append (other classes) releases the lock too.
    with pytest.raises(FeatureFileError, match="classes"):
        FeatureWriter(path, classes=["x", "y", "z"], mode="a")
    assert not list(tmp_path.glob(".*.lock"))


HOLD_WRITER = """
import sys, time, numpy as np
from ltlearn.features import FeatureWriter
with FeatureWriter(sys.argv[1], classes=["a", "b", "c"], mode="a") as w:
    w.append("train", np.ones((2, 3)), [0, 1])
    print("writing", flush=True)
    sys.stdin.readline()
"""


def test_writers_in_two_processes_exclude_each_other_without_hdf5_locking(tmp_path):
    path = tmp_path / "f.h5"
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "writing"
        with pytest.raises(FeatureFileError, match=rf"process {holder.pid} on host"):
            FeatureWriter(path, classes=CLASSES, mode="a")
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with FeatureWriter(path, classes=CLASSES, mode="a") as w:
        w.append("train", np.ones((1, 3)), [2])
    assert len(read_features(path)[1]) == 3


def test_a_lock_left_by_a_dead_writer_is_taken_over_but_not_one_from_another_host(tmp_path):
    path = tmp_path / "f.h5"
    lock = tmp_path / ".f.h5.lock"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    write_features(path, {"train": (np.ones((1, 3)), [0])}, CLASSES)
    assert not lock.exists()
    lock.write_text(f"not-{socket.gethostname()} 12345")
    with pytest.raises(
        FeatureFileError,
        match=r"process 12345 on host not-.*delete the lock file '.*\.f\.h5\.lock'",
    ):
        FeatureWriter(path, classes=CLASSES, mode="a")
    assert lock.exists()
