"""The node's long-lived worker: one session kept between messages, and what each request kind does with it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..attacks import hostile
from ..lora import Adapter
from ..settings import NodeSettings
from ..train import TrainPlan
from ..wire import DELTA, PACKED, dequantize, down_format, pack, quantize_delta, unpack, views
from .messages import KINDS, NodeReply, NodeRequest
from .session import NodeSession, evaluate_on_node, open_session, receive_weights, stats_on_node, train_on_node

log = logging.getLogger("zk0")
CLIPPING_NORM = "clipping_norm"  # Flower's key for it (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM)


def _stamp(spec: str | None) -> tuple:
    """What changes when a local policy or dataset is rewritten in place (size and time of its files)."""
    root = Path(spec or "")
    if not spec or not root.is_dir():
        return ()
    files = [*root.glob("*.json"), *root.glob("*.safetensors"), root / "meta" / "info.json"]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files) if f.is_file())


class NodeWorker:
    """Runs a node's requests (zk0.node.messages); keeps the session (policy, processors, datasets) between them.

    The session is reused while the node's settings, base policy, split seed and the files on disk are
    unchanged, so a long-lived worker only applies the new global weights per message.
    """

    def __init__(self):
        self.session: NodeSession | None = None
        self.key: tuple | None = None

    def open(self, settings: NodeSettings, config: dict) -> NodeSession:
        """The session for this request: the one already open when its inputs are unchanged, else a new one."""
        base, seed = settings.base_policy or str(config["base-policy"]), int(config["seed"])
        fingerprint = str(config["base-fingerprint"])
        adapter = Adapter.from_config(config)
        key = (settings.model_dump_json(), base, seed, adapter, _stamp(base), _stamp(settings.dataset))
        session = self.session
        if session is not None and key == self.key and session.fingerprint == (fingerprint or None):
            return session
        self.session = self.key = None  # a failed open leaves nothing half-reused
        # Built with the message's statistics: a fresh session (each message with warm=false) loads processors once.
        session = open_session(settings, base, None, seed, fingerprint, str(config.get("norm-stats") or ""), adapter)
        self.session, self.key = session, key
        return session

    def handle(self, request: NodeRequest) -> NodeReply:
        """Train, evaluate or summarise (stats) on this node; a train request whose config sets evaluate-first
        also reports the received weights' held-out metrics."""
        started, config = time.perf_counter(), request.config
        if request.kind not in KINDS:
            raise ValueError(f"unknown request {request.kind!r}: expected 'train', 'evaluate' or 'stats'")
        before = self.session
        session = self.open(request.settings, config)
        if request.kind == "stats":
            stats, frames = stats_on_node(session)
            return NodeReply({"frames": frames}, session.layout, session.info, stats=stats)
        session.use_stats(str(config.get("norm-stats") or ""))
        received = receive_weights(session, request.arrays, config)
        session.setup_seconds = time.perf_counter() - started  # for a reused session: only receiving the weights
        warm = {"warm": float(session is before)}  # 1: this message found the policy loaded
        evaluated = None
        # A train message may evaluate the weights it brings before training on them (ZK0_EVAL_MODE=in-train):
        # the same evaluation as an evaluate message's, on a forked RNG, so training's draws are unchanged.
        if request.kind == "evaluate" or config.get("evaluate-first"):
            evaluated = evaluate_on_node(session, int(config["batch-size"]), int(config["eval-batches"]),
                                         int(config["seed"]))
            evaluated.update(warm)
        if request.kind == "evaluate":
            from .personal import personalise  # the last round's: a personal model, kept here

            evaluated.update(personalise(session, config, evaluated))
            return NodeReply(evaluated, session.layout, session.info)
        metrics, arrays = train_and_pack(session, request, received)
        return NodeReply({**metrics, **warm}, session.layout, session.info, arrays, evaluated)


def train_plan(config: dict, log_every: int) -> TrainPlan:
    """The message's round of the experiment's schedule: its steps, where they start, the learning rate, mu."""
    server_round, steps = int(config["server-round"]), int(config["local-steps"])
    return TrainPlan(
        steps=steps,
        start_step=(server_round - 1) * steps,
        total_steps=int(config["total-steps"]),
        learning_rate=float(config["learning-rate"]),
        proximal_mu=float(config["proximal-mu"]),
        log_every=log_every,
    )


def train_and_pack(session: NodeSession, request: NodeRequest, received: np.ndarray) -> tuple[dict, dict]:
    """Train a round on the received weights; (metrics, the reply's arrays in the message's wire format).
    A node that ZK0_TEST_ATTACK names (zk0.attacks, a testing hook) turns its round into that attack here."""
    config = request.config
    attacks = hostile(session.settings.display_name)
    plan = train_plan(config, session.settings.log_every)
    for attack in attacks:
        plan = attack.plan(plan)
    state, metrics = train_on_node(session, plan, int(config["batch-size"]), request.batch_seed)
    fmt = str(config["wire-format"])
    if attacks:
        received = views({PACKED: received}, down_format(fmt))[PACKED].float().numpy()
        sent = pack(state, "fp32")
        for attack in attacks:
            sent, metrics = attack.weights(sent, received, request.batch_seed), attack.metrics(metrics)
        state = {k: torch.from_numpy(v) for k, v in unpack(sent, session.shapes).items()}
    if CLIPPING_NORM in config:  # ZK0_DP=client: the update is clipped here, before anything leaves the node
        clip = float(config[CLIPPING_NORM])
        arrays, norm = clipped_reply(pack(state, "fp32"), received.astype(np.float32), fmt, clip)
        # The norm before clipping says something about this lab's data: it stays in the node's log.
        log.info("%s: update L2 norm %.4g, clipped to %g", session.settings.display_name, norm, clip)
        return metrics, arrays
    if fmt == DELTA:  # the update against the weights as received, not the trained weights
        return metrics, quantize_delta(pack(state, "fp32") - received.astype(np.float32))
    return metrics, {PACKED: pack(state, fmt)}


def sent_update(arrays: dict, received: np.ndarray, fmt: str) -> np.ndarray:
    """The update a packed reply carries, as the server reads it (flat fp32): the int8-delta dequantized, or the fp32
    weights less the weights received."""
    return dequantize(arrays, received.size) if fmt == DELTA else arrays[PACKED] - received


def clipped_reply(trained: np.ndarray, received: np.ndarray, fmt: str, clip_norm: float) -> tuple[dict, float]:
    """The reply's arrays for an update (trained - received, flat fp32) clipped to `clip_norm` with Flower's helper,
    and the update's norm before clipping. Packing rounds (int8 steps, fp32 sums), so the update the server will read
    is measured as it will be and scaled down until it too is within the norm."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

    if fmt != DELTA and fmt != "fp32":
        raise ValueError(f"wire format {fmt}: a clipped update travels only as fp32 or int8-delta")
    update = trained - received
    norm = get_norm([update])
    clip_inputs_inplace([update], clip_norm)
    for _ in range(8):
        arrays = quantize_delta(update) if fmt == DELTA else {PACKED: received + update}
        sent = get_norm([sent_update(arrays, received, fmt)])
        if sent <= clip_norm:
            return arrays, norm
        update *= np.float32(clip_norm / sent * (1 - 1e-5))
    raise RuntimeError(f"could not pack an update within the clipping norm {clip_norm} ({sent} after rounding)")
