"""zk0.server.records: what the server writes per round, read back as a user (or a resumed server) reads it."""

from __future__ import annotations

import json

from zk0.server.records import RunRecorder, atomic_write_json


def read(out, name: str):
    return json.loads((out / name).read_text())


def test_each_step_of_a_round_is_on_disk_at_once_and_the_history_holds_every_round(tmp_path):
    recorder = RunRecorder(tmp_path)
    recorder.set(0, server_eval={"policy_loss": 2.5})
    assert read(tmp_path, "round-000.json")["server_eval"] == {"policy_loss": 2.5}
    recorder.client(1, 7, "train", {"name": "lab-a", "dataset": "lab/a", "policy_loss": 1.5, "steps": 30})
    recorder.client(1, 7, "eval", {"name": "lab-a", "policy_loss": 1.75})
    recorder.add_bytes(1, "sent", 100)
    recorder.add_bytes(1, "sent", 50)
    recorder.set(1, contributors=["7"])
    record = read(tmp_path, "round-001.json")
    # What describes the node sits beside its metrics, not among them.
    assert record["clients"]["7"] == {"node_id": 7, "name": "lab-a", "dataset": "lab/a",
                                      "train": {"policy_loss": 1.5, "steps": 30}, "eval": {"policy_loss": 1.75}}
    assert record["bytes"] == {"sent": 150} and record["contributors"] == ["7"]
    history = read(tmp_path, "history.json")
    assert [r["round"] for r in history] == [0, 1] and history[1] == record
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_truncate_forgets_rounds_that_did_not_finish(tmp_path):
    """A resumed server keeps the rounds up to its checkpoint, on disk and in the history it goes on writing."""
    recorder = RunRecorder(tmp_path)
    for r in range(4):
        recorder.set(r, server_eval={"policy_loss": 3.0 - r})
    recorder.truncate(1)
    assert sorted(p.name for p in tmp_path.glob("round-*.json")) == ["round-000.json", "round-001.json"]
    assert [r["round"] for r in read(tmp_path, "history.json")] == [0, 1]
    recorder.set(2, server_eval={"policy_loss": 0.5})
    assert [r["server_eval"]["policy_loss"] for r in read(tmp_path, "history.json")] == [3.0, 2.0, 0.5]


def test_values_json_cannot_hold_are_written_as_null(tmp_path):
    atomic_write_json(tmp_path / "sub" / "x.json", {"loss": float("nan"), "inf": [float("inf"), 1.0], 3: (2, 3)})
    assert read(tmp_path / "sub", "x.json") == {"loss": None, "inf": [None, 1.0], "3": [2, 3]}


def test_a_round_is_incomplete_until_said_otherwise_and_truncate_returns_what_it_dropped(tmp_path):
    recorder = RunRecorder(tmp_path)
    recorder.set(0, server_eval={"policy_loss": 2.0}, complete=True)
    recorder.set(1, proximal_mu=0.1)  # a round that started: its record is a stub
    assert read(tmp_path, "round-001.json")["complete"] is False
    atomic_write_json(tmp_path / "round-002.json", {"round": 2, "complete": False})  # a file the history lacks
    dropped = recorder.truncate(0)
    assert {r: rec["complete"] for r, rec in dropped.items()} == {1: False, 2: False}
    assert sorted(p.name for p in tmp_path.glob("round-*.json")) == ["round-000.json"]
