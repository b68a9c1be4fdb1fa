"""Grid-search wall time: joblib's Dask backend against n_jobs=1 and n_jobs=2, in one run.

CIFAR-10-LT (IR 100) from the shared embeddings (digits when the file is
absent); a ``GridSearchCV`` over a ``Pipeline(StandardScaler,
BalancedSoftmaxClassifier)``, 8 candidates x 3 folds. The Dask runs use a
``LocalCluster`` of 2 worker processes with one thread and one torch thread
each, the arrays scattered to the workers once; the cluster's start-up is
timed apart. The joblib runs (loky processes) limit torch to one thread per
process as well. Best scores must agree across the three.

    python benchmarks/bench_dask.py [--features FILE]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
from ltlearn.features import read_features

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"
GRID = {
    "balancedsoftmaxclassifier__tau": [0.0, 1.0],
    "balancedsoftmaxclassifier__weight_decay": [1e-3, 1e-2],
    "balancedsoftmaxclassifier__lr": [1e-3, 3e-3],
}


def search(n_jobs):
    pipe = make_pipeline(StandardScaler(), BalancedSoftmaxClassifier(random_state=0))
    return GridSearchCV(pipe, GRID, cv=3, scoring="balanced_accuracy", n_jobs=n_jobs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    if args.features.exists():
        X, y = read_features(args.features, "train")
        idx = long_tailed_subset(y, 100, random_state=0)
        X, y, data = X[idx], y[idx], f"CIFAR-10-LT IR 100 ({len(idx):,} x {X.shape[1]:,})"
    else:
        digits = load_long_tailed_digits(random_state=0)
        X, y, data = digits.X_train, digits.y_train, "long-tailed digits"
    n_fits = 3 * int(np.prod([len(v) for v in GRID.values()]))
    rows = []

    start = time.perf_counter()
    serial = search(1).fit(X, y)
    rows.append(("n_jobs=1 (torch on 2 threads)", time.perf_counter() - start, serial))

    # Loky worker processes: one torch thread each (OMP_NUM_THREADS), as on the Dask workers.
    start = time.perf_counter()
    with parallel_backend("loky", inner_max_num_threads=1):
        two = search(2).fit(X, y)
    rows.append(("n_jobs=2, loky processes", time.perf_counter() - start, two))

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    client = Client(cluster)
    client.run(torch.set_num_threads, 1)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    with parallel_backend("dask", scatter=[X, y]):
        on_dask = search(-1).fit(X, y)
    rows.append(("Dask LocalCluster, 2 workers", time.perf_counter() - start, on_dask))
    client.close()
    cluster.close()

    print(f"### Grid search: {n_fits} fits and 1 refit on {data}\n")
    print(
        "| backend | wall s | vs n_jobs=1 | best balanced accuracy % | best tau, weight decay, lr |"
    )
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for name, seconds, fitted in rows:
        best = fitted.best_params_
        params = ", ".join(f"{best[k]:g}" for k in GRID)
        print(
            f"| {name} | {seconds:.1f} | {base / seconds:.2f}x | "
            f"{100 * fitted.best_score_:.2f} | {params} |"
        )
    print(f"\nDask cluster start-up (not included above): {startup:.1f} s")


if __name__ == "__main__":
    main()
