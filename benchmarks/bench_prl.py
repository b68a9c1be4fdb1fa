"""PRLClassifier against BalancedSoftmaxClassifier, with and without the true test prior.

Protocol of ../shared/README.md (CIFAR-10-LT from real EfficientNet-Lite0
embeddings, IR 100, 50, 10; the balanced test set and SADE's 11 shifted test
sets). In the same run, for each IR:

- BalancedSoftmaxClassifier (raw logits), the same shifted by each test set's
  true prior (post-hoc logit adjustment: an oracle, the one-line competitor of
  a preference), and a plain cross-entropy head of the same capacity
  (BalancedSoftmaxClassifier(tau=0): PRL's generated head shares one linear map);
- PRLClassifier at the forward, uniform and backward corners, and at the
  preference its documented rule (``preference_for_imbalance``) picks from each
  test set's direction and imbalance ratio;
- many / medium / few and head / middle / tail accuracy at the three corners;
- fit seconds, and their ratio to one LogisticRegression(max_iter=1000) fit on
  the same standardised data.

Then the scaling checks of the issue: peak memory and parameter count of a fit
with 1000 classes and 1024-d features, and the time of the vectorised
many-preference prediction.

    python benchmarks/bench_prl.py [--features FILE] [--ir 100 50 10] [--skip-scaling]
"""

import argparse
import time
from pathlib import Path

import numpy as np
from measure import PeakRSS, timed_fit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets
from ltlearn.features import read_features
from ltlearn.metrics import group_accuracy, rank_groups, shot_groups
from ltlearn.plotting import simplex_grid

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"


def pct(v):
    return "" if np.isnan(v) else f"{100 * v:.1f}"


def rule_preference(model, name):
    """The preference PRLClassifier's documented rule picks for a named test set."""
    if name == "uniform":
        return "uniform"
    direction, ratio = name.split("_")
    return model.preference_for_imbalance(float(ratio), direction)


def run_ir(ir, X, y, X_test, y_test, subsets, seed):
    """Fit every model on one long-tailed training set; return the rows of the tables."""
    agnostic, groups = [], []
    counts = np.bincount(y, minlength=10)
    print(f"\n## IR {ir:g}: {len(y)} training rows, class counts {counts.tolist()}", flush=True)
    _, lr_s, _ = timed_fit(
        lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), X, y
    )
    bs, bs_s, bs_mem = timed_fit(lambda: BalancedSoftmaxClassifier(random_state=seed), X, y)
    ce, ce_s, ce_mem = timed_fit(
        lambda: BalancedSoftmaxClassifier(tau=0.0, random_state=seed), X, y
    )
    prl, prl_s, prl_mem = timed_fit(lambda: PRLClassifier(random_state=seed), X, y)
    fits = [
        (ir, "LogisticRegression(max_iter=1000), standardised", lr_s, lr_s, np.nan),
        (ir, "BalancedSoftmaxClassifier", bs_s, lr_s, bs_mem),
        (ir, "BalancedSoftmaxClassifier(tau=0), plain CE", ce_s, lr_s, ce_mem),
        (ir, "PRLClassifier", prl_s, lr_s, prl_mem),
    ]
    bs_scores = bs.decision_function(X_test)
    corners = prl.decision_function_many(X_test, ["forward", "uniform", "backward"])

    def table(predict_subset):
        row = {n: float(np.mean(predict_subset(n, i) == y_test[i])) for n, i in subsets.items()}
        row["mean"] = float(np.mean(list(row.values())))
        return row

    def with_prior(n, i):
        q = np.bincount(y_test[i], minlength=10) / len(i)
        with np.errstate(divide="ignore"):
            return np.argmax(bs_scores[i] + np.log(q), axis=1)

    rows = {
        "BalancedSoftmaxClassifier": table(lambda n, i: bs_scores[i].argmax(1)),
        "BalancedSoftmaxClassifier + true test prior (oracle)": table(with_prior),
        "BalancedSoftmaxClassifier(tau=0), plain CE": table(lambda n, i: ce.predict(X_test[i])),
        "PRL, forward": table(lambda n, i: corners[0][i].argmax(1)),
        "PRL, uniform": table(lambda n, i: corners[1][i].argmax(1)),
        "PRL, backward": table(lambda n, i: corners[2][i].argmax(1)),
        "PRL, rule-chosen preference": table(
            lambda n, i: prl.decision_function(X_test[i], rule_preference(prl, n)).argmax(1)
        ),
    }
    for model, row in rows.items():
        agnostic.append((ir, model, row))
        print(f"{model:55s} uniform {pct(row['uniform']):>5}  11-mean {pct(row['mean']):>5}")
    for label, scores in [
        ("BalancedSoftmaxClassifier", bs_scores),
        ("PRL, forward", corners[0]),
        ("PRL, uniform", corners[1]),
        ("PRL, backward", corners[2]),
    ]:
        pred = scores.argmax(1)
        groups.append(
            (
                ir,
                label,
                group_accuracy(y_test, pred, shot_groups(counts)),
                group_accuracy(y_test, pred, rank_groups(counts)),
            )
        )
    return agnostic, groups, fits, prl


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")

    start = time.perf_counter()
    BalancedSoftmaxClassifier(max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])
    print(f"torch warm-up (once per process, excluded): {time.perf_counter() - start:.2f}s")
    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    subsets = shifted_test_subsets(y_test, random_state=args.seed)
    names = list(subsets)
    agnostic, groups, fits = [], [], []
    for ir in args.ir:
        idx = long_tailed_subset(y_pool, ir, random_state=args.seed)
        a, g, f, prl = run_ir(ir, X_pool[idx], y_pool[idx], X_test, y_test, subsets, args.seed)
        agnostic += a
        groups += g
        fits += f

    print("\n### Test-agnostic accuracy (%) over the 11 shifted test sets\n")
    short = [n.replace("forward_", "F").replace("backward_", "B") for n in names]
    print("| IR | model | " + " | ".join(short) + " | mean |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for ir, model, row in agnostic:
        print(
            f"| {ir:g} | {model} | "
            + " | ".join(pct(row[n]) for n in names)
            + f" | {pct(row['mean'])} |"
        )

    print(
        "\n### Class groups (%), balanced test set: many >100 / few <20 samples; "
        "head 3 / middle 4 / tail 3 classes\n"
    )
    print("| IR | model | many | medium | few | head | middle | tail |")
    print("|---|---|---|---|---|---|---|---|")
    for ir, model, shots, ranks in groups:
        cells = [shots.get(k, np.nan) for k in ("many", "medium", "few")]
        cells += [ranks[k] for k in ("head", "middle", "tail")]
        print(f"| {ir:g} | {model} | " + " | ".join(pct(c) for c in cells) + " |")

    print("\n### Fit time (s) and ratio to one LogisticRegression(max_iter=1000) fit\n")
    print("| IR | model | fit s | fit / LR | peak fit MiB |")
    print("|---|---|---|---|---|")
    for ir, model, s, lr_s, mem in fits:
        mem_cell = "" if np.isnan(mem) else f"{mem:.0f}"
        print(f"| {ir:g} | {model} | {s:.2f} | {s / lr_s:.3f} | {mem_cell} |")

    if not args.skip_scaling:
        scaling(X_test, prl)


def scaling(X_test, prl):
    print("\n### Scaling\n")
    # 21 preferences along forward -> uniform -> backward, and the 231-point simplex grid.
    path = [(1 - t, t, 0) for t in np.linspace(0, 1, 11)] + [
        (0, 1 - t, t) for t in np.linspace(0.1, 1, 10)
    ]
    for label, prefs in [("21-point path", path), ("231-point simplex grid", simplex_grid(20))]:
        prl.decision_function_many(X_test, prefs[:2])  # first-call set-up
        start = time.perf_counter()
        prl.decision_function_many(X_test, prefs)
        print(
            f"- decision_function_many, {label}, {len(X_test):,} rows: "
            f"{time.perf_counter() - start:.3f} s"
        )
    rng = np.random.default_rng(0)
    n_classes, n_features, per_class = 1000, 1024, 20
    # Long-tailed over 1000 classes (IR 10): 20 down to 2 samples per class.
    counts = np.maximum(
        2, (per_class * 10 ** (-np.arange(n_classes) / (n_classes - 1))).astype(int)
    )
    y = np.repeat(np.arange(n_classes), counts)
    X = rng.standard_normal((len(y), n_features), dtype=np.float32)
    X += 0.5 * rng.standard_normal((n_classes, n_features), dtype=np.float32)[y]
    for rank in (0, 8):
        with PeakRSS() as mem:
            model = PRLClassifier(rank=rank, max_epochs=5, device="cpu", random_state=0).fit(X, y)
        network = model.module_.head
        n_params = sum(p.numel() for p in network.parameters())
        n_base = sum(p.numel() for p in network.base.parameters())
        print(
            f"- 1000 classes x 1024 features, {len(y):,} rows, rank {rank}: peak fit memory "
            f"{mem.mib:.0f} MiB above the data; {n_params:,} parameters, of which the shared "
            f"base head {n_base:,} and the hypernetwork and projection {n_params - n_base:,}"
        )


if __name__ == "__main__":
    main()
