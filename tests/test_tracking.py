"""Tracking: WandB keys per round, no secrets in the config, never a crash without WandB."""

from zk0.server.tracking import Tracker, public_config, round_metrics

RECORD = {
    "round": 2,
    "server_eval": {"policy_loss": 0.5, "action_mse": 12.0, "num-samples": 32},
    "train_aggregate": {"loss": 0.7},
    "eval_aggregate": {"policy_loss": 0.6},
    "clients": {
        "11": {"node_id": 11, "name": "node-0", "train": {"loss": 0.8, "lr": 1e-4}, "eval": {"policy_loss": 0.61}},
        "12": {"node_id": 12, "name": "node-1", "train": {"loss": 0.6}},
    },
    "bytes": {"sent": 1000, "received": 900},
    "contributors": [11, 12],
}


def test_round_metrics_prefix_every_node():
    m = round_metrics(RECORD)
    assert m["server/policy_loss"] == 0.5 and m["server/action_mse"] == 12.0
    assert m["client_node-0/train/loss"] == 0.8 and m["client_node-0/eval/policy_loss"] == 0.61
    assert m["client_node-1/train/loss"] == 0.6
    assert m["clients/train/loss"] == 0.7 and m["clients/eval/policy_loss"] == 0.6
    assert m["bytes/sent"] == 1000 and m["clients/contributors"] == 2


def test_config_never_holds_secrets():
    cfg = public_config({"proximal_mu": 0.1, "hf_token": "hf_x", "wandb_api_key": "k", "hf_repo_id": "a/b"})
    assert cfg == {"proximal_mu": 0.1, "hf_repo_id": "a/b"}


def test_no_key_and_no_mode_skips_with_one_line(monkeypatch, tmp_path):
    import zk0.server.tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lines = []
    monkeypatch.setattr(zk0.server.tracking.log, "info", lambda msg, *a: lines.append(msg % a))
    monkeypatch.setattr(zk0.server.tracking.log, "warning", lambda msg, *a: lines.append(msg % a))
    tracker = Tracker.open(tmp_path, "zk0", {})
    assert tracker.run is None
    assert lines == ["WandB: skipped; set WANDB_API_KEY to track online or WANDB_MODE=offline to log locally"]
    tracker.log_round(0, RECORD)
    tracker.finish()
    assert not (tmp_path / "wandb").exists()


def test_run_id_is_kept_for_the_experiment(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = Tracker._run_id(tmp_path)
    assert Tracker._run_id(tmp_path) == first
    monkeypatch.setenv("WANDB_RUN_ID", "named-run")
    assert Tracker._run_id(tmp_path) == "named-run"
