"""FedProx with zk0's hooks: records, update screening, evaluation cadence, rounds counted across restarts."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable
from logging import ERROR, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log

from ..errors import RunFailed
from ..node_faults import read_faults
from ..stats import STATS_KEY
from ..wire import (
    DELTA,
    DELTA_BLOCK,
    PACKED,
    SCALES,
    down_format,
    is_finite,
    layout_fingerprint,
    npy_view,
    pack,
    unpack,
)
from .influence import Limits, decode, update_norm, weighted_mean
from .records import NODE_FIELDS, RunRecorder
from .robust import robust_aggregate


def _payload_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())


def _node_info(msg: Message) -> dict:
    node = msg.content.get("node")
    if not node:
        return {}
    # What each lab's data looks like (fps, cameras fed, frames) goes in the round record beside its metrics.
    return {k: node[k] if k in ("fps", "frames") else str(node[k]) for k in NODE_FIELDS if k in node}


def replying_node(reply: Message, sent: Iterable[Metadata]) -> int:
    """The node a reply is for. The SuperLink signs the error replies it makes for a node that went
    offline with its own id, so those are matched to the message they answer (`sent`: its metadata)."""
    if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
        return reply.metadata.src_node_id
    answered = reply.metadata.reply_to_message_id
    return next((m.dst_node_id for m in sent if m.message_id == answered), reply.metadata.src_node_id)


def error_reason(node_id: int, reply: Message, faults: Path | None = None) -> str:
    """Why a node's reply is an error: what `zk0 local` saw when it gave up on the node, else Flower's reason."""
    return (read_faults(faults).get(str(node_id)) if faults else None) or reply.error.reason


def _with_stats(messages: list[Message], stats: str) -> list[Message]:
    # Beside the config, not in it: Flower's strategy logs its configs at start, one line each.
    for msg in messages if stats else []:
        msg.content[STATS_KEY] = ConfigRecord({"json": stats})
    return messages


class Zk0FedProx(FedProx):
    """FedProx that records every node's reply and drops updates that would poison the average."""

    def __init__(
        self, recorder: RunRecorder, is_eval_round: Callable[[int], bool], wire_format: str = "fp32",
        layout_tag: str = "", faults: Path | None = None, eval_in_train: bool = False, last_round: int = 0,
        after_node_eval: Callable[[int], None] | None = None, round_offset: int = 0,
        mu_schedule: Callable[[Iterable[dict]], float] | None = None, limits: Limits | None = None,
        rule: FedAvg | None = None, stats: Callable[[], str] = str, **kwargs,
    ):
        super().__init__(**kwargs)
        self.stats = stats  # the run's normalisation statistics (JSON; "": the base policy's), sent with messages
        self.limits = limits or Limits()  # bounded influence; off unless given (the ServerApp gives the settings')
        self.rule = rule  # ZK0_AGGREGATION's Flower class (zk0.server.robust); None: the weighted mean
        # Rounds already done before a restart: Flower's loop counts from 1 again, the records do not.
        self.round_offset = round_offset
        # ZK0_ADAPTIVE_MU (zk0.server.adaptive.mu_schedule): mu for the next round from the round records so far;
        # None keeps proximal_mu fixed.
        self.mu_schedule = mu_schedule
        # ZK0_EVAL_MODE=in-train: round r's train message has nodes evaluate the model it brings (round r-1's)
        # first, and only the last round (`last_round`) gets an evaluate message. `after_node_eval(round)` is
        # told when an earlier round's record gained those evaluations (its WandB step is logged again).
        self.eval_in_train = eval_in_train
        self.last_round = last_round
        self.after_node_eval = after_node_eval
        self.wire_format = wire_format
        self.layout_tag = layout_tag  # what the layout fingerprint covers beyond names and shapes (LoRA's settings)
        self.recorder = recorder
        self.is_eval_round = is_eval_round
        self._shapes: dict[str, tuple] = {}
        self._layout = ""
        self._base = None  # the round's fp32 global model, flat: int8 updates are added to it, updates measured from it
        self._sent: set[int] = set()  # nodes asked to train this round
        # This round's messages' metadata (not their weights): Flower's push gives them their ids.
        self._outbox: list[Metadata] = []
        self.faults = faults  # zk0 local's notes on the nodes it gave up on (zk0.deploy.node_watch)

    def experiment_round(self, server_round: int) -> int:
        """The experiment's round for Flower's `server_round` of this run (which counts from 1 after a restart)."""
        return server_round + self.round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        server_round = self.experiment_round(server_round)
        config["evaluate-first"] = self.eval_in_train and self.is_eval_round(server_round - 1)
        self._shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        self._layout = layout_fingerprint(self._shapes, self.layout_tag)
        if self.wire_format == DELTA or self.limits.norm_factor:  # updates are measured from it
            self._base = pack(arrays.to_torch_state_dict(), "fp32")
        if self.mu_schedule is not None:  # FedProx's configure_train sends self.proximal_mu as the round's mu
            self.proximal_mu = self.mu_schedule(self.recorder.rounds.values())
        self.recorder.set(server_round, proximal_mu=self.proximal_mu)
        arrays = self._to_wire(arrays, config)
        messages = _with_stats(list(super().configure_train(server_round, arrays, config, grid)), self.stats())
        self._outbox = [m.metadata for m in messages]
        self._sent = {m.metadata.dst_node_id for m in messages}
        self.recorder.add_bytes(server_round, "sent", _payload_bytes(arrays) * len(messages))
        return messages

    def _screen(self, msg: Message) -> str | None:
        """Why a training reply must not be aggregated, or None when it is sound."""
        arrays = msg.content.get("arrays")
        if arrays is None:
            return "reply has no weights"
        node = msg.content.get("node")
        size = sum(math.prod(s) for s in self._shapes.values())
        if not node or node.get("layout") != self._layout:
            return "weights have the wrong names or shapes"
        claim = msg.content["metrics"].get(self.weighted_by_key)
        if not isinstance(claim, int | float) or not claim > 0:  # a negative weight would subtract the update
            return f"{self.weighted_by_key} {claim!r} is not a positive number"
        if self.wire_format == DELTA:
            blocks = -(-size // DELTA_BLOCK)
            shapes = {k: v.shape for k, v in arrays.items()}
            if shapes != {PACKED: (blocks * DELTA_BLOCK,), SCALES: (blocks,)}:
                return "weights have the wrong names or shapes"
            return None if np.isfinite(npy_view(arrays[SCALES])).all() else "weights contain NaN or Inf"
        if list(arrays) != [PACKED] or arrays[PACKED].shape != (size,):
            return "weights have the wrong names or shapes"
        if not is_finite(npy_view(arrays[PACKED]), self.wire_format):
            return "weights contain NaN or Inf"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.experiment_round(server_round)
        started = time.perf_counter()
        accepted, rejected, replied, evaluated = [], {}, set(), []
        for msg in replies:
            node_id = replying_node(msg, self._outbox)
            replied.add(node_id)
            if msg.has_error():
                rejected[str(node_id)] = f"error: {error_reason(node_id, msg, self.faults)}"
                log(WARNING, "Excluding node %s from aggregation: %s", node_id, rejected[str(node_id)])
                continue
            reason = self._screen(msg)
            if "eval" in msg.content:  # the model this round started from, evaluated before training
                evaluated.append((node_id, {**_node_info(msg), **dict(msg.content["eval"])}))
            info = {**_node_info(msg), **dict(msg.content["metrics"])}
            self.recorder.client(server_round, node_id, "train", info)
            received = _payload_bytes(msg.content["arrays"]) if "arrays" in msg.content else 0
            self.recorder.add_bytes(server_round, "received", received)
            if reason:
                log(WARNING, "Excluding node %s from aggregation: %s", node_id, reason)
                rejected[str(node_id)] = reason
            else:
                accepted.append(msg)
        rejected.update({str(n): "no reply within the round timeout" for n in sorted(self._sent - replied)})
        if evaluated:
            self._record_in_train_evals(server_round - 1, evaluated)
        if len(accepted) < self.min_train_nodes:
            self._fail_round(server_round, accepted, rejected)
        arrays, metrics, limited = self._aggregate(accepted)
        self.recorder.set(
            server_round,
            contributors=sorted(m.metadata.src_node_id for m in accepted),
            excluded=rejected,
            clipped=limited,  # node: how its weight or update was limited (zk0.server.influence)
            train_aggregate=dict(metrics) if metrics else None,
            # What the server's side of a round costs as nodes are added (zk0 bench scale).
            aggregate_seconds=time.perf_counter() - started,
            trained_seconds=self.recorder.elapsed(),  # the train exchange ends: zk0 bench demo splits off the rest
            server_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
        return arrays, metrics

    def _fail_round(self, server_round: int, accepted: list[Message], rejected: dict[str, str]) -> None:
        """Record the round's contributors and exclusions, then stop the run naming every node's reason."""
        # Aggregating fewer updates than the experiment requires (or none) would checkpoint a model
        # that did not learn from the federation: the run fails with every node's reason instead.
        contributors = sorted(m.metadata.src_node_id for m in accepted)
        self.recorder.set(server_round, contributors=contributors, excluded=rejected)
        reasons = "; ".join(f"node {n}: {why}" for n, why in rejected.items()) or "no node was sampled"
        log(ERROR, "Round %d: %d usable update(s), ZK0_MIN_NODES=%d required: %s", server_round, len(accepted),
            self.min_train_nodes, reasons)
        raise RunFailed(
            f"round {server_round}: {len(accepted)} usable update(s), ZK0_MIN_NODES={self.min_train_nodes} "
            f"required; {reasons}"
        )

    def _record_in_train_evals(self, server_round: int, evaluated: list[tuple[int, dict]]) -> None:
        """Record the nodes' held-out metrics of the global model after `server_round`, sent with their next
        round's training, in that round's record as an evaluate message's would be."""
        usable = []
        # Nodes that trained the round under other ids (SuperNodes restarted with a resumed experiment) are the
        # same labs: their entries, found by node name, take the evaluation.
        entries = self.recorder.rounds.get(server_round, {}).get("clients", {}).values()
        known = {c.get("name"): c["node_id"] for c in entries}
        for node_id, info in evaluated:
            self.recorder.client(server_round, known.get(info.get("name"), node_id), "eval", info)
            metrics = {k: v for k, v in info.items() if k not in NODE_FIELDS}
            if metrics.get(self.weighted_by_key, 0) > 0:
                usable.append(RecordDict({"metrics": MetricRecord(metrics)}))
        metrics = self.evaluate_metrics_aggr_fn(usable, self.weighted_by_key) if usable else None
        self.recorder.set(server_round, eval_aggregate=dict(metrics) if metrics else None, node_eval_in="train")
        if self.after_node_eval is not None:
            self.after_node_eval(server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
    ) -> Iterable[Message]:
        server_round = self.experiment_round(server_round)
        # In-train evaluation leaves only the final model to an evaluate message: no later train message brings it.
        if not self.is_eval_round(server_round) or (self.eval_in_train and server_round != self.last_round):
            return []
        wire_arrays = self._to_wire(arrays, config)
        messages = _with_stats(list(super().configure_evaluate(server_round, wire_arrays, config, grid)), self.stats())
        self._outbox = [m.metadata for m in messages]
        # The global model goes to every evaluating node as well: at scale as much again as training's download.
        self.recorder.add_bytes(server_round, "sent_eval", _payload_bytes(wire_arrays) * len(messages))
        return messages

    def _to_wire(self, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """The fp32 global model packed in the wire format nodes receive; its layout goes in the config."""
        config["weights-layout"] = layout_fingerprint({k: tuple(v.shape) for k, v in arrays.items()}, self.layout_tag)
        return ArrayRecord({PACKED: Array(pack(arrays.to_torch_state_dict(), down_format(self.wire_format)))})

    def _aggregate(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        """The new global model from the screened replies, in fp32: claims and shares limited, far-off updates
        scaled back (`self.limits`), then the weighted mean or Flower's robust rule; and what the limits changed."""
        replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not replies:
            return None, None, {}
        nodes = [m.metadata.src_node_id for m in replies]
        names = [str((m.content.get("node") or {}).get("name", n)) for m, n in zip(replies, nodes, strict=True)]
        # Zero-copy views of the packed replies
        arrays = [{k: npy_view(v) for k, v in m.content["arrays"].items()} for m in replies]
        claims = [float(m.content["metrics"][self.weighted_by_key]) for m in replies]
        weights, notes = self.limits.weigh(names, claims)
        norms = [update_norm(a, self._base, self.wire_format) for a in arrays] if self.limits.norm_factor else []
        scales, scaled = self.limits.bound(norms)
        scales = scales or [1.0] * len(replies)
        for i, why in scaled.items():
            notes[i] = "; ".join(filter(None, [notes.get(i), why]))
        key = self.weighted_by_key
        metrics = [{**dict(m.content["metrics"]), key: w} for m, w in zip(replies, weights, strict=True)]
        if self.rule is None:
            merged = {k: Array(v) for k, v in weighted_mean(arrays, weights, scales, self._base, self.wire_format,
                                                             self._shapes)}
            aggregated = self.train_metrics_aggr_fn([RecordDict({"m": MetricRecord(m)}) for m in metrics],
                                                    self.weighted_by_key)
        else:
            flats = [decode(a, self._base, self.wire_format, s) for a, s in zip(arrays, scales, strict=True)]
            flat, aggregated = robust_aggregate(self.rule, nodes, flats, metrics)
            merged = {k: Array(np.ascontiguousarray(v)) for k, v in unpack(flat, self._shapes).items()}
        for i, why in notes.items():
            log(WARNING, "Limiting node %s's influence: %s", nodes[i], why)
        return ArrayRecord(merged), aggregated, {str(nodes[i]): why for i, why in sorted(notes.items())}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round = self.experiment_round(server_round)
        usable = []
        for msg in replies:
            if msg.has_error():
                node_id = replying_node(msg, self._outbox)
                log(WARNING, "Node %s did not evaluate: error: %s", node_id, error_reason(node_id, msg, self.faults))
                continue
            metrics = dict(msg.content["metrics"])
            self.recorder.client(server_round, msg.metadata.src_node_id, "eval", {**_node_info(msg), **metrics})
            if metrics.get(self.weighted_by_key, 0) > 0:
                usable.append(msg)
        metrics = super().aggregate_evaluate(server_round, usable)
        where = {"node_eval_in": "evaluate"} if usable else {}  # in-train evaluations of this model come next round
        self.recorder.set(server_round, eval_aggregate=dict(metrics) if metrics else None, **where)
        return metrics
