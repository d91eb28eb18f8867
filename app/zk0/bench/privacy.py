"""`zk0 bench privacy`: what lab-level differential privacy costs the demo federation: the final server loss at
several target epsilons (delta 1e-5 by default) over the run's rounds, beside the same federation without DP.

Every arm is a real `zk0 local` run with ZK0_WIRE_FORMAT=fp32 and ZK0_STATS=base (what DP needs; the run without DP
uses the same); the DP arms set ZK0_DP=client, ZK0_DP_CLIP_NORM and ZK0_DP_TARGET_EPSILON, and the epsilon shown is
the one the run's round records hold (Flower's RdpAccountant), not the target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ..files import atomic_write_json
from ..logs import setup_logging
from ..privacy import noise_multiplier
from ..settings import ServerSettings, SettingsError
from .learning_arms import demo_assets, run_with_retries
from .learning_report import NODES, SERVER
from .report import table

BASELINE = "no DP"


def arm_result(name: str, s: ServerSettings, history: list[dict], seconds: float) -> dict:
    """One arm's figures from its round records."""
    last = history[-1]
    privacy = [r["privacy"] for r in history if r.get("privacy")]
    norms = [n for p in privacy for n in p["update_norms"].values()]
    return {
        "arm": name, "target_epsilon": s.dp_target_epsilon,
        "noise_multiplier": privacy[-1]["noise_multiplier"] if privacy else None,
        "epsilon": privacy[-1]["epsilon"] if privacy else None, "delta": s.dp_delta if privacy else None,
        "epsilon_per_round": [p["epsilon"] for p in privacy],
        "max_update_norm": max(norms) if norms else None, "clip_norm": s.dp_clip_norm,
        "server_policy_loss": last["server_eval"]["policy_loss"],
        "server_action_mse": last["server_eval"]["action_mse"], "seconds": seconds,
    }


def arms(s: ServerSettings, epsilons: list[float], baseline: bool, clip_norm: float) -> list[tuple]:
    """(name, settings) of every arm: the run without DP, then one per target epsilon."""
    out = [(BASELINE, s)] if baseline else []
    for eps in epsilons:
        # Loaded, so the same refusals as a user's settings apply (e.g. a target out of reach in these rounds).
        dp = ServerSettings.load(**{**s.model_dump(), "dp": "client", "dp_clip_norm": clip_norm,
                                    "dp_target_epsilon": eps})
        out.append((f"epsilon {eps:g}", dp))
    return out


def run(s: ServerSettings, demo: dict, out: Path, args: argparse.Namespace) -> dict:
    """Every arm's real run and figures."""
    load, rows = [os.getloadavg()[0]], []
    for name, arm in arms(s, args.epsilons, args.baseline, args.clip_norm):
        folder = out / name.replace(" ", "-")
        started = time.perf_counter()
        history, _ = run_with_retries(name, arm.model_copy(update={"output_dir": folder}), demo, args.run_timeout,
                                      args.retries, args.nodes)
        rows.append(arm_result(name, arm, history, time.perf_counter() - started))
        if arm.dp != "off":
            rows[-1]["noise_multiplier_chosen"] = noise_multiplier(arm)
        atomic_write_json(out / "arms.json", rows)  # every finished arm survives a run stopped before the last
    load.append(os.getloadavg()[0])
    return {
        "benchmark": "privacy", "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {"smoke": args.smoke, "rounds": s.num_rounds, "local_steps": s.local_steps, "nodes": args.nodes,
                     "seed": s.seed, "clip_norm": args.clip_norm, "delta": s.dp_delta, "wire_format": s.wire_format},
        "arms": rows, "load_average": load, "mean_load": statistics.fmean(load),
    }


def report(result: dict) -> str:
    """The loss-vs-epsilon table as plain text."""
    st = result["settings"]
    headers = ["arm", "noise multiplier", "epsilon (recorded)", "delta", "server policy loss", "server action MSE",
               "largest update norm", "wall s"]
    rows = [[a["arm"], a["noise_multiplier"] or "-", a["epsilon"] or "-", a["delta"] or "-", a["server_policy_loss"],
             a["server_action_mse"], a["max_update_norm"] or "-", a["seconds"]] for a in result["arms"]]
    title = (f"demo federation, {st['nodes']} nodes, {st['rounds']} rounds of {st['local_steps']} steps, seed "
             f"{st['seed']}, clip norm {st['clip_norm']:g}, {result['date']}, load {result['load_average'][0]:.1f} -> "
             f"{result['load_average'][-1]:.1f}")
    return "\n".join(["== privacy", title, table(headers, rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; --smoke shrinks the defaults for the test suite."""
    p = argparse.ArgumentParser(prog="zk0 bench privacy", description="Server loss vs epsilon on the demo federation.")
    p.add_argument("--epsilons", help="target epsilons, comma-separated (default 1,4,10; smoke 10)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", default=None,
                   help="skip the run without DP (smoke skips it)")
    p.add_argument("--clip-norm", type=float, default=0.05, help="ZK0_DP_CLIP_NORM (default 0.05, below the demo's "
                   "round updates: docs/privacy.md)")
    p.add_argument("--delta", type=float, default=1e-5, help="ZK0_DP_DELTA (default 1e-5)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 3; smoke 2)")
    p.add_argument("--local-steps", type=int, help="optimizer steps per round (default 30, the demo's; smoke 2)")
    p.add_argument("--nodes", type=int, help=f"the demo's first N nodes (default {len(NODES)}; smoke 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--demo-dir", type=Path, default=Path("demo-data"), help="offline demo; written when missing")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-privacy"), help="the runs' folders")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before a federated run is stopped")
    p.add_argument("--retries", type=int, default=1, help="times a failed federated run is run again (default 1)")
    p.add_argument("--smoke", action="store_true", help="2 nodes, 2 rounds of 2 steps, epsilon 10 only (tests)")
    args = p.parse_args(argv)
    args.epsilons = [float(e) for e in (args.epsilons or ("10" if args.smoke else "1,4,10")).split(",") if e.strip()]
    args.baseline = (not args.smoke) if args.baseline is None else args.baseline
    args.nodes = args.nodes or (2 if args.smoke else len(NODES))
    if not 1 <= args.nodes <= len(NODES):
        p.error(f"--nodes must be 1 to {len(NODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the arms, print the table, optionally write the JSON."""
    args = parse_args(argv)
    setup_logging()
    rounds = args.rounds or (2 if args.smoke else 3)
    try:
        demo = demo_assets(args.demo_dir)
        s = ServerSettings.load(
            num_rounds=rounds, local_steps=args.local_steps or (2 if args.smoke else 30), seed=args.seed,
            learning_rate=1e-3, eval_batches=1 if args.smoke else None, min_nodes=args.nodes, eval_every=1,
            checkpoint_every=rounds, wire_format="fp32", dp_delta=args.delta, stats="base",
            base_policy=str(demo["base-policy"]), eval_dataset=str(demo["datasets"][SERVER]),
            eval_cameras=demo["cameras"][SERVER],
        )
        with contextlib.redirect_stdout(sys.stderr):  # LeRobot prints while loading; stdout is for the table
            result = run(s, demo, Path(args.out).resolve(), args)
    except (SettingsError, RuntimeError) as err:  # RuntimeError: a federated run failed
        print(f"zk0 bench privacy: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    print(report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
