"""Settings of one SuperNode: its data, its split and its device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from .hub import check_spec, local_path
from .settings_base import _camera_map, _Zk0Settings


class NodeSettings(_Zk0Settings):
    """What one SuperNode needs: its data, its split and its device."""

    dataset: str = Field(
        ..., min_length=1, description="This node's LeRobot dataset: local root or Hub id (owner/name[@revision])."
    )
    name: str = Field(
        "", description="Node name in records and WandB; empty = the dataset's name (`zk0 local`: node-<i>)."
    )
    cameras: str | None = Field(
        None, description="Camera map of this node's dataset onto the policy's slots, e.g. top=camera1,wrist=camera2."
    )
    cache_dir: Path | None = Field(
        None, description="Folder for datasets converted to LeRobot v3.0 (default ~/.cache/zk0)."
    )
    heldout_episodes: int = Field(2, ge=0, description="Episodes held out for evaluation, never trained on.")
    partition_id: int | None = Field(
        None, ge=0, description="When one dataset is split across nodes: this node's part (with num-partitions)."
    )
    num_partitions: int | None = Field(
        None, ge=1, description="When one dataset is split across nodes: how many parts (with partition-id)."
    )
    base_policy: str | None = Field(
        None, description="Where this node finds the base policy; unset = the server's ZK0_BASE_POLICY."
    )
    device: str = Field("auto", description="Training device: auto, cpu, cuda or cuda:N.")
    video_backend: Literal["pyav", "torchcodec"] = Field("pyav", description="Video decoder for camera streams.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (unset = torch's default); set when nodes share a host."
    )
    log_every: int = Field(5, ge=1, description="Log training progress every N steps.")
    warm: bool = Field(
        True,
        description="Keep the policy and datasets loaded between messages in a worker process; "
        "false loads them per message.",
    )
    max_bad_samples: int = Field(
        10, ge=0, description="Unreadable samples (e.g. corrupt video frames) a node skips per round before it fails."
    )
    # Frozen-feature cache (zk0.features): with a frozen vision encoder each frame is decoded and encoded once.
    feature_cache: Literal["disk", "memory", "off"] = Field(
        "disk", description="Frozen image features: disk (memory-mapped in feature-cache-dir), memory, or off; "
        "off on its own when the image path trains or is augmented.",
    )
    feature_cache_dir: Path | None = Field(
        None, description="Folder of the feature cache (default <cache dir>/features)."
    )
    feature_cache_max_gb: float = Field(
        20.0,
        gt=0,
        description="Size bound of the feature cache folder in GiB; a dataset that needs more runs uncached.",
    )
    personal_dir: Path | None = Field(
        None, description="Where this node keeps its personalised model (ZK0_PERSONALIZE_STEPS), in LeRobot's format; "
        "default <cache dir>/personal/<name>. It never leaves the node.",
    )
    secagg_keep_dir: Path | None = Field(
        None, description="ZK0_SECURE_AGGREGATION=secaggplus: where this node keeps each update it sends, before "
        "masking (round-NNN.npy, fp32), for its own audit (the server only sees the masked sum); unset = not kept.",
    )

    _cameras = field_validator("cameras")(_camera_map)
    _specs = field_validator("dataset", "base_policy")(check_spec)

    @model_validator(mode="after")
    def _partitions_pair(self) -> Self:
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ValueError("set both partition-id and num-partitions, or neither")
        if self.partition_id is not None and self.partition_id >= self.num_partitions:
            raise ValueError("partition-id must be smaller than num-partitions")
        return self

    @property
    def display_name(self) -> str:
        """The node's name, or its dataset's last path component (a Hub id's without its revision)."""
        spec = self.dataset if local_path(self.dataset) is not None else self.dataset.partition("@")[0]
        return self.name or Path(spec.rstrip("/")).name
