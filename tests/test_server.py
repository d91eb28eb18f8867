"""The server between rounds: records, checkpoints and resuming an interrupted experiment."""

from __future__ import annotations

import json

import pytest
import torch

from zk0.server.runtime import ServerRuntime
from zk0.settings import ServerSettings, SettingsError


def runtime(demo, out, **kw) -> ServerRuntime:
    settings = ServerSettings.load(
        base_policy=str(demo["base-policy"]), eval_dataset=str(demo["datasets"]["server-eval"]),
        eval_cameras=demo["cameras"]["server-eval"],
        output_dir=out, num_rounds=4, eval_batches=1, batch_size=4, device="cpu", **kw,
    )
    return ServerRuntime(settings)


def test_restart_resumes_from_the_newest_checkpoint(demo, tmp_path):
    rt = runtime(demo, tmp_path)
    base = rt.initial_state()
    states = {r: {k: v + 0.01 * r for k, v in base.items()} for r in range(3)}
    for r in range(3):
        rt.end_round(r, states[r])
    rt.recorder.set(3, clients={"9": {"node_id": 9}})  # round 3 started, then the server died
    again = runtime(demo, tmp_path)
    assert again.start_round == 2
    for name, value in again.initial_state().items():
        torch.testing.assert_close(value, states[2][name], rtol=0, atol=0)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in again.history()] == [0, 1, 2]
    assert again.end_round(2, states[2]) == history[2]["server_eval"]  # not evaluated or recorded twice
    assert [r["round"] for r in json.loads((tmp_path / "history.json").read_text())] == [0, 1, 2]
    assert not (tmp_path / "round-003.json").exists()


def test_fresh_output_dir_starts_at_round_zero(demo, tmp_path):
    assert runtime(demo, tmp_path).start_round == 0


def test_output_dir_of_another_experiment_is_refused(demo, tmp_path):
    runtime(demo, tmp_path, proximal_mu=0.01)
    with pytest.raises(SettingsError, match="another experiment.*proximal_mu.*ZK0_OUTPUT_DIR"):
        runtime(demo, tmp_path, proximal_mu=0.1)


def node_stats(demo, name: str, tmp_path) -> str:
    """One node's training-episode statistics as it sends them (JSON)."""
    from zk0.data import resolve_dataset
    from zk0.stats import compute_stats, to_json, training_frames

    _, root = resolve_dataset(str(demo["datasets"][name]), tmp_path / "cache")
    return to_json(compute_stats(training_frames(root, [0, 1, 2, 3])))


def test_merged_statistics_reach_nodes_checkpoints_and_a_restarted_server(demo, tmp_path):
    from zk0.errors import RunFailed
    from zk0.stats import digest, from_json

    rt = runtime(demo, tmp_path / "out", min_nodes=2)
    assert rt.stats == "" and rt.train_config()["norm-stats-digest"] == ""
    with pytest.raises(RunFailed, match=r"from 1 node\(s\), ZK0_MIN_NODES=2 are required: node-1: error: boom"):
        rt.merge_node_stats([("node-0", node_stats(demo, "node-0", tmp_path), ""), ("node-1", None, "error: boom")])
    replies = [(f"node-{i}", node_stats(demo, f"node-{i}", tmp_path), "") for i in (0, 2)]
    rt.merge_node_stats(replies)
    merged = from_json(rt.stats)
    assert rt.train_config()["norm-stats-digest"] == digest(rt.stats) != ""  # the statistics go beside the config
    assert merged["action"]["count"][0] == 2 * 4 * 30
    assert rt.node_frames == {"node-0": 4 * 30, "node-2": 4 * 30}  # each lab's own count, for the round records
    # The evaluation and the checkpoints normalise with them, not with the base policy's.
    normalizer = next(s for s in rt.preprocessor.steps if type(s).__name__ == "NormalizerProcessorStep")
    mean = normalizer._tensor_stats["action"]["mean"].double()
    torch.testing.assert_close(mean, torch.tensor(merged["action"]["mean"]))
    again = runtime(demo, tmp_path / "out", min_nodes=2)
    assert again.stats == rt.stats  # a restarted server asks nobody: it reads OUTPUT_DIR/norm-stats.json
    assert again.node_frames == rt.node_frames


def test_records_past_the_checkpoint_are_discarded_and_named(demo, tmp_path, caplog):
    """Round 3 finished but no checkpoint holds it; round 4 (a checkpoint round) died after training."""
    rt = runtime(demo, tmp_path, checkpoint_every=2)
    state = rt.initial_state()
    for r in range(4):
        rt.end_round(r, state)
    rt.recorder.set(4, clients={"9": {"node_id": 9}})  # replies aggregated, then the server died
    done = [json.loads((tmp_path / f"round-{r:03d}.json").read_text())["complete"] for r in range(5)]
    assert done == [True, True, True, True, False]
    rt.recorder.set(2, complete=False)  # as if it died between round 2's checkpoint and its record's last write
    with caplog.at_level("INFO", logger="zk0"):
        again = runtime(demo, tmp_path, checkpoint_every=2)
    assert again.start_round == 2
    assert "round 3's record discarded: no checkpoint holds its model (the newest is round-002); it runs again" \
        in caplog.text
    assert "round 4's record discarded: its checkpoint was never written; it runs again" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("round-*.json")) == [f"round-{r:03d}.json" for r in range(3)]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(r["round"], r["complete"]) for r in history] == [(0, True), (1, True), (2, True)]


def test_without_a_checkpoint_no_record_is_kept(demo, tmp_path, caplog):
    rt = runtime(demo, tmp_path, checkpoint_every=2)
    rt.end_round(0, rt.initial_state())
    rt.recorder.set(1, clients={})  # an interrupted run's stub
    with caplog.at_level("INFO", logger="zk0"):
        assert runtime(demo, tmp_path, checkpoint_every=2).start_round == 0
    assert "round 0's record discarded: no checkpoint was written before the run stopped; it runs again" in caplog.text
    assert "round 1's record discarded: its checkpoint was never written" not in caplog.text
    assert "round 1's record discarded: the round did not finish; it runs again" in caplog.text
    assert not list(tmp_path.glob("round-*.json")) and json.loads((tmp_path / "history.json").read_text()) == []
