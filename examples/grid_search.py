# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Grid search over long-tailed pipelines
======================================

``GridSearchCV`` over a ``Pipeline`` that ends in a BalancedSoftmaxClassifier (its
``tau``, ``head`` and ``weight_decay``) and over a PRLClassifier, scored with the
long-tail scorers of ``ltlearn.metrics``: balanced accuracy, which estimates accuracy on
a balanced test set from long-tailed folds, and few-shot accuracy.

It reads any feature file with a ``train`` split (``ltlearn extract`` writes one); without
one it uses scikit-learn's digits, made long-tailed, and runs in seconds:

.. code-block:: console

    python grid_search.py --features FILE --n-jobs 2 --out grid_search.png
    python grid_search.py --digits

Needs pandas and matplotlib (``pip install pandas matplotlib``).
"""

import argparse
from pathlib import Path

# %%
# The data
# --------
# By default the script looks for the project's CIFAR-10 EfficientNet-Lite0 embeddings
# (CIFAR-10-LT at IR 100) in ``shared/data/`` beside its checkout (:ref:`how to make that
# file <cifar10-files>`); pass ``--features FILE`` for your own file, or ``--digits`` (IR 10).

# sphinx-gallery runs examples without __file__, from their folder.
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
project_file = here.parent.parent / "shared" / "data" / "cifar10_effnetlite0.h5"


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


parser = argparse.ArgumentParser(description="Grid search over long-tailed pipelines.")
parser.add_argument("--features", type=Path, help="feature file with a train split")
parser.add_argument(
    "--out", type=Path, default=Path("grid_search.png"), help="figure (default: grid_search.png)"
)
parser.add_argument("--n-jobs", type=int, default=2, help="parallel fits (default: 2)")
parser.add_argument("--digits", action="store_true", help="use scikit-learn's digits (seconds)")
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = args.features or (None if args.digits or not project_file.exists() else project_file)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features
from ltlearn.metrics import SCORERS, make_shot_scorer

if features is not None:
    X_pool, y_pool = read_features(features, "train")
    keep = long_tailed_subset(y_pool, 100, random_state=0)
    X, y = X_pool[keep], y_pool[keep]
    many, few = 100, 100  # ten classes: the 3 rarest have fewer than 100 samples
    print(f"{features.name}, IR 100: {len(y)} training rows")
else:
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X, y = data.X_train, data.y_train
    many, few = 50, 20
    print(f"scikit-learn's digits, IR 10: {len(y)} training rows")

# %%
# A pipeline ending in BalancedSoftmaxClassifier
# ----------------------------------------------
# Both scorers are computed on every fold; ``refit`` picks the model by balanced
# accuracy. The table lists the grid from best to worst.

scoring = {
    "balanced_accuracy": SCORERS["balanced_accuracy"],
    "few_shot_accuracy": make_shot_scorer("few", many_threshold=many, few_threshold=few),
}
folds = StratifiedKFold(3, shuffle=True, random_state=0)

# calibration_cv=None: the cross-fitted temperature serves adapt(), which the search does
# not call; without it each fit is about four times faster.
clf = BalancedSoftmaxClassifier(device="cpu", calibration_cv=None, random_state=0)
pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)])
grid = {
    "clf__tau": [0.0, 0.5, 1.0],
    "clf__head": ["linear", "cosine"],
    "clf__weight_decay": [1e-3, 1e-2, 1e-1],
}
search = GridSearchCV(
    pipe, grid, scoring=scoring, refit="balanced_accuracy", cv=folds, n_jobs=args.n_jobs
).fit(X, y)
print("best parameters:", search.best_params_)
results = pd.DataFrame(search.cv_results_)
columns = {f"param_clf__{p}": p for p in ("tau", "head", "weight_decay")}
columns |= {"mean_test_balanced_accuracy": "balanced acc. (%)"}
columns |= {"mean_test_few_shot_accuracy": "few-shot acc. (%)"}
table = results.sort_values("rank_test_balanced_accuracy")[list(columns)].rename(columns=columns)
table.iloc[:, 3:] *= 100
show(table.round(1).reset_index(drop=True))

# %%
# Each parameter, the others at their best
# ----------------------------------------
# Mean cross-validated balanced accuracy (and its standard deviation over the folds)
# against each parameter of the grid.

figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
best = search.best_params_
cv = search.cv_results_
for ax, name in zip(axes, grid, strict=True):
    others = {k: v for k, v in best.items() if k != name}
    rows = [i for i, p in enumerate(cv["params"]) if all(p[k] == v for k, v in others.items())]
    values = [cv["params"][i][name] for i in rows]
    means = 100 * cv["mean_test_balanced_accuracy"][rows]
    stds = 100 * cv["std_test_balanced_accuracy"][rows]
    positions = np.arange(len(values))
    ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3)
    ax.set_xticks(positions, [str(v) for v in values])
    ax.set_xlabel(name.removeprefix("clf__"))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("balanced accuracy (%), 3-fold CV")
figure.suptitle("BalancedSoftmaxClassifier pipeline: each parameter, the others at their best")
figure.tight_layout()
figure.savefig(args.out, dpi=110)
print(f"wrote {args.out}")

# %%
# PRLClassifier
# -------------
# Any ltlearn estimator goes into ``GridSearchCV`` the same way.

prl = GridSearchCV(
    PRLClassifier(device="cpu", calibration_cv=None, random_state=0),
    {"lam": [1.0, 2.0], "rank": [0, 8]},
    scoring=scoring,
    refit="balanced_accuracy",
    cv=folds,
    n_jobs=args.n_jobs,
).fit(X, y)
print("best parameters:", prl.best_params_)
prl_table = pd.DataFrame(prl.cv_results_["params"])
prl_table["balanced acc. (%)"] = 100 * prl.cv_results_["mean_test_balanced_accuracy"]
prl_table["few-shot acc. (%)"] = 100 * prl.cv_results_["mean_test_few_shot_accuracy"]
show(prl_table.round(1))
