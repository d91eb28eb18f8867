"""The privacy settings: ZK0_SECURE_AGGREGATION (Flower's SecAgg+, zk0.server.secagg) and what it cannot run with,
and ZK0_DP (differential privacy; its checks are zk0.privacy's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .settings_base import ENV_PREFIX, _Zk0Settings


class SecAggSettings(_Zk0Settings):
    """ServerSettings' SecAgg+ fields (zk0.settings.ServerSettings inherits them)."""

    # Flower's SecAgg+ (zk0.server.secagg): the server reconstructs only the sum of the nodes' masked updates.
    secure_aggregation: Literal["off", "secaggplus"] = Field(
        "off", description="off, or secaggplus: Flower's SecAgg+, the server sees only the sum of the masked updates "
        "(needs ZK0_MAX_NODE_SHARE=1, ZK0_NORM_BOUND_FACTOR=0, mean, fedprox, no int8-delta).",
    )
    secagg_num_shares: float = Field(
        1.0, gt=0, le=1, description="SecAgg+: share of a round's nodes each node splits its secrets among, in (0, 1].",
    )
    secagg_threshold: float = Field(
        0.5, gt=0, le=1, description="SecAgg+: share of those shares that rebuild a secret (at least 2), in (0, 1]; "
        "lower survives more dropouts, higher needs more colluders to unmask a node.",
    )
    secagg_clipping_range: float = Field(
        8.0, gt=0, description="SecAgg+: each value of a node's update (times its weight / the largest weight) is "
        "clipped to +-this before quantisation to 2^22 steps; quantisation error about 2 x this / 2^22.",
    )


def secagg_problems(s) -> list[str]:
    """Why ZK0_SECURE_AGGREGATION=secaggplus cannot run with the other settings: the server sees only the masked
    sum, so nothing that needs one node's update (screening, capping, robust rules, int8 or 16-bit replies) can run."""
    if s.secure_aggregation == "off":
        return []
    why = "SecAgg+ hides each node's update from the server"
    # setting: (its value, the values that work, why no other can)
    clash = {"max_node_share": (s.max_node_share, (1.0,), "a node's share cannot be capped"),
             "norm_bound_factor": (s.norm_bound_factor, (0.0,), "an update's distance cannot be measured"),
             "aggregation": (s.aggregation, ("mean",), "only the sum is reconstructed"),
             "strategy": (s.strategy, ("fedprox",), "zk0's server optimisers are not wired to SecAgg+'s mean"),
             "wire_format": (s.wire_format, ("fp32", "fp16", "bf16"), "replies travel as SecAgg+'s masked "
                             "fixed-point vectors (int8 would save nothing and add its own error)")}
    problems = [f"{ENV_PREFIX}{name.upper()}={value} with {ENV_PREFIX}SECURE_AGGREGATION=secaggplus: {why} and "
                f"{because}; set {ENV_PREFIX}{name.upper()}={' or '.join(map(str, ok))}"
                for name, (value, ok, because) in clash.items() if value not in ok]
    if s.min_nodes < 2:
        problems.append(f"{ENV_PREFIX}MIN_NODES={s.min_nodes} with {ENV_PREFIX}SECURE_AGGREGATION=secaggplus: SecAgg+ "
                        "needs at least 2 nodes a round (3 or more, or each node can subtract its own update from "
                        "the mean); raise it")
    return problems


class PrivacySettings(SecAggSettings):
    """ServerSettings' privacy fields: SecAgg+ (above) and differential privacy (zk0.privacy, docs/privacy.md)."""

    # Differential privacy (zk0.privacy, zk0.server.privacy, docs/privacy.md): set the noise or the target epsilon.
    dp: Literal["off", "client"] = Field("off", description="off, or client: lab-level DP (nodes clip, server noises).")
    dp_clip_norm: float | None = Field(None, description="ZK0_DP=client: L2 norm each node clips its update to, > 0.")
    dp_noise_multiplier: float | None = Field(None, description="Noise std = this x clip norm / sampled nodes, > 0.")
    dp_target_epsilon: float | None = Field(None, description="Or the epsilon the run may spend (the noise follows).")
    dp_delta: float = Field(1e-5, description="ZK0_DP=client: the delta of (epsilon, delta), in (0, 1).")
