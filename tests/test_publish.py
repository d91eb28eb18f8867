"""Model cards and Hub pushes, against a local stand-in for the Hub (the Hub is unreachable here)."""

from __future__ import annotations

import json

import pytest
from hub_standin import HubStandIn
from huggingface_hub import constants

from zk0.server.publish import push_checkpoint
from zk0.server.runtime import ServerRuntime
from zk0.settings import ServerSettings


@pytest.fixture
def hub(monkeypatch):
    with HubStandIn() as standin:
        # Tests run with HF_HUB_OFFLINE=1; only the stand-in on loopback is allowed here.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        # Large files take Git LFS, as without hf_xet: the stand-in speaks LFS, not Xet's storage protocol.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", standin.token)
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


def test_push_creates_repo_uploads_weights_through_lfs_and_tags(hub, tmp_path):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "round-002"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    save_file({"w": torch.randn(64, 64)}, ckpt / "model.safetensors")
    oid = push_checkpoint(ckpt, "lab/smolvla-fed", 2, token=hub.token)
    assert "lab/smolvla-fed" in hub.repos
    files = hub.files["lab/smolvla-fed"]
    assert files == {name: (ckpt / name).read_bytes() for name in ("config.json", "model.safetensors")}
    # The weights went as the Hub asks for them: LFS batch, a PUT to the signed href, an lfsFile pointer.
    assert hub.lfs_files["lab/smolvla-fed"] == {"model.safetensors"}
    assert any(r.endswith(".git/info/lfs/objects/batch") for r in hub.requests)
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests)
    assert hub.tags["lab/smolvla-fed"] == {"round-002": oid} and hub.refused == []


def test_push_with_a_wrong_token_is_refused_and_nothing_lands(hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    ckpt = tmp_path / "round-001"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(HfHubHTTPError, match="401"):
        push_checkpoint(ckpt, "lab/smolvla-fed", 1, token="hf_not_the_token")
    assert hub.refused and hub.repos == set() and hub.files == {}


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
    assert "README.md" in hub.files["lab/smolvla-fed"] and "model.safetensors" in hub.lfs_files["lab/smolvla-fed"]
    assert hub.card_metadata[-1]["library_name"] == "lerobot" and "smolvla" in hub.card_metadata[-1]["tags"]


def test_checkpoints_go_up_every_push_every_rounds_and_at_the_end(hub, demo, tmp_path):
    out = tmp_path / "out"
    rt = runtime(demo, out, hf_repo_id="lab/smolvla-fed", push_every=2)  # 3 rounds, a checkpoint every round
    state = rt.initial_state()
    for r in range(2):
        rt.end_round(r, nudged(state, 0.01 * r))
    assert (out / "checkpoints" / "round-001").is_dir() and hub.requests == []  # round 1 is kept, not pushed
    rt.end_round(2, nudged(state, 0.02))
    assert sorted(hub.tags["lab/smolvla-fed"]) == ["round-002"]
    rt.end_round(3, nudged(state, 0.03))  # the last round goes up although 3 is not a multiple of 2
    tags = hub.tags["lab/smolvla-fed"]
    assert sorted(tags) == ["round-002", "round-003"] and tags["round-003"] == hub.commits[-1][1]
    assert len(hub.commits) == 2
    final = out / "checkpoints" / "round-003" / "model.safetensors"
    assert hub.files["lab/smolvla-fed"]["model.safetensors"] == final.read_bytes()


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
    # Neither the card nor zk0's record names this machine's folders; LeRobot's own files keep the VLM's name (so that
    # plain from_pretrained works here) and the checkpoint carries the VLM's copy for other machines.
    ckpt = tmp_path / "out" / "checkpoints" / "round-001"
    for path in [ckpt / "README.md", ckpt / "zk0.json"]:
        assert str(demo["root"]) not in path.read_text(), path.name
    assert (ckpt / "vlm" / "config.json").is_file()
    assert json.loads((ckpt / "zk0.json").read_text())["base_policy"].endswith("base-policy")


def test_plots_are_written_after_evaluation_rounds(demo, tmp_path):
    rt = runtime(demo, tmp_path / "out")
    rt.end_round(0, rt.initial_state())
    rt.plotter.wait()  # written beside the next round's work, finished before the run ends (server_app.main)
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
