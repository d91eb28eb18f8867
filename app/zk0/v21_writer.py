"""LeRobot's v2.1 dataset layout, written as LeRobot 0.3.x recorded it (the demo's node-3 and the tests)."""

from __future__ import annotations

import json
from pathlib import Path

CHUNK_SIZE = 1000  # episodes per chunk folder in v2.x
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
# The columns LeRobot 0.3.x added to every dataset, as its info.json spelled them.
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# LeRobot 0.3.x's video defaults: AV1 in 4:2:0, a key frame every 2 frames so random access stays cheap.
VIDEO_CODEC, VIDEO_PIX_FMT, VIDEO_OPTIONS = "libsvtav1", "yuv420p", {"g": "2", "crf": "30"}

class V21Writer:
    """Record a dataset in LeRobot's v2.1 layout, file for file as LeRobot 0.3.x wrote it."""

    def __init__(self, root: Path, repo_id: str, fps: int, features: dict, robot_type: str = "so100_follower"):
        self.root, self.repo_id, self.fps = Path(root), repo_id, int(fps)
        features = {key: {**ft, "shape": list(ft["shape"])} for key, ft in features.items()}
        unsupported = [key for key, ft in features.items() if ft["dtype"] != "video" and len(ft["shape"]) != 1]
        unsupported += [key for key, ft in features.items() if ft["dtype"] in ("image", "string")]
        if unsupported:
            raise ValueError(f"V21Writer writes cameras as videos and 1-D vectors only, not {sorted(unsupported)}")
        self.video_keys = [key for key, ft in features.items() if ft["dtype"] == "video"]
        self.info = {
            "codebase_version": "v2.1", "robot_type": robot_type,
            "total_episodes": 0, "total_frames": 0, "total_tasks": 0, "total_videos": 0, "total_chunks": 0,
            "chunks_size": CHUNK_SIZE, "fps": self.fps, "splits": {},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.video_keys else None,
            "features": {**features, **json.loads(json.dumps(INDEX_FEATURES))},
        }
        self.tasks: dict[str, int] = {}
        self._frames: list[dict] = []
        self._keys = set(features)
        self.root.mkdir(parents=True, exist_ok=False)  # like LeRobot: never write into an existing dataset
        _write_json(self.root / "meta/info.json", self.info)

    def add_frame(self, frame: dict) -> None:
        """Buffer one frame of the current episode: every feature plus its "task" string."""
        import numpy as np

        if "task" not in frame or set(frame) - {"task"} != self._keys:
            raise ValueError(f"frame keys {sorted(frame)} != features {sorted(self._keys)} + 'task'")
        self._frames.append({key: value if key == "task" else np.array(value) for key, value in frame.items()})

    def save_episode(self) -> None:
        """Write the buffered episode: its parquet, one mp4 per camera, and its metadata lines."""
        import numpy as np

        if not self._frames:
            raise ValueError("save_episode() needs at least one add_frame() first")
        ep, n = self.info["total_episodes"], len(self._frames)
        tasks = [frame["task"] for frame in self._frames]
        self._add_tasks(tasks)
        columns = self._columns(ep, n, tasks)
        _write_parquet(self.root / DATA_PATH.format(episode_chunk=ep // CHUNK_SIZE, episode_index=ep), columns)
        for key in self.video_keys:
            path = self.root / VIDEO_PATH.format(episode_chunk=ep // CHUNK_SIZE, video_key=key, episode_index=ep)
            columns[key] = np.stack([frame[key] for frame in self._frames])
            _encode_video(columns[key], path, self.fps)
            # LeRobot 0.3 described every video by the first episode's.
            self.info["features"][key].setdefault("info", _video_info(path))
        stats = {key: _feature_stats(values, key in self.video_keys) for key, values in columns.items()}
        self._write_episode_meta(ep, n, list(dict.fromkeys(tasks)), stats)
        self._frames = []

    def finalize(self) -> None:
        """Check nothing is left unsaved (v2.1 files are complete after each save_episode)."""
        if self._frames:
            raise ValueError(f"{len(self._frames)} frames were added but never saved with save_episode()")
        _write_json(self.root / "meta/info.json", self.info)

    def _add_tasks(self, tasks: list[str]) -> None:
        """Give new task strings the next task_index and append them to tasks.jsonl."""
        for task in dict.fromkeys(tasks):
            if task not in self.tasks:
                self.tasks[task] = len(self.tasks)
                _append_jsonl(self.root / "meta/tasks.jsonl", {"task_index": self.tasks[task], "task": task})

    def _columns(self, ep: int, n: int, tasks: list[str]) -> dict:
        """The episode's parquet columns in info.json's feature order."""
        import numpy as np

        start = self.info["total_frames"]
        derived = {
            "timestamp": np.arange(n) / self.fps, "frame_index": np.arange(n), "episode_index": np.full(n, ep),
            "index": np.arange(start, start + n), "task_index": np.array([self.tasks[t] for t in tasks]),
        }
        columns = {}
        for key, ft in self.info["features"].items():
            if ft["dtype"] == "video":
                continue
            values = derived[key] if key in derived else np.stack([frame[key] for frame in self._frames])
            columns[key] = values.astype(ft["dtype"])
        return columns

    def _write_episode_meta(self, ep: int, n: int, tasks: list[str], stats: dict) -> None:
        """Update info.json's totals and append the episode to episodes(.stats).jsonl."""
        self.info.update(
            total_episodes=ep + 1, total_frames=self.info["total_frames"] + n, total_tasks=len(self.tasks),
            total_videos=self.info["total_videos"] + len(self.video_keys),
            total_chunks=max(self.info["total_chunks"], ep // CHUNK_SIZE + 1), splits={"train": f"0:{ep + 1}"},
        )
        _write_json(self.root / "meta/info.json", self.info)
        _append_jsonl(self.root / "meta/episodes.jsonl", {"episode_index": ep, "tasks": tasks, "length": n})
        _append_jsonl(self.root / "meta/episodes_stats.jsonl", {"episode_index": ep, "stats": stats})


def _write_json(path: Path, data: dict) -> None:
    """Write JSON the way LeRobot did (indented, UTF-8 kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False))


def _append_jsonl(path: Path, data: dict) -> None:
    """Append one JSON line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(data, ensure_ascii=False) + "\n")


def _write_parquet(path: Path, columns: dict) -> None:
    """One episode's table: vectors as fixed-size lists, with the `datasets` schema that LeRobot 0.3 embedded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, hf_features = {}, {}
    for key, values in columns.items():
        value = {"dtype": str(values.dtype), "_type": "Value"}
        if values.ndim == 1:
            arrays[key], hf_features[key] = pa.array(values), value
        else:
            arrays[key] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
            hf_features[key] = {"feature": value, "length": values.shape[1], "_type": "Sequence"}
    table = pa.table(arrays).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": hf_features}})}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _encode_video(frames, path: Path, fps: int) -> None:
    """Encode uint8 HxWx3 frames into an mp4 with LeRobot 0.3.x's codec settings."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps, options=VIDEO_OPTIONS)
        stream.pix_fmt, stream.height, stream.width = VIDEO_PIX_FMT, frames.shape[1], frames.shape[2]
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _video_info(path: Path) -> dict:
    """The `info` block LeRobot 0.3.x stored for a video feature, read back from the encoded file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "video.height": stream.height, "video.width": stream.width,
            "video.codec": stream.codec.canonical_name, "video.pix_fmt": stream.pix_fmt,
            "video.is_depth_map": False, "video.fps": int(stream.base_rate),
            "video.channels": 3,  # yuv420p: three planes
            "has_audio": bool(container.streams.audio),
        }


def _feature_stats(values, is_image: bool) -> dict:
    """Episode stats as LeRobot 0.3.x computed them: images on sampled frames, per channel, scaled to [0, 1]."""
    import numpy as np

    if is_image:
        # Its heuristic: every frame up to 100, then n**0.75; frames of 300 px and more strided to ~150.
        n = len(values)
        picks = np.round(np.linspace(0, n - 1, max(min(n, 100), min(int(n**0.75), 10_000)))).astype(int)
        step = max(1, int(max(values.shape[1:3]) / 150)) if max(values.shape[1:3]) >= 300 else 1
        values = values[picks, ::step, ::step].transpose(0, 3, 1, 2)
    axis, keep = ((0, 2, 3), True) if is_image else (0, values.ndim == 1)
    stats = {name: fn(values, axis=axis, keepdims=keep) for name, fn in
             (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std))}
    if is_image:
        stats = {name: value[0] / 255.0 for name, value in stats.items()}  # (3, 1, 1)
    stats["count"] = np.array([len(values)])
    return {name: value.tolist() for name, value in stats.items()}
