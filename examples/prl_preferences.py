"""
Steering PRLClassifier with preferences
=======================================

PRLClassifier: steer head-vs-tail at predict time, and draw the preference simplex.

Fits one PRLClassifier on CIFAR-10-LT embeddings (the project's real feature
file, or any file with ``train`` and ``test`` splits; scikit-learn's digits when
none is given or found), then, without refitting:

- prints accuracy on the forward-50, uniform and backward-50 test sets at the
  three corners and at the preference suggested for each test set;
- writes ``prl_simplex.png``: accuracy over the whole preference simplex.

    python examples/prl_preferences.py [--features FILE] [--imbalance-ratio 100] [--out FILE]

Needs the ``plot`` extra (``pip install -e ".[plot]"``).
"""

import argparse
from pathlib import Path

import numpy as np
from _cli import HelpFormatter

from ltlearn import PRLClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset, shifted_test_subsets
from ltlearn.features import read_features
from ltlearn.metrics import rank_groups, shot_groups
from ltlearn.plotting import plot_preference_simplex

# sphinx-gallery runs examples without __file__, from their folder.
_HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DEFAULT = _HERE.parents[1] / "shared" / "data" / "cifar10_effnetlite0.h5"


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument(
    "--features",
    type=Path,
    help="feature file with train and test splits (default: the project's CIFAR-10 file, "
    "or scikit-learn's digits when it is absent)",
)
parser.add_argument(
    "--imbalance-ratio", type=float, default=100, help="imbalance ratio of the training set"
)
parser.add_argument("--out", type=Path, default=Path("prl_simplex.png"), help="figure to write")
parser.add_argument(
    "--digits", action="store_true", help="use scikit-learn's digits instead (seconds)"
)
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = None if args.digits else (args.features or DEFAULT)

if features is not None and features.exists():
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X_train, y_train = X_pool[keep], y_pool[keep]
    ratio = 50
else:
    if features is not None:
        print(f"{features} not found: using scikit-learn's digits, made long-tailed (IR 10).")
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    ratio = 10

clf = PRLClassifier(random_state=0).fit(X_train, y_train)
print("training samples per class:", clf.class_counts_.tolist())

subsets = shifted_test_subsets(y_test, imbalance_ratios=[ratio], random_state=0)
suggested = {
    f"forward_{ratio}": clf.preference_for_imbalance(ratio, "forward"),
    "uniform": "uniform",
    f"backward_{ratio}": clf.preference_for_imbalance(ratio, "backward"),
}
print(f"\n{'preference':>22}" + "".join(f"{name:>14}" for name in subsets))
for preference in ("forward", "uniform", "backward"):
    row = [
        np.mean(clf.predict(X_test[i], preference=preference) == y_test[i])
        for i in subsets.values()
    ]
    print(f"{preference:>22}" + "".join(f"{100 * a:>14.1f}" for a in row))
row = [
    np.mean(clf.predict(X_test[i], preference=suggested[name]) == y_test[i])
    for name, i in subsets.items()
]
print(f"{'suggested per test set':>22}" + "".join(f"{100 * a:>14.1f}" for a in row))

# Ten classes are too few for the many (>100) / few (<20) split: use 3 / 4 / 3 by size.
groups = (
    rank_groups(clf.class_counts_) if len(clf.classes_) <= 20 else shot_groups(clf.class_counts_)
)
plot_preference_simplex(clf, X_test, y_test, groups=groups, imbalance_ratio=ratio, path=args.out)
print(f"\nwrote {args.out}")
