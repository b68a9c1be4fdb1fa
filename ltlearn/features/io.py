"""The HDF5 layout of ltlearn feature files.

=========================  ================================  ===================================
path                       shape, dtype                      meaning
=========================  ================================  ===================================
``/classes``               (n_classes,) UTF-8 strings        class names in label order
``/<split>/features``      (n, d) float16 or float32         one embedding per row, chunked,
                                                             compressed
``/<split>/labels``        (n,) int64                        index into ``/classes``
``/<split>/ids``           (n,) UTF-8 strings                optional: where each row came from
``/<split>/views``         (n, k, d) like features           optional: embeddings of k augmented
                                                             views
``/<split>`` attribute     ``n_rows``                        rows written and complete in that
                                                             split
``/<split>`` attribute     ``items_done``, ``skipped``       extraction progress and skipped
                                                             image ids
root attributes            strings                           provenance: ``backbone``,
                                                             ``weights``, ...
root ``feature_groups``    JSON ``[[name, width], ...]``     optional: the columns hold several
                                                             layers' pooled outputs side by
                                                             side, in this order
=========================  ================================  ===================================

Rows past ``n_rows`` were being written when a writer stopped; readers never
return them and an appending writer overwrites them, which makes writing
resumable.
"""

import datetime
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from ltlearn.exceptions import FeatureFileError

__all__ = [
    "FeatureFile",
    "FeatureSplit",
    "FeatureWriter",
    "read_features",
    "read_metadata",
    "write_features",
]

_READ_CHUNK_ROWS = 16384


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_h5(path, mode):
    """Open an HDF5 file, turning h5py's errors into ones that name the file."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise FileNotFoundError(f"Feature file {str(path)!r} does not exist.")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        text = str(exc)
        if "file signature not found" in text:
            reason = "is not an HDF5 file (no HDF5 signature); expected an ltlearn feature file"
        elif "truncated" in text:
            reason = "is truncated (the file is shorter than its header says); re-create it"
        else:
            reason = f"cannot be opened as HDF5 ({text})"
        raise FeatureFileError(f"Feature file {str(path)!r} {reason}.") from exc


class FeatureFile:
    """Read access to an ltlearn feature file, for data larger than memory too.

    Opening checks the layout; reading returns only complete rows, as float32
    by default (float16 on disk becomes float32 in memory).

    Parameters
    ----------
    path : str or path-like
        The ``.h5`` file.

    Attributes
    ----------
    path : pathlib.Path
    classes : list of str
        Class names in label order.
    attrs : dict
        Provenance attributes of the file.
    splits : list of str
        Names of the splits (``"train"``, ``"test"``, ...).
    feature_groups : list of (str, int) or None
        When the columns hold several layers of the backbone side by side
        (``extract(..., layers=...)``): each group's name and width, in
        column order, the final embedding (``"embedding"``) last. None for
        a single embedding.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> write_features(path, {"train": (np.ones((3, 2)), [0, 1, 1])}, classes=["a", "b"])
    >>> with FeatureFile(path) as f:
    ...     X, y = f.read("train")
    ...     print(f.splits, f.classes, X.dtype, y.tolist())
    ['train'] ['a', 'b'] float32 [0, 1, 1]
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = _open_h5(self.path, "r")
        try:
            self._check_layout()
        except BaseException:
            self._file.close()
            raise

    def _error(self, what):
        return FeatureFileError(f"Feature file {str(self.path)!r} {what}.")

    def _check_layout(self):
        f = self._file
        if "classes" not in f or not isinstance(f["classes"], h5py.Dataset):
            raise self._error(
                "is an HDF5 file but not an ltlearn feature file: it has no '/classes' data set"
            )
        try:
            self.classes = [_decode(c) for c in f["classes"][()]]
        except (OSError, TypeError, ValueError) as exc:
            raise self._error(f"has an unreadable '/classes' data set ({exc})") from exc
        self.attrs = {k: _decode(v) for k, v in f.attrs.items()}
        self.splits = [
            name
            for name, group in f.items()
            if isinstance(group, h5py.Group) and "features" in group and "labels" in group
        ]
        if not self.splits:
            if "ltlearn_version" in self.attrs:
                raise self._error(
                    "holds no rows yet: ltlearn created it, but its writer stopped before the "
                    "first rows were complete (an interrupted or failed extract?). Run the same "
                    "extract again to resume it, or delete the file"
                )
            raise self._error(
                "is an HDF5 file but not an ltlearn feature file: no group holds both "
                "'features' and 'labels'"
            )
        self.feature_groups = self._parse_feature_groups()
        for split in self.splits:
            self._check_split(split)

    def _parse_feature_groups(self):
        text = self.attrs.get("feature_groups")
        if text is None:
            return None
        try:
            groups = [(str(name), int(width)) for name, width in json.loads(text)]
        except (TypeError, ValueError) as exc:
            raise self._error(
                f"has an unreadable 'feature_groups' attribute {text!r} ({exc}); expected JSON "
                "[[name, width], ...]"
            ) from exc
        if not groups or any(width < 1 for _, width in groups):
            raise self._error(f"has a 'feature_groups' attribute without groups: {text!r}")
        return groups

    def _check_split(self, split):
        group = self._file[split]
        features, labels = group["features"], group["labels"]
        if features.ndim != 2:
            raise self._error(f"has '/{split}/features' of shape {features.shape}; expected 2-D")
        if labels.ndim != 1:
            raise self._error(f"has '/{split}/labels' of shape {labels.shape}; expected 1-D")
        n_rows = self.n_rows(split)
        lengths = {"features": features.shape[0], "labels": labels.shape[0]}
        for name in ("ids", "views"):
            if name in group:
                lengths[name] = group[name].shape[0]
        if self.feature_groups is not None:
            width = sum(w for _, w in self.feature_groups)
            if features.shape[1] != width:
                raise self._error(
                    f"is corrupt: its feature groups {self.feature_groups} add up to {width} "
                    f"columns, but split '{split}' has {features.shape[1]}"
                )
        short = {k: v for k, v in lengths.items() if v < n_rows}
        if short:
            raise self._error(
                f"is corrupt: split '{split}' claims {n_rows} complete rows but has only {short}"
            )

    def _group(self, split):
        if split not in self.splits:
            raise self._error(f"has no split {split!r}; its splits are {self.splits}")
        return self._file[split]

    def n_rows(self, split):
        """Number of complete rows in ``split``."""
        group = self._group(split)
        if "n_rows" in group.attrs:
            return int(group.attrs["n_rows"])
        # Files written by other tools: every stored row counts.
        return int(min(group["features"].shape[0], group["labels"].shape[0]))

    def n_features(self, split):
        """Width of the feature vectors of ``split``."""
        return int(self._group(split)["features"].shape[1])

    def _read(self, split, name, rows, dtype=None):
        dataset = self._group(split)[name]
        try:
            if dtype is not None and dataset.dtype != dtype:
                return dataset.astype(dtype)[rows]
            return dataset[rows]
        except (OSError, ValueError) as exc:
            raise self._error(
                f"could not be read at '/{split}/{name}' rows {rows.start}:{rows.stop} ({exc}); "
                "the file may be truncated or corrupt"
            ) from exc

    def _rows(self, split, start, stop):
        n_rows = self.n_rows(split)
        start = 0 if start is None else start
        stop = n_rows if stop is None else min(stop, n_rows)
        return slice(start, max(start, stop))

    def group_columns(self, groups):
        """Column indices of the named feature groups, in the order given.

        Parameters
        ----------
        groups : sequence of str
            Names from :attr:`feature_groups`.

        Returns
        -------
        columns : ndarray of int
        """
        if self.feature_groups is None:
            raise self._error(
                "has no feature groups (one embedding per row); extract with layers=[...] "
                "to store several layers"
            )
        names = [name for name, _ in self.feature_groups]
        bounds = np.cumsum([0] + [width for _, width in self.feature_groups])
        unknown = [g for g in groups if g not in names]
        if unknown:
            raise ValueError(f"Feature groups {unknown} are not in {str(self.path)!r}: {names}.")
        return np.concatenate(
            [np.arange(bounds[names.index(g)], bounds[names.index(g) + 1]) for g in groups]
        )

    def read(self, split="train", *, start=None, stop=None, dtype=np.float32, groups=None):
        """Features and labels of rows ``start:stop`` of a split.

        Parameters
        ----------
        split : str, default="train"
        start, stop : int, default=None
            Row range, clipped to the complete rows.
        dtype : numpy dtype, default=np.float32
            Type of the returned features.
        groups : sequence of str, default=None
            Only the columns of these feature groups (see
            :attr:`feature_groups`), in this order; None reads every column.

        Returns
        -------
        X : ndarray of shape (n_rows, n_features)
        y : ndarray of shape (n_rows,) of int64
        """
        rows = self._rows(split, start, stop)
        X = self._read(split, "features", rows, dtype)
        if groups is not None:
            X = X[:, self.group_columns(groups)]
        return X, self.labels(split, start=start, stop=stop)

    def labels(self, split="train", *, start=None, stop=None):
        """Labels of rows ``start:stop`` of a split, checked to be class indices.

        Returns
        -------
        y : ndarray of shape (n_rows,) of int64
        """
        y = self._read(split, "labels", self._rows(split, start, stop))
        if not np.issubdtype(y.dtype, np.integer):
            whole = np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
            if not whole:
                raise self._error(
                    f"has labels of type {y.dtype} in split '{split}' that are not whole "
                    "numbers; labels must be class indices"
                )
        y = y.astype(np.int64, copy=False)
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            raise self._error(
                f"has labels in split '{split}' outside 0..{len(self.classes) - 1} "
                f"(found {y.min()}..{y.max()})"
            )
        return y

    def ids(self, split="train", *, start=None, stop=None):
        """Row ids (e.g. image paths) of a split as str, or None when it has none."""
        if "ids" not in self._group(split):
            return None
        values = self._read(split, "ids", self._rows(split, start, stop))
        return np.array([_decode(v) for v in values], dtype=object)

    def views(self, split="train", *, start=None, stop=None, dtype=np.float32):
        """Embeddings of the augmented views of rows ``start:stop``, or None when there are none.

        Returns
        -------
        views : ndarray of shape (n_rows, n_views, n_features) or None
        """
        if "views" not in self._group(split):
            return None
        return self._read(split, "views", self._rows(split, start, stop), dtype)

    def iter_chunks(self, split="train", *, chunk_rows=_READ_CHUNK_ROWS, dtype=np.float32):
        """Yield ``(X, y)`` blocks of at most ``chunk_rows`` rows, in order.

        Memory stays bounded by one block whatever the size of the file.
        """
        n_rows = self.n_rows(split)
        for start in range(0, n_rows, chunk_rows):
            yield self.read(split, start=start, stop=start + chunk_rows, dtype=dtype)

    def __getitem__(self, split):
        """The split as a :class:`FeatureSplit`: what out-of-core fits take as ``X``."""
        return FeatureSplit(self, split)

    def close(self):
        """Close the file."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        rows = ", ".join(f"{s}={self.n_rows(s)}" for s in self.splits)
        return f"FeatureFile({str(self.path)!r}, classes={len(self.classes)}, {rows})"


class FeatureSplit:
    """The features of one split, read block by block: ``X`` for fits larger than memory.

    Estimators given a ``FeatureSplit`` (or an h5py data set) instead of an
    array stream it: each epoch visits the file's HDF5 chunks in a shuffled
    order, ``block_chunks`` of them at a time (a block), while a background
    thread reads up to ``prefetch`` blocks ahead; memory holds a few blocks,
    never the file. ``np.asarray(split)`` reads it whole.

    Parameters
    ----------
    source : FeatureFile or h5py.Dataset
        A feature file (then ``split`` names the split) or a 2-D data set.
    split : str, default="train"
    block_chunks : int, default=16
        HDF5 chunks per block (16,384 rows with the writer's 1,024-row chunks).
    prefetch : int, default=2
        Blocks read ahead of training.

    Attributes
    ----------
    shape : (int, int)
        Complete rows and features.
    labels : ndarray of int64 or None
        The split's labels (in memory; None for a bare data set).
    chunk_rows : int
        Rows per HDF5 chunk (the unit of shuffling).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> write_features(path, {"train": (np.eye(3), [0, 1, 1])}, classes=["a", "b"])
    >>> with FeatureFile(path) as f:
    ...     split = f["train"]
    ...     print(split.shape, split.labels.tolist(), np.asarray(split).sum())
    (3, 3) [0, 1, 1] 3.0
    """

    def __init__(self, source, split="train", *, block_chunks=16, prefetch=2):
        if isinstance(source, FeatureFile):
            self.name = f"{str(source.path)!r}, split {split!r}"
            self._features = source._group(split)["features"]
            n_rows = source.n_rows(split)
            self.labels = source.labels(split)
        elif isinstance(source, h5py.Dataset):
            if source.ndim != 2:
                raise ValueError(f"An h5py data set of features must be 2-D; got {source.shape}.")
            self.name = f"data set {source.name!r} of {source.file.filename!r}"
            self._features, n_rows, self.labels = source, source.shape[0], None
        else:
            raise TypeError(
                f"FeatureSplit reads a FeatureFile or an h5py.Dataset; got {type(source).__name__}."
            )
        self.shape = (int(n_rows), int(self._features.shape[1]))
        self.chunk_rows = int((self._features.chunks or (1024,))[0])
        self.block_chunks, self.prefetch = int(block_chunks), int(prefetch)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"FeatureSplit({self.name}, shape={self.shape})"

    def __array__(self, dtype=None, copy=None):
        return self.read(0, self.shape[0], dtype or np.float32)

    def read(self, start, stop, dtype=np.float32):
        """Rows ``start:stop`` as an array."""
        try:
            return np.asarray(self._features[start:stop], dtype=dtype)
        except (OSError, ValueError) as exc:
            raise FeatureFileError(
                f"Could not read rows {start}:{stop} of {self.name} ({exc}); the file may be "
                "truncated or corrupt."
            ) from exc

    def chunk_slices(self):
        """The row ranges of the HDF5 chunks, in file order."""
        n = self.shape[0]
        return [(start, min(start + self.chunk_rows, n)) for start in range(0, n, self.chunk_rows)]

    def blocks(self, order=None):
        """Yield ``(rows, X)`` blocks: row indices (int64) and their float32 features.

        Parameters
        ----------
        order : sequence of int, default=None
            The order in which to visit the chunks (indices into
            :meth:`chunk_slices`); None visits them in file order.
        """
        slices = self.chunk_slices()
        order = range(len(slices)) if order is None else [int(i) for i in order]
        groups = [order[i : i + self.block_chunks] for i in range(0, len(order), self.block_chunks)]

        def load(group):
            parts = [slices[i] for i in group]
            rows = np.concatenate([np.arange(a, b) for a, b in parts])
            return rows, np.concatenate([self.read(a, b) for a, b in parts])

        if self.prefetch < 1:
            yield from map(load, groups)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Reading overlaps training: torch releases the GIL while it computes.
            pending = deque(pool.submit(load, g) for g in groups[: self.prefetch])
            for next_group in groups[self.prefetch :] + [None] * len(pending):
                block = pending.popleft().result()
                if next_group is not None:
                    pending.append(pool.submit(load, next_group))
                yield block


def read_features(path, split="train", *, dtype=np.float32):
    """Read one split of a feature file into memory.

    Parameters
    ----------
    path : str or path-like
        The ``.h5`` feature file.
    split : str, default="train"
        Split to read.
    dtype : numpy dtype, default=np.float32
        Type of the returned features.

    Returns
    -------
    X : ndarray of shape (n_rows, n_features)
    y : ndarray of shape (n_rows,)
        Label indices into the file's classes (see :func:`read_metadata`).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> write_features(path, {"test": (np.zeros((2, 4)), [1, 0])}, classes=["cat", "dog"])
    >>> X, y = read_features(path, "test")
    >>> X.shape, y.tolist()
    ((2, 4), [1, 0])
    """
    with FeatureFile(path) as f:
        return f.read(split, dtype=dtype)


def read_metadata(path):
    """Classes, splits, sizes and provenance of a feature file, without reading features.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    metadata : dict
        ``classes`` (list of str), ``splits`` (dict of split name to
        ``{"n_rows", "n_features", "dtype", "has_ids"}``), ``attrs`` (dict) and
        ``feature_groups`` (see :attr:`FeatureFile.feature_groups`).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> write_features(path, {"train": (np.ones((3, 2)), [0, 1, 1])}, classes=["a", "b"],
    ...                attrs={"backbone": "toy"})
    >>> meta = read_metadata(path)
    >>> meta["splits"]["train"]["n_rows"], meta["attrs"]["backbone"]
    (3, 'toy')
    """
    with FeatureFile(path) as f:
        splits = {
            s: {
                "n_rows": f.n_rows(s),
                "n_features": f.n_features(s),
                "dtype": str(f._file[s]["features"].dtype),
                "has_ids": "ids" in f._file[s],
            }
            for s in f.splits
        }
        return {
            "classes": f.classes,
            "splits": splits,
            "attrs": f.attrs,
            "feature_groups": f.feature_groups,
        }


def _remove_stale_temporaries(target):
    """Delete the temporary files of overwrites of ``target`` whose writer has died.

    A writer killed before it could rename or discard its temporary file
    leaves ``.<name>.<pid>.tmp`` behind; one of a process still running is kept.
    """
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name[len(target.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            continue


class FeatureWriter:
    """Write or extend a feature file block by block, resumably.

    Each :meth:`append` writes its rows, flushes them, and only then advances
    the split's ``n_rows``: a writer killed mid-way leaves a file whose
    complete rows are readable and which ``mode="a"`` continues.

    Parameters
    ----------
    path : str or path-like
        The ``.h5`` file.
    classes : sequence of str
        Class names in label order. In ``mode="a"`` they must match the file's.
    attrs : dict, default=None
        Provenance attributes (``backbone``, ``weights``, ``preprocessing``, ...).
        In ``mode="a"`` each must equal the file's value if it has one: features
        from another backbone or preprocessing are never mixed into a file.
        ``created`` and ``ltlearn_version`` are added.
    mode : {"x", "w", "a"}, default="x"
        ``"x"`` creates a new file and refuses to touch an existing one;
        ``"w"`` writes a temporary file beside ``path`` and replaces ``path``
        with it only when the writer closes without error (atomic overwrite);
        ``"a"`` appends to (or resumes) an existing file, or creates it.
    dtype : {"float16", "float32"}, default="float16"
        Storage type of features.
    chunk_rows : int, default=1024
        Rows per HDF5 chunk.
    compression : {"gzip", "lzf"} or None, default="gzip"
        Chunk compression (with byte shuffling).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> with FeatureWriter(path, classes=["a", "b"], attrs={"backbone": "toy"}) as w:
    ...     w.append("train", np.ones((2, 3)), [0, 1], ids=["x.jpg", "y.jpg"])
    ...     w.append("train", np.zeros((1, 3)), [1], ids=["z.jpg"])
    >>> with FeatureWriter(path, classes=["a", "b"], attrs={"backbone": "toy"}, mode="a") as w:
    ...     w.n_rows("train")
    3
    """

    def __init__(
        self,
        path,
        *,
        classes,
        attrs=None,
        mode="x",
        dtype="float16",
        chunk_rows=1024,
        compression="gzip",
    ):
        if mode not in ("x", "w", "a"):
            raise ValueError(f"mode must be 'x', 'w' or 'a'; got {mode!r}.")
        if np.dtype(dtype) not in (np.float16, np.float32):
            raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}.")
        self.path = Path(path)
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 1:
            raise ValueError("classes must name at least one class.")
        self.dtype = np.dtype(dtype)
        self.chunk_rows = int(chunk_rows)
        self.compression = compression
        self.mode = mode
        attrs = {k: _decode(v) for k, v in (attrs or {}).items()}

        if mode == "x" and self.path.exists():
            raise FileExistsError(
                f"Feature file {str(self.path)!r} already exists; pass mode='a' to append to "
                "it or mode='w' to replace it."
            )
        if mode == "w":
            self._target = self.path
            _remove_stale_temporaries(self.path)
            self.path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if mode == "a" and self.path.exists():
            self._file = _open_h5(self.path, "r+")
            self._check_compatible(attrs)
        else:
            self._file = _open_h5(self.path, "w" if mode == "w" else "x")
            self._file.create_dataset(
                "classes", data=np.array(self.classes, dtype=object), dtype=h5py.string_dtype()
            )
            from ltlearn import __version__

            created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            defaults = {"ltlearn_version": __version__, "created": created}
            for key, value in {**defaults, **attrs}.items():
                self._file.attrs[key] = value
            self._file.flush()

    def _check_compatible(self, attrs):
        f = self._file
        existing = [_decode(c) for c in f["classes"][()]] if "classes" in f else None
        if existing != self.classes:
            self._file.close()
            raise FeatureFileError(
                f"Refusing to append to {str(self.path)!r}: its classes {existing} differ from "
                f"the writer's {self.classes}."
            )
        for key, value in attrs.items():
            stored = _decode(f.attrs[key]) if key in f.attrs else value
            if key != "created" and stored != value:
                self._file.close()
                raise FeatureFileError(
                    f"Refusing to append to {str(self.path)!r}: it was written with "
                    f"{key}={stored!r}, this writer has {key}={value!r}. "
                    "Write to a new file instead."
                )

    def set_feature_groups(self, groups):
        """Record that the columns are several layers side by side: ``[(name, width), ...]``.

        A file that already records other groups is refused: features of
        other layers are never mixed into a file.
        """
        value = json.dumps([[str(name), int(width)] for name, width in groups])
        stored = _decode(self._file.attrs.get("feature_groups", value))
        if stored != value:
            raise FeatureFileError(
                f"Refusing to write to {str(self.path)!r}: it holds the feature groups "
                f"{stored}, this writer has {value}. Write to a new file instead."
            )
        self._file.attrs["feature_groups"] = value
        self._file.flush()

    def n_rows(self, split):
        """Complete rows of ``split`` so far (0 for a split not yet written)."""
        if split not in self._file:
            return 0
        return int(self._file[split].attrs.get("n_rows", 0))

    def progress(self, split):
        """Progress attributes recorded for ``split`` (see :meth:`append`), as a dict."""
        if split not in self._file:
            return {}
        return {k: _decode(v) for k, v in self._file[split].attrs.items() if k != "n_rows"}

    def record_progress(self, split, **progress):
        """Record progress attributes of ``split`` without appending rows."""
        group = self._file.require_group(split)
        for key, value in progress.items():
            group.attrs[key] = value
        self._file.flush()

    def append(self, split, features, labels, ids=None, *, views=None, progress=None):
        """Append rows to ``split`` and mark them complete.

        Parameters
        ----------
        split : str
            Split name, e.g. ``"train"``.
        features : array-like of shape (n, n_features)
        labels : array-like of shape (n,)
            Label indices into ``classes``.
        ids : sequence of str, optional
            One id per row; a split keeps ids for all its rows or none.
        views : array-like of shape (n, n_views, n_features), optional
            Embeddings of augmented views of each row, stored as
            ``/<split>/views``; a split keeps views for all its rows or none.
        progress : dict, optional
            Split attributes recorded in the same step as the new row count
            (e.g. how many source items the rows account for), so that a
            resumed writer knows where its source stopped.
        """
        features = np.asarray(features)
        labels = np.asarray(labels)
        if features.ndim != 2:
            raise ValueError(f"features must be 2-D; got shape {features.shape}.")
        n = features.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"labels has shape {labels.shape}; expected ({n},) to match features.")
        if not np.issubdtype(labels.dtype, np.integer) and labels.size:
            raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}.")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in 0..{len(self.classes) - 1} (one per class); "
                f"got {labels.min()}..{labels.max()}."
            )
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} rows.")
        if not np.all(np.isfinite(features)):
            raise ValueError(f"features of split '{split}' contain NaN or infinite values.")
        self._check_storable(split, "features", features)
        if views is not None:
            views = np.asarray(views)
            if views.ndim != 3 or views.shape[0] != n or views.shape[2] != features.shape[1]:
                raise ValueError(
                    f"views must have shape ({n}, n_views, {features.shape[1]}); got {views.shape}."
                )
            if not np.all(np.isfinite(views)):
                raise ValueError(f"views of split '{split}' contain NaN or infinite values.")
            self._check_storable(split, "views", views)
        group = self._file.require_group(split)
        start = int(group.attrs.get("n_rows", 0))
        datasets = self._datasets(group, features.shape[1], ids is not None)
        if views is not None:
            datasets["views"] = self._views_dataset(group, views.shape[1:])
        elif "views" in group:
            raise ValueError(f"Split '{split}' has views; pass views=.")
        stop = start + n
        for name, values in (
            ("features", features),
            ("labels", labels),
            ("ids", ids),
            ("views", views),
        ):
            if name in datasets:
                datasets[name].resize(stop, axis=0)
                datasets[name][start:stop] = values
        self._file.flush()
        for key, value in (progress or {}).items():
            group.attrs[key] = value
        group.attrs["n_rows"] = stop
        self._file.flush()

    def _check_storable(self, split, name, values):
        """Finite values that the storage type would turn into infinities are an error."""
        limit = float(np.finfo(self.dtype).max)
        too_big = np.abs(values.reshape(len(values), -1)).max(axis=1, initial=0) > limit
        if np.any(too_big):
            rows = np.flatnonzero(too_big)
            raise ValueError(
                f"{name} of split '{split}' hold values beyond the {self.dtype} range "
                f"(|x| > {limit:g}) in {rows.size} row(s), e.g. rows {rows[:5].tolist()} of "
                f"this block; stored as {self.dtype} they would become infinite. Write with "
                "dtype='float32' to keep them, or rescale the features."
            )

    def _datasets(self, group, n_features, with_ids):
        if "features" not in group:
            chunks = (min(self.chunk_rows, 1 << 20), n_features)
            opts = {"compression": self.compression, "shuffle": self.compression is not None}
            group.create_dataset(
                "features",
                (0, n_features),
                self.dtype,
                maxshape=(None, n_features),
                chunks=chunks,
                **opts,
            )
            group.create_dataset(
                "labels", (0,), np.int64, maxshape=(None,), chunks=(self.chunk_rows,), **opts
            )
            if with_ids:
                group.create_dataset(
                    "ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(self.chunk_rows,)
                )
            group.attrs["n_rows"] = 0
        stored = group["features"].shape[1]
        if stored != n_features:
            raise ValueError(
                f"Split '{group.name.strip('/')}' of {str(self.path)!r} holds {stored}-d "
                f"features; got {n_features}-d."
            )
        if with_ids != ("ids" in group):
            raise ValueError(
                f"Split '{group.name.strip('/')}' "
                + ("has no ids; append without ids." if with_ids else "has ids; pass ids=.")
            )
        return {name: group[name] for name in ("features", "labels", "ids") if name in group}

    def _views_dataset(self, group, shape):
        if "views" not in group:
            if int(group.attrs.get("n_rows", 0)):
                raise ValueError(f"Split '{group.name.strip('/')}' has rows without views.")
            opts = {"compression": self.compression, "shuffle": self.compression is not None}
            group.create_dataset(
                "views",
                (0, *shape),
                self.dtype,
                maxshape=(None, *shape),
                chunks=(max(1, self.chunk_rows // shape[0]), *shape),
                **opts,
            )
        if group["views"].shape[1:] != tuple(shape):
            raise ValueError(
                f"Split '{group.name.strip('/')}' holds views of shape {group['views'].shape[1:]}; "
                f"got {tuple(shape)}."
            )
        return group["views"]

    def close(self, *, commit=True):
        """Close the file; in ``mode="w"``, move it into place (or discard it)."""
        if not self._file:
            return
        self._file.close()
        if self.mode == "w":
            if commit:
                os.replace(self.path, self._target)
            else:
                self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        self.close(commit=exc_type is None)


def write_features(path, splits, classes, *, attrs=None, overwrite=False, dtype="float16"):
    """Write a whole feature file at once, atomically.

    Parameters
    ----------
    path : str or path-like
        Destination ``.h5`` file.
    splits : dict
        ``{split: (features, labels)}`` or ``{split: (features, labels, ids)}``.
    classes : sequence of str
        Class names in label order.
    attrs : dict, default=None
        Provenance attributes.
    overwrite : bool, default=False
        Replace an existing file (atomically: the old one stays intact until
        the new one is complete).
    dtype : {"float16", "float32"}, default="float16"
        Storage type of the features.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> write_features(path, {"train": (np.ones((2, 2)), [0, 0])}, classes=["only"])
    >>> read_features(path)[0].shape
    (2, 2)
    """
    if not overwrite and Path(path).exists():
        raise FileExistsError(
            f"Feature file {str(path)!r} already exists; pass overwrite=True to replace it."
        )
    with FeatureWriter(path, classes=classes, attrs=attrs, mode="w", dtype=dtype) as writer:
        for split, arrays in splits.items():
            writer.append(split, *arrays)
