"""Every long-tail method of ltlearn, and scikit-learn's best, on one table.

CIFAR-10-LT from the shared EfficientNet-Lite0 embeddings (../shared/README.md),
IR 100, 50 and 10, 5 seeds (the seed draws the long-tailed training set and
seeds the model). In the same run, per IR: uniform-test accuracy, head /
middle / tail accuracy (the 3 / 4 / 3 classes by training size), the mean
over SADE's 11 shifted test sets, expected calibration error on the uniform
test set (15 bins), and fit time as a ratio to one
``LogisticRegression(max_iter=1000)`` fit on the same standardised data in the
same run; for RIDE, the mean number of experts its router used.

SHIKE fuses several depths of the backbone: its rows use a multi-depth feature
file of the same images (the shared JPEG zips through EfficientNet-Lite0 with
``layers=``, extracted on the first run into ``benchmarks/results/``, about 5
minutes), whose embedding columns match the shared file.

The scikit-learn baseline is ``LogisticRegression`` with ``C`` chosen on a
validation split of the training data (a stratified fifth, balanced accuracy
after post-hoc logit adjustment, seed 0 of each IR), then refitted and
logit-adjusted for each seed. ltlearn's estimators run with their defaults,
which were chosen on validation splits (see their docstrings); no setting was
chosen on the test set.

    python benchmarks/bench_methods.py [--ir 100 50 10] [--seeds 5] [--zips DIR]
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
    SHIKEClassifier,
)
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets, train_val_split
from ltlearn.features import FeatureFile, extract, read_features
from ltlearn.features.sources import ImageFolderSource
from ltlearn.metrics import expected_calibration_error, group_accuracy, rank_groups

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"
DEPTHS_FILE = Path(__file__).resolve().parent / "results" / "cifar10_effnetlite0_depths.h5"
# The ends of EfficientNet-Lite0's stages 3 to 7 (40, 80, 112, 192 and 320 channels).
LAYERS = [f"model._blocks.{i}" for i in (4, 7, 10, 14, 15)]
# The depths SHIKE fuses with the embedding (chosen on validation: --select-shike).
SHIKE_LAYERS = ["model._blocks.14", "model._blocks.15"]
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


def multi_depth_features(zips, path):
    """The shared images through EfficientNet-Lite0, with the pooled outputs of LAYERS."""
    for split in ("train", "test"):
        source = ImageFolderSource(zips / f"cifar10-{split}-jpg.zip")
        extract(source, "efficientnet-lite0", path, split=split, layers=LAYERS)
    return path


def select_shike(depths_file, y_reference, layer_sets, settings):
    """Validation runs for SHIKE's defaults: IR 100 (seed 0) against a balanced validation set.

    The validation rows are 500 training images per class, set aside before
    the long-tailed subset is drawn from the rest (its head class then has 4,500
    rows): training-distribution images, no test rows, and fifty times as many
    tail rows as a fifth of the subset would hold.
    """
    with FeatureFile(depths_file) as f:
        X_all, y_all = f.read("train")
        columns = {name: f.group_columns([name]) for name, _ in f.feature_groups}
        widths = dict(f.feature_groups)
    if not np.array_equal(y_all, y_reference):
        raise SystemExit(f"{depths_file} does not hold the shared file's training rows in order.")
    rng = np.random.default_rng(0)
    held = np.concatenate(
        [rng.choice(np.flatnonzero(y_all == c), 500, replace=False) for c in range(10)]
    )
    rest = np.setdiff1d(np.arange(len(y_all)), held)
    idx = rest[long_tailed_subset(y_all[rest], 100, random_state=0)]

    def run(make, groups):
        X = X_all[:, np.concatenate([columns[g] for g in groups])]
        start = time.perf_counter()
        model = make([widths[g] for g in groups]).fit(X[idx], y_all[idx])
        seconds = time.perf_counter() - start
        accuracy = 100 * np.mean(model.predict(X[held]) == y_all[held])
        return f"{accuracy:.2f} | {seconds:.1f}"

    print("| setting | balanced validation accuracy % | fit s |")
    print("|---|---|---|")
    bs = run(lambda w: BalancedSoftmaxClassifier(random_state=0), ["embedding"])
    print(f"| BalancedSoftmaxClassifier, embedding | {bs} |", flush=True)
    for layers in layer_sets:
        for params in settings:
            result = run(
                lambda w, p=params: SHIKEClassifier(feature_groups=w, random_state=0, **p),
                [*layers, "embedding"],
            )
            print(
                f"| SHIKE, layers {layers or 'none'}, {params or 'defaults'} | {result} |",
                flush=True,
            )


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
    parser.add_argument("--zips", type=Path, default=DEFAULT_FILE.parent, help="JPEG zips")
    parser.add_argument("--depths", type=Path, default=DEPTHS_FILE, help="multi-depth file")
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--only", help="run only the models whose name contains this (and the baseline)"
    )
    parser.add_argument(
        "--select-shike",
        action="store_true",
        help="print the validation runs behind SHIKE's defaults",
    )
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")
    BalancedSoftmaxClassifier(max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])  # torch warm-up
    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    if not args.depths.exists():
        args.depths.parent.mkdir(parents=True, exist_ok=True)
        multi_depth_features(args.zips, args.depths)
    if args.select_shike:
        layer_sets = [
            [],
            ["model._blocks.15"],
            ["model._blocks.14", "model._blocks.15"],
            ["model._blocks.10", "model._blocks.15"],
        ]
        select_shike(args.depths, y_pool, layer_sets, [{}])
        select_shike(
            args.depths,
            y_pool,
            [SHIKE_LAYERS],
            [
                {"distillation": 0.0, "transfer": 0.0},
                {"distillation": 0.01, "transfer": 0.1},
                {"distillation": 1.0, "transfer": 1.0},
                {"adapter_size": 64},
            ],
        )
        return
    with FeatureFile(args.depths) as f:
        groups_used = [*SHIKE_LAYERS, "embedding"]
        D_pool, y_depths = f.read("train", groups=groups_used)
        D_test, _ = f.read("test", groups=groups_used)
        shike_groups = [g for g in f.feature_groups if g[0] in groups_used]
        if not np.array_equal(y_depths, y_pool):
            raise SystemExit(f"{args.depths} does not hold the shared file's rows in order.")
    depth_models = {
        "SHIKEClassifier (blocks 14 and 15 fused with the embedding)": lambda s: SHIKEClassifier(
            feature_groups=shike_groups, random_state=s
        ),
        # Whether the extra layers alone help: the same columns, one linear head.
        "BalancedSoftmaxClassifier on blocks 14, 15 and the embedding": lambda s: (
            BalancedSoftmaxClassifier(random_state=s)
        ),
    }
    columns = ["uniform", "head", "middle", "tail", "11-set mean", "ECE", "fit / LR"]
    for ir in args.ir:
        first = long_tailed_subset(y_pool, ir, random_state=0)
        C = tune_C(X_pool[first], y_pool[first], seed=0)
        if args.only:
            models = {k: v for k, v in MODELS.items() if args.only in k}
            depth_models = {k: v for k, v in depth_models.items() if args.only in k}
        else:
            models = MODELS
        names = ["LogisticRegression, C tuned + post-hoc LA", *models, *depth_models]
        results = {name: [] for name in names}
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
            runs = [(name, make, X, X_test) for name, make in models.items()]
            runs += [(name, make, D_pool[idx], D_test) for name, make in depth_models.items()]
            for name, make, X_fit, X_eval in runs:
                start = time.perf_counter()
                model = make(seed).fit(X_fit, y)
                seconds = time.perf_counter() - start
                row = evaluate(model, X_eval, y_test, subsets, groups)
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
        if experts:
            print(f"\nRIDE's router used {np.mean(experts):.2f} of 3 experts on average.")


if __name__ == "__main__":
    main()
