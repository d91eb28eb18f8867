"""`zk0 bench learning`'s federated arms: the demo they run on, their settings and one real `zk0 local` run each."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..cameras import full_key
from ..deploy.flwr_cli import QUIET
from ..deploy.procs import die_with_parent
from ..settings import ServerSettings
from ..train import TrainPlan
from .learning_report import METRICS, NODES, REFERENCE, SERVER

log = logging.getLogger("zk0")
# Federated arms and how each differs from the experiment's settings. LoRA trains ~20x fewer weights
# from B = 0 and, as usual for LoRA, at LORA_LR_SCALE times the full expert's learning rate. FedAdam's
# server rate: its first step is about 0.74 x eta x m/(sqrt(v)+tau), i.e. ~0.74 x the mean update when
# that update is well below tau/(1-beta_1) = 0.01 per weight (Flower's default eta 0.1 would be ~7x it).
LORA_LR_SCALE = 10.0
ARMS = {
    "fedprox": {},
    "fedavg": {"proximal_mu": 0.0},
    "fedadam": {"strategy": "fedadam", "server_learning_rate": 0.01},
    "fedavgm": {"strategy": "fedavgm", "server_momentum": 0.5},
    "fedprox-adaptive": {"adaptive_mu": "loss"},
    "fedprox-lora": {"trainable": "lora", "lora_aggregation": "fedit"},
    "fedprox-lora-ffa": {"trainable": "lora", "lora_aggregation": "ffa"},
}
# What fits the 30-minute budget with 3 seeds on a 2-core host; --arms runs others (--arms all: every one).
DEFAULT_ARMS = ("fedprox", "fedavg", "fedadam", "fedprox-adaptive")


def arm_settings(s: ServerSettings, arm: str, out: Path, personalize_steps: int = 0) -> ServerSettings:
    """The experiment's settings as `arm` runs them; the FedProx arm also personalises in its last round."""
    update = {**ARMS[arm], "output_dir": out / arm}
    if update.get("trainable") == "lora":
        update["learning_rate"] = s.learning_rate * LORA_LR_SCALE
    if arm == REFERENCE:
        update["personalize_steps"] = personalize_steps
    return s.model_copy(update=update)


def personal_dirs(out: Path) -> dict[str, Path]:
    """Where each node of a run keeps its personal model: beside the server's output folder, never in it."""
    return {name: out.with_name(f"{out.name}.nodes") / name for name in NODES}


def _has_cameras(root: Path, cameras) -> bool:
    """Whether root holds a dataset with these cameras (a demo written by an older zk0 names them otherwise)."""
    info = root / "meta" / "info.json"
    return info.is_file() and all(full_key(c) in json.loads(info.read_text())["features"] for c in cameras)


def demo_assets(demo_dir: Path) -> dict:
    """Paths and camera maps of the offline demo in demo_dir, written there first when missing or outdated."""
    from ..demo import DEMO_SETS, write_demo

    demo_dir = Path(demo_dir).resolve()
    datasets = {name: demo_dir / "datasets" / name for name in [*NODES, SERVER]}
    base = demo_dir / "base-policy"
    if (base / "config.json").is_file() and all(_has_cameras(p, DEMO_SETS[n].cameras) for n, p in datasets.items()):
        cameras = {name: DEMO_SETS[name].camera_map for name in datasets}
        return {"root": demo_dir, "base-policy": base, "datasets": datasets, "cameras": cameras}
    log.info("no complete, current demo in %s: writing it", demo_dir)
    return write_demo(demo_dir)


def plans(s: ServerSettings, mu: float = 0.0):
    """(round, TrainPlan, batch seed) for every round, exactly as the ClientApp builds them."""
    total = s.num_rounds * s.local_steps
    for r in range(1, s.num_rounds + 1):
        plan = TrainPlan(s.local_steps, (r - 1) * s.local_steps, total, s.learning_rate, mu, log_every=s.local_steps)
        yield r, plan, s.seed + 1000 * r


def _wait_or_stop(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None after stopping a run that took longer than timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT lets `zk0 local` stop its SuperLink and SuperNodes; a kill would orphan them.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        return None


def run_env(s: ServerSettings, demo: dict, out: Path, nodes: int = len(NODES)) -> dict[str, str]:
    """The env-file values of one run: the arm's settings, then each node's dataset, cameras and personal folder
    (the demo's first `nodes` nodes)."""
    values = {f"ZK0_{k.upper()}": v for k, v in s.model_dump(exclude_none=True).items()}
    values.update({f"ZK0_NODE_{i}_DATASET": demo["datasets"][name] for i, name in enumerate(NODES[:nodes])})
    values.update({f"ZK0_NODE_{i}_CAMERAS": demo["cameras"][name] for i, name in enumerate(NODES[:nodes])})
    personal = list(personal_dirs(out).values())[:nodes]
    values.update({f"ZK0_NODE_{i}_PERSONAL_DIR": path for i, path in enumerate(personal)})
    return values


def run_federated(arm: str, s: ServerSettings, demo: dict, timeout: float, nodes: int = len(NODES)) -> list[dict]:
    """One real `zk0 local` run (SuperLink, the demo's first `nodes` SuperNodes, ServerApp); return its history."""
    out = Path(s.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # stale rounds or checkpoints would pass for this run's
    out.mkdir(parents=True)
    shutil.rmtree(out.with_name(f"{out.name}.nodes"), ignore_errors=True)
    env_file = out / "bench.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in run_env(s, demo, out, nodes).items()))
    # The shell outranks an env-file in `zk0 local`: drop ZK0_ variables so FedAvg really gets mu = 0.
    env = {"HF_HUB_OFFLINE": "1", **QUIET}
    env.update({k: v for k, v in os.environ.items() if not k.startswith("ZK0_")})
    log_path = out / "zk0-local.log"
    log.info("%s (mu=%g): zk0 local, log in %s", arm, s.proximal_mu, log_path)
    with open(log_path, "wb") as logfile:
        cmd = [sys.executable, "-m", "zk0.cli", "local", "--env-file", str(env_file)]
        # A benchmark that dies (SIGTERM, kill -9) stops its run: `zk0 local` ends everything it started on SIGTERM.
        proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent(signal.SIGTERM))
        rc = _wait_or_stop(proc, timeout)
    if rc != 0:
        outcome = f"exited with {rc}" if rc is not None else f"was stopped after {timeout:.0f}s"
        raise RuntimeError(f"{arm}: `zk0 local` {outcome}; see {log_path}")
    return json.loads((out / "history.json").read_text())


def run_with_retries(arm: str, s: ServerSettings, demo: dict, timeout: float, retries: int,
                     nodes: int = len(NODES)) -> tuple[list[dict], int]:
    """run_federated, run again up to `retries` times when it fails; (its history, the failed attempts)."""
    for attempt in range(1 + retries):
        try:
            return run_federated(arm, s, demo, timeout, nodes), attempt
        except RuntimeError as err:
            if attempt == retries:
                raise
            # On a loaded host Flower's ClientApps can miss their 30 s start window and the run fails.
            log.warning("%s: %s; running it again", arm, err)
    raise AssertionError("unreachable")  # the loop returns or raises


def federated_steps(history: list[dict]) -> list[int]:
    """Optimizer steps each node took over the whole federated run."""
    clients = [c for r in history for c in r["clients"].values() if "train" in c]
    return [int(sum(c["train"]["steps"] for c in clients if c["name"] == n)) for n in NODES]


def reproduction_gap(history: list[dict], row: dict) -> float:
    """Largest relative gap between our evaluation of the final global model and the federation's own."""
    last = history[-1]
    pairs = [(last["server_eval"], row[SERVER])]
    pairs += [(c["eval"], row[c["name"]]) for c in last["clients"].values() if "eval" in c]
    return max(abs(a[m] - b[m]) / max(abs(a[m]), 1e-12) for a, b in pairs for m in METRICS)
