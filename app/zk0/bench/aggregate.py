"""`zk0 bench aggregate`: the server's weighted mean of four trainable updates in fp32, its time and peak memory."""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np

from .. import wire
from ..wire import npy_view
from .report import MIB, as_record, target
from .wire_tensors import random_update, wire_bytes

NODE_WEIGHTS = [160.0, 240.0, 200.0, 80.0]  # samples trained by four nodes: unequal on purpose


class _ArrayView(Mapping):
    """An ArrayRecord seen as numpy arrays, one at a time on access (as the strategy reads replies)."""

    def __init__(self, record, zero_copy: bool):
        self.record, self.zero_copy = record, zero_copy

    def __getitem__(self, key):
        return npy_view(self.record[key]) if self.zero_copy else self.record[key].numpy()

    def __iter__(self):
        return iter(self.record)

    def __len__(self):
        return len(self.record)


class _RssPeak:
    """Samples this process's resident memory every millisecond while a block runs."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def measure(fn: Callable[[], object], repeats: int) -> dict:
    """Median and min seconds of `fn` over repeats, then its peak memory above the starting point."""
    seconds = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
        del out
    gc.collect()
    with _RssPeak() as rss:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        del out
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "seconds": seconds,
            "tracemalloc_peak": peak, "rss_peak": rss.peak - rss.base}


def _packed_mean(packed: list, fmt: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """What the strategy does since weights travel packed: the mean of flat arrays, split by name after."""
    return wire.unpack(wire.aggregate(packed, fmt)[wire.PACKED], shapes)


def _aggregate_targets(runs: dict, copy: int) -> list[dict]:
    main = runs["numpy arrays"]
    return [
        target("server aggregation time, median (s)", main["median_s"], 3.0, True, " s"),
        target("packed aggregation time, median (s)",
               runs["packed replies (as the strategy aggregates)"]["median_s"], 3.0, True, " s"),
        target("aggregation peak memory above the inputs (copies, tracemalloc)", main["tracemalloc_peak"] / copy,
               3.0, True),
        target("aggregation peak memory above the inputs (copies, RSS)", main["rss_peak"] / copy, 3.0, True),
    ]


def bench_aggregate(args: argparse.Namespace) -> dict:
    """Decode and weighted-average four trainable updates in fp32 on the server: time and peak memory."""
    from .models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        meta = build_policy(Path(tmp), full=not args.smoke, meta=True)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters() if p.requires_grad}
    copy = 4 * sum(math.prod(s) for s in shapes.values())  # one fp32 copy of the trainable weights
    updates = [(random_update(shapes, args.fmt, seed=i), w) for i, w in enumerate(NODE_WEIGHTS)]
    inputs = sum(wire_bytes(u) for u, _ in updates)
    repeats = 1 if args.smoke else args.repeats
    runs = {"numpy arrays": measure(partial(wire.aggregate, updates, args.fmt), repeats)}
    # What the strategy does since weights travel packed: one flat array per reply, split by name after.
    packed = [({wire.PACKED: np.concatenate([u[k].reshape(-1) for k in sorted(u)])}, w) for u, w in updates]
    strategy_mean = partial(_packed_mean, packed, args.fmt, shapes)
    runs["packed replies (as the strategy aggregates)"] = measure(strategy_mean, repeats)
    del strategy_mean, packed
    records = [(as_record(u), w) for u, w in updates]
    del updates
    gc.collect()
    for zero_copy, how in ((False, "Array.numpy()"), (True, "zero-copy npy_view")):
        views = [(_ArrayView(r, zero_copy), w) for r, w in records]
        runs[f"ArrayRecord replies, {how}"] = measure(partial(wire.aggregate, views, args.fmt), repeats)
    rows = [[name, r["median_s"], r["min_s"], r["tracemalloc_peak"] / copy, r["rss_peak"] / copy]
            for name, r in runs.items()]
    return {
        "benchmark": "aggregate",
        "settings": {"smoke": args.smoke, "fmt": args.fmt, "nodes": len(NODE_WEIGHTS), "repeats": repeats},
        "trainable_params": copy // 4,
        "copy_bytes": copy,
        "inputs_copies": inputs / copy,
        "runs": runs,
        "tables": [{
            "title": f"aggregate {len(NODE_WEIGHTS)} {args.fmt} updates of {copy / 4e6:.2f}M params into fp32 "
                     f"(1 copy = {copy / MIB:.0f} MiB; the inputs, {inputs / copy:.2f} copies, are held before and "
                     "not counted)",
            "headers": ["inputs", "median s", "min s", "peak copies (tracemalloc)", "peak copies (RSS)"],
            "rows": rows,
        }],
        "targets": _aggregate_targets(runs, copy),
        "notes": ["tracemalloc sees numpy's allocations (the fp32 result; torch only views them); "
                  "RSS is sampled every ms"],
    }
