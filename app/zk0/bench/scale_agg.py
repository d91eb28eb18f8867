"""The server side of `zk0 bench scale`: the strategy's aggregation of one round, from 4 to 64 labs.

Flower 1.42 hands the strategy every reply of a round at once. `Strategy.start` passes
`grid.send_and_receive(...)` straight to `aggregate_train`, and both Grids
(`flwr.superlink.grid.HttpGrid`, which a deployed ServerApp gets, and `InMemoryGrid` in simulation)
collect every reply into one list and return it only when all have arrived or the round timed out.
HttpGrid also inflates each reply completely (`bytes(buff)` over its chunks) before it goes in the
list. So a ServerApp holds N full updates at once whatever the strategy does: the inputs grow
linearly in N by design, and what aggregation can keep flat is the memory it needs on top of them.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..server.records import RunRecorder
from ..server.strategy import Zk0FedProx
from ..wire import DELTA, FORMATS, PACKED, layout_fingerprint, npy_view, quantize_delta
from .aggregate import measure
from .report import BenchError, as_record
from .wire import REPLY_METRICS
from .wire_tensors import random_update

DISTINCT_LIMIT = 6 * 2**30  # most memory the replies may take when each has its own bytes (not shared)
GIB = 2**30


class _Fleet:
    """The part of a Grid that FedProx.configure_train uses (get_node_ids), plus the message ids a push assigns.

    Not a flwr Grid: sampling nodes is all configure_train asks of one, and nothing is sent.
    """

    def __init__(self, nodes: int):
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push(self, messages: list[Message]) -> None:
        for msg in messages:  # as the Grids' push_messages do: replies then name the message they answer
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex


@contextmanager
def _server_identity() -> Iterator[None]:
    """The run identity a ServerApp process has (Flower needs it to create messages); Flower's INFO lines muted."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, k) for k in ("_run_id", "_node_id", "_task_id")}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    flwr_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flwr_log.setLevel(level)
        for k, v in saved.items():
            setattr(TaskIdentity, k, v)


def trainable_shapes(full: bool) -> dict[str, tuple]:
    """Names and shapes of SmolVLA's trainable weights: the full-size action expert, or the tiny demo policy's."""
    from .models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        meta = build_policy(Path(tmp), full=full, meta=True)
    return {n: tuple(p.shape) for n, p in meta.named_parameters() if p.requires_grad}


def _update(shapes: dict[str, tuple], fmt: str, seed: int) -> dict[str, np.ndarray]:
    """One node's reply payload, packed as zk0 sends it."""
    parts = random_update(shapes, "fp32" if fmt == DELTA else fmt, seed)
    packed = np.concatenate([parts.pop(k).reshape(-1) for k in sorted(shapes)])
    return quantize_delta(packed) if fmt == DELTA else {PACKED: packed}


def _samples(node: int) -> float:
    return 80.0 + 8.0 * node  # samples trained: a different weight for every node


def _configured(n: int, shapes: dict[str, tuple], fmt: str, out: Path) -> tuple[Zk0FedProx, list[Message]]:
    """A strategy set up as server_app builds it, and the train messages its configure_train sent to n nodes."""
    strategy = Zk0FedProx(
        RunRecorder(out), lambda r: False, wire_format=fmt, proximal_mu=0.01, min_train_nodes=n, min_evaluate_nodes=n,
        min_available_nodes=n, weighted_by_key="num-samples",
    )
    fleet = _Fleet(n)
    global_model = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()})
    sent = list(strategy.configure_train(1, global_model, ConfigRecord({}), fleet))
    fleet.push(sent)
    return strategy, sent


def _replies(sent: list[Message], shapes: dict[str, tuple], fmt: str, shared: bool) -> list[Message]:
    """A reply to each train message; `shared`: every reply's Arrays reference one random payload's bytes."""
    layout, payload, replies = layout_fingerprint(shapes), None, []
    for i, request in enumerate(sent):
        if payload is None or not shared:
            payload = as_record(_update(shapes, fmt, seed=i))
        # Array's direct constructor keeps the bytes object it is given: no copy per reply.
        arrays = ArrayRecord(
            {k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data) for k, a in payload.items()}
        )
        content = RecordDict({
            "arrays": arrays,
            "metrics": MetricRecord({**REPLY_METRICS, "num-samples": _samples(i)}),
            "node": ConfigRecord({"name": f"lab-{i}", "dataset": f"lab-{i}/so100", "layout": layout}),
        })
        replies.append(Message(content=content, reply_to=request))
    return replies


def _cost(n: int, shapes: dict[str, tuple], fmt: str, repeats: int, shared: bool, out: Path,
          check: Callable[[list[Message], ArrayRecord], None] | None) -> dict:
    strategy, sent = _configured(n, shapes, fmt, out)
    replies = _replies(sent, shapes, fmt, shared)
    del sent  # measure() collects garbage before it starts
    cpu = []

    def run():
        # CPU seconds beside measure()'s wall seconds: the machine this runs on may be busy with other work.
        started = time.process_time()
        out = strategy.aggregate_train(1, replies)
        cpu.append(time.process_time() - started)
        return out

    costs = measure(run, repeats)
    if check is not None:
        check(replies, strategy.aggregate_train(1, replies)[0])
    copy = 4 * sum(math.prod(s) for s in shapes.values())  # one fp32 copy of the trainable weights
    per_reply = sum(npy_view(a).nbytes for a in replies[0].content["arrays"].values())  # values, not .npy headers
    above = max(costs["tracemalloc_peak"], costs["rss_peak"])
    return {
        "nodes": n, **costs, "median_cpu_s": statistics.median(cpu[:repeats]), "copy_bytes": copy,
        "update_bytes": per_reply, "inputs_bytes": per_reply * n,
        "inputs_resident_bytes": per_reply * (1 if shared else n), "shared_inputs": shared,
        "tracemalloc_peak_copies": costs["tracemalloc_peak"] / copy, "rss_peak_copies": costs["rss_peak"] / copy,
        "above_inputs_bytes": above, "total_peak_bytes": per_reply * n + above,
    }


def aggregation_costs(nodes: list[int], full: bool, fmt: str, repeats: int, *, shared: bool | None = None,
                      check: Callable[[list[Message], ArrayRecord], None] | None = None) -> list[dict]:
    """Time and peak memory of Zk0FedProx.aggregate_train over N synthetic replies, for each N in `nodes`.

    shared (default: full) makes the N replies reference one payload's bytes, so 64 full-size fp16
    replies take 190 MiB rather than 12 GiB; aggregation reads each reply as if it were its own.
    check(replies, aggregated) is called once per N, after the measurement.
    """
    if fmt not in (*FORMATS, DELTA):
        raise BenchError(f"unknown wire format {fmt!r}")
    shapes = trainable_shapes(full)
    shared = full if shared is None else shared
    copy = 4 * sum(math.prod(s) for s in shapes.values())
    if not shared and max(nodes) * copy * {"fp32": 1, DELTA: 0.25}.get(fmt, 0.5) > DISTINCT_LIMIT:
        raise BenchError(
            f"{max(nodes)} distinct replies need more than {DISTINCT_LIMIT / GIB:.0f} GiB: use shared replies"
        )
    results = []
    with _server_identity(), tempfile.TemporaryDirectory() as tmp:
        for n in nodes:
            results.append(_cost(n, shapes, fmt, repeats, shared, Path(tmp) / f"nodes-{n}", check))
    return results


def fit_slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x): the exponent k of y ~ x^k."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def loglog_plot(path: Path, series: dict[str, tuple[list[float], list[float]]], title: str) -> Path:
    """Each cost against N on log-log axes, its fitted slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in containers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        slope = fit_slope(xs, ys)
        line = ax.loglog(xs, ys, marker="o", label=f"{name} (slope {slope:.2f})")[0]
        intercept = np.mean(np.log(ys)) - slope * np.mean(np.log(xs))
        ax.loglog(xs, np.exp(intercept) * np.asarray(xs, float) ** slope, linestyle=":", color=line.get_color())
    nodes = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(nodes, [str(x) for x in nodes], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(title=title, xlabel="labs replying (N)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
