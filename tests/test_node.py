"""A node refuses bad input before training: wrong base policy, unusable datasets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from zk0.data import DatasetError
from zk0.model import frozen_fingerprint, load_policy, trainable_state
from zk0.node.session import BaseMismatchError, open_session, train_on_node
from zk0.settings import NodeSettings
from zk0.train import TrainPlan


def small_dataset(root, *, action_dim: int, with_images: bool) -> str:
    """A one-episode LeRobot dataset with the given action size, with or without a camera."""
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "action": {"dtype": "float32", "shape": (action_dim,), "names": None},
    }
    if with_images:
        features["observation.images.front"] = {"dtype": "image", "shape": (64, 64, 3),
                                                "names": ["height", "width", "channels"]}
    ds = LeRobotDataset.create("local/bad", fps=10, features=features, root=root, use_videos=False)
    for _ in range(3):
        frame = {"observation.state": np.zeros(6, np.float32), "action": np.zeros(action_dim, np.float32), "task": "t"}
        if with_images:
            frame["observation.images.front"] = np.zeros((64, 64, 3), np.uint8)
        ds.add_frame(frame)
    ds.save_episode()
    ds.finalize()
    return str(root)


@pytest.fixture
def base(demo):
    policy = load_policy(str(demo["base-policy"]), "cpu")
    return str(demo["base-policy"]), trainable_state(policy), frozen_fingerprint(policy)


def test_node_with_another_base_policy_refuses(demo, base):
    path, state, _ = base
    node = NodeSettings.load(dataset=str(demo["datasets"]["node-0"]), cameras=demo["cameras"]["node-0"])
    with pytest.raises(BaseMismatchError, match="fingerprint.*same base"):
        open_session(node, path, state, seed=0, fingerprint="0123456789abcdef")
    session = open_session(node, path, state, seed=0, fingerprint=base[2])
    assert session.train_episodes and not set(session.train_episodes) & set(session.heldout_episodes)


def test_dataset_with_wrong_action_size_is_named(tmp_path, base):
    path, state, fp = base
    dataset = small_dataset(tmp_path / "arm5", action_dim=5, with_images=True)
    node = NodeSettings.load(dataset=dataset, cameras="front=camera1")
    with pytest.raises(DatasetError, match=r"action has 5 values, the policy expects 6"):
        open_session(node, path, state, seed=0, fingerprint=fp)


def test_dataset_without_cameras_is_named(tmp_path, base):
    path, state, fp = base
    node = NodeSettings.load(dataset=small_dataset(tmp_path / "blind", action_dim=6, with_images=False))
    with pytest.raises(DatasetError, match="none of its cameras feeds a policy slot.*dataset cameras: none"):
        open_session(node, path, state, seed=0, fingerprint=fp)


def test_heldout_split_that_leaves_nothing_is_named(demo, base):
    path, state, fp = base
    node = NodeSettings.load(dataset=str(demo["datasets"]["node-1"]), cameras=demo["cameras"]["node-1"],
                             heldout_episodes=99)
    with pytest.raises(DatasetError, match="nothing to train on"):
        open_session(node, path, state, seed=0, fingerprint=fp)


def corrupt_copy(dataset: str, target) -> str:
    """A copy of a demo dataset whose top-camera video has garbage written into its middle."""
    root = shutil.copytree(dataset, target)
    video = root / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    data = bytearray(video.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    video.write_bytes(bytes(data))
    return str(root)


@pytest.mark.slow  # re-encodes and reads videos (7 s on a loaded 2-core host)
def test_corrupt_video_frames_are_skipped_and_counted_up_to_a_bound(demo, base, tmp_path):
    path, state, fp = base
    dataset = corrupt_copy(demo["datasets"]["node-0"], tmp_path / "corrupt")
    plan = TrainPlan(steps=12, start_step=0, total_steps=12, learning_rate=1e-4, proximal_mu=0.0)
    # 12 steps of 16 cover all 180 frames once: every unreadable one is met.
    node = NodeSettings.load(dataset=dataset, cameras=demo["cameras"]["node-0"], heldout_episodes=0, max_bad_samples=60)
    _, metrics = train_on_node(open_session(node, path, state, seed=0, fingerprint=fp), plan, 16, seed=0)
    assert 0 < metrics["skipped_samples"] <= 60 and metrics["steps"] == 12
    assert metrics["samples"] == 12 * 16 - metrics["skipped_samples"]
    strict = NodeSettings.load(dataset=dataset, cameras=demo["cameras"]["node-0"], heldout_episodes=0,
                               max_bad_samples=3)
    with pytest.raises(DatasetError, match=r"4 samples could not be read, more than ZK0_MAX_BAD_SAMPLES=3"):
        train_on_node(open_session(strict, path, state, seed=0, fingerprint=fp), plan, 16, seed=0)


def test_a_node_parses_its_settings_and_camera_map_once_per_message_process_and_checks_what_it_is_sent(
    demo, base, tmp_path, monkeypatch
):
    """A ClientApp process (one per Flower message) parses the node config and its camera map once, at the edge;
    the worker and session take them typed. The message's config is checked once too: a bad mu is refused there."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from zk0 import cameras
    from zk0.bench.models import message
    from zk0.node import client_app
    from zk0.wire import PACKED, layout_fingerprint, pack

    parses, builds = [], []
    parse = cameras.parse_camera_map
    monkeypatch.setattr(cameras, "parse_camera_map", lambda text: parses.append(text) or parse(text))
    init = NodeSettings.__init__
    monkeypatch.setattr(NodeSettings, "__init__", lambda self, **kw: builds.append(kw) or init(self, **kw))

    path, state, fingerprint = base
    node = {"dataset": str(demo["datasets"]["node-1"]), "cameras": demo["cameras"]["node-1"], "torch-threads": 1,
            "warm": False, "cache-dir": str(tmp_path / "cache")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    config = {"base-policy": path, "base-fingerprint": fingerprint, "seed": 0, "wire-format": "fp32",
              "local-steps": 2, "total-steps": 4, "batch-size": 4, "learning-rate": 1e-3, "eval-batches": 1,
              "server-round": 1, "proximal-mu": 0.01,
              "weights-layout": layout_fingerprint({k: tuple(v.shape) for k, v in state.items()})}
    query = client_app.query(message(RecordDict({"config": ConfigRecord(config)}), "query"), context)
    assert query.content["node"]["stats"] and (len(parses), len(builds)) == (1, 1)
    arrays = ArrayRecord({PACKED: Array(np.ascontiguousarray(pack(state, "fp32")))})
    trained = client_app.train(message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)})), context)
    assert trained.content["metrics"]["steps"] == 2
    assert parses == [demo["cameras"]["node-1"]] * 2 and len(builds) == 2  # once per message, never in the worker

    bad = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "proximal-mu": -0.5, "batch-size": 0})})
    with pytest.raises(ValueError) as refused:
        client_app.train(message(bad), context)
    assert "proximal-mu=-0.5 must be >= 0.0 (the server's ZK0_PROXIMAL_MU)" in str(refused.value)
    assert "batch-size=0 must be >= 1 (the server's ZK0_BATCH_SIZE)" in str(refused.value)
