"""LongTailTemperatureScaler against plain and class-balanced temperature scaling.

Protocol (issue: LongTailTemperatureScaler): a long-tailed CIFAR-10 training set
(IR 100, 50, 10) from the real EfficientNet-Lite0 embeddings is split 80/20
(stratified) into train and calibration sets, both long-tailed. A
BalancedSoftmaxClassifier (logit-adjusted head) and a plain cross-entropy head
(``tau=0``) are fitted on the 80 %, every calibrator on the 20 %, and all are
evaluated on a balanced set: ECE (15 equal-width bins), MCE, NLL, accuracy,
mean and standard deviation over seeds (the seed draws the long-tailed subset
and the split).

``--validation`` evaluates on 500 held-out training images per class instead
of the test set (the long-tailed subset then has at most 4,000 images per
class): the defaults of LongTailTemperatureScaler were chosen that way.

    python benchmarks/bench_calibration.py [--features FILE] [--ir 100 50 10] [--seeds 5]
                                           [--validation]
"""

import argparse
import time
from pathlib import Path

import numpy as np

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler
from ltlearn.calibration import wasserstein_importance_weights
from ltlearn.datasets import long_tailed_subset, train_val_split
from ltlearn.features import read_features
from ltlearn.metrics import (
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"

# name -> LongTailTemperatureScaler parameters (None: the uncalibrated head)
METHODS = {
    "uncalibrated": None,
    "plain TS": dict(weighting="none"),
    "class-balanced TS": dict(weighting="class_balanced"),
    "paper: Wasserstein weights (head >= 100)": dict(weighting="wasserstein"),
    "Wasserstein weights, 64-d PCA": dict(weighting="wasserstein", n_components=64),
    "class-balanced x Wasserstein, 64-d PCA": dict(
        weighting="class_balanced_wasserstein", n_components=64
    ),
    "LongTailTemperatureScaler() default": dict(),
    "plain TS + class-wise bias": dict(weighting="none", bias=True),
    "class-balanced TS + class-wise bias": dict(weighting="class_balanced", bias=True),
    "Wasserstein weights + class-wise bias": dict(weighting="wasserstein", bias=True),
}


def evaluate(y, proba):
    return (
        100 * expected_calibration_error(y, proba),
        100 * maximum_calibration_error(y, proba),
        negative_log_likelihood(y, proba),
        100 * np.mean(proba.argmax(1) == y),
    )


def data_for_seed(X_pool, y_pool, X_test, y_test, ir, seed, validation):
    if validation:
        rng = np.random.default_rng(seed)
        held = np.concatenate(
            [rng.permutation(np.flatnonzero(y_pool == c))[:500] for c in range(10)]
        )
        rest = np.setdiff1d(np.arange(len(y_pool)), held)
        keep = rest[long_tailed_subset(y_pool[rest], ir, n_max=4000, random_state=seed)]
        X_eval, y_eval = X_pool[held], y_pool[held]
    else:
        keep = long_tailed_subset(y_pool, ir, random_state=seed)
        X_eval, y_eval = X_test, y_test
    train, cal = train_val_split(y_pool[keep], val_size=0.2, random_state=seed)
    return (
        X_pool[keep[train]],
        y_pool[keep[train]],
        X_pool[keep[cal]],
        y_pool[keep[cal]],
        X_eval,
        y_eval,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--validation", action="store_true")
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")
    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    where = "500 held-out training images per class" if args.validation else "the balanced test set"
    print(f"Evaluated on {where}; mean +- std over {args.seeds} seeds.\n")

    rows = []
    for ir in args.ir:
        results = {}  # (head, method) -> list of (ece, mce, nll, acc)
        saturation = []
        cal_seconds = []
        for seed in range(args.seeds):
            X, y, Xc, yc, Xe, ye = data_for_seed(
                X_pool, y_pool, X_test, y_test, ir, seed, args.validation
            )
            for head, tau in (("logit-adjusted", 1.0), ("plain CE", 0.0)):
                clf = BalancedSoftmaxClassifier(tau=tau, random_state=seed).fit(X, y)
                for name, params in METHODS.items():
                    if params is None:
                        proba = clf.predict_proba(Xe)
                    else:
                        start = time.perf_counter()
                        scaler = LongTailTemperatureScaler(clf, **params).fit(Xc, yc)
                        cal_seconds.append(time.perf_counter() - start)
                        proba = scaler.predict_proba(Xe)
                    results.setdefault((head, name), []).append(evaluate(ye, proba))
                # Test-set temperature: the room left for any calibration-set method.
                oracle = LongTailTemperatureScaler(clf, weighting="none").fit(Xe, ye)
                results.setdefault((head, "temperature fitted on the evaluation set"), []).append(
                    evaluate(ye, oracle.predict_proba(Xe))
                )
            counts = np.bincount(yc, minlength=10)
            head_mask = counts >= 100
            w = wasserstein_importance_weights(np.asarray(Xc, np.float64), yc, head_mask)
            tail = ~head_mask[yc]
            if tail.any():
                saturation.append((np.mean(w[tail] <= 0.3), np.mean(w[tail] >= 5.0)))
        print(f"### IR {ir:g}: calibration set per class (last seed) {counts.tolist()}")
        if saturation:
            floor, cap = np.mean(saturation, axis=0)
            print(
                f"paper weights in 1280-d: {100 * floor:.0f} % of tail samples at the 0.3 floor, "
                f"{100 * cap:.0f} % at the 5.0 cap"
            )
        print(f"mean calibration fit time {np.mean(cal_seconds) * 1000:.0f} ms\n")
        for (head, name), values in results.items():
            values = np.array(values)
            rows.append((ir, head, name, values.mean(axis=0), values.std(axis=0)))

    print("### Balanced test set, mean +- std over the seeds\n")
    print("| IR | head | method | ECE % | MCE % | NLL | accuracy % | ECE vs plain TS |")
    print("|---|---|---|---|---|---|---|---|")
    plain = {(ir, head): mean[0] for ir, head, name, mean, _ in rows if name == "plain TS"}
    for ir, head, name, mean, std in rows:
        change = 100 * (mean[0] / plain[(ir, head)] - 1)
        print(
            f"| {ir:g} | {head} | {name} | {mean[0]:.2f} +- {std[0]:.2f} | "
            f"{mean[1]:.1f} +- {std[1]:.1f} | {mean[2]:.3f} +- {std[2]:.3f} | "
            f"{mean[3]:.1f} +- {std[3]:.1f} | {change:+.0f} % |"
        )


if __name__ == "__main__":
    main()
