# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Steering PRLClassifier with preferences
=======================================

One PRLClassifier, fitted once, steered between head and tail classes at predict time:
its accuracy on a forward-long-tailed, a uniform and a backward-long-tailed test set at
the three corners of its preference simplex and at the preference it suggests for each
test set, then its accuracy over the whole simplex.

It reads any feature file with ``train`` and ``test`` splits (``ltlearn extract`` writes
one); without one it uses scikit-learn's digits, made long-tailed, and runs in seconds:

.. code-block:: console

    python prl_preferences.py --features FILE --imbalance-ratio 100 --out prl_simplex.png
    python prl_preferences.py --digits

Needs pandas and matplotlib (``pip install pandas matplotlib``).
"""

import argparse
from pathlib import Path

# %%
# The data
# --------
# By default the script looks for the project's CIFAR-10 EfficientNet-Lite0 embeddings
# in ``shared/data/`` beside its checkout (:ref:`how to make that file <cifar10-files>`);
# pass ``--features FILE`` for your own file, or ``--digits``.

# sphinx-gallery runs examples without __file__, from their folder.
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
project_file = here.parent.parent / "shared" / "data" / "cifar10_effnetlite0.h5"


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


parser = argparse.ArgumentParser(description="Steering PRLClassifier with preferences.")
parser.add_argument("--features", type=Path, help="feature file with train and test splits")
parser.add_argument(
    "--imbalance-ratio", type=float, default=100, help="of the training set (default: 100)"
)
parser.add_argument(
    "--out", type=Path, default=Path("prl_simplex.png"), help="figure (default: prl_simplex.png)"
)
parser.add_argument("--digits", action="store_true", help="use scikit-learn's digits (seconds)")
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = args.features or (None if args.digits or not project_file.exists() else project_file)

import numpy as np
import pandas as pd

from ltlearn import PRLClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset, shifted_test_subsets
from ltlearn.features import read_features
from ltlearn.metrics import rank_groups, shot_groups
from ltlearn.plotting import plot_preference_simplex

if features is not None:
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X_train, y_train = X_pool[keep], y_pool[keep]
    ratio = 50  # of the shifted test sets
else:
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    ratio = 10

clf = PRLClassifier(random_state=0).fit(X_train, y_train)
print("training rows per class:", clf.class_counts_.tolist())

# %%
# Corners and suggested preferences
# ---------------------------------
# ``preference="forward"`` favours the head classes, ``"backward"`` the tail,
# ``"uniform"`` neither; ``preference_for_imbalance`` suggests a point for a test set
# whose imbalance ratio and direction are known. No refit: the preference is a
# ``predict`` argument.

subsets = shifted_test_subsets(y_test, imbalance_ratios=[ratio], random_state=0)
suggested = {
    f"forward_{ratio}": clf.preference_for_imbalance(ratio, "forward"),
    "uniform": "uniform",
    f"backward_{ratio}": clf.preference_for_imbalance(ratio, "backward"),
}


def accuracy(preference, rows):
    return 100 * np.mean(clf.predict(X_test[rows], preference=preference) == y_test[rows])


table = pd.DataFrame(
    {
        f"preference {p}": {name: accuracy(p, rows) for name, rows in subsets.items()}
        for p in ("forward", "uniform", "backward")
    }
).T
table.loc["suggested per test set"] = [accuracy(suggested[n], r) for n, r in subsets.items()]
table.columns.name = "test set"
show(table.round(1))

# %%
# The whole simplex
# -----------------
# Accuracy on the uniform test set over the preference simplex, overall and per group
# of classes. Ten classes are too few for the many (> 100) / few (< 20) split: they are
# grouped 3 / 4 / 3 by training-set size.

groups = (
    rank_groups(clf.class_counts_) if len(clf.classes_) <= 20 else shot_groups(clf.class_counts_)
)
figure = plot_preference_simplex(
    clf, X_test, y_test, groups=groups, imbalance_ratio=ratio, path=args.out
)
print(f"wrote {args.out}")
