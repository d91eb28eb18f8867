"""Offline demo assets: tiny SmolVLM backbone, synthetic SO-100 datasets and a tiny base SmolVLA.

The datasets look like the ones labs have, not like the policy: cameras named as on the Hub (top,
wrist, laptop, phone, front, up, side), one or two cameras, 15 or 30 fps, non-square frames, one in
LeRobot's v2.1 layout. The base policy has lerobot/smolvla_base's layout (cameras camera1..3, 6-dim
state and action, MEAN_STD normalisation), so every demo run maps cameras, converts v2.1 and merges
statistics exactly as a real run does.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.utils.feature_utils import dataset_to_policy_features

from .tiny_vlm import IMAGE_SIZE, TEXT_LAYERS, build_tiny_vlm
from .v21_writer import V21Writer

__all__ = ["build_tiny_vlm", "make_synthetic_dataset", "build_base_policy", "write_demo"]

VIDEO_BACKEND = "pyav"  # torchcodec needs system FFmpeg libraries; PyAV bundles its own
JOINTS = [
    "shoulder_pan.pos",
    "shoulder_lift.pos",
    "elbow_flex.pos",
    "wrist_flex.pos",
    "wrist_roll.pos",
    "gripper.pos",
]
# lerobot/smolvla_base's image slots.
POLICY_CAMERAS = tuple(f"observation.images.camera{i}" for i in (1, 2, 3))
# What a camera shows: the table seen from above (target and end effector) or the arm's joints.
SCENE, ARM = "scene", "arm"


@dataclass(frozen=True)
class DemoSet:
    """How one demo dataset is recorded: its cameras (name -> view), fps, frame size, LeRobot format."""

    cameras: dict
    fps: int = 30
    image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    version: str = "v3.0"

    @property
    def camera_map(self) -> str:
        """The map onto the policy's slots: the scene camera feeds camera1, the arm camera camera2."""
        slot = {SCENE: "camera1", ARM: "camera2"}
        return ",".join(f"{name}={slot[view]}" for name, view in self.cameras.items())


# Names and shapes that real SO-100/SO-101 datasets on the Hub use.
DEMO_SETS = {
    "node-0": DemoSet({"top": SCENE, "wrist": ARM}, fps=30),
    "node-1": DemoSet({"laptop": SCENE, "phone": ARM}, fps=30, image_size=(48, 64)),
    "node-2": DemoSet({"front": SCENE}, fps=15),
    "node-3": DemoSet({"up": SCENE, "side": ARM}, fps=30, version="v2.1"),
    "server-eval": DemoSet({"front": SCENE, "wrist": ARM}, fps=30),
}
NODE_TASKS = ["pick the red cube", "push the block left", "open the gripper", "wave the arm"]
HOME = np.array([0.0, -30.0, 30.0, 0.0, 0.0, 20.0])
CHUNK_SIZE = 10


def _features(image_size: tuple[int, int], cameras) -> dict:
    """LeRobot feature spec in SO-100 follower format, one video feature per camera."""
    vec = {"dtype": "float32", "shape": (len(JOINTS),), "names": list(JOINTS)}
    cam = {"dtype": "video", "shape": (*image_size, 3), "names": ["height", "width", "channels"]}
    cams = {key if key.startswith("observation.") else f"observation.images.{key}": dict(cam) for key in cameras}
    return {"observation.state": dict(vec), "action": dict(vec), **cams}


def _target(latent: np.ndarray) -> np.ndarray:
    """Map the image-visible latent (x, y, colour) in [-1, 1]^3 to a 6-joint target."""
    u, v, g = latent
    return np.array([70 * u, 50 * v, 30 - 40 * v, 10 - 30 * v, 40 * u, 50 + 40 * g])


def _toward(state: np.ndarray, goal: np.ndarray, gain: float, max_step: float = 8.0) -> np.ndarray:
    """Proportional step toward goal, rate-limited like a real servo."""
    return state + np.clip(gain * (goal - state), -max_step, max_step)


def _policy_step(style: int, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Expert action for one style: a deterministic function of state and target."""
    a = _toward(s, t, 0.25)
    if style == 0:  # reach, then close the gripper once the arm has arrived
        near = np.abs(s[:5] - t[:5]).max() < 6
        a[5] = _toward(s[5:], np.array([0.0 if near else 70.0]), 0.4)[0]
    elif style == 1:  # lower onto the target height, then sweep left with a closed gripper
        a[5] = _toward(s[5:], np.zeros(1), 0.4)[0]
        if abs(s[1] - t[1]) < 5:
            a[0] = max(s[0] - 6.0, -90.0)
    elif style == 2:  # slow approach while opening the gripper steadily
        a = _toward(s, t, 0.12)
        a[5] = min(s[5] + 5.0, 95.0)
    elif style == 3:  # circle the wrist around the target: a limit cycle of radius 35
        d = s[3:5] - t[3:5]
        r = max(np.linalg.norm(d), 1e-3)
        c, sn = np.cos(0.5), np.sin(0.5)
        rotated = np.array([c * d[0] - sn * d[1], sn * d[0] + c * d[1]])
        a[3:5] = t[3:5] + rotated * (r + 0.3 * (35 - r)) / r
    else:  # joint by joint: pan first, the rest only once the pan is aligned
        if abs(s[0] - t[0]) > 4:
            a[1:] = s[1:]
    return np.clip(a, -100.0, 100.0)


def _render(
    state: np.ndarray, latent: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Front camera: target square plus end-effector dot; wrist camera: one bar per joint."""
    h, w = size
    front = np.full((h, w, 3), 40, dtype=np.uint8)
    tx, ty = int((latent[0] + 1) / 2 * (w - 10)), int((latent[1] + 1) / 2 * (h - 10))
    front[ty : ty + 10, tx : tx + 10] = (220, int(60 + 80 * (latent[2] + 1)), 40)
    ex = int(np.clip((state[0] / 70 + 1) / 2 * (w - 10) + 3, 0, w - 4))
    ey = int(np.clip((state[1] / 50 + 1) / 2 * (h - 10) + 3, 0, h - 4))
    front[ey : ey + 4, ex : ex + 4] = 255
    wrist = np.full((h, w, 3), 20, dtype=np.uint8)
    bar_w = w // len(JOINTS)
    for j, value in enumerate(state):
        top = int(np.clip((1 - (value + 100) / 200) * h, 0, h - 1))
        wrist[top:, j * bar_w : (j + 1) * bar_w - 1] = (40 * j + 40, 200 - 30 * j, 120)
    return front, wrist


def _episode(style: int, rng: np.random.Generator, frames: int) -> list[tuple[np.ndarray, ...]]:
    """Roll out one episode: (state, action, latent) per frame with state_{t+1} ~= action_t."""
    latent = rng.uniform(-1, 1, size=3)
    target = _target(latent)
    state = HOME + rng.normal(0, 5, size=6)
    steps = []
    for _ in range(frames):
        action = _policy_step(style, state, target)
        steps.append((state.astype(np.float32), action.astype(np.float32), latent))
        state = action + rng.normal(0, 0.2, size=6)  # servo tracking error
    return steps


def _write_dataset(
    root: Path, repo_id: str, plan: list[tuple[int, str]], frames: int, spec: DemoSet, rng: np.random.Generator,
) -> LeRobotDataset | None:
    """Record one episode per (style, task) in plan (LeRobot's writer for v3.0); the v3.0 dataset reopened."""
    # The AV1 encoder logs its whole configuration for every video unless told otherwise.
    os.environ.setdefault("SVT_LOG", "1")
    features = _features(spec.image_size, spec.cameras)
    if spec.version == "v2.1":
        ds = V21Writer(root, repo_id, spec.fps, features, robot_type="so100_follower")
    else:
        ds = LeRobotDataset.create(
            repo_id, spec.fps, features, root=root, robot_type="so100_follower", use_videos=True,
            video_backend=VIDEO_BACKEND,
        )
    for style, task in plan:
        for state, action, latent in _episode(style, rng, frames):
            views = dict(zip((SCENE, ARM), _render(state, latent, spec.image_size), strict=True))
            images = {f"observation.images.{name}": views[view] for name, view in spec.cameras.items()}
            ds.add_frame({"observation.state": state, "action": action, **images, "task": task})
        if spec.version == "v2.1":
            ds.save_episode()
        else:
            # A process pool per episode costs more than two 64x64 encodes, and forking a
            # multi-threaded torch process can deadlock.
            ds.save_episode(parallel_encoding=False)
    ds.finalize()  # without it the parquet footers are missing
    if spec.version == "v2.1":
        return None
    return LeRobotDataset(repo_id, root=root, video_backend=VIDEO_BACKEND)


def make_synthetic_dataset(
    root: Path,
    repo_id: str,
    *,
    task: str,
    style: int,
    num_episodes: int = 8,
    frames_per_episode: int = 40,
    spec: DemoSet = DEMO_SETS["node-0"],
    seed: int = 0,
) -> LeRobotDataset | None:
    """Write a learnable SO-100-style LeRobot dataset whose motion depends on style (None when written as v2.1)."""
    rng = np.random.default_rng([seed, style])
    plan = [(style, task)] * num_episodes
    return _write_dataset(Path(root), repo_id, plan, frames_per_episode, spec, rng)


def write_eval_set(
    root: Path, per_style: int, frames: int, seed: int, spec: DemoSet = DEMO_SETS["server-eval"],
    styles: int = len(NODE_TASKS),
) -> LeRobotDataset | None:
    """Held-out evaluation set mixing the first `styles` node styles, from an unrelated seed."""
    rng = np.random.default_rng([seed, 10_000])
    plan = [(style, task) for style, task in enumerate(NODE_TASKS[:styles]) for _ in range(per_style)]
    return _write_dataset(Path(root), "zk0/demo-server-eval", plan, frames, spec, rng)


def _policy_config(vlm_dir: Path) -> SmolVLAConfig:
    """SmolVLA config with smolvla_base's feature layout and normalisation, sized for the tiny backbone."""
    features = dataset_to_policy_features(_features((IMAGE_SIZE, IMAGE_SIZE), POLICY_CAMERAS))
    return SmolVLAConfig(
        input_features={k: f for k, f in features.items() if k != "action"},
        output_features={"action": features["action"]},
        # Stored as given in the saved config, so it must be absolute to resolve elsewhere.
        vlm_model_name=str(Path(vlm_dir).resolve()),
        load_vlm_weights=False,
        num_vlm_layers=TEXT_LAYERS,
        chunk_size=CHUNK_SIZE,
        n_action_steps=CHUNK_SIZE,
        resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE),
        device="cpu",
        push_to_hub=False,
    )


def build_base_policy(
    out_dir: Path,
    vlm_dir: Path,
    stats_dataset: LeRobotDataset | None = None,
    *,
    seed: int = 0,
    stats: dict | None = None,
) -> Path:
    """Build a seeded tiny SmolVLA and save it with its pre/post processors to out_dir."""
    out_dir = Path(out_dir)
    config = _policy_config(vlm_dir)
    if stats is None and stats_dataset is not None:
        stats = stats_dataset.meta.stats
    # fork_rng keeps the caller's global RNG untouched while making init reproducible.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = SmolVLAPolicy(config)
    policy.save_pretrained(out_dir)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    return out_dir


def write_demo(out: Path, *, episodes: int = 8, frames: int = 40, seed: int = 0) -> dict:
    """Write the offline demo under out: backbone, node and server datasets, base policy."""
    out = Path(out).resolve()
    for owned in ("vlm", "datasets", "base-policy"):
        shutil.rmtree(out / owned, ignore_errors=True)
    paths = {"root": out, "vlm": build_tiny_vlm(out / "vlm"), "datasets": {}, "cameras": {}}
    for node, task in enumerate(NODE_TASKS):
        name = f"node-{node}"
        make_synthetic_dataset(out / "datasets" / name, f"zk0/demo-{name}", task=task, style=node,
                               num_episodes=episodes, frames_per_episode=frames, spec=DEMO_SETS[name], seed=seed)
        paths["datasets"][name] = out / "datasets" / name
    server_root = out / "datasets" / "server-eval"
    server = write_eval_set(server_root, max(1, episodes // 4), frames, seed)
    paths["datasets"]["server-eval"] = server_root
    paths["cameras"] = {name: spec.camera_map for name, spec in DEMO_SETS.items()}
    # Like smolvla_base, whose statistics come from other robots' data, the base policy's statistics are
    # not any node's own: those are merged from the nodes when the federation starts (ZK0_STATS=federated).
    paths["base-policy"] = build_base_policy(out / "base-policy", paths["vlm"], seed=seed, stats=server.meta.stats)
    return paths
