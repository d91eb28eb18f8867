"""Record each simulated lab's dataset with the scripted expert, in the layout real SO-100/SO-101 datasets have.

Six joint positions in degrees (gripper 0-100) for `observation.state` and `action`, the lab's cameras
under the lab's names, its fps and frame size, a task string per frame, LeRobot v3.0 (or v2.1 where
the lab records in it). Deterministic per seed, and cached by content: a folder whose `zk0-sim.json`
matches what would be written is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..labs import Lab
from . import PIN
from .arm import HOLD_FRAMES, JOINT_NAMES, Expert, SimArm

log = logging.getLogger("zk0")
STAMP = "zk0-sim.json"
RECORDER_VERSION = 1  # bump when what an episode holds changes: every cached dataset is then recorded again


def features(lab: Lab) -> dict:
    """LeRobot features: SO-100 follower joints for state and action, one video per camera."""
    vec = {"dtype": "float32", "shape": (6,), "names": list(JOINT_NAMES)}
    cam = {"dtype": "video", "shape": (*lab.image_size, 3), "names": ["height", "width", "channels"]}
    return {"observation.state": dict(vec), "action": dict(vec),
            **{f"observation.images.{name}": dict(cam) for name in lab.cameras}}


def recording_seed(lab: Lab, seed: int, episode: int) -> int:
    """Episode seeds below EVAL_SEED_BASE (10^6): evaluation never sees a recorded scene."""
    index = int(hashlib.sha256(lab.name.encode()).hexdigest(), 16) % 97
    return (seed * 97 + index) * 1000 + episode


def stamp(lab: Lab, episodes: int, seed: int) -> dict:
    """What a recorded folder was made from; equal stamps mean equal datasets."""
    made = {"lab": asdict(lab), "episodes": episodes, "seed": seed, "recorder": RECORDER_VERSION, "simulator": PIN}
    return json.loads(json.dumps(made))  # as read back from the file: tuples become lists


def expert_episode(arm: SimArm, episode_seed: int) -> tuple[list[dict], bool]:
    """One expert episode: frames (state, images, action) until HOLD_FRAMES after success, or the time limit."""
    obs, _ = arm.reset(seed=episode_seed)
    expert, frames, left = Expert(arm), [], None
    while left is None or left > 0:
        state, images = obs["agent_pos"], obs.get("pixels", {})
        action, (obs, _, success, truncated, _) = expert.step()
        frames.append({"observation.state": state, "action": action,
                       **{f"observation.images.{k}": v for k, v in images.items()}})
        if success and left is None:
            left = HOLD_FRAMES
        elif left is not None:
            left -= 1
        if truncated:
            break
    return frames, left is not None


def record_lab(lab: Lab, root: Path, episodes: int, seed: int = 0, repo_id: str | None = None) -> Path:
    """Write the lab's dataset under root (kept when already recorded from the same stamp)."""
    root = Path(root)
    want = stamp(lab, episodes, seed)
    if (root / STAMP).is_file() and json.loads((root / STAMP).read_text()) == want:
        log.info("%s: recorded already (%s)", lab.name, root)
        return root
    shutil.rmtree(root, ignore_errors=True)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # LeRobot's writer maps every episode through `datasets`, each with a progress bar
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder logs its whole configuration per video otherwise
    writer = _writer(lab, root, repo_id or f"zk0-sim/{lab.name}")
    arm = SimArm(lab)
    try:
        for episode in tqdm(range(episodes), desc=f"recording {lab.name}", unit="episode"):
            frames, ok = expert_episode(arm, recording_seed(lab, seed, episode))
            if not ok:  # the expert never failed on these ranges; a dataset of failures would teach failing
                raise RuntimeError(f"{lab.name}: the scripted expert failed episode {episode}; not recording it")
            for frame in frames:
                writer.add_frame({**frame, "task": lab.instruction})
            writer.save_episode(**({} if lab.version == "v2.1" else {"parallel_encoding": False}))
        writer.finalize()  # without it the parquet footers are missing
    finally:
        arm.close()
    (root / STAMP).write_text(json.dumps(want, indent=2))
    return root


def _writer(lab: Lab, root: Path, repo_id: str):
    if lab.version == "v2.1":
        from ..v21_writer import V21Writer

        return V21Writer(root, repo_id, lab.fps, features(lab), robot_type="so101_follower")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset.create(repo_id, lab.fps, features(lab), root=root, robot_type="so101_follower",
                                 use_videos=True, video_backend="pyav")
