"""What the ClientApp asks of a node's worker and what it gets back, as the warm worker's connection pickles them.

Only the standard library is imported: the ClientApp builds these without importing torch or numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..node_settings import NodeSettings

KINDS = ("train", "evaluate", "stats")
# What the node checks in a message's config, once, where the request is built: key -> (type, least allowed value,
# whether that value itself is allowed, the server setting it comes from). Flower's FedProx adds proximal-mu.
CHECKED = {
    "proximal-mu": (float, 0.0, True, "ZK0_PROXIMAL_MU"),
    "personalize-mu": (float, 0.0, True, "ZK0_PERSONALIZE_MU"),
    "learning-rate": (float, 0.0, False, "ZK0_LEARNING_RATE"),
    "local-steps": (int, 1, True, "ZK0_LOCAL_STEPS"),
    "total-steps": (int, 1, True, "ZK0_LOCAL_STEPS x ZK0_NUM_ROUNDS"),
    "batch-size": (int, 1, True, "ZK0_BATCH_SIZE"),
    "eval-batches": (int, 1, True, "ZK0_EVAL_BATCHES"),
    "personalize-steps": (int, 0, True, "ZK0_PERSONALIZE_STEPS"),
    "server-round": (int, 0, True, "Flower's round"),
    "seed": (int, None, True, "ZK0_SEED"),
}


def checked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The message's config with CHECKED's values typed; ValueError naming every bad value and its server setting."""
    typed, problems = dict(config), []
    for key, (kind, least, inclusive, setting) in CHECKED.items():
        if key not in config:
            continue
        value = config[key]
        try:
            number = kind(value)
            if isinstance(value, bool) or (kind is int and number != float(value)) or not math.isfinite(number):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r} is not {'an integer' if kind is int else 'a finite number'} "
                            f"(the server's {setting})")
            continue
        if least is not None and (number < least or (number == least and not inclusive)):
            problems.append(f"{key}={value!r} must be {'>=' if inclusive else '>'} {least} (the server's {setting})")
        typed[key] = number
    if problems:
        raise ValueError("this node refuses the server's message: " + "; ".join(problems))
    return typed


@dataclass(frozen=True)
class NodeRequest:
    """One Flower message for this node: what to do, with which settings and weights."""

    kind: str  # "train", "evaluate" or "stats" (normalisation statistics, before round 1)
    settings: NodeSettings  # this node's settings, parsed once from the SuperNode's Flower node config
    config: dict[str, Any]  # the message's Flower config (kebab-case): round, schedule, wire format... (checked)
    arrays: dict[str, bytes] = field(default_factory=dict)  # the received weights as .npy bytes, not parsed
    # Under simulation, virtual nodes that share a dataset draw different batches (zk0.node.client_app).
    batch_seed_offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "config", checked_config(self.config))

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
