"""Where frozen image features live: one memory-mapped array per cache key, with a bitmap of what is filled."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("zk0")

FORMAT = 1  # bump when the layout or what goes into a key changes: older folders then never match
# numpy has no bfloat16: its bits are stored as int16 and viewed back, so nothing is rounded on the way.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def cache_key(parts: dict) -> str:
    """A short hash of everything the features depend on (weights, files, cameras, preprocessing)."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def dataset_stamp(root: Path) -> list:
    """Name, size and modification time of every file of a dataset: a rewritten file changes the key."""
    root = Path(root)
    files = sorted(f for sub in ("meta", "data", "videos", "images") for f in (root / sub).rglob("*") if f.is_file())
    return [str(root.resolve()), *[(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _disk_bytes(folder: Path) -> int:
    """Bytes a folder really occupies: its arrays are sparse, so sizes overstate them."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def make_room(root: Path, keep: str, needed: int, max_bytes: int) -> None:
    """Delete the least recently used other keys' folders until `needed` more bytes fit under `max_bytes`."""
    if not root.is_dir():
        return
    others = sorted((p for p in root.iterdir() if p.is_dir() and p.name != keep), key=lambda p: p.stat().st_mtime)
    used = sum(_disk_bytes(p) for p in others)
    while others and used + needed > max_bytes:
        oldest = others.pop(0)
        used -= _disk_bytes(oldest)
        log.info("feature cache: removing %s (least recently used) to stay under the size bound", oldest)
        shutil.rmtree(oldest, ignore_errors=True)


class FeatureStore:
    """Features of (frame, slot) as one array [frames, slots, tokens, dim] and a filled bitmap [frames, slots].

    On disk both are .npy files opened memory-mapped: the values file is sparse, so only filled frames
    take space, and several processes (virtual nodes sharing a dataset) may fill it at once, since
    they write identical values and set a frame's flag only after its values are flushed.
    """

    def __init__(self, folder: Path | None, frames: int, slots: int, tokens: int, dim: int, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        shape, np_dtype = (frames, slots, tokens, dim), _NUMPY[dtype]
        if folder is None:
            self.values, self.filled = np.zeros(shape, np_dtype), np.zeros((frames, slots), bool)
            return
        if not (folder / "filled.npy").is_file():
            self._create(folder, shape, np_dtype)
        self.values = np.load(folder / "values.npy", mmap_mode="r+")
        self.filled = np.load(folder / "filled.npy", mmap_mode="r+")
        if self.values.shape != shape or self.values.dtype != np_dtype:
            raise ValueError(f"feature cache {folder}: holds {self.values.shape} {self.values.dtype}, expected {shape}")
        os.utime(folder)  # the eviction order is least recently used

    @staticmethod
    def _create(folder: Path, shape: tuple, np_dtype) -> None:
        # Built aside and renamed into place: a process that finds the folder finds it complete.
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(staging / "values.npy", mode="w+", dtype=np_dtype, shape=shape).flush()
        np.lib.format.open_memmap(staging / "filled.npy", mode="w+", dtype=bool, shape=shape[:2]).flush()
        try:
            os.replace(staging, folder)
        except OSError:  # another process created it first
            shutil.rmtree(staging, ignore_errors=True)

    @property
    def bytes_per_item(self) -> int:
        """Bytes of one (frame, slot): tokens x dim x itemsize."""
        return int(np.prod(self.values.shape[2:])) * self.values.itemsize

    def missing(self, frames: np.ndarray) -> np.ndarray:
        """Which of `frames` lack a feature in any slot."""
        return ~self.filled[frames].all(axis=1)

    def put(self, frames: np.ndarray, slot: int, features: torch.Tensor) -> None:
        """Store features [len(frames), tokens, dim] of one slot."""
        array = features.detach().to("cpu", self.dtype).contiguous()
        self.values[frames, slot] = (array.view(torch.int16) if self.dtype == torch.bfloat16 else array).numpy()
        if self.folder is not None:
            self.values.flush()  # values before flags: a crash never leaves a flag on unwritten values
        self.filled[frames, slot] = True

    def flush(self) -> None:
        """Write the flags out (values are flushed as they are put)."""
        if self.folder is not None:
            self.filled.flush()

    def get(self, frames: np.ndarray, slot: int) -> torch.Tensor:
        """Features [len(frames), tokens, dim] of one slot, as a new CPU tensor."""
        array = torch.from_numpy(np.ascontiguousarray(self.values[frames, slot]))
        return array.view(torch.bfloat16) if self.dtype == torch.bfloat16 else array


def open_store(root: Path | None, key: str, shape: tuple, dtype: torch.dtype, max_bytes: int) -> FeatureStore | str:
    """The store for `key` (in RAM when `root` is None), or why it cannot have one (it would not fit)."""
    frames, slots, tokens, dim = shape
    needed = frames * slots * tokens * dim * torch.empty((), dtype=dtype).element_size()
    if needed > max_bytes:
        return (f"its {frames} frames x {slots} cameras need {needed / 2**30:.2f} GiB, more than "
                f"ZK0_FEATURE_CACHE_MAX_GB={max_bytes / 2**30:g} (node config 'feature-cache-max-gb'); "
                "raise it to use the cache")
    if root is None:
        return FeatureStore(None, *shape, dtype)
    root = Path(root)
    make_room(root, key, needed, max_bytes)
    started = time.perf_counter()
    store = FeatureStore(root / key, *shape, dtype)
    log.debug("feature cache %s opened in %.2f s", root / key, time.perf_counter() - started)
    return store
