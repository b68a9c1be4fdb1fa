"""Draw the summary table of the benchmarks page as a figure.

The figure is made from the table itself, so that the two cannot disagree: the
documentation build runs this (``conf.py``) and the page shows the result. It
reads the first Markdown table after the ``(benchmarks-summary)=`` label of
``benchmarks.md``; "76.8 (0.3)" cells are a mean and a standard deviation.

    python docs/plot_benchmark_summary.py [OUT.png]
"""

import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PAGE = HERE / "benchmarks.md"
FIGURE = HERE / "_generated" / "benchmark_summary.png"
LABEL = "(benchmarks-summary)="
ACCURACY, FIT_TIME = "uniform accuracy %", "fit / LR"
_CELL = re.compile(r"^\s*([0-9.]+)\s*(?:\(([0-9.]+)\))?\s*$")


def read_summary(page=PAGE):
    """The summary table: ``(header, rows)``, each row a list of cell strings."""
    lines = Path(page).read_text().splitlines()
    if LABEL not in lines:
        raise ValueError(f"{page} has no {LABEL} label before its summary table.")
    table = []
    for line in lines[lines.index(LABEL) :]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    if len(table) < 3:
        raise ValueError(f"No Markdown table follows {LABEL} in {page}.")
    return table[0], table[2:]  # table[1] is the |---| line


def _number(cell, column, method):
    match = _CELL.match(cell)
    if match is None:
        raise ValueError(
            f"The summary table's {column!r} cell of {method!r} is {cell!r}; expected a number, "
            "optionally followed by its standard deviation in brackets, e.g. '76.8 (0.3)'."
        )
    mean, std = match.groups()
    return float(mean), float(std or 0)


def plot_summary(page=PAGE, out=FIGURE):
    """Write the figure of the summary table's accuracy and fit time to ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # no display during a documentation build
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    header, rows = read_summary(page)
    for column in ("method", ACCURACY, FIT_TIME):
        if column not in header:
            raise ValueError(f"The summary table in {page} has no {column!r} column: {header}.")
    methods = [row[header.index("method")].replace("`", "") for row in rows]
    accuracy, fit = (
        np.array(
            [
                _number(row[header.index(column)], column, method)
                for row, method in zip(rows, methods, strict=True)
            ]
        )
        for column in (ACCURACY, FIT_TIME)
    )

    positions = np.arange(len(methods))
    reference = next(i for i, m in enumerate(methods) if m.startswith("LogisticRegression"))
    # Points, not bars: the accuracy axis does not start at zero, and the time axis is
    # logarithmic, so bar lengths would mean nothing.
    figure, (left, right) = plt.subplots(
        1, 2, sharey=True, figsize=(9.5, 0.32 * len(methods) + 1.5), layout="constrained"
    )
    for ax, values, label in (
        (left, accuracy, "uniform test accuracy, %"),
        (right, fit, "fit time / one LogisticRegression fit"),
    ):
        ours = positions != reference
        ax.errorbar(values[ours, 0], positions[ours], xerr=values[ours, 1], fmt="o", capsize=3)
        ax.errorbar(
            values[reference, 0], reference, xerr=values[reference, 1], fmt="s", color="0.4"
        )
        ax.axvline(values[reference, 0], color="0.4", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    right.set_xscale("log")
    right.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    right.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    left.set_yticks(positions, methods)
    left.invert_yaxis()  # the table's order, top to bottom
    figure.suptitle("CIFAR-10-LT, IR 100, 5 seeds (grey, dashed: the tuned LogisticRegression)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


if __name__ == "__main__":
    print(plot_summary(out=sys.argv[1] if len(sys.argv) > 1 else FIGURE))
