"""`zk0 bench attack`: the demo federation with one of its four labs hostile, against each defence, over seeds.

Each run is a whole federation of the demo's four labs, lab `node-1` hostile through the testing hook
ZK0_TEST_ATTACK (zk0.attacks), and its final server policy loss is compared with the clean run of the same
defence and seed. To be cheap enough for 105 federations, the runs happen in this one process: the ServerApp's
own runtime and strategy (zk0.server.server_app.build_strategy, Flower's `Strategy.start` loop) drive the
ClientApp's own entry point (zk0.node.client_app, its simulation path: one kept session per lab) through an
in-process grid; what is left out is Flower's transport (SuperLink, SuperNodes, Ray), which the real-federation
test (tests/test_attack.py) covers. Nothing is started outside this process, so nothing outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from ..attacks import ATTACKS, ENV
from ..files import atomic_write_json
from ..logs import setup_logging
from ..settings import NodeSettings, ServerSettings
from . import attack_report as rep

HOSTILE = "node-1"  # the lab that attacks; node-0 is the first, so it is not the one Flower samples first
# Each defence as the settings that make it; "none" also lifts the claim cap (see run_federation).
DEFENCES = {
    "none": {"aggregation": "mean", "max_node_share": 1.0, "norm_bound_factor": 0.0},
    "bounded": {},  # the defaults: claims capped, ZK0_MAX_NODE_SHARE 0.5, ZK0_NORM_BOUND_FACTOR 3, the mean
    "median": {"aggregation": "median"},
    # Flower's default beta 0.2 trims int(0.2 x 4) = 0 of four updates: 0.25 trims one from each end.
    "trimmed": {"aggregation": "trimmed", "trim_fraction": 0.25},
    "krum": {"aggregation": "krum"},
}
log = logging.getLogger("zk0")


class InProcessGrid:
    """What Flower's `Strategy.start` asks of a Grid, answered by calling the ClientApp in this process.

    Virtual node k (Flower node id k + 1) is the env-file's node k, as under `zk0 local --simulation`.
    """

    def __init__(self, nodes: list[NodeSettings]):
        from flwr.app import Context, RecordDict

        run_config = {"sim-nodes": json.dumps([n.to_flower_config() for n in nodes])}
        self.contexts = {k + 1: Context(run_id=1, node_id=k + 1, state=RecordDict(), run_config=run_config,
                                        node_config={"partition-id": k, "num-partitions": len(nodes)})
                         for k in range(len(nodes))}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        from flwr.app import Message, MessageType

        from ..node.client_app import _run

        kinds = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate", MessageType.QUERY: "stats"}
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the Grids' push does
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = _run(kinds[msg.metadata.message_type], msg, context)
            except Exception as err:  # noqa: BLE001 - a failing node is an error reply, as Flower makes one
                from flwr.app import Error

                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = context.node_id
            replies.append(reply)
        return replies


def run_federation(settings: ServerSettings, nodes: list[NodeSettings], defence: str, attack: str | None) -> dict:
    """One federation in this process; its final server loss, what the limits clipped, and its seconds."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from ..server.runtime import ServerRuntime
    from ..server.server_app import build_strategy
    from .scale_agg import _server_identity

    started = time.perf_counter()
    os.environ.pop(ENV, None)
    if attack:
        os.environ[ENV] = f"{attack}@{HOSTILE}"
    try:
        runtime = ServerRuntime(settings)
        strategy = build_strategy(settings, runtime)
        if defence == "none":  # no claim cap either: the plain sample-weighted mean zk0 had before any defence
            strategy.limits.max_samples = None
        # The figure is the server's loss: the nodes' own evaluations (a quarter of a run's time) are skipped.
        strategy.eval_in_train, strategy.fraction_evaluate = False, 0.0
        config = ConfigRecord(runtime.train_config())
        grid, initial = InProcessGrid(nodes), ArrayRecord(runtime.initial_state())

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = runtime.end_round(server_round, arrays.to_torch_state_dict())
            return MetricRecord(metrics) if metrics else None

        try:
            with _server_identity():
                strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.num_rounds,
                               timeout=settings.round_timeout, train_config=config, evaluate_config=config,
                               evaluate_fn=evaluate_fn)
        finally:
            runtime.plotter.wait()
            runtime.tracker.finish(0)
    except Exception as err:  # noqa: BLE001 - a federation an attack broke is a result, not the benchmark's end
        log.warning("%s under %s: the federation failed: %s", attack or "clean", defence, err)
        return {"loss": float("nan"), "failed": f"{type(err).__name__}: {err}",
                "seconds": time.perf_counter() - started}
    finally:
        os.environ.pop(ENV, None)
    history = runtime.history()
    final = history[-1]
    return {
        "loss": float(final["server_eval"]["policy_loss"]),
        "action_mse": float(final["server_eval"]["action_mse"]),
        "clipped": {str(r["round"]): r.get("clipped", {}) for r in history if r.get("clipped")},
        "excluded": {str(r["round"]): r.get("excluded", {}) for r in history if r.get("excluded")},
        "seconds": time.perf_counter() - started,
    }


def node_settings(demo: dict, threads: int) -> list[NodeSettings]:
    """The demo's four labs, named node-0 to node-3 as `zk0 local` names them."""
    from .learning import NODES

    return [NodeSettings.load(dataset=str(demo["datasets"][n]), cameras=demo["cameras"][n], name=n, device="cpu",
                              torch_threads=threads) for n in NODES]


def run_bench(args: argparse.Namespace, demo: dict) -> dict:
    """Every (defence, attack or clean) over every seed; per-run figures and the summary."""
    from .learning import SERVER

    nodes, out = node_settings(demo, args.threads), Path(args.out).resolve()
    load, started, runs = [os.getloadavg()[0]], time.perf_counter(), []
    for seed in range(args.seed, args.seed + args.seeds):
        for defence in args.defences:
            for attack in [None, *args.attacks]:
                s = ServerSettings.load(
                    num_rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size, seed=seed,
                    eval_batches=args.eval_batches, min_nodes=len(nodes), eval_every=args.rounds,
                    checkpoint_every=args.rounds, stats="base", device="cpu", base_policy=str(demo["base-policy"]),
                    eval_dataset=str(demo["datasets"][SERVER]), eval_cameras=demo["cameras"][SERVER],
                    output_dir=out / f"seed-{seed}" / defence / (attack or "clean"), **DEFENCES[defence])
                run = {"seed": seed, "defence": defence, "attack": attack or "clean",
                       **run_federation(s, nodes, defence, attack)}
                log.warning("seed %d %-8s %-8s loss %.4f (%.0f s)", seed, defence, run["attack"], run["loss"],
                            run["seconds"])
                runs.append(run)
                if args.json:  # every finished run survives a benchmark stopped early
                    atomic_write_json(args.json.with_name(f"{args.json.stem}.runs.json"), runs)
    load.append(os.getloadavg()[0])
    return rep.summarise(runs, args, load, time.perf_counter() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; --smoke shrinks everything for the test suite."""
    p = argparse.ArgumentParser(prog="zk0 bench attack", description="One hostile lab of four against each defence.")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated (default all: {','.join(ATTACKS)})")
    p.add_argument("--defences", default=",".join(DEFENCES), help=f"comma-separated (default: {','.join(DEFENCES)})")
    p.add_argument("--seeds", type=int, default=3, help="seeds, from --seed on (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 3; smoke 2)")
    p.add_argument("--local-steps", type=int, help="optimizer steps per round (default 5; smoke 2)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--eval-batches", type=int, help="evaluation batches (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy host more "
                   "threads spin against each other)")
    p.add_argument("--demo-dir", type=Path, default=Path("demo-data"), help="offline demo; written when missing")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-attack"), help="runs' records and the plot")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--from-runs", type=Path, help="run nothing: summarise a runs file an earlier (perhaps stopped) "
                   "benchmark wrote (JSON.runs.json); --seeds, --attacks, --defences select what it holds")
    p.add_argument("--smoke", action="store_true", help="scale against none and bounded, 1 seed, 2 rounds of 2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.attacks, args.defences, args.seeds = "scale", "none,bounded", 1
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    args.defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    problems = [f"unknown attack {a!r}" for a in args.attacks if a not in ATTACKS]
    problems += [f"unknown defence {d!r}" for d in args.defences if d not in DEFENCES]
    if args.seeds < 1:
        problems.append("--seeds must be at least 1")
    if problems:
        p.error(f"{'; '.join(problems)} (attacks: {', '.join(ATTACKS)}; defences: {', '.join(DEFENCES)})")
    args.rounds = args.rounds or (2 if args.smoke else 3)
    args.local_steps = args.local_steps or (2 if args.smoke else 5)
    args.eval_batches = args.eval_batches or (1 if args.smoke else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and targets, write the plot and optional JSON."""
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["WANDB_MODE"] = "disabled"  # 105 federations: no tracking
    import torch

    from .learning import demo_assets

    torch.set_num_threads(args.threads)
    if args.from_runs:
        runs = [r for r in json.loads(args.from_runs.read_text()) if r["seed"] < args.seed + args.seeds]
        result = rep.summarise(runs, args, [float("nan")], sum(r["seconds"] for r in runs))
    else:
        with contextlib.redirect_stdout(sys.stderr):  # LeRobot prints while loading; stdout is for the table
            result = run_bench(args, demo_assets(args.demo_dir))
    out = Path(args.out).resolve()
    result["plot"] = str(out / "attack.png")
    rep.plot(result, out / "attack.png")
    print(rep.report(result))
    print(f"plot: {result['plot']}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
