"""Long-tailed subsets, shifted test sets and splits of labelled data.

The functions return indices into the data, so they work for any array, an
HDF5 data set or a list of image paths alike.
"""

import os
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

__all__ = [
    "TEST_DISTRIBUTIONS",
    "load_long_tailed_digits",
    "long_tail_counts",
    "long_tailed_subset",
    "make_long_tailed_embeddings",
    "shifted_test_subsets",
    "train_val_split",
]

#: Imbalance ratios of the shifted test sets of SADE's test-agnostic protocol
#: (Zhang et al., "Self-Supervised Aggregation of Diverse Experts for
#: Test-Agnostic Long-Tailed Recognition", NeurIPS 2022).
TEST_DISTRIBUTIONS = (50, 25, 10, 5, 2)


@validate_params(
    {
        "n_max": [Interval(Integral, 1, None, closed="left")],
        "n_classes": [Interval(Integral, 1, None, closed="left")],
        "imbalance_ratio": [Interval(Real, 1, None, closed="left")],
        "profile": [StrOptions({"exponential", "step"})],
        "step_fraction": [Interval(Real, 0, 1, closed="neither")],
    },
    prefer_skip_nested_validation=True,
)
def long_tail_counts(
    n_max, n_classes, imbalance_ratio, *, profile="exponential", step_fraction=0.5
):
    """Samples per class of a long-tailed profile, from the largest class down.

    Parameters
    ----------
    n_max : int
        Size of the largest (first) class.
    n_classes : int
        Number of classes.
    imbalance_ratio : float
        Largest over smallest class size, at least 1.
    profile : {"exponential", "step"}, default="exponential"
        ``"exponential"``: ``n_c = int(n_max * imbalance_ratio ** (-c / (n_classes - 1)))``,
        the CIFAR-LT protocol (Cui et al., CVPR 2019). ``"step"``: the last
        ``step_fraction`` of the classes get ``int(n_max / imbalance_ratio)`` and
        the others ``n_max`` (Cao et al., NeurIPS 2019).
    step_fraction : float, default=0.5
        Fraction of minority classes of the ``"step"`` profile.

    Returns
    -------
    counts : ndarray of shape (n_classes,)
        Every class keeps at least one sample.

    Examples
    --------
    >>> long_tail_counts(5000, 10, 100).tolist()
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    >>> long_tail_counts(100, 4, 10, profile="step").tolist()
    [100, 100, 10, 10]
    """
    c = np.arange(n_classes)
    if profile == "exponential":
        exponent = -c / max(n_classes - 1, 1)
        counts = (n_max * float(imbalance_ratio) ** exponent).astype(np.int64)
    else:
        n_minority = int(round(step_fraction * n_classes))
        counts = np.full(n_classes, n_max, dtype=np.int64)
        counts[n_classes - n_minority :] = int(n_max / imbalance_ratio)
    return np.maximum(counts, 1)


def _class_order(y, class_order):
    labels = np.unique(y)
    if class_order is None:
        return labels
    order = np.asarray(class_order)
    missing = np.setdiff1d(labels, order)
    unknown = np.setdiff1d(order, labels)
    if missing.size or unknown.size or len(order) != len(labels):
        raise ValueError(
            "class_order must list every class of y exactly once; "
            f"missing {missing.tolist()}, not in y {unknown.tolist()}, "
            f"got {len(order)} entries for {len(labels)} classes."
        )
    return order


@validate_params(
    {
        "y": ["array-like"],
        "imbalance_ratio": [Interval(Real, 1, None, closed="left")],
        "profile": [StrOptions({"exponential", "step"})],
        "class_order": ["array-like", None],
        "n_max": [Interval(Integral, 1, None, closed="left"), None],
        "step_fraction": [Interval(Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def long_tailed_subset(
    y,
    imbalance_ratio=100,
    *,
    profile="exponential",
    class_order=None,
    n_max=None,
    step_fraction=0.5,
    random_state=None,
):
    """Indices of a long-tailed subset of a labelled set.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels of the (typically balanced) full set.
    imbalance_ratio : float, default=100
        Largest over smallest class size of the subset.
    profile : {"exponential", "step"}, default="exponential"
        See :func:`long_tail_counts`.
    class_order : array-like, default=None
        Labels from the largest to the smallest class of the subset; by default
        the sorted labels, as in CIFAR-10-LT and CIFAR-100-LT.
    n_max : int, default=None
        Size of the largest class; by default the size of the smallest class
        of ``y``, so that every class can supply its share.
    step_fraction : float, default=0.5
        Fraction of minority classes of the ``"step"`` profile.
    random_state : int, RandomState instance or None, default=None
        Decides which samples of each class are kept.

    Returns
    -------
    indices : ndarray of shape (n_subset,)
        Sorted positions in ``y``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.repeat([0, 1, 2], 100)
    >>> idx = long_tailed_subset(y, imbalance_ratio=10, random_state=0)
    >>> np.bincount(y[idx]).tolist()
    [100, 31, 10]
    """
    y = np.asarray(y)
    order = _class_order(y, class_order)
    members = {label: np.flatnonzero(y == label) for label in order}
    if n_max is None:
        n_max = min(len(m) for m in members.values())
    counts = long_tail_counts(
        n_max, len(order), imbalance_ratio, profile=profile, step_fraction=step_fraction
    )
    rng = check_random_state(random_state)
    chosen = []
    for label, n_keep in zip(order, counts, strict=True):
        available = members[label]
        if n_keep > len(available):
            raise ValueError(
                f"Class {label.item()!r} has {len(available)} samples but the {profile} "
                f"profile with n_max={n_max} and imbalance_ratio={imbalance_ratio} needs {n_keep}; "
                "lower n_max or reorder the classes (class_order)."
            )
        chosen.append(rng.choice(available, n_keep, replace=False))
    return np.sort(np.concatenate(chosen))


@validate_params(
    {
        "y": ["array-like"],
        "imbalance_ratios": ["array-like"],
        "class_order": ["array-like", None],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def shifted_test_subsets(
    y, *, imbalance_ratios=TEST_DISTRIBUTIONS, class_order=None, random_state=0
):
    """The test-agnostic family of test sets drawn from a balanced test set.

    Follows SADE's protocol (Zhang et al., NeurIPS 2022): forward long-tailed
    sets (same class order as training, largest class first), the uniform set
    (all of ``y``) and backward sets (order reversed), each drawn with the
    exponential profile and ``n_max`` the smallest class size of ``y``.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels of the balanced test set.
    imbalance_ratios : array-like of float, default=(50, 25, 10, 5, 2)
        Ratios of the forward and backward sets, from the most skewed.
    class_order : array-like, default=None
        Training order of the classes (largest first); by default sorted labels.
    random_state : int, RandomState instance or None, default=0
        Decides the samples of each subset.

    Returns
    -------
    subsets : dict of str to ndarray
        ``{"forward_50": idx, ..., "uniform": idx, ..., "backward_50": idx}``,
        in that order: from the training skew, through uniform, to its inverse.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.repeat([0, 1, 2], 100)
    >>> sets = shifted_test_subsets(y, imbalance_ratios=[10])
    >>> list(sets)
    ['forward_10', 'uniform', 'backward_10']
    >>> np.bincount(y[sets["backward_10"]]).tolist()
    [10, 31, 100]
    """
    y = np.asarray(y)
    order = _class_order(y, class_order)
    ratios = [float(r) for r in imbalance_ratios]
    rng = check_random_state(random_state)

    def subset(ratio, classes):
        return long_tailed_subset(y, ratio, class_order=classes, random_state=rng)

    subsets = {f"forward_{r:g}": subset(r, order) for r in ratios}
    subsets["uniform"] = np.arange(len(y))
    subsets.update({f"backward_{r:g}": subset(r, order[::-1]) for r in reversed(ratios)})
    return subsets


@validate_params(
    {
        "y": ["array-like"],
        "val_size": [Interval(Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def train_val_split(y, *, val_size=0.2, random_state=None):
    """Stratified split that never leaves a class empty in the training part.

    Each class with ``n >= 2`` samples puts ``round(val_size * n)`` of them,
    but at least 1 and at most ``n - 1``, in the validation part. A class with
    a single sample cannot be split: it stays in the training part and a
    warning names it. Unlike ``train_test_split(stratify=y)``, this works on
    long-tailed labels with classes of one or two samples.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels.
    val_size : float, default=0.2
        Fraction of each class to hold out.
    random_state : int, RandomState instance or None, default=None
        Decides which samples are held out.

    Returns
    -------
    train_idx, val_idx : ndarray
        Sorted positions in ``y``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([0] * 10 + [1] * 2)
    >>> train, val = train_val_split(y, val_size=0.2, random_state=0)
    >>> np.bincount(y[train]).tolist(), np.bincount(y[val]).tolist()
    ([8, 1], [2, 1])
    """
    y = np.asarray(y)
    rng = check_random_state(random_state)
    train, val, single = [], [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        if len(members) == 1:
            single.append(label)
            train.append(members)
            continue
        n_val = min(max(int(round(val_size * len(members))), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    if single:
        warnings.warn(
            f"{len(single)} class(es) have a single sample and stay in the training part only, "
            f"so the validation part lacks them: {[s.item() for s in np.asarray(single)][:20]}.",
            UserWarning,
            stacklevel=2,
        )
    empty = np.empty(0, dtype=np.intp)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val or [empty]))


def load_long_tailed_digits(*, imbalance_ratio=10, random_state=0):
    """scikit-learn's digits, with a long-tailed training half and a balanced test half.

    A small real data set (8x8 images, 64 features, 10 classes) for examples,
    doctests and the demo. The digits are split in two stratified halves; the
    training half is made long-tailed with :func:`long_tailed_subset`.

    Parameters
    ----------
    imbalance_ratio : float, default=10
        Imbalance ratio of the training half.
    random_state : int, RandomState instance or None, default=0
        Decides the split and the subset.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        ``X_train``, ``y_train`` (long-tailed), ``X_test``, ``y_test``
        (balanced), ``target_names``, ``class_counts`` (training samples per class).

    Examples
    --------
    >>> data = load_long_tailed_digits(random_state=0)
    >>> data.class_counts.tolist()
    [87, 67, 52, 40, 31, 24, 18, 14, 11, 8]
    >>> data.X_test.shape
    (899, 64)
    """
    rng = check_random_state(random_state)
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.5, stratify=y, random_state=rng
    )
    keep = long_tailed_subset(y_train, imbalance_ratio, random_state=rng)
    return Bunch(
        X_train=X_train[keep],
        y_train=y_train[keep],
        X_test=X_test,
        y_test=y_test,
        target_names=np.arange(10),
        class_counts=np.bincount(y_train[keep], minlength=10),
    )


# Past this the class means vanish in the noise, and the float16 of a file overflows.
_MAX_NOISE = 1000


@validate_params(
    {
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "n_features": [Interval(Integral, 1, None, closed="left")],
        "n_classes": [Interval(Integral, 2, None, closed="left")],
        "imbalance_ratio": [Interval(Real, 1, None, closed="left")],
        "noise": [Interval(Real, 0, _MAX_NOISE, closed="both")],
        "random_state": ["random_state"],
        "path": [str, os.PathLike, None],
        "overwrite": ["boolean"],
        "block_rows": [Interval(Integral, 1, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def make_long_tailed_embeddings(
    n_samples,
    n_features,
    n_classes,
    *,
    imbalance_ratio=100,
    noise=1.0,
    random_state=None,
    path=None,
    overwrite=False,
    block_rows=65536,
):
    """Synthetic long-tailed embeddings: class means on a sphere plus Gaussian noise.

    Shaped like real embedding sets for scale tests (ImageNet-LT: 115,846 x
    1,024, 1,000 classes, imbalance 256; iNaturalist 2018: 437,513 rows, 8,142
    classes, imbalance 500). Class sizes follow the exponential profile
    (:func:`long_tail_counts`), scaled to ``n_samples`` rows in all; rows come
    in a random order. Each row is ``m_y + noise * e``, with ``m_y`` a random
    unit vector and ``e`` Gaussian with norm about one. Rows are generated in
    blocks from seeds derived from ``random_state``, so a file and an array
    of the same arguments hold the same values (up to the file's float16).

    Parameters
    ----------
    n_samples, n_features, n_classes : int
        Every class gets at least one row: ``n_samples >= n_classes``.
    imbalance_ratio : float, default=100
        Largest over smallest class size.
    noise : float, default=1.0
        Norm of the noise relative to the class means', at most 1000.
    random_state : int, RandomState instance or None, default=None
    path : str or path-like, default=None
        Write a feature file (split ``"train"``, float16) block by block
        instead of returning arrays: the data never has to fit in memory.
    overwrite : bool, default=False
        Replace an existing file at ``path`` (atomically: the old one stays
        intact until the new one is complete); without it an existing file
        is an error.
    block_rows : int, default=65536
        Rows generated (and written) at a time.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features) of float32
    y : ndarray of shape (n_samples,) of int64
        Or, with ``path``, the path of the feature file.

    Examples
    --------
    >>> X, y = make_long_tailed_embeddings(1000, 8, 5, imbalance_ratio=10, random_state=0)
    >>> X.shape, np.bincount(y).tolist()
    ((1000, 8), [466, 260, 146, 82, 46])
    """
    if n_samples < n_classes:
        raise ValueError(
            f"n_samples={n_samples} is less than n_classes={n_classes}: every class needs at "
            "least one row. Raise n_samples or lower n_classes."
        )
    if path is not None:
        from ltlearn.features.io import _check_output_path

        # Before generating anything: the rows may take long to make.
        _check_output_path(path, overwrite)
    rng = check_random_state(random_state)
    n_max = _largest_class_for(n_samples, n_classes, imbalance_ratio)
    counts = long_tail_counts(n_max, n_classes, imbalance_ratio)
    counts[0] += n_samples - counts.sum()
    y = rng.permutation(np.repeat(np.arange(n_classes), counts))
    means = rng.standard_normal((n_classes, n_features))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    seed = int(rng.randint(np.iinfo(np.int32).max))

    def block(start):
        stop = min(start + block_rows, n_samples)
        block_rng = np.random.default_rng([seed, start])
        e = block_rng.standard_normal((stop - start, n_features), dtype=np.float32)
        X = means[y[start:stop]].astype(np.float32) + float(noise / np.sqrt(n_features)) * e
        return X, y[start:stop]

    starts = range(0, n_samples, block_rows)
    if path is None:
        parts = [block(start)[0] for start in starts]
        return np.concatenate(parts), y.astype(np.int64)
    from ltlearn.features.io import FeatureWriter

    classes = [f"class {c}" for c in range(n_classes)]
    attrs = {"backbone": "synthetic", "weights": f"make_long_tailed_embeddings(seed={seed})"}
    with FeatureWriter(path, classes=classes, attrs=attrs, mode="w") as writer:
        for start in starts:
            writer.append("train", *block(start))
    return path


def _largest_class_for(n_samples, n_classes, imbalance_ratio):
    """The largest class size whose exponential profile holds at most ``n_samples`` rows."""
    low, high = 1, n_samples
    while low < high:
        mid = (low + high + 1) // 2
        if long_tail_counts(mid, n_classes, imbalance_ratio).sum() <= n_samples:
            low = mid
        else:
            high = mid - 1
    return low
