"""What a fresh process pays before its first result: imports, the first fit, the CLI.

Each figure comes from new Python processes (median of --repeats), in the same run:

- ``import ltlearn``, ``from ltlearn import BalancedSoftmaxClassifier`` (torch and
  scikit-learn load there) and ``import torch`` alone, the baseline;
- the first ``BalancedSoftmaxClassifier().fit`` in a process against a second,
  warm fit in the same process (imports excluded), on CIFAR-10-LT at IR 100
  from ../shared (or random data of the same shape when it is absent);
- the cost that the first fit paid before ltlearn stepped its optimizers
  itself: constructing the first ``torch.optim.Adam`` of a process (it
  imports ``torch._dynamo``);
- ``ltlearn --version`` and ``ltlearn --help``;
- and where ``python -X importtime -c "from ltlearn import
  BalancedSoftmaxClassifier"`` spends its time.

    python benchmarks/bench_startup.py [--repeats 3]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FEATURES = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_effnetlite0.h5"

FIT = """
import json, time
import numpy as np
from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import read_features
path = {path!r}
if path:
    X, y = read_features(path, "train")
    keep = long_tailed_subset(y, 100, random_state=0)
    X, y = X[keep], y[keep]
else:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    X = rng.standard_normal((len(y), 1280), dtype=np.float32) + y[:, None] * 0.05
times = []
for _ in range(2):
    start = time.perf_counter()
    BalancedSoftmaxClassifier(device="cpu", random_state=0).fit(X, y)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""

ADAM = """
import json, time, torch
start = time.perf_counter()
torch.optim.Adam([torch.zeros(1, requires_grad=True)])
print(json.dumps([time.perf_counter() - start]))
"""


def fresh(code):
    """Wall-clock seconds of a new interpreter running ``code``, and its stdout."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def median_seconds(code, repeats):
    return statistics.median(fresh(code)[0] for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.repeats
    bare = median_seconds("pass", n)
    rows = [
        ("python -c pass (interpreter start)", bare),
        ("import torch", median_seconds("import torch", n)),
        ("import ltlearn", median_seconds("import ltlearn", n)),
        (
            "from ltlearn import BalancedSoftmaxClassifier",
            median_seconds("from ltlearn import BalancedSoftmaxClassifier", n),
        ),
    ]
    cli = shutil.which("ltlearn")
    if cli:
        for flag in ("--version", "--help"):
            times = []
            for _ in range(n):
                start = time.perf_counter()
                subprocess.run([cli, flag], capture_output=True, check=True)
                times.append(time.perf_counter() - start)
            rows.append((f"ltlearn {flag}", statistics.median(times)))
    print(f"\n### Fresh processes, median of {n} (seconds, wall clock)\n")
    print("| what | seconds |")
    print("|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |")

    path = str(FEATURES) if FEATURES.exists() else ""
    fits = [json.loads(fresh(FIT.format(path=path))[1]) for _ in range(n)]
    first = statistics.median(f[0] for f in fits)
    warm = statistics.median(f[1] for f in fits)
    adam = statistics.median(json.loads(fresh(ADAM)[1])[0] for _ in range(n))
    data = "CIFAR-10-LT IR 100 (12,406 x 1,280)" if path else "random data, 12,406 x 1,280"
    print(f"\n### First fit in a fresh process against a warm fit, {data}\n")
    print("| what | seconds | vs warm fit |")
    print("|---|---|---|")
    print(f"| warm fit (second in the process) | {warm:.2f} | 1.00 |")
    print(f"| first fit in a fresh process | {first:.2f} | {first / warm:.2f} |")
    print(
        f"| first torch.optim.Adam construction in a process (what the first fit paid "
        f"before) | {adam:.2f} | {adam / warm:.2f} |"
    )

    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from ltlearn import BalancedSoftmaxClassifier"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    cumulative = {}
    for line in out.splitlines()[1:]:
        _, total, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        cumulative[name] = max(cumulative.get(name, 0), int(total))
    packages = ["torch", "sklearn", "numpy", "h5py"]
    print("\n### Where `from ltlearn import BalancedSoftmaxClassifier` spends its import time\n")
    print("| package (with what it imports) | cumulative ms |")
    print("|---|---|")
    for name in packages:
        if name in cumulative:
            print(f"| {name} | {cumulative[name] / 1000:.0f} |")


if __name__ == "__main__":
    main()
