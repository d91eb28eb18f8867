"""Model cards and Hub pushes, against a local stand-in for the Hub (the Hub is unreachable here)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants

from hub_standin import HubStandIn
from zk0.publish import push_checkpoint
from zk0.server import ServerRuntime
from zk0.settings import ServerSettings


@pytest.fixture
def hub(monkeypatch):
    with HubStandIn() as standin:
        # Tests run with HF_HUB_OFFLINE=1; only the stand-in on loopback is allowed here.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
        yield standin


def runtime(demo, out, **kw) -> ServerRuntime:
    settings = ServerSettings.load(
        base_policy=str(demo["base-policy"]), eval_dataset=str(demo["datasets"]["server-eval"]),
        eval_cameras=demo["cameras"]["server-eval"],
        output_dir=out, num_rounds=3, eval_batches=1, batch_size=4, device="cpu", **kw,
    )
    return ServerRuntime(settings)


def nudged(state: dict, amount: float) -> dict:
    return {k: v + amount for k, v in state.items()}


def test_push_creates_repo_uploads_and_tags(hub, tmp_path):
    ckpt = tmp_path / "round-002"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 1000)
    oid = push_checkpoint(ckpt, "lab/smolvla-fed", 2, token="hf_x")
    assert "lab/smolvla-fed" in hub.repos
    assert set(hub.files["lab/smolvla-fed"]) == {"config.json", "model.safetensors"}
    assert hub.tags["lab/smolvla-fed"] == {"round-002": oid}


def test_failed_push_keeps_training_and_checkpoint_then_retries(hub, demo, tmp_path):
    rt = runtime(demo, tmp_path / "out", hf_repo_id="lab/smolvla-fed")
    state = rt.initial_state()
    hub.fail_with = 403
    rt.end_round(0, state)
    rt.end_round(1, nudged(state, 0.01))  # the push of round 1 is refused
    ckpt1 = tmp_path / "out" / "checkpoints" / "round-001"
    assert (ckpt1 / "model.safetensors").is_file() and hub.files == {}
    assert any("/api/repos/create" in r for r in hub.requests)
    hub.fail_with = None
    rt.end_round(2, nudged(state, 0.02))  # round 1 is retried, then round 2 goes up
    tags = hub.tags["lab/smolvla-fed"]
    assert sorted(tags) == ["round-001", "round-002"]
    assert tags["round-002"] == hub.commits[-1][1]  # main ends at the newest round
    assert "README.md" in hub.files["lab/smolvla-fed"] and "model.safetensors" in hub.files["lab/smolvla-fed"]
    assert hub.card_metadata[-1]["library_name"] == "lerobot" and "smolvla" in hub.card_metadata[-1]["tags"]


def test_model_card_has_metadata_and_the_runs_numbers(demo, tmp_path):
    rt = runtime(demo, tmp_path / "out", proximal_mu=0.05)
    state = rt.initial_state()
    metrics0 = rt.end_round(0, state)
    metrics1 = rt.end_round(1, nudged(state, 0.01))
    card = (tmp_path / "out" / "checkpoints" / "round-001" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: lerobot" in card
    assert "federated-learning" in card and "FedProx mu: 0.05" in card
    assert f"{metrics0['policy_loss']:.4f}" in card and f"{metrics1['action_mse']:.4f}" in card
    assert metrics0["policy_loss"] != metrics1["policy_loss"]


def test_plots_are_written_after_evaluation_rounds(demo, tmp_path):
    rt = runtime(demo, tmp_path / "out")
    rt.end_round(0, rt.initial_state())
    for name in ("server_eval.png", "client_loss.png", "bytes.png"):
        data = (tmp_path / "out" / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_zk0_push_by_hand(hub, tmp_path, capsys):
    from zk0.cli import main

    ckpt = tmp_path / "round-004"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "zk0.json").write_text(json.dumps({"round": 4}))
    assert main(["push", str(ckpt), "--repo-id", "lab/by-hand"]) == 0
    assert "round-004" in hub.tags["lab/by-hand"] and "pushed" in capsys.readouterr().out
    assert main(["push", str(tmp_path), "--repo-id", "lab/by-hand"]) == 2
