"""`zk0 bench cli`: how fast the command answers: `--help`, and a refusal of an env-file with five mistakes.

Each command runs in a fresh interpreter, as a user's shell starts it; the median of the repeats is
the figure. The refusal's content is checked too: one refusal, naming all five mistakes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..deploy.flwr_cli import QUIET
from .report import BenchError, target

# One mistake of each kind, each in its own variable (the refusal must name all five).
MISTAKES = {
    "ZK0_PROXIMAL_MUU": "0.1",  # misspelt
    "ZK0_NUM_ROUNDS": "three",
    "ZK0_NODE_2_DATASET": "/nonexistent/so100",
    "ZK0_NODE_1_CAMERAS": "laptop:camera1",
    "ZK0_NODE_3_HELDOUT_EPISODES": "60",
}


def bad_env(path: Path, demo_dir: Path) -> Path:
    """The demo's smoke env-file with the five mistakes."""
    from .demo import smoke_env

    smoke_env(path, demo_dir)
    lines = [line for line in path.read_text().splitlines() if line.split("=", 1)[0] not in MISTAKES]
    path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in MISTAKES.items())]) + "\n")
    return path


def timed(argv: list[str], repeats: int) -> tuple[list[float], subprocess.CompletedProcess]:
    """Wall seconds of `zk0 ARGV` in fresh processes, and the last one's result."""
    times, done = [], None
    env = {"HF_HUB_OFFLINE": "1", **QUIET, "PATH": "/usr/bin:/bin"}
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "zk0.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        times.append(time.perf_counter() - started)
    return times, done


def bench_cli(args: argparse.Namespace) -> dict:
    """Seconds until `zk0 --help`, `zk0 local --help` and a refusal of five mistakes answer."""
    repeats = 1 if args.smoke else args.repeats
    env_file = bad_env(Path(args.out).resolve() / "five-mistakes.env", args.demo_dir)
    commands = {
        "zk0 --help": ["--help"],
        "zk0 local --help": ["local", "--help"],
        "zk0 check, env-file with five mistakes": ["check", "--env-file", str(env_file)],
        "zk0 local, env-file with five mistakes": ["local", "--env-file", str(env_file)],
    }
    runs = {}
    for name, argv in commands.items():
        times, done = timed(argv, repeats)
        if "mistakes" in name:
            missing = [k for k in MISTAKES if k not in done.stderr]
            if done.returncode == 0 or missing or "5 problem(s)" not in done.stderr:
                raise BenchError(f"{name}: expected one refusal naming all five mistakes, got exit {done.returncode}, "
                                 f"missing {missing}:\n{done.stderr[-2000:]}")
        elif done.returncode != 0:
            raise BenchError(f"{name} exited with {done.returncode}: {done.stderr[-2000:]}")
        runs[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}
    refusal = max(runs[n]["median_s"] for n in commands if "mistakes" in n)
    return {
        "benchmark": "cli",
        "settings": {"smoke": args.smoke, "repeats": repeats, "env_file": str(env_file)},
        "runs": runs,
        "tables": [{"title": f"wall seconds in a fresh interpreter ({repeats} run(s) each)",
                    "headers": ["command", "median s", "min s", "max s"],
                    "rows": [[n, r["median_s"], r["min_s"], r["max_s"]] for n, r in runs.items()]}],
        "targets": [
            target("zk0 --help (s)", runs["zk0 --help"]["median_s"], 1.0, True, " s"),
            target("refusal naming five mistakes (s)", refusal, 3.0, True, " s"),
        ],
    }
