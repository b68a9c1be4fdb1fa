"""BalancedSoftmaxClassifier against tuned scikit-learn LogisticRegression baselines.

Protocol of ../shared/README.md: long-tailed CIFAR-10 training sets (IR 100, 50,
10) drawn from real EfficientNet-Lite0 embeddings, the balanced test set and
SADE's 11 shifted test distributions. Every baseline is measured in the same
run; fit times are also given as ratios to one LogisticRegression(max_iter=1000)
fit on the same data, since absolute seconds vary with the machine's load.

    python benchmarks/bench_balanced_softmax.py [--features FILE] [--ir 100 50 10]
"""

import argparse
import time
from pathlib import Path

import numpy as np
from measure import rows_per_second, timed_fit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets
from ltlearn.features import read_features
from ltlearn.metrics import group_accuracy, rank_groups, shot_groups

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
N_FOLDS = 3


def lr_pipeline(C=1.0, class_weight=None):
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, class_weight=class_weight, max_iter=1000)
    )


def la_balanced_accuracy(estimator, X, y):
    """Balanced accuracy of post-hoc logit-adjusted predictions, for tuning C."""
    counts = estimator[-1].class_counts_fold_
    scores = np.log(estimator.predict_proba(X) + 1e-300) - np.log(counts / counts.sum())
    return balanced_accuracy_score(y, estimator.classes_[scores.argmax(1)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")

    # The first torch call of a process costs about a second of one-off set-up;
    # pay it here, as any session that fits more than one model does.
    start = time.perf_counter()
    BalancedSoftmaxClassifier(max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])
    print(
        f"torch warm-up (once per process, excluded from fit times): "
        f"{time.perf_counter() - start:.2f}s"
    )
    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    subsets = shifted_test_subsets(y_test, random_state=args.seed)
    names = list(subsets)
    rows = []
    for ir in args.ir:
        idx = long_tailed_subset(y_pool, ir, random_state=args.seed)
        X, y = X_pool[idx], y_pool[idx]
        counts = np.bincount(y, minlength=10)
        log_prior = np.log(counts / counts.sum())
        print(f"\n## IR {ir:g}: {len(y)} training rows, class counts {counts.tolist()}", flush=True)

        # name -> (fit seconds, peak MiB, test scores whose argmax is the prediction
        #          for a uniform test set, whether the 11-dist table adds log(test prior),
        #          predict function for the throughput measurement)
        results = {}

        def log_proba(model):
            return np.log(model.predict_proba(X_test).astype(np.float64) + 1e-300)

        lr, lr_s, lr_mem = timed_fit(lr_pipeline, X, y)
        results["LogisticRegression"] = (lr_s, lr_mem, log_proba(lr), False, lr.predict)
        results["LogisticRegression + post-hoc LA"] = (
            lr_s,
            lr_mem,
            log_proba(lr) - log_prior,
            True,
            lr.predict,
        )
        lrb, s, m = timed_fit(lambda: lr_pipeline(class_weight="balanced"), X, y)
        results["LogisticRegression(class_weight='balanced')"] = (
            s,
            m,
            log_proba(lrb),
            False,
            lrb.predict,
        )

        # One grid over C for the plain and the class-balanced model; each tuned row is
        # charged the fit and scoring time of its own candidates (3 folds) plus its refit.
        search = GridSearchCV(
            make_pipeline(StandardScaler(), _CountingLR(max_iter=1000)),
            {"_countinglr__C": C_GRID, "_countinglr__class_weight": [None, "balanced"]},
            scoring={"balanced_accuracy": "balanced_accuracy", "la": la_balanced_accuracy},
            refit=False,
            cv=StratifiedKFold(N_FOLDS, shuffle=True, random_state=args.seed),
        )
        search.fit(X, y)
        cv = search.cv_results_
        weights = np.array(cv["param__countinglr__class_weight"], dtype=object)
        for key, label, class_weight, shift in (
            ("balanced_accuracy", "LogisticRegression, C tuned", None, 0.0),
            (
                "balanced_accuracy",
                "LogisticRegression(class_weight='balanced'), C tuned",
                "balanced",
                0.0,
            ),
            ("la", "LogisticRegression, C tuned + post-hoc LA", None, log_prior),
        ):
            family = np.array([w == class_weight for w in weights])
            grid_s = N_FOLDS * float(
                np.sum(cv["mean_fit_time"][family] + cv["mean_score_time"][family])
            )
            best = np.flatnonzero(family)[int(np.argmax(cv[f"mean_test_{key}"][family]))]
            best_c = cv["param__countinglr__C"][best]
            tuned, s, m = timed_fit(
                lambda c=best_c, w=class_weight: lr_pipeline(C=c, class_weight=w), X, y
            )
            results[f"{label} (C={best_c:g})"] = (
                grid_s + s,
                m,
                log_proba(tuned) - shift,
                key == "la",
                tuned.predict,
            )

        bs, s, m = timed_fit(lambda: BalancedSoftmaxClassifier(random_state=args.seed), X, y)
        bs_scores = bs.decision_function(X_test)
        results["BalancedSoftmaxClassifier (defaults)"] = (s, m, bs_scores, False, bs.predict)
        results["BalancedSoftmaxClassifier + true test prior"] = (s, m, bs_scores, True, bs.predict)
        ce, s, m = timed_fit(lambda: BalancedSoftmaxClassifier(tau=0, random_state=args.seed), X, y)
        results["BalancedSoftmaxClassifier(tau=0), plain cross-entropy"] = (
            s,
            m,
            ce.decision_function(X_test),
            False,
            ce.predict,
        )

        many = shot_groups(counts)
        hmt = rank_groups(counts)
        for name, (fit_s, mem, scores, oracle, predict) in results.items():
            pred = scores.argmax(1)
            shots = group_accuracy(y_test, pred, many)
            ranks = group_accuracy(y_test, pred, hmt)
            agn = {}
            for sub, sidx in subsets.items():
                if oracle:
                    q = np.bincount(y_test[sidx], minlength=10) / len(sidx)
                    with np.errstate(divide="ignore"):
                        p = (scores[sidx] + np.log(q)).argmax(1)
                else:
                    p = pred[sidx]
                agn[sub] = float(np.mean(p == y_test[sidx]))
            rows.append(
                {
                    "IR": ir,
                    "model": name,
                    "uniform": shots["overall"],
                    "many": shots.get("many", np.nan),
                    "medium": shots.get("medium", np.nan),
                    "few": shots.get("few", np.nan),
                    "head": ranks["head"],
                    "middle": ranks["middle"],
                    "tail": ranks["tail"],
                    **agn,
                    "11-mean": float(np.mean(list(agn.values()))),
                    "fit_s": fit_s,
                    "fit_ratio": fit_s / lr_s,
                    "pred_rows_s": rows_per_second(predict, X_test),
                    "peak_MiB": mem,
                    "oracle": oracle,
                }
            )
            r = rows[-1]
            print(
                f"{name:62s} uniform {100 * r['uniform']:5.1f}  11-mean {100 * r['11-mean']:5.1f}"
                f"  fit {fit_s:7.2f}s ({r['fit_ratio']:.3f}x LR)",
                flush=True,
            )
    print_tables(rows, names)


class _CountingLR(LogisticRegression):
    """LogisticRegression that remembers its training fold's class counts."""

    def fit(self, X, y, sample_weight=None):
        self.class_counts_fold_ = np.bincount(np.unique(y, return_inverse=True)[1])
        return super().fit(X, y, sample_weight=sample_weight)


def print_tables(rows, names):
    pct = lambda v: "" if np.isnan(v) else f"{100 * v:.1f}"  # noqa: E731
    print(
        "\n### Accuracy (%), balanced test set; fit time and its ratio to one "
        "LogisticRegression(max_iter=1000) fit\n"
    )
    print(
        "| IR | model | uniform | many | medium | few | head | middle | tail | 11-dist mean "
        "| fit s | fit / LR | predict rows/s | peak fit MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['IR']:g} | {r['model']} | {pct(r['uniform'])} | {pct(r['many'])} | "
            f"{pct(r['medium'])} | {pct(r['few'])} | {pct(r['head'])} | {pct(r['middle'])} | "
            f"{pct(r['tail'])} | {pct(r['11-mean'])} | {r['fit_s']:.2f} | {r['fit_ratio']:.3f} | "
            f"{r['pred_rows_s']:,.0f} | {r['peak_MiB']:.0f} |"
        )
    print(
        "\n### Test-agnostic accuracy (%) over the 11 shifted test sets "
        "(rows marked * shift logits by each test set's true prior)\n"
    )
    print(
        "| IR | model | "
        + " | ".join(n.replace("forward_", "F").replace("backward_", "B") for n in names)
        + " | mean |"
    )
    print("|---|---|" + "---|" * (len(names) + 1))
    for r in rows:
        star = " *" if r["oracle"] else ""
        print(
            f"| {r['IR']:g} | {r['model']}{star} | "
            + " | ".join(pct(r[n]) for n in names)
            + f" | {pct(r['11-mean'])} |"
        )


if __name__ == "__main__":
    main()
