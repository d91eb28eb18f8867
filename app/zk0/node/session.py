"""What one SuperNode does per message, independent of Flower: load, split, train, evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cameras import match_cameras
from ..data import (
    BadSamples,
    batch_stream,
    check_opened,
    eval_batches,
    open_dataset,
    open_metadata,
    partition_episodes,
    split_episodes,
)
from ..evaluate import evaluate_policy
from ..features import open_features
from ..lora import Adapter
from ..model import (
    apply_trainable,
    frozen_fingerprint,
    load_policy,
    load_processors,
    trainable_params,
    trainable_shapes,
)
from ..settings import NodeSettings, default_cache_dir, resolve_device
from ..stats import compute_stats, from_json, to_json, training_frames
from ..train import TrainPlan, train_round
from ..wire import PACKED, down_format, layout_fingerprint, npy_bytes_view, unpack, views

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
    setup_seconds: float  # this message's seconds before training: loading, or only applying weights when reused
    fingerprint: str | None = None  # of the frozen weights, when the server sent one to check
    base: str = ""  # where the base policy (and its processors) came from
    info: dict = field(default_factory=dict)  # fps, cameras fed and frames: what the round records show per node
    stats: str = ""  # the normalisation statistics the processors use (JSON); "" for the base policy's own
    datasets: dict = field(default_factory=dict)  # opened datasets by episode list, reused while the session lives
    adapter: Adapter = field(default_factory=Adapter)  # what trains: the full expert or LoRA adapters
    features: dict = field(default_factory=dict)  # frozen-feature caches by episode list (None: off), zk0.features
    shapes: dict = field(init=False)  # trainable names and shapes: the layout packed weights follow
    layout: str = field(init=False)  # its fingerprint, checked against every message's

    def __post_init__(self):
        self.shapes = trainable_shapes(self.policy)
        self.layout = layout_fingerprint(self.shapes, self.adapter.tag())

    def dataset(self, episodes: list[int]):
        """This node's dataset restricted to `episodes`, opened once per session."""
        key = tuple(episodes)
        if key not in self.datasets:
            self.datasets[key] = open_dataset(
                self.settings.dataset, self.policy.config, episodes=episodes, video_backend=self.settings.video_backend,
                cache_dir=self.settings.cache_dir,
            )
        return self.datasets[key]

    def image_features(self, episodes: list[int]):
        """The frozen-feature cache of the dataset restricted to `episodes`, or None when it is off (logged once)."""
        key = tuple(episodes)
        if key not in self.features:
            ds, s = self.dataset(episodes), self.settings
            fed, _ = match_cameras(list(ds.meta.camera_keys), list(self.policy.config.image_features), s.cameras)
            self.features[key] = open_features(
                self.policy, ds, fed, mode=s.feature_cache, max_gb=s.feature_cache_max_gb,
                root=s.feature_cache_dir or (s.cache_dir or default_cache_dir()) / "features",
                fingerprint=(self.fingerprint or frozen_fingerprint(self.policy)) if s.feature_cache != "off" else "",
                video_backend=s.video_backend,
            )
        return self.features[key]

    def use_stats(self, stats: str) -> None:
        """Normalise with `stats` (JSON from the server; "" = the base policy's), rebuilding processors on change."""
        if stats != self.stats:
            device = str(next(self.policy.parameters()).device)
            values = from_json(stats) if stats else None
            self.preprocessor, self.postprocessor = load_processors(self.base, device, self.settings.cameras, values)
            self.stats = stats


class BaseMismatchError(ValueError):
    """This node's base policy is not the one the server federates."""


def open_session(
    settings: NodeSettings, base_policy: str, global_state: dict | None, seed: int, fingerprint: str | None = None,
    stats: str = "", adapter: Adapter | None = None,
) -> NodeSession:
    """Load the base policy, apply the global weights (when given) and split this node's episodes.

    `stats` (JSON from the server; "" = the base policy's) are the normalisation statistics the processors use;
    `adapter` (from the server's message) says whether the policy is wrapped with LoRA, as the server's is.
    """
    started = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    base = settings.base_policy or base_policy
    device = resolve_device(settings.device)
    adapter = adapter or Adapter()
    policy = load_policy(base, device, adapter, seed)
    mine = frozen_fingerprint(policy) if fingerprint else None
    if fingerprint and mine != fingerprint:
        raise BaseMismatchError(
            f"base policy {base!r} on this node has frozen-weight fingerprint {mine}, the server's is "
            f"{fingerprint}: give every node the same base (ZK0_BASE_POLICY / node config 'base-policy')"
        )
    row = check_opened(
        settings.dataset, policy.config, settings.cameras, role=settings.display_name,
        setting="ZK0_DATASET", cameras_setting="ZK0_CAMERAS",
        heldout=settings.heldout_episodes, partitions=settings.num_partitions,
        heldout_setting="ZK0_HELDOUT_EPISODES (node config 'heldout-episodes')",
    )
    meta = open_metadata(settings.dataset, settings.cache_dir)
    episodes = list(range(meta.total_episodes))
    if settings.num_partitions:
        episodes = partition_episodes(episodes, settings.partition_id, settings.num_partitions)
    train_eps, heldout_eps = split_episodes(episodes, settings.heldout_episodes, seed, settings.dataset)
    if global_state is not None:
        apply_trainable(policy, global_state)
    pre, post = load_processors(base, device, settings.cameras, from_json(stats) if stats else None)
    info = {
        "fps": meta.fps, "frames": meta.total_frames,
        "cameras": ",".join(f"{k.split('.')[-1]}->{v.split('.')[-1]}" for k, v in row.fed.items()),
    }
    return NodeSession(
        settings, policy, pre, post, train_eps, heldout_eps, time.perf_counter() - started, mine, base, info, stats,
        adapter=adapter,
    )


def stats_on_node(session: NodeSession) -> tuple[str, int]:
    """Normalisation statistics of this node's training episodes (JSON) and how many frames they cover."""
    ds = session.dataset(session.train_episodes)
    frames = training_frames(ds.root, session.train_episodes)
    return to_json(compute_stats(frames)), len(next(iter(frames.values())))


def node_batches(session: NodeSession, episodes: list[int], batch_size: int, seed=0, max_batches=None):
    """(batches, bad-sample counter, feature cache or None) of `episodes` as the node reads them: max_batches fixed
    evaluation batches, else the seeded training stream; on the frozen-feature cache when it is on."""
    bad = BadSamples(session.settings.max_bad_samples, session.settings.dataset)
    features = session.image_features(episodes)
    ds = features.view if features else session.dataset(episodes)
    if max_batches is None:
        batches = batch_stream(ds, batch_size, seed, session.settings.num_workers, bad)
        return (features.complete(batches, bad) if features else batches), bad, features
    batches = eval_batches(ds, batch_size, max_batches, bad)
    return (list(features.complete(batches, bad)) if features else batches), bad, features


def train_on_node(session: NodeSession, plan: TrainPlan, batch_size: int, seed: int) -> tuple[dict, dict]:
    """Train locally on the node's training episodes; return (the trained parameters, uncopied; metrics)."""
    started = time.perf_counter()
    ds = session.dataset(session.train_episodes)
    log.info(
        "%s: training %d steps on %d episodes (%d frames), held out %s",
        session.settings.display_name, plan.steps, len(session.train_episodes), len(ds), session.heldout_episodes,
    )
    batches, bad, features = node_batches(session, session.train_episodes, batch_size, seed)
    torch.manual_seed(seed)  # flow-matching noise and time: a rerun of a round reproduces it
    metrics = train_round(session.policy, session.preprocessor, batches, plan)
    metrics["skipped_samples"] = bad.count
    metrics.update(features.report() if features else {})
    metrics["num-samples"] = metrics["samples"]
    metrics["setup_seconds"] = session.setup_seconds + (time.perf_counter() - started - metrics["train_seconds"])
    return trainable_params(session.policy), metrics


def evaluate_on_node(session: NodeSession, batch_size: int, max_batches: int, seed: int) -> dict:
    """Evaluate the received global weights on the node's held-out episodes."""
    if not session.heldout_episodes:
        return {"policy_loss": float("nan"), "action_mse": float("nan"), "num-samples": 0}
    started = time.perf_counter()
    batches, bad, _ = node_batches(session, session.heldout_episodes, batch_size, max_batches=max_batches)
    metrics = evaluate_policy(session.policy, session.preprocessor, session.postprocessor, batches, seed)
    return {
        **metrics, "skipped_samples": bad.count, "eval_seconds": time.perf_counter() - started,
        "setup_seconds": session.setup_seconds,
    }


def receive_weights(session: NodeSession, arrays: dict, config: dict) -> np.ndarray:
    """Copy a message's packed weights (.npy bytes) into the policy after checking their layout; returns them."""
    if set(arrays) != {PACKED} or config.get("weights-layout") != session.layout:
        raise ValueError(
            f"received weights (layout {config.get('weights-layout')}, arrays {sorted(arrays)[:3]}) do not match this "
            f"node's trainable layout {session.layout}: server and node must run the same zk0 and base policy"
        )
    received = npy_bytes_view(arrays[PACKED])
    apply_trainable(session.policy, views(unpack(received, session.shapes), down_format(str(config["wire-format"]))))
    return received
