"""`zk0 bench learning`: does federation help? FedProx, FedAvg, local-only and centralized on the demo.

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
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..cameras import full_key, parse_camera_map
from ..data import DatasetError, batch_stream, eval_batches, open_dataset
from ..evaluate import evaluate_policy
from ..logs import setup_logging
from ..model import load_policy, load_processors, trainable_state
from ..node.session import NodeSession, open_session, stats_on_node, train_on_node
from ..server.records import atomic_write_json
from ..settings import NodeSettings, ServerSettings, SettingsError, resolve_device
from ..stats import from_json, merge_stats
from ..train import TrainPlan, train_round
from . import learning_report as rep
from .learning_report import (
    COLUMNS,
    LOCAL_OWN,
    METRICS,
    NODES,
    PERSONAL,
    SERVER,
    UNION,
    mean_row,
    own_heldout_row,
)

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
    if arm == rep.REFERENCE:
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


def run_federated(arm: str, s: ServerSettings, demo: dict, timeout: float) -> list[dict]:
    """One real `zk0 local` run (SuperLink, four SuperNodes, ServerApp); return its history."""
    out = Path(s.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # stale rounds or checkpoints would pass for this run's
    out.mkdir(parents=True)
    values = {f"ZK0_{k.upper()}": v for k, v in s.model_dump(exclude_none=True).items()}
    values.update({f"ZK0_NODE_{i}_DATASET": demo["datasets"][name] for i, name in enumerate(NODES)})
    values.update({f"ZK0_NODE_{i}_CAMERAS": demo["cameras"][name] for i, name in enumerate(NODES)})
    values.update({f"ZK0_NODE_{i}_PERSONAL_DIR": path for i, path in enumerate(personal_dirs(out).values())})
    shutil.rmtree(out.with_name(f"{out.name}.nodes"), ignore_errors=True)
    env_file = out / "bench.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    # The shell outranks an env-file in `zk0 local`: drop ZK0_ variables so FedAvg really gets mu = 0.
    env = {"HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    env.update({k: v for k, v in os.environ.items() if not k.startswith("ZK0_")})
    log_path = out / "zk0-local.log"
    log.info("%s (mu=%g): zk0 local, log in %s", arm, s.proximal_mu, log_path)
    with open(log_path, "wb") as logfile:
        cmd = [sys.executable, "-m", "zk0.cli", "local", "--env-file", str(env_file)]
        rc = _wait_or_stop(subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT), timeout)
    if rc != 0:
        outcome = f"exited with {rc}" if rc is not None else f"was stopped after {timeout:.0f}s"
        raise RuntimeError(f"{arm}: `zk0 local` {outcome}; see {log_path}")
    return json.loads((out / "history.json").read_text())


def node_sessions(demo: dict, s: ServerSettings, base_state: dict) -> list[NodeSession]:
    """Each node's session with the base weights and the very split its SuperNode makes."""
    # The thread count `zk0 local` gives each of four nodes on this host: more threads than free
    # cores make OpenMP spin, and a busy shared host then trains tens of times slower.
    threads = max(1, (os.cpu_count() or 1) // len(NODES))
    nodes = [
        NodeSettings(dataset=str(demo["datasets"][n]), cameras=demo["cameras"][n], name=n, torch_threads=threads)
        for n in NODES
    ]
    return [open_session(node, str(demo["base-policy"]), base_state, s.seed) for node in nodes]


def eval_sets(demo: dict, sessions: list[NodeSession], config, s: ServerSettings) -> dict[str, list[dict]]:
    """Fixed batches of each node's held-out episodes and of the server set, built as the federation does."""
    sets = {
        name: eval_batches(x.dataset(x.heldout_episodes), s.batch_size, s.eval_batches)
        for name, x in zip(NODES, sessions, strict=True)
    }
    sets[SERVER] = eval_batches(open_dataset(str(demo["datasets"][SERVER]), config), s.batch_size, s.eval_batches)
    return sets


def evaluate_model(policy, path: str, stats: dict | None, *, sets: dict, cameras: dict, seed: int) -> dict:
    """The server's metrics on every set, plus the sample-weighted mean over the node held-out sets.

    Each set goes through the processors saved at `path` with that set's camera map and `stats`
    (None: the statistics saved there), as the model's own run would have normalised.
    """
    device, row = str(next(policy.parameters()).device), {}
    for name, batches in sets.items():
        pre, post = load_processors(path, device, parse_camera_map(cameras[name]), stats)
        row[name] = evaluate_policy(policy, pre, post, batches, seed)
    n = sum(row[name]["num-samples"] for name in NODES)
    row[UNION] = {m: sum(row[k][m] * row[k]["num-samples"] for k in NODES) / n for m in METRICS}
    row[UNION]["num-samples"] = n
    return {col: row[col] for col in COLUMNS}


def train_local_only(sessions: list[NodeSession], own_stats: list[str], s: ServerSettings) -> list[int]:
    """Train each node's model on its own episodes with the node's code and statistics, in place; steps per model."""
    steps = []
    for session, stats in zip(sessions, own_stats, strict=True):
        session.use_stats(stats)
        done = 0
        for _, plan, seed in plans(s):
            done += train_on_node(session, plan, s.batch_size, seed)[1]["steps"]
        steps.append(int(done))
        log.info("local-only %s: %d steps", session.settings.display_name, done)
    return steps


def mixed_batches(sources: list[tuple], frames: list[int], seed: int, drawn: list[int]):
    """Endless preprocessed batches from (raw stream, preprocessor) per node, the node drawn in proportion to its frames."""
    rng, p = np.random.default_rng(seed), np.asarray(frames) / sum(frames)
    while True:
        i = int(rng.choice(len(sources), p=p))
        drawn[i] += 1
        stream, pre = sources[i]
        yield pre(next(stream))


def _as_is(batch: dict) -> dict:
    return batch


def train_centralized(sessions: list[NodeSession], merged: dict, frames: list[int], s: ServerSettings):
    """One model on the union of the nodes' training episodes; (policy, steps, batches drawn per node)."""
    base, device = sessions[0].base, str(next(sessions[0].policy.parameters()).device)
    policy = load_policy(base, device)
    # The nodes' samples cannot share a batch (other camera names; node-2 has one camera), so each batch
    # is one node's, drawn with probability proportional to its training frames (what sampling the union
    # uniformly gives in expectation) and preprocessed with that node's camera map and the merged
    # statistics; train_round gets it preprocessed. Each node's stream is the one train_on_node shuffles.
    pres = [load_processors(base, device, parse_camera_map(x.settings.cameras), merged)[0] for x in sessions]
    done, drawn = 0, [0] * len(sessions)
    for _, plan, seed in plans(s):
        torch.manual_seed(seed)  # flow-matching noise seeded like the batches, as train_on_node does
        streams = [batch_stream(x.dataset(x.train_episodes), s.batch_size, seed) for x in sessions]
        sources = list(zip(streams, pres, strict=True))
        done += train_round(policy, _as_is, mixed_batches(sources, frames, seed, drawn), plan)["steps"]
    log.info("centralized: %d steps on %d frames, batches per node %s", done, sum(frames), drawn)
    return policy, int(done), drawn


def reproduction_gap(history: list[dict], row: dict) -> float:
    """Largest relative gap between our evaluation of the final global model and the federation's own."""
    last = history[-1]
    pairs = [(last["server_eval"], row[SERVER])]
    pairs += [(c["eval"], row[c["name"]]) for c in last["clients"].values() if "eval" in c]
    return max(abs(a[m] - b[m]) / max(abs(a[m]), 1e-12) for a, b in pairs for m in METRICS)


def _timed(timings: dict, key: str, fn, *args):
    """fn(*args), with its wall time recorded under key."""
    started = time.perf_counter()
    result = fn(*args)
    timings[key] = time.perf_counter() - started
    return result


def federated_steps(history: list[dict]) -> list[int]:
    """Optimizer steps each node took over the whole federated run."""
    clients = [c for r in history for c in r["clients"].values() if "train" in c]
    return [int(sum(c["train"]["steps"] for c in clients if c["name"] == n)) for n in NODES]


def run_seed(
    s: ServerSettings, demo: dict, out: Path, run_timeout: float, arms: list[str], personalize: int, retries: int = 1,
) -> dict:
    """Train and evaluate every arm with one seed; the figures for the tables, the JSON and the plot."""
    timings, histories, rows, steps, started = {}, {}, {}, {}, time.perf_counter()
    retried = []
    for arm in arms:
        run = arm_settings(s, arm, out, personalize)
        for attempt in range(1 + retries):
            try:
                histories[arm] = _timed(timings, arm, run_federated, arm, run, demo, run_timeout)
                break
            except RuntimeError as err:
                if attempt == retries:
                    raise
                # On a loaded host Flower's ClientApps can miss their 30 s start window and the run fails.
                log.warning("%s: %s; running it again", arm, err)
                retried.append(arm)
        steps[arm] = federated_steps(histories[arm])
    device, base = resolve_device(s.device), str(demo["base-policy"])
    base_policy = load_policy(base, device)
    sessions = node_sessions(demo, s, trainable_state(base_policy))
    score = partial(evaluate_model, sets=eval_sets(demo, sessions, base_policy.config, s), cameras=demo["cameras"], seed=s.seed)
    for arm in arms:  # the checkpoint's processors hold the statistics the federation merged
        ckpt = str(out / arm / "checkpoints" / f"round-{s.num_rounds:03d}")
        rows[arm] = score(load_policy(ckpt, device), ckpt, None)
    if personalize and rep.REFERENCE in arms:
        rows[PERSONAL] = rep.personal_row(histories[rep.REFERENCE])
    own, frames = zip(*(stats_on_node(x) for x in sessions), strict=True)  # what each node sends the server
    merged = merge_stats([from_json(text) for text in own])
    steps["local-only"] = _timed(timings, "local-only", train_local_only, sessions, list(own), s)
    for name, x, stats in zip(NODES, sessions, own, strict=True):
        rows[f"local-{name}"] = score(x.policy, base, from_json(stats))
    rows["local-mean"] = mean_row([rows[f"local-{n}"] for n in NODES])
    rows[LOCAL_OWN] = own_heldout_row({n: rows[f"local-{n}"][n] for n in NODES})
    policy, steps["centralized"], drawn = _timed(timings, "centralized", train_centralized, sessions, merged, list(frames), s)
    rows["centralized"] = score(policy, base, merged)
    timings["total"] = time.perf_counter() - started
    return {
        "seed": s.seed,
        "heldout_episodes": {n: x.heldout_episodes for n, x in zip(NODES, sessions, strict=True)},
        "training_frames": dict(zip(NODES, frames, strict=True)),
        "centralized_batches_per_node": dict(zip(NODES, drawn, strict=True)),
        "optimizer_steps_per_model": steps,
        "results": rows,
        "server_eval_history": {
            arm: [{"round": r["round"], **r["server_eval"]} for r in h if r["server_eval"]] for arm, h in histories.items()
        },
        "proximal_mu_per_round": {a: [r.get("proximal_mu") for r in h if r["round"] > 0] for a, h in histories.items()},
        "reproduction_gap": {a: reproduction_gap(histories[a], rows[a]) for a in arms},
        "timings_s": timings,
        "retried": retried,  # federated runs that failed (e.g. under load) and ran again
    }


def run_bench(s: ServerSettings, demo: dict, out: Path, args: argparse.Namespace, arms: list[str]) -> dict:
    """Every arm over every seed; the per-seed figures, their mean ± std, comparisons and targets."""
    load, started = [os.getloadavg()[0]], time.perf_counter()
    seeds = []
    for seed in range(s.seed, s.seed + args.seeds):
        log.info("seed %d (%d of %d)", seed, seed - s.seed + 1, args.seeds)
        seeds.append(run_seed(s.model_copy(update={"seed": seed}), demo, out / f"seed-{seed}", args.run_timeout, arms,
                              args.personalize_steps, args.retries))
        if args.json:  # every finished seed's figures survive a run stopped before the last
            atomic_write_json(args.json.with_name(f"{args.json.stem}.seeds.json"), seeds)
    load.append(os.getloadavg()[0])
    summary = rep.summarise(seeds)
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
        demo = demo_assets(args.demo_dir)
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
    print(f"plot: {result['plot']}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
