"""Personalised models, kept on the node: the final global model fine-tuned on the node's own episodes.

Method: local adaptation of the federated model (FedAvg + fine-tuning; Yu et al. 2020, "Salvaging federated
learning by local adaptation"; Cheng et al. 2021, "Fine-tuning is fine in federated learning"), regularised
toward the global model by Ditto's (lambda/2)*||v - w_global||^2 (Li et al. 2021), which is FedProx's
proximal term with lambda in place of mu. It fits SmolVLA because it needs nothing the federation does not
already run: the same trainable weights (the action expert or LoRA adapters), the node's own training step
and data, once, after the last round; the VLM stays frozen and shared, and the global model is untouched.
Ditto's alternative of training a personal model alongside every round would double each node's training
and keep a second full expert per node for the whole run.

It runs in the last round's evaluate message: the node has just evaluated the global model on its held-out
episodes, fine-tunes it for ZK0_PERSONALIZE_STEPS steps, evaluates the result on the very same held-out
batches, saves it in LeRobot's format under its own folder (ZK0_NODE_<i>_PERSONAL_DIR) and restores the
global weights. Only the metrics go back to the server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..model import apply_trainable, save_checkpoint, trainable_state
from ..settings import default_cache_dir
from ..train import TrainPlan
from .session import NodeSession, evaluate_on_node, train_on_node

log = logging.getLogger("zk0")
PREFIX = "personal_"  # reply metrics of the personal model, beside the global model's own
KEPT = ("policy_loss", "action_mse", "num-samples")


def is_last_round(config: dict) -> bool:
    """Whether a message's round is the experiment's last (its steps reach the whole schedule's)."""
    return int(config["server-round"]) * int(config["local-steps"]) >= int(config["total-steps"])


def personal_dir(session: NodeSession) -> Path:
    """The node's folder for personal models: ZK0_PERSONAL_DIR, else <cache dir>/personal/<name>."""
    s = session.settings
    if s.personal_dir:
        return Path(s.personal_dir)
    return (s.cache_dir or default_cache_dir()) / "personal" / s.display_name


def personalise(session: NodeSession, config: dict, global_eval: dict) -> dict:
    """In the last round's evaluate message with ZK0_PERSONALIZE_STEPS > 0: fine-tune, evaluate and keep a personal
    model, then restore the global weights; the reply metrics it adds (personal_*), else {}."""
    steps = int(config.get("personalize-steps") or 0)
    if steps <= 0 or not is_last_round(config) or not session.heldout_episodes:
        return {}
    started, server_round = time.perf_counter(), int(config["server-round"])
    plan = TrainPlan(  # its own warm-up+cosine schedule, at the experiment's peak learning rate
        steps=steps, start_step=0, total_steps=steps, learning_rate=float(config["learning-rate"]),
        proximal_mu=float(config.get("personalize-mu") or 0.0), log_every=session.settings.log_every,
    )
    batch_size, seed = int(config["batch-size"]), int(config["seed"])
    global_state = trainable_state(session.policy)  # CPU copy: the warm session goes on with the global model
    try:
        # Batches drawn as a round after the last would draw them: unlike any round's, reproducible.
        _, trained = train_on_node(session, plan, batch_size, seed + 1000 * (server_round + 1))
        mine = evaluate_on_node(session, batch_size, int(config["eval-batches"]), seed)
        path = save_personal(session, config, plan, {"global": global_eval, "personal": mine})
    finally:
        apply_trainable(session.policy, global_state)
    log.info(
        "%s: personal model (%d steps, lambda %g) held-out loss %.4f vs global %.4f; kept in %s",
        session.settings.display_name, steps, plan.proximal_mu, mine["policy_loss"], global_eval["policy_loss"], path,
    )
    metrics = {f"{PREFIX}{k}": mine[k] for k in KEPT if k in mine}
    metrics.update({
        f"{PREFIX}train_loss": trained["policy_loss"], f"{PREFIX}steps": trained["steps"],
        f"{PREFIX}seconds": time.perf_counter() - started,
    })
    return metrics


def save_personal(session: NodeSession, config: dict, plan: TrainPlan, metrics: dict) -> Path:
    """The personal model in LeRobot's format (a LoRA policy merged into a plain one, its adapter beside it, as the
    server's checkpoints are), with the node's processors: its camera map and the federation's statistics."""
    server_round = int(config["server-round"])
    info = {
        "round": server_round, "base_policy": session.base, "base_fingerprint": session.fingerprint,
        "node": session.settings.display_name, "personalize_steps": plan.steps, "personalize_mu": plan.proximal_mu,
        "learning_rate": plan.learning_rate, "heldout_episodes": session.heldout_episodes,
        "heldout": json.loads(json.dumps(metrics, default=float)),
    }
    return save_checkpoint(
        session.policy, session.preprocessor, session.postprocessor,
        personal_dir(session) / f"round-{server_round:03d}", info,
    )
