"""Bounded influence: what one node's reply may weigh in a round's aggregation (no Flower here).

Three limits, each recorded when it bites: a node's claimed samples are clipped to what one round can draw
(ZK0_LOCAL_STEPS x ZK0_BATCH_SIZE); no node's share of the weights exceeds ZK0_MAX_NODE_SHARE (water-filling:
the excess goes to the others in proportion to their weights); an update much further from the round's global
model than the round's median update is scaled back to ZK0_NORM_BOUND_FACTOR x that median (Sun et al. 2019's
norm bounding, with the bound taken from the round itself since updates shrink as training goes on).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..wire import DELTA, DELTA_BLOCK, PACKED, SCALES, aggregate, aggregate_deltas, dequantize, unpack, views

__all__ = ["Limits", "cap_shares", "decode", "dequantize", "update_norm", "weighted_mean"]
MIN_FOR_NORM_BOUND = 3  # with two updates there is no majority to say which one is far off


def cap_shares(weights: Sequence[float], max_share: float) -> np.ndarray:
    """Each weight's share of the total, none above `max_share`: capped shares are fixed at the cap and the rest
    shared out again in proportion until no share exceeds it. Where the cap cannot hold for every node (fewer
    than 1/max_share nodes with weight), the nodes with weight share equally."""
    w = np.asarray(weights, dtype=np.float64)
    positive = w > 0
    if not positive.any():
        raise ValueError(f"update weights {list(weights)}: none is positive")
    if positive.sum() * max_share <= 1:
        return positive / positive.sum()
    capped = np.zeros(len(w), dtype=bool)
    while True:
        rest = np.where(capped, 0.0, w)
        shares = np.where(capped, max_share, (1 - max_share * capped.sum()) * rest / rest.sum())
        over = shares > max_share * (1 + 1e-12)
        if not over.any():
            return shares
        capped |= over


@dataclass
class Limits:
    """What a node may weigh in a round; None (or 0 for the factor) switches a limit off."""

    max_share: float | None = None  # ZK0_MAX_NODE_SHARE
    max_samples: int | None = None  # ZK0_LOCAL_STEPS x ZK0_BATCH_SIZE: the most samples one round can train on
    norm_factor: float = 0.0  # ZK0_NORM_BOUND_FACTOR
    # Training frames each node (by name) counted in its normalisation statistics before round 1: what the
    # records show beside a clipped claim.
    node_frames: dict[str, int] = field(default_factory=dict)

    def weigh(self, names: Sequence[str], claims: Sequence[float]) -> tuple[list[float], dict[int, str]]:
        """Aggregation weights for the claimed samples, and why each changed one did (by position). Unchanged
        claims come back as they are, so a round where no limit bites aggregates exactly as before."""
        weights, notes = [float(c) for c in claims], {}
        if self.max_samples is not None:
            for i, claim in enumerate(weights):
                if claim > self.max_samples:
                    frames = self.node_frames.get(names[i])
                    seen = f", {frames} training frames in its statistics" if frames is not None else ""
                    notes[i] = (f"claimed {claim:g} samples, one round draws at most ZK0_LOCAL_STEPS x "
                                f"ZK0_BATCH_SIZE = {self.max_samples}{seen}: weighted as {self.max_samples}")
                    weights[i] = float(self.max_samples)
        if self.max_share is None or len(weights) < 2 or sum(weights) <= 0:
            return weights, notes
        shares = cap_shares(weights, self.max_share)
        before = np.asarray(weights) / sum(weights)
        changed = [i for i in range(len(weights)) if before[i] > shares[i] * (1 + 1e-9)]
        for i in changed:
            notes[i] = "; ".join(filter(None, [notes.get(i), f"share {before[i]:.3f} capped at ZK0_MAX_NODE_SHARE "
                                                              f"= {self.max_share:g} ({shares[i]:.3f})"]))
        return (list(shares) if changed else weights), notes

    def bound(self, distances: Sequence[float]) -> tuple[list[float], dict[int, str]]:
        """The factor each update is scaled by (1: untouched), and why each scaled one was (by position)."""
        scales = [1.0] * len(distances)
        median = float(np.median(distances)) if distances else 0.0
        if not self.norm_factor or len(distances) < MIN_FOR_NORM_BOUND or not median > 0:
            return scales, {}
        limit, notes = self.norm_factor * median, {}
        for i, dist in enumerate(distances):
            if dist > limit:
                scales[i] = limit / dist
                notes[i] = (f"update L2 norm {dist:.4g} > ZK0_NORM_BOUND_FACTOR x the round's median "
                            f"= {self.norm_factor:g} x {median:.4g}: scaled by {scales[i]:.3g}")
        return scales, notes


def update_norm(arrays: Mapping[str, np.ndarray], base: np.ndarray, fmt: str) -> float:
    """L2 distance of a screened reply's weights from the round's global model `base` (flat fp32)."""
    if fmt == DELTA:  # sum over blocks of scale^2 x sum of the int8 values squared: no fp32 copy needed
        squares = np.square(np.asarray(arrays[PACKED]).reshape(-1, DELTA_BLOCK).astype(np.int32)).sum(axis=1)
        return float(np.sqrt(np.dot(np.square(np.asarray(arrays[SCALES], np.float64)), squares)))
    weights = views({PACKED: arrays[PACKED]}, fmt)[PACKED].float().numpy()
    return float(np.linalg.norm(weights - base))


def decode(arrays: Mapping[str, np.ndarray], base: np.ndarray, fmt: str, scale: float = 1.0) -> np.ndarray:
    """A reply's weights as a flat fp32 array, its update (weights - base) scaled by `scale`."""
    if fmt == DELTA:
        update = dequantize(arrays, base.size)
    else:
        weights = views({PACKED: arrays[PACKED]}, fmt)[PACKED].float().numpy()
        if scale == 1.0:
            return weights
        update = weights - base
    return base + np.float32(scale) * update


class _Decoded(Mapping):
    """A reply's flat fp32 weights under PACKED, decoded when read: wire.aggregate reads one reply at a time."""

    def __init__(self, arrays: Mapping[str, np.ndarray], base: np.ndarray, fmt: str, scale: float):
        self.args = (arrays, base, fmt, scale)

    def __getitem__(self, key: str) -> np.ndarray:
        if key != PACKED:
            raise KeyError(key)
        return decode(*self.args)

    def __iter__(self) -> Iterator[str]:
        return iter((PACKED,))

    def __len__(self) -> int:
        return 1


def weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], scales: Sequence[float],
    base: np.ndarray | None, fmt: str, shapes: Mapping[str, tuple],
) -> Iterator[tuple[str, np.ndarray]]:
    """The weighted fp32 mean of screened replies (int8-delta: their updates added to `base`), tensor by tensor."""
    updates = list(zip(arrays, weights, strict=True))
    if any(s != 1.0 for s in scales):  # an update scaled back: replies decoded to fp32 one at a time, then added
        decoded = [(_Decoded(a, base, fmt, s), w) for (a, w), s in zip(updates, scales, strict=True)]
        yield from unpack(aggregate(decoded, "fp32")[PACKED], shapes).items()
    elif fmt == DELTA:
        yield from unpack(aggregate_deltas(base, updates), shapes).items()
    else:
        # One tensor at a time, each mean handed on (its Array copies it) before the next: the peak is the result
        # plus one tensor, not a flat fp32 mean and the result beside it.
        per_name = [(unpack(a[PACKED], shapes), w) for a, w in updates]
        for name in shapes:
            yield name, aggregate([({name: v[name]}, w) for v, w in per_name], fmt)[name]
