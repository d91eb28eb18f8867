"""LeRobot datasets for zk0: opening, episode-level splits and batch streams."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

log = logging.getLogger("zk0")


class DatasetError(ValueError):
    """A dataset cannot be used; the message says which and what to do."""


def _repo_and_root(spec: str) -> tuple[str, Path | None]:
    """A spec that looks like a path is a local root; anything else is a Hub id."""
    path = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) or path.exists():
        if not (path / "meta" / "info.json").is_file():
            raise DatasetError(
                f"dataset {spec!r}: no LeRobot dataset there (missing meta/info.json); "
                "point it at a dataset root, e.g. one written by `zk0 demo`"
            )
        return f"local/{path.resolve().name}", path.resolve()
    return spec, None


def open_metadata(spec: str) -> LeRobotDatasetMetadata:
    """Metadata of a local root or Hub dataset, without loading frames."""
    repo_id, root = _repo_and_root(spec)
    return LeRobotDatasetMetadata(repo_id, root=root)


def check_features(meta: LeRobotDatasetMetadata, policy_config, spec: str) -> None:
    """Fail early when a dataset lacks what the policy reads or writes."""
    features = meta.features
    want_action = tuple(policy_config.output_features["action"].shape)
    got_action = tuple(features.get("action", {}).get("shape", ()))
    if got_action != want_action:
        raise DatasetError(
            f"dataset {spec!r}: action shape {got_action or 'missing'}, the policy expects {want_action}; "
            "use a dataset recorded with the same arm (SO-100/SO-101: 6 joints)"
        )
    images = [k for k in policy_config.image_features if k in features]
    if not images:
        raise DatasetError(
            f"dataset {spec!r}: none of the policy's cameras {sorted(policy_config.image_features)} "
            f"are in the dataset (it has {sorted(k for k in features if 'image' in k) or 'no images'})"
        )


def split_episodes(episodes: list[int], heldout: int, seed: int, spec: str = "") -> tuple[list[int], list[int]]:
    """Split episode ids into (train, held-out) with a seeded shuffle; never overlapping."""
    if heldout >= len(episodes):
        raise DatasetError(
            f"dataset {spec!r}: holding out {heldout} of {len(episodes)} episodes leaves nothing "
            "to train on; lower ZK0_HELDOUT_EPISODES (node config 'heldout-episodes')"
        )
    order = np.random.default_rng(seed).permutation(episodes).tolist()
    return sorted(order[heldout:]), sorted(order[:heldout])


def partition_episodes(episodes: list[int], partition_id: int, num_partitions: int) -> list[int]:
    """This node's share when one dataset is split across nodes, by flwr-datasets' IID partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_dict({"episode_index": episodes})
    return sorted(partitioner.load_partition(partition_id)["episode_index"])


def open_dataset(
    spec: str, policy_config, *, episodes: list[int] | None = None, video_backend: str = "pyav"
) -> LeRobotDataset:
    """Open a dataset with SmolVLA's action-chunk window, restricted to `episodes`."""
    repo_id, root = _repo_and_root(spec)
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    return LeRobotDataset(
        repo_id,
        root=root,
        episodes=episodes,
        delta_timestamps=resolve_delta_timestamps(policy_config, meta),
        video_backend=video_backend,
    )


def batch_stream(dataset, batch_size: int, seed: int, num_workers: int = 0) -> Iterator[dict]:
    """Endless shuffled batches; each pass over the data reshuffles with a derived seed."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) >= batch_size,
            generator=generator,
            num_workers=num_workers,
        )
        yield from loader
        epoch += 1


def eval_batches(dataset, batch_size: int, max_batches: int) -> list[dict]:
    """A fixed, ordered set of batches so every evaluation sees the same frames."""
    # Evenly spaced frames cover every episode instead of only the first one.
    count = min(len(dataset), batch_size * max_batches)
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
    subset = torch.utils.data.Subset(dataset, indices)
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))
