"""Frozen image features: each (frame, camera) decoded and encoded once per experiment, not at every step.

With SmolVLA's `train_expert_only` the image path (video decode, resize with padding, [-1, 1],
SigLIP encoder, connector: what `embed_image` returns) never changes, yet a plain loop recomputes it
at every step of every round. Here a frame's features are computed the first time a batch needs them,
exactly as SmolVLA computes them, and stored (zk0.feature_store); later batches skip the decode and
the encoder. Batches carry the features under FEATURE_PREFIX + slot, a key LeRobot's preprocessor
passes through untouched, and the policy's `prepare_images` / `embed_image` read them from there.
A batch without them takes SmolVLA's own path, and with the cache off nothing here is installed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from .cameras import CameraMap, short_name
from .feature_store import FeatureStore, cache_key, dataset_stamp, open_store

log = logging.getLogger("zk0")

FEATURE_PREFIX = "observation.image_features."  # + policy slot (camera1): features [batch, tokens, dim]
ROW = "zk0_row"  # the sample's row in the (episode-restricted) dataset: where a miss is decoded from
FILL_CHUNK = 32  # frames encoded at once while filling


def smolvla(policy: torch.nn.Module) -> SmolVLAPolicy:
    """The SmolVLA policy itself, also inside a LoRA (PEFT) wrapper."""
    return next(m for m in policy.modules() if isinstance(m, SmolVLAPolicy))


def off_reason(policy: torch.nn.Module, dataset) -> str | None:
    """Why the image path is not frozen and deterministic for this policy and dataset, or None."""
    inner = smolvla(policy)
    config, vlm = inner.config, inner.model.vlm_with_expert.get_vlm_model()
    if not config.train_expert_only or not config.freeze_vision_encoder:
        return "the vision encoder or VLM trains (train_expert_only / freeze_vision_encoder is false)"
    if any(p.requires_grad for m in (vlm.vision_model, vlm.connector) for p in m.parameters()):
        return "parameters of the vision encoder or connector train (LoRA targets in the vision path?)"
    if getattr(dataset, "image_transforms", None) is not None:
        return "the dataset applies image transforms (augmentation), so a frame's image differs at every step"
    if str(getattr(config.normalization_mapping.get("VISUAL"), "value", "IDENTITY")) != "IDENTITY":
        return "the policy normalises images in its preprocessor, which the cached path would skip"
    if config.resize_imgs_with_padding is None:
        return "the policy does not resize images to one size (resize_imgs_with_padding is unset)"
    return None


def install(policy: torch.nn.Module) -> None:
    """Let the policy read features from batches: idempotent, and a no-op for batches that hold images."""
    inner = smolvla(policy)
    if getattr(inner, "_zk0_features", False):
        return
    vlm = inner.model.vlm_with_expert
    original_prepare, original_embed = inner.prepare_images, vlm.embed_image
    empty: dict = {}

    def prepare_images(batch):
        if not any(k.startswith(FEATURE_PREFIX) for k in batch):
            return original_prepare(batch)
        # SmolVLA's order: the slots the batch has, then up to `empty_cameras` blank images, masked out.
        slots = [k for k in inner.config.image_features if FEATURE_PREFIX + short_name(k) in batch]
        images = [batch[FEATURE_PREFIX + short_name(k)] for k in slots]
        size = images[0].shape[0]
        masks = [batch[f"{k}_padding_mask"].bool() if f"{k}_padding_mask" in batch else
                 torch.ones(size, dtype=torch.bool, device=images[0].device) for k in slots]
        for _ in range(min(len(inner.config.image_features) - len(slots), inner.config.empty_cameras)):
            images.append(_blank(empty, original_embed, inner.config, images[0]).expand(size, -1, -1))
            masks.append(torch.zeros_like(masks[0]))
        return images, masks

    inner.prepare_images = prepare_images
    # Features are [batch, tokens, dim]; images reaching embed_image are always [batch, 3, height, width].
    vlm.embed_image = lambda image: image if image.ndim == 3 else original_embed(image)
    inner._zk0_features = True


def _blank(memo: dict, embed, config, like: torch.Tensor) -> torch.Tensor:
    """Features of SmolVLA's blank camera (every pixel -1 after resizing), computed once per device and dtype."""
    key = (like.device, like.dtype)
    if key not in memo:
        width, height = config.resize_imgs_with_padding
        with torch.no_grad():
            memo[key] = embed(torch.full((1, 3, height, width), -1.0, device=like.device)).to(like.dtype)
    return memo[key]


@torch.no_grad()
def encode(policy, slot: str, images: torch.Tensor) -> torch.Tensor:
    """SmolVLA's own image path (prepare_images, embed_image) for images [batch, 3, h, w] in [0, 1] fed to `slot`."""
    from .train import _autocast  # the step's autocast, so features carry the dtype the step would compute

    inner = smolvla(policy)
    device = next(inner.parameters()).device
    with _autocast(device):
        prepared, _ = inner.prepare_images({slot: images.to(device)})
        return inner.model.vlm_with_expert.embed_image(prepared[0])


def with_features(policy, raw: dict, fed: dict[str, str]) -> dict:
    """A decoded batch turned into the cached path's: `fed` cameras' images replaced by their features."""
    batch = {k: v for k, v in raw.items() if k not in fed}
    for camera, slot in fed.items():
        batch[FEATURE_PREFIX + short_name(slot)] = encode(policy, slot, raw[camera]).cpu()
    return batch


class _NoVideo:
    """Stands in for a reader's video query: the frames' features come from the store instead."""

    def __call__(self, query_timestamps, ep_idx):
        return {}


class FramesWithoutVideo(torch.utils.data.Dataset):
    """A LeRobotDataset's samples without their camera images (nothing decoded), each with its row."""

    def __init__(self, dataset, cameras: list[str]):
        self.repo_id, self.root, self.cameras = dataset.repo_id, dataset.root, cameras
        self.reader = copy.copy(dataset._ensure_reader())  # LeRobot 0.6's reader: the sample logic, shared data
        self.reader._query_videos = _NoVideo()

    def __len__(self) -> int:
        return self.reader.num_frames

    def __getitem__(self, row: int) -> dict:
        item = self.reader.get_item(row)
        for camera in self.cameras:  # image (not video) datasets load them with the row: dropped all the same
            item.pop(camera, None)
        return {**item, ROW: row}


class ImageFeatures:
    """One dataset's frozen image features for one policy: the video-less view to batch and what completes batches."""

    def __init__(self, policy, dataset, fed: dict[str, str], store: FeatureStore):
        self.policy, self.dataset, self.store = policy, dataset, store
        self.cameras = list(fed)  # dataset camera keys, in the store's slot order
        self.policy_slots = [fed[c] for c in self.cameras]
        self.slots = [FEATURE_PREFIX + short_name(slot) for slot in self.policy_slots]  # where batches carry them
        self.view = FramesWithoutVideo(dataset, list(dataset.meta.camera_keys))
        self.fill_seconds, self.filled, self.read = 0.0, 0, 0

    def complete(self, batches: Iterable[dict], bad=None) -> Iterator[dict]:
        """The view's batches with every fed camera's features, computing (and storing) the ones still missing."""
        for raw in batches:
            rows = raw.pop(ROW).numpy()
            frames = raw["index"].numpy()
            missing = self.store.missing(frames)
            if missing.any():
                failed = self._fill(rows[missing], frames[missing], bad)
                if failed:
                    keep = [i for i, row in enumerate(rows.tolist()) if row not in failed]
                    if not keep:
                        continue
                    raw, frames = _select(raw, keep), frames[keep]
            for slot, key in enumerate(self.slots):
                raw[key] = self.store.get(frames, slot)
            self.read += len(frames)
            yield raw

    def _fill(self, rows: np.ndarray, frames: np.ndarray, bad) -> set[int]:
        """Decode `rows` as LeRobot does and store their features; returns the rows that could not be read."""
        started, samples, failed = time.perf_counter(), [], set()
        for row in rows.tolist():
            try:
                samples.append(self.dataset[row])
            except Exception as err:  # noqa: BLE001 - a corrupt video raises whatever its decoder raises
                if bad is None:
                    raise
                bad.add(row, f"{type(err).__name__}: {err}")
                failed.add(row)
        pairs = zip(rows.tolist(), frames.tolist(), strict=True)
        done = np.array([frame for row, frame in pairs if row not in failed], dtype=np.int64)
        for start in range(0, len(samples), FILL_CHUNK):
            chunk = samples[start:start + FILL_CHUNK]
            for slot, camera in enumerate(self.cameras):
                images = torch.stack([s[camera] for s in chunk])
                features = encode(self.policy, self.policy_slots[slot], images)
                self.store.put(done[start:start + FILL_CHUNK], slot, features)
        self.store.flush()
        self.fill_seconds += time.perf_counter() - started
        self.filled += len(done)
        return failed

    def report(self) -> dict:
        """Figures since the last report, for a round's metrics: fill time, frames filled and read, bytes per item."""
        figures = {"feature_fill_seconds": self.fill_seconds, "feature_frames_filled": self.filled,
                   "feature_frames_read": self.read, "feature_bytes_per_frame_camera": self.store.bytes_per_item}
        self.fill_seconds, self.filled, self.read = 0.0, 0, 0
        return figures


def _select(batch: dict, keep: list[int]) -> dict:
    """The samples `keep` of a collated batch (tensors and lists alike)."""
    index = torch.tensor(keep)
    return {k: v[index] if torch.is_tensor(v) else [v[i] for i in keep] if isinstance(v, list) else v
            for k, v in batch.items()}


def open_features(
    policy, dataset, fed: dict[str, str], *, mode: str, root: Path | None, max_gb: float, fingerprint: str,
    video_backend: str = "",
) -> ImageFeatures | None:
    """The dataset's feature cache for this policy, or None (one log line says why) when it must stay off.

    `fed`: dataset camera key -> policy slot key, for the cameras that feed a slot; `mode`: disk, memory or off.
    """
    reason = "ZK0_FEATURE_CACHE=off (node config 'feature-cache')" if mode == "off" else off_reason(policy, dataset)
    if reason is None and not fed:
        reason = "no camera of the dataset feeds a policy slot"
    store = None
    if reason is None:
        from importlib.metadata import version

        from .train import _autocast

        inner = smolvla(policy)
        device = next(inner.parameters()).device
        width, height = inner.config.resize_imgs_with_padding
        with torch.no_grad(), _autocast(device):  # one blank frame: the features' tokens, width and dtype
            probe = inner.model.vlm_with_expert.embed_image(torch.full((1, 3, height, width), -1.0, device=device))
        key = cache_key({
            "weights": fingerprint, "dataset": dataset_stamp(dataset.root), "cameras": fed,
            "resize": list(inner.config.resize_imgs_with_padding), "device": device.type, "dtype": str(probe.dtype),
            "video_backend": video_backend, "tolerance_s": dataset.tolerance_s,
            "versions": [version("lerobot"), torch.__version__],
        })
        shape = (dataset.meta.total_frames, len(fed), *probe.shape[1:])
        store = open_store(None if mode == "memory" else root, key, shape, probe.dtype, int(max_gb * 2**30))
        reason = store if isinstance(store, str) else None
    if reason is not None:
        log.info("frozen-feature cache off for %s: %s", getattr(dataset, "repo_id", "the dataset"), reason)
        return None
    install(policy)
    where = "in memory" if store.folder is None else str(store.folder)
    log.info("frozen-feature cache on for %s (%s): %d bytes per frame-camera, %d of %d frames filled",
             dataset.repo_id, where, store.bytes_per_item, int(store.filled.all(axis=1).sum()), shape[0])
    return ImageFeatures(policy, dataset, fed, store)


def precompute(policy, dataset, camera_map: CameraMap | None, batches: list[dict]) -> list[dict]:
    """Fixed batches (the server's evaluation set) with their image features computed once, when the path is frozen."""
    from .cameras import match_cameras

    if (reason := off_reason(policy, dataset)) is not None:
        log.info("evaluation set's features computed at every evaluation: %s", reason)
        return batches
    fed, _ = match_cameras(list(dataset.meta.camera_keys), list(smolvla(policy).config.image_features),
                           camera_map)
    install(policy)
    return [with_features(policy, batch, fed) for batch in batches]
