"""`zk0 bench wire|step|aggregate|overhead|gpu`: zk0's performance figures, each next to its target."""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import wire
from ..deploy.flwr_cli import QUIET
from ..files import atomic_write_json
from .aggregate import bench_aggregate
from .cli import bench_cli
from .demo import bench_demo
from .gpu import bench_gpu
from .report import BenchError, as_record, report, target
from .scale import bench_scale
from .step import ARMS, bench_step
from .wire import TRAIN_CONFIG, bench_wire


def _dataset_stats(spec: str) -> str:
    """Normalisation statistics of all of a dataset's frames (JSON), as a server merges and sends them."""
    from ..data import open_metadata, resolve_dataset
    from ..stats import compute_stats, to_json, training_frames

    episodes = list(range(open_metadata(spec).total_episodes))
    return to_json(compute_stats(training_frames(resolve_dataset(spec)[1], episodes)))


def _write_message(path: Path, base: str, fmt: str, steps: int, batch_size: int, stats: str) -> None:
    """The server's train message for round 1 (with federated `stats`), as objects a fresh process can inflate."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from ..model import frozen_fingerprint, load_policy, trainable_shapes, trainable_state
    from .models import message

    policy = load_policy(base, "cpu")
    config = {**TRAIN_CONFIG, "base-policy": base, "base-fingerprint": frozen_fingerprint(policy), "local-steps": steps,
              "total-steps": 3 * steps, "batch-size": batch_size, "learning-rate": 1e-3, "wire-format": fmt,
              "weights-layout": wire.layout_fingerprint(trainable_shapes(policy)), "norm-stats": stats}
    packed = {wire.PACKED: wire.pack(trainable_state(policy), fmt)}
    msg = message(RecordDict({"arrays": as_record(packed), "config": ConfigRecord(config)}))
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    path.write_bytes(pickle.dumps((msg.object_id, contents)))


def _run_client(message_path: Path, node_config: dict, warm: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", **QUIET)
    cmd = [sys.executable, "-m", "zk0.bench.perf_client", "--message", str(message_path),
           "--node-config", json.dumps(node_config)]
    # Files, not pipes: a worker the message starts inherits them and lives on, so a pipe never ends.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        spawned, started, children = time.time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([*cmd, "--warm"] if warm else cmd, env=env, stdout=out, stderr=err, text=True)
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if done.returncode != 0:
        raise BenchError(f"the ClientApp process failed ({done.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    start = result["start_wall"] - spawned  # interpreter start-up until the script's first line
    exit_s = wall - start - result["in_process_s"]
    result["phases"] = {"process_start": start, **result["phases"], "process_exit": exit_s}
    result["cpu"]["process_exit"] = child_cpu - result["in_process_cpu_s"]
    result["wall_s"], result["cpu_s"] = wall, child_cpu
    return result


COLD = ["process_start", "import_flwr", "inflate_message", "import_torch", "import_transformers_lerobot",
        "import_zk0_app", "open_session", "decode_weights", "open_dataset", "train_setup", "train_data_wait",
        "train_compute", "serialize_reply", "process_exit"]
WARM = ["process_start", "import_flwr", "inflate_message", "import_zk0_app", "apply_weights", "train_data_wait",
        "train_compute", "worker_transfer", "serialize_reply", "process_exit"]
LOOP = ("train_data_wait", "train_compute")  # the training loop: what a plain LeRobot loop spends too


def _summary(runs: list[dict], phases: list[str]) -> dict:
    """Median phases of repeated messages and what lies outside the optimizer steps and the training loop."""
    median = {p: statistics.median(r["phases"].get(p, 0.0) for r in runs) for p in phases}
    wall = statistics.median(r["wall_s"] for r in runs)
    return {"phases_s": median, "wall_s": wall, "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "outside_optimizer_s": wall - median["train_compute"],
            "outside_loop_s": wall - sum(median[p] for p in LOOP),
            "outside_optimizer_share": 1 - median["train_compute"] / wall,
            "outside_loop_share": 1 - sum(median[p] for p in LOOP) / wall, "runs": runs}


def _overhead_rows(cold: dict, warm: dict) -> list[list]:
    """The table's rows: median phases side by side, then the totals and the shares outside the loop."""
    rows = [[p, cold["phases_s"].get(p, ""), warm["phases_s"].get(p, "")] for p in dict.fromkeys(COLD + WARM)]
    totals = [("wall (parent's clock)", "wall_s"), ("CPU s (whole process)", "cpu_s"),
              ("outside the training loop", "outside_loop_s"),
              ("outside optimizer steps (loop's batch waits included)", "outside_optimizer_s")]
    rows += [[label, cold[key], warm[key]] for label, key in totals]
    shares = [("share outside the training loop (%)", "outside_loop_share"),
              ("share outside optimizer steps (%)", "outside_optimizer_share")]
    return rows + [[label, 100 * cold[key], 100 * warm[key]] for label, key in shares]


def _overhead_targets(cold: dict, warm: dict, full: bool) -> list[dict]:
    if full:
        return [target("seconds outside the training loop, warm worker", warm["outside_loop_s"], 15, True, " s"),
                target("seconds outside the training loop, fresh process", cold["outside_loop_s"], 15, True, " s")]
    return [target("share of wall time outside the training loop, warm worker (%)", 100 * warm["outside_loop_share"],
                   25, True, "%"),
            target("share of wall time outside the training loop, fresh process (%)",
                   100 * cold["outside_loop_share"], 25, True, "%")]


def _overhead_runs(args: argparse.Namespace, base: str, node_config: dict, steps: int, batch_size: int,
                   repeats: int) -> tuple[dict, dict, dict]:
    """Fresh-process messages, then a warm worker's first message and its next ones: (cold, first, warm)."""
    dataset = node_config["dataset"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "message.pkl"
        _write_message(path, base, args.fmt, steps, batch_size, _dataset_stats(dataset))
        gc.collect()
        cold = _summary([_run_client(path, {**node_config, "warm": False}) for _ in range(repeats)], COLD)
        # This process owns the worker, as the SuperExec does in a federation: the first message starts it.
        first = _run_client(path, {**node_config, "warm": True}, warm=True)
        warm = _summary([_run_client(path, {**node_config, "warm": True}, warm=True) for _ in range(repeats)], WARM)
    if first["warm"] or not all(r["warm"] for r in warm["runs"]):
        raise BenchError("the worker was not started by the first warm message or did not stay loaded")
    return cold, first, warm


def bench_overhead(args: argparse.Namespace) -> dict:
    """Where one ClientApp train message spends its wall time: in a fresh process, and with a warm worker."""
    from .learning import demo_assets

    demo, full = demo_assets(args.demo_dir), args.model == "full"
    steps = 2 if args.smoke else args.steps or (2 if full else 30)
    batch_size, repeats = args.batch_size or (1 if full else 8), 1 if args.smoke else args.repeats or (1 if full else 3)
    # `zk0 local` gives each of the demo's four nodes an equal share of the cores; a full-size node has a host of
    # its own.
    threads = (os.cpu_count() or 1) if full else max(1, (os.cpu_count() or 1) // 4)
    # The demo's 64x64 frames suit the full-size policy too: SmolVLA pads and resizes every camera to 512x512,
    # and its two slots are camera1 and camera2, as the tiny base policy's first two.
    node_config = {"dataset": str(demo["datasets"]["node-0"]), "cameras": demo["cameras"]["node-0"],
                   "torch-threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        if full:
            from .models import save_base_policy

            base = str(save_base_policy(Path(tmp), full=not args.smoke))
        else:
            base = str(demo["base-policy"])
        cold, first, warm = _overhead_runs(args, base, node_config, steps, batch_size, repeats)
    dominant = max((p for p in WARM if p not in LOOP), key=warm["phases_s"].get)
    return {
        "benchmark": "overhead",
        "settings": {"smoke": args.smoke, "model": args.model, "steps": steps, "batch_size": batch_size,
                     "fmt": args.fmt, "repeats": repeats, **node_config},
        "cold": cold,
        "first_warm_message_s": first["wall_s"],
        "warm": warm,
        "dominant_warm_phase": dominant,
        "tables": [{
            "title": f"one ClientApp train message ({args.model} model, {steps} steps of batch {batch_size}, median "
                     f"of {repeats}): fresh = all work in Flower's per-message process (warm=false); warm = the "
                     "process hands the message to the node's worker, which already holds the policy",
            "headers": ["phase (s)", "fresh process", "warm worker"],
            "rows": _overhead_rows(cold, warm),
        }],
        "targets": _overhead_targets(cold, warm, full),
        "notes": ["the first message of a worker (it imports and loads, as a fresh process does): "
                  f"{first['wall_s']:.2f} s",
                  f"largest warm phase outside the training loop: {dominant} ({warm['phases_s'][dominant]:.2f} s)",
                  "training loop = waiting for batches + optimizer steps, as in a plain LeRobot loop",
                  "one process alone on the host; in `zk0 local` four start at once and share the cores"],
    }


BENCHES = {"wire": bench_wire, "step": bench_step, "aggregate": bench_aggregate, "overhead": bench_overhead,
           "gpu": bench_gpu,
           "demo": bench_demo, "scale": bench_scale, "cli": bench_cli}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """One subcommand per benchmark; every one takes --smoke and --json."""
    p = argparse.ArgumentParser(prog="zk0 bench", description="zk0 performance figures next to their targets.")
    sub = p.add_subparsers(dest="bench", required=True)
    cmds = {name: sub.add_parser(name, help=fn.__doc__) for name, fn in BENCHES.items()}
    for cmd in cmds.values():
        cmd.add_argument("--json", type=Path, help="also write the figures to this JSON file")
        cmd.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests)")
    for name in ("step", "overhead", "demo", "scale", "cli"):
        cmds[name].add_argument("--demo-dir", type=Path, default=Path("demo-data"),
                                help="offline demo; written when missing")
    cmds["step"].add_argument("--model", choices=["tiny", "full"], default="tiny",
                              help="the demo's base policy, or full-size SmolVLA")
    cmds["step"].add_argument("--batch-size", type=int, help="default: 8 (tiny), 1 (full)")
    cmds["step"].add_argument("--block", type=int, help="steps per timed block (default: 30 tiny, 3 full)")
    cmds["step"].add_argument("--reps", type=int, help="timed blocks per arm (default: 6 tiny, 1 full)")
    cmds["step"].add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    cmds["step"].add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)} (default: all; plain always)")
    for name in ("step", "gpu"):
        cmds[name].add_argument("--mu", type=float, default=0.01, help="FedProx mu of the zk0 arm")
    cmds["aggregate"].add_argument("--fmt", choices=["fp16", "bf16"], default="bf16", help="wire format of the updates")
    cmds["aggregate"].add_argument("--repeats", type=int, default=5, help="timed runs; the median is the figure")
    cmds["overhead"].add_argument("--model", choices=["tiny", "full"], default="tiny",
                                  help="the demo's base policy, or full-size SmolVLA saved from files "
                                       "(1.7 GiB, temporary)")
    cmds["overhead"].add_argument("--steps", type=int, help="local steps (default: 30 as in demo.env; full 2)")
    cmds["overhead"].add_argument("--batch-size", type=int, help="batch size (default: 8 as in demo.env; full 1)")
    cmds["overhead"].add_argument("--fmt", choices=wire.FORMATS, default="fp16",
                                  help="wire format (the settings' default)")
    cmds["overhead"].add_argument("--repeats", type=int,
                                  help="fresh processes; the median is reported (default: 3; full 1)")
    cmds["demo"].add_argument("--env-file", type=Path, default=Path("experiments/demo.env"),
                              help="the experiment to run")
    cmds["demo"].add_argument("--out", type=Path, default=Path("outputs/bench-demo"),
                              help="its output folder (emptied first)")
    cmds["demo"].add_argument("--from-dir", type=Path, help="only split a finished run's output folder; run nothing")
    cmds["demo"].add_argument("--run-timeout", type=float, default=1800, help="seconds before `zk0 local` is stopped")
    cmds["cli"].add_argument("--repeats", type=int, default=5,
                             help="fresh processes per command; the median is the figure")
    cmds["cli"].add_argument("--out", type=Path, default=Path("outputs/bench-cli"),
                             help="where the env-file is written")
    cmds["scale"].add_argument("--nodes", default="4,16,64", help="numbers of virtual SuperNodes, comma-separated")
    cmds["scale"].add_argument("--fmt", choices=["fp16", "bf16", "fp32"], default="fp16",
                               help="wire format of the synthetic full-size updates")
    cmds["scale"].add_argument("--out", type=Path, default=Path("outputs/bench-scale"), help="runs, JSON and the plot")
    cmds["scale"].add_argument("--run-timeout", type=float, default=3600, help="seconds before one run is stopped")
    cmds["gpu"].add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    cmds["gpu"].add_argument("--steps", type=int, default=20, help="steps of the timed local round")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark, print its table and targets, optionally write them as JSON."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    try:
        result = BENCHES[args.bench](args)
    except BenchError as err:
        print(f"zk0 bench {args.bench}: {err}", file=sys.stderr)
        return 2
    # Timings on a shared host mean little without the load they ran under.
    result["host"] = {"cpus": os.cpu_count(), "load_1min_start": load, "load_1min_end": os.getloadavg()[0]}
    result.setdefault("notes", []).append(
        f"host: {os.cpu_count()} CPUs, 1-min load average {load:.1f} at start, "
        f"{result['host']['load_1min_end']:.1f} at end"
    )
    print(report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
