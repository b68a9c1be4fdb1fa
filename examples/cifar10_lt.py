# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
CIFAR-10-LT from a feature file
===============================

Long-tailed classification on frozen embeddings, end to end: a long-tailed training set
drawn from a feature file, a BalancedSoftmaxClassifier fitted on it, its accuracy per
group of classes, and its accuracy over SADE's 11 shifted test distributions: as trained,
adapted to each test set's unlabeled features, and told each test set's class prior.

It reads any feature file with ``train`` and ``test`` splits (``ltlearn extract`` writes
one, see the getting-started page); without one it uses scikit-learn's digits, made
long-tailed, and runs in seconds:

.. code-block:: console

    python cifar10_lt.py --features cifar10_effnetlite0.h5 --imbalance-ratio 100
    python cifar10_lt.py --digits

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


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


project_file = here.parent.parent / "shared" / "data" / "cifar10_effnetlite0.h5"

parser = argparse.ArgumentParser(
    description="CIFAR-10-LT from a feature file: per-group and shifted-test-set accuracy."
)
parser.add_argument("--features", type=Path, help="feature file with train and test splits")
parser.add_argument(
    "--imbalance-ratio", type=float, default=100, help="of the training set (default: 100)"
)
parser.add_argument("--digits", action="store_true", help="use scikit-learn's digits (seconds)")
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = args.features or (None if args.digits or not project_file.exists() else project_file)

import matplotlib.pyplot as plt
import pandas as pd

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features
from ltlearn.metrics import evaluate_test_agnostic, group_accuracy, rank_groups, shot_accuracy

if features is not None:
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X, y = X_pool[keep], y_pool[keep]
    print(f"{features.name}: IR {args.imbalance_ratio:g}, {len(y)} training rows")
else:
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X, y, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    print(f"scikit-learn's digits, made long-tailed (IR 10): {len(y)} training rows")

# %%
# Accuracy per group of classes
# -----------------------------
# Two heads on the same features: Balanced Softmax (``tau=1``) and plain cross-entropy
# (``tau=0``). Ten classes make the usual many (> 100) / few (< 20) groups thin, so the
# table also gives head / middle / tail thirds by training-set size.

models = {tau: BalancedSoftmaxClassifier(tau=tau, random_state=0).fit(X, y) for tau in (1.0, 0.0)}
rows = {}
for tau, clf in models.items():
    y_pred = clf.predict(X_test)
    groups = {
        **shot_accuracy(y_test, y_pred, clf.class_counts_),
        **group_accuracy(y_test, y_pred, rank_groups(clf.class_counts_)),
    }
    rows[f"tau={tau:g}"] = {name: 100 * value for name, value in groups.items()}
print("training rows per class:", models[1.0].class_counts_.tolist())
show(pd.DataFrame(rows).T.dropna(axis=1, how="all").round(1))

# %%
# Accuracy over shifted test sets
# -------------------------------
# SADE's protocol draws forward-long-tailed (F, head classes frequent), uniform and
# backward (B, tail classes frequent) test sets from the balanced one. ``adapt``
# estimates each test set's class prior from its unlabeled features; the last rows are
# told the true prior.

rows = {}
for tau, clf in models.items():
    ways = {
        "as trained": evaluate_test_agnostic(clf, X_test, y_test),
        "adapted (prior inferred)": evaluate_test_agnostic(clf, X_test, y_test, adapt="map"),
        "true test prior given": evaluate_test_agnostic(clf, X_test, y_test, oracle_prior=True),
    }
    for way, table in ways.items():
        rows[f"tau={tau:g}, {way}"] = {
            name.replace("forward_", "F").replace("backward_", "B"): 100 * value
            for name, value in table.items()
        }
shifted = pd.DataFrame(rows).T
shifted["mean"] = shifted.mean(axis=1)
show(shifted.round(1))

# %%
# Balanced Softmax (``tau=1``) on the shifted test sets, as a plot:

figure, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
for way in ("as trained", "adapted (prior inferred)", "true test prior given"):
    row = shifted.loc[f"tau=1, {way}"].drop("mean")
    ax.plot(row.index, row.to_numpy(), marker="o", label=way)
ax.set_xlabel("test set (F: head classes frequent, B: tail classes frequent)")
ax.set_ylabel("accuracy (%)")
ax.grid(alpha=0.3)
ax.legend()

# %%
# Told the true prior, ``tau=0`` and ``tau=1`` give the same predictions: the shift
# replaces the training prior that each logit carries (``tau * log p``) by the test
# prior, whatever ``tau`` was.

plt.show()  # a window when run as a script; nothing under a non-interactive backend
