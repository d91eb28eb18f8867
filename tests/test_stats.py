"""Federated normalisation statistics: merged node summaries equal statistics of the union of their frames."""

from __future__ import annotations

import numpy as np
import pytest

from zk0.data import resolve_dataset, split_episodes
from zk0.stats import STATS_FEATURES, compute_stats, from_json, merge_stats, to_json, training_frames


def node_frames(demo, name: str, tmp_path) -> dict[str, np.ndarray]:
    """A node's training frames (held-out episodes left out), from the v3.0 copy when the dataset is v2.1."""
    _, root = resolve_dataset(str(demo["datasets"][name]), tmp_path / "cache")
    train, _ = split_episodes(list(range(6)), 2, seed=0)
    return training_frames(root, train)


def test_merged_statistics_equal_those_of_the_union_of_training_frames(demo, tmp_path):
    parts = [node_frames(demo, f"node-{i}", tmp_path) for i in range(4)]
    # Each node sends only its summary, through JSON as it travels.
    merged = merge_stats([from_json(to_json(compute_stats(frames))) for frames in parts])
    union = compute_stats({key: np.concatenate([p[key] for p in parts]) for key in STATS_FEATURES})
    for key in STATS_FEATURES:
        np.testing.assert_allclose(merged[key]["mean"], union[key]["mean"], rtol=1e-6)
        np.testing.assert_allclose(merged[key]["std"], union[key]["std"], rtol=1e-6)
        np.testing.assert_array_equal(merged[key]["min"], union[key]["min"])
        np.testing.assert_array_equal(merged[key]["max"], union[key]["max"])
        assert int(merged[key]["count"][0]) == sum(len(p[key]) for p in parts)
    # The nodes' data really differ: statistics of any one node are not the union's.
    one = compute_stats(parts[2])["action"]["mean"]
    assert np.abs(one - union["action"]["mean"]).max() > 1.0


def test_held_out_episodes_never_enter_the_statistics(demo, tmp_path):
    _, root = resolve_dataset(str(demo["datasets"]["node-0"]), tmp_path / "cache")
    train, heldout = split_episodes(list(range(6)), 2, seed=0)
    every = training_frames(root, list(range(6)))["action"]
    assert len(training_frames(root, train)["action"]) == len(every) * len(train) // 6
    assert len(training_frames(root, heldout)["action"]) == pytest.approx(len(every) * len(heldout) / 6)
