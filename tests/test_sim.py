"""The SO-101 simulator path: lab datasets recorded by the expert, the success key, closed-loop scores, a federation.

Real MuJoCo, real LeRobot datasets on disk, LeRobot's own rollout, real `zk0 local`; rendering with EGL (Mesa's
software renderer on a CPU host).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco
pytest.importorskip("lerobot_env_so101", reason="the simulator extra (pip install 'zk0[sim]') is not installed")

from federation import run_zk0  # noqa: E402

from zk0.labs import EVAL_SEED_BASE, LABS, parse_labs  # noqa: E402
from zk0.sim.arm import SimArm  # noqa: E402
from zk0.sim.demo import write_sim_demo  # noqa: E402
from zk0.sim.evaluate import eval_seeds, evaluate_lab, wilson  # noqa: E402
from zk0.sim.record import recording_seed  # noqa: E402

SMOKE_LABS = [LABS["lift-top"], LABS["lift-front"]]  # two cameras at 10 fps; one camera at 15 fps


@pytest.fixture(scope="session")
def sim_demo(tmp_path_factory):
    """Two simulated labs, two expert episodes each, the held-out set and the tiny base policy."""
    return write_sim_demo(tmp_path_factory.mktemp("sim"), labs=SMOKE_LABS, episodes=2, seed=0)


class Hold(torch.nn.Module):
    """A policy that does nothing: it asks every joint to stay where it is."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def reset(self):
        pass

    def select_action(self, batch):
        return batch["observation.state"]


def _identity():
    from lerobot.processor import PolicyProcessorPipeline

    return PolicyProcessorPipeline(steps=[])


def _identity_actions():
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    return PolicyProcessorPipeline(steps=[], to_transition=policy_action_to_transition,
                                   to_output=transition_to_policy_action)


def test_recorded_datasets_look_like_lab_datasets(sim_demo):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    for i, lab in enumerate(SMOKE_LABS):
        root = sim_demo["datasets"][f"node-{i}"]
        ds = LeRobotDataset(lab.name, root=root, video_backend="pyav")
        info = json.loads((root / "meta" / "info.json").read_text())
        assert info["codebase_version"] == "v3.0" and info["fps"] == lab.fps and ds.num_episodes == 2
        names = info["features"]["action"]["names"]
        assert names == info["features"]["observation.state"]["names"] and names[-1] == "gripper.pos"
        assert sorted(k for k in info["features"] if k.startswith("observation.images.")) == sorted(
            f"observation.images.{c}" for c in lab.cameras)
        item = ds[len(ds) // 2]
        assert item["task"] == lab.instruction
        # Joints in degrees and the gripper in 0..100, as SO-100/SO-101 followers record them (not radians).
        assert 0 <= float(item["action"][5]) <= 100 and float(item["action"][:5].abs().max()) > 5


def test_recording_is_cached_by_content_and_deterministic(sim_demo, tmp_path):
    from zk0.sim.record import record_lab

    root = sim_demo["datasets"]["node-0"]
    stamp = (root / "zk0-sim.json").stat().st_mtime_ns
    assert record_lab(SMOKE_LABS[0], root, episodes=2, seed=0) == root
    assert (root / "zk0-sim.json").stat().st_mtime_ns == stamp  # kept: nothing recorded again
    again = record_lab(SMOKE_LABS[0], tmp_path / "again", episodes=2, seed=0)
    import pyarrow.parquet as pq

    def actions(r):
        return np.stack(pq.read_table(next((r / "data").rglob("*.parquet"))).column("action").to_pylist())

    np.testing.assert_array_equal(actions(root), actions(again))


def test_evaluation_scenes_are_never_recorded():
    for lab in LABS.values():
        recorded = {recording_seed(lab, seed, e) for seed in range(5) for e in range(200)}
        assert max(recorded) < EVAL_SEED_BASE <= min(eval_seeds(lab, 0, 50))


def test_expert_recording_replayed_through_six_joints_succeeds(sim_demo):
    """The recorded joint targets, played back through the six-joint interface, redo the expert's successes."""
    import pyarrow.parquet as pq

    lab, root = SMOKE_LABS[0], sim_demo["datasets"]["node-0"]
    table = pq.read_table(next((root / "data").rglob("*.parquet"))).to_pydict()
    arm, successes = SimArm(lab, render_cameras=False), 0
    try:
        for episode in sorted(set(table["episode_index"])):
            arm.reset(seed=recording_seed(lab, 0, episode))
            steps = [a for a, e in zip(table["action"], table["episode_index"], strict=True) if e == episode]
            successes += any(arm.step(np.asarray(a))[2] for a in steps)
    finally:
        arm.close()
    assert successes / 2 >= 0.95


def test_doing_nothing_scores_zero_and_the_success_key_is_read(sim_demo):
    """LeRobot's rollout reads `is_success`: a policy that holds still scores 0, a replayed expert scores."""
    from zk0.sim.record import expert_episode

    lab = SMOKE_LABS[0]
    result = evaluate_lab(Hold(), _identity(), _identity_actions(), lab, episodes=2)
    assert result["successes"] == 0 and result["success_rate"] == 0.0 and result["ci_low"] == 0.0

    class Replay(Hold):  # the expert's joint targets for the first evaluation scene, one per call
        def __init__(self, actions):
            super().__init__()
            self.actions = list(actions)

        def select_action(self, batch):
            return torch.as_tensor(self.actions.pop(0) if self.actions else batch["observation.state"][0])[None]

    arm = SimArm(lab, render_cameras=False)
    frames, ok = expert_episode(arm, eval_seeds(lab, 0, 1)[0])
    arm.close()
    assert ok
    scored = evaluate_lab(Replay([f["action"] for f in frames]), _identity(), _identity_actions(), lab, episodes=1)
    assert scored["successes"] == 1 and scored["mean_steps_to_success"] <= len(frames)


def test_wilson_interval():
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)


def test_labs_are_validated_with_every_unknown_named():
    with pytest.raises(ValueError, match="lift-tpo, plase") as err:
        parse_labs("lift-tpo,plase,lift-top")
    assert "lift-front" in str(err.value)


def test_zk0_eval_scores_a_checkpoint(sim_demo, tmp_path):
    out = tmp_path / "eval.json"
    res = run_zk0("eval", "--sim", "lift-front", "--checkpoint", str(sim_demo["base-policy"]), "--episodes", "1",
                  "--videos", "1", "--video-dir", str(tmp_path / "videos"), "--json", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lift-front"]["episodes"] == 1 and "lift-front" in res.stdout
    assert (tmp_path / "videos" / "lift-front-episode-0.mp4").stat().st_size > 0


def test_two_lab_sim_federation_records_success_per_evaluated_round(sim_demo, tmp_path):
    out = tmp_path / "out"
    env = {
        "ZK0_BASE_POLICY": sim_demo["base-policy"], "ZK0_EVAL_DATASET": sim_demo["datasets"]["server-eval"],
        "ZK0_EVAL_CAMERAS": sim_demo["cameras"]["server-eval"], "ZK0_NUM_ROUNDS": 2, "ZK0_LOCAL_STEPS": 3,
        "ZK0_BATCH_SIZE": 4, "ZK0_MIN_NODES": 2, "ZK0_EVAL_BATCHES": 1, "ZK0_HELDOUT_EPISODES": 1,
        "ZK0_SIM_EVAL_EVERY": 2, "ZK0_SIM_LABS": "lift-top,lift-front", "ZK0_SIM_EPISODES": 1, "ZK0_SIM_VIDEOS": 1,
        "ZK0_OUTPUT_DIR": out,
        "ZK0_DEVICE": "cpu", "WANDB_MODE": "offline", "WANDB_RUN_ID": "zk0-sim-test",
        **{f"ZK0_NODE_{i}_DATASET": sim_demo["datasets"][f"node-{i}"] for i in range(2)},
        **{f"ZK0_NODE_{i}_CAMERAS": sim_demo["cameras"][f"node-{i}"] for i in range(2)},
    }
    env_file = tmp_path / "sim.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    res = run_zk0("local", "--env-file", str(env_file), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    scored = {r["round"]: r["sim_eval"] for r in history if r.get("sim_eval")}
    assert sorted(scored) == [0, 2]  # round 0, every 2nd round and the last
    for result in scored.values():
        assert set(result) == {"lift-top", "lift-front", "all"}
        assert result["all"]["episodes"] == 2 and 0 <= result["all"]["ci_low"] <= result["all"]["ci_high"] <= 1
    assert sorted(p.name for p in (out / "videos" / "round-002").glob("*.mp4")) == [
        "lift-front-episode-0.mp4", "lift-top-episode-0.mp4"]
    card = (out / "checkpoints" / "round-002" / "README.md").read_text()
    assert "simulated success" in card and (out / "plots" / "server_eval.png").is_file()
    from wandb_reader import read_offline_run

    (run,) = (out / "wandb").glob("offline-run-*/run-zk0-sim-test.wandb")
    logged, _ = read_offline_run(run)
    for step in (0, 2):
        assert logged[step]["sim/all/success_rate"] == scored[step]["all"]["success_rate"]
    assert any(key.startswith("sim/video/lift-top") for key in logged[2])


def test_sim_experiment_file_names_the_labs_as_zk0_demo_sim_writes_them(tmp_path, monkeypatch):
    from dotenv import dotenv_values

    from zk0.settings import ServerSettings
    from zk0.settings_names import check_env_names
    from zk0.sim.demo import sim_demo_paths

    values = dotenv_values(Path(__file__).parents[1] / "experiments" / "sim.env")
    check_env_names(set(values))
    # A local base policy and evaluation set must exist to be read as folders (not Hub ids): where the demo puts them.
    monkeypatch.chdir(tmp_path)
    for key in ("ZK0_BASE_POLICY", "ZK0_EVAL_DATASET"):
        Path(values[key]).mkdir(parents=True)
    settings = ServerSettings.load(**{k[4:].lower(): v for k, v in values.items()
                                      if k.startswith("ZK0_") and not k.startswith("ZK0_NODE_")})
    assert settings.sim_eval_every > 0
    paths = sim_demo_paths(Path("demo-data/sim"), list(LABS.values()))
    for i in range(len(LABS)):
        dataset = Path(values[f"ZK0_NODE_{i}_DATASET"]).resolve()
        assert dataset == paths["datasets"][f"node-{i}"]
        assert values[f"ZK0_NODE_{i}_CAMERAS"] == paths["cameras"][f"node-{i}"]
