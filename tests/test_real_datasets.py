"""Datasets we did not write: foreign camera names, 15-30 fps, v2.1, one camera; refusals before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from federation import run_zk0
from test_check import rewrite_info

NAMES = ("top15", "laptop-phone", "v21")


def foreign_env(path: Path, foreign: dict, base: Path, out: Path, datasets: dict | None = None, **extra) -> Path:
    """An env-file federating the foreign datasets (or `datasets`: name -> (path, camera map))."""
    datasets = datasets or {n: (foreign["datasets"][n], foreign["cameras"][n]) for n in NAMES}
    values = {
        "ZK0_BASE_POLICY": base, "ZK0_OUTPUT_DIR": out, "ZK0_NUM_ROUNDS": 2, "ZK0_LOCAL_STEPS": 15, "ZK0_BATCH_SIZE": 8,
        "ZK0_LEARNING_RATE": 1e-3, "ZK0_MIN_NODES": len(datasets), "ZK0_EVAL_BATCHES": 3, "ZK0_DEVICE": "cpu",
        "ZK0_HELDOUT_EPISODES": 1, "WANDB_MODE": "disabled",
        "ZK0_EVAL_DATASET": foreign["datasets"]["eval"], "ZK0_EVAL_CAMERAS": foreign["cameras"]["eval"],
        **extra,
    }
    for i, (name, (root, cameras)) in enumerate(datasets.items()):
        values.update({f"ZK0_NODE_{i}_DATASET": root, f"ZK0_NODE_{i}_NAME": name, f"ZK0_NODE_{i}_HELDOUT_EPISODES": 1})
        if cameras:
            values[f"ZK0_NODE_{i}_CAMERAS"] = cameras
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.fixture(scope="module")
def foreign_run(foreign, demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foreign-run")
    out = tmp / "out"
    env = foreign_env(tmp / "foreign.env", foreign, demo["base-policy"], out, XDG_CACHE_HOME=tmp / "cache")
    return run_zk0("local", "--env-file", str(env)), out


def test_three_foreign_datasets_federate_and_learn(foreign_run):
    res, out = foreign_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    losses = [r["server_eval"]["policy_loss"] for r in history]
    assert [r["round"] for r in history] == [0, 1, 2] and losses[-1] < losses[0], losses
    for record in history[1:]:
        assert len(record["contributors"]) == 3 and record["excluded"] == {}, record
        clients = {c["name"]: c for c in record["clients"].values()}
        assert set(clients) == set(NAMES)
        # Each lab's data as it is: fps, which camera fed which slot, frames.
        assert (clients["top15"]["fps"], clients["top15"]["cameras"]) == (15, "top->camera1")
        assert clients["v21"]["fps"] == 20 and clients["laptop-phone"]["cameras"] == "laptop->camera1,phone->camera2"
    # The table was printed before anything started; the v2.1 set was converted into the cache once.
    assert "ok, converted on open" in res.stdout and "top->camera1" in res.stdout
    assert "datasets have different fps" in res.stdout


def test_the_merged_statistics_are_the_checkpoints_and_cover_every_nodes_training_frames(foreign_run):
    from safetensors.torch import load_file

    _, out = foreign_run
    merged = json.loads((out / "norm-stats.json").read_text())
    # 4 training episodes of 24 frames on each of three nodes (one held out of five).
    assert merged["action"]["count"] == [3 * 4 * 24]
    saved = load_file(out / "checkpoints" / "round-002" / "policy_preprocessor_step_5_normalizer_processor.safetensors")
    np.testing.assert_allclose(saved["action.mean"].numpy(), merged["action"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(saved["observation.state.std"].numpy(), merged["observation.state"]["std"], rtol=1e-6)


def test_the_checkpoint_predicts_for_a_foreign_frame_in_plain_lerobot(foreign_run, foreign):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    _, out = foreign_run
    ckpt = str(out / "checkpoints" / "round-002")
    policy = SmolVLAPolicy.from_pretrained(ckpt)
    rename = {"observation.images.top": "observation.images.camera1"}  # as lerobot-train --rename_map takes it
    pre, post = make_pre_post_processors(
        policy.config, pretrained_path=ckpt,
        preprocessor_overrides={"rename_observations_processor": {"rename_map": rename}},
    )
    frame = LeRobotDataset("lab/top15", root=foreign["datasets"]["top15"], video_backend="pyav")[10]
    policy.eval()
    with torch.no_grad():
        action = post(policy.select_action(pre(frame)))
    assert action.shape == (1, 6) and torch.isfinite(action).all()


def test_every_problem_is_refused_at_once_before_any_flower_process(foreign, demo, tmp_path):
    base = demo["datasets"]["node-0"]
    broken = {
        "unmapped": (foreign["datasets"]["top15"], ""),
        "lacking": (foreign["datasets"]["laptop-phone"], "laptop=camera1,tablet=camera2"),
        "no-slot": (foreign["datasets"]["laptop-phone"], "laptop=camera1,phone=camera7"),
        "old": (rewrite_info(base, tmp_path / "old", codebase_version="v1.6"), "top=camera1"),
        "seven": (rewrite_info(base, tmp_path / "seven", state_shape=[7]), "top=camera1"),
        "short": (rewrite_info(base, tmp_path / "short", total_episodes=1), "top=camera1"),
    }
    out = tmp_path / "out"
    env_file = foreign_env(tmp_path / "bad.env", foreign, demo["base-policy"], out, broken)
    res = run_zk0("local", "--env-file", str(env_file))
    assert res.returncode == 2, res.stdout + res.stderr
    text = res.stderr
    for expected in [
        "6 problem(s)", "ZK0_NODE_0_CAMERAS=top=camera1", "names tablet, which the dataset lacks",
        "targets camera7, which the policy has no slot for", "format v1.6", "state has 7 values, the policy expects 6",
        "holding out 1 of its 1 episodes leaves nothing to train on; lower ZK0_NODE_5_HELDOUT_EPISODES",
    ]:
        assert expected in text, expected
    assert not (out / "local").exists()  # no SuperLink, no SuperNode, no log folder: nothing started


def test_a_run_in_which_every_node_fails_fails_and_writes_no_checkpoint(foreign, demo, tmp_path):
    datasets = {}
    for name in ("top15", "laptop-phone"):  # they pass the check, then break: their frames are gone
        copy = tmp_path / name
        shutil.copytree(foreign["datasets"][name], copy)
        shutil.rmtree(copy / "data")
        datasets[name] = (copy, foreign["cameras"][name])
    out = tmp_path / "out"
    env = foreign_env(tmp_path / "dead.env", foreign, demo["base-policy"], out, datasets, ZK0_STATS="base",
                      ZK0_NUM_ROUNDS=1)
    res = run_zk0("local", "--env-file", str(env))
    assert res.returncode != 0
    assert "finished:failed" in res.stdout + res.stderr
    assert not any((out / "checkpoints").glob("round-*"))
    record = json.loads((out / "round-001.json").read_text())
    assert record["contributors"] == [] and len(record["excluded"]) == 2
    assert all(why.startswith("error:") for why in record["excluded"].values())


def test_submit_refuses_an_unusable_evaluation_set_before_reaching_for_the_superlink(foreign, demo, tmp_path):
    env = tmp_path / "submit.env"
    env.write_text(f"ZK0_BASE_POLICY={demo['base-policy']}\nZK0_EVAL_DATASET={foreign['datasets']['eval']}\n"
                   f"ZK0_EVAL_CAMERAS=overhead=camera1,wrist=camera2\nZK0_OUTPUT_DIR={tmp_path / 'out'}\n")
    res = run_zk0("submit", "--superlink", "127.0.0.1:1", "--env-file", str(env), "--connect-tries", "1", timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "eval (ZK0_EVAL_DATASET=" in res.stderr and "names wrist, which the dataset lacks" in res.stderr
    assert "dataset cameras: overhead, gripper" in res.stderr
    assert "ZK0_EVAL_CAMERAS=overhead=camera1,gripper=camera2" in res.stderr
    assert "not reachable" not in res.stderr + res.stdout
