"""Tests for the offline demo assets: tiny backbone, synthetic datasets and base policy."""

import numpy as np
import pytest
import torch
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from safetensors.torch import load_file
from transformers import AutoProcessor

from zk0.cameras import parse_camera_map
from zk0.data import resolve_dataset
from zk0.demo import DEMO_SETS, NODE_TASKS, POLICY_CAMERAS, VIDEO_BACKEND, build_base_policy, write_demo

EPISODES = 6  # as built by the session-wide `demo` fixture in conftest.py
FRAMES = 30


@pytest.fixture
def assets(demo):
    return demo


def open_dataset(path, **kwargs):
    """A demo dataset in plain LeRobot (the v2.1 one through its v3.0 conversion)."""
    _, root = resolve_dataset(str(path), path.parent.parent / "cache")
    return LeRobotDataset(f"local/{path.name}", root=root, video_backend=VIDEO_BACKEND, **kwargs)


def load_policy(path, cameras: str = ""):
    """The policy and its processors, with a camera map given to LeRobot's rename step."""
    policy = SmolVLAPolicy.from_pretrained(str(path))
    rename = {"rename_observations_processor": {"rename_map": parse_camera_map(cameras)}}
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path), preprocessor_overrides=rename)
    return policy, pre, post


def first_batch(policy, path, batch_size=8):
    meta = open_dataset(path).meta
    ds = open_dataset(path, delta_timestamps=resolve_delta_timestamps(policy.config, meta))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    return next(iter(loader))


def test_returns_all_paths(assets):
    assert set(assets["datasets"]) == {"node-0", "node-1", "node-2", "node-3", "server-eval"}
    for path in [assets["vlm"], assets["base-policy"], *assets["datasets"].values()]:
        assert path.is_dir() and path.is_absolute()


def test_tiny_vlm_tokenizer_has_image_tokens(assets):
    tokenizer = AutoProcessor.from_pretrained(assets["vlm"]).tokenizer
    ids = {tokenizer.fake_image_token_id, tokenizer.global_image_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tokenizer("pick the red cube\n")["input_ids"]


@pytest.mark.parametrize("name", ["node-0", "node-1", "node-2", "node-3", "server-eval"])
def test_dataset_format(assets, name):
    ds = open_dataset(assets["datasets"][name])
    features = ds.meta.features
    assert tuple(features["observation.state"]["shape"]) == (6,)
    assert tuple(features["action"]["shape"]) == (6,)
    spec = DEMO_SETS[name]
    # Cameras named as labs name them, never as the policy's slots.
    assert set(ds.meta.camera_keys) == {f"observation.images.{c}" for c in spec.cameras}
    assert not set(ds.meta.camera_keys) & set(POLICY_CAMERAS)
    assert ds.meta.robot_type == "so100_follower" and ds.meta.fps == spec.fps
    episodes = 4 * max(1, EPISODES // 4) if name == "server-eval" else EPISODES  # server: every style
    assert ds.num_episodes == episodes and ds.num_frames == episodes * FRAMES
    frame = ds[FRAMES + 3]
    for key in ds.meta.camera_keys:
        assert frame[key].shape == (3, *spec.image_size)
        assert frame[key].max() > frame[key].min()  # the scene is drawn, not blank


def test_the_demo_looks_like_the_real_thing(assets):
    import json

    versions = {n: json.loads((p / "meta" / "info.json").read_text())["codebase_version"]
                for n, p in assets["datasets"].items()}
    assert versions["node-3"] == "v2.1" and versions["node-0"] == "v3.0"
    assert {DEMO_SETS[n].fps for n in assets["datasets"]} == {15, 30}
    assert min(len(s.cameras) for s in DEMO_SETS.values()) == 1
    config = json.loads((assets["base-policy"] / "config.json").read_text())
    assert sorted(k for k in config["input_features"] if "images" in k) == list(POLICY_CAMERAS)  # smolvla_base's slots
    assert config["normalization_mapping"] == {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}


def test_node_tasks_and_server_mix(assets):
    for node, task in enumerate(NODE_TASKS):
        assert list(open_dataset(assets["datasets"][f"node-{node}"]).meta.tasks.index) == [task]
    assert set(open_dataset(assets["datasets"]["server-eval"]).meta.tasks.index) == set(NODE_TASKS)


def test_state_follows_action(assets):
    frames = open_dataset(assets["datasets"]["node-0"]).hf_dataset.with_format("numpy")[:FRAMES]
    state, action = frames["observation.state"], frames["action"]
    assert np.abs(state[1:] - action[:-1]).max() < 2.0
    assert np.abs(action).max() <= 100.0


def test_nodes_are_heterogeneous(assets):
    means = []
    for node in range(4):
        frames = open_dataset(assets["datasets"][f"node-{node}"]).hf_dataset.with_format("numpy")[:]
        means.append(frames["action"].mean(axis=0))
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).max() > 5.0, (i, j)


def test_base_policy_trains_one_step(assets):
    policy, pre, _ = load_policy(assets["base-policy"], assets["cameras"]["node-1"])
    policy.train()
    batch = first_batch(policy, assets["datasets"]["node-1"])
    loss, _ = policy.forward(pre(batch))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_base_policy_round_trip_is_deterministic(assets, tmp_path):
    rebuilt = build_base_policy(tmp_path / "again", assets["vlm"], seed=0, stats=None)
    original = load_file(assets["base-policy"] / "model.safetensors")
    again = load_file(rebuilt / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)

    outputs = []
    for _ in range(2):
        policy, pre, post = load_policy(assets["base-policy"], assets["cameras"]["server-eval"])
        policy.eval()
        batch = pre(first_batch(policy, assets["datasets"]["server-eval"], batch_size=2))
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(post(policy.predict_action_chunk(batch)))
    assert outputs[0].shape == (2, policy.config.chunk_size, 6)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.slow  # writes the whole demo twice (7 s on a loaded 2-core host)
def test_write_demo_overwrites(tmp_path):
    for _ in range(2):
        paths = write_demo(tmp_path, episodes=4, frames=12, seed=1)
    assert open_dataset(paths["datasets"]["node-2"]).num_episodes == 4
    assert open_dataset(paths["datasets"]["server-eval"]).num_episodes == 4
