"""A TESTING HOOK, not a feature: ZK0_TEST_ATTACK makes one named node hostile, for tests and `zk0 bench attack`.

`ZK0_TEST_ATTACK=KIND[:FACTOR]@NODE[,...]` (e.g. `scale@node-1`, `noise:3@node-2`, `scale@node-1,claim@node-1`):
the node whose name is NODE (`node-<i>` under `zk0 local`, or ZK0_NODE_<i>_NAME) trains its round, then, before
packing its reply, turns it into the attack (several attacks of one node apply in the order given). It only
ever harms the federation of whoever sets it on their own node: a hostile lab could patch zk0's code anyway.
The node logs a warning every round it attacks.

The attacks (FACTOR defaults in brackets), with u = trained - received the honest update:
  scale [100]     sends received + FACTOR x u
  flip [10]       sends received - FACTOR x u (sign-flipped)
  noise [10]      sends received + Gaussian noise with norm FACTOR x |u|
  claim [1e6]     trains honestly but claims FACTOR samples
  replay          sends back the global model it received (the previous round's), untrained: a free rider
  diverge [1000]  trains with the learning rate x FACTOR (weights stay finite; non-finite ones would be refused
                  by the server's screen, a different defence)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np

ENV = "ZK0_TEST_ATTACK"
ATTACKS = {"scale": 100.0, "flip": 10.0, "noise": 10.0, "claim": 1e6, "replay": 0.0, "diverge": 1000.0}
log = logging.getLogger("zk0")


@dataclass(frozen=True)
class Attack:
    """One attack of one node: what it does (`kind`), how strongly (`factor`) and which node does it."""

    kind: str
    factor: float
    node: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.factor:g}@{self.node}"

    def plan(self, plan):
        """The round's training plan (zk0.train.TrainPlan), the learning rate raised when diverging."""
        if self.kind != "diverge":
            return plan
        return replace(plan, learning_rate=plan.learning_rate * self.factor)

    def weights(self, trained: np.ndarray, received: np.ndarray, seed: int) -> np.ndarray:
        """The flat fp32 weights the node sends instead of `trained` (flat fp32, `received` the global model)."""
        update = trained - received
        if self.kind == "scale":
            return received + np.float32(self.factor) * update
        if self.kind == "flip":
            return received - np.float32(self.factor) * update
        if self.kind == "noise":
            noise = np.random.default_rng(seed).standard_normal(update.size).astype(np.float32)
            return received + noise * np.float32(self.factor * np.linalg.norm(update) / np.linalg.norm(noise))
        if self.kind == "replay":
            return received.copy()
        return trained

    def metrics(self, metrics: dict) -> dict:
        """The reply's metrics, with the claimed samples inflated for `claim`."""
        return {**metrics, "num-samples": self.factor} if self.kind == "claim" else metrics


def parse_attack(value: str) -> Attack:
    """`KIND[:FACTOR]@NODE` as an Attack; ValueError naming what is wrong and the variable it came from."""
    head, sep, node = value.partition("@")
    kind, _, factor = head.partition(":")
    problems = []
    if kind not in ATTACKS:
        problems.append(f"unknown attack {kind!r} (choose from {', '.join(ATTACKS)})")
    if not sep or not node.strip():
        problems.append("no node named: append @NODE, the name of the node that attacks (e.g. @node-1)")
    try:
        strength = float(factor) if factor else ATTACKS.get(kind, 0.0)
    except ValueError:
        problems.append(f"factor {factor!r} is not a number")
        strength = 0.0
    if factor and not strength > 0:
        problems.append(f"factor {factor!r} must be positive")
    if problems:
        raise ValueError(f"{ENV}={value!r}: {'; '.join(problems)}. Format KIND[:FACTOR]@NODE, e.g. scale@node-1 "
                         "(a testing hook: unset it for real runs)")
    return Attack(kind, strength, node.strip())


def parse_attacks(value: str) -> list[Attack]:
    """Every comma-separated `KIND[:FACTOR]@NODE` of `value`; ValueError naming every malformed one."""
    attacks, problems = [], []
    for spec in filter(None, (v.strip() for v in value.split(","))):
        try:
            attacks.append(parse_attack(spec))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
    return attacks


def hostile(node_name: str, environ=os.environ) -> list[Attack]:
    """The attacks ZK0_TEST_ATTACK sets for the node named `node_name`; empty: the node is honest."""
    value = environ.get(ENV, "").strip()
    attacks = [a for a in parse_attacks(value) if a.node == node_name] if value else []
    if attacks:
        log.warning("%s: %s=%s: THIS NODE IS ATTACKING THE FEDERATION (%s; a testing hook, unset it for real runs)",
                    node_name, ENV, value, ", ".join(a.kind for a in attacks))
    return attacks
