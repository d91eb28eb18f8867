"""Personalised models, kept on the node: the final global model fine-tuned on the node's own episodes, kept only
when the node's own validation episodes say it is better than the global model.

Method: local adaptation of the federated model (FedAvg + fine-tuning; Yu et al. 2020, "Salvaging federated
learning by local adaptation"; Cheng et al. 2021, "Fine-tuning is fine in federated learning"), regularised
toward the global model by Ditto's (lambda/2)*||v - w_global||^2 (Li et al. 2021), which is FedProx's
proximal term with lambda in place of mu. It fits SmolVLA because it needs nothing the federation does not
already run: the same trainable weights (the action expert or LoRA adapters), the node's own training step
and data, once, after the last round; the VLM stays frozen and shared, and the global model is untouched.
Ditto's alternative of training a personal model alongside every round would double each node's training
and keep a second full expert per node for the whole run.

Selection on local validation: fine-tuning can hurt a node whose training episodes mislead it, so the node
splits a validation part off its TRAINING episodes (VAL_FRACTION of them, at least one, drawn from the seed;
never its held-out test episodes), fine-tunes on the rest and scores the global model and the checkpoints after
1/3, 2/3 and all of the steps on it; the lowest validation policy loss wins, ties going to fewer steps, so the
global model ("0 steps") is kept unless a checkpoint beats it. This is early stopping on local validation data,
as the personalisation literature evaluates and gates it: Ditto's experiments split each device's data into
train/validation/test and select lambda per device on its local validation data (Li et al. 2021, section 5),
and Wang et al. 2019 ("Federated evaluation of on-device personalization") split each device's data to compare
the personalised with the global model before using it. With fewer than MIN_FIT_EPISODES training episodes left
after the split, there is nothing to validate on: the node keeps the global model and logs it.

It runs in the last round's evaluate message: the node has just evaluated the global model on its held-out
episodes; it fine-tunes for ZK0_PERSONALIZE_STEPS steps, scores the kept model (and the fully fine-tuned one,
for comparison) on the very same held-out batches, saves the kept model in LeRobot's format under its own
folder (ZK0_NODE_<i>_PERSONAL_DIR; the global model when that is kept, so the folder always holds the node's
best model) and restores the global weights. Only the metrics go back to the server.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..evaluate import evaluate_policy
from ..model import apply_trainable, save_checkpoint, trainable_state
from ..portable import describe
from ..settings import default_cache_dir
from ..train import TrainPlan, train_round
from .session import NodeSession, evaluate_on_node, node_batches

log = logging.getLogger("zk0")
PREFIX = "personal_"  # reply metrics of the personal model, beside the global model's own
KEPT = ("policy_loss", "action_mse", "num-samples")
VAL_FRACTION = 0.2  # of the node's training episodes, rounded up: 2 of the demo's 6
MIN_FIT_EPISODES = 2  # fewer left to fine-tune on after the validation split: no split, the global model kept
CHECKPOINTS = 3  # candidates along the fine-tuning: after 1/3, 2/3 and all of the steps


@dataclass
class Candidate:
    """A model the node may keep: after `steps` fine-tuning steps (0: the global model), its validation metrics."""

    steps: int
    val: dict
    state: dict | None = None  # its trainable weights (CPU); None for the global model, which the caller holds


def is_last_round(config: dict) -> bool:
    """Whether a message's round is the experiment's last (its steps reach the whole schedule's)."""
    return int(config["server-round"]) * int(config["local-steps"]) >= int(config["total-steps"])


def personal_dir(session: NodeSession) -> Path:
    """The node's folder for personal models: ZK0_PERSONAL_DIR, else <cache dir>/personal/<name>."""
    s = session.settings
    if s.personal_dir:
        return Path(s.personal_dir)
    return (s.cache_dir or default_cache_dir()) / "personal" / s.display_name


def validation_split(train: list[int], seed: int) -> tuple[list[int], list[int]]:
    """(fine-tuning, validation) episodes out of the node's training episodes, drawn from the seed; the validation
    part is empty when it would leave fewer than MIN_FIT_EPISODES to fine-tune on."""
    count = max(1, math.ceil(VAL_FRACTION * len(train)))
    if len(train) - count < MIN_FIT_EPISODES:
        return list(train), []
    # Its own stream: split_episodes drew the held-out episodes with default_rng(seed).
    order = np.random.default_rng([seed, 1]).permutation(train).tolist()
    return sorted(order[count:]), sorted(order[:count])


def checkpoint_steps(steps: int) -> list[int]:
    """The step counts after which a fine-tuning checkpoint is scored (the last is all of them)."""
    return sorted({max(1, round(steps * k / CHECKPOINTS)) for k in range(1, CHECKPOINTS + 1)})


def choose(candidates: list[Candidate]) -> Candidate:
    """The lowest validation policy loss, ties to fewer steps (a NaN loss counts as infinite): the global model,
    listed first with 0 steps, is kept unless a checkpoint beats it."""
    return min(candidates, key=lambda c: (c.val["policy_loss"] if math.isfinite(c.val["policy_loss"]) else math.inf,
                                          c.steps))


def scorer(session: NodeSession, episodes: list[int], batch_size: int, max_batches: int, seed: int):
    """A function scoring the live policy on fixed batches of `episodes`, built once, as evaluate_on_node scores."""
    batches, _, _ = node_batches(session, episodes, batch_size, max_batches=max_batches)
    return lambda: evaluate_policy(session.policy, session.preprocessor, session.postprocessor, batches, seed)


def _observed(batches, marks: set[int], observe):
    """The batch stream, calling observe(done) before the step after each mark, once train_round has stepped."""
    done = 0
    while True:
        if done in marks:
            observe(done)
        yield next(batches)
        done += 1


def fine_tune(session: NodeSession, plan: TrainPlan, episodes: list[int], batch_size: int, seed: int, observe) -> dict:
    """One run of train_round on `episodes` (one optimizer and schedule, Ditto's anchor the global model), with
    observe(steps) called at every checkpoint; evaluate_policy forks the RNG, so observing leaves training as is."""
    batches, _, _ = node_batches(session, episodes, batch_size, seed)
    torch.manual_seed(seed)  # flow-matching noise and time, as train_on_node seeds them
    marks = set(checkpoint_steps(plan.steps)[:-1])
    metrics = train_round(session.policy, session.preprocessor, _observed(batches, marks, observe), plan)
    observe(plan.steps)
    return metrics


def select(session: NodeSession, plan: TrainPlan, split: tuple, config: dict) -> tuple[Candidate, dict, dict]:
    """Fine-tune on split[0], scoring the global model and each checkpoint on split[1]; (the candidate to keep, every
    candidate's validation policy loss by steps, the training metrics). The policy holds the fully fine-tuned weights
    after."""
    batch_size, seed = int(config["batch-size"]), int(config["seed"])
    score = scorer(session, split[1], batch_size, int(config["eval-batches"]), seed)
    candidates = [Candidate(0, score())]

    def observe(done: int) -> None:
        val = score()
        session.policy.train()  # evaluate_policy left it in eval mode, mid-training
        best = choose(candidates)
        candidates.append(Candidate(done, val))
        if choose(candidates).steps == done:  # only the best so far is copied
            best.state = None
            candidates[-1].state = trainable_state(session.policy)

    # Batches drawn as a round after the last would draw them: unlike any round's, reproducible.
    trained = fine_tune(session, plan, split[0], batch_size, seed + 1000 * (int(config["server-round"]) + 1), observe)
    return choose(candidates), {c.steps: c.val["policy_loss"] for c in candidates}, trained


def personal_plan(session: NodeSession, config: dict, steps: int) -> TrainPlan:
    """Its own warm-up+cosine schedule over `steps`, at the experiment's peak learning rate, Ditto's lambda as mu."""
    return TrainPlan(
        steps=steps, start_step=0, total_steps=steps, learning_rate=float(config["learning-rate"]),
        proximal_mu=float(config.get("personalize-mu") or 0.0), log_every=session.settings.log_every,
    )


def personalise(session: NodeSession, config: dict, global_eval: dict) -> dict:
    """In the last round's evaluate message with ZK0_PERSONALIZE_STEPS > 0: fine-tune, select on local validation,
    evaluate and keep the personal model, then restore the global weights; the reply metrics it adds, else {}."""
    steps = int(config.get("personalize-steps") or 0)
    if steps <= 0 or not is_last_round(config) or not session.heldout_episodes:
        return {}
    started, plan = time.perf_counter(), personal_plan(session, config, steps)
    held_out = partial(evaluate_on_node, session, int(config["batch-size"]), int(config["eval-batches"]),
                       int(config["seed"]))
    split = validation_split(session.train_episodes, int(config["seed"]))
    global_state = trainable_state(session.policy)  # CPU copy: the warm session goes on with the global model
    chosen, losses, extra, tuned = Candidate(0, {"policy_loss": math.nan}), {}, {}, None
    try:
        if split[1]:
            chosen, losses, trained = select(session, plan, split, config)
            tuned = held_out()  # always fine-tuning all the steps: what the selection is compared with
            extra = {f"{PREFIX}tuned_{m}": tuned[m] for m in KEPT[:2]}
            extra.update({f"{PREFIX}train_loss": trained["policy_loss"], f"{PREFIX}trained_steps": trained["steps"]})
        else:
            log.warning("%s: %d training episode(s) leave too few to validate a personal model on: keeping the "
                        "global model", session.settings.display_name, len(split[0]))
        apply_trainable(session.policy, chosen.state or global_state)
        mine = global_eval if not chosen.steps else tuned if chosen.steps == steps else held_out()
        path = save_personal(session, config, plan, chosen, split, {"global": global_eval, "personal": mine,
                                                                    "validation_policy_loss": losses})
    finally:
        apply_trainable(session.policy, global_state)
    log.info("%s: kept the %s model (%d of %d steps, lambda %g; validation loss by steps %s): held-out loss %.4f "
             "vs global %.4f; saved in %s", session.settings.display_name, "personal" if chosen.steps else "global",
             chosen.steps, steps, plan.proximal_mu, losses, mine["policy_loss"], global_eval["policy_loss"], path)
    return {
        **{f"{PREFIX}{k}": mine[k] for k in KEPT if k in mine}, **extra,
        f"{PREFIX}steps": chosen.steps, f"{PREFIX}kept": int(chosen.steps > 0), f"{PREFIX}val_episodes": len(split[1]),
        f"{PREFIX}val_policy_loss": losses.get(chosen.steps, math.nan),
        f"{PREFIX}global_val_policy_loss": losses.get(0, math.nan), f"{PREFIX}seconds": time.perf_counter() - started,
    }


def save_personal(
    session: NodeSession, config: dict, plan: TrainPlan, chosen: Candidate, split: tuple, metrics: dict,
) -> Path:
    """The kept model in LeRobot's format (a LoRA policy merged into a plain one, its adapter beside it, as the
    server's checkpoints are), with the node's processors: its camera map and the federation's statistics."""
    server_round = int(config["server-round"])
    info = {
        "round": server_round, "base_policy": describe(session.base, personal_dir(session)),
        "base_fingerprint": session.fingerprint,
        "node": session.settings.display_name, "kept": "personal" if chosen.steps else "global",
        "chosen_steps": chosen.steps, "personalize_steps": plan.steps, "personalize_mu": plan.proximal_mu,
        "learning_rate": plan.learning_rate, "heldout_episodes": session.heldout_episodes,
        "fine_tune_episodes": split[0], "validation_episodes": split[1],
        "heldout": json.loads(json.dumps(metrics, default=float)),
    }
    return save_checkpoint(
        session.policy, session.preprocessor, session.postprocessor,
        personal_dir(session) / f"round-{server_round:03d}", info,
    )
