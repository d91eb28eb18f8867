"""`zk0 bench learning`: does federation help? FedProx, FedAvg, local-only and centralized on the demo.

The command and the runs over seeds; the arms (learning_arms), the reference models and scoring
(learning_models), one seed (learning_seed) and the tables (learning_report) live beside it.

Every model maps cameras and normalises as its real counterpart would. The federated arms are real
`zk0 local` runs (each node's camera map, statistics merged from the nodes' training episodes) and
are scored with their checkpoints' processors. Each local-only model normalises with its own node's
training statistics, as lerobot-train on that dataset alone does; the centralized model with the
merged ones. Every evaluation set names its cameras its own way, so each is scored through its own
camera map. The nodes' datasets cannot be concatenated (other camera names; node-2 has one camera),
so centralized training draws each batch from one node, chosen with probability proportional to its
training frames, and preprocesses it with that node's camera map.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from ..data import DatasetError
from ..files import atomic_write_json
from ..logs import setup_logging
from ..settings import ServerSettings, SettingsError
from . import learning_report as rep
from .learning_arms import ARMS, DEFAULT_ARMS, arm_settings, demo_assets, personal_dirs
from .learning_report import COLUMNS, METRICS, NODES, SERVER, UNION
from .learning_seed import run_seed

# What other benchmarks and the tests import from here.
__all__ = ["ARMS", "COLUMNS", "DEFAULT_ARMS", "NODES", "SERVER", "demo_assets", "main", "personal_dirs"]
log = logging.getLogger("zk0")


def run_bench(s: ServerSettings, demo: dict, out: Path, args: argparse.Namespace, arms: list[str]) -> dict:
    """Every arm over every seed; the per-seed figures, their mean ± std, comparisons and targets."""
    load, started = [os.getloadavg()[0]], time.perf_counter()
    seeds = []
    for seed in range(s.seed, s.seed + args.seeds):
        log.info("seed %d (%d of %d)", seed, seed - s.seed + 1, args.seeds)
        seeds.append(run_seed(s.model_copy(update={"seed": seed}), demo, out / f"seed-{seed}", args.run_timeout, arms,
                              args.personalize_steps, args.retries, args.sim_options))
        if args.json:  # every finished seed's figures survive a run stopped before the last
            atomic_write_json(args.json.with_name(f"{args.json.stem}.seeds.json"), seeds)
    load.append(os.getloadavg()[0])
    summary = rep.summarise(seeds)
    sim = None
    if args.sim_options:
        from . import learning_sim

        sim = learning_sim.result([x["sim"]["table"] for x in seeds], [x["sim"]["agreement"] for x in seeds], arms,
                                  args.sim_options["labs"], args.sim_options["episodes"],
                                  sum(x["sim"]["seconds"] for x in seeds))
    others = [a for a in arms if a != rep.REFERENCE] if rep.REFERENCE in arms else []
    return {
        "definition": rep.DEFINITION,
        "settings": s.model_dump(mode="json", exclude={"output_dir", "seed"}),
        "seed_values": [x["seed"] for x in seeds],
        "federated_arms": arms,
        "arms": {a: {**ARMS[a], "learning_rate": arm_settings(s, a, out).learning_rate} for a in arms},
        "personalize_steps": args.personalize_steps,
        "seeds": seeds,
        "summary": summary,
        "comparisons": [rep.compare(summary, a, UNION, m) for a in others for m in METRICS],
        "targets": [t for m in METRICS for t in rep.targets(summary, seeds, arms, m)],
        "timings_s": {"per_seed": statistics.fmean(x["timings_s"]["total"] for x in seeds),
                      "total": time.perf_counter() - started},
        "load_average": load,
        **({"sim": sim} if sim else {}),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; --smoke shrinks the defaults for the test suite."""
    p = argparse.ArgumentParser(prog="zk0 bench learning", description="Federated vs local-only vs centralized (demo).")
    p.add_argument("--rounds", type=int, help="federated rounds (default 3; smoke 2)")
    p.add_argument("--local-steps", type=int, help="optimizer steps per round (default 30, the demo's; smoke 2)")
    p.add_argument("--batch-size", type=int, help="batch size for training and evaluation (default 8)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (default: the demo's 1e-3)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm, from --seed on (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"federated arms, comma-separated, or 'all' "
                   f"(default {','.join(DEFAULT_ARMS)}; all: {','.join(ARMS)})")
    p.add_argument("--personalize-steps", type=int, help="fedprox arm's personalisation steps (default: --local-steps)")
    p.add_argument("--demo-dir", type=Path, default=Path("demo-data"), help="offline demo; written when missing")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-learning"), help="runs, checkpoints and the plot")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before a federated run is stopped")
    p.add_argument("--retries", type=int, default=1, help="times a failed federated run is run again (default 1)")
    p.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps and one evaluation batch (tests)")
    p.add_argument("--sim", action="store_true", help="the simulated labs (zk0 demo --sim, under DEMO_DIR/sim) instead "
                   "of the synthetic demo, every model also scored by success in the simulator (needs zk0[sim])")
    p.add_argument("--sim-episodes", type=int, default=5, help="--sim: unseen scenes per lab and model (default 5)")
    p.add_argument("--sim-record", type=int, default=12, help="--sim: episodes each lab records (default 12)")
    args = p.parse_args(argv)
    args.arms = list(ARMS) if args.arms == "all" else [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in args.arms if a not in ARMS]:
        p.error(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and targets, write the plot and optional JSON."""
    args = parse_args(argv)
    setup_logging()
    rounds = args.rounds or (2 if args.smoke else 3)
    local_steps = args.local_steps or (2 if args.smoke else 30)
    args.personalize_steps = local_steps if args.personalize_steps is None else args.personalize_steps
    try:
        args.sim_options = None
        if not args.sim:
            demo = demo_assets(args.demo_dir)
        else:
            from ..labs import parse_labs
            from ..sim.demo import write_sim_demo

            demo = write_sim_demo(args.demo_dir / "sim", episodes=args.sim_record, seed=0)
            args.sim_options = {"labs": parse_labs(",".join(demo["labs"])), "episodes": args.sim_episodes}
        s = ServerSettings.load(
            num_rounds=rounds, local_steps=local_steps, seed=args.seed,
            batch_size=args.batch_size, learning_rate=args.learning_rate, eval_batches=1 if args.smoke else None,
            min_nodes=len(NODES), eval_every=1, checkpoint_every=rounds,  # only the final global model is needed
            base_policy=str(demo["base-policy"]), eval_dataset=str(demo["datasets"][SERVER]),
            eval_cameras=demo["cameras"][SERVER],
        )
        out = Path(args.out).resolve()
        with contextlib.redirect_stdout(sys.stderr):  # LeRobot prints while loading; stdout is for the table
            result = run_bench(s, demo, out, args, args.arms)
    except (SettingsError, DatasetError, RuntimeError) as err:  # RuntimeError: a federated run failed
        print(f"zk0 bench learning: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    result["plot"] = str(out / "server-eval.png")
    rep.plot(result, out / "server-eval.png")
    print(rep.report(result))
    if "sim" in result:
        from .learning_sim import report as sim_report

        print("\n" + sim_report(result["sim"]))
    print(f"plot: {result['plot']}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
