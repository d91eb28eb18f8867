"""`zk0 bench wire|step|aggregate|overhead|gpu`: zk0's performance figures, each next to its target."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from . import wire
from .records import atomic_write_json

MIB = 2**20
NODE_WEIGHTS = [160.0, 240.0, 200.0, 80.0]  # samples trained by four nodes: unequal on purpose
# What the server's train message carries besides the weights (ServerRuntime.train_config + Flower's keys).
TRAIN_CONFIG = {
    "base-policy": "lerobot/smolvla_base", "base-fingerprint": "0123456789abcdef", "local-steps": 20,
    "total-steps": 60, "batch-size": 8, "learning-rate": 1e-4, "eval-batches": 4, "seed": 0,
    "server-round": 1, "proximal-mu": 0.01,
}
REPLY_METRICS = dict.fromkeys(
    ["loss", "policy_loss", "proximal_loss", "grad_norm", "lr", "steps", "samples", "train_seconds", "num-samples", "setup_seconds"], 1.0
)


class BenchError(RuntimeError):
    """The benchmark cannot run here; the message says why."""


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells)


def _target(name: str, value: float, limit: float, at_most: bool, unit: str = "") -> dict:
    passed = value <= limit if at_most else value >= limit
    return {"target": name, "value": value, "limit": f"{'<=' if at_most else '>='} {limit:g}{unit}", "passed": passed}


def report(result: dict) -> str:
    """The tables and the targets of one benchmark as plain text."""
    lines = [f"== {result['benchmark']} ({'smoke' if result['settings'].get('smoke') else 'full run'})"]
    for table in result["tables"]:
        lines += ["", table["title"], _table(table["headers"], table["rows"])]
    lines += ["", "targets:"]
    for t in result["targets"]:
        lines.append(f"  {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['value']:.4g} (target {t['limit']})")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def _record(arrays: Mapping[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def message_bytes(msg) -> dict:
    """Bytes Flower serializes for a message: its pushed objects (1.42's transport) and the message protobuf."""
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    # Flower 1.42 sends a message as content-addressed objects (message, records, arrays, 5 MiB
    # array chunks), each pushed once; message_to_proto is the single-protobuf form of the same.
    objects = sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
    return {"objects": objects, "proto": message_to_proto(msg).ByteSize()}


def exchange_bytes(record, fmt: str) -> dict:
    """Serialized bytes of one node's round: the server's train message (down) and the node's reply (up)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from .bench_models import message

    down = message(RecordDict({"arrays": record, "config": ConfigRecord({**TRAIN_CONFIG, "wire-format": fmt})}))
    node = ConfigRecord({"name": "node-0", "dataset": "someone/so100_dataset"})
    up = message(RecordDict({"metrics": MetricRecord(REPLY_METRICS), "arrays": record, "node": node}), reply_to=down)
    return {"down": message_bytes(down), "up": message_bytes(up)}


def format_error(state: Mapping[str, torch.Tensor], fmt: str) -> tuple[float, float]:
    """Max and mean absolute error one encode/decode round trip adds, tensor by tensor."""
    worst, total, count = 0.0, 0.0, 0
    for name, value in state.items():
        diff = (wire.decode(wire.encode({name: value}, fmt), fmt)[name] - value).abs()
        worst, total, count = max(worst, diff.max().item()), total + diff.double().sum().item(), count + diff.numel()
    return worst, total / count


def bench_wire(args: argparse.Namespace) -> dict:
    """Bytes per node per direction per round for the full state dict and the trainable weights per format."""
    from .bench_models import build_policy
    from .model import trainable_state

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not args.smoke)
    total, trainable = sum(p.numel() for p in policy.parameters()), trainable_state(policy)
    full_record = _record({k: v.detach().cpu().numpy() for k, v in policy.state_dict().items()})
    del policy
    gc.collect()
    sizes = {"full state dict fp32": exchange_bytes(full_record, "fp32")}
    values = {"full state dict fp32": sum(len(a.data) for a in full_record.values())}
    errors = {"full state dict fp32": (0.0, 0.0)}
    del full_record
    for fmt in wire.FORMATS:
        name = f"trainable {fmt}"
        encoded = wire.encode(trainable, fmt)
        values[name] = wire.wire_bytes(encoded)
        sizes[name] = exchange_bytes(_record(encoded), fmt)
        errors[name] = format_error(trainable, fmt)
        del encoded
        gc.collect()
    big = lambda s: max(s["down"]["objects"], s["down"]["proto"], s["up"]["objects"], s["up"]["proto"])
    ref = big(sizes["full state dict fp32"])
    rows = [
        [name, values[name] / MIB, s["down"]["objects"] / MIB, s["down"]["proto"] / MIB, s["up"]["objects"] / MIB,
         s["up"]["proto"] / MIB, ref / big(s), *errors[name]]
        for name, s in sizes.items()
    ]
    n_trainable = sum(v.numel() for v in trainable.values())
    targets = []
    for fmt in ("fp16", "bf16"):
        s = sizes[f"trainable {fmt}"]
        targets.append(_target(f"{fmt}: largest message per node per direction (MiB)", big(s) / MIB, 200, True, " MiB"))
        targets.append(_target(f"{fmt}: times smaller than the full fp32 state dict", ref / big(s), 8.5, False, "x"))
    return {
        "benchmark": "wire",
        "settings": {"smoke": args.smoke, "architecture": "scaled-down" if args.smoke else "full-size SmolVLA (SmolVLM2-500M, 16 layers)"},
        "params": {"total": total, "trainable": n_trainable},
        "payloads": {name: {"values_bytes": values[name], **sizes[name], "max_abs_error": errors[name][0],
                            "mean_abs_error": errors[name][1]} for name in sizes},
        "tables": [{
            "title": f"per node, per direction, per round ({total / 1e6:.2f}M params, {n_trainable / 1e6:.2f}M trainable; "
                     "MiB; 'objects' = what Flower 1.42 pushes, 'proto' = message_to_proto(msg).ByteSize())",
            "headers": ["payload", "values", "down objects", "down proto", "up objects", "up proto", "x smaller", "max abs err", "mean abs err"],
            "rows": rows,
        }],
        "targets": targets,
        "notes": ["rounds with node evaluation send the weights down once more, in the evaluate message (same size as 'down')",
                  "errors are over the random initial weights (kaiming-uniform, scale ~0.03)"],
    }


def _random_update(shapes: dict[str, tuple], fmt: str, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {k: wire.encode({k: 0.02 * torch.randn(s, generator=g)}, fmt)[k] for k, s in shapes.items()}


class _ArrayView(Mapping):
    """An ArrayRecord seen as numpy arrays, deserialized on access (as the strategy reads replies)."""

    def __init__(self, record):
        self.record = record

    def __getitem__(self, key):
        return self.record[key].numpy()

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
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "tracemalloc_peak": peak, "rss_peak": rss.peak - rss.base}


def bench_aggregate(args: argparse.Namespace) -> dict:
    """Decode and weighted-average four trainable updates in fp32 on the server: time and peak memory."""
    from .bench_models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        meta = build_policy(Path(tmp), full=not args.smoke, meta=True)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters() if p.requires_grad}
    copy = 4 * sum(math.prod(s) for s in shapes.values())  # one fp32 copy of the trainable weights
    updates = [(_random_update(shapes, args.fmt, seed=i), w) for i, w in enumerate(NODE_WEIGHTS)]
    inputs = sum(wire.wire_bytes(u) for u, _ in updates)
    repeats = 1 if args.smoke else args.repeats
    runs = {"numpy arrays": measure(lambda: wire.aggregate(updates, args.fmt), repeats)}
    records = [(_record(u), w) for u, w in updates]
    del updates
    gc.collect()
    views = [(_ArrayView(r), w) for r, w in records]
    runs["ArrayRecord replies (lazy .numpy())"] = measure(lambda: wire.aggregate(views, args.fmt), repeats)
    rows = [[name, r["median_s"], r["min_s"], r["tracemalloc_peak"] / copy, r["rss_peak"] / copy] for name, r in runs.items()]
    main = runs["numpy arrays"]
    return {
        "benchmark": "aggregate",
        "settings": {"smoke": args.smoke, "fmt": args.fmt, "nodes": len(NODE_WEIGHTS), "repeats": repeats},
        "trainable_params": copy // 4,
        "copy_bytes": copy,
        "inputs_copies": inputs / copy,
        "runs": runs,
        "tables": [{
            "title": f"aggregate {len(NODE_WEIGHTS)} {args.fmt} updates of {copy / 4e6:.2f}M params into fp32 "
                     f"(1 copy = {copy / MIB:.0f} MiB; the inputs, {inputs / copy:.2f} copies, are held before and not counted)",
            "headers": ["inputs", "median s", "min s", "peak copies (tracemalloc)", "peak copies (RSS)"],
            "rows": rows,
        }],
        "targets": [
            _target("server aggregation time, median (s)", main["median_s"], 3.0, True, " s"),
            _target("aggregation peak memory above the inputs (copies, tracemalloc)", main["tracemalloc_peak"] / copy, 3.0, True),
            _target("aggregation peak memory above the inputs (copies, RSS)", main["rss_peak"] / copy, 3.0, True),
        ],
        "notes": ["tracemalloc sees numpy's allocations (the fp32 result; torch only views them); RSS is sampled every ms"],
    }


def _write_message(path: Path, base: str, fmt: str, steps: int, batch_size: int) -> None:
    """The server's train message for round 1, as object contents a fresh process can inflate."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from .bench_models import message
    from .model import frozen_fingerprint, load_policy, trainable_state

    policy = load_policy(base, "cpu")
    config = {**TRAIN_CONFIG, "base-policy": base, "base-fingerprint": frozen_fingerprint(policy), "local-steps": steps,
              "total-steps": 3 * steps, "batch-size": batch_size, "learning-rate": 1e-3, "wire-format": fmt}
    msg = message(RecordDict({"arrays": _record(wire.encode(trainable_state(policy), fmt)), "config": ConfigRecord(config)}))
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    path.write_bytes(pickle.dumps((msg.object_id, contents)))


def _run_client(message_path: Path, node_config: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    env.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "zk0.perf_client", "--message", str(message_path), "--node-config", json.dumps(node_config)]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"the ClientApp process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["phases"] = {"process_start_exit": wall - result["in_process_s"], **result["phases"]}
    result["wall_s"] = wall
    return result


PHASES = ["process_start_exit", "import_flwr", "inflate_message", "import_torch", "import_transformers_lerobot",
          "import_zk0_app", "decode_weights", "open_session", "open_dataset", "train_setup", "train_data_wait",
          "train_compute", "serialize_reply"]


def bench_overhead(args: argparse.Namespace) -> dict:
    """Where one ClientApp train message spends its wall time, in a fresh process as Flower starts it."""
    from .bench_learning import demo_assets

    demo = demo_assets(args.demo_dir)
    steps, repeats = (2, 1) if args.smoke else (args.steps, args.repeats)
    # `zk0 local` gives each of the demo's four nodes an equal share of the cores.
    node_config = {"dataset": str(demo["datasets"]["node-0"]), "torch-threads": max(1, (os.cpu_count() or 1) // 4)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "message.pkl"
        _write_message(path, str(demo["base-policy"]), args.fmt, steps, args.batch_size)
        runs = [_run_client(path, node_config) for _ in range(repeats)]
    phases = {p: statistics.median(r["phases"][p] for r in runs) for p in PHASES}
    wall = statistics.median(r["wall_s"] for r in runs)
    outside = 1 - phases["train_compute"] / wall
    dominant = max((p for p in PHASES if p != "train_compute"), key=phases.get)
    rows = [[p, phases[p], 100 * phases[p] / wall] for p in PHASES] + [["wall (parent's clock)", wall, 100.0]]
    return {
        "benchmark": "overhead",
        "settings": {"smoke": args.smoke, "steps": steps, "batch_size": args.batch_size, "fmt": args.fmt, "repeats": repeats, **node_config},
        "phases_s": phases,
        "wall_s": wall,
        "optimizer_steps_s": phases["train_compute"],
        "outside_optimizer_share": outside,
        "dominant_phase": dominant,
        "runs": runs,
        "tables": [{
            "title": f"one ClientApp train message in a fresh process ({steps} steps of batch {args.batch_size}, "
                     f"median of {repeats}); train_compute = the optimizer steps",
            "headers": ["phase", "seconds", "% of wall"],
            "rows": rows,
        }],
        "targets": [_target("share of wall time outside optimizer steps (%)", 100 * outside, 25, True, "%")],
        "notes": [f"largest phase outside the optimizer steps: {dominant} ({phases[dominant]:.2f} s)",
                  "one process alone on the host; in `zk0 local` four start at once and share the cores"],
    }


def bench_step(args: argparse.Namespace) -> dict:
    """Steps/s of zk0's train_round against a plain LeRobot-style loop, interleaved in one process."""
    from .bench_step import compare

    policy, pre, batches = _step_inputs(args)
    smoke = args.smoke
    block = args.block or (2 if smoke else 30 if args.model == "tiny" else 3)
    reps = 1 if smoke else args.reps or (6 if args.model == "tiny" else 1)
    warmup = 0 if smoke or args.model == "full" else 1
    seconds = compare(policy, pre, batches, block=block, reps=reps, warmup=warmup, lr=1e-4, mu=args.mu)
    rate = {arm: block * len(s) / sum(s) for arm, s in seconds.items()}
    rows = [[arm, rate[arm], 1 / rate[arm], rate[arm] / rate["plain"]] for arm in seconds]
    batch_size = len(batches[0]["action"])
    return {
        "benchmark": "step",
        "settings": {"smoke": smoke, "model": args.model, "batch_size": batch_size, "block_steps": block, "reps": reps,
                     "warmup_blocks": warmup, "mu": args.mu, "torch_threads": torch.get_num_threads()},
        "seconds_per_block": seconds,
        "steps_per_s": rate,
        "ratio": rate["zk0"] / rate["plain"],
        "tables": [{
            "title": f"{args.model} model, batch {batch_size}: {reps} interleaved blocks of {block} steps per arm "
                     f"(zk0 = train_round with mu={args.mu}, a fresh round per block)",
            "headers": ["arm", "steps/s", "s/step", "vs plain"],
            "rows": rows,
        }],
        "targets": [_target("zk0 steps/s over plain loop steps/s", rate["zk0"] / rate["plain"], 0.95, False)],
    }


def _step_inputs(args: argparse.Namespace):
    """(policy, preprocessor, raw batches): the demo's base policy and data, or SmolVLA built from files."""
    if args.model == "tiny":
        from .bench_learning import demo_assets
        from .data import batch_stream, open_dataset
        from .model import load_policy, load_processors

        demo = demo_assets(args.demo_dir)
        policy = load_policy(str(demo["base-policy"]), "cpu")
        pre, _ = load_processors(str(demo["base-policy"]), "cpu")
        stream = batch_stream(open_dataset(str(demo["datasets"]["node-0"]), policy.config), args.batch_size or 8, seed=0)
        return policy, pre, [next(stream) for _ in range(2 if args.smoke else 8)]
    from .bench_models import build_policy, preprocessor_for, synthetic_batch

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not args.smoke)
    return policy, preprocessor_for(policy.config), [synthetic_batch(policy.config, args.batch_size or 1)]


def bench_gpu(args: argparse.Namespace) -> dict:
    """Full-size SmolVLA rounds on CUDA with bf16 autocast: step time, samples/s, peak memory per batch size."""
    if not torch.cuda.is_available():
        raise BenchError("gpu: CUDA is not available here (torch.cuda.is_available() is False); run it on a GPU machine")
    from .bench_models import build_policy, preprocessor_for, synthetic_batch
    from .bench_step import gpu_round

    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(Path(tmp), full=not args.smoke, device="cuda")
    pre = preprocessor_for(policy.config, "cuda")
    sizes = [2] if args.smoke else args.batch_sizes
    steps, results = (2 if args.smoke else args.steps), {}
    for size in sizes:
        try:
            results[size] = gpu_round(policy, pre, synthetic_batch(policy.config, size), steps=steps, warmup=2, lr=1e-4, mu=args.mu)
        except torch.cuda.OutOfMemoryError as err:
            results[size] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        gc.collect()
        torch.cuda.empty_cache()
    keys = ["step_s", "samples_per_s", "peak_allocated_gib", "peak_reserved_gib"]
    rows = [[size, *(r.get(k, r.get("error", "")) for k in keys)] for size, r in results.items()]
    return {
        "benchmark": "gpu",
        "settings": {"smoke": args.smoke, "steps": steps, "mu": args.mu, "device": torch.cuda.get_device_name(),
                     "torch": torch.__version__},
        "results": {str(k): v for k, v in results.items()},
        "tables": [{"title": f"one local round of {steps} steps per batch size (bf16 autocast, 512x512, two cameras)",
                    "headers": ["batch", *keys], "rows": rows}],
        "targets": [],
    }


BENCHES = {"wire": bench_wire, "step": bench_step, "aggregate": bench_aggregate, "overhead": bench_overhead, "gpu": bench_gpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """One subcommand per benchmark; every one takes --smoke and --json."""
    p = argparse.ArgumentParser(prog="zk0 bench", description="zk0 performance figures next to their targets.")
    sub = p.add_subparsers(dest="bench", required=True)
    cmds = {name: sub.add_parser(name, help=fn.__doc__) for name, fn in BENCHES.items()}
    for cmd in cmds.values():
        cmd.add_argument("--json", type=Path, help="also write the figures to this JSON file")
        cmd.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests)")
    for name in ("step", "overhead"):
        cmds[name].add_argument("--demo-dir", type=Path, default=Path("demo-data"), help="offline demo; written when missing")
    cmds["step"].add_argument("--model", choices=["tiny", "full"], default="tiny", help="the demo's base policy, or full-size SmolVLA")
    cmds["step"].add_argument("--batch-size", type=int, help="default: 8 (tiny), 1 (full)")
    cmds["step"].add_argument("--block", type=int, help="steps per timed block (default: 30 tiny, 3 full)")
    cmds["step"].add_argument("--reps", type=int, help="timed blocks per arm (default: 6 tiny, 1 full)")
    for name in ("step", "gpu"):
        cmds[name].add_argument("--mu", type=float, default=0.01, help="FedProx mu of the zk0 arm")
    cmds["aggregate"].add_argument("--fmt", choices=["fp16", "bf16"], default="bf16", help="wire format of the updates")
    cmds["aggregate"].add_argument("--repeats", type=int, default=3)
    cmds["overhead"].add_argument("--steps", type=int, default=30, help="local steps (demo.env: 30)")
    cmds["overhead"].add_argument("--batch-size", type=int, default=8, help="batch size (demo.env: 8)")
    cmds["overhead"].add_argument("--fmt", choices=wire.FORMATS, default="fp16", help="wire format (the settings' default)")
    cmds["overhead"].add_argument("--repeats", type=int, default=3, help="fresh processes; the median is reported")
    cmds["gpu"].add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    cmds["gpu"].add_argument("--steps", type=int, default=20, help="steps of the timed local round")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark, print its table and targets, optionally write them as JSON."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = BENCHES[args.bench](args)
    except BenchError as err:
        print(f"zk0 bench {args.bench}: {err}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
