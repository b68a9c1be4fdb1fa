"""
Grid search over long-tailed pipelines
======================================

``GridSearchCV`` over a ``Pipeline`` that ends in a BalancedSoftmaxClassifier (its
``tau``, ``head`` and ``weight_decay``) and over a PRLClassifier, scored with the
long-tail scorers of :mod:`ltlearn.metrics` (balanced accuracy, which estimates
accuracy on a balanced test set from long-tailed folds, and few-shot accuracy),
on two cores (``n_jobs=2``). Prints the best parameters and the table of
cross-validated scores, and plots the mean score against each parameter.

Uses the project's CIFAR-10-LT embeddings (IR 100) when the shared feature file is
there, scikit-learn's digits (IR 10) otherwise.

    python examples/grid_search.py [--features FILE] [--out FILE]
"""

import argparse
from pathlib import Path

import numpy as np
from _cli import HelpFormatter
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn._optional import import_optional
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features
from ltlearn.metrics import SCORERS, make_shot_scorer

# sphinx-gallery runs examples without __file__, from their folder.
_HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DEFAULT = _HERE.parents[1] / "shared" / "data" / "cifar10_effnetlite0.h5"


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument(
    "--features",
    type=Path,
    help="feature file with a train split (default: the project's CIFAR-10 file, "
    "or scikit-learn's digits when it is absent)",
)
parser.add_argument("--out", type=Path, default=Path("grid_search.png"), help="figure to write")
parser.add_argument("--n-jobs", type=int, default=2, help="parallel fits")
parser.add_argument(
    "--digits", action="store_true", help="use scikit-learn's digits instead (seconds)"
)
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = None if args.digits else (args.features or DEFAULT)

if features is not None and features.exists():
    X_pool, y_pool = read_features(features, "train")
    keep = long_tailed_subset(y_pool, 100, random_state=0)
    X, y = X_pool[keep], y_pool[keep]
    many, few = 100, 100  # ten classes: the 3 rarest have fewer than 100 samples
    print(f"CIFAR-10-LT (IR 100): {len(y)} training rows")
else:
    if features is not None:
        print(f"{features} not found: using scikit-learn's digits, made long-tailed (IR 10).")
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X, y = data.X_train, data.y_train
    many, few = 50, 20
scoring = {
    "balanced_accuracy": SCORERS["balanced_accuracy"],
    "few_shot_accuracy": make_shot_scorer("few", many_threshold=many, few_threshold=few),
}
folds = StratifiedKFold(3, shuffle=True, random_state=0)

pipe = Pipeline(
    [("scale", StandardScaler()), ("clf", BalancedSoftmaxClassifier(device="cpu", random_state=0))]
)
grid = {
    "clf__tau": [0.0, 0.5, 1.0],
    "clf__head": ["linear", "cosine"],
    "clf__weight_decay": [1e-3, 1e-2, 1e-1],
}
search = GridSearchCV(
    pipe, grid, scoring=scoring, refit="balanced_accuracy", cv=folds, n_jobs=args.n_jobs
).fit(X, y)
print("\nBalancedSoftmaxClassifier pipeline, best parameters:", search.best_params_)
results = search.cv_results_
print(f"\n{'tau':>5} {'head':>8} {'weight_decay':>13} {'balanced acc':>13} {'few-shot acc':>13}")
for i in np.argsort(results["rank_test_balanced_accuracy"]):
    p = results["params"][i]
    print(
        f"{p['clf__tau']:>5g} {p['clf__head']:>8} {p['clf__weight_decay']:>13g} "
        f"{100 * results['mean_test_balanced_accuracy'][i]:>12.1f}% "
        f"{100 * results['mean_test_few_shot_accuracy'][i]:>12.1f}%"
    )

prl = GridSearchCV(
    PRLClassifier(device="cpu", random_state=0),
    {"lam": [1.0, 2.0], "rank": [0, 8]},
    scoring=scoring,
    refit="balanced_accuracy",
    cv=folds,
    n_jobs=args.n_jobs,
).fit(X, y)
print("\nPRLClassifier, best parameters:", prl.best_params_)
for params, score in zip(
    prl.cv_results_["params"], prl.cv_results_["mean_test_balanced_accuracy"], strict=True
):
    print(f"  {params}: balanced accuracy {100 * score:.1f}%")

# Mean cross-validated balanced accuracy against each parameter, the others at their best.
plt = import_optional("matplotlib.pyplot", "plot")
figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
best = search.best_params_
for ax, name in zip(axes, grid, strict=True):
    others = {k: v for k, v in best.items() if k != name}
    rows = [i for i, p in enumerate(results["params"]) if all(p[k] == v for k, v in others.items())]
    values = [results["params"][i][name] for i in rows]
    means = 100 * results["mean_test_balanced_accuracy"][rows]
    stds = 100 * results["std_test_balanced_accuracy"][rows]
    positions = np.arange(len(values))
    ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3)
    ax.set_xticks(positions, [str(v) for v in values])
    ax.set_xlabel(name.removeprefix("clf__"))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("balanced accuracy (%), 3-fold CV")
figure.suptitle("BalancedSoftmaxClassifier pipeline: each parameter, the others at their best")
figure.tight_layout()
figure.savefig(args.out, dpi=110)
print(f"\nwrote {args.out}")
