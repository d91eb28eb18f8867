"""The server between rounds: records, checkpoints and resuming an interrupted experiment."""

from __future__ import annotations

import json

import pytest
import torch

from zk0.server import ServerRuntime
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
