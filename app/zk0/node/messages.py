"""What the ClientApp asks of a node's worker and what it gets back, as the warm worker's connection pickles them.

Only the standard library is imported: the ClientApp builds these without importing torch or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("train", "evaluate", "stats")


@dataclass(frozen=True)
class NodeRequest:
    """One Flower message for this node: what to do, with which settings and weights."""

    kind: str  # "train", "evaluate" or "stats" (normalisation statistics, before round 1)
    node_config: dict[str, Any]  # the SuperNode's Flower node config (kebab-case)
    config: dict[str, Any]  # the message's Flower config (kebab-case): round, schedule, wire format...
    arrays: dict[str, bytes] = field(default_factory=dict)  # the received weights as .npy bytes, not parsed
    # Under simulation, virtual nodes that share a dataset draw different batches (zk0.node.client_app).
    batch_seed_offset: int = 0

    @property
    def server_round(self) -> int:
        """The experiment round the message belongs to (0 for a statistics query, which has none)."""
        return int(self.config.get("server-round", 0))

    @property
    def batch_seed(self) -> int:
        """The seed of a train request's batches and noise: one per round, and per virtual node under simulation."""
        return int(self.config["seed"]) + 1000 * self.server_round + 1_000_003 * self.batch_seed_offset


@dataclass(frozen=True)
class NodeReply:
    """What the node sends back: metrics, and for a train request the trained weights in the wire format."""

    metrics: dict[str, float]
    layout: str  # fingerprint of the node's trainable layout, checked by the server
    info: dict[str, Any]  # fps, cameras fed and frames of the node's dataset, for the round records
    arrays: dict[str, Any] | None = None  # packed wire arrays (numpy) of a train reply; None otherwise
    eval_metrics: dict[str, float] | None = None  # a train request's held-out metrics of the received weights
    stats: str | None = None  # a stats request's normalisation statistics (JSON)


@dataclass(frozen=True)
class WorkerFailure:
    """The worker's answer to a request that raised: the exception's type and message."""

    error: str


@dataclass(frozen=True)
class WorkerExit:
    """Asks a warm worker to exit: a worker for a newer copy of the app takes its place."""
