"""
CIFAR-10-LT from the shared feature file
========================================

CIFAR-10-LT on frozen EfficientNet-Lite0 embeddings: the long-tailed protocol end to end.

Uses the real feature file of the project (``../shared/data/cifar10_effnetlite0.h5``)
or any feature file with ``train`` and ``test`` splits:

    python examples/cifar10_lt.py [--features FILE] [--imbalance-ratio 100]

Prints uniform-test accuracy, many / medium / few and head / middle / tail
accuracy, and accuracy over SADE's 11 shifted test distributions: as trained,
adapted to each test set's unlabeled features, and told each test set's class
prior. scikit-learn's digits stand in when the feature file is absent.
"""

import argparse
from pathlib import Path

import numpy as np
from _cli import HelpFormatter

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features
from ltlearn.metrics import evaluate_test_agnostic, group_accuracy, rank_groups, shot_accuracy

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
    X, y = X_pool[keep], y_pool[keep]
else:
    if features is not None:
        print(f"{features} not found: using scikit-learn's digits, made long-tailed (IR 10).")
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X, y, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test


def show(label, table):
    cells = "".join(f"{100 * v:>8.1f}" for v in table.values())
    print(f"  {label:<34}{cells}   mean {100 * np.mean(list(table.values())):.1f}")


for tau in (1.0, 0.0):
    clf = BalancedSoftmaxClassifier(tau=tau, random_state=0).fit(X, y)
    y_pred = clf.predict(X_test)
    print(f"\ntau={tau:g} ({'Balanced Softmax' if tau else 'plain cross-entropy'})")
    print("  class counts:", clf.class_counts_.tolist())
    # Ten classes: the many (>100) / few (<20) groups are thin, so also head / middle / tail.
    shots = shot_accuracy(y_test, y_pred, clf.class_counts_)
    ranks = group_accuracy(y_test, y_pred, rank_groups(clf.class_counts_))
    groups = {**shots, **ranks}
    print(
        "  "
        + "  ".join(
            f"{k} {'-' if np.isnan(v) else f'{100 * v:.1f}'}"
            for k, v in groups.items()
            if k != "overall"
        )
    )
    print(f"  uniform test accuracy {100 * shots['overall']:.1f}")
    agnostic = evaluate_test_agnostic(clf, X_test, y_test)
    names = [n.replace("forward_", "F").replace("backward_", "B") for n in agnostic]
    print(f"  {'test set (F: forward, B: backward)':<34}" + "".join(f"{n:>8}" for n in names))
    show("predicted as trained", agnostic)
    show(
        "adapted: prior inferred (adapt)", evaluate_test_agnostic(clf, X_test, y_test, adapt="map")
    )
    show("told the true test prior", evaluate_test_agnostic(clf, X_test, y_test, oracle_prior=True))
print(
    "\nTold the true prior, tau=0 and tau=1 give the same predictions: the shift replaces the "
    "training prior that each logit carries (tau log p) by the test prior, whatever tau was."
)
