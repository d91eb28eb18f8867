"""Camera maps and `zk0 check`: datasets as labs have them, checked against the policy's slots before anything
starts."""

from __future__ import annotations

import json
import shutil

import pytest

from zk0.cameras import CameraMap, match_cameras, parse_camera_map, suggest_map
from zk0.check import PolicyLayout, check_dataset, policy_layout, table
from zk0.settings import NodeSettings, SettingsError

SLOTS = [f"observation.images.camera{i}" for i in (1, 2, 3)]
POLICY = PolicyLayout("smolvla", SLOTS, 6, 6)


def test_camera_maps_accept_short_and_full_names_and_refuse_bad_ones():
    assert parse_camera_map("top=camera1, observation.images.wrist=observation.images.camera2") == {
        "observation.images.top": "observation.images.camera1",
        "observation.images.wrist": "observation.images.camera2",
    }
    for bad, why in [("top", "DATASET_CAMERA=POLICY_SLOT"), ("top=camera1,top=camera2", "twice"),
                     ("top=camera1,wrist=camera1", "same slot camera1")]:
        with pytest.raises(ValueError, match=why):
            parse_camera_map(bad)
    # A bad map is a settings error naming the variable, before anything opens a dataset.
    with pytest.raises(SettingsError, match="ZK0_CAMERAS.*DATASET_CAMERA=POLICY_SLOT"):
        NodeSettings.load(dataset="/d", cameras="top:camera1")


def test_matching_and_the_ready_to_paste_suggestion():
    cams = ["observation.images.wrist", "observation.images.top"]
    fed, problems = match_cameras(cams, SLOTS, parse_camera_map("top=camera1,wrist=camera2"))
    assert fed == {"observation.images.wrist": SLOTS[1], "observation.images.top": SLOTS[0]} and not problems
    # Scene cameras first, the wrist camera after them, as LeRobot's SmolVLA examples map them.
    assert suggest_map(cams, SLOTS) == "top=camera1,wrist=camera2"
    assert match_cameras(cams, SLOTS, {})[1] == ["none of its cameras feeds a policy slot"]


def rewrite_info(src, dst, **changes):
    """A copy of a dataset whose meta/info.json says something else (a dataset we did not write)."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "meta" / "info.json").read_text())
    for key, value in changes.items():
        if key == "state_shape":
            info["features"]["observation.state"]["shape"] = value
        else:
            info[key] = value
    (dst / "meta" / "info.json").write_text(json.dumps(info))
    return dst


def test_every_refusal_names_the_setting_the_cameras_and_the_fix(demo, tmp_path):
    node0, node3 = str(demo["datasets"]["node-0"]), str(demo["datasets"]["node-3"])
    unmapped = check_dataset("node-0", node0, "ZK0_NODE_0_DATASET", "ZK0_NODE_0_CAMERAS", None, POLICY)
    assert len(unmapped.problems) == 1 and unmapped.verdict == "FAIL (1)"
    text = unmapped.problems[0]
    assert "ZK0_NODE_0_DATASET=" in text and "dataset cameras: top, wrist" in text
    assert "policy slots: camera1, camera2, camera3" in text
    assert "ZK0_NODE_0_CAMERAS=top=camera1,wrist=camera2" in text  # ready to paste

    lacking = check_dataset("n", node0, "D", "C", CameraMap.parse("top=camera1,left=camera2"), POLICY).problems
    assert "names left, which the dataset lacks" in lacking[0]
    no_slot = check_dataset("n", node0, "D", "C", CameraMap.parse("top=camera1,wrist=camera9"), POLICY).problems
    assert "targets camera9, which the policy has no slot for" in no_slot[0]

    old = rewrite_info(demo["datasets"]["node-0"], tmp_path / "old", codebase_version="v1.6")
    refused = check_dataset("n", str(old), "D", "C", CameraMap.parse("top=camera1"), POLICY).problems
    assert "format v1.6" in refused[0] and "older LeRobot release" in refused[0]
    seven = rewrite_info(demo["datasets"]["node-0"], tmp_path / "seven", state_shape=[7])
    seven_row = check_dataset("n", str(seven), "D", "C", CameraMap.parse("top=camera1"), POLICY)
    assert "state has 7 values, the policy expects 6" in seven_row.problems[0]
    held = check_dataset("n", node0, "D", "C", CameraMap.parse("top=camera1"), POLICY, heldout=6,
                         heldout_setting="ZK0_NODE_0_HELDOUT_EPISODES")
    assert "holding out 6 of its 6 episodes" in held.problems[0] and "ZK0_NODE_0_HELDOUT_EPISODES" in held.problems[0]

    v21 = check_dataset("node-3", node3, "D", "C", CameraMap.parse(demo["cameras"]["node-3"]), POLICY)
    assert v21.version == "v2.1" and not v21.problems and v21.verdict == "ok, converted on open"
    one = check_dataset("node-2", str(demo["datasets"]["node-2"]), "D", "C", CameraMap.parse("front=camera1"), POLICY)
    assert one.fps == 15 and one.fed == {"observation.images.front": SLOTS[0]}
    assert "front->camera1" in table([one, v21]) and "up->camera1, side->camera2" in table([one, v21])


def test_policy_layout_is_read_from_the_saved_config_and_known_offline_for_smolvla_base(demo):
    layout, problem = policy_layout(str(demo["base-policy"]))
    assert problem is None and layout.slots == SLOTS and (layout.state_dim, layout.action_dim) == (6, 6)
    known, _ = policy_layout("lerobot/smolvla_base")  # HF_HUB_OFFLINE: the Hub is out of reach in tests
    assert known.slots == SLOTS
    missing, problem = policy_layout("/nowhere/policy")
    assert missing is None and "ZK0_BASE_POLICY=/nowhere/policy: no saved policy there" in problem


def test_the_cli_and_every_check_answer_without_the_training_stack():
    """`zk0 --help`, `zk0 check` and every refusal import neither torch, LeRobot nor Flower."""
    import subprocess
    import sys

    code = ("import sys, zk0.cli, zk0.deploy.local, zk0.check, zk0.deploy.preflight, zk0.deploy.flwr_cli, "
            "zk0.deploy.submit, zk0.deploy.supernode; "
            "print(sorted({'torch', 'lerobot', 'flwr', 'transformers'} & {m.split('.')[0] for m in sys.modules}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_a_home_relative_path_names_the_same_folder_for_every_command(demo, tmp_path, monkeypatch):
    """`~/policy` and `~/so100` pass `zk0 check` and reach the server, the nodes and the model card as the same
    folders: each command decides "local folder or Hub id" by one rule (zk0.check.local_path)."""
    from zk0.check import local_path
    from zk0.data import resolve_dataset
    from zk0.deploy.preflight import preflight
    from zk0.server.publish import _is_hub_id

    home = tmp_path / "home"
    shutil.copytree(demo["base-policy"], home / "policy")
    shutil.copytree(demo["datasets"]["node-0"], home / "so100")
    monkeypatch.setenv("HOME", str(home))
    env_file = tmp_path / "home.env"
    env_file.write_text(f"ZK0_BASE_POLICY=~/policy\nZK0_NODE_0_DATASET=~/so100\nZK0_NODE_0_BASE_POLICY=~/policy\n"
                        f"ZK0_NODE_0_CAMERAS={demo['cameras']['node-0']}\nZK0_EVAL_DATASET=~/so100\n"
                        f"ZK0_EVAL_CAMERAS={demo['cameras']['node-0']}\n")
    found = preflight(env_file, echo=lambda line: None)  # zk0 check, zk0 local
    assert (found.settings.base_policy, found.settings.eval_dataset) == (str(home / "policy"), str(home / "so100"))
    assert (found.nodes[0].dataset, found.nodes[0].base_policy) == (str(home / "so100"), str(home / "policy"))
    assert preflight(env_file, "server", echo=lambda line: None).settings.base_policy == str(home / "policy")
    (node,) = preflight(env_file, "node", 0, echo=lambda line: None).nodes  # zk0 supernode --index 0
    assert (node.dataset, node.base_policy) == (str(home / "so100"), str(home / "policy"))
    # The node's own reading of a spec and the model card's agree with the check.
    assert local_path("~/so100") == home / "so100" and resolve_dataset("~/so100", tmp_path / "cache")[1] is not None
    assert not _is_hub_id("~/policy") and _is_hub_id("lerobot/smolvla_base")
    assert local_path("lerobot/smolvla_base") is None
