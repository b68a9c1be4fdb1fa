# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Adapting to a shifted test set
==============================

A classifier trained on a long tail is, by default, right for a balanced test set. Real
test sets are rarely balanced, and their class frequencies are unknown. ``adapt``
estimates them from the unlabeled test features, tests whether they differ from what the
model assumes, and, only if they do, predicts for them. This example adapts one
BalancedSoftmaxClassifier to a balanced test set and to two shifted ones, looks at the
estimate and its uncertainty, at how many unlabeled rows it needs, at
``ltlearn.adaptation``'s estimators without adapting, and at SADE's 11 shifted test
sets.

It reads any feature file with ``train`` and ``test`` splits (``ltlearn extract`` writes
one); without one it uses scikit-learn's digits, made long-tailed, and runs in seconds:

.. code-block:: console

    python shifted_test_set.py --features FILE --imbalance-ratio 100
    python shifted_test_set.py --digits

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

parser = argparse.ArgumentParser(description="Adapting a classifier to a shifted test set.")
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
import numpy as np
import pandas as pd

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.adaptation import estimate_test_prior
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features
from ltlearn.plotting import ShiftedTestSetsDisplay


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


if features is not None:
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X_train, y_train = X_pool[keep], y_pool[keep]
    print(f"{features.name}: IR {args.imbalance_ratio:g}, {len(y_train)} training rows")
else:
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=1)
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    print(f"scikit-learn's digits, made long-tailed (IR 10): {len(y_train)} training rows")

# The default calibration_cv=3 cross-fits the temperature that adapt() reads.
clf = BalancedSoftmaxClassifier(random_state=0).fit(X_train, y_train)
print("training rows per class:", clf.class_counts_.tolist())

# %%
# Adapt, or not
# -------------
# Three test sets drawn from the balanced one: itself, a forward set (the training
# order: head classes frequent, the largest class 10 times the smallest) and a backward
# set (the order reversed: tail classes frequent). ``adapt`` only sees their features.
# Its likelihood-ratio test of "no shift" decides whether predictions change
# (``shift_detected_``, at the 5 % level by default); on the balanced set they should
# not.

order = clf.classes_[np.argsort(-clf.class_counts_, kind="stable")]
test_sets = {
    "balanced": np.arange(len(y_test)),
    "forward 10": long_tailed_subset(y_test, 10, class_order=order, random_state=0),
    "backward 10": long_tailed_subset(y_test, 10, class_order=order[::-1], random_state=0),
}
rows = {}
for name, idx in test_sets.items():
    X, y = X_test[idx], y_test[idx]
    as_trained = clf.reset_adaptation().score(X, y)
    clf.adapt(X)
    rows[name] = {
        "rows": len(idx),
        "accuracy as trained %": 100 * as_trained,
        "adapted %": 100 * clf.score(X, y),
        "shift p-value": f"{clf.shift_pvalue_:.1e}",
        "shift detected": clf.shift_detected_,
    }
show(pd.DataFrame.from_dict(rows, orient="index").round(2))

# %%
# Adapting is only as good as the model's posteriors: where the rarest classes have a
# handful of training rows (8 in digits' smallest class), their posteriors are rough,
# and predicting for a test set where they are frequent (the backward set) can cost
# accuracy instead of gaining it.

# %%
# The estimate and its uncertainty
# --------------------------------
# After ``adapt`` the model keeps the estimated prior (``test_prior_``), a 90 % interval
# per class (``test_prior_interval_``) and ``test_prior_effective_rows_``: how many
# labeled test rows would have pinned the prior down as precisely. Here for the
# backward set, the classes from the largest in training to the smallest. The
# interval assumes calibrated posteriors; where the model's posteriors of a class are
# off, the truth can fall outside it.

backward = test_sets["backward 10"]
clf.adapt(X_test[backward])
true_prior = np.bincount(np.searchsorted(clf.classes_, y_test[backward]), minlength=len(order))
true_prior = true_prior / len(backward)
ranks = np.argsort(-clf.class_counts_, kind="stable")
low, high = clf.test_prior_interval_
positions = np.arange(len(ranks))
figure, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
ax.bar(positions, true_prior[ranks], color="lightgray", label="true class prior")
ax.errorbar(
    positions,
    clf.test_prior_[ranks],
    yerr=[clf.test_prior_[ranks] - low[ranks], high[ranks] - clf.test_prior_[ranks]],
    fmt="o",
    color="tab:blue",
    capsize=3,
    label="estimated by adapt() from the unlabeled rows, 90 % interval",
)
ax.set_xticks(positions, [str(c) for c in clf.classes_[ranks]])
ax.set_xlabel("class, from the largest in training to the smallest")
ax.set_ylabel("share of the test set")
ax.set_title(
    f"Backward test set: {len(backward)} unlabeled rows, as informative as "
    f"{clf.test_prior_effective_rows_:.0f} labeled ones"
)
ax.legend(loc="upper left", fontsize=8)
covered = np.mean((low <= true_prior) & (true_prior <= high))
print(f"true prior inside the 90 % interval for {100 * covered:.0f} % of the classes")

# %%
# How many unlabeled rows
# -----------------------
# Adapting on a sample of the backward set and predicting for all of it: fewer rows give
# wider intervals and a weaker test, and the default estimator (``"map"``) shrinks
# small samples toward "no shift", so that a few rows cannot move predictions far.

rng = np.random.default_rng(0)
sizes = [n for n in (30, 100, 300) if n < len(backward)] + [len(backward)]
rows = {}
for n in sizes:
    sample = np.sort(rng.choice(backward, n, replace=False))
    clf.adapt(X_test[sample])
    low, high = clf.test_prior_interval_
    rows[n] = {
        "shift p-value": f"{clf.shift_pvalue_:.1e}",
        "shift detected": clf.shift_detected_,
        "mean interval width": np.mean(high - low),
        "accuracy on the whole set %": 100 * clf.score(X_test[backward], y_test[backward]),
    }
show(pd.DataFrame.from_dict(rows, orient="index").round(2).rename_axis("unlabeled rows"))

# %%
# Estimating without adapting
# ---------------------------
# :func:`ltlearn.adaptation.estimate_test_prior` gives the estimate, the interval and
# the test without changing the model, and works with any scikit-learn classifier that
# has ``predict_proba``. ``"map"`` (what ``adapt`` uses) is ``"em"``, maximum likelihood
# by EM, pulled toward "no shift" by a few pseudo-counts per class; ``"bbse"`` and
# ``"rlls"`` need held-out labeled rows (``validation=(X_val, y_val)``). The error is
# the L1 distance to the backward set's true prior.

clf.reset_adaptation()  # the null hypothesis is what the model predicts for today
rows = {}
for method in ("map", "em"):
    details = estimate_test_prior(clf, X_test[backward], method=method, return_details=True)
    low, high = details.interval
    rows[method] = {
        "L1 error": np.abs(details.estimate - true_prior).sum(),
        "classes inside the 90 % interval": np.sum((low <= true_prior) & (true_prior <= high)),
        "shift p-value": f"{details.pvalue:.1e}",
    }
show(pd.DataFrame.from_dict(rows, orient="index").round(2))

# %%
# SADE's 11 shifted test sets
# ---------------------------
# The test-agnostic protocol: forward sets from ratio 50 (F50) to 2, the balanced set,
# and backward sets from 2 to 50 (B50). Each test set is adapted to on its own
# unlabeled rows; the last line is the model told each set's true prior, the best that
# a correction of the prior can do with these posteriors. When the model's posteriors
# of the rarest classes are rough (digits have 8 training rows in the smallest), even
# the true prior can cost accuracy on the backward sets.

clf.reset_adaptation()
trained = ShiftedTestSetsDisplay.from_estimator(clf, X_test, y_test, name="as trained")
adapted = ShiftedTestSetsDisplay.from_estimator(
    clf, X_test, y_test, adapt="map", name="adapted to each test set", ax=trained.ax_
)
ShiftedTestSetsDisplay.from_estimator(
    clf, X_test, y_test, oracle_prior=True, name="told each test set's true prior", ax=trained.ax_
)
gain = 100 * np.mean([adapted.accuracy[t] - trained.accuracy[t] for t in trained.accuracy])
trained.ax_.set_title(f"Adapting: {gain:+.1f} points of accuracy, averaged over the 11 test sets")

plt.show()  # a window when run as a script; nothing under a non-interactive backend
