"""`zk0 bench demo`: wall time of the offline demo with `zk0 local`, split into training, evaluation and overhead."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..deploy.flwr_cli import QUIET
from .report import BenchError, target

SPLIT = ["training", "evaluation", "overhead"]


def run_demo(env_file: Path, out: Path, demo_dir: Path, timeout: float) -> float:
    """Run `zk0 local` on env_file with its results in out; the wall time of the whole command."""
    from .learning import demo_assets

    demo_assets(demo_dir)  # experiments/demo.env reads demo-data/: write it when missing
    shutil.rmtree(out, ignore_errors=True)  # a previous run's checkpoint would be resumed, not rerun
    # The shell outranks the env-file in `zk0 local`: only the output folder is ours to choose.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZK0_")}
    env.update(ZK0_OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1", **QUIET)
    cmd = [sys.executable, "-m", "zk0.cli", "local", "--env-file", str(env_file)]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"`zk0 local --env-file {env_file}` exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return wall


def _eval_seconds(rec: dict, node: str) -> float:
    return (rec["clients"].get(node, {}).get("eval") or {}).get("eval_seconds", 0.0)


def _personal_seconds(rec: dict, node: str) -> float:
    return (rec["clients"].get(node, {}).get("eval") or {}).get("personal_seconds", 0.0)


def round_split(prev: dict, rec: dict) -> list[dict]:
    """One round's wall time (server clock) split along its critical path: the slowest node's work.

    With ZK0_EVAL_MODE=in-train a node's train message first evaluates the previous round's model (recorded
    there), and only the last round is followed by an evaluate message (the final model's node evaluation).
    That exchange is its own row when the record says when the train exchange ended (`trained_seconds`).
    """
    wall = rec["elapsed_seconds"] - prev["elapsed_seconds"]
    in_train = prev.get("node_eval_in") == "train"
    # Nodes run side by side, so the round waits for the slowest; their own clocks say what that was.
    work = {node: (c["train"]["train_seconds"], _eval_seconds(prev, node) if in_train else 0.0)
            for node, c in rec["clients"].items() if "train" in c}
    training, node_eval = max(work.values(), key=sum, default=(0.0, 0.0))
    # An evaluate message's work per node: its evaluation and, in the last round, its personalisation (training).
    evaluate_work = {node: (_personal_seconds(rec, node), _eval_seconds(rec, node)) for node in rec["clients"]}
    personal, after = max(evaluate_work.values(), key=sum, default=(0.0, 0.0))
    if rec.get("node_eval_in", "evaluate") != "evaluate":
        personal = after = 0.0  # this round's model is evaluated in the next round's train messages
    server = (rec["server_eval"] or {}).get("eval_seconds", 0.0)
    trained_at = rec.get("trained_seconds")
    if not (in_train and after and trained_at):  # one row: the evaluate message (older runs: always) is inside
        return [_row(rec["round"], wall, training + personal, node_eval + after + server)]
    train_wall = trained_at - prev["elapsed_seconds"]
    return [_row(rec["round"], train_wall, training, node_eval),
            _row(f"{rec['round']} final evaluation", wall - train_wall, personal, after + server)]


def _row(label, wall: float, training: float, evaluation: float) -> dict:
    return {"round": label, "wall": wall, "training": training, "evaluation": evaluation,
            "overhead": wall - training - evaluation}


def demo_breakdown(out: Path, wall: float | None) -> dict:
    """Training, evaluation and overhead of a finished run, from its history.json."""
    path = Path(out) / "history.json"
    if not path.is_file():
        raise BenchError(f"{path} is missing: not the output folder of a finished `zk0 local` run")
    history = json.loads(path.read_text())
    evaluated = [r for r in history if r.get("server_eval")]
    if len(evaluated) < 2 or evaluated[0]["round"] != 0 or len(evaluated) != len(history):
        raise BenchError(f"{path}: the split needs a server evaluation every round (ZK0_EVAL_EVERY=1)")
    rounds = [row for prev, rec in zip(history, history[1:], strict=False) for row in round_split(prev, rec)]
    total = {k: sum(r[k] for r in rounds) for k in ["wall", *SPLIT]}
    # Before round 0's record: SuperLink, SuperNodes and ServerApp start, round-0 server evaluation;
    # after the last: checkpoint and shutdown. Only known when this benchmark timed the command.
    outside = None if wall is None else wall - total["wall"]
    rows = [[f"round {r['round']}", r["wall"], *(r[k] for k in SPLIT), 100 * r["overhead"] / r["wall"]] for r in rounds]
    rows.append(["all rounds", total["wall"], *(total[k] for k in SPLIT), 100 * total["overhead"] / total["wall"]])
    if wall is not None:
        rows.append(["start-up, round 0 and shutdown", outside, "", "", "", ""])
        rows.append(["`zk0 local` wall time", wall, "", "", "", ""])
    share = total["overhead"] / total["wall"]
    # Warm rounds: every train exchange after the first (whose nodes load their policy and datasets).
    warm = [r for r in rounds if isinstance(r["round"], int) and r["round"] >= 2]
    warm_share = sum(r["overhead"] for r in warm) / sum(r["wall"] for r in warm) if warm else float("nan")
    return {
        "benchmark": "demo",
        "rounds": rounds,
        "totals_s": total,
        "wall_s": wall,
        "outside_rounds_s": outside,
        "overhead_share": share,
        "tables": [{
            "title": "seconds per round on the server's clock; training and evaluation are the slowest node's own "
                     "clocks (nodes run side by side), evaluation adds the server's; overhead is the rest",
            "headers": ["", "wall", *SPLIT, "overhead %"],
            "rows": rows,
        }],
        "warm_overhead_share": warm_share,
        "targets": [target("share of round wall time outside training and evaluation (%)", 100 * share, 25, True, "%"),
                    target("the same in warm rounds, 2 on, train exchanges (%)", 100 * warm_share, 40, True, "%")],
    }


def smoke_env(path: Path, demo_dir: Path) -> Path:
    """A two-round, two-step version of experiments/demo.env on the demo in demo_dir."""
    from .learning import NODES, SERVER, demo_assets

    demo = demo_assets(demo_dir)
    values = {"ZK0_BASE_POLICY": demo["base-policy"], "ZK0_EVAL_DATASET": demo["datasets"][SERVER],
              "ZK0_EVAL_CAMERAS": demo["cameras"][SERVER],
              **{f"ZK0_NODE_{i}_DATASET": demo["datasets"][n] for i, n in enumerate(NODES)},
              **{f"ZK0_NODE_{i}_CAMERAS": demo["cameras"][n] for i, n in enumerate(NODES)},
              "ZK0_NUM_ROUNDS": 2, "ZK0_LOCAL_STEPS": 2, "ZK0_MIN_NODES": len(NODES), "ZK0_EVAL_BATCHES": 1,
              "ZK0_CHECKPOINT_EVERY": 2, "ZK0_DEVICE": "cpu", "WANDB_MODE": "disabled"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def bench_demo(args: argparse.Namespace) -> dict:
    """The offline demo's wall time, split into training, evaluation and overhead."""
    env_file = args.env_file
    if args.from_dir:
        result = demo_breakdown(args.from_dir, None)
    else:
        out = Path(args.out).resolve()
        if args.smoke:
            env_file = smoke_env(out.parent / f"{out.name}-smoke.env", args.demo_dir)
        wall = run_demo(env_file, out, args.demo_dir, args.run_timeout)
        result = demo_breakdown(out, wall)
    result["settings"] = {"smoke": args.smoke, "env_file": str(env_file), "from_dir": str(args.from_dir or "")}
    result["notes"] = ["overhead: ClientApp process start and imports, model build, dataset open, weights in and out, "
                       "message transport and the server's aggregation and checkpoint"]
    return result
