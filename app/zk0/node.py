"""What one SuperNode does per message, independent of Flower: load, split, train, evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .data import BadSamples, batch_stream, check_features, eval_batches, open_dataset, open_metadata, partition_episodes, split_episodes
from .evaluate import evaluate_policy
from .model import apply_trainable, frozen_fingerprint, load_policy, load_processors, trainable_params
from .settings import NodeSettings, resolve_device
from .train import TrainPlan, train_round

log = logging.getLogger("zk0")


@dataclass
class NodeSession:
    """The base policy with the global weights applied, and this node's episode split."""

    settings: NodeSettings
    policy: torch.nn.Module
    preprocessor: object
    postprocessor: object
    train_episodes: list[int]
    heldout_episodes: list[int]
    setup_seconds: float


class BaseMismatchError(ValueError):
    """This node's base policy is not the one the server federates."""


def open_session(
    settings: NodeSettings, base_policy: str, global_state: dict, seed: int, fingerprint: str | None = None
) -> NodeSession:
    """Load the base policy, apply the global weights and split this node's episodes."""
    started = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    base = settings.base_policy or base_policy
    device = resolve_device(settings.device)
    policy = load_policy(base, device)
    if fingerprint and (mine := frozen_fingerprint(policy)) != fingerprint:
        raise BaseMismatchError(
            f"base policy {base!r} on this node has frozen-weight fingerprint {mine}, the server's is "
            f"{fingerprint}: give every node the same base (ZK0_BASE_POLICY / node config 'base-policy')"
        )
    meta = open_metadata(settings.dataset)
    check_features(meta, policy.config, settings.dataset)
    episodes = list(range(meta.total_episodes))
    if settings.num_partitions:
        episodes = partition_episodes(episodes, settings.partition_id, settings.num_partitions)
    train_eps, heldout_eps = split_episodes(episodes, settings.heldout_episodes, seed, settings.dataset)
    apply_trainable(policy, global_state)
    pre, post = load_processors(base, device)
    return NodeSession(settings, policy, pre, post, train_eps, heldout_eps, time.perf_counter() - started)


def train_on_node(session: NodeSession, plan: TrainPlan, batch_size: int, seed: int) -> tuple[dict, dict]:
    """Train locally on the node's training episodes; return (the trained parameters, uncopied; metrics)."""
    started = time.perf_counter()
    ds = open_dataset(
        session.settings.dataset, session.policy.config,
        episodes=session.train_episodes, video_backend=session.settings.video_backend,
    )
    log.info(
        "%s: training %d steps on %d episodes (%d frames), held out %s",
        session.settings.display_name, plan.steps, len(session.train_episodes), len(ds), session.heldout_episodes,
    )
    bad = BadSamples(session.settings.max_bad_samples, session.settings.dataset)
    batches = batch_stream(ds, batch_size, seed, session.settings.num_workers, bad)
    torch.manual_seed(seed)  # flow-matching noise and time: a rerun of a round reproduces it
    metrics = train_round(session.policy, session.preprocessor, batches, plan)
    metrics["skipped_samples"] = bad.count
    metrics["num-samples"] = metrics["samples"]
    metrics["setup_seconds"] = session.setup_seconds + (time.perf_counter() - started - metrics["train_seconds"])
    return trainable_params(session.policy), metrics


def evaluate_on_node(session: NodeSession, batch_size: int, max_batches: int, seed: int) -> dict:
    """Evaluate the received global weights on the node's held-out episodes."""
    if not session.heldout_episodes:
        return {"policy_loss": float("nan"), "action_mse": float("nan"), "num-samples": 0}
    started = time.perf_counter()
    ds = open_dataset(
        session.settings.dataset, session.policy.config,
        episodes=session.heldout_episodes, video_backend=session.settings.video_backend,
    )
    bad = BadSamples(session.settings.max_bad_samples, session.settings.dataset)
    batches = eval_batches(ds, batch_size, max_batches, bad)
    metrics = evaluate_policy(session.policy, session.preprocessor, session.postprocessor, batches, seed)
    return {**metrics, "skipped_samples": bad.count, "eval_seconds": time.perf_counter() - started}
