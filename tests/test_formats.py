"""LeRobot v2.1 datasets: written as LeRobot 0.3.x did, refused by LeRobot 0.6, converted once into a cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zk0.errors import DatasetError
from zk0.formats import MARKER, V21Writer, codebase_version, ensure_v30, is_v21

REPO = "lab/node-3"
EPISODES, FRAMES, FPS, SIZE = 3, 20, 30, 32
TASKS = ["pick the cube", "place the cube", "pick the cube"]
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def colour(camera: str, ep: int) -> tuple[int, int, int]:
    """A solid colour per camera and episode, so a decoded frame shows which video it came from."""
    return (200, 40 + 60 * ep, 40) if camera == "up" else (30, 60, 100 + 50 * ep)


def state(ep: int, i: int) -> np.ndarray:
    """The state written at frame i of episode ep (distinct everywhere)."""
    return np.arange(6, dtype=np.float32) + 100 * ep + i + 0.25


def write_v21(root: Path) -> Path:
    """A two-camera SO-100-style dataset in v2.1 layout: 3 episodes of 20 frames, 32x32, 30 fps."""
    vector = {"dtype": "float32", "shape": (6,), "names": JOINTS}
    cameras = {f"observation.images.{cam}": {"dtype": "video", "shape": (SIZE, SIZE, 3),
                                             "names": ["height", "width", "channels"]} for cam in ("up", "side")}
    writer = V21Writer(root, REPO, FPS, {"observation.state": vector, "action": dict(vector), **cameras})
    for ep in range(EPISODES):
        for i in range(FRAMES):
            images = {f"observation.images.{cam}": np.full((SIZE, SIZE, 3), colour(cam, ep), np.uint8)
                      for cam in ("up", "side")}
            writer.add_frame({"observation.state": state(ep, i), "action": -state(ep, i), **images, "task": TASKS[ep]})
        writer.save_episode()
    writer.finalize()
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root with its size, mtime and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def zk0_lines(caplog) -> list[str]:
    """The messages zk0's logger emitted."""
    return [r.getMessage() for r in caplog.records if r.name == "zk0"]


@pytest.fixture(scope="module")
def v21(tmp_path_factory):
    return write_v21(tmp_path_factory.mktemp("v21") / "node-3")


@pytest.fixture(scope="module")
def converted(v21, tmp_path_factory):
    before = snapshot(v21)
    cache = tmp_path_factory.mktemp("cache")
    return {"root": ensure_v30(v21, cache), "cache": cache, "before": before}


@pytest.fixture
def converter():
    from lerobot.scripts import convert_dataset_v21_to_v30

    return convert_dataset_v21_to_v30


def test_writer_lays_out_v21_like_lerobot_03(v21):
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = json.loads((v21 / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["fps"] == FPS and info["robot_type"] == "so100_follower"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (EPISODES, EPISODES * FRAMES, 2)
    assert (info["total_videos"], info["total_chunks"], info["chunks_size"]) == (2 * EPISODES, 1, 1000)
    assert info["splits"] == {"train": "0:3"}
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert info["features"]["index"] == {"dtype": "int64", "shape": [1], "names": None}
    video = info["features"]["observation.images.up"]["info"]
    assert video == {"video.height": SIZE, "video.width": SIZE, "video.codec": "av1", "video.pix_fmt": "yuv420p",
                     "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}
    lines = {name: [json.loads(line) for line in (v21 / "meta" / name).read_text().splitlines()]
             for name in ("episodes.jsonl", "tasks.jsonl", "episodes_stats.jsonl")}
    assert lines["tasks.jsonl"] == [{"task_index": 0, "task": TASKS[0]}, {"task_index": 1, "task": TASKS[1]}]
    assert lines["episodes.jsonl"][1] == {"episode_index": 1, "tasks": [TASKS[1]], "length": FRAMES}
    stats = lines["episodes_stats.jsonl"][2]["stats"]
    assert set(stats) == set(info["features"])
    assert np.array(stats["observation.images.up"]["mean"]).shape == (3, 1, 1)
    assert np.allclose(np.array(stats["observation.images.up"]["mean"]).ravel(), np.array(colour("up", 2)) / 255)
    assert np.allclose(stats["observation.state"]["mean"], np.mean([state(2, i) for i in range(FRAMES)], axis=0))
    assert stats["index"]["min"] == [40] and stats["timestamp"]["count"] == [FRAMES]
    table = pq.read_table(v21 / "data/chunk-000/episode_000001.parquet")
    assert table.schema.names == ["observation.state", "action", "timestamp", "frame_index", "episode_index",
                                  "index", "task_index"]
    assert table.schema.field("observation.state").type == pa.list_(pa.float32(), 6)
    assert table.schema.field("timestamp").type == pa.float32() and table.schema.field("index").type == pa.int64()
    assert table.column("index").to_pylist() == list(range(FRAMES, 2 * FRAMES))
    assert len(list((v21 / "videos/chunk-000").glob("*/episode_*.mp4"))) == 2 * EPISODES


def test_plain_lerobot_refuses_v21(v21):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.datasets.utils import BackwardCompatibilityError

    with pytest.raises(BackwardCompatibilityError):
        LeRobotDatasetMetadata(REPO, root=v21)
    with pytest.raises(BackwardCompatibilityError):
        LeRobotDataset(REPO, root=v21, video_backend="pyav")


def test_converted_dataset_holds_what_was_written(converted):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(REPO, root=converted["root"], video_backend="pyav")
    assert (ds.num_episodes, ds.num_frames, ds.fps) == (EPISODES, EPISODES * FRAMES, FPS)
    expected = np.stack([state(ep, i) for ep in range(EPISODES) for i in range(FRAMES)])
    rows = [ds.hf_dataset[i] for i in range(len(ds))]  # no video decoding
    assert np.array_equal(np.stack([r["observation.state"].numpy() for r in rows]), expected)
    assert np.array_equal(np.stack([r["action"].numpy() for r in rows]), -expected)
    # The last frame of episode 1 and the first of episode 2 sit either side of a seam in the joined videos.
    for idx, ep in ((2 * FRAMES - 1, 1), (2 * FRAMES, 2)):
        item = ds[idx]
        assert item["task"] == TASKS[ep]
        for cam in ("up", "side"):
            image = item[f"observation.images.{cam}"]
            assert image.shape == (3, SIZE, SIZE)
            assert np.allclose(image.mean(dim=(1, 2)).numpy(), np.array(colour(cam, ep)) / 255, atol=0.03)
    assert np.allclose(ds.meta.stats["observation.state"]["mean"], expected.mean(axis=0), atol=1e-4)
    assert np.allclose(ds.meta.stats["action"]["mean"], -expected.mean(axis=0), atol=1e-4)


def test_source_folder_is_untouched(v21, converted):
    assert snapshot(v21) == converted["before"]
    assert converted["root"].parent == converted["cache"] and converted["root"].name.startswith("node-3-")


def test_second_call_reuses_the_conversion(v21, converted, converter, monkeypatch, caplog):
    marker = converted["root"] / MARKER
    mtime = marker.stat().st_mtime_ns
    monkeypatch.setattr(converter, "convert_data", lambda *a, **k: pytest.fail("converted again"))
    caplog.set_level(logging.INFO, logger="zk0")
    assert ensure_v30(v21, converted["cache"]) == converted["root"]
    assert marker.stat().st_mtime_ns == mtime
    assert zk0_lines(caplog) == [f"dataset {v21} is LeRobot v2.1: using its v3.0 conversion in {converted['root']} "
                                 "(converted earlier)"]


def test_conversion_logs_one_line_and_leaves_only_the_finished_copy(v21, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = ensure_v30(v21, tmp_path)
    assert zk0_lines(caplog) == [f"dataset {v21} is LeRobot v2.1: converted once to v3.0 in {out} (reused next time)"]
    assert json.loads((out / MARKER).read_text())["source"] == str(v21.resolve())
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [out.name]
    assert codebase_version(out) == "v3.0"


def test_crashed_conversion_leaves_nothing_to_reuse(v21, tmp_path, converter, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(converter, "convert_videos", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_v30(v21, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    monkeypatch.undo()
    assert (ensure_v30(v21, tmp_path) / MARKER).is_file()


def test_concurrent_callers_convert_once(v21, tmp_path, converter, monkeypatch):
    calls, real = [], converter.convert_data

    def slow_convert_data(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # widen the window in which a second caller could start its own conversion
        return real(*args, **kwargs)

    monkeypatch.setattr(converter, "convert_data", slow_convert_data)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_v30(v21, tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1] and len(calls) == 1


def test_rewritten_dataset_converts_again(v21, tmp_path):
    copy = tmp_path / "node-3"
    shutil.copytree(v21, copy)
    first = ensure_v30(copy, tmp_path / "cache")
    info = copy / "meta/info.json"
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))
    second = ensure_v30(copy, tmp_path / "cache")
    assert second != first and (first / MARKER).is_file() and (second / MARKER).is_file()


def test_v30_dataset_is_used_where_it_is(converted, v21, tmp_path):
    assert ensure_v30(converted["root"], tmp_path / "cache") == converted["root"]
    assert not (tmp_path / "cache").exists()
    assert is_v21(v21) and not is_v21(converted["root"])


@pytest.mark.parametrize(("folder", "version", "hint"), [
    ("meta", "v2.0", "convert_dataset_v20_to_v21"),
    ("meta", "v1.6", "convert_dataset_v1_to_v2"),
    ("meta_data", "v1.6", "convert_dataset_v1_to_v2"),  # where v1.x kept its info.json
])
def test_older_versions_are_refused_with_what_to_do(tmp_path, folder, version, hint):
    root = tmp_path / "old-set"
    (root / folder).mkdir(parents=True)
    (root / folder / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 30}))
    with pytest.raises(DatasetError) as err:
        ensure_v30(root, tmp_path / "cache")
    assert str(root) in str(err.value) and version in str(err.value) and hint in str(err.value)


def test_folder_without_info_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}.*meta/info.json"):
        ensure_v30(tmp_path, tmp_path / "cache")


def test_module_imports_cheaply():
    code = "import sys, zk0.formats; print(sorted({'numpy', 'pandas', 'lerobot', 'av', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
