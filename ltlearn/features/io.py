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
root ``row_shape``         JSON ``[C, H, W]``                optional: each row is a flattened
                                                             activation tensor (``cut``
                                                             names the backbone's submodule)
=========================  ================================  ===================================

Rows past ``n_rows`` were being written when a writer stopped; readers never
return them and an appending writer overwrites them, which makes writing
resumable.

A merged file (:func:`merge`) holds the same layout as HDF5 virtual data sets
that refer to its shards' rows; opening it checks that every shard is there.
"""

import contextlib
import datetime
import json
import math
import os
import socket
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
    "merge",
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


# What h5py raises when the structure of a damaged file does not parse.
_H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


def _source_candidates(name, home):
    """Where HDF5 looks for the source file ``name`` of a virtual data set stored in ``home``.

    An absolute name is tried as it is, then (as a relative one) by its base
    name: under each ``HDF5_VDS_PREFIX`` entry, beside the virtual data set's
    file, and relative to the working directory.
    """
    name = Path(name)
    relative = Path(name.name) if name.is_absolute() else name
    prefixes = [
        Path(prefix.replace("${ORIGIN}", str(home)))
        for prefix in os.environ.get("HDF5_VDS_PREFIX", "").split(os.pathsep)
        if prefix
    ]
    first = [name] if name.is_absolute() else []
    return first + [prefix / relative for prefix in prefixes] + [home / relative, relative]


def _check_virtual_sources(h5file, datasets):
    """Refuse virtual data sets whose source files are missing or hold too few rows.

    HDF5 reads the rows of a missing source as the fill value without any
    error: a merged file whose shard was moved or deleted would read as zeros.

    Returns
    -------
    sources : set of pathlib.Path
        The resolved source files.
    """
    home = Path(h5file.filename).resolve().parent
    needed = {}
    for dataset in datasets:
        if dataset.is_virtual:
            for mapping in dataset.virtual_sources():
                if mapping.file_name != ".":  # "." is the file itself
                    needed.setdefault(mapping.file_name, []).append((dataset.name, mapping))
    sources = set()
    for name, uses in needed.items():
        where = f"{uses[0][0]!r} of {h5file.filename!r}"
        found = next((p for p in _source_candidates(name, home) if p.is_file()), None)
        if found is None:
            raise FeatureFileError(
                f"Feature file {h5file.filename!r} refers to shard {name!r}, which is missing: "
                f"{where} would read its rows as zeros. Put the shard back (at that path or "
                "beside the merged file), or merge again from the shards."
            )
        try:
            with h5py.File(found, "r") as source:
                for dataset_name, mapping in uses:
                    stored = source.get(mapping.dset_name)
                    _, end = mapping.src_space.get_select_bounds()
                    if not isinstance(stored, h5py.Dataset) or any(
                        e >= n for e, n in zip(end, stored.shape, strict=False)
                    ):
                        raise FeatureFileError(
                            f"Feature file {h5file.filename!r} refers to rows of "
                            f"'{mapping.dset_name}' in shard {str(found)!r} that the shard does "
                            f"not hold (it was rewritten or truncated?): {dataset_name!r} would "
                            "read them as zeros. Merge again from the shards."
                        )
        except _H5_ERRORS as exc:
            if isinstance(exc, FeatureFileError):
                raise
            raise FeatureFileError(
                f"Feature file {h5file.filename!r} refers to shard {str(found)!r}, which cannot "
                f"be read ({exc}); restore the shard or merge again from the shards."
            ) from exc
        sources.add(found.resolve())
    return sources


def _refuse_directory(path):
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a directory; give the path of a file in it, e.g. "
            f"{str(Path(path) / 'features.h5')!r}."
        )


def _check_output_path(path, overwrite):
    """Refuse to write a file over a directory, or over an existing file unless ``overwrite``."""
    _refuse_directory(path)
    if not overwrite and Path(path).exists():
        raise FileExistsError(
            f"Feature file {str(path)!r} already exists; pass overwrite=True to replace it."
        )


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
    row_shape : tuple of int or None
        When each row is a backbone's activations at a cut
        (``extract(..., cut=...)``): their shape, e.g. ``(192, 7, 7)``;
        :meth:`read` returns rows in that shape. None for embeddings.

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
            with self._damage("opening it"):
                self._check_layout()
        except BaseException:
            self._file.close()
            raise

    def _error(self, what):
        return FeatureFileError(f"Feature file {str(self.path)!r} {what}.")

    @contextlib.contextmanager
    def _damage(self, doing):
        """Turn what h5py raises on a damaged file into a FeatureFileError naming the file."""
        try:
            yield
        except FeatureFileError:
            raise
        except _H5_ERRORS as exc:
            raise self._error(
                f"is corrupt: {doing} failed ({type(exc).__name__}: {exc}); re-create the file "
                "or restore it from a copy"
            ) from exc

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
        self.row_shape = self._parse_row_shape()
        for split in self.splits:
            self._check_split(split)
        datasets = [
            dataset
            for split in self.splits
            for dataset in self._file[split].values()
            if isinstance(dataset, h5py.Dataset)
        ]
        self._sources = _check_virtual_sources(self._file, datasets)

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

    def _parse_row_shape(self):
        text = self.attrs.get("row_shape")
        if text is None:
            return None
        try:
            shape = tuple(int(d) for d in json.loads(text))
        except (TypeError, ValueError) as exc:
            raise self._error(
                f"has an unreadable 'row_shape' attribute {text!r} ({exc}); expected JSON [C, H, W]"
            ) from exc
        if not shape or any(d < 1 for d in shape):
            raise self._error(f"has a 'row_shape' attribute without dimensions: {text!r}")
        return shape

    def _check_split(self, split):
        group = self._file[split]
        for name in ("features", "labels", "ids", "views"):
            if name in group and not isinstance(group[name], h5py.Dataset):
                raise self._error(f"is corrupt: '/{split}/{name}' is not a data set")
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
        if self.row_shape is not None and features.shape[1] != math.prod(self.row_shape):
            raise self._error(
                f"is corrupt: its rows have shape {list(self.row_shape)}, "
                f"{math.prod(self.row_shape)} values, but split '{split}' has {features.shape[1]}"
            )
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
            if name == "ids":
                return np.array([_decode(v) for v in dataset[rows]], dtype=object)
            if dtype is not None and dataset.dtype != dtype:
                return dataset.astype(dtype)[rows]
            return dataset[rows]
        except _H5_ERRORS as exc:
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
        X : ndarray of shape (n_rows, n_features) or (n_rows, C, H, W)
            Activations at a cut (a file made by ``extract(..., cut=...)``,
            which records :attr:`row_shape`) come back in their shape,
            e.g. ``(n_rows, C, H, W)``.
        y : ndarray of shape (n_rows,) of int64
        """
        rows = self._rows(split, start, stop)
        X = self._read(split, "features", rows, dtype)
        if groups is not None:
            X = X[:, self.group_columns(groups)]
        elif self.row_shape is not None:
            X = X.reshape(len(X), *self.row_shape)
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
        return self._read(split, "ids", self._rows(split, start, stop))

    def views(self, split="train", *, start=None, stop=None, dtype=np.float32):
        """Embeddings of the augmented views of rows ``start:stop``, or None when there are none.

        Returns
        -------
        views : ndarray of shape (n_rows, n_views, n_features) or None
            Of shape ``(n_rows, n_views, *row_shape)`` for activations at a
            cut, as :meth:`read` returns their rows.
        """
        if "views" not in self._group(split):
            return None
        views = self._read(split, "views", self._rows(split, start, stop), dtype)
        if self.row_shape is not None:
            views = views.reshape(*views.shape[:2], *self.row_shape)
        return views

    def read_with_views(self, split="train", *, start=None, stop=None, dtype=np.float32):
        """Features, labels and augmented views of rows ``start:stop``, as the estimators take them.

        For a file made with views (``extract(..., views=K)`` or
        ``recipe="layers-views"``): every column of each row (stored layers
        and the embedding side by side), so ``fit(X, y, views=V)`` and
        ``predict(X, views=V)`` take the three as they are.

        Parameters
        ----------
        split : str, default="train"
        start, stop : int, default=None
            Row range, clipped to the complete rows.
        dtype : numpy dtype, default=np.float32
            Type of the returned features and views.

        Returns
        -------
        X : ndarray of shape (n_rows, n_features)
        y : ndarray of shape (n_rows,) of int64
        views : ndarray of shape (n_rows, n_views, n_features)

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from ltlearn import BalancedSoftmaxClassifier
        >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
        >>> rng = np.random.default_rng(0)
        >>> with FeatureWriter(path, classes=["a", "b"]) as w:
        ...     w.append("train", rng.normal(size=(6, 3)), [0, 1, 0, 1, 0, 1],
        ...              views=rng.normal(size=(6, 2, 3)))
        >>> with FeatureFile(path) as f:
        ...     X, y, V = f.read_with_views("train")
        >>> X.shape, y.shape, V.shape
        ((6, 3), (6,), (6, 2, 3))
        >>> clf = BalancedSoftmaxClassifier(max_epochs=2).fit(X, y, views=V)
        >>> clf.predict(X, views=V).shape
        (6,)
        """
        if "views" not in self._group(split):
            raise self._error(
                f"has no views in split {split!r}; extract it with views=K and a "
                "view_transform, or with recipe='layers-views' (ltlearn extract --recipe "
                "layers-views)"
            )
        X, y = self.read(split, start=start, stop=stop, dtype=dtype)
        return X, y, self.views(split, start=start, stop=stop, dtype=dtype)

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


#: Rows per block of a FeatureSplit by default.
BLOCK_ROWS = 16_384


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
    block_chunks : int or None, default=None
        HDF5 chunks per block; None takes as many as hold 16,384 rows (16 of
        the 1,024-row chunks of embedding files, 256 of the 64-row chunks of
        activations cached at a cut). Rows are shuffled within a block, and a
        file ``extract`` wrote from a folder of images holds its classes one
        after the other: blocks of a few chunks would give each class's rows
        to a few consecutive batches of an epoch.
    prefetch : int, default=2
        Blocks read ahead of training.

    Attributes
    ----------
    shape : tuple of int
        Complete rows and features: ``(n_rows, n_features)``, or ``(n_rows,
        *row_shape)`` for activations cached at a cut, whose rows
        :meth:`read` and :meth:`blocks` return in their shape.
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

    def __init__(self, source, split="train", *, block_chunks=None, prefetch=2):
        row_shape = None
        if isinstance(source, FeatureFile):
            self.name = f"split {split!r} of {str(source.path)!r}"
            self._features = source._group(split)["features"]
            n_rows = source.n_rows(split)
            self.labels = source.labels(split)
            row_shape = source.row_shape
        elif isinstance(source, h5py.Dataset):
            if source.ndim != 2:
                raise ValueError(f"An h5py data set of features must be 2-D; got {source.shape}.")
            self.name = f"data set {source.name!r} of {source.file.filename!r}"
            _check_virtual_sources(source.file, [source])
            self._features, n_rows, self.labels = source, source.shape[0], None
        else:
            raise TypeError(
                f"FeatureSplit reads a FeatureFile or an h5py.Dataset; got {type(source).__name__}."
            )
        if n_rows == 0:
            # Estimators would fail later on the empty label set with an obscure error.
            raise ValueError(
                f"The {self.name} has no rows, so there is nothing to stream; write rows to it "
                "first (FeatureWriter.append, extract) or pass another split."
            )
        row_shape = (int(self._features.shape[1]),) if row_shape is None else tuple(row_shape)
        self.shape = (int(n_rows), *row_shape)
        self.chunk_rows = int((self._features.chunks or (1024,))[0])
        if block_chunks is None:
            block_chunks = max(1, BLOCK_ROWS // self.chunk_rows)
        self.block_chunks, self.prefetch = int(block_chunks), int(prefetch)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"FeatureSplit({self.name}, shape={self.shape})"

    def __array__(self, dtype=None, copy=None):
        return self.read(0, self.shape[0], dtype or np.float32)

    def read(self, start, stop, dtype=np.float32):
        """Rows ``start:stop`` as an array, each row in its shape."""
        try:
            rows = np.asarray(self._features[start:stop], dtype=dtype)
            return rows.reshape(len(rows), *self.shape[1:])
        except _H5_ERRORS as exc:
            raise FeatureFileError(
                f"Could not read rows {start}:{stop} of {self.name} ({exc}); the file may be "
                "truncated or corrupt."
            ) from exc

    def take(self, rows, dtype=np.float32):
        """The rows at indices ``rows``, in that order, reading only the chunks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=dtype)
        order = np.argsort(rows, kind="stable")
        chunks, starts = np.unique(rows[order] // self.chunk_rows, return_index=True)
        ends = [*starts[1:], len(rows)]
        for chunk, a, b in zip(chunks, starts, ends, strict=True):
            first = int(chunk) * self.chunk_rows
            block = self.read(first, min(first + self.chunk_rows, self.shape[0]), dtype)
            out[order[a:b]] = block[rows[order[a:b]] - first]
        return out

    def chunk_slices(self):
        """The row ranges of the HDF5 chunks, in file order."""
        n = self.shape[0]
        return [(start, min(start + self.chunk_rows, n)) for start in range(0, n, self.chunk_rows)]

    def blocks(self, order=None):
        """Yield ``(rows, X)`` blocks: row indices (int64) and their float32 rows.

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
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _process_alive(pid):
    """Whether process ``pid`` of this host runs; a number no process can have is not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True


class _WriteLock:
    """An exclusive lock of ltlearn's own on writing ``path``: a lock file beside it.

    HDF5's own file locking is often switched off (``HDF5_USE_FILE_LOCKING=FALSE``,
    the usual setting on NFS and Lustre), and two writers of one file then
    corrupt it. The lock file ``.<name>.lock`` is created exclusively
    (``O_EXCL``, atomic on local file systems and NFS v3 and later) and names
    its host and process: a lock left by a dead process of this host is
    taken over; one left by a killed writer on another host must be deleted
    by hand, as the error says.
    """

    def __init__(self, path):
        self.target = Path(path)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        owner = f"{socket.gethostname()} {os.getpid()}"
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"Cannot write {str(self.target)!r}: the folder {str(self.path.parent)!r} does "
                "not exist."
            )
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as file:
                file.write(owner)
            return

    def _take_over_or_refuse(self):
        try:
            host, pid = self.path.read_text().split()
            pid = int(pid)
        except FileNotFoundError:  # released meanwhile
            return
        except ValueError:  # its writer has created it but not yet written its name
            owner = "a writer that is starting"
        else:
            if host == socket.gethostname() and not _process_alive(pid):
                self.path.unlink(missing_ok=True)
                return
            owner = f"process {pid} on host {host}"
        raise FeatureFileError(
            f"Feature file {str(self.target)!r} is being written by another writer ({owner}); "
            "wait until it has finished. If no writer is running (one on another host was "
            f"killed), delete the lock file {str(self.path)!r}."
        )

    def release(self):
        self.path.unlink(missing_ok=True)


class FeatureWriter:
    """Write or extend a feature file block by block, resumably.

    Each :meth:`append` writes its rows, flushes them, and only then advances
    the split's ``n_rows``: a writer killed mid-way leaves a file whose
    complete rows are readable and which ``mode="a"`` continues.

    One writer at a time: a writer holds the lock file ``.<name>.lock``
    beside ``path`` until it closes, and a second writer of the same file
    (another process, this one, or another host sharing the file system) is
    refused with a :class:`~ltlearn.exceptions.FeatureFileError`. This holds
    where HDF5's own locking is off (``HDF5_USE_FILE_LOCKING=FALSE`` on NFS
    and Lustre), as long as the file system creates files exclusively
    (``O_EXCL``; NFS v3 and later do). A lock left by a killed writer is
    taken over on the same host; one from another host must be deleted by
    hand (the error names it). Readers take no lock.

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
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None; got {compression!r}.")
        self.path = Path(path)
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 1:
            raise ValueError("classes must name at least one class.")
        self.dtype = np.dtype(dtype)
        self.chunk_rows = int(chunk_rows)
        self.compression = compression
        self.mode = mode
        attrs = {k: _decode(v) for k, v in (attrs or {}).items()}

        _refuse_directory(self.path)
        if mode == "x" and self.path.exists():
            raise FileExistsError(
                f"Feature file {str(self.path)!r} already exists; pass mode='a' to append to "
                "it or mode='w' to replace it."
            )
        self._lock = _WriteLock(self.path)
        self._target, self._file = self.path, None
        if mode == "w":
            self.path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self._open(attrs)
        except BaseException:
            self.close(commit=False)
            raise

    def _open(self, attrs):
        if self.mode == "w":
            _remove_stale_temporaries(self._target)
        if self.mode == "a" and self.path.exists():
            self._file = _open_h5(self.path, "r+")
            self._check_compatible(attrs)
        else:
            self._file = _open_h5(self.path, "w" if self.mode == "w" else "x")
            self._file.create_dataset(
                "classes", data=np.array(self.classes, dtype=object), dtype=h5py.string_dtype()
            )
            for key, value in {**_default_attrs(), **attrs}.items():
                self._file.attrs[key] = value
            self._file.flush()

    def _check_compatible(self, attrs):
        f = self._file
        existing = [_decode(c) for c in f["classes"][()]] if "classes" in f else None
        if existing != self.classes:
            raise FeatureFileError(
                f"Refusing to append to {str(self.path)!r}: its classes {existing} differ from "
                f"the writer's {self.classes}."
            )
        for key, value in attrs.items():
            stored = _decode(f.attrs[key]) if key in f.attrs else value
            if key != "created" and stored != value:
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
        # Called for every batch: a flush of a file of cut rows costs ~20 ms.
        if "feature_groups" not in self._file.attrs:
            self._file.attrs["feature_groups"] = value
            self._file.flush()

    def set_row_shape(self, split, shape):
        """Record that each row is a flattened tensor of ``shape`` (activations at a cut).

        A file that records another shape, or whose ``split`` holds rows of
        another width, is refused.
        """
        shape = [int(d) for d in shape]
        value = json.dumps(shape)
        stored = _decode(self._file.attrs.get("row_shape", value))
        if stored != value:
            raise FeatureFileError(
                f"Refusing to write to {str(self.path)!r}: its rows have shape {stored}, this "
                f"writer's have shape {value}. Write to a new file instead."
            )
        if "row_shape" not in self._file.attrs:
            self._file.attrs["row_shape"] = value
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
            Zero rows write nothing (``progress`` is still recorded).
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
        if n == 0:
            # A source block that yielded no rows (every image skipped) still moves progress.
            if progress:
                self.record_progress(split, **progress)
            return
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
        too_big = np.abs(values).max(axis=tuple(range(1, values.ndim)), initial=0) > limit
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
        """Close the file and release it; in ``mode="w"``, move it into place (or discard it)."""
        if self._lock is None:
            return
        try:
            if self._file:
                self._file.close()
            if self.mode == "w" and commit:
                os.replace(self.path, self._target)
        finally:
            if self.mode == "w":
                self.path.unlink(missing_ok=True)  # gone after a successful replace
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        self.close(commit=exc_type is None)


def _default_attrs():
    from ltlearn import __version__

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"ltlearn_version": __version__, "created": created}


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
    _check_output_path(path, overwrite)
    with FeatureWriter(path, classes=classes, attrs=attrs, mode="w", dtype=dtype) as writer:
        for split, arrays in splits.items():
            writer.append(split, *arrays)


# Rows that a virtual data set cannot find read as these, never as plausible data.
_MERGE_FILL = {"features": np.nan, "views": np.nan, "labels": -1}


def merge(shards, path, *, overwrite=False):
    """Join shard files into one feature file of HDF5 virtual data sets.

    The merged file refers to the shards' complete rows (features, labels
    and views) without copying them, and copies their ids; keep the shard
    files where they are or beside the merged file: opening a merged file
    whose shard is missing is an error naming it. Shards must share classes,
    feature width and type, views, ids and provenance (including the feature
    groups), apart from the ``shard`` and ``created`` attributes. The merged
    file keeps that provenance, lists its shards in ``merged_from`` and
    gathers their skipped ids in each split's ``skipped`` attribute.

    Parameters
    ----------
    shards : sequence of str or path-like
        Shard files in order.
    path : str or path-like
        The merged file; never one of the shards (nor a file that a shard
        refers to).
    overwrite : bool, default=False
        Replace an existing file (atomically: the old one stays intact until
        the new one is complete).

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> shards = [os.path.join(folder, f"s{i}.h5") for i in range(2)]
    >>> for i, shard in enumerate(shards):
    ...     write_features(shard, {"train": (np.full((2, 3), i), [0, 1])}, classes=["a", "b"])
    >>> merged = merge(shards, os.path.join(folder, "all.h5"))
    >>> read_features(merged)[0][:, 0].tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    path = Path(path)
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("merge needs at least one shard file.")
    _check_output_path(path, overwrite)
    opened = []
    try:
        for shard in shards:
            opened.append(FeatureFile(shard))
        _check_shards(opened, path)
        lock = _WriteLock(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            _remove_stale_temporaries(path)
            with _open_h5(tmp, "w") as out:
                _write_merged(out, opened)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            lock.release()
    finally:
        for f in opened:
            f.close()
    return path


def _provenance(f):
    return {k: v for k, v in f.attrs.items() if k not in ("shard", "created")}


def _check_shards(opened, path):
    """Refuse shards that are not parts of one run, or that ``path`` would destroy."""
    first = opened[0]
    for i, shard in enumerate(opened):
        for earlier in opened[:i]:
            if os.path.samefile(shard.path, earlier.path):
                raise ValueError(
                    f"Shards {str(earlier.path)!r} and {str(shard.path)!r} are the same file; "
                    "its rows would appear twice. Name each shard once."
                )
        if path.exists() and any(os.path.samefile(path, p) for p in [shard.path, *shard._sources]):
            what = "is" if os.path.samefile(path, shard.path) else "holds rows referred to by"
            raise ValueError(
                f"Refusing to merge into {str(path)!r}: it {what} shard {str(shard.path)!r}, "
                "and replacing it would destroy the rows the merged file refers to. Write the "
                "merged file to another path."
            )
        if shard.classes != first.classes:
            raise FeatureFileError(
                f"Shard {str(shard.path)!r} has other classes than {str(first.path)!r}: "
                f"{shard.classes} against {first.classes}; not shards of one run."
            )
        attrs, reference = _provenance(shard), _provenance(first)
        diff = sorted(k for k in set(attrs) | set(reference) if attrs.get(k) != reference.get(k))
        if diff:
            raise FeatureFileError(
                f"Shard {str(shard.path)!r} differs from {str(first.path)!r} in {diff}: "
                "not shards of one run."
            )
    for split in sorted(set().union(*(f.splits for f in opened))):
        parts = [f for f in opened if split in f.splits]
        for name in ("features", "labels", "ids", "views"):
            kinds = {}
            for f in parts:
                stored = f._file[split].get(name)
                kind = (
                    "none" if stored is None else f"{stored.dtype} rows of shape {stored.shape[1:]}"
                )
                kinds.setdefault(kind, []).append(str(f.path))
            if len(kinds) > 1:
                described = "; ".join(f"{kind} in {files}" for kind, files in kinds.items())
                raise FeatureFileError(
                    f"Shards differ in '/{split}/{name}': {described}. Merge only shards of "
                    "one extraction run (same backbone, layers, views and dtype)."
                )


def _write_merged(out, opened):
    first = opened[0]
    out.create_dataset(
        "classes", data=np.array(first.classes, dtype=object), dtype=h5py.string_dtype()
    )
    for key, value in {**_provenance(first), "created": _default_attrs()["created"]}.items():
        out.attrs[key] = value
    out.attrs["merged_from"] = [f.path.name for f in opened]
    for split in sorted(set().union(*(f.splits for f in opened))):
        parts = [(f, f.n_rows(split)) for f in opened if split in f.splits]
        total = sum(n for _, n in parts)
        group = out.create_group(split)
        for name, fill in _MERGE_FILL.items():
            sample = parts[0][0]._file[split].get(name)
            if sample is None:
                continue
            layout = h5py.VirtualLayout(shape=(total, *sample.shape[1:]), dtype=sample.dtype)
            offset = 0
            for f, n in parts:
                if n:
                    stored = f._file[split][name]
                    source = h5py.VirtualSource(
                        str(f.path.resolve()), f"{split}/{name}", shape=stored.shape
                    )
                    layout[offset : offset + n] = source[:n]
                offset += n
            group.create_virtual_dataset(name, layout, fillvalue=fill)
        if "ids" in parts[0][0]._file[split]:
            # Ids are variable-length strings, which virtual data sets cannot hold: copied.
            ids = np.concatenate([f.ids(split) for f, _ in parts])
            group.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
        skipped = [str(s) for f, _ in parts for s in f._file[split].attrs.get("skipped", [])]
        if skipped:
            group.attrs["skipped"] = skipped
        group.attrs["n_rows"] = total
