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
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cameras import full_key, parse_camera_map
from .data import DatasetError, batch_stream, eval_batches, open_dataset
from .evaluate import evaluate_policy
from .logs import setup_logging
from .model import load_policy, load_processors, trainable_state
from .node import NodeSession, open_session, stats_on_node, train_on_node
from .records import atomic_write_json
from .settings import NodeSettings, ServerSettings, SettingsError, resolve_device
from .stats import from_json, merge_stats
from .train import TrainPlan, train_round

log = logging.getLogger("zk0")
NODES = [f"node-{i}" for i in range(4)]
UNION, SERVER = "union-heldout", "server-eval"
COLUMNS = [*NODES, UNION, SERVER]
METRICS = ("policy_loss", "action_mse")
# Federated arms and how each differs from the experiment's settings. LoRA trains ~20x fewer weights
# from B = 0 and, as usual for LoRA, at LORA_LR_SCALE times the full expert's learning rate.
LORA_LR_SCALE = 10.0
ARMS = {
    "fedprox": {},
    "fedavg": {"proximal_mu": 0.0},
    "fedprox-lora": {"trainable": "lora", "lora_aggregation": "fedit"},
    "fedprox-lora-ffa": {"trainable": "lora", "lora_aggregation": "ffa"},
}
FEDERATED = tuple(ARMS)
EXPERT_ARMS = ("fedprox", "fedavg")


def arm_settings(s: ServerSettings, arm: str, out: Path) -> ServerSettings:
    """The experiment's settings as `arm` runs them."""
    update = {**ARMS[arm], "output_dir": out / arm}
    if update.get("trainable") == "lora":
        update["learning_rate"] = s.learning_rate * LORA_LR_SCALE
    return s.model_copy(update=update)
DEFINITION = (
    "Same optimizer steps per model: every trained model copy takes rounds x local_steps AdamW steps of "
    "batch_size samples, in the federation's round structure (one warm-up+cosine LR schedule over all "
    "rounds, optimizer state restarted each round, batch seed = seed + 1000 x round). Each federated node "
    "does this per round before averaging; local-only is the same without averaging (mu = 0); centralized "
    "is one model on the union of the four nodes' training episodes (each batch from one node, drawn in "
    "proportion to its training frames), so it sees a quarter of the samples the four federated nodes see "
    "together. Normalisation: federated and centralized use the statistics merged from the nodes' training "
    "episodes, each local-only model its own node's, so policy_loss (in each model's normalised units) "
    "compares local-only with the rest less directly than action_mse (in the dataset's units). Every set is "
    "evaluated through its own camera map. The LoRA arms (ZK0_TRAINABLE=lora, LeRobot's SmolVLA targets, rank 8, "
    "alpha 8) train only adapters, at 10x the learning rate; fedprox-lora averages A and B (FedIT), "
    "fedprox-lora-ffa keeps A frozen and shared and averages B (FFA-LoRA)."
)


def _has_cameras(root: Path, cameras) -> bool:
    """Whether root holds a dataset with these cameras (a demo written by an older zk0 names them otherwise)."""
    info = root / "meta" / "info.json"
    return info.is_file() and all(full_key(c) in json.loads(info.read_text())["features"] for c in cameras)


def demo_assets(demo_dir: Path) -> dict:
    """Paths and camera maps of the offline demo in demo_dir, written there first when missing or outdated."""
    from .demo import DEMO_SETS, write_demo

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


def mean_row(rows: list[dict]) -> dict:
    """Plain mean of several models' metrics on each evaluation set."""
    return {
        col: {**{m: sum(r[col][m] for r in rows) / len(rows) for m in METRICS}, "num-samples": rows[0][col]["num-samples"]}
        for col in COLUMNS
    }


def reproduction_gap(history: list[dict], row: dict) -> float:
    """Largest relative gap between our evaluation of the final global model and the federation's own."""
    last = history[-1]
    pairs = [(last["server_eval"], row[SERVER])]
    pairs += [(c["eval"], row[c["name"]]) for c in last["clients"].values() if "eval" in c]
    return max(abs(a[m] - b[m]) / max(abs(a[m]), 1e-12) for a, b in pairs for m in METRICS)


def _target(name: str, metric: str, margin: float, detail: str) -> dict:
    return {"target": name, "metric": metric, "passed": margin > 0, "margin": margin, "detail": detail}


def targets(rows: dict, histories: dict, metric: str) -> list[dict]:
    """The issue's targets; margin is relative and positive when the target is met."""
    out = []
    for arm in histories:
        curve = [r["server_eval"][metric] for r in histories[arm] if r["server_eval"]]
        worst = max(curve[1:])
        detail = f"{arm}: round 0 {curve[0]:.5g}, worst later round {worst:.5g}, final {curve[-1]:.5g}"
        out.append(_target("(a) server eval below round 0 from round 1 on", metric, (curve[0] - worst) / curve[0], detail))
    best = min(EXPERT_ARMS, key=lambda a: rows[a][UNION][metric])
    fed, local, central = (rows[a][UNION][metric] for a in (best, "local-mean", "centralized"))
    out.append(_target("(b) federated beats mean local-only on union held-out", metric, (local - fed) / local,
                       f"{best} {fed:.5g} vs local-only mean {local:.5g}"))
    out.append(_target("(c) federated within 10% of centralized on union held-out", metric, 0.10 - (fed / central - 1),
                       f"{best} {fed:.5g} vs centralized {central:.5g} ({100 * (fed / central - 1):+.1f}%)"))
    full = rows["fedprox"][UNION][metric]
    for arm in (a for a in histories if ARMS[a].get("trainable") == "lora"):
        lora = rows[arm][UNION][metric]
        out.append(_target(f"(d) {arm} within 5% of full-expert fedprox on union held-out", metric, 0.05 - (lora / full - 1),
                           f"{arm} {lora:.5g} vs fedprox {full:.5g} ({100 * (lora / full - 1):+.1f}%)"))
    return out


def plot(curves: dict, rows: dict, path: Path) -> None:
    """Global model's server evaluation per round against centralized and mean local-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for arm in curves:
            rounds, values = [r["round"] for r in curves[arm]], [r[metric] for r in curves[arm]]
            ax.plot(rounds, values, marker="o", label=f"{arm} (global model)")
        ax.axhline(rows["centralized"][SERVER][metric], color="k", ls="--", label="centralized (final)")
        ax.axhline(rows["local-mean"][SERVER][metric], color="tab:red", ls=":", label="local-only mean (final)")
        ax.set(xlabel="round", ylabel=metric, title=f"server evaluation: {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict) -> str:
    """The tables and the targets as plain text."""
    rows, lines = result["results"], [DEFINITION, ""]
    width = max(len(a) for a in rows) + 2
    for metric in METRICS:
        lines.append(f"{metric:<{width}}" + "".join(f"{c:>15}" for c in COLUMNS))
        lines += [f"{arm:<{width}}" + "".join(f"{row[c][metric]:>15.5g}" for c in COLUMNS) for arm, row in rows.items()]
        lines.append("")
    lines.append("targets (verdict on policy_loss; action_mse for reference):")
    for t in result["targets"]:
        verdict = "PASS" if t["passed"] else "MISS"
        lines.append(f"  {verdict} {t['target']} [{t['metric']}] margin {100 * t['margin']:+.1f}%: {t['detail']}")
    gaps = ", ".join(f"{a} {g:.1e}" for a, g in result["reproduction_gap"].items())
    lines.append(f"re-evaluation vs the federation's own final evals (max relative gap): {gaps}")
    lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
    return "\n".join(lines)


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


def run_bench(s: ServerSettings, demo: dict, out: Path, run_timeout: float) -> dict:
    """Train and evaluate every arm; the figures for the table, the JSON and the plot."""
    timings, histories, rows, steps, started = {}, {}, {}, {}, time.perf_counter()
    for arm in FEDERATED:
        histories[arm] = _timed(timings, arm, run_federated, arm, arm_settings(s, arm, out), demo, run_timeout)
        steps[arm] = federated_steps(histories[arm])
    device, base = resolve_device(s.device), str(demo["base-policy"])
    base_policy = load_policy(base, device)
    sessions = node_sessions(demo, s, trainable_state(base_policy))
    score = partial(evaluate_model, sets=eval_sets(demo, sessions, base_policy.config, s), cameras=demo["cameras"], seed=s.seed)
    for arm in FEDERATED:  # the checkpoint's processors hold the statistics the federation merged
        ckpt = str(out / arm / "checkpoints" / f"round-{s.num_rounds:03d}")
        rows[arm] = score(load_policy(ckpt, device), ckpt, None)
    own, frames = zip(*(stats_on_node(x) for x in sessions), strict=True)  # what each node sends the server
    merged = merge_stats([from_json(text) for text in own])
    steps["local-only"] = _timed(timings, "local-only", train_local_only, sessions, list(own), s)
    for name, x, stats in zip(NODES, sessions, own, strict=True):
        rows[f"local-{name}"] = score(x.policy, base, from_json(stats))
    rows["local-mean"] = mean_row([rows[f"local-{n}"] for n in NODES])
    policy, steps["centralized"], drawn = _timed(timings, "centralized", train_centralized, sessions, merged, list(frames), s)
    rows["centralized"] = score(policy, base, merged)
    timings["total"] = time.perf_counter() - started
    return {
        "definition": DEFINITION,
        "settings": s.model_dump(mode="json", exclude={"output_dir"}),
        "heldout_episodes": {n: x.heldout_episodes for n, x in zip(NODES, sessions, strict=True)},
        "training_frames": dict(zip(NODES, frames, strict=True)),
        "centralized_batches_per_node": dict(zip(NODES, drawn, strict=True)),
        "optimizer_steps_per_model": steps,
        "results": rows,
        "server_eval_history": {
            arm: [{"round": r["round"], **r["server_eval"]} for r in h if r["server_eval"]] for arm, h in histories.items()
        },
        "targets": [t for m in METRICS for t in targets(rows, histories, m)],
        "reproduction_gap": {a: reproduction_gap(histories[a], rows[a]) for a in FEDERATED},
        "arms": {a: {**ARMS[a], "learning_rate": arm_settings(s, a, out).learning_rate} for a in FEDERATED},
        "timings_s": timings,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; --smoke shrinks the defaults for the test suite."""
    p = argparse.ArgumentParser(prog="zk0 bench learning", description="Federated vs local-only vs centralized (demo).")
    p.add_argument("--rounds", type=int, help="federated rounds (default 3; smoke 2)")
    p.add_argument("--local-steps", type=int, help="optimizer steps per round (default 30, the demo's; smoke 2)")
    p.add_argument("--batch-size", type=int, help="batch size for training and evaluation (default 8)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (default: the demo's 1e-3)")
    p.add_argument("--demo-dir", type=Path, default=Path("demo-data"), help="offline demo; written when missing")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-learning"), help="runs, checkpoints and the plot")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before a federated run is stopped")
    p.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps and one evaluation batch (tests)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and targets, write the plot and optional JSON."""
    args = parse_args(argv)
    setup_logging()
    rounds = args.rounds or (2 if args.smoke else 3)
    try:
        demo = demo_assets(args.demo_dir)
        s = ServerSettings.load(
            num_rounds=rounds, local_steps=args.local_steps or (2 if args.smoke else 30),
            batch_size=args.batch_size, learning_rate=args.learning_rate, eval_batches=1 if args.smoke else None,
            min_nodes=len(NODES), eval_every=1, checkpoint_every=rounds,  # only the final global model is needed
            base_policy=str(demo["base-policy"]), eval_dataset=str(demo["datasets"][SERVER]),
            eval_cameras=demo["cameras"][SERVER],
        )
        out = Path(args.out).resolve()
        with contextlib.redirect_stdout(sys.stderr):  # LeRobot prints while loading; stdout is for the table
            result = run_bench(s, demo, out, args.run_timeout)
    except (SettingsError, DatasetError, RuntimeError) as err:  # RuntimeError: a federated run failed
        print(f"zk0 bench learning: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    result["plot"] = str(out / "server-eval.png")
    plot(result["server_eval_history"], result["results"], out / "server-eval.png")
    print(report(result))
    print(f"plot: {result['plot']}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
