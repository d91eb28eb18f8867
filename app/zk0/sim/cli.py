"""`zk0 demo --sim` and `zk0 eval --sim`: the simulated labs' datasets, and a checkpoint scored in the simulator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..settings_base import SettingsError


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="score a checkpoint in the SO-101 simulator: success rate per lab's task",
        description="Run a LeRobot-format SmolVLA checkpoint (a zk0 checkpoint, a personal model, or any policy with "
        "the demo's layout) closed-loop on each simulated lab's task, through its processors and the lab's camera "
        "map, on scenes no dataset recorded. Prints success rates with 95%% Wilson intervals and mean steps to "
        "success. Needs the simulator: pip install 'zk0[sim]'.",
    )
    ev.add_argument("--sim", default="", metavar="LABS",
                    help="labs, comma-separated (lift-top, lift-front, place-laptop, lift-up); default all")
    ev.add_argument("--checkpoint", type=Path, required=True, help="e.g. outputs/sim/checkpoints/round-003")
    ev.add_argument("--episodes", type=int, default=10, help="episodes per lab (default 10)")
    ev.add_argument("--seed", type=int, default=0, help="evaluation seed: which unseen scenes (default 0)")
    ev.add_argument("--videos", type=int, default=0, help="episodes per lab saved as MP4 (default 0)")
    ev.add_argument("--video-dir", type=Path, default=Path("outputs/sim-videos"), help="where the MP4s go")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ev.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..labs import parse_labs
    from . import require

    problems = []
    try:
        labs = parse_labs(args.sim, setting="--sim")
    except ValueError as err:
        problems.append(str(err))
    if not (args.checkpoint / "config.json").is_file():
        problems.append(f"--checkpoint {args.checkpoint}: not a LeRobot policy folder (no config.json)")
    if args.episodes < 1:
        problems.append(f"--episodes {args.episodes}: at least 1")
    if problems:
        raise SettingsError("; ".join(problems))
    require()
    from ..model import load_policy
    from ..settings_base import resolve_device
    from .evaluate import evaluate_labs

    policy = load_policy(str(args.checkpoint), resolve_device(args.device))
    result = evaluate_labs(policy, str(args.checkpoint), None, labs, args.episodes, args.seed,
                           args.video_dir if args.videos else None, args.videos)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def report(result: dict) -> str:
    """One line per lab: successes, rate, interval, mean steps to success."""
    lines = [f"{'lab':<14} {'success':>9} {'rate':>6} {'95% CI':>11} {'steps to success':>17}"]
    for lab, r in result.items():
        steps = r.get("mean_steps_to_success")
        lines.append(f"{lab:<14} {r['successes']:>4}/{r['episodes']:<4} {r['success_rate']:>6.2f} "
                     f"{r['ci_low']:>5.2f}-{r['ci_high']:<5.2f} {steps if steps is not None else '-':>17}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """`zk0 demo --sim`: record (or reuse) every lab's dataset and build the base policy."""
    from .demo import write_sim_demo

    out = args.out / "sim"
    paths = write_sim_demo(out, episodes=args.episodes, seed=args.seed)
    for name, path in paths["datasets"].items():
        print(f"{name}: {path} (cameras {paths['cameras'][name]})")
    print(f"base-policy: {paths['base-policy']}\nrun it: zk0 local --env-file experiments/sim.env", file=sys.stderr)
    return 0
