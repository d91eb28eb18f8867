"""`zk0 bench scale`: how a round's cost grows with the number of labs, through Flower's simulation runtime.

For each N, `zk0 local --simulation N` runs a two-round tiny-model federation with N virtual
SuperNodes (the same ServerApp and ClientApp; virtual node k trains on the demo's dataset k mod 4).
From the run: round wall time, the server's aggregation seconds and peak memory (the strategy
records both), payload bytes through the SuperLink, the SuperLink database's size and growth per
round (`--database`, sampled as each round's record appears) and the records' size. Beside it, the
full-size aggregation of N synthetic updates through the real strategy (zk0.bench.scale_agg). Each
cost is fitted against N on log-log axes: a slope of 1 is linear growth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..deploy.flwr_cli import QUIET
from ..deploy.procs import die_with_parent
from .report import MIB, BenchError, target


def _db_bytes(workdir: Path) -> int:
    """The SuperLink's SQLite state on disk: the database and its write-ahead log."""
    return sum(p.stat().st_size for p in workdir.glob("superlink.db*") if p.is_file())


class DbSampler(threading.Thread):
    """Samples the database size when each round's record appears (and at the end)."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.sizes, self.stop = out, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.sample()

    def sample(self) -> None:
        for path in self.out.glob("round-[0-9][0-9][0-9].json"):
            index = int(path.stem.split("-")[1])
            history = self.out / "history.json"
            # A round's record is complete once the server has evaluated its model (ZK0_EVAL_EVERY=1 here).
            if index not in self.sizes and history.is_file():
                try:
                    rec = next((r for r in json.loads(history.read_text()) if r["round"] == index), None)
                except (ValueError, OSError):
                    continue
                if rec and rec.get("server_eval"):
                    self.sizes[index] = _db_bytes(self.out / "local")


def simulated_run(env_file: Path, nodes: int, out: Path, timeout: float) -> dict:
    """Run N virtual nodes; the per-round costs from the records and the sampled database size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    env.update(ZK0_OUTPUT_DIR=str(out), ZK0_MIN_NODES=str(nodes), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               **QUIET)
    cmd = [sys.executable, "-m", "zk0.cli", "local", "--env-file", str(env_file), "--simulation", str(nodes)]
    sampler = DbSampler(out)
    sampler.start()
    started = time.perf_counter()
    try:
        # A benchmark that dies stops its run: `zk0 local` ends everything it started on SIGTERM.
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=die_with_parent(signal.SIGTERM))
    finally:
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(
            f"`zk0 local --simulation {nodes}` exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    history = json.loads((out / "history.json").read_text())
    trained = [r for r in history if r["round"] > 0]
    if any(len(r.get("contributors", [])) != nodes for r in trained):
        raise BenchError(f"N={nodes}: not every virtual node contributed every round: "
                         f"{[len(r.get('contributors', [])) for r in trained]}")
    sizes = sampler.sizes
    growth = [sizes[r["round"]] - sizes[r["round"] - 1]
              for r in trained if r["round"] in sizes and r["round"] - 1 in sizes]
    records = sum(p.stat().st_size for p in out.glob("round-*.json")) + (out / "history.json").stat().st_size
    per_round = lambda key: sum(r[key] for r in trained) / len(trained)  # noqa: E731
    # Consecutive records: the shorter tail ends the pairs.
    walls = [b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(history, history[1:], strict=False)]
    return {
        "nodes": nodes,
        "run_wall_s": wall,
        "round_wall_s": sum(walls) / len(walls),
        "aggregate_s": per_round("aggregate_seconds"),
        "server_peak_rss_mib": max(r["server_peak_rss_mib"] for r in trained),
        # train down and up, evaluate down
        "bytes_per_round": sum(sum(r["bytes"].values()) for r in trained) / len(trained),
        "db_bytes_end": _db_bytes(out / "local"),
        "db_growth_per_round": sum(growth) / len(growth) if growth else None,
        "records_bytes": records,
        "rounds": len(trained),
    }


def scale_env(path: Path, demo_dir: Path) -> Path:
    """The demo as a two-round, two-step tiny federation with base statistics (no per-node stats query)."""
    from .demo import smoke_env

    smoke_env(path, demo_dir)
    path.write_text(path.read_text() + "ZK0_STATS=base\nZK0_BATCH_SIZE=2\nZK0_EVAL_EVERY=1\n")
    return path


COSTS = {  # key in a run's figures -> (label, what its slope is held to)
    "round_wall_s": ("round wall time (s)", None),
    "aggregate_s": ("server aggregation, tiny, in the run (s)", 1.1),
    "bytes_per_round": ("payload bytes through the SuperLink per round", None),
    "db_growth_per_round": ("SuperLink database growth per round (bytes)", None),
    "records_bytes": ("round records on disk (bytes)", None),
}


def bench_scale(args: argparse.Namespace) -> dict:
    """Round costs for 4 to 64 labs (Flower's simulation runtime), fitted against N."""
    from .scale_agg import aggregation_costs, fit_slope, loglog_plot

    nodes = [4, 8] if args.smoke else [int(n) for n in args.nodes.split(",")]
    out = Path(args.out).resolve()
    env_file = scale_env(out / "scale.env", args.demo_dir)
    runs = [simulated_run(env_file, n, out / f"n{n:03d}", args.run_timeout) for n in nodes]
    agg = aggregation_costs(nodes, full=not args.smoke, fmt=args.fmt, repeats=1)
    series = {COSTS[k][0]: (nodes, [r[k] for r in runs]) for k in COSTS if all(r[k] for r in runs)}
    size = "full" if not args.smoke else "tiny"
    series[f"aggregation, {size} size synthetic (s)"] = (nodes, [a["median_s"] for a in agg])
    slopes = {name: fit_slope(xs, ys) for name, (xs, ys) in series.items()}
    loglog_plot(out / "scale.png", series, "zk0 round costs against the number of nodes")
    rows = [[r["nodes"], r["round_wall_s"], r["aggregate_s"], r["server_peak_rss_mib"], r["bytes_per_round"] / MIB,
             (r["db_growth_per_round"] or 0) / MIB, r["db_bytes_end"] / MIB, r["records_bytes"] / 1024, r["run_wall_s"]]
            for r in runs]
    targets = [target(f"{max(nodes)} virtual nodes complete a {runs[-1]['rounds']}-round federation", 1.0, 1.0, False)]
    targets += [target(f"log-log slope: {name}", slopes[name], 1.1, True) for name in slopes if "aggregation" in name]
    # At most one fp32 model copy plus one update beyond the replies held, at every N.
    worst = max(a["above_inputs_bytes"] / (a["copy_bytes"] + a["update_bytes"]) for a in agg)
    targets.append(target("aggregation peak memory above the inputs, in (1 fp32 copy + 1 update)", worst, 1.0, True))
    # CPU seconds beside wall seconds: less sensitive to other work on a shared machine.
    slopes["aggregation CPU seconds, synthetic"] = fit_slope(nodes, [a["median_cpu_s"] for a in agg])
    return {
        "benchmark": "scale",
        "settings": {"smoke": args.smoke, "nodes": nodes, "env_file": str(env_file), "fmt": args.fmt},
        "runs": runs,
        "aggregation": agg,
        "slopes": slopes,
        "plot": str(out / "scale.png"),
        "tables": _scale_tables(rows, slopes, agg, args.fmt, size),
        "targets": targets,
        "notes": list(SCALE_NOTES),
    }


SCALE_NOTES = [
    "payload bytes: the weights in the messages (train down and up, evaluate down), as the strategy counts "
    "them (Flower's framing adds ~0.1%)",
    "the simulation runtime passes messages in memory: its SuperLink database holds run and node state "
    "only; a deployed SuperLink with --database writes each payload object to SQLite and deletes it on "
    "delivery, so its file grows to about one round's payload in flight and is reused",
    "DB growth: SQLite database plus its write-ahead log, sampled when each round's record appears",
    "Flower 1.42's Grid.send_and_receive returns all N replies at once, inflated, in a list: the ServerApp "
    "holds N updates before the strategy sees one; 'above inputs' is what aggregate_train adds to them",
    "full-size synthetic replies share one payload's bytes (Array keeps the bytes it is given), so 64 need "
    "not be resident; 'inputs MiB' counts them as N updates",
]


def _scale_tables(rows: list, slopes: dict[str, float], agg: list[dict], fmt: str, size: str) -> list[dict]:
    """Per-N run costs, the fitted slopes, and the synthetic aggregation's time and memory."""
    return [
        {"title": "per N, tiny model, 2 rounds in Flower's simulation runtime (means over rounds)",
         "headers": ["N", "round wall s", "aggregate s", "server peak RSS MiB", "payload MiB/round",
                     "DB growth MiB/round", "DB MiB at end", "records KiB", "run wall s"],
         "rows": rows},
        {"title": "log-log slope of each cost against N (1 = linear)",
         "headers": ["cost", "slope"], "rows": [[name, slope] for name, slope in slopes.items()]},
        {"title": f"aggregation of N synthetic {fmt} updates ({size} size) "
                  "through Zk0FedProx.aggregate_train; memory above the replies held, in fp32 copies of the weights",
         "headers": ["N", "median s", "median CPU s", "peak above inputs (tracemalloc)", "peak above inputs (RSS)",
                     "inputs MiB"],
         "rows": [[a["nodes"], a["median_s"], a["median_cpu_s"], a["tracemalloc_peak_copies"], a["rss_peak_copies"],
                   a["inputs_bytes"] / MIB] for a in agg]},
    ]
