"""Federated normalisation statistics: each node summarises its training frames, the server merges them.

Only these summaries travel (count, mean, std, min, max and LeRobot's quantiles per state and action
dimension), never frames. Merging is LeRobot's own `aggregate_stats`: count-weighted mean and pooled
variance (exact), elementwise min/max (exact), count-weighted mean of the quantiles (approximate:
the true quantile of a union is not a function of the parts' quantiles; SmolVLA normalises with
MEAN_STD, so its training never reads them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The features LeRobot's normaliser scales for SmolVLA (images are IDENTITY).
STATS_FEATURES = ("observation.state", "action")
# The run's merged statistics travel in their own record beside a message's config (STATS_KEY: {"json": ...}),
# the config holding only their digest: Flower logs the whole config, and the JSON runs to thousands of characters.
STATS_KEY = "norm-stats"
DIGEST_KEY = "norm-stats-digest"


def digest(stats: str) -> str:
    """A short hash naming one set of statistics (JSON); "" for none (the base policy's)."""
    import hashlib

    return hashlib.sha256(stats.encode()).hexdigest()[:16] if stats else ""


def training_frames(root: Path, episodes: list[int], keys=STATS_FEATURES) -> dict[str, np.ndarray]:
    """The `keys` columns of the given episodes, read from a v3.0 dataset's parquet files (no video)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(Path(root).glob("data/*/*.parquet"))
    tables = [pq.read_table(f, columns=["episode_index", *keys]) for f in files]
    out: dict[str, list] = {k: [] for k in keys}
    for table in tables:
        table = table.filter(pc.is_in(table["episode_index"], value_set=pa.array(episodes, type=pa.int64())))
        for key in keys:
            out[key].extend(table[key].to_pylist())
    return {k: np.asarray(v, dtype=np.float64).reshape(len(v), -1) for k, v in out.items()}


def compute_stats(frames: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot's per-feature statistics (as its normaliser reads them) of the given frames."""
    from lerobot.datasets.compute_stats import get_feature_stats

    return {key: get_feature_stats(values, axis=0, keepdims=False) for key, values in frames.items()}


def merge_stats(parts: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Merge nodes' statistics as if computed on the union of their frames (see the module docstring)."""
    from lerobot.datasets.compute_stats import aggregate_stats

    return aggregate_stats(parts)


def to_json(stats: dict[str, dict[str, np.ndarray]]) -> str:
    """Statistics as a JSON string (lists of floats), sorted so equal stats give equal strings."""
    return json.dumps({k: {s: np.asarray(v).tolist() for s, v in sorted(d.items())} for k, d in sorted(stats.items())})


def from_json(text: str) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of to_json."""
    return {k: {s: np.asarray(v, dtype=np.float64) for s, v in d.items()} for k, d in json.loads(text).items()}
