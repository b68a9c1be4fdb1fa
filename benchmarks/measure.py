"""Measuring helpers shared by the benchmark scripts (run them as ``python benchmarks/...``)."""

import threading
import time


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (Linux)."""

    def __init__(self, interval=0.005):
        self.interval = interval

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _watch(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss())
            self._done.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.mib = (self.peak - self.start) / 2**20


def timed_fit(make, X, y):
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = make().fit(X, y)
        seconds = time.perf_counter() - start
    return model, seconds, mem.mib


def rows_per_second(predict, X, repeats=3):
    best = min(_time(predict, X) for _ in range(repeats))
    return len(X) / best


def _time(fn, X):
    start = time.perf_counter()
    fn(X)
    return time.perf_counter() - start
