"""LeRobot dataset formats: which one a folder holds, and a one-time v2.1 -> v3.0 conversion into a cache."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import DatasetError
from .v21_writer import V21Writer, _write_json

__all__ = ["MARKER", "V21Writer", "codebase_version", "ensure_v30", "is_v21"]

log = logging.getLogger("zk0")

MARKER = "zk0-converted.json"  # written last inside a finished conversion: its presence means "complete"


def codebase_version(root: Path) -> str:
    """The dataset's LeRobot codebase version ("v2.1", "v3.0", ...), or "" when it has no info.json."""
    # v1.x kept its metadata in meta_data/ rather than meta/.
    for rel in ("meta/info.json", "meta_data/info.json"):
        path = Path(root) / rel
        if path.is_file():
            try:
                return str(json.loads(path.read_text()).get("codebase_version", ""))
            except (OSError, ValueError) as err:
                raise DatasetError(f"dataset {root}: cannot read {rel} ({err})") from err
    return ""


def is_v21(root: Path) -> bool:
    """Whether the dataset at root is in LeRobot's v2.1 layout (convertible by ensure_v30)."""
    return codebase_version(root) == "v2.1"


def ensure_v30(root: Path, cache_dir: Path, name: str | None = None) -> Path:
    """The dataset's v3.0 root: root itself when already v3, else its one-time conversion under cache_dir
    (in a folder named after `name`, default the root's own name)."""
    root, cache_dir = Path(root), Path(cache_dir)
    version = codebase_version(root)
    if version.startswith("v3."):
        return root  # LeRobot itself judges v3 minor versions
    if version != "v2.1":
        raise DatasetError(_unsupported(root, version))
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name or root.name}-{_fingerprint(root)}"
    with _locked(cache_dir / f".{target.name}.lock"):
        if (target / MARKER).is_file():
            log.info("dataset %s is LeRobot v2.1: using its v3.0 conversion in %s (converted earlier)", root, target)
            return target
        _convert_into(root, target)
    log.info("dataset %s is LeRobot v2.1: converted once to v3.0 in %s (reused next time)", root, target)
    return target


def _unsupported(root: Path, version: str) -> str:
    """What is wrong with a dataset zk0 cannot convert, and what to do."""
    if not version:
        return (f"dataset {root}: no meta/info.json with a codebase_version, so not a LeRobot dataset root; "
                "point it at the folder that holds meta/, data/ and videos/")
    head = f"dataset {root} is LeRobot {version}; LeRobot 0.6 reads v3.0 and zk0 converts from v2.1 only. "
    to_v21 = ("to v2.1 in a separate environment with LeRobot 0.3.x (pip install 'lerobot==0.3.3'): "
              "`python -m lerobot.datasets.v21.convert_dataset_v20_to_v21 --repo-id=<repo id>`")
    if version == "v2.0":
        return f"{head}Convert it {to_v21}, then zk0 converts it to v3.0 itself"
    if version.startswith("v1."):
        return (head + "Convert it to v2.0 with the v1->v2 converter of an older LeRobot release "
                "(LeRobot 0.3.x: `python -m lerobot.datasets.v2.convert_dataset_v1_to_v2 --repo-id=<repo id> ...`), "
                f"then convert it {to_v21}, then zk0 converts it to v3.0 itself")
    return head + "Re-record it or convert it with the LeRobot release that wrote it"


def _fingerprint(root: Path) -> str:
    """Short hash of where the dataset is and what it holds, so a rewritten dataset converts again."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted((root / "meta").glob("*.json*")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for folder in ("data", "videos"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:8]


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive flock on path: a second process converting the same dataset waits, then reuses."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert_into(root: Path, target: Path) -> None:
    """Convert into a temporary sibling and move it into place whole, so a crash never leaves half a copy."""
    import importlib.metadata

    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # from a crashed run: the lock says none is live
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        _run_converter(root, tmp)
        _write_json(tmp / MARKER, {
            "source": str(root.resolve()), "source_version": "v2.1",
            "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "lerobot": importlib.metadata.version("lerobot"),
        })
        if target.exists():
            shutil.rmtree(target)  # unmarked, hence not a finished conversion
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_converter(root: Path, new_root: Path) -> None:
    """LeRobot's own v2.1 -> v3.0 steps, reading root and writing new_root only (its CLI would work in place)."""
    from lerobot.datasets.utils import DEFAULT_DATA_FILE_SIZE_IN_MB as DATA_MB
    from lerobot.datasets.utils import DEFAULT_VIDEO_FILE_SIZE_IN_MB as VIDEO_MB
    from lerobot.scripts import convert_dataset_v21_to_v30 as conv

    with _quiet(conv):
        conv.convert_info(root, new_root, DATA_MB, VIDEO_MB)
        conv.convert_tasks(root, new_root)
        episodes = conv.convert_data(root, new_root, DATA_MB)
        videos = conv.convert_videos(root, new_root, VIDEO_MB)
        conv.convert_episodes_metadata(root, new_root, episodes, videos)


def _expected_noise(record: logging.LogRecord) -> bool:
    """False for the converter's step-by-step lines and LeRobot's warning that v2.1 info.json has extra fields."""
    return not (record.pathname.endswith("convert_dataset_v21_to_v30.py")
                or str(record.msg).startswith("Unknown fields in DatasetInfo"))


@contextlib.contextmanager
def _quiet(conv):
    """Silence the converter's progress bars and chatter while it runs: zk0 logs one line instead."""
    import types

    import tqdm

    import datasets

    loggers = [logging.getLogger(), logging.getLogger("lerobot.datasets.utils")]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    conv.tqdm = types.SimpleNamespace(tqdm=lambda items, **_: items)
    for logger in loggers:
        logger.addFilter(_expected_noise)
    try:
        yield
    finally:
        conv.tqdm = tqdm  # the real module, not a saved value another thread may have swapped
        for logger in loggers:
            logger.removeFilter(_expected_noise)
        if bars:
            datasets.enable_progress_bars()
