"""How fitting scales: rows, classes, width; ImageNet-LT and iNaturalist shapes; out of core.

Synthetic long-tailed embeddings (:func:`ltlearn.datasets.make_long_tailed_embeddings`:
class means on a sphere plus noise, exponential class profile). Every measurement
runs in a fresh process, so that its peak resident memory (the data included) is
its own. In the same run:

1. Growth: one epoch of BalancedSoftmaxClassifier and PRLClassifier while rows,
   classes and width grow in turn from a base shape, with the fitted log-log
   slopes (1.0: linear).
2. Shapes: ImageNet-LT (115,846 x 1,024, 1,000 classes) in memory, fitted with
   the defaults; iNaturalist 2018 (437,513 rows, 8,142 classes) x 512 in memory
   and x 2,048 out of core (streamed from a float16 feature file), one epoch
   each (a default fit runs 20). scikit-learn's out-of-core answer,
   ``SGDClassifier(loss="log_loss")``, runs one epoch on the ImageNet-LT data.

Figures: seconds per epoch, the fit's peak resident memory (GiB, data
included; read before predicting), predict rows/s on 10,000 rows, accuracy on
those training rows (a scale test, not a benchmark of accuracy).

    python benchmarks/bench_scale.py [--skip-inat] [--skip-growth]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BASE = dict(rows=50_000, classes=500, width=512)
GROWTH = {"rows": [25_000, 50_000, 100_000], "classes": [250, 500, 1000], "width": [256, 512, 1024]}
SHAPES = {
    "ImageNet-LT": dict(rows=115_846, classes=1000, width=1024, ir=256),
    "iNaturalist 2018 x 512": dict(rows=437_513, classes=8142, width=512, ir=500),
    "iNaturalist 2018 x 2,048": dict(rows=437_513, classes=8142, width=2048, ir=500),
}


def measure(spec):
    """Run in a child process: generate (or open) the data, fit, predict; print JSON."""
    import torch

    from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
    from ltlearn.datasets import make_long_tailed_embeddings
    from ltlearn.features import FeatureFile

    torch.set_num_threads(2)
    start = time.perf_counter()
    if spec.get("file"):
        f = FeatureFile(spec["file"])
        X = f["train"]
        y = X.labels
    else:
        X, y = make_long_tailed_embeddings(
            spec["rows"],
            spec["width"],
            spec["classes"],
            imbalance_ratio=spec.get("ir", 100),
            random_state=0,
        )
    data_seconds = time.perf_counter() - start
    epochs = spec.get("epochs")
    model = spec["model"]
    if model == "SGDClassifier":
        from sklearn.linear_model import SGDClassifier

        est = SGDClassifier(loss="log_loss", max_iter=1, tol=None, n_jobs=2, random_state=0)
    else:
        kind = {"BalancedSoftmax": BalancedSoftmaxClassifier, "PRL": PRLClassifier}[model]
        est = kind(random_state=0, device="cpu", max_epochs=epochs or "auto")
    start = time.perf_counter()
    if model == "SGDClassifier":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one epoch does not converge, by design
            est.fit(np.asarray(X), y)
    else:
        est.fit(X, y)
    fit_seconds = time.perf_counter() - start
    # The peak so far is the fit's (data included); prediction is measured after it.
    fit_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_epochs = 1 if model == "SGDClassifier" else len(est.history_)
    # 10,000 rows: at 8,142 classes their logits alone take 0.3 GiB.
    rows = min(10_000, len(y))
    sample = np.asarray(X.read(0, rows)) if spec.get("file") else X[:rows]
    start = time.perf_counter()
    predicted = est.predict(sample)
    predict_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "fit_seconds": fit_seconds,
                "epochs": n_epochs,
                "epoch_seconds": fit_seconds / n_epochs,
                "predict_rows_per_s": rows / predict_seconds,
                "accuracy": float(np.mean(predicted == y[:rows])),
                "peak_gib": fit_peak,
                "data_seconds": data_seconds,
            }
        )
    )


def run(spec):
    out = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def growth():
    print("### Growth: one epoch from the base shape " + json.dumps(BASE) + "\n")
    print("| model | grows | value | s / epoch | fit peak GiB | predict rows/s |")
    print("|---|---|---|---|---|---|")
    slopes = []
    for model in ("BalancedSoftmax", "PRL"):
        for axis, values in GROWTH.items():
            seconds = []
            for value in values:
                result = run({**BASE, axis: value, "model": model, "epochs": 1})
                seconds.append(result["epoch_seconds"])
                print(
                    f"| {model} | {axis} | {value:,} | {result['epoch_seconds']:.2f} | "
                    f"{result['peak_gib']:.2f} | {result['predict_rows_per_s']:,.0f} |",
                    flush=True,
                )
            slope = np.polyfit(np.log(values), np.log(seconds), 1)[0]
            slopes.append(f"| {model} | {axis} | {slope:.2f} |")
    print("\n### Fitted log-log slopes of time per epoch (1.0: linear)\n")
    print("| model | grows | slope |")
    print("|---|---|---|")
    print("\n".join(slopes))


def shapes(skip_inat):
    print("\n### Named shapes\n")
    print(
        "| shape | model | where | epochs | s / epoch | fit s | fit peak GiB | predict rows/s "
        "| training accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        if skip_inat and name.startswith("iNat"):
            continue
        spec = {**shape}
        where, epochs = "memory", None
        if name.endswith("2,048"):
            path = RESULTS / "inat_2048.h5"
            if not path.exists():
                from ltlearn.datasets import make_long_tailed_embeddings

                RESULTS.mkdir(exist_ok=True)
                start = time.perf_counter()
                make_long_tailed_embeddings(
                    shape["rows"],
                    shape["width"],
                    shape["classes"],
                    imbalance_ratio=shape["ir"],
                    random_state=0,
                    path=path,
                )
                print(
                    f"(wrote {path}, {path.stat().st_size / 2**30:.1f} GiB, in "
                    f"{time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            spec["file"], where = str(path), "streamed from disk"
        if name.startswith("iNat"):
            epochs = 1
        models = ["BalancedSoftmax", "PRL"]
        if not name.startswith("iNat"):
            # One-vs-rest SGD over 8,142 classes would take hours here: measured at the
            # ImageNet-LT shape only (its epoch time grows with rows x classes x width).
            models.append("SGDClassifier")
        for model in models:
            result = run({**spec, "model": model, "epochs": epochs})
            if "error" in result:
                print(f"| {name} | {model} | {where} | failed: {result['error']} |", flush=True)
                continue
            print(
                f"| {name} | {model} | {where} | {result['epochs']} | "
                f"{result['epoch_seconds']:.1f} | {result['fit_seconds']:.1f} | "
                f"{result['peak_gib']:.2f} | {result['predict_rows_per_s']:,.0f} | "
                f"{100 * result['accuracy']:.1f} |",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--skip-inat", action="store_true", help="only the ImageNet-LT shape")
    parser.add_argument("--skip-growth", action="store_true")
    args = parser.parse_args()
    if args.measure:
        measure(json.loads(args.measure))
        return
    if not args.skip_growth:
        growth()
    shapes(args.skip_inat)


if __name__ == "__main__":
    main()
