"""ZK0_AGGREGATION's robust rules: Flower's own FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan on zk0's
screened replies, each given as one flat fp32 array (every rule is per value or on whole-model distances, so the
flat array gives what Flower computes tensor by tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from ..errors import RunFailed
from ..settings import ServerSettings

FLAT = "flat"  # the key of the one array each reply is handed to Flower's class in
RULES = {"median": FedMedian, "trimmed": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan}


def robust_rule(settings: ServerSettings, weighted_by_key: str = "num-samples") -> FedAvg | None:
    """The Flower class ZK0_AGGREGATION names, given only the settings that are set (the rest keep Flower's
    defaults); None for mean, zk0's own streaming weighted mean."""
    if settings.aggregation == "mean":
        return None
    names = {"trim_fraction": "beta", "byzantine_nodes": "num_malicious_nodes",
             "multikrum_select": "num_nodes_to_select"}
    kwargs = {flwr: getattr(settings, ours) for ours, flwr in names.items() if getattr(settings, ours) is not None}
    return RULES[settings.aggregation](weighted_by_key=weighted_by_key, **kwargs)


def fewest_updates(rule: FedAvg) -> int:
    """How many updates `rule` needs to aggregate at all (Bulyan returns nothing below 4f + 3)."""
    f = getattr(rule, "num_malicious_nodes", 0)
    return 4 * f + 3 if isinstance(rule, Bulyan) else 2 * f + 3 if isinstance(rule, MultiKrum) else 1


def robust_aggregate(
    rule: FedAvg, nodes: Sequence[int], flats: Sequence[np.ndarray], metrics: Sequence[dict],
) -> tuple[np.ndarray, MetricRecord | None]:
    """Flower's `rule` on the replies (flat fp32 weights, each node's metrics with its aggregation weight under
    the rule's weighted_by_key): the new flat fp32 global model and the metrics Flower aggregates."""
    if len(flats) < fewest_updates(rule):
        raise RunFailed(f"{type(rule).__name__} needs at least {fewest_updates(rule)} updates, got {len(flats)}: "
                        "raise ZK0_MIN_NODES or lower ZK0_BYZANTINE_NODES")
    messages = [
        Message(RecordDict({"arrays": ArrayRecord({FLAT: Array(np.asarray(flat, dtype=np.float32))}),
                            "metrics": MetricRecord(m)}), dst_node_id=node, message_type=MessageType.TRAIN)
        for node, flat, m in zip(nodes, flats, metrics, strict=True)
    ]
    arrays, aggregated = rule.aggregate_train(0, messages)
    return arrays[FLAT].numpy().astype(np.float32, copy=False), aggregated
