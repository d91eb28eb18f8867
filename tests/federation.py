"""Helpers for tests that run a real local federation through the `zk0` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ZK0 = [sys.executable, "-m", "zk0.cli"]


def write_env(path: Path, demo: dict, out: Path, nodes: int = 4, **extra) -> Path:
    values = {
        "ZK0_BASE_POLICY": demo["base-policy"],
        "ZK0_EVAL_DATASET": demo["datasets"]["server-eval"],
        "ZK0_EVAL_CAMERAS": demo["cameras"]["server-eval"],
        **{f"ZK0_NODE_{i}_DATASET": demo["datasets"][f"node-{i}"] for i in range(nodes)},
        **{f"ZK0_NODE_{i}_CAMERAS": demo["cameras"][f"node-{i}"] for i in range(nodes)},
        "ZK0_NUM_ROUNDS": 3,
        "ZK0_LOCAL_STEPS": 15,
        "ZK0_BATCH_SIZE": 8,
        "ZK0_LEARNING_RATE": 1e-3,
        "ZK0_PROXIMAL_MU": 0.01,
        "ZK0_MIN_NODES": 4,
        "ZK0_EVAL_BATCHES": 3,
        "ZK0_OUTPUT_DIR": out,
        "ZK0_DEVICE": "cpu",
        "WANDB_MODE": "offline",
        "WANDB_RUN_ID": "zk0-e2e-test",
        **extra,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def run_zk0(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # The env-file decides WandB's mode here, so the shell's WANDB_MODE must not outrank it.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    return subprocess.run([*ZK0, *args], capture_output=True, text=True, timeout=timeout, env=env)


def marked_processes(variable: str, value: str) -> dict[int, list[str]]:
    """Live processes whose environment carries variable=value: {pid: argv}.

    A test sets a variable of its own before it starts a command; every process below that command
    inherits it (as zk0's guard mark, zk0.deploy.procs), however deep and whoever adopted it, so the test
    finds its own run's processes and never another run's beside it.
    """
    needle = f"{variable}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            # A zombie's environment reads empty: only live processes are found.
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
        except OSError:
            continue
    return found
