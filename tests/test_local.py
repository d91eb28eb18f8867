"""`zk0 local`: a real SuperLink and four real SuperNodes on loopback, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from federation import run_zk0, write_env


def test_run_completes(finished_run):
    res, _ = finished_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "finished:completed" in res.stderr


def test_every_round_is_recorded_once(finished_run):
    _, out = finished_run
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    for r in range(4):
        assert json.loads((out / f"round-{r:03d}.json").read_text()) == history[r]


def test_every_node_contributes_every_round(finished_run):
    _, out = finished_run
    history = json.loads((out / "history.json").read_text())
    for record in history[1:]:
        assert len(record["contributors"]) == 4 and record["excluded"] == {}
        names = sorted(c["name"] for c in record["clients"].values())
        assert names == [f"node-{i}" for i in range(4)]
        for client in record["clients"].values():
            assert client["train"]["steps"] == 15 and client["train"]["num-samples"] == 120
            assert client["eval"]["num-samples"] > 0
        assert record["bytes"]["sent"] == record["bytes"]["received"] > 0
    # ZK0_EVAL_MODE=in-train: each round's train message evaluated the model it brought (round 0's included);
    # an evaluate message came only for the last round's model, and with it the only extra download.
    assert [r.get("node_eval_in") for r in history] == ["train", "train", "train", "evaluate"]
    assert all(c["eval"]["num-samples"] > 0 for c in history[0]["clients"].values()) and len(history[0]["clients"]) == 4
    assert [bool(r["bytes"].get("sent_eval")) for r in history] == [False, False, False, True]


def test_nodes_stay_warm_and_their_workers_end_with_the_run(finished_run):
    _, out = finished_run
    history = json.loads((out / "history.json").read_text())
    # The statistics query before round 1 starts each node's worker; every train and evaluate message
    # after it finds the policy loaded.
    assert (out / "norm-stats.json").is_file()
    for record in history[1:]:
        for client in record["clients"].values():
            assert client["train"]["warm"] == 1.0 and client["eval"]["warm"] == 1.0
    # Each worker runs the run's own copy of the app; none outlives `zk0 local`.
    deadline = time.monotonic() + 10
    while (left := [pid for pid, env in _warm_workers() if str(out) in env]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"warm workers {left} outlived the run"


def _warm_workers():
    """(pid, environment) of every running `python -m zk0.node.warm` of this user."""
    for entry in Path("/proc").iterdir():
        try:
            if b"zk0.node.warm" in (entry / "cmdline").read_bytes().split(b"\0"):
                yield int(entry.name), (entry / "environ").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue


def test_server_evaluation_improves(finished_run):
    _, out = finished_run
    history = json.loads((out / "history.json").read_text())
    first, last = history[0]["server_eval"], history[-1]["server_eval"]
    assert last["policy_loss"] < first["policy_loss"]
    assert all(r["server_eval"]["num-samples"] == 24 for r in history)


def test_checkpoint_loads_with_lerobot(finished_run):
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    _, out = finished_run
    ckpt = out / "checkpoints" / "round-003"
    policy = SmolVLAPolicy.from_pretrained(str(ckpt))
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
    assert json.loads((ckpt / "zk0.json").read_text())["round"] == 3
    assert pre is not None and post is not None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-001", "round-002", "round-003"]


def test_one_offline_wandb_run_with_every_nodes_metrics(finished_run):
    from wandb_reader import read_offline_run

    _, out = finished_run
    runs = list((out / "wandb").glob("offline-run-*/run-zk0-e2e-test.wandb"))
    assert len(runs) == 1
    history, exit_code = read_offline_run(runs[0])
    assert exit_code == 0 and sorted(history) == [0, 1, 2, 3]
    for step in range(4):
        assert "server/policy_loss" in history[step] and "server/action_mse" in history[step]
    for step in (1, 2, 3):
        for node in range(4):
            assert f"client_node-{node}/train/loss" in history[step]
            assert f"client_node-{node}/eval/policy_loss" in history[step]
        assert history[step]["bytes/sent"] > 0
    assert (out / "wandb-run-id.txt").read_text().strip() == "zk0-e2e-test"


def test_plots_exist(finished_run):
    _, out = finished_run
    for name in ("server_eval.png", "client_loss.png", "bytes.png"):
        assert (out / "plots" / name).read_bytes().startswith(b"\x89PNG")


def test_node_logs_show_training_progress(finished_run):
    _, out = finished_run
    log = (out / "local" / "logs" / "supernode-0.log").read_text()
    assert "step 15/15" in log


def test_every_mistake_of_an_env_file_is_refused_at_once_before_anything_starts(demo, tmp_path):
    out = tmp_path / "out"
    mistakes = {
        "ZK0_PROXIMAL_MUU": "0.1",  # misspelt
        "ZK0_NUM_ROUNDS": "three",
        "ZK0_NODE_2_DATASET": "/nonexistent/so100",
        "ZK0_NODE_1_CAMERAS": "laptop:camera1",
        "ZK0_NODE_3_HELDOUT_EPISODES": "6",  # of 6 episodes
    }
    env_file = write_env(tmp_path / "bad.env", demo, out, **mistakes)
    res = run_zk0("local", "--env-file", str(env_file), timeout=120)
    assert res.returncode == 2 and "5 problem(s)" in res.stderr, res.stderr
    lines = env_file.read_text().splitlines()
    for needle, variable in [
        ("unknown variable(s) ZK0_PROXIMAL_MUU", "ZK0_PROXIMAL_MUU"),
        ("ZK0_NUM_ROUNDS (run/node config", "ZK0_NUM_ROUNDS"),
        ("/nonexistent/so100): no LeRobot dataset there", "ZK0_NODE_2_DATASET"),
        ("ZK0_NODE_1_CAMERAS (run/node config 'cameras')", "ZK0_NODE_1_CAMERAS"),
        ("holding out 6 of its 6 episodes", "ZK0_NODE_3_HELDOUT_EPISODES"),
    ]:
        assert needle in res.stderr, needle
        line = next(i for i, text in enumerate(lines, 1) if text.startswith(f"{variable}="))
        assert f"bad.env:{line} ({variable})" in res.stderr, variable  # where to fix it
    assert not out.exists()
