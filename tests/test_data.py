"""Episode splits and partitions: held-out episodes never reach training."""

import pytest

from zk0.data import DatasetError, partition_episodes, split_episodes


def test_split_never_overlaps_and_covers_everything():
    episodes = list(range(20))
    train, heldout = split_episodes(episodes, 4, seed=3)
    assert len(heldout) == 4 and not set(train) & set(heldout)
    assert sorted(train + heldout) == episodes
    assert split_episodes(episodes, 4, seed=3) == (train, heldout)
    assert split_episodes(episodes, 4, seed=4)[1] != heldout


def test_split_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(DatasetError, match="nothing to train on.*ZK0_HELDOUT_EPISODES"):
        split_episodes([0, 1, 2], 3, seed=0, spec="/data/tiny")


def test_partitions_are_disjoint_and_complete():
    episodes = list(range(17))
    parts = [partition_episodes(episodes, i, 4) for i in range(4)]
    assert sorted(sum(parts, [])) == episodes
    assert all(len(p) in (4, 5) for p in parts)


def test_missing_dataset_path_is_named(tmp_path):
    from zk0.data import open_metadata

    with pytest.raises(DatasetError, match="missing meta/info.json"):
        open_metadata(str(tmp_path / "nope"))
