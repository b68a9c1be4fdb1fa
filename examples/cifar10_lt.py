"""CIFAR-10-LT on frozen EfficientNet-Lite0 embeddings: the long-tailed protocol end to end.

Uses the real feature file of the project (``../shared/data/cifar10_effnetlite0.h5``)
or any feature file with ``train`` and ``test`` splits:

    python examples/cifar10_lt.py [--features FILE] [--imbalance-ratio 100]

Prints uniform-test accuracy, many / medium / few and head / middle / tail
accuracy, and accuracy over SADE's 11 shifted test distributions, with and
without telling the model each test set's class prior.
"""

import argparse
from pathlib import Path

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import read_features
from ltlearn.metrics import evaluate_test_agnostic, group_accuracy, rank_groups, shot_accuracy

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_effnetlite0.h5"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--features", type=Path, default=DEFAULT)
parser.add_argument("--imbalance-ratio", type=float, default=100)
args = parser.parse_args()

X_pool, y_pool = read_features(args.features, "train")
X_test, y_test = read_features(args.features, "test")
keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
X, y = X_pool[keep], y_pool[keep]

for tau in (1.0, 0.0):
    clf = BalancedSoftmaxClassifier(tau=tau, random_state=0).fit(X, y)
    y_pred = clf.predict(X_test)
    print(f"\ntau={tau:g} ({'Balanced Softmax' if tau else 'plain cross-entropy'})")
    print("  class counts:", clf.class_counts_.tolist())
    shots = shot_accuracy(y_test, y_pred, clf.class_counts_)
    ranks = group_accuracy(y_test, y_pred, rank_groups(clf.class_counts_))
    print(
        "  "
        + "  ".join(f"{k} {100 * v:.1f}" for k, v in {**shots, **ranks}.items() if k != "overall")
    )
    print(f"  uniform test accuracy {100 * shots['overall']:.1f}")
    for oracle in (False, True):
        table = evaluate_test_agnostic(clf, X_test, y_test, oracle_prior=oracle)
        label = "with true test prior" if oracle else "test-agnostic       "
        print(f"  {label}: " + " ".join(f"{100 * v:.1f}" for v in table.values()))
