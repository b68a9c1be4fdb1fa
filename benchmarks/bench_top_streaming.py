"""A trainable top fitted on a cut file streamed block by block, against the same fit in memory.

On seed 0's activations of CIFAR-10-LT at IR 100 at ``model._blocks.14`` (the cache
``bench_capacity.py`` extracts; extracted here when absent), fits
``BalancedSoftmaxClassifier(head=TopStage(train=..., lr=5e-4, epochs=E))`` three times per
``train`` setting, each in a fresh process: from the arrays read into memory; from the
file's split, ``fit(FeatureFile(path)["train"])`` (blocks of 16,384 rows, which hold all of
them here); and from the split in blocks of 1,024 rows, ``FeatureSplit(f, "train",
block_chunks=16)``, whose memory is bounded as a larger file's would be. Prints fit time
(the streamed fits' as ratios to the in-memory one's), the fit's peak resident memory with
the data (read inside the measured process), the held-out balanced accuracy of each epoch
and the epoch kept, and uniform test accuracy (a check that the fits learn alike, not a
figure to choose by: a streamed fit reads its rows in another order, so it is another draw
of the same fit). A cache extracted with gzip (before 2026-12-01) is first copied
uncompressed, as ``extract`` now stores activations.

    python benchmarks/bench_top_streaming.py [--epochs 2] [--train all last]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from bench_capacity import RESULTS, SHARED, extract_cut

PATH = RESULTS / "capacity_model__blocks_14_ir100_s0.h5"


def uncompressed(path):
    """``path`` itself when its activations are stored uncompressed, as ``extract`` stores them
    since 2026-12-01; else a copy without compression, written once beside it."""
    import h5py

    with h5py.File(path, "r") as f:
        if f["train/features"].compression is None:
            return path
        copy = path.with_name(path.stem + "_uncompressed.h5")
        if copy.exists():
            return copy
        with h5py.File(copy.with_suffix(".tmp"), "w") as out:
            out.attrs.update(f.attrs)
            for name in ("train", "test"):
                for key, data in f[name].items():
                    out.create_dataset(
                        f"{name}/{key}", data=data[()], dtype=data.dtype, chunks=data.chunks
                    )
                out[name].attrs.update(f[name].attrs)
            out.create_dataset("classes", data=f["classes"][()])
    copy.with_suffix(".tmp").rename(copy)
    return copy


def measure(spec):
    """One fit, in this process; prints its figures as JSON."""
    from ltlearn import BalancedSoftmaxClassifier, TopStage
    from ltlearn.features import FeatureFile, FeatureSplit

    stage = TopStage(train=spec["train"], lr=5e-4, epochs=spec["epochs"])
    model = BalancedSoftmaxClassifier(head=stage, random_state=0)
    with FeatureFile(spec["path"]) as f:
        start = time.perf_counter()
        if spec["streamed"]:
            model.fit(FeatureSplit(f, "train", block_chunks=spec["block_chunks"]))
        else:
            model.fit(*f.read("train"))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        X_test, y_test = f.read("test")
    result = {
        "seconds": seconds,
        "peak_gib": peak,
        "accuracy": model.score(X_test, y_test),
        "held_out": model.validation_scores_,
        "epoch": model.best_epoch_,
    }
    print(json.dumps(result))


def run(spec):
    out = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", nargs="+", default=["all", "last"], choices=["all", "last"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(json.loads(args.measure))
        return
    if not PATH.exists():
        if not (SHARED / "cifar10-train-jpg.zip").exists():
            sys.exit(f"needs the shared CIFAR-10 JPEGs in {SHARED}")
        from ltlearn.datasets import long_tailed_subset
        from ltlearn.features.sources import ImageFolderSource

        labels = np.array(ImageFolderSource(SHARED / "cifar10-train-jpg.zip").labels)
        RESULTS.mkdir(exist_ok=True)
        keep = np.sort(long_tailed_subset(labels, 100, random_state=0))
        extract_cut("model._blocks.14", keep, PATH)
    path = uncompressed(PATH)
    size = path.stat().st_size / 2**30
    print(f"{path.name}: {size:.2f} GiB on disk (train and test, float16)\n")
    print(
        "| TopStage(train=...) | X | fit s | vs in memory | peak GiB | held-out balanced "
        "accuracy, probe / epoch 1 / ... | epoch kept | test accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for train in args.train:
        memory = None
        for streamed, block_chunks, label in (
            (False, None, "arrays in memory"),
            (True, None, "FeatureFile(path)['train'], streamed (blocks of 16,384 rows)"),
            (True, 16, "streamed in blocks of 16 chunks (1,024 rows)"),
        ):
            spec = {
                "train": train,
                "epochs": args.epochs,
                "streamed": streamed,
                "block_chunks": block_chunks,
                "path": str(path),
            }
            result = run(spec)
            memory = memory or result["seconds"]
            print(
                f"| {train!r}, {args.epochs} epochs | {label}"
                + f" | {result['seconds']:.0f} | {result['seconds'] / memory:.2f} | "
                f"{result['peak_gib']:.2f} | "
                + " / ".join(f"{100 * v:.2f}" for v in result["held_out"])
                + f" | {result['epoch']} | {100 * result['accuracy']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
