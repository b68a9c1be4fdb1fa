"""Feature extraction speed and memory: the full pipeline against the bare forward pass.

On images of ../shared/data/cifar10-test-jpg.zip with EfficientNet-Lite0, in the
same run:

- the backbone's bare forward pass over preprocessed batches held in memory
  (images/s), and the full ``extract`` pipeline over the same images read
  from the zip (decoding, preprocessing in DataLoader workers, forward pass,
  HDF5 writes): their ratio is the cost of data loading (target >= 0.9);
- CPU inference engines on the same batches: eager torch, TorchScript frozen
  and optimised for inference, and ``torch.compile``;
- peak resident memory of ``extract`` on N and 4N images: it must not grow
  with the data set, since features stream to disk.

    python benchmarks/bench_extract.py [--images 256] [--batch-size 32] [--workers 1]
"""

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from measure import PeakRSS

from ltlearn.features import extract
from ltlearn.features.backbones import efficientnet_lite0
from ltlearn.features.extract import _OnnxRuntime
from ltlearn.features.sources import ImageFolderSource

ZIP = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-test-jpg.zip"


class _Subset(torch.utils.data.Dataset):
    def __init__(self, source, indices):
        self.source, self.indices = source, indices
        self.classes = source.classes
        self.ids = [source.ids[i] for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def images_per_second(forward, batches):
    forward(batches[0])  # warm-up: first-call allocations, compilation
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, default=ZIP)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    if not args.zip.exists():
        raise SystemExit(f"{args.zip} not found; pass --zip FILE.")
    source = ImageFolderSource(args.zip, prefix="test")
    picks = np.linspace(0, len(source) - 1, args.images).astype(int)
    subset = _Subset(source, picks)
    backbone = efficientnet_lite0()
    module = backbone.module
    images = torch.stack([backbone.preprocess(subset[i][0]) for i in range(len(subset))])
    batches = list(torch.split(images, args.batch_size))
    print(f"{len(subset)} images, batches of {args.batch_size}, {torch.get_num_threads()} threads")

    def pipeline_rate(engine):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "f.h5"
            if engine == "onnxruntime":  # export once, outside the timing, as a rerun would
                extract(_Subset(source, picks[:1]), backbone, out, engine=engine, verbose=False)
                out.with_name("g.h5.onnx").write_bytes(out.with_name("f.h5.onnx").read_bytes())
                out = out.with_name("g.h5")
            start = time.perf_counter()
            extract(
                subset,
                backbone,
                out,
                batch_size=args.batch_size,
                num_workers=args.workers,
                engine=engine,
                verbose=False,
            )
            return len(subset) / (time.perf_counter() - start)

    rows = []
    with torch.inference_mode():
        eager = images_per_second(module, batches)
    rows.append(("bare forward pass, eager torch", eager, None))
    rows.append(("extract() pipeline, engine='torch' (zip -> HDF5)", pipeline_rate("torch"), eager))
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(
            torch.jit.freeze(torch.jit.trace(module.eval(), batches[0]))
        )
        rows.append(
            (
                "bare forward, TorchScript frozen + optimised",
                images_per_second(frozen, batches),
                None,
            )
        )
    if not args.skip_compile:
        compiled = torch.compile(module)
        with torch.inference_mode():
            start = time.perf_counter()
            compiled(batches[0])
            compile_s = time.perf_counter() - start
            rate = images_per_second(compiled, batches)
        rows.append((f"bare forward, torch.compile (first call {compile_s:.0f} s)", rate, None))
    if importlib.util.find_spec("onnxruntime") is not None:
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            engine = _OnnxRuntime(backbone, Path(tmp) / "b.onnx", strict=True)
            ort_rate = images_per_second(engine, batches)
        rows.append(("bare forward, onnxruntime", ort_rate, None))
        rows.append(
            (
                "extract() pipeline, engine='onnxruntime' (the CPU default)",
                pipeline_rate("onnxruntime"),
                ort_rate,
            )
        )
    print("\n| path | images/s | vs eager forward | pipeline vs its bare forward |")
    print("|---|---|---|---|")
    for label, rate, bare in rows:
        versus = "" if bare is None else f"{rate / bare:.2f}"
        print(f"| {label} | {rate:.1f} | {rate / eager:.2f} | {versus} |")

    print("\n| images extracted | peak RSS above start (MiB) |")
    print("|---|---|")
    for n in (len(subset) // 4, len(subset)):
        part = _Subset(source, picks[:n])
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
            extract(
                part,
                backbone,
                Path(tmp) / "m.h5",
                batch_size=args.batch_size,
                num_workers=0,
                verbose=False,
            )
        print(f"| {n} | {mem.mib:.0f} |")


if __name__ == "__main__":
    main()
