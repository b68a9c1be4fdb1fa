"""Every long-tail method of ltlearn, and scikit-learn's best, on one table.

CIFAR-10-LT from the shared EfficientNet-Lite0 embeddings (../shared/README.md),
IR 100, 50 and 10, 5 seeds (the seed draws the long-tailed training set and
seeds the model). In the same run, per IR: uniform-test accuracy, head /
middle / tail accuracy (the 3 / 4 / 3 classes by training size), the mean
over SADE's 11 shifted test sets, expected calibration error on the uniform
test set (15 bins), and fit time as a ratio to one
``LogisticRegression(max_iter=1000)`` fit on the same standardised data in the
same run; for RIDE, the mean number of experts its router used.

The scikit-learn baseline is ``LogisticRegression`` with ``C`` chosen on a
validation split of the training data (a stratified fifth, balanced accuracy
after post-hoc logit adjustment, seed 0 of each IR), then refitted and
logit-adjusted for each seed. ltlearn's estimators run with their defaults,
which were chosen on validation splits (see their docstrings); no setting was
chosen on the test set.

    python benchmarks/bench_methods.py [--ir 100 50 10] [--seeds 5]
"""

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import (
    BalancedSoftmaxClassifier,
    DecoupledClassifier,
    PRLClassifier,
    RIDEClassifier,
    SADEClassifier,
)
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets, train_val_split
from ltlearn.features import read_features
from ltlearn.metrics import expected_calibration_error, group_accuracy, rank_groups

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)


class AdjustedLogisticRegression:
    """A fitted standardised LogisticRegression with post-hoc logit adjustment."""

    def __init__(self, C):
        self.C = C

    def fit(self, X, y):
        self.pipe = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=1000))
        self.pipe.fit(X, y)
        self.log_prior = np.log(np.bincount(y) / len(y))
        return self

    def decision_function(self, X):
        return self.pipe.decision_function(X) - self.log_prior

    def predict_proba(self, X):
        z = self.decision_function(X)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        return np.argmax(self.decision_function(X), axis=1)


def tune_C(X, y, seed):
    fit_rows, held = train_val_split(y, val_size=0.2, random_state=seed)
    scores = []
    for C in C_GRID:
        model = AdjustedLogisticRegression(C).fit(X[fit_rows], y[fit_rows])
        scores.append(balanced_accuracy_score(y[held], model.predict(X[held])))
    return C_GRID[int(np.argmax(scores))]


MODELS = {
    "BalancedSoftmaxClassifier": lambda s: BalancedSoftmaxClassifier(random_state=s),
    "PRLClassifier (uniform preference)": lambda s: PRLClassifier(random_state=s),
    "SADEClassifier (equal weights)": lambda s: SADEClassifier(random_state=s),
    "RIDEClassifier (router)": lambda s: RIDEClassifier(random_state=s),
    "RIDEClassifier, LDAM-DRW (router)": lambda s: RIDEClassifier(loss="ldam_drw", random_state=s),
    "DecoupledClassifier cRT": lambda s: DecoupledClassifier("crt", random_state=s),
    "DecoupledClassifier tau-norm": lambda s: DecoupledClassifier("tau_norm", random_state=s),
    "DecoupledClassifier LWS": lambda s: DecoupledClassifier("lws", random_state=s),
}


def evaluate(model, X_test, y_test, subsets, groups):
    pred = np.asarray(model.predict(X_test))
    shifted = [np.mean(pred[idx] == y_test[idx]) for idx in subsets.values()]
    by_group = group_accuracy(y_test, pred, groups)
    ece = expected_calibration_error(y_test, model.predict_proba(X_test))
    return {
        "uniform": np.mean(pred == y_test),
        "head": by_group["head"],
        "middle": by_group["middle"],
        "tail": by_group["tail"],
        "11-set mean": np.mean(shifted),
        "ECE": ece,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")
    BalancedSoftmaxClassifier(max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])  # torch warm-up
    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    columns = ["uniform", "head", "middle", "tail", "11-set mean", "ECE", "fit / LR"]
    for ir in args.ir:
        first = long_tailed_subset(y_pool, ir, random_state=0)
        C = tune_C(X_pool[first], y_pool[first], seed=0)
        results = {name: [] for name in ["LogisticRegression, C tuned + post-hoc LA", *MODELS]}
        experts = []
        for seed in range(args.seeds):
            idx = long_tailed_subset(y_pool, ir, random_state=seed)
            X, y = X_pool[idx], y_pool[idx]
            groups = rank_groups(np.bincount(y))
            subsets = shifted_test_subsets(y_test, random_state=seed)
            start = time.perf_counter()
            lr = AdjustedLogisticRegression(C).fit(X, y)
            lr_seconds = time.perf_counter() - start
            row = evaluate(lr, X_test, y_test, subsets, groups)
            results["LogisticRegression, C tuned + post-hoc LA"].append({**row, "fit / LR": 1.0})
            for name, make in MODELS.items():
                start = time.perf_counter()
                model = make(seed).fit(X, y)
                seconds = time.perf_counter() - start
                row = evaluate(model, X_test, y_test, subsets, groups)
                results[name].append({**row, "fit / LR": seconds / lr_seconds})
                if name == "RIDEClassifier (router)":
                    experts.append(model.n_experts_used(X_test).mean())
                    everyone = model.set_params(router_threshold=0.0)
                    row = evaluate(everyone, X_test, y_test, subsets, groups)
                    results.setdefault("RIDEClassifier (all experts)", []).append(
                        {**row, "fit / LR": seconds / lr_seconds}
                    )
            print(f"IR {ir:g}, seed {seed} done", flush=True)
        print(f"\n### IR {ir:g}: mean (std) over {args.seeds} seeds; LogisticRegression C={C:g}\n")
        print("| model | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name, rows in results.items():
            cells = []
            for column in columns:
                values = np.array([r[column] for r in rows], dtype=float)
                scale = 1 if column == "fit / LR" else 100
                digits = 2 if column in ("fit / LR", "ECE") else 1
                cells.append(
                    f"{scale * values.mean():.{digits}f} ({scale * values.std():.{digits}f})"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"\nRIDE's router used {np.mean(experts):.2f} of 3 experts on average.")


if __name__ == "__main__":
    main()
