"""`zk0 bench learning`, one seed: every federated arm, local-only and centralized trained and scored on every set."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from ..model import load_policy, trainable_state
from ..node.session import NodeSession, stats_on_node
from ..settings import ServerSettings, resolve_device
from ..stats import from_json, merge_stats
from . import learning_report as rep
from .learning_arms import arm_settings, federated_steps, personal_dirs, reproduction_gap, run_with_retries
from .learning_models import eval_sets, evaluate_model, node_sessions, train_centralized, train_local_only
from .learning_report import LOCAL_OWN, NODES, PERSONAL, mean_row, own_heldout_row


def _timed(timings: dict, key: str, fn, *args):
    """fn(*args), with its wall time recorded under key."""
    started = time.perf_counter()
    result = fn(*args)
    timings[key] = time.perf_counter() - started
    return result


def run_arms(s: ServerSettings, demo: dict, out: Path, arms: list[str], options: dict, timings: dict):
    """Every federated arm's real run; (histories, optimizer steps per node, arms run again after a failure)."""
    histories, steps, retried = {}, {}, []
    for arm in arms:
        run = arm_settings(s, arm, out, options["personalize"])
        histories[arm], failed = _timed(timings, arm, run_with_retries, arm, run, demo, options["run_timeout"],
                                        options["retries"])
        retried += [arm] * failed
        steps[arm] = federated_steps(histories[arm])
    return histories, steps, retried


def train_references(sessions: list[NodeSession], s: ServerSettings, score, timings: dict, steps: dict):
    """Local-only and centralized models trained and scored; (their rows, training frames and centralized batches
    per node)."""
    own, frames = zip(*(stats_on_node(x) for x in sessions), strict=True)  # what each node sends the server
    merged = merge_stats([from_json(text) for text in own])
    base, rows = sessions[0].base, {}
    steps["local-only"] = _timed(timings, "local-only", train_local_only, sessions, list(own), s)
    for name, x, stats in zip(NODES, sessions, own, strict=True):
        rows[f"local-{name}"] = score(x.policy, base, from_json(stats))
    rows["local-mean"] = mean_row([rows[f"local-{n}"] for n in NODES])
    rows[LOCAL_OWN] = own_heldout_row({n: rows[f"local-{n}"][n] for n in NODES})
    policy, steps["centralized"], drawn = _timed(timings, "centralized", train_centralized, sessions, merged,
                                                 list(frames), s)
    rows["centralized"] = score(policy, base, merged)
    return rows, frames, drawn


def history_figures(histories: dict, rows: dict) -> dict:
    """Per arm: the server's evaluation every round, mu every round and our re-evaluation's gap to the run's own."""
    return {
        "server_eval_history": {
            arm: [{"round": r["round"], **r["server_eval"]} for r in h if r["server_eval"]]
            for arm, h in histories.items()
        },
        "proximal_mu_per_round": {a: [r.get("proximal_mu") for r in h if r["round"] > 0] for a, h in histories.items()},
        "reproduction_gap": {a: reproduction_gap(h, rows[a]) for a, h in histories.items()},
    }


def run_seed(
    s: ServerSettings, demo: dict, out: Path, run_timeout: float, arms: list[str], personalize: int, retries: int = 1,
    sim: dict | None = None,
) -> dict:
    """Train and evaluate every arm with one seed; the figures for the tables, the JSON and the plot.

    sim ({"labs", "episodes"}): every model is also scored in the simulator on every lab's task (learning_sim)."""
    timings, started, rows, choices = {}, time.perf_counter(), {}, {}
    options = {"personalize": personalize, "run_timeout": run_timeout, "retries": retries}
    histories, steps, retried = run_arms(s, demo, out, arms, options, timings)
    device, base = resolve_device(s.device), str(demo["base-policy"])
    base_policy = load_policy(base, device)
    sessions = node_sessions(demo, s, trainable_state(base_policy))
    sets = eval_sets(demo, sessions, base_policy.config, s)
    score = partial(evaluate_model, sets=sets, cameras=demo["cameras"], seed=s.seed)
    if sim:
        from .learning_sim import with_sim

        score = with_sim(score, sim["labs"], sim["episodes"], s.seed)
    for arm in arms:  # the checkpoint's processors hold the statistics the federation merged
        ckpt = str(out / arm / "checkpoints" / f"round-{s.num_rounds:03d}")
        rows[arm] = score(load_policy(ckpt, device), ckpt, None)
    if personalize and rep.REFERENCE in arms:
        rows[PERSONAL] = rep.personal_row(histories[rep.REFERENCE])
        choices = rep.personal_choices(histories[rep.REFERENCE])
    references, frames, drawn = train_references(sessions, s, score, timings, steps)
    rows.update(references)
    sim_part = _sim_part(rows, histories, out, arms, personalize, sim, s.seed, device) if sim else None
    timings["total"] = time.perf_counter() - started
    return {
        **({"sim": sim_part} if sim_part else {}),
        "seed": s.seed,
        "heldout_episodes": {n: x.heldout_episodes for n, x in zip(NODES, sessions, strict=True)},
        "training_frames": dict(zip(NODES, frames, strict=True)),
        "centralized_batches_per_node": dict(zip(NODES, drawn, strict=True)),
        "optimizer_steps_per_model": steps,
        "results": rows,
        "personal_choices": choices,  # per node: steps kept (0 = the global model), always fine-tuned figures
        **history_figures(histories, rows),
        "timings_s": timings,
        "retried": retried,  # federated runs that failed (e.g. under load) and ran again
    }


def _sim_part(rows: dict, histories: dict, out: Path, arms: list[str], personalize: int, sim: dict, seed: int,
              device: str) -> dict:
    """This seed's success table (personal models on their own lab's task) and the losses' rank agreement."""
    from .learning_sim import loss_vs_success, personal_sim, seed_table

    personal = None
    if personalize and rep.REFERENCE in arms:
        personal = personal_sim(personal_dirs(out / rep.REFERENCE), sim["labs"], sim["episodes"], seed, device)
    table = seed_table(rows, personal, sim["labs"])
    seconds = sum(r["sim"][lab.name]["seconds"] for r in rows.values() if "sim" in r for lab in sim["labs"])
    seconds += sum(p["seconds"] for p in (personal or {}).values())
    return {"table": table, "agreement": loss_vs_success(rows, table), "seconds": seconds}
