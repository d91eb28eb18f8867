"""Differential privacy's settings and arithmetic (no Flower here): which ZK0_DP settings can give the guarantee they
name, the (epsilon, delta) of a run and the noise that reaches a target epsilon.

The accountant is Google's dp-accounting RDP accountant, the one Flower's `RdpAccountant` wraps (the server's ledger,
zk0.server.privacy, uses Flower's): every round is one Gaussian release of the sum of the sampled labs' clipped
updates, composed without amplification by sampling, as Flower's own fixed-clipping strategies account.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import ServerSettings

# The largest noise multiplier a target epsilon may call for: beyond it the noise (1000 x the clipping norm, over the
# sampled labs) drowns any update, and the RDP bound itself flattens out (about 0.005 for 3 rounds at delta 1e-5).
MAX_NOISE = 1000.0
DP_FIELDS = ("dp_clip_norm", "dp_noise_multiplier", "dp_target_epsilon")  # unset unless ZK0_DP is on


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` Gaussian releases with this noise multiplier (no amplification)."""
    from dp_accounting import dp_event, rdp

    if rounds == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, rounds: int, delta: float) -> float | None:
    """The smallest noise multiplier (to 0.1%) whose epsilon over `rounds` is at most the target; None when even
    MAX_NOISE is not enough."""
    if epsilon(MAX_NOISE, rounds, delta) > target_epsilon:
        return None
    low, high = 1e-3, MAX_NOISE  # geometric bisection: epsilon falls as the noise grows
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon(mid, rounds, delta) > target_epsilon else (low, mid)
    return high


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def dp_problems(s: ServerSettings) -> list[str]:
    """Every reason the ZK0_DP settings cannot give the guarantee they name, each naming its variable."""
    names = {f: f"ZK0_{f.upper()}" for f in (*DP_FIELDS, "dp_delta")}
    if s.dp == "off":
        return [f"{names[f]}={getattr(s, f)}: not used with ZK0_DP=off; unset it, or set ZK0_DP=client"
                for f in DP_FIELDS if getattr(s, f) is not None]
    problems = []
    if not _positive(s.dp_clip_norm):
        problems.append(f"ZK0_DP_CLIP_NORM={s.dp_clip_norm}: ZK0_DP=client needs the L2 norm each lab clips its "
                        "update to, a positive number (the round updates' typical norm: see docs/privacy.md)")
    noise, target = s.dp_noise_multiplier, s.dp_target_epsilon
    if (noise is None) == (target is None):
        problems.append("ZK0_DP_NOISE_MULTIPLIER and ZK0_DP_TARGET_EPSILON: set exactly one (the noise, or the "
                        f"epsilon the run may spend), got {noise} and {target}")
    if noise is not None and not _positive(noise):
        problems.append(f"ZK0_DP_NOISE_MULTIPLIER={noise}: without noise there is no guarantee; use a number > 0")
    if target is not None and not _positive(target):
        problems.append(f"ZK0_DP_TARGET_EPSILON={target}: must be a number > 0")
    delta_ok = math.isfinite(s.dp_delta) and 0 < s.dp_delta < 1
    if not delta_ok:
        problems.append(f"ZK0_DP_DELTA={s.dp_delta}: must be in (0, 1), and well below 1/labs (default 1e-5)")
    if _positive(target) and delta_ok and noise is None and noise_for(target, s.num_rounds, s.dp_delta) is None:
        floor = epsilon(MAX_NOISE, s.num_rounds, s.dp_delta)
        problems.append(f"ZK0_DP_TARGET_EPSILON={target} is out of reach in ZK0_NUM_ROUNDS={s.num_rounds} rounds at "
                        f"ZK0_DP_DELTA={s.dp_delta}: even noise multiplier {MAX_NOISE:g} spends {floor:.3g}; raise "
                        "the target or run fewer rounds")
    if s.secure_aggregation != "off":
        problems.append(f"ZK0_SECURE_AGGREGATION={s.secure_aggregation} with ZK0_DP=client: not wired together (the "
                        "server checks each arrived update's norm, which SecAgg+ hides); choose one of them")
    if s.aggregation != "mean":
        problems.append(f"ZK0_AGGREGATION={s.aggregation} with ZK0_DP=client: the noise is calibrated to the mean "
                        "of clipped updates (one lab moves it by at most the clip norm over the sampled labs); a "
                        f"{s.aggregation} has another sensitivity; use ZK0_AGGREGATION=mean")
    if s.wire_format in ("fp16", "bf16"):
        problems.append(f"ZK0_WIRE_FORMAT={s.wire_format} with ZK0_DP=client: {s.wire_format} replies carry weights, "
                        "and the update the server reads from two rounded weights carries their rounding, which no "
                        "clipping on the node can bound; use fp32 or int8-delta (the update itself travels)")
    if s.stats == "federated":
        problems.append("ZK0_STATS=federated with ZK0_DP=client: each lab's normalisation statistics (means, "
                        "deviations, minima, maxima of its frames) reach the server exactly before round 1 and ship "
                        "in the model's processors; no noise covers them; use ZK0_STATS=base")
    return problems


def noise_multiplier(s: ServerSettings) -> float:
    """The run's noise multiplier: ZK0_DP_NOISE_MULTIPLIER, or the least that keeps ZK0_DP_TARGET_EPSILON."""
    if s.dp_noise_multiplier is not None:
        return s.dp_noise_multiplier
    found = noise_for(s.dp_target_epsilon, s.num_rounds, s.dp_delta)
    if found is None:  # the settings refuse such a target first
        raise ValueError(f"ZK0_DP_TARGET_EPSILON={s.dp_target_epsilon} is out of reach")
    return found
