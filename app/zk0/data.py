"""LeRobot datasets for zk0: opening, episode-level splits and batch streams."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

from .errors import DatasetError

log = logging.getLogger("zk0")


def resolve_dataset(spec: str, cache_dir: Path | None = None, setting: str = "dataset") -> tuple[str, Path]:
    """(repo id, local LeRobot v3.0 root) of a local folder or Hub id[@revision]; v2.1 is converted once into
    the cache. A Hub dataset is read from the Hub cache (downloaded, or resumed, the first time)."""
    from .formats import ensure_v30
    from .hub import local_path, repo_name, snapshot
    from .settings import default_cache_dir

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (path := local_path(spec)) is not None:
        path = path.resolve()
        if not (path / "meta" / "info.json").is_file():
            raise DatasetError(
                f"dataset {spec!r}: no LeRobot dataset there (missing meta/info.json); "
                "point it at a dataset root, e.g. one written by `zk0 demo`"
            )
        return f"local/{path.name}", ensure_v30(path, cache / "datasets")
    # A Hub snapshot is a folder like any other: v3.0 is opened in place, v2.1 (most of 2025's SO-100 sets)
    # converted once, named after the repo and its commit.
    folder = snapshot(spec, "dataset", setting)
    name = f"{repo_name(spec).replace('/', '--')}-{folder.name[:12]}"
    return repo_name(spec), ensure_v30(folder, cache / "datasets", name=name)


def open_metadata(spec: str, cache_dir: Path | None = None) -> LeRobotDatasetMetadata:
    """Metadata of a local root or Hub dataset, without loading frames."""
    repo_id, root = resolve_dataset(spec, cache_dir)
    return LeRobotDatasetMetadata(repo_id, root=root)


def check_opened(
    spec: str, policy_config, camera_map: str | None, *, role: str, setting: str, cameras_setting: str,
    heldout: int = 0, partitions: int | None = None, heldout_setting: str = "",
):
    """Run zk0 check's dataset checks against the loaded policy; return its DatasetCheck row (cameras fed, ...)."""
    from .check import PolicyLayout, check_dataset, raise_problems

    layout = PolicyLayout.from_features(
        str(policy_config.type), policy_config.input_features, policy_config.output_features
    )
    row = check_dataset(role, spec, setting, cameras_setting, camera_map, layout,
                        heldout=heldout, partitions=partitions, heldout_setting=heldout_setting)
    raise_problems(row.problems, f"dataset {spec!r}")
    for warning in row.warnings:
        log.warning("%s", warning)
    return row


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
    from flwr_datasets.partitioner import IidPartitioner

    from datasets import Dataset

    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_dict({"episode_index": episodes})
    return sorted(partitioner.load_partition(partition_id)["episode_index"])


def open_dataset(
    spec: str, policy_config, *, episodes: list[int] | None = None, video_backend: str = "pyav",
    cache_dir: Path | None = None,
) -> LeRobotDataset:
    """Open a dataset with SmolVLA's action-chunk window (at the dataset's own fps), restricted to `episodes`."""
    repo_id, root = resolve_dataset(spec, cache_dir)
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    return LeRobotDataset(
        repo_id,
        root=root,
        episodes=episodes,
        delta_timestamps=resolve_delta_timestamps(policy_config, meta),
        video_backend=video_backend,
    )


class BadSamples:
    """Samples that could not be read (e.g. corrupt video frames): skipped and counted, up to `limit`."""

    def __init__(self, limit: int = 0, spec: str = ""):
        self.limit, self.spec = limit, spec
        self.indices: set[int] = set()

    @property
    def count(self) -> int:
        return len(self.indices)

    def add(self, index: int, error: str) -> None:
        """Remember a bad sample; past the limit the dataset is unusable."""
        if index in self.indices:
            return
        self.indices.add(index)
        log.warning("dataset %r: skipping sample %d (%d skipped so far): %s", self.spec, index, self.count, error)
        if self.count > self.limit:
            raise DatasetError(
                f"dataset {self.spec!r}: {self.count} samples could not be read, more than ZK0_MAX_BAD_SAMPLES="
                f"{self.limit} (node config 'max-bad-samples'); last error: {error}. Re-download or re-encode "
                "the dataset's videos, or raise the limit"
            )


class _Guarded(torch.utils.data.Dataset):
    """Yields (index, sample, None), or (index, None, error) for a sample that cannot be read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset[index], None
        except Exception as err:  # noqa: BLE001 - a corrupt video raises whatever its decoder raises
            return index, None, f"{type(err).__name__}: {err}"


def _collate_readable(items: list) -> tuple[dict | None, list[tuple[int, str]]]:
    # Runs in DataLoader workers too: the failures travel back with the batch, not through state.
    good = [sample for _, sample, _ in items if sample is not None]
    failed = [(index, error) for index, sample, error in items if sample is None]
    return (torch.utils.data.default_collate(good) if good else None), failed


def batch_stream(
    dataset, batch_size: int, seed: int, num_workers: int = 0, bad: BadSamples | None = None
) -> Iterator[dict]:
    """Endless shuffled batches; each pass reshuffles with a derived seed and leaves out samples known bad."""
    bad = bad if bad is not None else BadSamples(0, getattr(dataset, "repo_id", ""))
    guarded, epoch = _Guarded(dataset), 0
    while True:
        keep = [i for i in range(len(dataset)) if i not in bad.indices]
        if not keep:
            raise DatasetError(f"dataset {bad.spec!r}: no sample can be read")
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(guarded, keep),
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(keep) >= batch_size,
            generator=torch.Generator().manual_seed(seed + epoch),
            num_workers=num_workers,
            collate_fn=_collate_readable,
        )
        for batch, failed in loader:
            for index, error in failed:
                bad.add(index, error)
            if batch is not None:
                yield batch
        epoch += 1


def eval_batches(dataset, batch_size: int, max_batches: int, bad: BadSamples | None = None) -> list[dict]:
    """A fixed, ordered set of batches so every evaluation sees the same frames (unreadable ones left out)."""
    bad = bad if bad is not None else BadSamples(0, getattr(dataset, "repo_id", ""))
    # Evenly spaced frames cover every episode instead of only the first one.
    count = min(len(dataset), batch_size * max_batches)
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
    subset = torch.utils.data.Subset(_Guarded(dataset), indices)
    batches = []
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=_collate_readable)
    for batch, failed in loader:
        for index, error in failed:
            bad.add(index, error)
        if batch is not None:
            batches.append(batch)
    return batches
